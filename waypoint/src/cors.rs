//! VirtualService `corsPolicy` (`l7::CorsPolicy` on a route), with the semantics of Envoy's CORS
//! filter as Istio configures it:
//!
//! - A request without a (non-empty) `Origin` is not a CORS request: untouched.
//! - A preflight (`OPTIONS` with `Origin` and a non-empty `Access-Control-Request-Method`) from
//!   an allowed origin is answered here with 200 and `access-control-allow-origin` (the
//!   request's origin), `-allow-methods`, `-allow-headers`, `-max-age` and
//!   `-allow-credentials: true` as configured; it never reaches the upstream. From any other
//!   origin it is forwarded (`unmatchedPreflights: FORWARD`, the default) or answered 200
//!   without `access-control-allow-origin` (`IGNORE`; Envoy still adds the other preflight
//!   headers, so do we).
//! - Any other request from an allowed origin is forwarded, and whatever answers it gets
//!   `access-control-allow-origin`, `-expose-headers` and `-allow-credentials`. From any other
//!   origin: forwarded untouched.
//!
//! An origin is allowed when a matcher matches it or matches the literal `*` (Envoy's rule:
//! `exact: "*"` allows every origin, and the answer still names the request's origin, not `*`).
//! Istio joins the lists with `,` and sends `maxAge` in whole seconds; a list that is exactly
//! `*` echoes the request's `Access-Control-Request-Method`/`-Headers`, as Envoy does.
//!
//! Policies are compiled when their `ServiceConfig` is applied ([`CorsIndex::rebuild`], called
//! by the store): origin regexes are compiled then, never per request, and a policy part that
//! cannot be used (a regex that does not compile, a value that is not a valid header value) is
//! logged once and left out (an origin matcher that matches nothing) rather than failing the
//! config.

use std::collections::HashMap;
use std::sync::Arc;

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, HeaderName, ORIGIN,
};
use http::{HeaderMap, HeaderValue, Method};
use regex::Regex;
use zmesh_proto::l7::{self, cors_policy::UnmatchedPreflights, string_match::MatchType};

use crate::matcher;

/// A part of a CORS policy the waypoint cannot use (the controller validates policies, so this
/// means a controller bug or a config not from our controller).
#[derive(Debug, thiserror::Error)]
pub enum CorsError {
    #[error(
        "CORS allowOrigins regex `{pattern}` does not compile ({source}); it matches no origin"
    )]
    Regex {
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("CORS {field} `{value}` is not a valid header value; the header is left out")]
    HeaderValue { field: &'static str, value: String },
}

/// How one route's policy answers one request.
#[derive(Debug)]
pub enum Decision {
    /// Not a CORS request, or from an origin the policy does not allow: nothing to do.
    Pass,
    /// A preflight answered by the waypoint: 200 with these headers, not forwarded.
    Preflight(HeaderMap),
    /// Forward; the response gets these headers.
    Respond(ResponseHeaders),
}

/// The headers an allowed cross-origin request's response gets (Envoy's `encodeHeaders`).
#[derive(Debug)]
pub struct ResponseHeaders {
    origin: HeaderValue,
    policy: Arc<CorsPolicy>,
}

impl ResponseHeaders {
    /// Set on any response: upstream or local (fault abort, rate limit, upstream error), and
    /// over the upstream's own values, as Envoy does.
    pub fn apply(&self, h: &mut HeaderMap) {
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, self.origin.clone());
        if self.policy.allow_credentials {
            h.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = &self.policy.expose_headers {
            h.insert(ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }
}

#[derive(Debug)]
enum OriginMatcher {
    /// exact / prefix / suffix (with `ignore_case`): `matcher::string_matches`.
    Plain(l7::StringMatch),
    /// Full-value regex, compiled when the config was applied.
    Regex(Regex),
    /// A regex that did not compile, or a matcher kind that names no origin (Istio drops a
    /// `StringMatch` without exact/prefix/regex, so it allows nothing rather than everything).
    Never,
}

impl OriginMatcher {
    fn matches(&self, v: &str) -> bool {
        match self {
            OriginMatcher::Plain(m) => matcher::string_matches(m, v),
            OriginMatcher::Regex(re) => re.is_match(v),
            OriginMatcher::Never => false,
        }
    }
}

/// `Access-Control-Allow-Methods` / `-Headers` of a preflight answer.
#[derive(Debug)]
enum ListHeader {
    Absent,
    Value(HeaderValue),
    /// The list is `*`: echo the request's `Access-Control-Request-*` header.
    Echo,
}

/// One route's `corsPolicy`, compiled.
#[derive(Debug)]
pub struct CorsPolicy {
    origins: Vec<OriginMatcher>,
    allow_methods: ListHeader,
    allow_headers: ListHeader,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    allow_credentials: bool,
    forward_unmatched_preflights: bool,
}

fn header_value(
    field: &'static str,
    value: String,
    errors: &mut Vec<CorsError>,
) -> Option<HeaderValue> {
    match HeaderValue::try_from(value.as_str()) {
        Ok(v) => Some(v),
        Err(_) => {
            errors.push(CorsError::HeaderValue { field, value });
            None
        }
    }
}

fn list_header(field: &'static str, items: &[String], errors: &mut Vec<CorsError>) -> ListHeader {
    let joined = items.join(",");
    match joined.as_str() {
        "" => ListHeader::Absent,
        "*" => ListHeader::Echo,
        _ => header_value(field, joined, errors).map_or(ListHeader::Absent, ListHeader::Value),
    }
}

impl CorsPolicy {
    /// Compile `p`. Parts that cannot be used are left out and reported in the second value.
    pub fn compile(p: &l7::CorsPolicy) -> (CorsPolicy, Vec<CorsError>) {
        let mut errors = Vec::new();
        let origins = p
            .allow_origins
            .iter()
            .map(|m| match &m.match_type {
                Some(MatchType::Exact(_) | MatchType::Prefix(_) | MatchType::Suffix(_)) => {
                    OriginMatcher::Plain(m.clone())
                }
                Some(MatchType::Regex(pattern)) => match matcher::compile_full_match(pattern) {
                    Ok(re) => OriginMatcher::Regex(re),
                    Err(source) => {
                        errors.push(CorsError::Regex {
                            pattern: pattern.clone(),
                            source,
                        });
                        OriginMatcher::Never
                    }
                },
                _ => OriginMatcher::Never,
            })
            .collect();
        let allow_methods = list_header("allowMethods", &p.allow_methods, &mut errors);
        let allow_headers = list_header("allowHeaders", &p.allow_headers, &mut errors);
        let expose_headers = match p.expose_headers.join(",") {
            e if e.is_empty() => None,
            e => header_value("exposeHeaders", e, &mut errors),
        };
        // Istio: whole seconds (`maxAge: 0s` is sent as "0").
        let max_age = p.max_age.map(|d| HeaderValue::from(d.seconds.max(0)));
        let policy = CorsPolicy {
            origins,
            allow_methods,
            allow_headers,
            expose_headers,
            max_age,
            allow_credentials: p.allow_credentials,
            forward_unmatched_preflights: p.unmatched_preflights
                != UnmatchedPreflights::Ignore as i32,
        };
        (policy, errors)
    }

    fn origin_allowed(&self, origin: &HeaderValue) -> bool {
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        self.origins
            .iter()
            .any(|m| m.matches("*") || m.matches(origin))
    }
}

fn non_empty<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    h.get(name).filter(|v| !v.is_empty())
}

/// What `policy` does with a request of `method` with `headers`.
pub fn evaluate(policy: &Arc<CorsPolicy>, method: &Method, headers: &HeaderMap) -> Decision {
    let Some(origin) = non_empty(headers, &ORIGIN) else {
        return Decision::Pass;
    };
    let allowed = policy.origin_allowed(origin);
    let request_method = non_empty(headers, &ACCESS_CONTROL_REQUEST_METHOD);
    let preflight = method == Method::OPTIONS && request_method.is_some();
    if !preflight {
        return if allowed {
            Decision::Respond(ResponseHeaders {
                origin: origin.clone(),
                policy: policy.clone(),
            })
        } else {
            Decision::Pass
        };
    }
    if !allowed && policy.forward_unmatched_preflights {
        return Decision::Pass;
    }
    let mut h = HeaderMap::new();
    if allowed {
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    }
    if policy.allow_credentials {
        h.insert(
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    let echo = |name: &HeaderName| {
        headers
            .get(name)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static(""))
    };
    match &policy.allow_methods {
        ListHeader::Absent => {}
        ListHeader::Value(v) => {
            h.insert(ACCESS_CONTROL_ALLOW_METHODS, v.clone());
        }
        ListHeader::Echo => {
            h.insert(
                ACCESS_CONTROL_ALLOW_METHODS,
                echo(&ACCESS_CONTROL_REQUEST_METHOD),
            );
        }
    }
    match &policy.allow_headers {
        ListHeader::Absent => {}
        ListHeader::Value(v) => {
            h.insert(ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
        }
        ListHeader::Echo => {
            h.insert(
                ACCESS_CONTROL_ALLOW_HEADERS,
                echo(&ACCESS_CONTROL_REQUEST_HEADERS),
            );
        }
    }
    if let Some(v) = &policy.max_age {
        h.insert(ACCESS_CONTROL_MAX_AGE, v.clone());
    }
    Decision::Preflight(h)
}

/// The compiled policies of one `ServiceConfig`, by index into its `http_routes`.
#[derive(Debug)]
struct ServicePolicies {
    /// The config they were compiled from. Holding it keeps its address (the index key)
    /// from being reused while this entry exists.
    config: Arc<l7::ServiceConfig>,
    routes: Vec<Option<Arc<CorsPolicy>>>,
}

/// Compiled CORS policies of the services of one `L7Config`, keyed by the address of their
/// `Arc<ServiceConfig>`: a request holds that `Arc` (not the resource name) once it has picked
/// its route, and a lookup is one hash of a pointer. Services without a CORS policy have no
/// entry.
#[derive(Debug, Default, Clone)]
pub struct CorsIndex {
    by_config: HashMap<usize, Arc<ServicePolicies>>,
}

fn key(c: &Arc<l7::ServiceConfig>) -> usize {
    Arc::as_ptr(c) as usize
}

impl CorsIndex {
    /// The index for `services`: entries of configs already in `previous` are reused (each
    /// version of a config is compiled, and its errors logged, once); new ones are compiled.
    pub fn rebuild<'a>(
        services: impl Iterator<Item = &'a Arc<l7::ServiceConfig>>,
        previous: &CorsIndex,
    ) -> CorsIndex {
        let mut by_config = HashMap::new();
        for svc in services {
            if svc.http_routes.iter().all(|r| r.cors.is_none()) {
                continue;
            }
            let k = key(svc);
            let entry = match previous.by_config.get(&k) {
                Some(e) if Arc::ptr_eq(&e.config, svc) => e.clone(),
                _ => Arc::new(ServicePolicies {
                    config: svc.clone(),
                    routes: svc
                        .http_routes
                        .iter()
                        .map(|r| {
                            let p = r.cors.as_ref()?;
                            let (policy, errors) = CorsPolicy::compile(p);
                            for e in errors {
                                tracing::warn!(
                                    service = %svc.hostname,
                                    route = %r.name,
                                    "{e}"
                                );
                            }
                            Some(Arc::new(policy))
                        })
                        .collect(),
                }),
            };
            by_config.insert(k, entry);
        }
        CorsIndex { by_config }
    }

    /// The compiled policy of `route`, one of `svc.http_routes`, where `svc` belongs to the
    /// same `L7Config` as this index.
    pub fn policy(
        &self,
        svc: &Arc<l7::ServiceConfig>,
        route: &l7::HttpRoute,
    ) -> Option<&Arc<CorsPolicy>> {
        // Most routes have none: no lookup at all.
        route.cors.as_ref()?;
        let entry = self.by_config.get(&key(svc))?;
        if !Arc::ptr_eq(&entry.config, svc) {
            return None;
        }
        let i = svc
            .http_routes
            .iter()
            .position(|r| std::ptr::eq(r, route))?;
        entry.routes.get(i)?.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sm(t: MatchType) -> l7::StringMatch {
        l7::StringMatch {
            match_type: Some(t),
            ignore_case: false,
        }
    }

    fn policy(origins: Vec<l7::StringMatch>) -> l7::CorsPolicy {
        l7::CorsPolicy {
            allow_origins: origins,
            allow_methods: vec!["GET".into(), "POST".into()],
            allow_headers: vec!["content-type".into(), "x-token".into()],
            expose_headers: vec!["x-request-id".into()],
            max_age: Some(prost_types::Duration {
                seconds: 86400,
                nanos: 0,
            }),
            allow_credentials: true,
            unmatched_preflights: 0,
        }
    }

    fn compiled(p: &l7::CorsPolicy) -> Arc<CorsPolicy> {
        let (c, errors) = CorsPolicy::compile(p);
        assert!(errors.is_empty(), "{errors:?}");
        Arc::new(c)
    }

    fn headers(h: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in h {
            m.insert(*k, HeaderValue::from_static(v));
        }
        m
    }

    fn allows(p: &CorsPolicy, origin: &'static str) -> bool {
        p.origin_allowed(&HeaderValue::from_static(origin))
    }

    #[test]
    fn origin_matching() {
        let p = compiled(&policy(vec![
            sm(MatchType::Exact("https://app.example.com".into())),
            sm(MatchType::Prefix("https://test.".into())),
            sm(MatchType::Regex(r"https://[a-z]+\.example\.org".into())),
        ]));
        assert!(allows(&p, "https://app.example.com"));
        assert!(!allows(&p, "https://app.example.com.evil"), "exact");
        assert!(!allows(&p, "http://app.example.com"), "exact");
        assert!(allows(&p, "https://test.anything"), "prefix");
        assert!(!allows(&p, "https://tes"), "prefix");
        assert!(allows(&p, "https://shop.example.org"), "regex");
        assert!(
            !allows(&p, "https://shop.example.org.evil"),
            "regex is anchored"
        );
        assert!(
            !allows(&p, "xhttps://shop.example.org"),
            "regex is anchored"
        );
        assert!(!allows(&p, "https://other.net"));

        // `exact: "*"` (the seeds' policy) allows every origin.
        let any = compiled(&policy(vec![sm(MatchType::Exact("*".into()))]));
        assert!(allows(&any, "https://whoever.example"));
        assert!(allows(&any, "null"));
        // So does a regex that matches `*`.
        let dot = compiled(&policy(vec![sm(MatchType::Regex(".*".into()))]));
        assert!(allows(&dot, "https://whoever.example"));

        // ignoreCase is honoured.
        let ic = compiled(&policy(vec![l7::StringMatch {
            match_type: Some(MatchType::Exact("https://App.Example.com".into())),
            ignore_case: true,
        }]));
        assert!(allows(&ic, "https://app.example.com"));

        // No origins, or a matcher without a value kind: nothing is allowed.
        assert!(!allows(&compiled(&policy(vec![])), "https://a.example"));
        let present = compiled(&policy(vec![
            sm(MatchType::Present(true)),
            l7::StringMatch::default(),
        ]));
        assert!(!allows(&present, "https://a.example"));
        // A non-text origin never matches.
        let bin = HeaderValue::from_bytes(b"https://\xffx").expect("opaque value");
        assert!(!any.origin_allowed(&bin));
    }

    #[test]
    fn bad_regex_matches_nothing_and_is_reported() {
        let p = policy(vec![
            sm(MatchType::Regex("https://([unclosed".into())),
            sm(MatchType::Exact("https://ok.example".into())),
        ]);
        let (c, errors) = CorsPolicy::compile(&p);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].to_string().contains("([unclosed"),
            "{}",
            errors[0]
        );
        assert!(!allows(&c, "https://([unclosed"));
        assert!(allows(&c, "https://ok.example"), "the rest still applies");
    }

    #[test]
    fn preflight_detection() {
        let p = compiled(&policy(vec![sm(MatchType::Exact("*".into()))]));
        let o = ("origin", "https://a.example");
        let acrm = ("access-control-request-method", "PUT");
        let is_preflight = |m: Method, h: &[(&'static str, &'static str)]| {
            matches!(evaluate(&p, &m, &headers(h)), Decision::Preflight(_))
        };
        assert!(is_preflight(Method::OPTIONS, &[o, acrm]));
        // OPTIONS without Access-Control-Request-Method (or with an empty one) is an actual
        // request; so is any other method carrying it.
        assert!(matches!(
            evaluate(&p, &Method::OPTIONS, &headers(&[o])),
            Decision::Respond(_)
        ));
        assert!(!is_preflight(
            Method::OPTIONS,
            &[o, ("access-control-request-method", "")]
        ));
        assert!(matches!(
            evaluate(&p, &Method::GET, &headers(&[o, acrm])),
            Decision::Respond(_)
        ));
        // No Origin, or an empty one: not CORS at all.
        assert!(matches!(
            evaluate(&p, &Method::OPTIONS, &headers(&[acrm])),
            Decision::Pass
        ));
        assert!(matches!(
            evaluate(&p, &Method::GET, &headers(&[("origin", "")])),
            Decision::Pass
        ));
    }

    fn get<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn preflight_headers() {
        let p = compiled(&policy(vec![sm(MatchType::Exact(
            "https://app.example.com".into(),
        ))]));
        let req = headers(&[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "x-token"),
        ]);
        let Decision::Preflight(h) = evaluate(&p, &Method::OPTIONS, &req) else {
            panic!("a preflight from an allowed origin is answered here");
        };
        assert_eq!(
            get(&h, "access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(get(&h, "access-control-allow-methods"), Some("GET,POST"));
        assert_eq!(
            get(&h, "access-control-allow-headers"),
            Some("content-type,x-token")
        );
        assert_eq!(get(&h, "access-control-max-age"), Some("86400"));
        assert_eq!(get(&h, "access-control-allow-credentials"), Some("true"));
        assert!(
            h.get("access-control-expose-headers").is_none(),
            "expose-headers is for actual responses"
        );

        // Without credentials, lists or maxAge, those headers are absent.
        let bare = compiled(&l7::CorsPolicy {
            allow_origins: vec![sm(MatchType::Exact("*".into()))],
            ..Default::default()
        });
        let Decision::Preflight(h) = evaluate(&bare, &Method::OPTIONS, &req) else {
            panic!("preflight");
        };
        assert_eq!(h.len(), 1, "only the origin: {h:?}");

        // `*` lists echo what the preflight asks for.
        let star = compiled(&l7::CorsPolicy {
            allow_origins: vec![sm(MatchType::Exact("*".into()))],
            allow_methods: vec!["*".into()],
            allow_headers: vec!["*".into()],
            ..Default::default()
        });
        let Decision::Preflight(h) = evaluate(&star, &Method::OPTIONS, &req) else {
            panic!("preflight");
        };
        assert_eq!(get(&h, "access-control-allow-methods"), Some("POST"));
        assert_eq!(get(&h, "access-control-allow-headers"), Some("x-token"));
    }

    #[test]
    fn unmatched_preflights() {
        let mut p = policy(vec![sm(MatchType::Exact("https://app.example.com".into()))]);
        let req = headers(&[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ]);
        // FORWARD (and unset): the upstream answers it.
        for v in [
            UnmatchedPreflights::Unspecified,
            UnmatchedPreflights::Forward,
        ] {
            p.unmatched_preflights = v as i32;
            assert!(matches!(
                evaluate(&compiled(&p), &Method::OPTIONS, &req),
                Decision::Pass
            ));
        }
        // IGNORE: answered here, without allowing the origin (Envoy keeps the other headers).
        p.unmatched_preflights = UnmatchedPreflights::Ignore as i32;
        let Decision::Preflight(h) = evaluate(&compiled(&p), &Method::OPTIONS, &req) else {
            panic!("IGNORE answers unmatched preflights");
        };
        assert!(h.get("access-control-allow-origin").is_none(), "{h:?}");
        assert_eq!(get(&h, "access-control-allow-methods"), Some("GET,POST"));
    }

    #[test]
    fn actual_response_headers() {
        let p = compiled(&policy(vec![sm(MatchType::Prefix("https://app.".into()))]));
        let Decision::Respond(r) = evaluate(
            &p,
            &Method::GET,
            &headers(&[("origin", "https://app.example.com")]),
        ) else {
            panic!("an allowed origin's request gets response headers");
        };
        // Over whatever the upstream said.
        let mut h = headers(&[("access-control-allow-origin", "*"), ("x-other", "1")]);
        r.apply(&mut h);
        assert_eq!(
            get(&h, "access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(
            get(&h, "access-control-expose-headers"),
            Some("x-request-id")
        );
        assert_eq!(get(&h, "access-control-allow-credentials"), Some("true"));
        assert!(h.get("access-control-allow-methods").is_none());
        assert_eq!(get(&h, "x-other"), Some("1"));
        // Another origin: nothing.
        assert!(matches!(
            evaluate(
                &p,
                &Method::GET,
                &headers(&[("origin", "https://evil.example")])
            ),
            Decision::Pass
        ));
        // Without credentials or expose headers: only the origin.
        let bare = compiled(&l7::CorsPolicy {
            allow_origins: vec![sm(MatchType::Exact("*".into()))],
            ..Default::default()
        });
        let Decision::Respond(r) = evaluate(
            &bare,
            &Method::POST,
            &headers(&[("origin", "https://b.example")]),
        ) else {
            panic!("respond");
        };
        let mut h = HeaderMap::new();
        r.apply(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn index_compiles_each_config_once() {
        let with_cors = |host: &str| {
            Arc::new(l7::ServiceConfig {
                hostname: host.into(),
                http_routes: vec![
                    l7::HttpRoute {
                        name: "plain".into(),
                        ..Default::default()
                    },
                    l7::HttpRoute {
                        name: "cors".into(),
                        cors: Some(policy(vec![sm(MatchType::Exact("*".into()))])),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            })
        };
        let a = with_cors("a");
        let none = Arc::new(l7::ServiceConfig {
            hostname: "n".into(),
            http_routes: vec![l7::HttpRoute::default()],
            ..Default::default()
        });
        let idx = CorsIndex::rebuild([&a, &none].into_iter(), &CorsIndex::default());
        assert_eq!(
            idx.by_config.len(),
            1,
            "services without CORS have no entry"
        );
        assert!(idx.policy(&a, &a.http_routes[0]).is_none());
        let pa = idx.policy(&a, &a.http_routes[1]).expect("compiled").clone();
        assert!(idx.policy(&none, &none.http_routes[0]).is_none());
        // An equal config that is not this one (another version): not found.
        let a2 = with_cors("a");
        assert!(idx.policy(&a2, &a2.http_routes[1]).is_none());
        // Rebuilt with `a` unchanged and a new service: `a` is not compiled again.
        let b = with_cors("b");
        let idx2 = CorsIndex::rebuild([&a, &b].into_iter(), &idx);
        let pa2 = idx2.policy(&a, &a.http_routes[1]).expect("kept");
        assert!(Arc::ptr_eq(&pa, pa2), "compiled once");
        assert!(idx2.policy(&b, &b.http_routes[1]).is_some());
        // Removed services leave the index.
        let idx3 = CorsIndex::rebuild([&b].into_iter(), &idx2);
        assert!(idx3.policy(&a, &a.http_routes[1]).is_none());
    }
}
