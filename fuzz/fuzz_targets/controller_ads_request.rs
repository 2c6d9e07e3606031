#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../controller/tests/support/harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::ads_request(data));
