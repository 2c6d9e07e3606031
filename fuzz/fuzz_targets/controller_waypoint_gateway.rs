#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../controller/tests/support/harness.rs"]
mod harness;

// A Gateway object as the Kubernetes API returns it (JSON).
fuzz_target!(|data: &[u8]| {
    if let Ok(gw) = serde_json::from_slice::<serde_json::Value>(data) {
        harness::waypoint_gateway(&gw);
    }
});
