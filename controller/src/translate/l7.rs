//! Waypoint L7 translation: Istio VirtualService / DestinationRule, Gateway API HTTPRoute /
//! TCPRoute (GAMMA, `parentRefs` to a Service) and waypoint-bound AuthorizationPolicy →
//! `zmesh.l7.v1.ServiceConfig` (one per service hostname, name `"<ns>/<hostname>"`) and
//! `zmesh.l7.v1.Authorization` (one per policy, name `"<ns>/<name>"`). See
//! `proto/protos/zmesh/l7/v1/l7.proto` for the meaning of every output field.
//!
//! # Semantics chosen
//! - **Binding**: a VirtualService applies to waypoints when `spec.gateways` is empty or contains
//!   `mesh` (upstream semantics; seeds §5.2). Gateway-only VirtualServices and HTTPRoutes whose
//!   parents are not Services (ingress) are not waypoint configuration and are ignored quietly.
//! - **Hosts**: short names resolve in the object's namespace (`reviews` →
//!   `reviews.<ns>.svc.cluster.local`); names with a dot are hostnames as written. Wildcard hosts
//!   are reported and ignored (a waypoint serves concrete services).
//! - **Order**: per hostname, VirtualService routes first (objects by creation time, namespace,
//!   name; rules in spec order), then HTTPRoute rules sorted by Gateway API precedence.
//! - **DestinationRules** for one host merge like Istio: the oldest provides the traffic
//!   policy; subsets from later rules are added unless the name is taken (reported).
//! - **Defaults made explicit**: a route without `retries` gets Istio's default retry policy (2
//!   attempts on connect-failure, refused-stream, unavailable, cancelled, 503); `timeout: 0s`
//!   and no timeout both mean "none"; a single destination without weight gets 100.
//! - **Rate limiting** (no Istio field): annotation `zmesh.io/rate-limit: "<N>/<s|m|h|duration>
//!   [burst=<M>]"` on a VirtualService or HTTPRoute gives every HTTP route of that object its own
//!   token bucket (N tokens per interval, capacity M, default N; 429 when empty), per waypoint
//!   replica.
//!
//! # Invalid input
//! Every problem is reported with the object and the field path (`spec.http[0].match[0].uri.regex`)
//! through [`Translated::error`] and logged. Routing objects (VirtualService, HTTPRoute,
//! TCPRoute, DestinationRule) with an invalid or unsupported field are skipped whole: dropping
//! one rule of an ordered list would silently send its traffic to the next rule. Exceptions that
//! keep the object: an undefined `subset` (the route is kept; the waypoint answers 503 for it
//! until the subset exists, as Istio does), a wildcard host (only that host is dropped) and a
//! duplicate subset from a later DestinationRule. AuthorizationPolicies fail closed instead (see
//! `l7_authz.rs`).

#[path = "l7_authz.rs"]
mod authz;
#[path = "l7_gateway.rs"]
mod gateway;
#[path = "l7_parse.rs"]
mod parse;
#[path = "l7_types.rs"]
mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;
use zmesh_proto::l7;

use self::parse::{At, FieldError, Invalid, bad};
use super::{TranslateOptions, Translated};
use crate::store::{ObjectKey, Snapshot};

pub use self::parse::CLUSTER_DOMAIN;

/// Annotation carrying a local rate limit for every HTTP route of a VirtualService/HTTPRoute.
pub const RATE_LIMIT_ANNOTATION: &str = "zmesh.io/rate-limit";

const ISTIO_NETWORKING_VERSIONS: &[&str] = &[
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// Translate all L7 objects in `snap` into `out`.
pub fn translate(snap: &Snapshot, opts: &TranslateOptions, out: &mut Translated) {
    let mut cx = Cx {
        snap,
        opts,
        out,
        services: BTreeMap::new(),
    };
    let drs = destination_rules(&mut cx);
    virtual_services(&mut cx, &drs);
    gateway::http_routes(&mut cx);
    gateway::tcp_routes(&mut cx);
    emit_services(&mut cx, drs);
    authz::translate(&mut cx);
}

/// Translation state shared by the per-kind translators.
struct Cx<'a> {
    snap: &'a Snapshot,
    opts: &'a TranslateOptions,
    out: &'a mut Translated,
    /// Hostname → what has been collected for it so far.
    services: BTreeMap<String, ServiceBuilder>,
}

#[derive(Default)]
struct ServiceBuilder {
    namespace: String,
    vs_http: Vec<l7::HttpRoute>,
    vs_tcp: Vec<l7::TcpRoute>,
    /// HTTPRoute routes with their precedence key; sorted when emitted.
    gw_http: Vec<(gateway::Precedence, l7::HttpRoute)>,
    gw_tcp: Vec<l7::TcpRoute>,
    sources: BTreeSet<String>,
}

impl<'a> Cx<'a> {
    fn report(&mut self, key: &ObjectKey, e: FieldError) {
        tracing::warn!(object = %key, field = %e.field, reason = %e.reason, "invalid L7 configuration");
        self.out.error(key, e.field, e.reason.to_string());
    }

    fn service(&mut self, host: &str, namespace: &str) -> &mut ServiceBuilder {
        let b = self.services.entry(host.to_string()).or_default();
        if b.namespace.is_empty() {
            b.namespace = parse::host_namespace(host, namespace);
        }
        b
    }

    /// Objects of `kind` with an accepted apiVersion, ordered by (creationTimestamp, ns, name)
    /// — Istio's conflict order — with their parsed spec (memoized with the stored object, so
    /// unchanged objects are not re-parsed on every translation). Others are reported.
    fn objects<T: DeserializeOwned + Send + Sync + 'static>(
        &mut self,
        kind: &'a str,
        versions: &[&str],
    ) -> Vec<(ObjectKey, Arc<Value>, Arc<T>)> {
        let snap: &'a Snapshot = self.snap;
        let mut res = Vec::new();
        for (key, obj) in snap.oldest_first(kind) {
            let api = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
            if !versions.contains(&api) {
                // Same kind name, other API group (an Istio `Gateway` vs a Gateway API one):
                // not ours to judge, unless it is our group at an unknown version.
                let our_group = versions
                    .first()
                    .and_then(|v| v.split('/').next())
                    .is_some_and(|g| api.split('/').next() == Some(g));
                if our_group {
                    self.report(
                        key,
                        FieldError {
                            field: "apiVersion".into(),
                            reason: Invalid::Unsupported(format!(
                                "`{api}` is not supported (use one of {})",
                                versions.join(", ")
                            )),
                        },
                    );
                }
                continue;
            }
            let parsed = match snap.parsed::<SpecOf<T>>(key) {
                Some(Ok(p)) => p,
                Some(Err(e)) => {
                    self.report(
                        key,
                        FieldError {
                            field: "spec".into(),
                            reason: Invalid::Bad(format!("does not parse: {}", e.reason)),
                        },
                    );
                    continue;
                }
                None => continue,
            };
            match parsed.spec.clone() {
                Some(t) => res.push((key.clone(), obj, t)),
                // A missing or null spec is an empty one.
                None => match serde_json::from_value::<T>(Value::Object(Default::default())) {
                    Ok(t) => res.push((key.clone(), obj, Arc::new(t))),
                    Err(e) => self.report(
                        key,
                        FieldError {
                            field: "spec".into(),
                            reason: Invalid::Bad(format!("does not parse: {e}")),
                        },
                    ),
                },
            }
        }
        res
    }
}

/// The `spec` of an object, as the memoized typed view of the whole object.
#[derive(serde::Deserialize)]
#[serde(bound = "T: DeserializeOwned")]
struct SpecOf<T> {
    #[serde(default = "none", deserialize_with = "arc_spec")]
    spec: Option<Arc<T>>,
}

fn none<T>() -> Option<T> {
    None
}

fn arc_spec<'de, D, T>(d: D) -> Result<Option<Arc<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned,
{
    Ok(<Option<T> as serde::Deserialize>::deserialize(d)?.map(Arc::new))
}

fn annotation<'v>(obj: &'v Value, name: &str) -> Option<&'v str> {
    obj.get("metadata")?.get("annotations")?.get(name)?.as_str()
}

/// The object's rate-limit annotation, if any.
fn rate_limit_of(obj: &Value) -> Result<Option<l7::RateLimit>, FieldError> {
    annotation(obj, RATE_LIMIT_ANNOTATION)
        .map(parse::rate_limit)
        .transpose()
        .at(format!("metadata.annotations[{RATE_LIMIT_ANNOTATION}]"))
}

// ---------------------------------------------------------------------------------------------
// DestinationRule
// ---------------------------------------------------------------------------------------------

/// Per hostname: merged DestinationRule content.
#[derive(Default)]
struct DrEntry {
    namespace: String,
    traffic_policy: Option<l7::TrafficPolicy>,
    /// Subsets in order of appearance, with their labels.
    subsets: Vec<l7::Subset>,
    sources: Vec<String>,
}

type DrIndex = BTreeMap<String, DrEntry>;

fn destination_rules(cx: &mut Cx<'_>) -> DrIndex {
    let mut index = DrIndex::new();
    for (key, _obj, spec) in
        cx.objects::<types::DestinationRuleSpec>("DestinationRule", ISTIO_NETWORKING_VERSIONS)
    {
        let dr = match destination_rule(&key, &spec) {
            Ok(dr) => dr,
            Err(e) => {
                cx.report(&key, e);
                continue;
            }
        };
        let (host, policy, subsets) = dr;
        let entry = index.entry(host.clone()).or_default();
        if entry.namespace.is_empty() {
            entry.namespace = parse::host_namespace(&host, &key.namespace);
        }
        entry.sources.push(key.to_string());
        if let Some(p) = policy {
            if entry.traffic_policy.is_some() {
                let first = entry.sources.first().cloned().unwrap_or_default();
                cx.report(
                    &key,
                    FieldError {
                        field: "spec.trafficPolicy".into(),
                        reason: Invalid::Bad(format!(
                            "ignored: host `{host}` already has a traffic policy from {first} (the oldest DestinationRule wins)"
                        )),
                    },
                );
            } else {
                entry.traffic_policy = Some(p);
            }
        }
        for (i, s) in subsets.into_iter().enumerate() {
            if entry.subsets.iter().any(|o| o.name == s.name) {
                cx.report(
                    &key,
                    FieldError {
                        field: format!("spec.subsets[{i}].name"),
                        reason: Invalid::Bad(format!(
                            "ignored: subset `{}` of host `{host}` is already defined by an older DestinationRule",
                            s.name
                        )),
                    },
                );
            } else {
                entry.subsets.push(s);
            }
        }
    }
    index
}

type DrParts = (String, Option<l7::TrafficPolicy>, Vec<l7::Subset>);

fn destination_rule(
    key: &ObjectKey,
    spec: &types::DestinationRuleSpec,
) -> Result<DrParts, FieldError> {
    if spec.host.trim().is_empty() {
        return bad("spec.host", Invalid::Required("host"));
    }
    let host = parse::fqdn(&spec.host, &key.namespace);
    if host.contains('*') {
        return bad(
            "spec.host",
            Invalid::Unsupported(format!(
                "wildcard host `{}` is not supported for waypoint policies",
                spec.host
            )),
        );
    }
    let policy = spec
        .traffic_policy
        .as_ref()
        .map(|p| traffic_policy(p, "spec.trafficPolicy"))
        .transpose()?;
    let mut subsets = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let f = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            return bad(format!("{f}.name"), Invalid::Required("subset name"));
        }
        if !seen.insert(s.name.clone()) {
            return bad(
                format!("{f}.name"),
                Invalid::Bad(format!("duplicate subset `{}`", s.name)),
            );
        }
        subsets.push(l7::Subset {
            name: s.name.clone(),
            labels: s.labels.clone(),
            traffic_policy: s
                .traffic_policy
                .as_ref()
                .map(|p| traffic_policy(p, &format!("{f}.trafficPolicy")))
                .transpose()?,
            workload_uids: Vec::new(),
        });
    }
    Ok((host, policy, subsets))
}

fn traffic_policy(p: &types::TrafficPolicy, f: &str) -> Result<l7::TrafficPolicy, FieldError> {
    let mut port_level_settings = Vec::new();
    for (i, pl) in p.port_level_settings.iter().enumerate() {
        let pf = format!("{f}.portLevelSettings[{i}]");
        let port = match &pl.port {
            Some(ps) if (1..=65535).contains(&ps.number) => ps.number,
            _ => {
                return bad(
                    format!("{pf}.port.number"),
                    Invalid::Required("port number (1..=65535)"),
                );
            }
        };
        port_level_settings.push(l7::PortTrafficPolicy {
            port,
            load_balancer: pl
                .load_balancer
                .as_ref()
                .map(|lb| load_balancer(lb, &format!("{pf}.loadBalancer")))
                .transpose()?,
            connection_pool: pl
                .connection_pool
                .as_ref()
                .map(|cp| connection_pool(cp, &format!("{pf}.connectionPool")))
                .transpose()?,
            outlier_detection: pl
                .outlier_detection
                .as_ref()
                .map(|od| outlier_detection(od, &format!("{pf}.outlierDetection")))
                .transpose()?,
        });
    }
    Ok(l7::TrafficPolicy {
        load_balancer: p
            .load_balancer
            .as_ref()
            .map(|lb| load_balancer(lb, &format!("{f}.loadBalancer")))
            .transpose()?,
        connection_pool: p
            .connection_pool
            .as_ref()
            .map(|cp| connection_pool(cp, &format!("{f}.connectionPool")))
            .transpose()?,
        outlier_detection: p
            .outlier_detection
            .as_ref()
            .map(|od| outlier_detection(od, &format!("{f}.outlierDetection")))
            .transpose()?,
        port_level_settings,
    })
}

fn load_balancer(
    lb: &types::LoadBalancerSettings,
    f: &str,
) -> Result<l7::LoadBalancer, FieldError> {
    use l7::consistent_hash::HashKey;
    use l7::load_balancer::{Policy, Simple};
    let policy = match (&lb.simple, &lb.consistent_hash) {
        (Some(_), Some(_)) => return bad(f, Invalid::OneOf("simple, consistentHash")),
        (Some(s), None) => Policy::Simple(match s.as_str() {
            "UNSPECIFIED" => Simple::Unspecified,
            "ROUND_ROBIN" => Simple::RoundRobin,
            // LEAST_CONN is Istio's deprecated name for LEAST_REQUEST.
            "LEAST_REQUEST" | "LEAST_CONN" => Simple::LeastRequest,
            "RANDOM" => Simple::Random,
            "PASSTHROUGH" => Simple::Passthrough,
            other => {
                return bad(
                    format!("{f}.simple"),
                    Invalid::Bad(format!(
                        "unknown load balancer `{other}` (ROUND_ROBIN, LEAST_REQUEST, RANDOM, PASSTHROUGH)"
                    )),
                );
            }
        } as i32),
        (None, Some(ch)) => {
            let cf = format!("{f}.consistentHash");
            let keys = [
                ch.http_header_name.is_some(),
                ch.http_cookie.is_some(),
                ch.use_source_ip.unwrap_or(false),
                ch.http_query_parameter_name.is_some(),
            ];
            if keys.iter().filter(|k| **k).count() != 1 {
                return bad(
                    cf,
                    Invalid::OneOf(
                        "httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName",
                    ),
                );
            }
            let hash_key = if let Some(h) = &ch.http_header_name {
                HashKey::HttpHeaderName(h.to_ascii_lowercase())
            } else if let Some(c) = &ch.http_cookie {
                if c.name.is_empty() {
                    return bad(
                        format!("{cf}.httpCookie.name"),
                        Invalid::Required("cookie name"),
                    );
                }
                HashKey::HttpCookie(l7::HttpCookie {
                    name: c.name.clone(),
                    path: c.path.clone(),
                    ttl: c
                        .ttl
                        .as_deref()
                        .map(parse::duration)
                        .transpose()
                        .at(format!("{cf}.httpCookie.ttl"))?,
                })
            } else if let Some(q) = &ch.http_query_parameter_name {
                HashKey::HttpQueryParameterName(q.clone())
            } else {
                HashKey::UseSourceIp(true)
            };
            Policy::ConsistentHash(l7::ConsistentHash {
                hash_key: Some(hash_key),
                minimum_ring_size: ch
                    .ring_hash
                    .as_ref()
                    .and_then(|r| r.minimum_ring_size)
                    .or(ch.minimum_ring_size)
                    .unwrap_or(0),
            })
        }
        (None, None) => return bad(f, Invalid::OneOf("simple, consistentHash")),
    };
    Ok(l7::LoadBalancer {
        policy: Some(policy),
    })
}

fn opt_count(v: Option<i64>, what: &'static str, f: String) -> Result<u32, FieldError> {
    v.map(|n| parse::count(what, n))
        .transpose()
        .at(f)
        .map(Option::unwrap_or_default)
}

fn opt_duration(
    v: &Option<String>,
    f: String,
) -> Result<Option<prost_types::Duration>, FieldError> {
    v.as_deref().map(parse::duration).transpose().at(f)
}

fn connection_pool(
    cp: &types::ConnectionPoolSettings,
    f: &str,
) -> Result<l7::ConnectionPool, FieldError> {
    let mut out = l7::ConnectionPool::default();
    if let Some(tcp) = &cp.tcp {
        out.max_connections = opt_count(
            tcp.max_connections,
            "maxConnections",
            format!("{f}.tcp.maxConnections"),
        )?;
        out.connect_timeout =
            opt_duration(&tcp.connect_timeout, format!("{f}.tcp.connectTimeout"))?;
    }
    if let Some(http) = &cp.http {
        out.http1_max_pending_requests = opt_count(
            http.http1_max_pending_requests,
            "http1MaxPendingRequests",
            format!("{f}.http.http1MaxPendingRequests"),
        )?;
        out.http2_max_requests = opt_count(
            http.http2_max_requests,
            "http2MaxRequests",
            format!("{f}.http.http2MaxRequests"),
        )?;
        out.max_requests_per_connection = opt_count(
            http.max_requests_per_connection,
            "maxRequestsPerConnection",
            format!("{f}.http.maxRequestsPerConnection"),
        )?;
        out.max_retries = opt_count(
            http.max_retries,
            "maxRetries",
            format!("{f}.http.maxRetries"),
        )?;
        out.idle_timeout = opt_duration(&http.idle_timeout, format!("{f}.http.idleTimeout"))?;
    }
    Ok(out)
}

fn outlier_detection(
    od: &types::OutlierDetection,
    f: &str,
) -> Result<l7::OutlierDetection, FieldError> {
    let pct = |v: Option<i64>, what: &'static str, field: String| -> Result<u32, FieldError> {
        match v {
            None => Ok(0),
            Some(n) if (0..=100).contains(&n) => Ok(n as u32),
            Some(n) => bad(
                field,
                Invalid::OutOfRange {
                    what,
                    value: n,
                    range: "0..=100",
                },
            ),
        }
    };
    let c5xx = od
        .consecutive_5xx_errors
        .map(|n| parse::count("consecutive5xxErrors", n))
        .transpose()
        .at(format!("{f}.consecutive5xxErrors"))?;
    let mut gateway = od
        .consecutive_gateway_errors
        .map(|n| parse::count("consecutiveGatewayErrors", n))
        .transpose()
        .at(format!("{f}.consecutiveGatewayErrors"))?;
    // Istio maps the deprecated `consecutiveErrors` to gateway errors (502/503/504), not 5xx.
    if let Some(n) = od.consecutive_errors {
        let n = parse::count("consecutiveErrors", n).at(format!("{f}.consecutiveErrors"))?;
        if n > 0 && gateway.is_none() {
            gateway = Some(n);
        }
    }
    Ok(l7::OutlierDetection {
        consecutive_5xx_errors: c5xx,
        consecutive_gateway_errors: gateway,
        interval: opt_duration(&od.interval, format!("{f}.interval"))?,
        base_ejection_time: opt_duration(&od.base_ejection_time, format!("{f}.baseEjectionTime"))?,
        max_ejection_percent: pct(
            od.max_ejection_percent,
            "maxEjectionPercent",
            format!("{f}.maxEjectionPercent"),
        )?,
        min_health_percent: pct(
            od.min_health_percent,
            "minHealthPercent",
            format!("{f}.minHealthPercent"),
        )?,
    })
}

// ---------------------------------------------------------------------------------------------
// VirtualService
// ---------------------------------------------------------------------------------------------

/// What one VirtualService contributes.
struct VsOut {
    hosts: Vec<String>,
    http: Vec<l7::HttpRoute>,
    tcp: Vec<l7::TcpRoute>,
}

fn virtual_services(cx: &mut Cx<'_>, drs: &DrIndex) {
    for (key, obj, spec) in
        cx.objects::<types::VirtualServiceSpec>("VirtualService", ISTIO_NETWORKING_VERSIONS)
    {
        if !applies_to_mesh(&spec.gateways) {
            continue;
        }
        let mut warnings = Vec::new();
        let vs = match virtual_service(&key, &obj, &spec, drs, &mut warnings) {
            Ok(vs) => vs,
            Err(e) => {
                for w in warnings {
                    cx.report(&key, w);
                }
                cx.report(&key, e);
                continue;
            }
        };
        for w in warnings {
            cx.report(&key, w);
        }
        for host in &vs.hosts {
            let b = cx.service(host, &key.namespace);
            b.vs_http.extend(vs.http.iter().cloned());
            b.vs_tcp.extend(vs.tcp.iter().cloned());
            b.sources.insert(key.to_string());
        }
    }
}

/// Istio: no `gateways` means `mesh`; otherwise only if `mesh` is listed.
fn applies_to_mesh(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == "mesh")
}

fn virtual_service(
    key: &ObjectKey,
    obj: &Value,
    spec: &types::VirtualServiceSpec,
    drs: &DrIndex,
    warnings: &mut Vec<FieldError>,
) -> Result<VsOut, FieldError> {
    let ns = key.namespace.as_str();
    if spec.hosts.is_empty() {
        return bad("spec.hosts", Invalid::Required("at least one host"));
    }
    let mut hosts = Vec::new();
    for (i, h) in spec.hosts.iter().enumerate() {
        let fq = parse::fqdn(h, ns);
        if fq.contains('*') {
            warnings.push(FieldError {
                field: format!("spec.hosts[{i}]"),
                reason: Invalid::Unsupported(format!(
                    "wildcard host `{h}` is ignored: waypoint routes are per service hostname"
                )),
            });
        } else if !hosts.contains(&fq) {
            hosts.push(fq);
        }
    }
    let rate_limit = rate_limit_of(obj)?;
    if !spec.tls.is_empty() {
        return bad(
            "spec.tls",
            Invalid::Unsupported("tls (SNI) routes are not supported by waypoints yet".into()),
        );
    }
    let mut http = Vec::new();
    for (i, r) in spec.http.iter().enumerate() {
        let f = format!("spec.http[{i}]");
        if let Some(mut route) = vs_http_route(ns, &key.name, i, r, &f, drs, warnings)? {
            route.rate_limit = rate_limit;
            http.push(route);
        }
    }
    let mut tcp = Vec::new();
    for (i, r) in spec.tcp.iter().enumerate() {
        let f = format!("spec.tcp[{i}]");
        if let Some(route) = vs_tcp_route(ns, &key.name, i, r, &f, drs, warnings)? {
            tcp.push(route);
        }
    }
    Ok(VsOut { hosts, http, tcp })
}

/// Istio's default retry policy, applied when a route has none.
fn default_retries() -> l7::RetryPolicy {
    l7::RetryPolicy {
        attempts: 2,
        per_try_timeout: None,
        retry_on: [
            "connect-failure",
            "refused-stream",
            "unavailable",
            "cancelled",
            "retriable-status-codes",
        ]
        .map(String::from)
        .to_vec(),
        retriable_status_codes: vec![503],
        backoff: None,
    }
}

const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

fn vs_retries(r: &types::HttpRetry, f: &str) -> Result<Option<l7::RetryPolicy>, FieldError> {
    let attempts = opt_count(r.attempts, "attempts", format!("{f}.attempts"))?;
    if attempts == 0 {
        // Istio: `attempts: 0` (or none) disables retries.
        return Ok(None);
    }
    let mut policy = default_retries();
    policy.attempts = attempts;
    policy.per_try_timeout = opt_duration(&r.per_try_timeout, format!("{f}.perTryTimeout"))?;
    if let Some(on) = &r.retry_on {
        policy.retry_on.clear();
        policy.retriable_status_codes.clear();
        for item in on.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Ok(code) = item.parse::<i64>() {
                let code =
                    parse::http_status("retryOn status code", code).at(format!("{f}.retryOn"))?;
                policy.retriable_status_codes.push(code);
            } else if RETRY_ON.contains(&item) {
                if !policy.retry_on.iter().any(|x| x == item) {
                    policy.retry_on.push(item.to_string());
                }
            } else {
                return bad(
                    format!("{f}.retryOn"),
                    Invalid::Bad(format!("unknown retry condition `{item}`")),
                );
            }
        }
        if !policy.retriable_status_codes.is_empty()
            && !policy
                .retry_on
                .iter()
                .any(|x| x == "retriable-status-codes")
        {
            policy.retry_on.push("retriable-status-codes".into());
        }
    }
    Ok(Some(policy))
}

fn header_ops(h: &types::HeaderOperations) -> l7::HeaderOps {
    let hdr = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| l7::Header {
                name: k.to_ascii_lowercase(),
                value: v.clone(),
            })
            .collect()
    };
    l7::HeaderOps {
        set: hdr(&h.set),
        add: hdr(&h.add),
        remove: h.remove.iter().map(|r| r.to_ascii_lowercase()).collect(),
    }
}

fn headers_pair(h: &Option<types::Headers>) -> (Option<l7::HeaderOps>, Option<l7::HeaderOps>) {
    match h {
        None => (None, None),
        Some(h) => (
            h.request.as_ref().map(header_ops),
            h.response.as_ref().map(header_ops),
        ),
    }
}

/// A VirtualService destination; warns (keeps it) when the subset is not defined.
fn vs_destination(
    d: &types::Destination,
    ns: &str,
    f: &str,
    drs: &DrIndex,
    warnings: &mut Vec<FieldError>,
) -> Result<l7::RouteDestination, FieldError> {
    if d.host.trim().is_empty() {
        return bad(format!("{f}.host"), Invalid::Required("destination host"));
    }
    let host = parse::fqdn(&d.host, ns);
    if host.contains('*') {
        return bad(
            format!("{f}.host"),
            Invalid::Bad(format!(
                "destination host `{}` must not be a wildcard",
                d.host
            )),
        );
    }
    if !d.subset.is_empty()
        && !drs
            .get(&host)
            .is_some_and(|e| e.subsets.iter().any(|s| s.name == d.subset))
    {
        warnings.push(FieldError {
            field: format!("{f}.subset"),
            reason: Invalid::Bad(format!(
                "subset `{}` is not defined in any DestinationRule for host `{host}`; kept, requests to it fail with 503 until it is defined",
                d.subset
            )),
        });
    }
    Ok(l7::RouteDestination {
        host,
        subset: d.subset.clone(),
        port: parse::opt_port(d.port.as_ref().map(|p| p.number)).at(format!("{f}.port.number"))?,
        weight: 0,
        request_headers: None,
        response_headers: None,
    })
}

/// Weights: a single destination without weight gets 100; otherwise missing = 0. Negative or an
/// all-zero total is invalid.
fn weights(ws: &[Option<i64>], f: &str, item: &str) -> Result<Vec<u32>, FieldError> {
    let mut out = Vec::new();
    for (i, w) in ws.iter().enumerate() {
        let v = match w {
            None if ws.len() == 1 => 100,
            None => 0,
            Some(n) => parse::count("weight", *n).at(format!("{f}[{i}].{item}"))?,
        };
        out.push(v);
    }
    if !out.is_empty() && out.iter().all(|w| *w == 0) {
        return bad(
            f,
            Invalid::Bad("the total weight of the destinations is 0".into()),
        );
    }
    Ok(out)
}

fn vs_http_route(
    ns: &str,
    vs_name: &str,
    idx: usize,
    r: &types::HttpRoute,
    f: &str,
    drs: &DrIndex,
    warnings: &mut Vec<FieldError>,
) -> Result<Option<l7::HttpRoute>, FieldError> {
    use l7::http_route::Action;
    if r.delegate.is_some() {
        return bad(
            format!("{f}.delegate"),
            Invalid::Unsupported("delegate VirtualServices are not supported".into()),
        );
    }
    // Matches: entries bound only to gateways (not `mesh`) do not apply to waypoints.
    let mut matches = Vec::new();
    for (j, m) in r.matches.iter().enumerate() {
        let mf = format!("{f}.match[{j}]");
        if !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == "mesh") {
            continue;
        }
        matches.push(vs_match(m, &mf)?);
    }
    if !r.matches.is_empty() && matches.is_empty() {
        return Ok(None);
    }
    let actions = [
        !r.route.is_empty(),
        r.redirect.is_some(),
        r.direct_response.is_some(),
    ];
    let action = match actions.iter().filter(|a| **a).count() {
        0 => {
            return bad(
                f,
                Invalid::OneOf("route, redirect, directResponse (one is required)"),
            );
        }
        1 => {
            if let Some(rd) = &r.redirect {
                let code = rd.redirect_code.unwrap_or(301);
                if ![301, 302, 303, 307, 308].contains(&code) {
                    return bad(
                        format!("{f}.redirect.redirectCode"),
                        Invalid::Bad(format!(
                            "{code} is not a redirect status (301, 302, 303, 307, 308)"
                        )),
                    );
                }
                Action::Redirect(l7::Redirect {
                    scheme: rd.scheme.clone(),
                    authority: rd.authority.clone(),
                    port: parse::opt_port(rd.port).at(format!("{f}.redirect.port"))?,
                    path_rewrite: (!rd.uri.is_empty())
                        .then(|| l7::redirect::PathRewrite::FullPath(rd.uri.clone())),
                    status_code: code,
                })
            } else if let Some(dr) = &r.direct_response {
                let status = parse::http_status("directResponse.status", i64::from(dr.status))
                    .at(format!("{f}.directResponse.status"))?;
                let body = match &dr.body {
                    Some(types::HttpBody { bytes: Some(_), .. }) => {
                        return bad(
                            format!("{f}.directResponse.body.bytes"),
                            Invalid::Unsupported(
                                "body.bytes is not supported; use body.string".into(),
                            ),
                        );
                    }
                    Some(types::HttpBody {
                        string: Some(s), ..
                    }) => s.clone().into_bytes(),
                    _ => Vec::new(),
                };
                Action::DirectResponse(l7::DirectResponse { status, body })
            } else {
                let rf = format!("{f}.route");
                let ws = weights(
                    &r.route.iter().map(|d| d.weight).collect::<Vec<_>>(),
                    &rf,
                    "weight",
                )?;
                let mut destinations = Vec::new();
                for (k, (d, w)) in r.route.iter().zip(ws).enumerate() {
                    let mut dest = vs_destination(
                        &d.destination,
                        ns,
                        &format!("{rf}[{k}].destination"),
                        drs,
                        warnings,
                    )?;
                    dest.weight = w;
                    (dest.request_headers, dest.response_headers) = headers_pair(&d.headers);
                    destinations.push(dest);
                }
                Action::Forward(l7::Forward { destinations })
            }
        }
        _ => return bad(f, Invalid::OneOf("route, redirect, directResponse")),
    };
    let rewrite = match &r.rewrite {
        None => None,
        Some(rw) => {
            let path_rewrite = match (&rw.uri, &rw.uri_regex_rewrite) {
                (Some(_), Some(_)) => {
                    return bad(
                        format!("{f}.rewrite"),
                        Invalid::OneOf("uri, uriRegexRewrite"),
                    );
                }
                (Some(u), None) => Some(l7::rewrite::PathRewrite::Prefix(u.clone())),
                (None, Some(rr)) => Some(l7::rewrite::PathRewrite::Regex(l7::RegexRewrite {
                    pattern: parse::regex(&rr.pattern)
                        .at(format!("{f}.rewrite.uriRegexRewrite.match"))?,
                    substitution: rr.rewrite.clone(),
                })),
                (None, None) => None,
            };
            Some(l7::Rewrite {
                path_rewrite,
                authority: rw.authority.clone(),
            })
        }
    };
    let (request_headers, response_headers) = headers_pair(&r.headers);
    let timeout = r
        .timeout
        .as_deref()
        .map(parse::nonzero_duration)
        .transpose()
        .at(format!("{f}.timeout"))?
        .flatten();
    // Retries only make sense when forwarding (not for redirects / direct responses).
    let forwards = matches!(action, Action::Forward(_));
    let retries = match &r.retries {
        None => forwards.then(default_retries),
        Some(rt) => vs_retries(rt, &format!("{f}.retries"))?,
    };
    let fault = r
        .fault
        .as_ref()
        .map(|ft| vs_fault(ft, &format!("{f}.fault")))
        .transpose()?;
    let mut mirrors = Vec::new();
    if let Some(m) = &r.mirror {
        let pct = match (&r.mirror_percentage, r.mirror_percent) {
            (Some(p), _) => parse::percent(p.value).at(format!("{f}.mirrorPercentage.value"))?,
            (None, Some(n)) => parse::percent(n as f64).at(format!("{f}.mirrorPercent"))?,
            (None, None) => 100.0,
        };
        mirrors.push(l7::Mirror {
            destination: Some(vs_destination(
                m,
                ns,
                &format!("{f}.mirror"),
                drs,
                warnings,
            )?),
            percentage: pct,
        });
    }
    for (k, m) in r.mirrors.iter().enumerate() {
        let mf = format!("{f}.mirrors[{k}]");
        mirrors.push(l7::Mirror {
            destination: Some(vs_destination(
                &m.destination,
                ns,
                &format!("{mf}.destination"),
                drs,
                warnings,
            )?),
            percentage: m
                .percentage
                .as_ref()
                .map(|p| parse::percent(p.value))
                .transpose()
                .at(format!("{mf}.percentage.value"))?
                .unwrap_or(100.0),
        });
    }
    let cors = r
        .cors_policy
        .as_ref()
        .map(|c| vs_cors(c, &format!("{f}.corsPolicy")))
        .transpose()?;
    let name = if r.name.is_empty() {
        format!("{ns}/{vs_name}/{idx}")
    } else {
        format!("{ns}/{vs_name}/{}", r.name)
    };
    Ok(Some(l7::HttpRoute {
        name,
        matches,
        action: Some(action),
        rewrite,
        request_headers,
        response_headers,
        timeout,
        retries,
        fault,
        mirrors,
        rate_limit: None,
        cors,
    }))
}

fn vs_match(m: &types::HttpMatchRequest, f: &str) -> Result<l7::HttpMatch, FieldError> {
    if !m.source_labels.is_empty() {
        return bad(
            format!("{f}.sourceLabels"),
            Invalid::Unsupported(
                "sourceLabels is not supported by waypoints (they see the caller's identity, not its labels); use sourceNamespace or an AuthorizationPolicy".into(),
            ),
        );
    }
    let sm = |v: &Option<types::StringMatch>, field: &str, ic: bool| {
        v.as_ref()
            .map(|s| parse::istio_string_match(s, ic, &format!("{f}.{field}")))
            .transpose()
    };
    let mut headers = Vec::new();
    for (name, v) in &m.headers {
        headers.push(l7::HeaderMatch {
            name: name.to_ascii_lowercase(),
            value: Some(parse::istio_string_match(
                v,
                false,
                &format!("{f}.headers[{name}]"),
            )?),
            invert: false,
        });
    }
    for (name, v) in &m.without_headers {
        headers.push(l7::HeaderMatch {
            name: name.to_ascii_lowercase(),
            value: Some(parse::istio_string_match(
                v,
                false,
                &format!("{f}.withoutHeaders[{name}]"),
            )?),
            invert: true,
        });
    }
    let mut query_params = Vec::new();
    for (name, v) in &m.query_params {
        query_params.push(l7::QueryParamMatch {
            name: name.clone(),
            value: Some(parse::istio_string_match(
                v,
                false,
                &format!("{f}.queryParams[{name}]"),
            )?),
        });
    }
    Ok(l7::HttpMatch {
        path: sm(&m.uri, "uri", m.ignore_uri_case)?,
        headers,
        method: sm(&m.method, "method", false)?,
        query_params,
        authority: sm(&m.authority, "authority", false)?,
        port: parse::opt_port(m.port).at(format!("{f}.port"))?,
        source_namespace: m.source_namespace.clone(),
        scheme: sm(&m.scheme, "scheme", false)?,
    })
}

fn vs_fault(ft: &types::HttpFault, f: &str) -> Result<l7::Fault, FieldError> {
    let delay = match &ft.delay {
        None => None,
        Some(d) => {
            let df = format!("{f}.delay");
            if d.exponential_delay.is_some() {
                return bad(
                    format!("{df}.exponentialDelay"),
                    Invalid::Unsupported(
                        "exponentialDelay is not supported; use fixedDelay".into(),
                    ),
                );
            }
            let fixed = match &d.fixed_delay {
                Some(s) => parse::duration(s).at(format!("{df}.fixedDelay"))?,
                None => return bad(format!("{df}.fixedDelay"), Invalid::Required("fixedDelay")),
            };
            let percentage = match (&d.percentage, d.percent) {
                (Some(p), _) => parse::percent(p.value).at(format!("{df}.percentage.value"))?,
                (None, Some(n)) => parse::percent(n as f64).at(format!("{df}.percent"))?,
                (None, None) => 0.0,
            };
            Some(l7::FaultDelay {
                fixed_delay: Some(fixed),
                percentage,
            })
        }
    };
    let abort = match &ft.abort {
        None => None,
        Some(a) => {
            let af = format!("{f}.abort");
            if a.grpc_status.is_some() {
                return bad(
                    format!("{af}.grpcStatus"),
                    Invalid::Unsupported("grpcStatus is not supported; use httpStatus".into()),
                );
            }
            let status = match a.http_status {
                Some(s) => parse::http_status("httpStatus", s).at(format!("{af}.httpStatus"))?,
                None => return bad(format!("{af}.httpStatus"), Invalid::Required("httpStatus")),
            };
            Some(l7::FaultAbort {
                http_status: status,
                percentage: a
                    .percentage
                    .as_ref()
                    .map(|p| parse::percent(p.value))
                    .transpose()
                    .at(format!("{af}.percentage.value"))?
                    .unwrap_or(0.0),
            })
        }
    };
    Ok(l7::Fault { delay, abort })
}

fn vs_cors(c: &types::CorsPolicy, f: &str) -> Result<l7::CorsPolicy, FieldError> {
    let mut allow_origins = Vec::new();
    for (i, o) in c.allow_origins.iter().enumerate() {
        allow_origins.push(parse::istio_string_match(
            o,
            false,
            &format!("{f}.allowOrigins[{i}]"),
        )?);
    }
    // The deprecated plain-string `allowOrigin` counts only when `allowOrigins` is absent
    // (istiod's precedence), never in addition to it.
    if c.allow_origins.is_empty() {
        allow_origins.extend(c.allow_origin.iter().map(parse::exact));
    }
    use l7::cors_policy::UnmatchedPreflights;
    let unmatched_preflights = match c.unmatched_preflights.as_deref() {
        None | Some("UNSPECIFIED") => UnmatchedPreflights::Unspecified,
        Some("FORWARD") => UnmatchedPreflights::Forward,
        Some("IGNORE") => UnmatchedPreflights::Ignore,
        Some(other) => {
            return bad(
                format!("{f}.unmatchedPreflights"),
                Invalid::Bad(format!(
                    "unknown value `{other}` (UNSPECIFIED, FORWARD, IGNORE)"
                )),
            );
        }
    };
    Ok(l7::CorsPolicy {
        allow_origins,
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.clone(),
        expose_headers: c.expose_headers.clone(),
        max_age: opt_duration(&c.max_age, format!("{f}.maxAge"))?,
        allow_credentials: c.allow_credentials.unwrap_or(false),
        unmatched_preflights: unmatched_preflights as i32,
    })
}

fn vs_tcp_route(
    ns: &str,
    vs_name: &str,
    idx: usize,
    r: &types::TcpRoute,
    f: &str,
    drs: &DrIndex,
    warnings: &mut Vec<FieldError>,
) -> Result<Option<l7::TcpRoute>, FieldError> {
    let mut matches = Vec::new();
    for (j, m) in r.matches.iter().enumerate() {
        let mf = format!("{f}.match[{j}]");
        if !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == "mesh") {
            continue;
        }
        if !m.source_labels.is_empty() {
            return bad(
                format!("{mf}.sourceLabels"),
                Invalid::Unsupported(
                    "sourceLabels is not supported by waypoints; use sourceNamespace".into(),
                ),
            );
        }
        let mut subnets = Vec::new();
        for (k, s) in m.destination_subnets.iter().enumerate() {
            subnets.push(parse::cidr(s).at(format!("{mf}.destinationSubnets[{k}]"))?);
        }
        matches.push(l7::TcpMatch {
            port: parse::opt_port(m.port).at(format!("{mf}.port"))?,
            destination_subnets: subnets,
            source_namespace: m.source_namespace.clone(),
        });
    }
    if !r.matches.is_empty() && matches.is_empty() {
        return Ok(None);
    }
    let rf = format!("{f}.route");
    if r.route.is_empty() {
        return bad(rf, Invalid::Required("at least one route destination"));
    }
    let ws = weights(
        &r.route.iter().map(|d| d.weight).collect::<Vec<_>>(),
        &rf,
        "weight",
    )?;
    let mut destinations = Vec::new();
    for (k, (d, w)) in r.route.iter().zip(ws).enumerate() {
        let mut dest = vs_destination(
            &d.destination,
            ns,
            &format!("{rf}[{k}].destination"),
            drs,
            warnings,
        )?;
        dest.weight = w;
        destinations.push(dest);
    }
    Ok(Some(l7::TcpRoute {
        name: format!("{ns}/{vs_name}/tcp-{idx}"),
        matches,
        destinations,
    }))
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

fn emit_services(cx: &mut Cx<'_>, drs: DrIndex) {
    let mut services = std::mem::take(&mut cx.services);
    for (host, dr) in &drs {
        let b = services.entry(host.clone()).or_default();
        if b.namespace.is_empty() {
            b.namespace = dr.namespace.clone();
        }
        b.sources.extend(dr.sources.iter().cloned());
    }
    for (host, mut b) in services {
        b.gw_http.sort_by(|a, b| a.0.cmp(&b.0));
        let mut http_routes = b.vs_http;
        http_routes.extend(b.gw_http.into_iter().map(|(_, r)| r));
        let mut tcp_routes = b.vs_tcp;
        tcp_routes.extend(b.gw_tcp);
        let (traffic_policy, subsets) = match drs.get(&host) {
            Some(dr) => (
                dr.traffic_policy.clone(),
                dr.subsets
                    .iter()
                    .map(|s| {
                        let mut s = s.clone();
                        s.workload_uids = subset_workloads(cx.snap, cx.opts, &host, &s.labels);
                        s
                    })
                    .collect(),
            ),
            None => (None, Vec::new()),
        };
        let name = format!("{}/{host}", b.namespace);
        let msg = l7::ServiceConfig {
            hostname: host,
            namespace: b.namespace,
            http_routes,
            tcp_routes,
            traffic_policy,
            subsets,
            sources: b.sources.into_iter().collect(),
        };
        cx.out.add(zmesh_proto::L7_SERVICE_TYPE_URL, name, &msg);
    }
}

/// UIDs of the pods behind in-cluster service `host` that carry all `labels` (sorted). Empty
/// when the Service is unknown or has no selector (ServiceEntry hosts, headless without one).
fn subset_workloads(
    snap: &Snapshot,
    opts: &TranslateOptions,
    host: &str,
    labels: &BTreeMap<String, String>,
) -> Vec<String> {
    let (Some(name), ns) = (
        parse::host_service_name(host),
        parse::host_namespace(host, ""),
    ) else {
        return Vec::new();
    };
    let Some(svc) = snap.get(&ObjectKey::new("Service", &ns, name)) else {
        return Vec::new();
    };
    let selector = svc
        .get("spec")
        .cloned()
        .and_then(|s| serde_json::from_value::<types::ServiceSpec>(s).ok())
        .and_then(|s| s.selector)
        .unwrap_or_default();
    if selector.is_empty() {
        return Vec::new();
    }
    let mut uids: Vec<String> = snap
        .parsed_in::<crate::k8s::Pod>("Pod", &ns)
        .filter_map(|(k, pod)| Some((k, pod.ok()?)))
        .filter(|(_, pod)| {
            if matches!(pod.status.phase.as_deref(), Some("Succeeded" | "Failed")) {
                return false;
            }
            let pl = &pod.metadata.labels;
            selector
                .iter()
                .chain(labels.iter())
                .all(|(k, v)| pl.get(k) == Some(v))
        })
        .map(|(k, _)| format!("{}//v1/Pod/{}/{}", opts.cluster_id, k.namespace, k.name))
        .collect();
    uids.sort();
    uids
}
