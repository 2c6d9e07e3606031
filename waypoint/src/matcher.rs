//! Request matching: `StringMatch`, `HttpMatch`, `TcpMatch` and L7 authorization evaluation
//! (Istio semantics: DENY before ALLOW; no applicable ALLOW ⇒ allow).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock, PoisonError, RwLock};

use http::HeaderMap;
use regex::{Regex, RegexBuilder};
use zmesh_proto::l7::{self, string_match::MatchType};

/// What a matcher can see about one request.
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub authority: &'a str,
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
    /// Service port the request arrived on.
    pub port: u16,
    pub source_principal: Option<String>,
    pub source_namespace: Option<String>,
    pub source_ip: Option<IpAddr>,
    pub destination_ip: Option<IpAddr>,
}

/// Does `v` match `m`? A matcher without a type matches any present value.
pub fn string_matches(m: &l7::StringMatch, v: &str) -> bool {
    let ic = m.ignore_case;
    let eq = |a: &str, b: &str| {
        if ic {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    };
    match &m.match_type {
        None => true,
        Some(MatchType::Exact(e)) => eq(e, v),
        Some(MatchType::Prefix(p)) => {
            v.len() >= p.len() && v.is_char_boundary(p.len()) && eq(&v[..p.len()], p)
        }
        Some(MatchType::Suffix(s)) => {
            v.len() >= s.len()
                && v.is_char_boundary(v.len() - s.len())
                && eq(&v[v.len() - s.len()..], s)
        }
        Some(MatchType::Regex(r)) => regex_full_match(r, v),
        Some(MatchType::Present(p)) => *p,
        Some(MatchType::PathPrefix(p)) => {
            if p == "/" || p.is_empty() {
                return true;
            }
            let ok = v.len() >= p.len() && v.is_char_boundary(p.len()) && eq(&v[..p.len()], p);
            ok && (v.len() == p.len() || v.as_bytes()[p.len()] == b'/')
        }
    }
}

fn regex_full_match(pattern: &str, v: &str) -> bool {
    // Anchored as in Istio. An invalid pattern (the controller validates them) matches nothing.
    ANCHORED.get(pattern).is_some_and(|re| re.is_match(v))
}

/// Compiled regexes by pattern. Route and policy regexes come from config and are evaluated
/// per request: compiling one costs tens of microseconds, a lookup here a hash and a read
/// lock. Bounded: when full it starts over (which also drops patterns of replaced configs).
pub struct RegexCache {
    /// Match whole values (`^(?:pattern)$`), as Istio's `regex` matchers do.
    anchored: bool,
    map: RwLock<HashMap<String, Option<Arc<Regex>>>>,
}

/// Most distinct patterns kept; far more than a real mesh's routes use.
const REGEX_CACHE_MAX: usize = 4096;

/// Full-value matchers (`StringMatch.regex`).
pub static ANCHORED: LazyLock<RegexCache> = LazyLock::new(|| RegexCache::new(true));
/// Search-and-replace patterns (`rewrite.uriRegexRewrite`).
pub static UNANCHORED: LazyLock<RegexCache> = LazyLock::new(|| RegexCache::new(false));

impl RegexCache {
    fn new(anchored: bool) -> RegexCache {
        RegexCache {
            anchored,
            map: RwLock::new(HashMap::new()),
        }
    }

    /// The compiled `pattern`, or None when it does not compile.
    pub fn get(&self, pattern: &str) -> Option<Arc<Regex>> {
        if let Some(hit) = self
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(pattern)
        {
            return hit.clone();
        }
        let compiled = self.build(pattern).ok().map(Arc::new);
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= REGEX_CACHE_MAX {
            map.clear();
        }
        map.insert(pattern.to_string(), compiled.clone());
        compiled
    }

    /// Why `pattern` does not compile (for the NACK of the resource holding it), or Ok.
    pub fn check(&self, pattern: &str) -> Result<(), String> {
        match self.get(pattern) {
            Some(_) => Ok(()),
            None => self.build(pattern).map(|_| ()).map_err(|e| {
                // The last line of regex's multi-line message says what is wrong.
                e.to_string()
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            }),
        }
    }

    fn build(&self, pattern: &str) -> Result<Regex, regex::Error> {
        let full;
        let source = if self.anchored {
            full = format!("^(?:{pattern})$");
            &full
        } else {
            pattern
        };
        build_regex(source)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

fn build_regex(source: &str) -> Result<Regex, regex::Error> {
    // The controller's validation limit: a pattern it accepted compiles here too.
    RegexBuilder::new(source).size_limit(1 << 20).build()
}

/// `pattern` compiled as a full-value matcher (`StringMatch.regex`), exactly as the cache
/// compiles it, for matchers compiled once when their config is applied (CORS origins) rather
/// than looked up per request.
pub fn compile_full_match(pattern: &str) -> Result<Regex, regex::Error> {
    build_regex(&format!("^(?:{pattern})$"))
}

fn header_value<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn query_param<'a>(q: Option<&'a str>, name: &str) -> Option<&'a str> {
    q?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

pub fn http_match(m: &l7::HttpMatch, r: &RequestView<'_>) -> bool {
    if let Some(p) = &m.path
        && !string_matches(p, r.path)
    {
        return false;
    }
    if let Some(meth) = &m.method
        && !string_matches(meth, r.method)
    {
        return false;
    }
    if let Some(a) = &m.authority
        && !string_matches(a, r.authority)
    {
        return false;
    }
    if let Some(s) = &m.scheme
        && !string_matches(s, r.scheme)
    {
        return false;
    }
    if m.port != 0 && m.port != u32::from(r.port) {
        return false;
    }
    if !m.source_namespace.is_empty()
        && r.source_namespace.as_deref() != Some(m.source_namespace.as_str())
    {
        return false;
    }
    for h in &m.headers {
        let v = header_value(r.headers, &h.name);
        let matched = match (&h.value, v) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(sm), Some(v)) => string_matches(sm, v),
        };
        if matched == h.invert {
            return false;
        }
    }
    for q in &m.query_params {
        let Some(v) = query_param(r.query, &q.name) else {
            return false;
        };
        if let Some(sm) = &q.value
            && !string_matches(sm, v)
        {
            return false;
        }
    }
    true
}

/// The first route whose matches select the request (no matches = match all).
pub fn select_route<'a>(
    routes: &'a [l7::HttpRoute],
    r: &RequestView<'_>,
) -> Option<&'a l7::HttpRoute> {
    routes
        .iter()
        .find(|rt| rt.matches.is_empty() || rt.matches.iter().any(|m| http_match(m, r)))
}

pub fn tcp_match(m: &l7::TcpMatch, port: u16, dst: Option<IpAddr>, src_ns: Option<&str>) -> bool {
    if m.port != 0 && m.port != u32::from(port) {
        return false;
    }
    if !m.source_namespace.is_empty() && src_ns != Some(m.source_namespace.as_str()) {
        return false;
    }
    if !m.destination_subnets.is_empty() {
        let Some(ip) = dst else { return false };
        if !m
            .destination_subnets
            .iter()
            .filter_map(|s| s.parse::<ipnet::IpNet>().ok())
            .any(|n| n.contains(&ip))
        {
            return false;
        }
    }
    true
}

fn any_match(ms: &[l7::StringMatch], v: Option<&str>) -> bool {
    v.is_some_and(|v| ms.iter().any(|m| string_matches(m, v)))
}

fn in_cidrs(cidrs: &[String], ip: Option<IpAddr>) -> bool {
    ip.is_some_and(|ip| {
        cidrs
            .iter()
            .filter_map(|c| c.parse::<ipnet::IpNet>().ok())
            .any(|n| n.contains(&ip))
    })
}

fn source_matches(s: &l7::Source, r: &RequestView<'_>) -> bool {
    let p = r.source_principal.as_deref();
    let ns = r.source_namespace.as_deref();
    (s.principals.is_empty() || any_match(&s.principals, p))
        && (s.not_principals.is_empty() || !any_match(&s.not_principals, p))
        && (s.namespaces.is_empty() || any_match(&s.namespaces, ns))
        && (s.not_namespaces.is_empty() || !any_match(&s.not_namespaces, ns))
        && (s.ip_blocks.is_empty() || in_cidrs(&s.ip_blocks, r.source_ip))
        && (s.not_ip_blocks.is_empty() || !in_cidrs(&s.not_ip_blocks, r.source_ip))
        // remoteIpBlocks: X-Forwarded-For's first entry, else the peer.
        && (s.remote_ip_blocks.is_empty() || in_cidrs(&s.remote_ip_blocks, remote_ip(r)))
        && (s.not_remote_ip_blocks.is_empty() || !in_cidrs(&s.not_remote_ip_blocks, remote_ip(r)))
        // No JWT support: a request principal never matches (fail closed for ALLOW).
        && s.request_principals.is_empty()
}

fn remote_ip(r: &RequestView<'_>) -> Option<IpAddr> {
    header_value(r.headers, "x-forwarded-for")
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.trim().parse().ok())
        .or(r.source_ip)
}

fn operation_matches(o: &l7::Operation, r: &RequestView<'_>) -> bool {
    let port = u32::from(r.port);
    (o.hosts.is_empty() || any_match(&o.hosts, Some(r.authority)))
        && (o.not_hosts.is_empty() || !any_match(&o.not_hosts, Some(r.authority)))
        && (o.ports.is_empty() || o.ports.contains(&port))
        && (o.not_ports.is_empty() || !o.not_ports.contains(&port))
        && (o.methods.is_empty() || any_match(&o.methods, Some(r.method)))
        && (o.not_methods.is_empty() || !any_match(&o.not_methods, Some(r.method)))
        && (o.paths.is_empty() || any_match(&o.paths, Some(r.path)))
        && (o.not_paths.is_empty() || !any_match(&o.not_paths, Some(r.path)))
}

fn condition_matches(c: &l7::Condition, r: &RequestView<'_>) -> bool {
    use l7::condition::Key;
    let ip_str = |ip: Option<IpAddr>| ip.map(|i| i.to_string());
    let cidr_match = |ms: &[l7::StringMatch], ip: Option<IpAddr>| {
        ms.iter().any(|m| match &m.match_type {
            Some(MatchType::Exact(c)) => in_cidrs(std::slice::from_ref(c), ip),
            _ => false,
        })
    };
    let key = Key::try_from(c.key).unwrap_or(Key::Unspecified);
    let value: Option<String> = match key {
        Key::RequestHeader => header_value(r.headers, &c.header).map(str::to_string),
        Key::SourceNamespace => r.source_namespace.clone(),
        Key::SourcePrincipal => r.source_principal.clone(),
        Key::DestinationPort => Some(r.port.to_string()),
        Key::SourceIp | Key::RemoteIp | Key::DestinationIp => {
            let ip = match key {
                Key::SourceIp => r.source_ip,
                Key::RemoteIp => remote_ip(r),
                _ => r.destination_ip,
            };
            let yes = c.values.is_empty() || cidr_match(&c.values, ip);
            let no = !c.not_values.is_empty() && cidr_match(&c.not_values, ip);
            return ip_str(ip).is_some() && yes && !no;
        }
        // Not available at this waypoint: the condition cannot hold.
        Key::ConnectionSni | Key::RequestAuthPrincipal | Key::Unspecified => None,
    };
    let yes = c.values.is_empty() || any_match(&c.values, value.as_deref());
    let no = !c.not_values.is_empty() && any_match(&c.not_values, value.as_deref());
    value.is_some() && yes && !no
}

fn rule_matches(rule: &l7::AuthzRule, r: &RequestView<'_>) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, r)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, r)))
        && rule.when.iter().all(|c| condition_matches(c, r))
}

/// Does policy `p` apply to traffic for `service_host` through waypoint `(wp_ns, wp_name)`?
pub fn policy_applies(
    p: &l7::Authorization,
    service_host: &str,
    wp_ns: &str,
    wp_name: &str,
) -> bool {
    use l7::policy_target::Kind;
    p.targets.iter().any(|t| match Kind::try_from(t.kind) {
        Ok(Kind::Gateway) => t.name == wp_name && t.namespace == wp_ns,
        Ok(Kind::Service) => t.hostname == service_host,
        _ => false,
    })
}

/// Outcome of L7 authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthzDecision {
    Allow,
    Deny { policy: String },
}

/// Evaluate `policies` (already filtered to those that apply) for one request.
pub fn authorize<'a>(
    policies: impl Iterator<Item = &'a l7::Authorization> + Clone,
    r: &RequestView<'_>,
) -> AuthzDecision {
    let matches = |p: &l7::Authorization| p.rules.iter().any(|rule| rule_matches(rule, r));
    let name = |p: &l7::Authorization| format!("{}/{}", p.namespace, p.name);
    for p in policies.clone() {
        if p.action == l7::Action::Deny as i32 && matches(p) {
            if p.dry_run {
                tracing::info!(policy = %name(p), "dry-run DENY policy would deny this request");
                continue;
            }
            return AuthzDecision::Deny { policy: name(p) };
        }
    }
    let allows: Vec<&l7::Authorization> = policies
        .filter(|p| p.action == l7::Action::Allow as i32 && !p.dry_run)
        .collect();
    if allows.is_empty() || allows.iter().any(|p| matches(p)) {
        AuthzDecision::Allow
    } else {
        AuthzDecision::Deny {
            policy: "no ALLOW policy matched".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regexes_compile_once_and_bad_ones_match_nothing() {
        let cache = RegexCache::new(true);
        let re = cache.get("/api/v[0-9]+").expect("compiles");
        assert!(
            re.is_match("/api/v2") && !re.is_match("/api/v2/x"),
            "anchored"
        );
        let again = cache.get("/api/v[0-9]+").expect("cached");
        assert!(Arc::ptr_eq(&re, &again), "compiled once");
        assert!(cache.get("([unclosed").is_none());
        assert!(
            cache.get("([unclosed").is_none(),
            "the failure is cached too"
        );
        assert_eq!(cache.len(), 2);
        let raw = RegexCache::new(false);
        assert!(raw.get("v[0-9]").expect("compiles").is_match("/api/v2/x"));
        for i in 0..REGEX_CACHE_MAX + 10 {
            raw.get(&format!("p{i}"));
        }
        assert!(raw.len() <= REGEX_CACHE_MAX, "bounded");
    }

    fn sm(t: MatchType) -> l7::StringMatch {
        l7::StringMatch {
            match_type: Some(t),
            ignore_case: false,
        }
    }

    #[test]
    fn string_matchers() {
        assert!(string_matches(&sm(MatchType::Exact("a".into())), "a"));
        assert!(!string_matches(&sm(MatchType::Exact("a".into())), "ab"));
        assert!(string_matches(&sm(MatchType::Prefix("/a".into())), "/ab"));
        assert!(string_matches(&sm(MatchType::Suffix("b".into())), "/ab"));
        assert!(string_matches(&sm(MatchType::Regex("/a.*".into())), "/abc"));
        assert!(!string_matches(&sm(MatchType::Regex("a".into())), "ba"));
        assert!(string_matches(
            &sm(MatchType::PathPrefix("/foo".into())),
            "/foo/bar"
        ));
        assert!(!string_matches(
            &sm(MatchType::PathPrefix("/foo".into())),
            "/foobar"
        ));
        // Multi-byte input never panics.
        assert!(!string_matches(&sm(MatchType::Prefix("ab".into())), "é"));
        assert!(!string_matches(&sm(MatchType::Suffix("ab".into())), "é"));
    }
}
