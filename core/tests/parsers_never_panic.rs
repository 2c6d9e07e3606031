//! Stable-toolchain companion of the fuzz targets in `fuzz/`: the parsers of untrusted input get
//! random and mutated input and must return errors, never panic.

use prost::Message;
use zmesh_core::hbone::server::Target;
use zmesh_core::identity::Identity;

/// Small deterministic PRNG (xorshift) so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = (self.next() as usize) % max;
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Take a valid sample and flip, drop or insert a few bytes.
    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..(1 + self.next() % 4) {
            let len = v.len().max(1);
            let i = (self.next() as usize) % len;
            match self.next() % 3 {
                0 if !v.is_empty() => v[i] ^= 1 << (self.next() % 8),
                1 if !v.is_empty() => {
                    v.remove(i);
                }
                _ => v.insert(i.min(v.len()), self.next() as u8),
            }
        }
        v
    }
}

const ROUNDS: usize = 20_000;

#[test]
fn authority_and_identity_parsers() {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let seeds: [&[u8]; 4] = [
        b"10.0.0.5:8080",
        b"[fd00::1]:443",
        b"reviews.default.svc.cluster.local:9080",
        b"spiffe://cluster.local/ns/default/sa/sleep",
    ];
    for i in 0..ROUNDS {
        let input = if i % 2 == 0 {
            rng.bytes(64)
        } else {
            rng.mutate(seeds[i % seeds.len()])
        };
        let s = String::from_utf8_lossy(&input);
        let _ = Target::parse(&s);
        if let Ok(id) = s.parse::<Identity>() {
            assert_eq!(id.to_string(), s, "identity must print back to its input");
        }
    }
}

#[test]
fn xds_resources_decode_and_validate() {
    let mut rng = Rng(0x0dd_ba11);
    let w = zmesh_proto::workload::Workload {
        uid: "cluster1//v1/Pod/ns/p".into(),
        name: "p".into(),
        namespace: "ns".into(),
        service_account: "sa".into(),
        addresses: vec![vec![10, 0, 0, 1]],
        tunnel_protocol: 1,
        node: "n".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let a = zmesh_proto::security::Authorization {
        name: "p".into(),
        namespace: "ns".into(),
        action: 1,
        rules: vec![zmesh_proto::security::Rule {
            clauses: vec![zmesh_proto::security::Clause {
                matches: vec![zmesh_proto::security::Match {
                    source_ips: vec![zmesh_proto::security::Address {
                        address: vec![10, 0, 0, 0],
                        length: 8,
                    }],
                    destination_ports: vec![80],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    }
    .encode_to_vec();
    for i in 0..ROUNDS {
        let input = match i % 3 {
            0 => rng.bytes(256),
            1 => rng.mutate(&w),
            _ => rng.mutate(&a),
        };
        if let Ok(m) = zmesh_proto::workload::Workload::decode(input.as_slice()) {
            let _ = zmesh_core::state::Workload::try_from(m);
        }
        if let Ok(m) = zmesh_proto::workload::Service::decode(input.as_slice()) {
            let _ = zmesh_core::state::Service::try_from(m);
        }
        if let Ok(m) = zmesh_proto::security::Authorization::decode(input.as_slice()) {
            let _ = zmesh_core::state::Policy::try_from(m);
        }
    }
}

#[test]
fn local_config_yaml() {
    let mut rng = Rng(0xfeed_f00d);
    let seed = br#"
workloads:
- name: a
  namespace: ns
  workloadIps: ["10.0.0.1"]
  protocol: HBONE
  node: n
  services: {"ns/s.ns.svc.cluster.local": {80: 8080}}
policies:
- name: p
  namespace: ns
  action: Deny
  rules:
  - - - sourceIps: ["10.0.0.0/8"]
        principals: ["cluster.local/ns/x/*"]
"#;
    for _ in 0..2_000 {
        let input = rng.mutate(seed);
        let _ = zmesh_core::state::LocalConfig::parse(&String::from_utf8_lossy(&input), "fuzz");
    }
}
