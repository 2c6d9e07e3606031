#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(id) = s.parse::<zmesh_core::identity::Identity>()
    {
        // Whatever parses must print back to itself.
        assert_eq!(id.to_string(), s);
    }
});
