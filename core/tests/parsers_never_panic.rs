//! Stable-toolchain companion of the fuzz targets in `fuzz/`: the parsers of untrusted input get
//! random and mutated input and must return errors, never panic. This file covers zmesh-core's
//! parsers; the waypoint's, ztunnel's and the controller's have their own
//! `tests/parsers_never_panic.rs`, sharing `tests/support/rng.rs` of this crate.

use prost::Message;
use zmesh_core::ca::CertificateAuthority;
use zmesh_core::certs::WorkloadCertificate;
use zmesh_core::hbone::server::Target;
use zmesh_core::identity::Identity;
use zmesh_core::state::LocalConfig;
use zmesh_core::xds::NodeId;

mod support {
    pub mod json;
    pub mod proto;
    pub mod rng;
}

use support::rng::{Rng, check, pem, rounds};

/// The local-config format as its module documentation shows it (every section and field),
/// read from `src/state/local.rs` so that the seed follows the documented format.
fn documented_local_config() -> String {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/state/local.rs"))
        .expect("core/src/state/local.rs");
    src.lines()
        .skip_while(|l| !l.starts_with("//! ```yaml"))
        .skip(1)
        .take_while(|l| !l.starts_with("//! ```"))
        .map(|l| {
            format!(
                "{}\n",
                l.strip_prefix("//!")
                    .unwrap_or(l)
                    .strip_prefix(' ')
                    .unwrap_or("")
            )
        })
        .collect()
}

/// What the documented example leaves out: a DENY policy with the other match kinds, and the
/// other gateway forms.
const MORE_LOCAL_CONFIG: &str = r#"
workloads:
- name: db
  namespace: prod
  workloadIps: ["10.0.1.1"]
  networkGateway: {address: "net1/10.1.0.1", hbonePort: 15008}
  applicationTunnel: {protocol: PROXY, port: 15088}
policies:
- name: deny
  namespace: prod
  scope: WorkloadSelector
  action: Deny
  rules:
  - - - namespaces: [{prefix: "te"}, {presence: {}}]
        destinationIps: ["10.0.0.1/32"]
        notPrincipals: ["cluster.local/ns/x/*", "*-admin"]
"#;

/// YAML and protobuf tokens that steer mutation to other branches.
const DICT: &[&[u8]] = &[
    b"\n- ",
    b": ",
    b"{}",
    b"[]",
    b"null",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x80\x80\x80\x80\x10",
    b"4294967296",
    b"-1",
    b"::",
    b"/33",
];

#[test]
fn authority_identity_and_node_id_parsers() {
    let seeds: [&[u8]; 6] = [
        b"10.0.0.5:8080",
        b"[fd00::1]:443",
        b"reviews.default.svc.cluster.local:9080",
        b"spiffe://cluster.local/ns/default/sa/sleep",
        b"ztunnel~10.0.0.5~ztunnel-x7k2p.istio-system~istio-system.svc.cluster.local",
        b"waypoint~10.0.0.9~waypoint-5d8f.v1.default~default.svc.cluster.local",
    ];
    let parse = |input: &[u8]| {
        let s = String::from_utf8_lossy(input);
        let _ = Target::parse(&s);
        if let Ok(id) = s.parse::<Identity>() {
            assert_eq!(id.to_string(), s, "identity must print back to its input");
        }
        // The controller parses the node id every proxy sends on its ADS stream.
        if let Some(n) = NodeId::parse(&s) {
            assert_eq!(n.to_string(), s, "node id must print back to its input");
        }
    };
    Rng::new(0x5eed_1234_abcd_ef01).run(
        "authority/identity/node id",
        rounds(20_000),
        (&seeds, DICT, 64),
        parse,
    );
}

#[test]
fn xds_resources_decode_and_validate() {
    let mut rng = Rng::new(0x0dd_ba11);
    // Seeds: the wire form of every object of the local configs.
    let mut update =
        LocalConfig::from_str(&documented_local_config()).expect("the documented config is valid");
    let more = LocalConfig::from_str(MORE_LOCAL_CONFIG).expect("valid");
    update.upsert_workloads.extend(more.upsert_workloads);
    update.upsert_policies.extend(more.upsert_policies);
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    seeds.extend(
        update
            .upsert_workloads
            .iter()
            .map(|w| zmesh_proto::workload::Workload::from(w).encode_to_vec()),
    );
    seeds.extend(
        update
            .upsert_services
            .iter()
            .map(|s| zmesh_proto::workload::Service::from(s).encode_to_vec()),
    );
    seeds.extend(
        update
            .upsert_policies
            .iter()
            .map(|p| zmesh_proto::security::Authorization::from(p).encode_to_vec()),
    );
    assert!(seeds.len() >= 5, "seeds missing: {}", seeds.len());
    for i in 0..rounds(20_000) {
        let seed = rng.pick(&seeds).clone();
        let input = match i % 4 {
            0 => rng.bytes(256),
            1 => rng.mutate_with(&seed, DICT),
            _ => support::proto::mutate(&mut rng, &seed),
        };
        check("xDS resource", &input, || {
            if let Ok(m) = zmesh_proto::workload::Workload::decode(input.as_slice()) {
                let _ = zmesh_core::state::Workload::try_from(m);
            }
            if let Ok(m) = zmesh_proto::workload::Service::decode(input.as_slice()) {
                let _ = zmesh_core::state::Service::try_from(m);
            }
            if let Ok(m) = zmesh_proto::security::Authorization::decode(input.as_slice()) {
                let _ = zmesh_core::state::Policy::try_from(m);
            }
        });
    }
}

#[test]
fn local_config_yaml() {
    let mut rng = Rng::new(0xfeed_f00d);
    let texts = [documented_local_config(), MORE_LOCAL_CONFIG.to_string()];
    let docs: Vec<serde_json::Value> = texts
        .iter()
        .map(|t| serde_saphyr::from_str(t).expect("valid YAML"))
        .collect();
    for i in 0..rounds(3_000) {
        let input = if i % 2 == 0 {
            let text = rng.pick(&texts).clone();
            rng.mutate_with(text.as_bytes(), DICT)
        } else {
            // Structure-aware; JSON is YAML too.
            let mut doc = rng.pick(&docs).clone();
            support::json::mutate(&mut rng, &mut doc);
            serde_json::to_vec(&doc).unwrap_or_default()
        };
        check("local config", &input, || {
            let _ = LocalConfig::parse(&String::from_utf8_lossy(&input), "fuzz");
        });
    }
}

/// The CA's answer (`IstioCertificateResponse.cert_chain`, PEM) is parsed by every proxy.
#[test]
fn ca_response_certificate_chain() {
    let mut rng = Rng::new(0xce27_c4a1);
    let ca = CertificateAuthority::generate("cluster.local").expect("CA");
    let identity: Identity = "spiffe://cluster.local/ns/default/sa/sleep"
        .parse()
        .expect("identity");
    let (csr, key) = zmesh_core::ca::generate_csr(&identity).expect("CSR");
    let chain = ca
        .sign_csr(&csr, &identity, std::time::Duration::from_secs(3600))
        .expect("signed");
    let leaf_der = ca
        .issue(
            &identity,
            std::time::SystemTime::now(),
            std::time::SystemTime::now() + std::time::Duration::from_secs(60),
        )
        .expect("issued")
        .chain[0]
        .to_vec();
    WorkloadCertificate::from_pem_chain(identity.clone(), &chain, key.clone_key())
        .expect("the seed chain is valid");
    let pem_dict: &[&[u8]] = &[
        b"-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\n",
    ];
    // Each round parses a PEM chain and a DER certificate: kept low for debug builds.
    for i in 0..rounds(1_500) {
        let mut pems = chain.clone();
        let which = rng.below(pems.len());
        let input = match i % 3 {
            0 => rng.mutate_with(pems[which].as_bytes(), pem_dict),
            // Behind the armour: mutated DER, wrapped again.
            _ => pem("CERTIFICATE", &rng.mutate(&leaf_der)).into_bytes(),
        };
        pems[which] = String::from_utf8_lossy(&input).into_owned();
        check("CA response chain", &input, || {
            let _ = WorkloadCertificate::from_pem_chain(identity.clone(), &pems, key.clone_key());
        });
    }
}
