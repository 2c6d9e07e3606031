#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../controller/tests/support/harness.rs"]
mod harness;

// authorization metadata, ImpersonatedIdentity and CSR PEM, separated by NUL bytes.
fuzz_target!(|data: &[u8]| harness::ca_request_bytes(data));
