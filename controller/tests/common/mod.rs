//! Helpers shared by the controller's integration tests: load a YAML directory, and render
//! translation output as readable JSON (through zmesh-core's validated types, so a golden file
//! also proves that our own ztunnel accepts every resource).

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use prost::Message;
use serde_json::{Map, Value, json};
use zmesh_controller::sources::file::{FileSource, SourceError};
use zmesh_controller::store::ObjectStore;
use zmesh_controller::translate::Translated;
use zmesh_core::state::{Policy, Service, Workload};
use zmesh_proto::{security, workload};

/// Load `dir` with the file source into a fresh store.
pub fn load_dir(dir: &Path) -> (Arc<ObjectStore>, Vec<SourceError>) {
    let store = ObjectStore::new();
    let errors = FileSource::new(dir).load_once(&store);
    (store, errors)
}

/// Address and Authorization resources as JSON, keyed by resource name.
pub fn render(t: &Translated) -> Value {
    let mut addresses = Map::new();
    if let Some(list) = t.resources.get(zmesh_proto::ADDRESS_TYPE_URL) {
        for (name, any) in list {
            let a = workload::Address::decode(any.value.as_slice())
                .unwrap_or_else(|e| panic!("{name}: undecodable Address: {e}"));
            let v = match a.r#type {
                Some(workload::address::Type::Workload(w)) => {
                    let host_network = w.network_mode == workload::NetworkMode::HostNetwork as i32;
                    let w = Workload::try_from(w)
                        .unwrap_or_else(|e| panic!("{name}: ztunnel would reject: {e}"));
                    assert_eq!(&w.uid, name, "workload resource name is its uid");
                    let mut v = serde_json::to_value(w).unwrap();
                    // Wire fields zmesh-core does not model.
                    if host_network {
                        v["networkMode"] = json!("HOST_NETWORK");
                    }
                    json!({ "workload": v })
                }
                Some(workload::address::Type::Service(s)) => {
                    // zmesh-core ignores CIDR VIPs: show the addresses as sent.
                    let vips: Vec<String> = s.addresses.iter().map(network_address).collect();
                    let s = Service::try_from(s)
                        .unwrap_or_else(|e| panic!("{name}: ztunnel would reject: {e}"));
                    assert_eq!(&s.key(), name, "service resource name is ns/hostname");
                    let mut v = serde_json::to_value(s).unwrap();
                    v.as_object_mut().unwrap().remove("vips");
                    v["addresses"] = json!(vips);
                    json!({ "service": v })
                }
                None => panic!("{name}: empty Address"),
            };
            addresses.insert(name.clone(), v);
        }
    }
    let mut authorizations = Map::new();
    if let Some(list) = t.resources.get(zmesh_proto::AUTHORIZATION_TYPE_URL) {
        for (name, any) in list {
            let a = security::Authorization::decode(any.value.as_slice())
                .unwrap_or_else(|e| panic!("{name}: undecodable Authorization: {e}"));
            let p =
                Policy::try_from(a).unwrap_or_else(|e| panic!("{name}: ztunnel would reject: {e}"));
            assert_eq!(&p.key(), name, "policy resource name is ns/name");
            authorizations.insert(name.clone(), serde_json::to_value(p).unwrap());
        }
    }
    let mut out = json!({
        "translateErrors": t.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        "addresses": addresses,
        "authorizations": authorizations,
    });
    strip_nulls(&mut out);
    out
}

/// `[network/]ip[/length]`.
fn network_address(a: &workload::NetworkAddress) -> String {
    let ip: std::net::IpAddr = match a.address.len() {
        4 => <[u8; 4]>::try_from(a.address.as_slice()).unwrap().into(),
        16 => <[u8; 16]>::try_from(a.address.as_slice()).unwrap().into(),
        n => panic!("address of {n} bytes"),
    };
    let net = if a.network.is_empty() {
        String::new()
    } else {
        format!("{}/", a.network)
    };
    match a.length {
        Some(l) => format!("{net}{ip}/{l}"),
        None => format!("{net}{ip}"),
    }
}

/// Absent optional fields make the files longer, not clearer.
fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Source errors with file names relative to `dir` (stable across machines).
pub fn render_source_errors(dir: &Path, errors: &[SourceError]) -> Value {
    errors
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.file = e.file.strip_prefix(dir).unwrap_or(&e.file).to_path_buf();
            Value::String(e.to_string())
        })
        .collect()
}
