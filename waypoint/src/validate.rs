//! Checks of the L7 resources received over xDS, beyond decoding. A value that the request
//! path could only reinterpret silently (a port truncated to 16 bits, a DENY policy whose
//! action or CIDR is not understood and so never matches) or that cannot be used at all (a
//! regex that does not compile, a duration too long for a clock) makes [`crate::store`]
//! refuse the resource: it is NACKed and its previous version stays in use.
//!
//! Refused: durations outside protobuf's `Duration` range (negative, or longer than
//! 315,576,000,000 s), percentages outside 0..=100 (NaN included), regexes that do not compile,
//! status codes outside 100..=599, ports above 65535, CIDRs that do not parse, authorization
//! actions, target kinds and condition keys this waypoint does not know.
//!
//! Accepted on purpose: destinations whose weights are all 0 and forwards without
//! destinations (requests get 503, as for a route to nothing), header names that are not
//! valid (those header operations are skipped), unset values (0: the documented default).
//!
//! Field paths use the proto3 JSON names, as `/config_dump` shows the resources.

use zmesh_proto::l7;

use crate::matcher::{ANCHORED, UNANCHORED};

/// protobuf's `google.protobuf.Duration` maximum (10 000 years).
const MAX_DURATION_SECONDS: i64 = 315_576_000_000;

/// A value of a resource the waypoint refuses, at `field`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {reason}")]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

type Check = Result<(), Invalid>;

fn bad(field: impl Into<String>, reason: impl Into<String>) -> Check {
    Err(Invalid {
        field: field.into(),
        reason: reason.into(),
    })
}

/// Check a `ServiceConfig` (see the module docs).
pub fn service_config(c: &l7::ServiceConfig) -> Check {
    for (i, r) in c.http_routes.iter().enumerate() {
        http_route(&format!("httpRoutes[{i}]"), r)?;
    }
    for (i, r) in c.tcp_routes.iter().enumerate() {
        let f = format!("tcpRoutes[{i}]");
        for (j, m) in r.matches.iter().enumerate() {
            port(&format!("{f}.matches[{j}].port"), m.port)?;
            for (k, s) in m.destination_subnets.iter().enumerate() {
                cidr(&format!("{f}.matches[{j}].destinationSubnets[{k}]"), s)?;
            }
        }
        for (j, d) in r.destinations.iter().enumerate() {
            port(&format!("{f}.destinations[{j}].port"), d.port)?;
        }
    }
    if let Some(tp) = &c.traffic_policy {
        traffic_policy("trafficPolicy", tp)?;
    }
    for (i, s) in c.subsets.iter().enumerate() {
        if let Some(tp) = &s.traffic_policy {
            traffic_policy(&format!("subsets[{i}].trafficPolicy"), tp)?;
        }
    }
    Ok(())
}

fn http_route(f: &str, r: &l7::HttpRoute) -> Check {
    for (j, m) in r.matches.iter().enumerate() {
        let mf = format!("{f}.matches[{j}]");
        for (name, sm) in [
            ("path", &m.path),
            ("method", &m.method),
            ("authority", &m.authority),
            ("scheme", &m.scheme),
        ] {
            if let Some(sm) = sm {
                string_match(&format!("{mf}.{name}"), sm)?;
            }
        }
        for (k, h) in m.headers.iter().enumerate() {
            if let Some(sm) = &h.value {
                string_match(&format!("{mf}.headers[{k}].value"), sm)?;
            }
        }
        for (k, q) in m.query_params.iter().enumerate() {
            if let Some(sm) = &q.value {
                string_match(&format!("{mf}.queryParams[{k}].value"), sm)?;
            }
        }
        port(&format!("{mf}.port"), m.port)?;
    }
    use l7::http_route::Action;
    match &r.action {
        Some(Action::Forward(fw)) => {
            for (k, d) in fw.destinations.iter().enumerate() {
                port(&format!("{f}.forward.destinations[{k}].port"), d.port)?;
            }
        }
        Some(Action::Redirect(rd)) => {
            port(&format!("{f}.redirect.port"), rd.port)?;
            status(&format!("{f}.redirect.statusCode"), rd.status_code)?;
        }
        Some(Action::DirectResponse(d)) => {
            status(&format!("{f}.directResponse.status"), d.status)?;
        }
        None => {}
    }
    if let Some(rw) = &r.rewrite
        && let Some(l7::rewrite::PathRewrite::Regex(re)) = &rw.path_rewrite
        && let Err(e) = UNANCHORED.check(&re.pattern)
    {
        return bad(
            format!("{f}.rewrite.regex.pattern"),
            format!("invalid regular expression `{}`: {e}", re.pattern),
        );
    }
    duration(&format!("{f}.timeout"), r.timeout)?;
    if let Some(rp) = &r.retries {
        duration(&format!("{f}.retries.perTryTimeout"), rp.per_try_timeout)?;
        duration(&format!("{f}.retries.backoff"), rp.backoff)?;
    }
    if let Some(fault) = &r.fault {
        if let Some(d) = &fault.delay {
            duration(&format!("{f}.fault.delay.fixedDelay"), d.fixed_delay)?;
            percent(&format!("{f}.fault.delay.percentage"), d.percentage)?;
        }
        if let Some(a) = &fault.abort {
            status(&format!("{f}.fault.abort.httpStatus"), a.http_status)?;
            percent(&format!("{f}.fault.abort.percentage"), a.percentage)?;
        }
    }
    for (k, m) in r.mirrors.iter().enumerate() {
        if let Some(d) = &m.destination {
            port(&format!("{f}.mirrors[{k}].destination.port"), d.port)?;
        }
        percent(&format!("{f}.mirrors[{k}].percentage"), m.percentage)?;
    }
    if let Some(rl) = &r.rate_limit {
        duration(&format!("{f}.rateLimit.fillInterval"), rl.fill_interval)?;
        status(&format!("{f}.rateLimit.status"), rl.status)?;
    }
    if let Some(cors) = &r.cors {
        for (k, sm) in cors.allow_origins.iter().enumerate() {
            string_match(&format!("{f}.cors.allowOrigins[{k}]"), sm)?;
        }
        duration(&format!("{f}.cors.maxAge"), cors.max_age)?;
    }
    Ok(())
}

fn traffic_policy(f: &str, tp: &l7::TrafficPolicy) -> Check {
    destination_policy(
        f,
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
    )?;
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let pf = format!("{f}.portLevelSettings[{i}]");
        port(&format!("{pf}.port"), pl.port)?;
        destination_policy(
            &pf,
            pl.load_balancer.as_ref(),
            pl.connection_pool.as_ref(),
            pl.outlier_detection.as_ref(),
        )?;
    }
    Ok(())
}

fn destination_policy(
    f: &str,
    lb: Option<&l7::LoadBalancer>,
    pool: Option<&l7::ConnectionPool>,
    od: Option<&l7::OutlierDetection>,
) -> Check {
    if let Some(l7::load_balancer::Policy::ConsistentHash(ch)) = lb.and_then(|l| l.policy.as_ref())
        && let Some(l7::consistent_hash::HashKey::HttpCookie(c)) = &ch.hash_key
    {
        duration(
            &format!("{f}.loadBalancer.consistentHash.httpCookie.ttl"),
            c.ttl,
        )?;
    }
    if let Some(p) = pool {
        duration(
            &format!("{f}.connectionPool.connectTimeout"),
            p.connect_timeout,
        )?;
        duration(&format!("{f}.connectionPool.idleTimeout"), p.idle_timeout)?;
    }
    if let Some(o) = od {
        duration(&format!("{f}.outlierDetection.interval"), o.interval)?;
        duration(
            &format!("{f}.outlierDetection.baseEjectionTime"),
            o.base_ejection_time,
        )?;
    }
    Ok(())
}

/// Check an `Authorization` (see the module docs).
pub fn authorization(a: &l7::Authorization) -> Check {
    if l7::Action::try_from(a.action).is_err() {
        return bad(
            "action",
            format!(
                "{} is not an action this waypoint enforces (ALLOW, DENY)",
                a.action
            ),
        );
    }
    for (i, t) in a.targets.iter().enumerate() {
        use l7::policy_target::Kind;
        if !matches!(Kind::try_from(t.kind), Ok(Kind::Gateway | Kind::Service)) {
            return bad(
                format!("targets[{i}].kind"),
                format!("{} is not a target kind (GATEWAY, SERVICE)", t.kind),
            );
        }
    }
    for (i, rule) in a.rules.iter().enumerate() {
        let rf = format!("rules[{i}]");
        for (j, s) in rule.from.iter().enumerate() {
            source(&format!("{rf}.from[{j}]"), s)?;
        }
        for (j, o) in rule.to.iter().enumerate() {
            operation(&format!("{rf}.to[{j}]"), o)?;
        }
        for (j, c) in rule.when.iter().enumerate() {
            condition(&format!("{rf}.when[{j}]"), c)?;
        }
    }
    Ok(())
}

fn string_matches(f: &str, name: &str, ms: &[l7::StringMatch]) -> Check {
    for (k, m) in ms.iter().enumerate() {
        string_match(&format!("{f}.{name}[{k}]"), m)?;
    }
    Ok(())
}

fn source(f: &str, s: &l7::Source) -> Check {
    for (name, ms) in [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
        ("namespaces", &s.namespaces),
        ("notNamespaces", &s.not_namespaces),
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
    ] {
        string_matches(f, name, ms)?;
    }
    for (name, cidrs) in [
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        for (k, c) in cidrs.iter().enumerate() {
            cidr(&format!("{f}.{name}[{k}]"), c)?;
        }
    }
    Ok(())
}

fn operation(f: &str, o: &l7::Operation) -> Check {
    for (name, ms) in [
        ("hosts", &o.hosts),
        ("notHosts", &o.not_hosts),
        ("methods", &o.methods),
        ("notMethods", &o.not_methods),
        ("paths", &o.paths),
        ("notPaths", &o.not_paths),
    ] {
        string_matches(f, name, ms)?;
    }
    for (name, ports) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
        for (k, p) in ports.iter().enumerate() {
            port(&format!("{f}.{name}[{k}]"), *p)?;
        }
    }
    Ok(())
}

fn condition(f: &str, c: &l7::Condition) -> Check {
    use l7::condition::Key;
    let key = match Key::try_from(c.key) {
        Ok(Key::Unspecified) | Err(_) => {
            return bad(
                format!("{f}.key"),
                format!("{} is not a condition key this waypoint knows", c.key),
            );
        }
        Ok(k) => k,
    };
    for (name, ms) in [("values", &c.values), ("notValues", &c.not_values)] {
        string_matches(f, name, ms)?;
        // IP conditions compare addresses with CIDRs, given as exact matches.
        if matches!(key, Key::SourceIp | Key::RemoteIp | Key::DestinationIp) {
            for (k, m) in ms.iter().enumerate() {
                let vf = format!("{f}.{name}[{k}]");
                match &m.match_type {
                    Some(l7::string_match::MatchType::Exact(v)) => cidr(&format!("{vf}.exact"), v)?,
                    _ => return bad(vf, "an IP condition value must be an exact CIDR"),
                }
            }
        }
    }
    Ok(())
}

fn string_match(f: &str, m: &l7::StringMatch) -> Check {
    if let Some(l7::string_match::MatchType::Regex(re)) = &m.match_type
        && let Err(e) = ANCHORED.check(re)
    {
        return bad(
            format!("{f}.regex"),
            format!("invalid regular expression `{re}`: {e}"),
        );
    }
    Ok(())
}

fn duration(f: &str, d: Option<prost_types::Duration>) -> Check {
    let Some(d) = d else { return Ok(()) };
    let valid = (0..=MAX_DURATION_SECONDS).contains(&d.seconds)
        && (0..1_000_000_000).contains(&d.nanos)
        && !(d.seconds == MAX_DURATION_SECONDS && d.nanos > 0);
    if valid {
        Ok(())
    } else {
        bad(
            f,
            format!(
                "{}s {}ns is not a duration from 0 to {MAX_DURATION_SECONDS}s",
                d.seconds, d.nanos
            ),
        )
    }
}

fn percent(f: &str, v: f64) -> Check {
    if (0.0..=100.0).contains(&v) {
        Ok(())
    } else {
        bad(f, format!("percentage {v} is outside 0..=100"))
    }
}

/// 0 means unset (the documented default applies).
fn status(f: &str, v: u32) -> Check {
    if v == 0 || (100..=599).contains(&v) {
        Ok(())
    } else {
        bad(f, format!("{v} is not an HTTP status code (100..=599)"))
    }
}

/// 0 means unset (any port, or the request's).
fn port(f: &str, v: u32) -> Check {
    if v <= u32::from(u16::MAX) {
        Ok(())
    } else {
        bad(f, format!("{v} is not a port number (0..=65535)"))
    }
}

fn cidr(f: &str, v: &str) -> Check {
    match v.parse::<ipnet::IpNet>() {
        Ok(_) => Ok(()),
        Err(_) => bad(f, format!("`{v}` is not a CIDR (e.g. \"10.0.0.0/8\")")),
    }
}

/// Check a `WaypointTelemetry`: a sampling percentage the tracer can use and an endpoint URL it
/// can dial (`http://<service>:<port>`; the exporter speaks plaintext gRPC only).
pub fn telemetry(t: &l7::WaypointTelemetry) -> Check {
    let Some(tr) = &t.tracing else {
        return Ok(());
    };
    let p = tr.random_sampling_percentage;
    if !(0.0..=100.0).contains(&p) {
        return bad(
            "tracing.randomSamplingPercentage",
            format!("{p} is not within 0-100"),
        );
    }
    if !tr.otlp_endpoint.starts_with("http://") {
        return bad(
            "tracing.otlpEndpoint",
            format!("{:?} is not an http:// URL", tr.otlp_endpoint),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dur(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
        Some(prost_types::Duration { seconds, nanos })
    }

    #[test]
    fn telemetry_needs_a_usable_percentage_and_endpoint() {
        let t = |pct: f64, ep: &str| l7::WaypointTelemetry {
            tracing: Some(l7::Tracing {
                otlp_endpoint: ep.into(),
                random_sampling_percentage: pct,
                ..Default::default()
            }),
        };
        assert!(telemetry(&l7::WaypointTelemetry::default()).is_ok());
        assert!(telemetry(&t(100.0, "http://otel:4317")).is_ok());
        let field = |v: &l7::WaypointTelemetry| telemetry(v).unwrap_err().field;
        assert_eq!(
            field(&t(f64::NAN, "http://otel:4317")),
            "tracing.randomSamplingPercentage"
        );
        assert_eq!(
            field(&t(101.0, "http://otel:4317")),
            "tracing.randomSamplingPercentage"
        );
        assert_eq!(field(&t(1.0, "otel:4317")), "tracing.otlpEndpoint");
    }

    #[test]
    fn refuses_values_the_request_path_cannot_use() {
        let route = |r: l7::HttpRoute| l7::ServiceConfig {
            http_routes: vec![r],
            ..Default::default()
        };
        let err = |c: &l7::ServiceConfig| service_config(c).unwrap_err().field;
        assert_eq!(
            err(&route(l7::HttpRoute {
                timeout: dur(i64::MAX, 0),
                ..Default::default()
            })),
            "httpRoutes[0].timeout"
        );
        assert_eq!(
            err(&route(l7::HttpRoute {
                timeout: dur(-1, 0),
                ..Default::default()
            })),
            "httpRoutes[0].timeout"
        );
        assert_eq!(
            err(&route(l7::HttpRoute {
                action: Some(l7::http_route::Action::Forward(l7::Forward {
                    destinations: vec![l7::RouteDestination {
                        port: 65_616,
                        ..Default::default()
                    }],
                })),
                ..Default::default()
            })),
            "httpRoutes[0].forward.destinations[0].port"
        );
        assert_eq!(
            err(&route(l7::HttpRoute {
                fault: Some(l7::Fault {
                    abort: Some(l7::FaultAbort {
                        http_status: 503,
                        percentage: f64::NAN,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            "httpRoutes[0].fault.abort.percentage"
        );
        let bad_regex = route(l7::HttpRoute {
            matches: vec![l7::HttpMatch {
                path: Some(l7::StringMatch {
                    match_type: Some(l7::string_match::MatchType::Regex("(".into())),
                    ignore_case: false,
                }),
                ..Default::default()
            }],
            ..Default::default()
        });
        let e = service_config(&bad_regex).unwrap_err();
        assert_eq!(e.field, "httpRoutes[0].matches[0].path.regex");
        assert!(e.reason.contains("invalid regular expression"), "{e}");
        // Weights all 0 and no destinations are meaningful (503), not refused.
        assert!(
            service_config(&route(l7::HttpRoute {
                action: Some(l7::http_route::Action::Forward(l7::Forward::default())),
                ..Default::default()
            }))
            .is_ok()
        );
        let authz = |a: l7::Authorization| authorization(&a).map_err(|e| e.field);
        assert_eq!(
            authz(l7::Authorization {
                action: 7,
                ..Default::default()
            }),
            Err("action".into())
        );
        assert_eq!(
            authz(l7::Authorization {
                rules: vec![l7::AuthzRule {
                    from: vec![l7::Source {
                        not_ip_blocks: vec!["10.0.0.0/33".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            Err("rules[0].from[0].notIpBlocks[0]".into())
        );
    }
}
