#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../waypoint/tests/support/harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::l7_service_config(data));
