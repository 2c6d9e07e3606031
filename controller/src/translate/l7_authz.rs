//! Waypoint-bound AuthorizationPolicy → `zmesh.l7.v1.Authorization`.
//!
//! A policy is for waypoints when it has `targetRefs` (or the deprecated `targetRef`) naming a
//! Gateway of class `istio-waypoint`, a Service or a ServiceEntry; selector-based and
//! namespace-wide policies are ztunnel's (`translate::authz`). A Gateway of another class is an
//! ingress gateway and not ours (that target is ignored).
//!
//! Invalid values fail **closed**, like Istio does when it narrows policies for ztunnel: in an
//! ALLOW policy a rule with a bad value is dropped (fewer requests allowed); in a DENY policy the
//! field holding the bad value (or the whole `when` condition) is dropped, so the rule matches
//! more requests (more denied). Every such problem is reported. `CUSTOM` (ext-authz) is not
//! supported: it is reported and enforced as DENY of the requests its rules match (Istio's
//! behaviour for a CUSTOM policy whose provider is unusable). `AUDIT` policies are ignored.

use serde_json::Value;
use zmesh_proto::l7;

use super::parse::{self, At, FieldError, Invalid};
use super::types;
use super::{Cx, annotation};
use crate::store::ObjectKey;

const VERSIONS: &[&str] = &["security.istio.io/v1", "security.istio.io/v1beta1"];
const WAYPOINT_CLASS: &str = "istio-waypoint";

pub(super) fn translate(cx: &mut Cx<'_>) {
    for (key, obj, spec) in
        cx.objects::<types::AuthorizationPolicySpec>("AuthorizationPolicy", VERSIONS)
    {
        let refs: Vec<&types::PolicyTargetRef> = spec
            .target_refs
            .iter()
            .chain(spec.target_ref.as_ref())
            .collect();
        if refs.is_empty() {
            continue;
        }
        let mut errors = Vec::new();
        if spec.selector.is_some() {
            cx.report(
                &key,
                FieldError {
                    field: "spec.selector".into(),
                    reason: Invalid::Bad(
                        "selector and targetRefs cannot be combined; policy skipped".into(),
                    ),
                },
            );
            continue;
        }
        let action = match spec.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => l7::Action::Allow,
            "DENY" => l7::Action::Deny,
            "AUDIT" => continue,
            "CUSTOM" => {
                errors.push(FieldError {
                    field: "spec.action".into(),
                    reason: Invalid::Unsupported(
                        "CUSTOM (ext-authz) is not supported by zmesh waypoints; requests matching the rules are denied".into(),
                    ),
                });
                l7::Action::Deny
            }
            other => {
                cx.report(
                    &key,
                    FieldError {
                        field: "spec.action".into(),
                        reason: Invalid::Bad(format!(
                            "unknown action `{other}` (ALLOW, DENY, AUDIT, CUSTOM)"
                        )),
                    },
                );
                continue;
            }
        };
        let target_field = if spec.target_refs.is_empty() {
            "spec.targetRef"
        } else {
            "spec.targetRefs"
        };
        let mut targets = Vec::new();
        for (i, r) in refs.iter().enumerate() {
            let f = if spec.target_refs.is_empty() {
                target_field.to_string()
            } else {
                format!("{target_field}[{i}]")
            };
            match target(cx, &key, r, &f) {
                Ok(ts) => {
                    for t in ts {
                        if !targets.contains(&t) {
                            targets.push(t);
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        let mut rules = Vec::new();
        for (i, r) in spec.rules.iter().enumerate() {
            if let Some(r) = rule(r, &format!("spec.rules[{i}]"), action, &mut errors) {
                rules.push(r);
            }
        }
        for e in errors {
            cx.report(&key, e);
        }
        if targets.is_empty() {
            continue;
        }
        let msg = l7::Authorization {
            name: key.name.clone(),
            namespace: key.namespace.clone(),
            action: action as i32,
            targets,
            rules,
            dry_run: annotation(&obj, "istio.io/dry-run") == Some("true"),
        };
        cx.out.add(
            zmesh_proto::L7_AUTHZ_TYPE_URL,
            format!("{}/{}", key.namespace, key.name),
            &msg,
        );
    }
}

/// Resolve one targetRef. `Ok(vec![])`: valid but not a waypoint (an ingress Gateway).
fn target(
    cx: &Cx<'_>,
    key: &ObjectKey,
    r: &types::PolicyTargetRef,
    f: &str,
) -> Result<Vec<l7::PolicyTarget>, FieldError> {
    use l7::policy_target::Kind;
    if let Some(ns) = &r.namespace
        && !ns.is_empty()
        && ns != &key.namespace
    {
        return Err(FieldError {
            field: format!("{f}.namespace"),
            reason: Invalid::Bad(format!(
                "target namespace `{ns}` differs from the policy's namespace `{}`; targets must be local",
                key.namespace
            )),
        });
    }
    if r.name.is_empty() {
        return Err(FieldError {
            field: format!("{f}.name"),
            reason: Invalid::Required("target name"),
        });
    }
    let ns = key.namespace.as_str();
    match (r.group.as_str(), r.kind.as_str()) {
        ("gateway.networking.k8s.io", "Gateway") => {
            let gw = cx
                .snap
                .get(&ObjectKey::new("Gateway", ns, &r.name))
                .filter(|g| {
                    g.get("apiVersion")
                        .and_then(Value::as_str)
                        .is_some_and(|a| a.starts_with("gateway.networking.k8s.io/"))
                });
            if let Some(gw) = gw {
                let class = gw
                    .get("spec")
                    .cloned()
                    .and_then(|s| serde_json::from_value::<types::GatewaySpec>(s).ok())
                    .map(|s| s.gateway_class_name)
                    .unwrap_or_default();
                if class != WAYPOINT_CLASS {
                    return Ok(Vec::new());
                }
            }
            // An unknown Gateway is kept: it may be created later and then enforce at once.
            Ok(vec![l7::PolicyTarget {
                kind: Kind::Gateway as i32,
                namespace: ns.to_string(),
                name: r.name.clone(),
                hostname: String::new(),
            }])
        }
        ("" | "core", "Service") => Ok(vec![l7::PolicyTarget {
            kind: Kind::Service as i32,
            namespace: ns.to_string(),
            name: r.name.clone(),
            hostname: format!(
                "{}.{ns}.{}",
                r.name.to_ascii_lowercase(),
                parse::CLUSTER_DOMAIN
            ),
        }]),
        ("networking.istio.io", "ServiceEntry") => {
            let hosts = cx
                .snap
                .get(&ObjectKey::new("ServiceEntry", ns, &r.name))
                .and_then(|se| se.get("spec").cloned())
                .and_then(|s| serde_json::from_value::<types::ServiceEntrySpec>(s).ok())
                .map(|s| s.hosts)
                .unwrap_or_default();
            if hosts.is_empty() {
                return Err(FieldError {
                    field: format!("{f}.name"),
                    reason: Invalid::Bad(format!(
                        "ServiceEntry {ns}/{} not found or has no hosts",
                        r.name
                    )),
                });
            }
            Ok(hosts
                .into_iter()
                .map(|h| l7::PolicyTarget {
                    kind: Kind::Service as i32,
                    namespace: ns.to_string(),
                    name: r.name.clone(),
                    hostname: h.to_ascii_lowercase(),
                })
                .collect())
        }
        (group, kind) => Err(FieldError {
            field: format!("{f}.kind"),
            reason: Invalid::Unsupported(format!(
                "target kind `{kind}` (group `{group}`) is not supported (Gateway of class istio-waypoint, Service, ServiceEntry)"
            )),
        }),
    }
}

/// Convert every value of one field; the first bad value fails the whole field.
fn list<T>(
    values: &[String],
    f: String,
    conv: impl Fn(&str) -> Result<T, Invalid>,
) -> Result<Vec<T>, FieldError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| conv(v).at(format!("{f}[{i}]")))
        .collect()
}

/// Put a converted field in place, or record its error (the field stays empty = dropped).
fn take<T>(
    r: Result<Vec<T>, FieldError>,
    errors: &mut Vec<FieldError>,
    failed: &mut bool,
) -> Vec<T> {
    match r {
        Ok(v) => v,
        Err(e) => {
            errors.push(e);
            *failed = true;
            Vec::new()
        }
    }
}

fn rule(
    r: &types::AuthzRule,
    f: &str,
    action: l7::Action,
    errors: &mut Vec<FieldError>,
) -> Option<l7::AuthzRule> {
    let mut failed = false;
    let sm = |ic: bool| move |v: &str| parse::authz_value(v, ic);
    let mut from = Vec::new();
    for (i, s) in r.from.iter().enumerate() {
        let s = &s.source;
        let sf = format!("{f}.from[{i}].source");
        let mut t =
            |vals: &[String], name: &str, conv: fn(&str) -> Result<l7::StringMatch, Invalid>| {
                take(
                    list(vals, format!("{sf}.{name}"), conv),
                    errors,
                    &mut failed,
                )
            };
        let principals = t(&s.principals, "principals", |v| {
            parse::authz_value(v, false)
        });
        let not_principals = t(&s.not_principals, "notPrincipals", |v| {
            parse::authz_value(v, false)
        });
        let namespaces = t(&s.namespaces, "namespaces", |v| {
            parse::authz_value(v, false)
        });
        let not_namespaces = t(&s.not_namespaces, "notNamespaces", |v| {
            parse::authz_value(v, false)
        });
        let request_principals = t(&s.request_principals, "requestPrincipals", |v| {
            parse::authz_value(v, false)
        });
        let not_request_principals = t(&s.not_request_principals, "notRequestPrincipals", |v| {
            parse::authz_value(v, false)
        });
        let mut c = |vals: &[String], name: &str| {
            take(
                list(vals, format!("{sf}.{name}"), parse::cidr),
                errors,
                &mut failed,
            )
        };
        let source = l7::Source {
            principals,
            not_principals,
            namespaces,
            not_namespaces,
            ip_blocks: c(&s.ip_blocks, "ipBlocks"),
            not_ip_blocks: c(&s.not_ip_blocks, "notIpBlocks"),
            remote_ip_blocks: c(&s.remote_ip_blocks, "remoteIpBlocks"),
            not_remote_ip_blocks: c(&s.not_remote_ip_blocks, "notRemoteIpBlocks"),
            request_principals,
            not_request_principals,
        };
        from.push(source);
    }
    let mut to = Vec::new();
    for (i, o) in r.to.iter().enumerate() {
        let o = &o.operation;
        let of = format!("{f}.to[{i}].operation");
        let ports = |vals: &[Value], name: &str| -> Result<Vec<u32>, FieldError> {
            vals.iter()
                .enumerate()
                .map(|(k, v)| parse::port(v).at(format!("{of}.{name}[{k}]")))
                .collect()
        };
        let op = l7::Operation {
            hosts: take(
                list(&o.hosts, format!("{of}.hosts"), sm(true)),
                errors,
                &mut failed,
            ),
            not_hosts: take(
                list(&o.not_hosts, format!("{of}.notHosts"), sm(true)),
                errors,
                &mut failed,
            ),
            ports: take(ports(&o.ports, "ports"), errors, &mut failed),
            not_ports: take(ports(&o.not_ports, "notPorts"), errors, &mut failed),
            methods: take(
                list(&o.methods, format!("{of}.methods"), sm(false)),
                errors,
                &mut failed,
            ),
            not_methods: take(
                list(&o.not_methods, format!("{of}.notMethods"), sm(false)),
                errors,
                &mut failed,
            ),
            paths: take(
                list(&o.paths, format!("{of}.paths"), sm(false)),
                errors,
                &mut failed,
            ),
            not_paths: take(
                list(&o.not_paths, format!("{of}.notPaths"), sm(false)),
                errors,
                &mut failed,
            ),
        };
        to.push(op);
    }
    let mut when = Vec::new();
    for (i, c) in r.when.iter().enumerate() {
        match condition(c, &format!("{f}.when[{i}]")) {
            Ok(c) => when.push(c),
            Err(e) => {
                errors.push(e);
                failed = true;
            }
        }
    }
    if failed && action == l7::Action::Allow {
        // Fail closed: an ALLOW rule we cannot enforce exactly allows nothing.
        return None;
    }
    Some(l7::AuthzRule { from, to, when })
}

fn condition(c: &types::AuthzCondition, f: &str) -> Result<l7::Condition, FieldError> {
    use l7::condition::Key;
    let (key, header) = if let Some(h) = c
        .key
        .strip_prefix("request.headers[")
        .and_then(|h| h.strip_suffix(']'))
    {
        if h.is_empty() {
            return Err(FieldError {
                field: format!("{f}.key"),
                reason: Invalid::Required("header name in request.headers[...]"),
            });
        }
        (Key::RequestHeader, h.to_ascii_lowercase())
    } else {
        let k = match c.key.as_str() {
            "source.ip" => Key::SourceIp,
            "remote.ip" => Key::RemoteIp,
            "source.namespace" => Key::SourceNamespace,
            "source.principal" => Key::SourcePrincipal,
            "destination.ip" => Key::DestinationIp,
            "destination.port" => Key::DestinationPort,
            "connection.sni" => Key::ConnectionSni,
            "request.auth.principal" => Key::RequestAuthPrincipal,
            other => {
                return Err(FieldError {
                    field: format!("{f}.key"),
                    reason: Invalid::Unsupported(format!(
                        "condition key `{other}` is not supported (request.headers[<name>], source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port, connection.sni, request.auth.principal)"
                    )),
                });
            }
        };
        (k, String::new())
    };
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(FieldError {
            field: format!("{f}.values"),
            reason: Invalid::Required("values or notValues"),
        });
    }
    let conv = |v: &str| -> Result<l7::StringMatch, Invalid> {
        match key {
            Key::SourceIp | Key::RemoteIp | Key::DestinationIp => parse::cidr(v).map(parse::exact),
            Key::DestinationPort => {
                parse::port(&Value::String(v.to_string())).map(|p| parse::exact(p.to_string()))
            }
            _ => parse::authz_value(v, false),
        }
    };
    Ok(l7::Condition {
        key: key as i32,
        header,
        values: list(&c.values, format!("{f}.values"), conv)?,
        not_values: list(&c.not_values, format!("{f}.notValues"), conv)?,
    })
}
