#![no_main]
use libfuzzer_sys::fuzz_target;

// The node id every proxy sends on its ADS stream, parsed by the controller.
fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Some(n) = zmesh_core::xds::NodeId::parse(s)
    {
        assert_eq!(n.to_string(), s);
    }
});
