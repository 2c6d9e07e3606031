#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    // xDS resources from the network: decode, then validate into our state types.
    if let Ok(w) = zmesh_proto::workload::Workload::decode(data) {
        let _ = zmesh_core::state::Workload::try_from(w);
    }
    if let Ok(s) = zmesh_proto::workload::Service::decode(data) {
        let _ = zmesh_core::state::Service::try_from(s);
    }
    if let Ok(a) = zmesh_proto::security::Authorization::decode(data) {
        let _ = zmesh_core::state::Policy::try_from(a);
    }
});
