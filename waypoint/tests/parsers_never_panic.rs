//! Stable-toolchain companion of the waypoint's fuzz targets (`fuzz/fuzz_targets/waypoint_*.rs`):
//! protocol sniffing, the HBONE/HTTP headers the waypoint reads and the L7 configuration from
//! xDS get random and mutated input and must be refused (NACK) or used, never panic.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use zmesh_controller::store::Snapshot;
use zmesh_controller::translate::{TranslateOptions, Translated, l7};

#[path = "support/harness.rs"]
mod harness;
#[path = "../../core/tests/support/json.rs"]
mod json;
#[path = "../../core/tests/support/proto.rs"]
mod proto;
#[path = "../../core/tests/support/rng.rs"]
mod rng;

use rng::{Rng, check, rounds};

/// Protobuf fragments: extreme varints, negative and huge durations, a NaN double.
const PROTO_DICT: &[&[u8]] = &[
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"\x80\x80\x80\x80\x10",
    b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"\x10\xff\xff\xff\xff\x07",
    b"\x11\x00\x00\x00\x00\x00\x00\xf8\x7f",
    b"\x11\x00\x00\x00\x00\x00\x00\xf0\x7f",
    b"\x1a\x04(?:(",
];

#[test]
fn protocol_sniffing() {
    let seeds: [&[u8]; 5] = [
        b"GET /reviews/0 HTTP/1.1\r\nHost: reviews:9080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
        b"POST /api HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
        // HTTP/2 preface, then a SETTINGS frame.
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64",
        // TLS ClientHello start: opaque TCP.
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"CONNECT reviews:9080 HTTP/1.1\r\n\r\n",
    ];
    let dict: &[&[u8]] = &[b"GET ", b"PRI * ", b"\r\n", b"HTTP/2.0"];
    Rng::new(0x5a1f_f001).run("sniff", rounds(20_000), (&seeds, dict, 40), harness::sniff);
}

#[test]
fn hbone_and_upgrade_headers() {
    let seeds: [&[u8]; 3] = [
        b"for=\"10.0.0.7:43210\";host=reviews.default.svc.cluster.local\nUpgrade\nwebsocket",
        b"for=\"[fd00::7]:43210\";host=reviews\nkeep-alive, Upgrade\nwebsocket, h2c",
        b"host=x;FOR=10.0.0.1:1, for=\"bad\"\nclose\n\nfor=\"10.0.0.1:80\"",
    ];
    let dict: &[&[u8]] = &[b"for=", b"\"", b";", b",", b"\n", b"[::1]:", b"upgrade"];
    Rng::new(0x4ead_e125).run(
        "headers",
        rounds(20_000),
        (&seeds, dict, 80),
        harness::headers,
    );
}

/// The controller's L7 golden fixtures (VirtualService, DestinationRule, HTTPRoute, TCPRoute,
/// AuthorizationPolicy, rate limits, ...): the Kubernetes objects of each file.
fn fixtures() -> Vec<Vec<Value>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../controller/tests/golden_l7");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("controller/tests/golden_l7")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|file| {
            let yaml = std::fs::read_to_string(file).expect("fixture");
            let docs: Vec<Value> =
                serde_saphyr::from_multiple(&yaml).expect("fixtures are valid YAML");
            docs.into_iter().filter(|d| !d.is_null()).collect()
        })
        .collect()
}

/// The controller's translation of `objects`: encoded resources by type URL, exactly what it
/// pushes to waypoints.
fn translate(objects: &[Value]) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    let snap = Snapshot::from_objects(objects.iter().cloned());
    let mut t = Translated::default();
    l7::translate(&snap, &TranslateOptions::default(), &mut t);
    t.resources
        .into_iter()
        .map(|(type_url, by_name)| {
            let by_name = by_name.into_iter().map(|(n, any)| (n, any.value)).collect();
            (type_url, by_name)
        })
        .collect()
}

/// Resources the waypoint's store refuses, with the reasons.
fn refused(resources: &BTreeMap<String, BTreeMap<String, Vec<u8>>>) -> Vec<String> {
    let store = waypoint::store::L7Store::new();
    let mut errors = Vec::new();
    for (type_url, by_name) in resources {
        let items: Vec<(String, Vec<u8>)> = by_name
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        errors.extend(
            store
                .apply(type_url, &items, &[], false)
                .iter()
                .map(|e| e.to_string()),
        );
    }
    errors
}

/// What the controller makes of any object, valid or not, the waypoint accepts: the controller
/// reports a bad field to the operator instead of sending what waypoints would NACK.
#[test]
fn controller_output_is_accepted_by_waypoints() {
    let fixtures = fixtures();
    for objects in &fixtures {
        let errors = refused(&translate(objects));
        assert!(errors.is_empty(), "golden fixture NACKed: {errors:?}");
    }
    let mut rng = Rng::new(0xc047_0e11);
    for _ in 0..rounds(2_500) {
        let mut objects = rng.pick(&fixtures).clone();
        let i = rng.below(objects.len());
        // The spec is where translation reads; metadata only names the object.
        if let Some(spec) = objects[i].get_mut("spec") {
            json::mutate(&mut rng, spec);
        } else {
            json::mutate(&mut rng, &mut objects[i]);
        }
        let input = serde_json::to_vec(&objects[i]).unwrap_or_default();
        check("controller translation", &input, || {
            let errors = refused(&translate(&objects));
            assert!(
                errors.is_empty(),
                "waypoints NACK the controller's output: {errors:?}"
            );
        });
    }
}

#[test]
fn l7_config_from_xds() {
    let (mut services, mut policies) = (Vec::new(), Vec::new());
    for objects in fixtures() {
        for (type_url, by_name) in translate(&objects) {
            match type_url.as_str() {
                zmesh_proto::L7_SERVICE_TYPE_URL => services.extend(by_name.into_values()),
                _ => policies.extend(by_name.into_values()),
            }
        }
    }
    assert!(
        services.len() >= 10 && policies.len() >= 2,
        "fixtures missing"
    );
    let (services, policies) = (&services, &policies);
    // Found by this test: an outlier-detection interval of i64::MAX seconds overflowed the
    // ejection's Instant arithmetic at the first ejection. Refused now (and the arithmetic is
    // checked).
    let huge_interval: &[u8] = b"\n!httpbin.default.svc.cluster.local\x12\x07default*\x1f\x12\x06\x08\x01\x18\x01(\x00\x1a\x15\x08\x01\x1a\n\x08\xff\xff\xff\xff\xff\xff\xff\xff\x7f\"\x03\x08\xb4\x01(d:\x1fDestinationRule default/httpbin";
    let store = waypoint::store::L7Store::new();
    let errors = store.apply(
        zmesh_proto::L7_SERVICE_TYPE_URL,
        &[("default/httpbin".into(), huge_interval.to_vec())],
        &[],
        false,
    );
    assert!(
        errors.len() == 1
            && errors[0]
                .to_string()
                .contains("trafficPolicy.outlierDetection.interval"),
        "{errors:?}"
    );
    harness::l7_service_config(huge_interval);

    let mut rng = Rng::new(0x17_c0f1);
    for i in 0..rounds(12_000) {
        let (type_url, seeds) = if i % 3 == 2 {
            (zmesh_proto::L7_AUTHZ_TYPE_URL, policies)
        } else {
            (zmesh_proto::L7_SERVICE_TYPE_URL, services)
        };
        let seed = rng.pick(seeds);
        let input = match i % 10 {
            0 => rng.bytes(200),
            // Structure-aware: the resource as proto3 JSON, mutated, encoded again (when the
            // mutation still fits the schema; otherwise mutate the bytes).
            1..=3 => {
                let doc = zmesh_proto::reflect::to_json(type_url, seed).expect("renders");
                (0..4)
                    .find_map(|_| {
                        let mut doc = doc.clone();
                        json::mutate(&mut rng, &mut doc);
                        zmesh_proto::reflect::from_json(type_url, &doc).ok()
                    })
                    .unwrap_or_else(|| rng.mutate_with(seed, PROTO_DICT))
            }
            // Structure-aware on the wire: values out of the JSON mapping's range too.
            4..=7 => {
                let mut m = proto::mutate(&mut rng, seed);
                while rng.one_in(3) {
                    m = proto::mutate(&mut rng, &m);
                }
                m
            }
            _ => {
                let mut m = rng.mutate_with(seed, PROTO_DICT);
                // Several rounds of mutation now and then: deeper from the seed.
                while rng.one_in(3) {
                    m = rng.mutate_with(&m, PROTO_DICT);
                }
                m
            }
        };
        check("L7 config", &input, || {
            if type_url == zmesh_proto::L7_SERVICE_TYPE_URL {
                harness::l7_service_config(&input)
            } else {
                harness::l7_authorization(&input)
            }
        });
    }
}
