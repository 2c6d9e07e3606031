//! Golden tests for the waypoint L7 translation, built from the seeds catalogue scenarios
//! (`shared/spec/seeds-catalogue.md` §3): each `tests/golden_l7/<case>.yaml` holds Kubernetes
//! objects (multi-document YAML, as users write them); `<case>.expected.json` holds the
//! translated `zmesh.l7.v1` resources rendered as proto3 JSON plus the reported errors.
//!
//! `UPDATE_GOLDEN=1 cargo test -p zmesh-controller --test l7_golden` rewrites the expected files;
//! review the diff before committing.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};
use zmesh_controller::mesh::MeshConfig;
use zmesh_controller::store::Snapshot;
use zmesh_controller::translate::{TranslateOptions, Translated, l7, telemetry};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden_l7")
}

fn load(yaml: &str) -> Snapshot {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).expect("golden input is valid YAML");
    Snapshot::from_objects(docs.into_iter().filter(|d| !d.is_null()))
}

/// The mesh config of every case: the seeds' A21 `jaeger` OpenTelemetry provider, no tracing
/// by default (so only cases with a `Telemetry` produce `WaypointTelemetry`).
const MESH_CONFIG: &str = "
extensionProviders:
- name: jaeger
  opentelemetry: {service: jaeger-collector.istio-system.svc.cluster.local, port: 4317}
";

fn run(snap: &Snapshot) -> Translated {
    let opts = TranslateOptions {
        mesh: MeshConfig::parse(MESH_CONFIG, None).expect("the golden mesh config parses"),
        ..TranslateOptions::default()
    };
    let mut out = Translated::default();
    l7::translate(snap, &opts, &mut out);
    telemetry::translate(snap, &opts, &mut out);
    out
}

/// Resources by type URL and name, as proto3 JSON, plus the errors in report order.
fn render(out: &Translated) -> Value {
    let mut resources = Map::new();
    for (type_url, by_name) in &out.resources {
        let mut m = Map::new();
        for (name, any) in by_name {
            let v = zmesh_proto::reflect::any_to_json(any).expect("resource renders as JSON");
            m.insert(name.clone(), v);
        }
        resources.insert(type_url.clone(), Value::Object(m));
    }
    let errors: Vec<Value> = out
        .errors
        .iter()
        .map(|e| Value::String(e.to_string()))
        .collect();
    json!({ "resources": resources, "errors": errors })
}

#[test]
fn golden_cases() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v != "0");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("tests/golden_l7 exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "golden cases missing: {cases:?}");
    let mut failures = Vec::new();
    for case in &cases {
        let input = std::fs::read_to_string(case).expect("readable case");
        let out = run(&load(&input));
        let got = serde_json::to_string_pretty(&render(&out)).expect("JSON") + "\n";
        let expected_path = case.with_extension("expected.json");
        if update {
            std::fs::write(&expected_path, &got).expect("write expected file");
            continue;
        }
        match std::fs::read_to_string(&expected_path) {
            Ok(want) if want == got => {}
            Ok(want) => {
                let line = want
                    .lines()
                    .zip(got.lines())
                    .position(|(a, b)| a != b)
                    .unwrap_or_else(|| want.lines().count().min(got.lines().count()));
                failures.push(format!(
                    "{}: differs from {} at line {} (got:\n{}\n)",
                    case.display(),
                    expected_path.display(),
                    line + 1,
                    got.lines()
                        .skip(line.saturating_sub(3))
                        .take(8)
                        .collect::<Vec<_>>()
                        .join("\n")
                ));
            }
            Err(_) => failures.push(format!(
                "{}: no {} (run with UPDATE_GOLDEN=1)",
                case.display(),
                expected_path.display()
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "golden mismatches:\n{}",
        failures.join("\n\n")
    );
}

#[test]
fn output_is_deterministic() {
    // Every case, translated twice, gives byte-identical encoded resources.
    for entry in std::fs::read_dir(golden_dir()).expect("dir") {
        let p = entry.expect("entry").path();
        if p.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let snap = load(&std::fs::read_to_string(&p).expect("read"));
        let (a, b) = (run(&snap), run(&snap));
        assert_eq!(a.resources, b.resources, "{}", p.display());
        assert_eq!(a.errors, b.errors, "{}", p.display());
    }
}

// ---------------------------------------------------------------------------------------------
// Invalid input: each kind of problem is reported naming the object and the field, and the
// object is skipped (or, where documented, kept).
// ---------------------------------------------------------------------------------------------

/// Translate `yaml` and return (errors as (object, field, reason), resource names by type).
fn errors_of(yaml: &str) -> (Vec<(String, String, String)>, Vec<String>) {
    let out = run(&load(yaml));
    let errs = out
        .errors
        .iter()
        .map(|e| (e.object.to_string(), e.field.clone(), e.reason.clone()))
        .collect();
    let names = out
        .resources
        .values()
        .flat_map(|m| m.keys().cloned())
        .collect();
    (errs, names)
}

fn assert_one_error(yaml: &str, object: &str, field: &str, reason_has: &str) -> Vec<String> {
    let (errs, names) = errors_of(yaml);
    assert_eq!(errs.len(), 1, "expected exactly one error, got {errs:?}");
    let (o, f, r) = &errs[0];
    assert_eq!(o, object);
    assert_eq!(f, field);
    assert!(r.contains(reason_has), "reason `{r}` lacks `{reason_has}`");
    names
}

const DR_REVIEWS: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

fn vs(http: &str) -> String {
    format!(
        "{DR_REVIEWS}---\napiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  hosts: [reviews]\n  http:\n{http}"
    )
}

const SVC: &str = "default/reviews.default.svc.cluster.local";

#[test]
fn bad_regex_skips_the_virtual_service() {
    let names = assert_one_error(
        &vs(
            "  - match:\n    - uri: {regex: \"/api/(v1\"}\n    route:\n    - destination: {host: reviews, subset: v1}\n",
        ),
        "VirtualService default/reviews",
        "spec.http[0].match[0].uri.regex",
        "invalid regular expression",
    );
    // The DestinationRule still produces the service's config, without routes.
    assert_eq!(names, vec![SVC.to_string()]);
    let out = run(&load(&vs(
        "  - match:\n    - uri: {regex: \"/api/(v1\"}\n    route:\n    - destination: {host: reviews, subset: v1}\n",
    )));
    let any = &out.resources[zmesh_proto::L7_SERVICE_TYPE_URL][SVC];
    let cfg: zmesh_proto::l7::ServiceConfig = prost::Message::decode(any.value.as_slice()).unwrap();
    assert!(cfg.http_routes.is_empty());
}

#[test]
fn bad_header_regex_names_the_header() {
    assert_one_error(
        &vs(
            "  - match:\n    - headers:\n        end-user: {regex: \"*jason\"}\n    route:\n    - destination: {host: reviews, subset: v2}\n",
        ),
        "VirtualService default/reviews",
        "spec.http[0].match[0].headers[end-user].regex",
        "invalid regular expression",
    );
}

#[test]
fn bad_duration_is_reported() {
    assert_one_error(
        &vs("  - timeout: 5 seconds\n    route:\n    - destination: {host: reviews, subset: v1}\n"),
        "VirtualService default/reviews",
        "spec.http[0].timeout",
        "not a duration",
    );
    assert_one_error(
        &vs(
            "  - fault:\n      delay: {fixedDelay: 7, percentage: {value: 100}}\n    route:\n    - destination: {host: reviews, subset: v1}\n",
        ),
        "VirtualService default/reviews",
        "spec",
        "does not parse",
    );
    assert_one_error(
        &vs(
            "  - retries: {attempts: 3, perTryTimeout: 2x}\n    route:\n    - destination: {host: reviews, subset: v1}\n",
        ),
        "VirtualService default/reviews",
        "spec.http[0].retries.perTryTimeout",
        "not a duration",
    );
}

#[test]
fn negative_weight_is_reported() {
    assert_one_error(
        &vs(
            "  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: -10\n    - destination: {host: reviews, subset: v2}\n      weight: 110\n",
        ),
        "VirtualService default/reviews",
        "spec.http[0].route[0].weight",
        "must not be negative",
    );
    assert_one_error(
        &vs(
            "  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 0\n    - destination: {host: reviews, subset: v2}\n      weight: 0\n",
        ),
        "VirtualService default/reviews",
        "spec.http[0].route",
        "total weight",
    );
}

#[test]
fn undefined_subset_is_reported_but_the_route_kept() {
    let yaml = vs("  - route:\n    - destination: {host: reviews, subset: v9}\n");
    assert_one_error(
        &yaml,
        "VirtualService default/reviews",
        "spec.http[0].route[0].destination.subset",
        "subset `v9` is not defined",
    );
    let out = run(&load(&yaml));
    let any = &out.resources[zmesh_proto::L7_SERVICE_TYPE_URL][SVC];
    let cfg: zmesh_proto::l7::ServiceConfig = prost::Message::decode(any.value.as_slice()).unwrap();
    assert_eq!(cfg.http_routes.len(), 1);
}

#[test]
fn bad_percentages_and_statuses_are_reported() {
    assert_one_error(
        &vs(
            "  - fault:\n      abort: {httpStatus: 500, percentage: {value: 150}}\n    route:\n    - destination: {host: reviews, subset: v1}\n",
        ),
        "VirtualService default/reviews",
        "spec.http[0].fault.abort.percentage.value",
        "outside 0..=100",
    );
    assert_one_error(
        &vs(
            "  - fault:\n      abort: {httpStatus: 99, percentage: {value: 10}}\n    route:\n    - destination: {host: reviews, subset: v1}\n",
        ),
        "VirtualService default/reviews",
        "spec.http[0].fault.abort.httpStatus",
        "out of range",
    );
    assert_one_error(
        &vs(
            "  - retries: {attempts: 2, retryOn: \"5xx,sometimes\"}\n    route:\n    - destination: {host: reviews, subset: v1}\n",
        ),
        "VirtualService default/reviews",
        "spec.http[0].retries.retryOn",
        "unknown retry condition `sometimes`",
    );
}

#[test]
fn bad_rate_limit_annotation_is_reported() {
    let yaml = vs("  - route:\n    - destination: {host: reviews, subset: v1}\n").replace(
        "metadata: {name: reviews, namespace: default}\nspec:\n  hosts",
        "metadata:\n  name: reviews\n  namespace: default\n  annotations: {zmesh.io/rate-limit: \"lots\"}\nspec:\n  hosts",
    );
    assert_one_error(
        &yaml,
        "VirtualService default/reviews",
        "metadata.annotations[zmesh.io/rate-limit]",
        "not a rate limit",
    );
}

#[test]
fn bad_destination_rule_is_skipped() {
    let (errs, names) = errors_of(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: default}
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: -1}
"#,
    );
    assert_eq!(
        errs,
        vec![(
            "DestinationRule default/httpbin".into(),
            "spec.trafficPolicy.connectionPool.tcp.maxConnections".into(),
            "maxConnections must not be negative (got -1)".into()
        )]
    );
    assert!(names.is_empty());
    assert_one_error(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: default}
spec:
  host: httpbin
  trafficPolicy:
    loadBalancer: {simple: FASTEST}
    outlierDetection: {interval: soon}
"#,
        "DestinationRule default/httpbin",
        "spec.trafficPolicy.loadBalancer.simple",
        "unknown load balancer `FASTEST`",
    );
}

#[test]
fn bad_http_route_is_skipped() {
    let names = assert_one_error(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches:
    - headers: [{type: RegularExpression, name: end-user, value: "(jason"}]
    backendRefs: [{name: reviews-v2, port: 9080}]
"#,
        "HTTPRoute default/reviews",
        "spec.rules[0].matches[0].headers[0].value",
        "invalid regular expression",
    );
    assert!(names.is_empty());
    assert_one_error(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules:
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: -1}
"#,
        "HTTPRoute default/reviews",
        "spec.rules[0].backendRefs[0].weight",
        "must not be negative",
    );
    assert_one_error(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules:
  - timeouts: {request: 1fortnight}
    backendRefs: [{name: reviews-v1, port: 9080}]
"#,
        "HTTPRoute default/reviews",
        "spec.rules[0].timeouts.request",
        "not a duration",
    );
}

#[test]
fn bad_tcp_route_is_skipped() {
    let names = assert_one_error(
        r#"
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: tcp-echo, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: tcp-echo, port: 9000}]
  rules:
  - backendRefs:
    - {name: tcp-echo-v1, port: 9000, weight: 80}
    - {kind: ConfigMap, name: nope, port: 9000, weight: 20}
"#,
        "TCPRoute default/tcp-echo",
        "spec.rules[0].backendRefs[1].kind",
        "not supported",
    );
    assert!(names.is_empty());
}

#[test]
fn unsupported_api_version_is_reported() {
    assert_one_error(
        "apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: x, namespace: default}\nspec: {hosts: [x]}\n",
        "VirtualService default/x",
        "apiVersion",
        "not supported",
    );
}

const WAYPOINT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;

fn policy(action: &str, rules: &str) -> String {
    format!(
        "{WAYPOINT}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: default}}\nspec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}}]\n  action: {action}\n  rules:\n{rules}"
    )
}

fn authz(yaml: &str) -> zmesh_proto::l7::Authorization {
    let out = run(&load(yaml));
    let any = &out.resources[zmesh_proto::L7_AUTHZ_TYPE_URL]["default/p"];
    prost::Message::decode(any.value.as_slice()).unwrap()
}

#[test]
fn bad_allow_rule_is_dropped_fail_closed() {
    let yaml = policy(
        "ALLOW",
        "  - from: [{source: {ipBlocks: [\"10.0.0.0/8\", \"10.0.0.300\"]}}]\n  - to: [{operation: {methods: [GET]}}]\n",
    );
    assert_one_error(
        &yaml,
        "AuthorizationPolicy default/p",
        "spec.rules[0].from[0].source.ipBlocks[1]",
        "not an IP address or CIDR",
    );
    let p = authz(&yaml);
    assert_eq!(
        p.rules.len(),
        1,
        "the bad ALLOW rule is dropped, the good one kept"
    );
    assert_eq!(p.rules[0].to.len(), 1);
}

#[test]
fn bad_deny_field_is_dropped_fail_closed() {
    let yaml = policy(
        "DENY",
        "  - to: [{operation: {paths: [\"/admin/{**}\"], methods: [POST]}}]\n    when: [{key: \"request.auth.claims[groups]\", values: [admins]}]\n",
    );
    let (errs, _) = errors_of(&yaml);
    let fields: Vec<&str> = errs.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(
        fields,
        vec![
            "spec.rules[0].to[0].operation.paths[0]",
            "spec.rules[0].when[0].key"
        ]
    );
    let p = authz(&yaml);
    // The rule now denies every POST: broader, never narrower.
    assert_eq!(p.rules.len(), 1);
    assert!(p.rules[0].to[0].paths.is_empty());
    assert_eq!(p.rules[0].to[0].methods.len(), 1);
    assert!(p.rules[0].when.is_empty());
}

#[test]
fn bad_policy_target_is_reported() {
    let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: default}\nspec:\n  targetRefs: [{group: apps, kind: Deployment, name: web}]\n  rules: [{}]\n";
    let names = assert_one_error(
        yaml,
        "AuthorizationPolicy default/p",
        "spec.targetRefs[0].kind",
        "not supported",
    );
    assert!(names.is_empty());
}
