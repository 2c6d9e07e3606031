#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../ztunnel/tests/support/harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::forwarded(data));
