//! What the waypoint does with untrusted input, one function per fuzz target: the bodies of
//! `fuzz/fuzz_targets/waypoint_*.rs` (cargo-fuzz) and of `tests/parsers_never_panic.rs`
//! (stable), which both include this file with `#[path]`.

// why: each including crate calls the part it needs.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Version};
use waypoint::matcher::{self, RequestView};
use waypoint::sniff::{self, Detected};
use waypoint::store::{L7Config, L7Store};
use waypoint::upstream::{Cluster, Endpoint, Policy};
use zmesh_proto::l7;

/// Protocol detection on the first bytes of a tunnel: every prefix, as the bytes trickle in.
pub fn sniff(data: &[u8]) {
    let mut decided = None;
    for n in 1..=data.len() {
        let d = sniff::classify(&data[..n]);
        // Once decided, more bytes never change the decision.
        if let Some(prev) = decided {
            assert_eq!(d, Some(prev), "classification changed after {n} bytes");
        }
        decided = decided.or(d);
    }
    if let Some(Detected::Http2) = decided {
        assert!(data.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
    }
}

/// The HBONE request headers the waypoint reads: `forwarded` (the client address) and, on the
/// inner HTTP/1.1 request, `connection`/`upgrade`. `data` holds header values separated by
/// newlines, in that order (repeated headers allowed).
pub fn headers(data: &[u8]) {
    let names = [
        http::header::FORWARDED,
        http::header::CONNECTION,
        http::header::UPGRADE,
    ];
    let mut h = HeaderMap::new();
    for (i, value) in data.split(|b| *b == b'\n').enumerate() {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            h.append(names[i % names.len()].clone(), v);
        }
    }
    let _ = waypoint::forwarded_for(&h);
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let _ = waypoint::upgrade::requested(version, &h);
    }
}

/// Resource names of the fuzzed L7 resources.
const SERVICE_NAME: &str = "default/reviews.default.svc.cluster.local";
const POLICY_NAME: &str = "default/policy";

/// An L7 `ServiceConfig` from xDS: decoded and validated by the store (a NACK is fine), then,
/// when accepted, used the way requests use it: routes matched, destinations and policies
/// resolved, endpoints picked, outcomes recorded for outlier detection.
pub fn l7_service_config(bytes: &[u8]) {
    let config = apply(zmesh_proto::L7_SERVICE_TYPE_URL, SERVICE_NAME, bytes);
    let Some(cfg) = config.service(SERVICE_NAME) else {
        return;
    };
    let headers = request_headers();
    for view in request_views(&headers) {
        // No routes: the service itself (the waypoint's default route).
        if cfg.http_routes.is_empty() {
            use_destination(&cfg, "", 0, view.port);
        }
        if let Some(route) = matcher::select_route(&cfg.http_routes, &view) {
            use l7::http_route::Action;
            if let Some(Action::Forward(f)) = &route.action
                && let Some(dest) = waypoint::pick_weighted(&f.destinations)
            {
                use_destination(&cfg, &dest.subset, dest.port, view.port);
            }
            for m in &route.mirrors {
                if let Some(d) = &m.destination {
                    use_destination(&cfg, &d.subset, d.port, view.port);
                }
            }
        }
        for subset in &cfg.subsets {
            use_destination(&cfg, &subset.name, 0, view.port);
        }
        for route in &cfg.tcp_routes {
            let dst = Some(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)));
            if route
                .matches
                .iter()
                .any(|m| matcher::tcp_match(m, view.port, dst, Some("default")))
                && let Some(dest) = waypoint::pick_weighted(&route.destinations)
            {
                use_destination(&cfg, &dest.subset, dest.port, view.port);
            }
        }
    }
}

/// A fresh store's configuration after resource `name` of `type_url` arrived over xDS.
fn apply(type_url: &str, name: &str, bytes: &[u8]) -> Arc<L7Config> {
    let store = L7Store::new();
    let errors = store.apply(type_url, &[(name.to_string(), bytes.to_vec())], &[], false);
    for e in &errors {
        // Every NACK names the resource it refuses.
        assert!(e.to_string().contains(name), "{e}");
    }
    store.load()
}

/// The policy of the destination `subset` on `port` (0: the request's), and a cluster using
/// it: endpoints picked, failures recorded until outlier detection ejects.
fn use_destination(cfg: &l7::ServiceConfig, subset: &str, port: u32, request_port: u16) {
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .unwrap_or(request_port);
    let policy = Policy::resolve(Some(cfg), subset, port);
    let cluster = Cluster::new(
        "outbound|9080||reviews.default.svc.cluster.local|h1".into(),
        policy,
    );
    let eps = endpoints();
    for i in 0..12 {
        let hash = (i % 2 == 0).then_some("jason");
        if let Some(ep) = cluster.pick(&eps, hash) {
            let status = [None, Some(503), Some(502), Some(200)][i % 4];
            cluster.record_outcome(&ep.workload.uid, status, eps.len());
        }
    }
    let _ = cluster.envoy_stats();
}

/// A waypoint-bound L7 `Authorization` from xDS: decoded and validated by the store, then, when
/// accepted, evaluated for a few requests.
pub fn l7_authorization(bytes: &[u8]) {
    let cfg = apply(zmesh_proto::L7_AUTHZ_TYPE_URL, POLICY_NAME, bytes);
    let Some(p) = cfg.authorizations.get(POLICY_NAME) else {
        return;
    };
    let headers = request_headers();
    for view in request_views(&headers) {
        let _ = matcher::policy_applies(
            p,
            "reviews.default.svc.cluster.local",
            "default",
            "waypoint",
        );
        let _ = matcher::authorize(std::iter::once(p.as_ref()), &view);
    }
}

fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("end-user", "jason"),
        ("x-forwarded-for", "203.0.113.7, 10.0.0.1"),
        ("cookie", "session=abc; user=jason"),
        ("user-agent", "curl/8.5.0"),
        ("x-request-id", "2b1c4e7a-9f0d-4c3e-8a5b-1d2e3f4a5b6c"),
    ] {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

/// A plain request and one with multi-byte text where matchers slice strings.
fn request_views(headers: &HeaderMap) -> [RequestView<'_>; 2] {
    let view = |method, path, query, authority, port| RequestView {
        method,
        path,
        query,
        authority,
        scheme: "http",
        headers,
        port,
        source_principal: Some("cluster.local/ns/default/sa/productpage".into()),
        source_namespace: Some("default".into()),
        source_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))),
        destination_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1))),
    };
    [
        view(
            "GET",
            "/reviews/0",
            Some("user=jason&x=1"),
            "reviews:9080",
            9080,
        ),
        view("PÖST", "/é/ü/ß", Some("é=ü"), "rëviews.default", 80),
    ]
}

fn endpoints() -> Vec<Endpoint> {
    (1..=3u8)
        .filter_map(|i| {
            let w = zmesh_proto::workload::Workload {
                uid: format!("Kubernetes//v1/Pod/default/reviews-v{i}"),
                name: format!("reviews-v{i}"),
                namespace: "default".into(),
                service_account: "reviews".into(),
                addresses: vec![vec![10, 0, 1, i]],
                tunnel_protocol: 1,
                node: "node-b".into(),
                ..Default::default()
            };
            let w = zmesh_core::state::Workload::try_from(w).ok()?;
            Some(Endpoint {
                addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 1, i)), 9080),
                workload: Arc::new(w),
            })
        })
        .collect()
}
