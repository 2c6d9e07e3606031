#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../controller/tests/support/harness.rs"]
mod harness;

// A YAML file of the controller's file source (any kinds, several documents).
fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        harness::yaml_file(&[], text);
    }
});
