//! Gateway API mesh routing (GAMMA): HTTPRoute and TCPRoute whose `parentRefs` name a Service
//! → the same `ServiceConfig` routes the VirtualService translation produces.
//!
//! Each HTTPRoute rule × match becomes one `HttpRoute` with a single match so that routes from
//! all HTTPRoutes of a service can be ordered by Gateway API precedence: exact path, then regex
//! path, then longest path prefix, then method, most header matches, most query matches, oldest
//! route, `ns/name`, rule order. Not handled: ReferenceGrant for cross-namespace backends
//! (allowed), `hostnames` (ignored for Service parents), `sectionName`.

use std::cmp::Reverse;

use serde_json::Value;
use zmesh_proto::l7;

use super::parse::{self, At, FieldError, Invalid, bad};
use super::types;
use super::{Cx, default_retries, rate_limit_of};
use crate::store::ObjectKey;

const HTTPROUTE_VERSIONS: &[&str] = &[
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
    "gateway.networking.k8s.io/v1alpha2",
];
const TCPROUTE_VERSIONS: &[&str] = &[
    "gateway.networking.k8s.io/v1alpha2",
    "gateway.networking.k8s.io/v1alpha3",
    "gateway.networking.k8s.io/v1",
];

/// Sort key of an HTTPRoute-derived route (smaller = evaluated first).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Precedence {
    path_kind: u8,
    path_len: Reverse<usize>,
    no_method: bool,
    headers: Reverse<usize>,
    query_params: Reverse<usize>,
    created: String,
    object: String,
    rule: usize,
    matcher: usize,
}

/// (service hostname, port or 0) targets of a route's Service parents; None when there are
/// none or one is invalid (reported).
fn service_parents(
    cx: &mut Cx<'_>,
    key: &ObjectKey,
    parents: &[types::ParentRef],
) -> Option<Vec<(String, u32)>> {
    match parse_service_parents(key, parents) {
        Ok(p) if p.is_empty() => None,
        Ok(p) => Some(p),
        Err(e) => {
            cx.report(key, e);
            None
        }
    }
}

fn parse_service_parents(
    key: &ObjectKey,
    parents: &[types::ParentRef],
) -> Result<Vec<(String, u32)>, FieldError> {
    let mut out = Vec::new();
    for (i, p) in parents.iter().enumerate() {
        let group = p.group.as_deref().unwrap_or("gateway.networking.k8s.io");
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        if !(kind == "Service" && (group.is_empty() || group == "core")) {
            continue;
        }
        let ns = p.namespace.as_deref().unwrap_or(&key.namespace);
        let host = format!(
            "{}.{ns}.{}",
            p.name.to_ascii_lowercase(),
            parse::CLUSTER_DOMAIN
        );
        let t = (
            host,
            parse::opt_port(p.port).at(format!("spec.parentRefs[{i}].port"))?,
        );
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

fn created(obj: &Value) -> String {
    obj.pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

pub(super) fn http_routes(cx: &mut Cx<'_>) {
    for (key, obj, spec) in cx.objects::<types::GwHttpRouteSpec>("HTTPRoute", HTTPROUTE_VERSIONS) {
        let Some(parents) = service_parents(cx, &key, &spec.parent_refs) else {
            continue;
        };
        let routes = match http_route(cx, &key, &obj, &spec) {
            Ok(r) => r,
            Err(e) => {
                cx.report(&key, e);
                continue;
            }
        };
        for (host, port) in parents {
            let b = cx.service(&host, &key.namespace);
            for (prec, r) in &routes {
                let mut r = r.clone();
                if port != 0 {
                    for m in &mut r.matches {
                        m.port = port;
                    }
                }
                b.gw_http.push((prec.clone(), r));
            }
            b.sources.insert(key.to_string());
        }
    }
}

fn http_route(
    cx: &Cx<'_>,
    key: &ObjectKey,
    obj: &Value,
    spec: &types::GwHttpRouteSpec,
) -> Result<Vec<(Precedence, l7::HttpRoute)>, FieldError> {
    let rate_limit = rate_limit_of(obj)?;
    let created = created(obj);
    let object = format!("{}/{}", key.namespace, key.name);
    let mut out = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let f = format!("spec.rules[{i}]");
        let mut base = rule_base(cx, key, rule, &f)?;
        base.rate_limit = rate_limit;
        let rule_name = rule.name.clone().unwrap_or_else(|| format!("rule-{i}"));
        let default_match = [types::GwHttpRouteMatch::default()];
        let matches: &[types::GwHttpRouteMatch] = if rule.matches.is_empty() {
            &default_match
        } else {
            &rule.matches
        };
        for (j, m) in matches.iter().enumerate() {
            let mf = format!("{f}.matches[{j}]");
            let (hm, path_kind, path_len) = http_match(m, &mf)?;
            let prec = Precedence {
                path_kind,
                path_len: Reverse(path_len),
                no_method: hm.method.is_none(),
                headers: Reverse(hm.headers.len()),
                query_params: Reverse(hm.query_params.len()),
                created: created.clone(),
                object: object.clone(),
                rule: i,
                matcher: j,
            };
            let mut r = base.clone();
            r.name = format!("{object}/{rule_name}/match-{j}");
            r.matches = vec![hm];
            out.push((prec, r));
        }
    }
    Ok(out)
}

/// Returns the match plus its precedence facts (path kind rank, path length).
fn http_match(
    m: &types::GwHttpRouteMatch,
    f: &str,
) -> Result<(l7::HttpMatch, u8, usize), FieldError> {
    use l7::string_match::MatchType;
    let (kind, value) = match &m.path {
        None => ("PathPrefix", "/".to_string()),
        Some(p) => (
            p.kind.as_deref().unwrap_or("PathPrefix"),
            p.value.clone().unwrap_or_else(|| "/".into()),
        ),
    };
    let (mt, rank) = match kind {
        "Exact" => (MatchType::Exact(value.clone()), 0),
        "RegularExpression" => (
            MatchType::Regex(parse::regex(&value).at(format!("{f}.path.value"))?),
            1,
        ),
        "PathPrefix" => {
            if !value.starts_with('/') {
                return bad(
                    format!("{f}.path.value"),
                    Invalid::Bad(format!("path prefix `{value}` must start with `/`")),
                );
            }
            let trimmed = if value.len() > 1 {
                value.trim_end_matches('/').to_string()
            } else {
                value.clone()
            };
            let trimmed = if trimmed.is_empty() {
                "/".into()
            } else {
                trimmed
            };
            (MatchType::PathPrefix(trimmed), 2)
        }
        other => {
            return bad(
                format!("{f}.path.type"),
                Invalid::Bad(format!(
                    "unknown path match type `{other}` (Exact, PathPrefix, RegularExpression)"
                )),
            );
        }
    };
    let path_len = value.len();
    let name_match =
        |n: &types::GwNameMatch, field: String| -> Result<l7::StringMatch, FieldError> {
            match n.kind.as_deref().unwrap_or("Exact") {
                "Exact" => Ok(parse::exact(n.value.clone())),
                "RegularExpression" => Ok(l7::StringMatch {
                    match_type: Some(MatchType::Regex(
                        parse::regex(&n.value).at(format!("{field}.value"))?,
                    )),
                    ignore_case: false,
                }),
                other => bad(
                    format!("{field}.type"),
                    Invalid::Bad(format!(
                        "unknown match type `{other}` (Exact, RegularExpression)"
                    )),
                ),
            }
        };
    let mut headers = Vec::new();
    for (k, h) in m.headers.iter().enumerate() {
        let hf = format!("{f}.headers[{k}]");
        if h.name.is_empty() {
            return bad(format!("{hf}.name"), Invalid::Required("header name"));
        }
        headers.push(l7::HeaderMatch {
            name: h.name.to_ascii_lowercase(),
            value: Some(name_match(h, hf)?),
            invert: false,
        });
    }
    let mut query_params = Vec::new();
    for (k, q) in m.query_params.iter().enumerate() {
        let qf = format!("{f}.queryParams[{k}]");
        if q.name.is_empty() {
            return bad(
                format!("{qf}.name"),
                Invalid::Required("query parameter name"),
            );
        }
        query_params.push(l7::QueryParamMatch {
            name: q.name.clone(),
            value: Some(name_match(q, qf)?),
        });
    }
    Ok((
        l7::HttpMatch {
            path: Some(l7::StringMatch {
                match_type: Some(mt),
                ignore_case: false,
            }),
            headers,
            method: m.method.as_ref().map(|v| parse::exact(v.clone())),
            query_params,
            ..Default::default()
        },
        rank,
        path_len,
    ))
}

fn header_modifier(h: &types::GwHeaderModifier) -> l7::HeaderOps {
    let hdr = |v: &[types::GwHeader]| {
        v.iter()
            .map(|h| l7::Header {
                name: h.name.to_ascii_lowercase(),
                value: h.value.clone(),
            })
            .collect()
    };
    l7::HeaderOps {
        set: hdr(&h.set),
        add: hdr(&h.add),
        remove: h.remove.iter().map(|r| r.to_ascii_lowercase()).collect(),
    }
}

/// Merge `b` into `a` (several modifier filters of the same type).
fn merge_ops(a: &mut Option<l7::HeaderOps>, b: l7::HeaderOps) {
    let a = a.get_or_insert_with(Default::default);
    a.set.extend(b.set);
    a.add.extend(b.add);
    a.remove.extend(b.remove);
}

/// A Gateway API backendRef → destination host (weight/port filled by the caller).
fn backend_host(
    cx: &Cx<'_>,
    key: &ObjectKey,
    b: &types::GwBackendRef,
    f: &str,
) -> Result<String, FieldError> {
    let group = b.group.as_deref().unwrap_or("");
    let kind = b.kind.as_deref().unwrap_or("Service");
    let ns = b.namespace.as_deref().unwrap_or(&key.namespace);
    if b.name.is_empty() {
        return bad(format!("{f}.name"), Invalid::Required("backend name"));
    }
    match (group, kind) {
        ("" | "core", "Service") => Ok(format!(
            "{}.{ns}.{}",
            b.name.to_ascii_lowercase(),
            parse::CLUSTER_DOMAIN
        )),
        ("networking.istio.io", "Hostname") => Ok(b.name.to_ascii_lowercase()),
        ("networking.istio.io", "ServiceEntry") => cx
            .snap
            .get(&ObjectKey::new("ServiceEntry", ns, &b.name))
            .and_then(|se| se.get("spec").cloned())
            .and_then(|s| serde_json::from_value::<types::ServiceEntrySpec>(s).ok())
            .and_then(|s| s.hosts.into_iter().next())
            .map(|h| h.to_ascii_lowercase())
            .ok_or_else(|| FieldError {
                field: format!("{f}.name"),
                reason: Invalid::Bad(format!(
                    "ServiceEntry {ns}/{} not found or has no hosts",
                    b.name
                )),
            }),
        _ => bad(
            format!("{f}.kind"),
            Invalid::Unsupported(format!(
                "backend kind `{kind}` (group `{group}`) is not supported (Service, networking.istio.io Hostname or ServiceEntry)"
            )),
        ),
    }
}

/// Everything of an HTTPRoute rule except its matches.
fn rule_base(
    cx: &Cx<'_>,
    key: &ObjectKey,
    rule: &types::GwHttpRouteRule,
    f: &str,
) -> Result<l7::HttpRoute, FieldError> {
    use l7::http_route::Action;
    let mut r = l7::HttpRoute::default();
    let mut redirect = None;
    for (k, flt) in rule.filters.iter().enumerate() {
        let ff = format!("{f}.filters[{k}]");
        let missing = || FieldError {
            field: ff.clone(),
            reason: Invalid::Bad(format!(
                "filter of type `{}` has no configuration",
                flt.kind
            )),
        };
        match flt.kind.as_str() {
            "RequestHeaderModifier" => {
                let h = flt.request_header_modifier.as_ref().ok_or_else(missing)?;
                merge_ops(&mut r.request_headers, header_modifier(h));
            }
            "ResponseHeaderModifier" => {
                let h = flt.response_header_modifier.as_ref().ok_or_else(missing)?;
                merge_ops(&mut r.response_headers, header_modifier(h));
            }
            "URLRewrite" => {
                let u = flt.url_rewrite.as_ref().ok_or_else(missing)?;
                r.rewrite = Some(l7::Rewrite {
                    path_rewrite: u
                        .path
                        .as_ref()
                        .map(|p| path_modifier(p, &format!("{ff}.urlRewrite.path")))
                        .transpose()?
                        .map(|(full, v)| {
                            if full {
                                l7::rewrite::PathRewrite::FullPath(v)
                            } else {
                                l7::rewrite::PathRewrite::Prefix(v)
                            }
                        }),
                    authority: u.hostname.clone().unwrap_or_default(),
                });
            }
            "RequestRedirect" => {
                let rd = flt.request_redirect.as_ref().ok_or_else(missing)?;
                let code = rd.status_code.unwrap_or(302);
                if ![301, 302, 303, 307, 308].contains(&code) {
                    return bad(
                        format!("{ff}.requestRedirect.statusCode"),
                        Invalid::Bad(format!(
                            "{code} is not a redirect status (301, 302, 303, 307, 308)"
                        )),
                    );
                }
                redirect = Some(l7::Redirect {
                    scheme: rd.scheme.clone().unwrap_or_default(),
                    authority: rd.hostname.clone().unwrap_or_default(),
                    port: parse::opt_port(rd.port).at(format!("{ff}.requestRedirect.port"))?,
                    path_rewrite: rd
                        .path
                        .as_ref()
                        .map(|p| path_modifier(p, &format!("{ff}.requestRedirect.path")))
                        .transpose()?
                        .map(|(full, v)| {
                            if full {
                                l7::redirect::PathRewrite::FullPath(v)
                            } else {
                                l7::redirect::PathRewrite::Prefix(v)
                            }
                        }),
                    status_code: code,
                });
            }
            "RequestMirror" => {
                let m = flt.request_mirror.as_ref().ok_or_else(missing)?;
                let mf = format!("{ff}.requestMirror");
                let percentage = match (m.percent, &m.fraction) {
                    (Some(p), _) => parse::percent(p as f64).at(format!("{mf}.percent"))?,
                    (None, Some(fr)) => {
                        let den = fr.denominator.unwrap_or(100);
                        if den <= 0 || fr.numerator < 0 || fr.numerator > den {
                            return bad(
                                format!("{mf}.fraction"),
                                Invalid::Bad(
                                    "numerator must be within 0..=denominator, denominator > 0"
                                        .into(),
                                ),
                            );
                        }
                        fr.numerator as f64 * 100.0 / den as f64
                    }
                    (None, None) => 100.0,
                };
                r.mirrors.push(l7::Mirror {
                    destination: Some(l7::RouteDestination {
                        host: backend_host(cx, key, &m.backend_ref, &format!("{mf}.backendRef"))?,
                        port: parse::opt_port(m.backend_ref.port)
                            .at(format!("{mf}.backendRef.port"))?,
                        ..Default::default()
                    }),
                    percentage,
                });
            }
            other => {
                return bad(
                    format!("{ff}.type"),
                    Invalid::Unsupported(format!(
                        "filter type `{other}` is not supported (RequestHeaderModifier, ResponseHeaderModifier, URLRewrite, RequestRedirect, RequestMirror)"
                    )),
                );
            }
        }
    }
    let action = if let Some(rd) = redirect {
        Action::Redirect(rd)
    } else {
        let bf = format!("{f}.backendRefs");
        let mut destinations = Vec::new();
        for (k, b) in rule.backend_refs.iter().enumerate() {
            let df = format!("{bf}[{k}]");
            let weight =
                parse::count("weight", b.weight.unwrap_or(1)).at(format!("{df}.weight"))?;
            let mut d = l7::RouteDestination {
                host: backend_host(cx, key, b, &df)?,
                subset: String::new(),
                port: parse::opt_port(b.port).at(format!("{df}.port"))?,
                weight,
                request_headers: None,
                response_headers: None,
            };
            for (n, flt) in b.filters.iter().enumerate() {
                let ff = format!("{df}.filters[{n}]");
                match (
                    flt.kind.as_str(),
                    &flt.request_header_modifier,
                    &flt.response_header_modifier,
                ) {
                    ("RequestHeaderModifier", Some(h), _) => {
                        merge_ops(&mut d.request_headers, header_modifier(h))
                    }
                    ("ResponseHeaderModifier", _, Some(h)) => {
                        merge_ops(&mut d.response_headers, header_modifier(h))
                    }
                    (other, _, _) => {
                        return bad(
                            format!("{ff}.type"),
                            Invalid::Unsupported(format!(
                                "backendRef filter `{other}` is not supported here (RequestHeaderModifier, ResponseHeaderModifier with their configuration)"
                            )),
                        );
                    }
                }
            }
            destinations.push(d);
        }
        if destinations.iter().all(|d| d.weight == 0) {
            // Gateway API: no (usable) backend → 500.
            Action::DirectResponse(l7::DirectResponse {
                status: 500,
                body: Vec::new(),
            })
        } else {
            Action::Forward(l7::Forward { destinations })
        }
    };
    let forwards = matches!(action, Action::Forward(_));
    r.action = Some(action);
    // Retries only make sense when forwarding (not for redirects / direct responses).
    let mut retries = forwards.then(default_retries);
    if let Some(rt) = &rule.retry {
        let rf = format!("{f}.retry");
        let attempts =
            parse::count("attempts", rt.attempts.unwrap_or(2)).at(format!("{rf}.attempts"))?;
        retries = if attempts == 0 || !forwards {
            None
        } else {
            let mut codes = Vec::new();
            for (k, c) in rt.codes.iter().enumerate() {
                codes.push(
                    parse::http_status("retry code", i64::from(*c))
                        .at(format!("{rf}.codes[{k}]"))?,
                );
            }
            let mut p = default_retries();
            p.attempts = attempts;
            if !codes.is_empty() {
                p.retry_on = vec!["retriable-status-codes".into()];
                p.retriable_status_codes = codes;
            }
            p.backoff = rt
                .backoff
                .as_deref()
                .map(parse::duration)
                .transpose()
                .at(format!("{rf}.backoff"))?;
            Some(p)
        };
    }
    if let Some(t) = &rule.timeouts {
        let tf = format!("{f}.timeouts");
        r.timeout = t
            .request
            .as_deref()
            .map(parse::nonzero_duration)
            .transpose()
            .at(format!("{tf}.request"))?
            .flatten();
        let per_try = t
            .backend_request
            .as_deref()
            .map(parse::nonzero_duration)
            .transpose()
            .at(format!("{tf}.backendRequest"))?
            .flatten();
        if let (Some(p), Some(rp)) = (per_try, retries.as_mut()) {
            rp.per_try_timeout = Some(p);
        }
    }
    r.retries = retries;
    Ok(r)
}

/// (is full path, value) of an HTTPPathModifier.
fn path_modifier(p: &types::GwPathModifier, f: &str) -> Result<(bool, String), FieldError> {
    match (
        p.kind.as_str(),
        &p.replace_full_path,
        &p.replace_prefix_match,
    ) {
        ("ReplaceFullPath", Some(v), _) => Ok((true, v.clone())),
        ("ReplacePrefixMatch", _, Some(v)) => Ok((false, v.clone())),
        (other, _, _) => bad(
            format!("{f}.type"),
            Invalid::Bad(format!(
                "path modifier `{other}` needs its value (ReplaceFullPath + replaceFullPath, ReplacePrefixMatch + replacePrefixMatch)"
            )),
        ),
    }
}

pub(super) fn tcp_routes(cx: &mut Cx<'_>) {
    for (key, _obj, spec) in cx.objects::<types::GwTcpRouteSpec>("TCPRoute", TCPROUTE_VERSIONS) {
        let Some(parents) = service_parents(cx, &key, &spec.parent_refs) else {
            continue;
        };
        let routes = match tcp_route(cx, &key, &spec) {
            Ok(r) => r,
            Err(e) => {
                cx.report(&key, e);
                continue;
            }
        };
        for (host, port) in parents {
            let b = cx.service(&host, &key.namespace);
            for r in &routes {
                let mut r = r.clone();
                if port != 0 {
                    r.matches = vec![l7::TcpMatch {
                        port,
                        ..Default::default()
                    }];
                }
                b.gw_tcp.push(r);
            }
            b.sources.insert(key.to_string());
        }
    }
}

fn tcp_route(
    cx: &Cx<'_>,
    key: &ObjectKey,
    spec: &types::GwTcpRouteSpec,
) -> Result<Vec<l7::TcpRoute>, FieldError> {
    let mut out = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let bf = format!("spec.rules[{i}].backendRefs");
        if rule.backend_refs.is_empty() {
            return bad(bf, Invalid::Required("at least one backendRef"));
        }
        let mut destinations = Vec::new();
        for (k, b) in rule.backend_refs.iter().enumerate() {
            let df = format!("{bf}[{k}]");
            destinations.push(l7::RouteDestination {
                host: backend_host(cx, key, b, &df)?,
                port: parse::opt_port(b.port).at(format!("{df}.port"))?,
                weight: parse::count("weight", b.weight.unwrap_or(1)).at(format!("{df}.weight"))?,
                ..Default::default()
            });
        }
        if destinations.iter().all(|d| d.weight == 0) {
            return bad(
                bf,
                Invalid::Bad("the total weight of the backends is 0".into()),
            );
        }
        out.push(l7::TcpRoute {
            name: format!(
                "{}/{}/{}",
                key.namespace,
                key.name,
                rule.name.clone().unwrap_or_else(|| format!("rule-{i}"))
            ),
            matches: Vec::new(),
            destinations,
        });
    }
    Ok(out)
}
