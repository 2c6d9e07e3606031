//! Stable-toolchain companion of the controller's fuzz targets
//! (`fuzz/fuzz_targets/controller_*.rs`): YAML files of every kind through the file source and
//! translation, the CA's `CreateCertificate` requests (bearer token, CSR, metadata, validity),
//! ADS requests from proxies and waypoint Gateways get random and mutated input and must give
//! a clear error, never panic.

use std::path::{Path, PathBuf};

use prost::Message;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

#[path = "support/harness.rs"]
mod harness;
#[path = "../../core/tests/support/json.rs"]
mod json;
#[path = "../../core/tests/support/proto.rs"]
mod proto;
#[path = "../../core/tests/support/rng.rs"]
mod rng;

use rng::{Rng, check, pem, rounds};

/// YAML fragments: document markers, lists, anchors, tags, odd scalars.
const YAML_DICT: &[&[u8]] = &[
    b"\n---\n",
    b"\n- ",
    b": ",
    b"{}",
    b"[]",
    b"&a ",
    b"*a",
    b"!!binary ",
    b"~",
    b"0x",
    b"1e400",
    b"\n...\n",
    b"kind: List\nitems:\n",
];

/// Every YAML fixture of the controller's golden tests: Namespaces, Pods, Services,
/// EndpointSlices, ServiceEntries, AuthorizationPolicies, PeerAuthentications,
/// VirtualServices, DestinationRules, HTTPRoutes, TCPRoutes, Gateways.
fn fixture_files() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut dirs = vec![root.join("golden_l7")];
    for e in std::fs::read_dir(root.join("golden")).expect("tests/golden") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            dirs.push(p);
        }
    }
    let mut files = Vec::new();
    for dir in dirs {
        for e in std::fs::read_dir(&dir).expect("fixture dir") {
            let p = e.expect("dir entry").path();
            if p.extension().is_some_and(|x| x == "yaml") {
                let text = std::fs::read_to_string(&p).expect("fixture");
                files.push((p, text));
            }
        }
    }
    files.sort();
    files
}

fn objects(text: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).expect("fixtures are valid YAML");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

#[test]
fn yaml_files_of_every_kind() {
    let files = fixture_files();
    let kinds: std::collections::BTreeSet<String> = files
        .iter()
        .flat_map(|(_, t)| objects(t))
        .filter_map(|o| o.get("kind").and_then(Value::as_str).map(str::to_string))
        .collect();
    for kind in zmesh_controller::sources::file::ALL_KINDS {
        assert!(kinds.contains(*kind), "no fixture of kind {kind}");
    }
    let mut rng = Rng::new(0x9a_4d1e);
    for i in 0..rounds(1_000) {
        // Objects of two fixtures: workloads and services meet the policies and routes.
        let (_, a) = rng.pick(&files);
        let (_, b) = rng.pick(&files);
        let mut base = objects(a);
        if i % 2 == 0 {
            base.extend(objects(b));
        }
        let text = if i % 3 == 0 {
            let joined: Vec<String> = [a, b].iter().map(|t| t.to_string()).collect();
            let m = rng.mutate_with(joined.join("\n---\n").as_bytes(), YAML_DICT);
            String::from_utf8_lossy(&m).into_owned()
        } else {
            // Structure-aware: one object changed, the file written as JSON documents (JSON
            // is YAML).
            let mut docs = base.clone();
            let k = rng.below(docs.len());
            match docs[k].get_mut("spec") {
                Some(spec) if !rng.one_in(4) => json::mutate(&mut rng, spec),
                _ => json::mutate(&mut rng, &mut docs[k]),
            }
            let docs: Vec<String> = docs
                .iter()
                .map(|d| serde_json::to_string(d).unwrap_or_default())
                .collect();
            docs.join("\n---\n")
        };
        check("YAML file", text.as_bytes(), || {
            harness::yaml_file(&base, &text)
        });
    }
}

#[test]
fn ca_create_certificate_requests() {
    let sleep: zmesh_core::identity::Identity = "spiffe://cluster.local/ns/default/sa/sleep"
        .parse()
        .expect("identity");
    let other: zmesh_core::identity::Identity = "spiffe://cluster.local/ns/prod/sa/db"
        .parse()
        .expect("identity");
    let csrs: Vec<String> = [&sleep, &other]
        .iter()
        .map(|id| zmesh_core::ca::generate_csr(id).expect("CSR").0)
        .collect();
    let ders: Vec<Vec<u8>> = csrs
        .iter()
        .map(|p| {
            CertificateSigningRequestDer::from_pem_slice(p.as_bytes())
                .expect("PEM")
                .as_ref()
                .to_vec()
        })
        .collect();
    // The happy path first: the seeds are valid.
    assert!(harness::ca_request(
        format!("Bearer {}", harness::SA_TOKEN).as_bytes(),
        &csrs[0],
        3600,
        None,
    ));
    assert!(harness::ca_request(
        format!("bearer {}", harness::NODE_TOKEN).as_bytes(),
        &csrs[0],
        0,
        Some(prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(sleep.to_string())),
        }),
    ));
    let auths: Vec<String> = [harness::NODE_TOKEN, harness::SA_TOKEN]
        .iter()
        .flat_map(|t| [format!("Bearer {t}"), format!("bearer  {t} ")])
        .collect();
    let identities = [sleep.to_string(), other.to_string()];
    let validities = [0, 1, 3600, 86_401, -1, i64::MAX, i64::MIN];
    let mut rng = Rng::new(0xca_5e17);
    for i in 0..rounds(1_500) {
        let good_auth = rng.pick(&auths).clone();
        let auth = match i % 4 {
            0 => rng.bytes(40),
            1 => rng.mutate(good_auth.as_bytes()),
            _ => good_auth.into_bytes(),
        };
        let k = rng.below(csrs.len());
        let csr = match i % 5 {
            0 | 1 => csrs[k].clone(),
            2 => String::from_utf8_lossy(&rng.mutate(csrs[k].as_bytes())).into_owned(),
            // Behind the PEM armour: mutated DER.
            _ => pem("CERTIFICATE REQUEST", &rng.mutate(&ders[k])),
        };
        let validity = if rng.one_in(2) {
            *rng.pick(&validities)
        } else {
            rng.next() as i64
        };
        let id = rng.pick(&identities).clone();
        let impersonated = match rng.below(5) {
            0 => None,
            1 => Some(prost_types::value::Kind::StringValue(id)),
            2 => Some(prost_types::value::Kind::StringValue(
                String::from_utf8_lossy(&rng.mutate(id.as_bytes())).into_owned(),
            )),
            3 => Some(prost_types::value::Kind::NumberValue(f64::NAN)),
            _ => Some(prost_types::value::Kind::StructValue(Default::default())),
        }
        .map(|kind| prost_types::Value { kind: Some(kind) });
        let input = format!("{auth:?} {csr:?} {validity} {impersonated:?}");
        check("CreateCertificate", input.as_bytes(), || {
            let _ = harness::ca_request(&auth, &csr, validity, impersonated);
        });
    }
}

#[test]
fn ads_requests_from_proxies() {
    use zmesh_proto::discovery::DeltaDiscoveryRequest;
    let seeds: Vec<Vec<u8>> = [
        DeltaDiscoveryRequest {
            node: Some(zmesh_proto::discovery::Node {
                id: "ztunnel~10.0.0.5~ztunnel-x7k2p.istio-system~istio-system.svc.cluster.local"
                    .into(),
                ..Default::default()
            }),
            type_url: zmesh_proto::ADDRESS_TYPE_URL.into(),
            resource_names_subscribe: vec!["*".into()],
            initial_resource_versions: [("Kubernetes//v1/Pod/default/sleep-1".into(), "3".into())]
                .into(),
            ..Default::default()
        },
        DeltaDiscoveryRequest {
            type_url: zmesh_proto::L7_SERVICE_TYPE_URL.into(),
            response_nonce: "17".into(),
            error_detail: Some(zmesh_proto::google::rpc::Status {
                code: 3,
                message: "default/reviews: does not decode".into(),
                ..Default::default()
            }),
            resource_names_unsubscribe: vec!["default/ratings".into()],
            ..Default::default()
        },
    ]
    .iter()
    .map(Message::encode_to_vec)
    .collect();
    let mut rng = Rng::new(0xad5_0001);
    for i in 0..rounds(20_000) {
        let seed = rng.pick(&seeds).clone();
        let input = match i % 4 {
            0 => rng.bytes(128),
            1 => rng.mutate(&seed),
            _ => proto::mutate(&mut rng, &seed),
        };
        check("ADS request", &input, || harness::ads_request(&input));
    }
}

#[test]
fn waypoint_gateways() {
    let seed = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "shop", "uid": "0e5c-uid",
                     "generation": 3, "resourceVersion": "17",
                     "labels": {"istio.io/waypoint-for": "service"}},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
        "status": {"conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted",
             "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 2},
            {"type": "Programmed", "status": "False", "reason": "Pending"}],
            "addresses": [{"type": "IPAddress", "value": "10.96.0.10"}]}
    });
    let mut rng = Rng::new(0x6a7e_3a75);
    for _ in 0..rounds(3_000) {
        let mut gw = seed.clone();
        json::mutate(&mut rng, &mut gw);
        let input = serde_json::to_vec(&gw).unwrap_or_default();
        check("waypoint Gateway", &input, || {
            harness::waypoint_gateway(&gw)
        });
    }
}
