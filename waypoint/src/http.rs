//! The HTTP pipeline of one request: L7 authz → route match → redirect/direct response →
//! CORS → fault → rate limit → destination (weights, subset) → endpoint (LB, outlier detection) →
//! upstream with retries and timeouts; mirrors are fire-and-forget. Telemetry is recorded when
//! the response body has been fully sent (or dropped).
//!
//! Request bodies: one that has fully arrived when the request is routed (or has a known
//! length within the replay buffer) is kept, so retries and mirrors can replay it; one still
//! arriving (gRPC streaming, a chunked upload) or larger than the buffer is streamed upstream
//! as it comes, tried once and not mirrored — as Envoy does once its retry buffer overflows.
//!
//! HTTP/1.1 Upgrade requests (WebSocket) take the same pipeline, keep `Connection: upgrade` and
//! `Upgrade`, and are sent once on a connection of their own; after a `101` the two upgraded
//! connections are relayed by [`crate::upgrade`], which also says when telemetry is recorded.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONNECTION, HOST, HeaderName, UPGRADE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::VecDeque;
use tracing::debug;
use zmesh_proto::l7;

use crate::coalesce::Coalesce;
use crate::matcher::{self, AuthzDecision, RequestView};
use crate::sniff::Detected;
use crate::stats::RequestLabels;
use crate::upstream::{
    Cluster, ConnKind, Endpoint, Lease, Policy, RetrySlot, UpBody, UpstreamError,
};
use crate::{ConnCtx, Inner, UndefinedSubset, pick_weighted};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type RespBody = BoxBody<Bytes, BoxError>;

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
];

/// Token bucket for a route's local rate limit.
pub(crate) struct Bucket {
    tokens: f64,
    last: Instant,
    spec: (u32, u32, Duration),
}

/// Serve HTTP on one tunnel until the client closes it. Malformed requests, oversized heads
/// and protocol errors end this connection only.
pub async fn serve_connection<S>(inner: Arc<Inner>, ctx: Arc<ConnCtx>, io: S, detected: Detected)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(inner.cfg.header_read_timeout)
        .max_buf_size(inner.cfg.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(inner.cfg.max_header_bytes as u32)
        .max_concurrent_streams(1024);
    let svc = hyper::service::service_fn(move |req| {
        let inner = inner.clone();
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(inner, ctx, req).await) }
    });
    let r = match detected {
        Detected::Http2 => {
            builder
                .http2_only()
                .serve_connection(TokioIo::new(Coalesce::new(io)), svc)
                .await
        }
        // With upgrades: after a 101 the connection is handed to `hyper::upgrade::on`.
        _ => {
            builder
                .http1_only()
                .serve_connection_with_upgrades(TokioIo::new(io), svc)
                .await
        }
    };
    if let Err(e) = r {
        debug!("downstream HTTP connection ended with an error: {e}");
    }
}

fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

/// Request facts kept for telemetry.
struct Info {
    started: Instant,
    method: String,
    path: String,
    authority: String,
    protocol: &'static str,
    request_id: String,
    req_bytes: u64,
    /// Bytes of a streamed request body seen so far (added to `req_bytes` when reported).
    req_streamed: Option<Arc<AtomicU64>>,
    service: String,
    dest: Option<Endpoint>,
    /// The cluster of the last try (for the retry circuit breaker).
    cluster: Option<Arc<Cluster>>,
    /// Set when the response is the last of exhausted retries: Envoy's `URX`.
    retries_exhausted: bool,
    route: String,
    /// Set for an allowed cross-origin request: added to whatever response it gets.
    cors: Option<crate::cors::ResponseHeaders>,
    /// The waypoint's span, when tracing is on and the request is sampled.
    trace: Option<Box<crate::trace::ActiveSpan>>,
}

fn local_reply(status: u16, body: &str, flags: &'static str) -> (Response<RespBody>, &'static str) {
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("text/plain"));
    (r, flags)
}

/// A random (version 4) UUID for `x-request-id`: one random draw, two allocations.
fn uuid4() -> String {
    // Version nibble 4, RFC 4122 variant bits 10.
    let r = rand::random::<u128>() & !(0xf << 76) & !(0x3 << 62) | (0x4 << 76) | (0x2 << 62);
    let h = format!("{r:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// HBONE CONNECT headers for an upstream tunnel.
pub fn tunnel_headers(ctx: &ConnCtx, service: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("for=\"{}\";host={service}", ctx.client_addr)) {
        h.insert("forwarded", v);
    }
    h
}

async fn handle(
    inner: Arc<Inner>,
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    // The client's connection, once a 101 has been sent on it.
    let upgrade = crate::upgrade::requested(parts.version, &parts.headers).and_then(|proto| {
        let client = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()?;
        Some((proto, client))
    });
    let protocol = if parts.version == Version::HTTP_2 {
        "http2"
    } else {
        "http"
    };
    if parts.headers.get("x-request-id").is_none()
        && let Ok(v) = HeaderValue::from_str(&uuid4())
    {
        parts.headers.insert("x-request-id", v);
    }
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            parts
                .headers
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    // Tracing (only while an exporter is configured): join or start the trace, rewrite the
    // trace headers for the upstream; a span only when sampled.
    let trace = inner
        .tracer
        .load()
        .as_ref()
        .and_then(|t| t.start_request(&mut parts.headers, &parts.uri, &authority));
    let mut info = Info {
        started,
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        authority: authority.clone(),
        protocol,
        request_id: parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        req_bytes: 0,
        req_streamed: None,
        service: ctx
            .service
            .as_ref()
            .map(|s| s.hostname.clone())
            .unwrap_or_default(),
        dest: None,
        cluster: None,
        retries_exhausted: false,
        route: String::new(),
        cors: None,
        trace,
    };
    let known_len = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = match read_body(body, known_len, inner.cfg.max_request_body).await {
        Ok(b) => b,
        Err((status, msg, flag)) => {
            let (r, f) = local_reply(status, msg, flag);
            return finish(&inner, &ctx, info, r, f, None);
        }
    };
    match &body {
        ReqBody::Full(b) => info.req_bytes = b.len() as u64,
        ReqBody::Streaming(s) => info.req_streamed = Some(s.seen.clone()),
    }
    let proto = upgrade.as_ref().map(|(p, _)| p);
    let (mut resp, flags, lease) = route_request(&inner, &ctx, &mut info, parts, body, proto).await;
    if let Some(cors) = info.cors.take() {
        cors.apply(resp.headers_mut());
    }
    match upgrade {
        Some((_, client)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            finish_upgrade(&inner, &ctx, info, resp, lease, client)
        }
        _ => finish(&inner, &ctx, info, resp, flags, lease),
    }
}

async fn route_request(
    inner: &Arc<Inner>,
    ctx: &Arc<ConnCtx>,
    info: &mut Info,
    mut parts: http::request::Parts,
    body: ReqBody,
    upgrade: Option<&HeaderValue>,
) -> (Response<RespBody>, &'static str, Option<Lease>) {
    let l7cfg = inner.l7.load();
    // From the same snapshot as the rest (the compiled CORS policies are looked up by it).
    let svc_cfg = ctx.service.as_ref().and_then(|s| l7cfg.service_for(s));
    let path_q = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or("/".into());
    let (path, query) = match path_q.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (path_q.clone(), None),
    };
    let view = RequestView {
        method: parts.method.as_str(),
        path: &path,
        query: query.as_deref(),
        authority: &info.authority,
        scheme: "http",
        headers: &parts.headers,
        port: ctx.port,
        source_principal: ctx.peer_identity.as_ref().map(|i| i.principal()),
        source_namespace: ctx
            .peer_identity
            .as_ref()
            .map(|i| i.namespace().to_string()),
        source_ip: Some(ctx.client_addr.ip()),
        destination_ip: match &ctx.target {
            zmesh_core::hbone::server::Target::Addr(a) => Some(a.ip()),
            _ => None,
        },
    };
    // 1. L7 authorization.
    let host = ctx
        .service
        .as_ref()
        .map(|s| s.hostname.as_str())
        .unwrap_or("");
    let applicable = l7cfg.authorizations.values().filter(|p| {
        matcher::policy_applies(
            p,
            host,
            &inner.cfg.gateway_namespace,
            &inner.cfg.gateway_name,
        )
    });
    if let AuthzDecision::Deny { policy } =
        matcher::authorize(applicable.map(|p| p.as_ref()), &view)
    {
        debug!(%policy, path = %path, "request denied by L7 authorization");
        let (r, f) = local_reply(403, "RBAC: access denied", "-");
        return (r, f, None);
    }
    // 2. Route.
    let default_route;
    let route: &l7::HttpRoute = match &svc_cfg {
        Some(c) if !c.http_routes.is_empty() => {
            match matcher::select_route(&c.http_routes, &view) {
                Some(r) => r,
                None => {
                    let (r, f) = local_reply(404, "", "NR");
                    return (r, f, None);
                }
            }
        }
        _ => {
            let dest_host = match (&ctx.service, &ctx.workload) {
                (Some(s), _) => s.hostname.clone(),
                _ => String::new(),
            };
            default_route = l7::HttpRoute {
                name: "default".into(),
                action: Some(l7::http_route::Action::Forward(l7::Forward {
                    destinations: vec![l7::RouteDestination {
                        host: dest_host,
                        weight: 100,
                        ..Default::default()
                    }],
                })),
                ..Default::default()
            };
            &default_route
        }
    };
    info.route = route.name.clone();
    drop(view);
    // 3. Redirect / direct response.
    let fwd = match &route.action {
        Some(l7::http_route::Action::Redirect(rd)) => {
            let (r, f) = redirect(rd, &parts, &info.authority, &path, query.as_deref());
            return (r, f, None);
        }
        Some(l7::http_route::Action::DirectResponse(d)) => {
            let mut r = Response::new(full(d.body.clone()));
            *r.status_mut() = StatusCode::from_u16(d.status as u16).unwrap_or(StatusCode::OK);
            apply_header_ops(r.headers_mut(), route.response_headers.as_ref());
            return (r, "-", None);
        }
        Some(l7::http_route::Action::Forward(f)) => f,
        None => {
            let (r, f) = local_reply(500, "route has no action", "NR");
            return (r, f, None);
        }
    };
    // 3b. CORS: after authz, before faults (Envoy's filter order); not for redirects and
    // direct responses (Envoy's CORS filter skips those routes).
    if let Some(policy) = svc_cfg.as_ref().and_then(|c| l7cfg.cors.policy(c, route)) {
        match crate::cors::evaluate(policy, &parts.method, &parts.headers) {
            crate::cors::Decision::Preflight(headers) => {
                let mut r = Response::new(full(Bytes::new()));
                *r.headers_mut() = headers;
                return (r, "-", None);
            }
            crate::cors::Decision::Respond(h) => info.cors = Some(h),
            crate::cors::Decision::Pass => {}
        }
    }
    // 4. Fault injection.
    if let Some(fault) = &route.fault {
        if let Some(d) = &fault.delay
            && roll(d.percentage)
            && let Some(dur) = d.fixed_delay.and_then(|d| Duration::try_from(d).ok())
        {
            tokio::time::sleep(dur).await;
        }
        if let Some(a) = &fault.abort
            && roll(a.percentage)
        {
            let (mut r, f) = local_reply(a.http_status as u16, "fault filter abort", "FI");
            apply_header_ops(r.headers_mut(), route.response_headers.as_ref());
            return (r, f, None);
        }
    }
    // 5. Local rate limit.
    if let Some(rl) = &route.rate_limit
        && !take_token(inner, &route.name, rl)
    {
        let status = if rl.status == 0 {
            429
        } else {
            rl.status as u16
        };
        let (r, f) = local_reply(status, "local_rate_limited", "RL");
        return (r, f, None);
    }
    // 6. Rewrite, header ops, destination.
    let Some(dest) = pick_weighted(&fwd.destinations).cloned() else {
        let (r, f) = local_reply(503, "no destination", "NR");
        return (r, f, None);
    };
    apply_rewrite(
        &mut parts,
        route,
        &path,
        query.as_deref(),
        &mut info.authority,
    );
    apply_header_ops(&mut parts.headers, route.request_headers.as_ref());
    apply_header_ops(&mut parts.headers, dest.request_headers.as_ref());
    for h in HOP_BY_HOP {
        parts.headers.remove(*h);
    }
    // An upgrade is end to end here: the endpoint is asked to switch protocols. (Only an
    // upgrade request carries `Upgrade` upstream: `forward_once` picks its connection by it.)
    if let Some(proto) = upgrade {
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(UPGRADE, proto.clone());
    }
    // 7. Mirrors: detached; never delay or affect the main request. Not for an upgrade (as
    // Envoy): a mirrored copy would open a second stream with the endpoint.
    let mirrors = if upgrade.is_some() {
        &[][..]
    } else {
        &route.mirrors[..]
    };
    for m in mirrors {
        let pct = if m.percentage == 0.0 {
            100.0
        } else {
            m.percentage
        };
        if let Some(md) = &m.destination
            && roll(pct)
            && let ReqBody::Full(body) = &body
        {
            let (inner, ctx, md) = (inner.clone(), ctx.clone(), md.clone());
            let mut mparts = clone_parts(&parts);
            let host = info.authority.clone();
            let shadow = match host.rsplit_once(':') {
                Some((h, p)) if p.parse::<u16>().is_ok() => format!("{h}-shadow:{p}"),
                _ => format!("{host}-shadow"),
            };
            if let Ok(v) = HeaderValue::from_str(&shadow) {
                mparts.headers.insert(HOST, v);
            }
            let body = full_body(body.clone());
            tokio::spawn(async move {
                let f = forward_once(&inner, &ctx, &md, mparts, body, None, &shadow);
                // The response is read to its end and discarded, as Envoy does, before the
                // connection goes back to the idle list: a body still arriving must not be
                // cut off (that closes the connection instead of reusing it).
                let mirrored = async {
                    let (resp, lease) = f.await?;
                    let mut body = resp.into_body();
                    while let Some(frame) = body.frame().await {
                        if frame.is_err() {
                            break;
                        }
                    }
                    drop(lease);
                    Ok::<_, UpstreamError>(())
                };
                match tokio::time::timeout(Duration::from_secs(30), mirrored).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!("mirror request failed: {e}"),
                    Err(_) => debug!("mirror request timed out"),
                }
            });
        }
    }
    // 8. Forward with retries and timeouts.
    let route_timeout = route
        .timeout
        .and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero());
    // An upgrade is tried once (Envoy does not retry them); the timeout bounds the wait for its
    // response head only, not the upgraded stream.
    let retries = route.retries.as_ref().filter(|_| upgrade.is_none());
    let fut = forward_with_retries(inner, ctx, &dest, retries, parts, body, info);
    let res = match route_timeout {
        Some(t) => tokio::time::timeout(t, fut)
            .await
            .unwrap_or(Err(UpstreamError::Timeout)),
        None => fut.await,
    };
    match res {
        Ok((resp, lease)) => {
            let (mut rp, rb) = resp.into_parts();
            let switched = rp.status == StatusCode::SWITCHING_PROTOCOLS;
            if switched && upgrade.is_none() {
                // Only an upgrade request may be answered 101; anything else would leave the
                // client's connection in an unknown protocol.
                let (r, f) = local_reply(502, "upstream switched protocols unasked", "UPE");
                return (r, f, None);
            }
            let switched_to = if switched {
                rp.headers.get(UPGRADE).cloned()
            } else {
                None
            };
            for h in HOP_BY_HOP {
                rp.headers.remove(*h);
            }
            if let Some(proto) = switched_to {
                rp.headers
                    .insert(CONNECTION, HeaderValue::from_static("upgrade"));
                rp.headers.insert(UPGRADE, proto);
            }
            apply_header_ops(&mut rp.headers, dest.response_headers.as_ref());
            apply_header_ops(&mut rp.headers, route.response_headers.as_ref());
            let body = rb.map_err(|e| Box::new(e) as BoxError).boxed();
            let flags = if info.retries_exhausted { "URX" } else { "-" };
            (Response::from_parts(rp, body), flags, Some(lease))
        }
        Err(e) => {
            let (r, f) = local_reply(e.status(), &e.to_string(), e.flag());
            (r, f, None)
        }
    }
}

fn roll(pct: f64) -> bool {
    pct >= 100.0 || (pct > 0.0 && rand::random::<f64>() * 100.0 < pct)
}

fn take_token(inner: &Inner, route: &str, rl: &l7::RateLimit) -> bool {
    let fill = rl
        .fill_interval
        .and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(1));
    let spec = (rl.max_tokens.max(1), rl.tokens_per_fill, fill);
    let mut b = inner.buckets.lock().unwrap_or_else(PoisonError::into_inner);
    let now = Instant::now();
    let e = b.entry(route.to_string()).or_insert(Bucket {
        tokens: f64::from(spec.0),
        last: now,
        spec,
    });
    if e.spec != spec {
        *e = Bucket {
            tokens: f64::from(spec.0),
            last: now,
            spec,
        };
    }
    // Whole fills only, as Envoy's token bucket.
    let fills = (now.duration_since(e.last).as_nanos() / fill.as_nanos().max(1)) as u32;
    if fills > 0 {
        e.tokens = (e.tokens + f64::from(fills) * f64::from(spec.1)).min(f64::from(spec.0));
        e.last += fill * fills;
    }
    if e.tokens >= 1.0 {
        e.tokens -= 1.0;
        true
    } else {
        false
    }
}

fn clone_parts(p: &http::request::Parts) -> http::request::Parts {
    let mut b = Request::builder()
        .method(p.method.clone())
        .uri(p.uri.clone())
        .version(p.version);
    if let Some(h) = b.headers_mut() {
        *h = p.headers.clone();
    }
    b.body(())
        .map(|r| r.into_parts().0)
        .unwrap_or_else(|_| Request::new(()).into_parts().0)
}

fn apply_header_ops(h: &mut HeaderMap, ops: Option<&l7::HeaderOps>) {
    let Some(ops) = ops else { return };
    for n in &ops.remove {
        h.remove(n.as_str());
    }
    for kv in &ops.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(kv.name.as_str()),
            HeaderValue::from_str(&kv.value),
        ) {
            h.insert(n, v);
        }
    }
    for kv in &ops.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(kv.name.as_str()),
            HeaderValue::from_str(&kv.value),
        ) {
            h.append(n, v);
        }
    }
}

fn matched_prefix<'a>(route: &'a l7::HttpRoute, path: &str) -> Option<&'a str> {
    use l7::string_match::MatchType;
    route
        .matches
        .iter()
        .find_map(|m| match m.path.as_ref()?.match_type.as_ref()? {
            MatchType::Prefix(p) | MatchType::PathPrefix(p) if path.starts_with(p.as_str()) => {
                Some(p.as_str())
            }
            _ => None,
        })
}

fn apply_rewrite(
    parts: &mut http::request::Parts,
    route: &l7::HttpRoute,
    path: &str,
    query: Option<&str>,
    authority: &mut String,
) {
    let Some(rw) = &route.rewrite else { return };
    use l7::rewrite::PathRewrite;
    let new_path = match &rw.path_rewrite {
        Some(PathRewrite::Prefix(p)) => match matched_prefix(route, path) {
            Some(m) => Some(format!("{p}{}", &path[m.len()..])),
            None => Some(p.clone()),
        },
        Some(PathRewrite::FullPath(p)) => Some(p.clone()),
        Some(PathRewrite::Regex(r)) => crate::matcher::UNANCHORED.get(&r.pattern).map(|re| {
            re.replace_all(path, r.substitution.replace("\\", "$").as_str())
                .into_owned()
        }),
        None => None,
    };
    if let Some(np) = new_path {
        let pq = match query {
            Some(q) => format!("{np}?{q}"),
            None => np,
        };
        let mut up = parts.uri.clone().into_parts();
        if let Ok(p) = pq.parse() {
            up.path_and_query = Some(p);
            if let Ok(u) = Uri::from_parts(up) {
                parts.uri = u;
            }
        }
    }
    if !rw.authority.is_empty() {
        *authority = rw.authority.clone();
    }
}

fn redirect(
    rd: &l7::Redirect,
    parts: &http::request::Parts,
    authority: &str,
    path: &str,
    query: Option<&str>,
) -> (Response<RespBody>, &'static str) {
    let scheme = if rd.scheme.is_empty() {
        "http"
    } else {
        rd.scheme.as_str()
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_string(), Some(p.to_string())),
        _ => (authority.to_string(), None),
    };
    let host = if rd.authority.is_empty() {
        host
    } else {
        rd.authority.clone()
    };
    let port = if rd.port != 0 {
        Some(rd.port.to_string())
    } else {
        port
    };
    let new_path = match &rd.path_rewrite {
        Some(l7::redirect::PathRewrite::FullPath(p)) => p.clone(),
        Some(l7::redirect::PathRewrite::Prefix(p)) => p.clone(),
        None => path.to_string(),
    };
    let mut loc = format!("{scheme}://{host}");
    if let Some(p) = port {
        loc.push_str(&format!(":{p}"));
    }
    loc.push_str(&new_path);
    if let Some(q) = query {
        loc.push('?');
        loc.push_str(q);
    }
    let _ = parts;
    let status = if rd.status_code == 0 {
        301
    } else {
        rd.status_code as u16
    };
    let mut r = Response::new(full(""));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = HeaderValue::from_str(&loc) {
        r.headers_mut().insert("location", v);
    }
    (r, "-")
}

fn retriable_status(p: &l7::RetryPolicy, s: u16) -> bool {
    p.retriable_status_codes.contains(&u32::from(s))
        || p.retry_on.iter().any(|c| match c.as_str() {
            "5xx" => s >= 500,
            "gateway-error" => matches!(s, 502..=504),
            "retriable-4xx" => s == 409,
            _ => false,
        })
}

fn retriable_error(p: &l7::RetryPolicy, e: &UpstreamError) -> bool {
    use UpstreamError::{Connect, Reset, Timeout};
    p.retry_on.iter().any(|c| {
        matches!(
            (c.as_str(), e),
            ("5xx" | "gateway-error", Connect(_) | Reset(_) | Timeout)
                | ("connect-failure", Connect(_))
                | ("reset" | "refused-stream", Reset(_))
        )
    })
}

type Upstream = (Response<Incoming>, Lease);

/// A request body as the waypoint forwards it.
enum ReqBody {
    /// Complete and at most `max_request_body`: replayed for retries and mirrors.
    Full(Bytes),
    /// Still arriving when the request was routed (a stream: gRPC streaming, a chunked
    /// upload), or larger than the replay buffer: forwarded as it arrives, once.
    Streaming(Streamed),
}

fn full_body(b: Bytes) -> UpBody {
    Full::new(b).map_err(|e| match e {}).boxed()
}

/// Read as much of the request body as retries and mirrors need, without making a stream
/// wait: a body with a known length that fits the replay buffer is read to its end (bounded
/// in time), as is one that has fully arrived already (a unary gRPC call, a small POST);
/// anything that would wait for the client, or outgrow the buffer, is streamed.
async fn read_body(
    mut body: Incoming,
    known_len: Option<u64>,
    max: usize,
) -> Result<ReqBody, (u16, &'static str, &'static str)> {
    if known_len.is_some_and(|n| n <= max as u64) {
        return match tokio::time::timeout(
            Duration::from_secs(30),
            Limited::new(body, max).collect(),
        )
        .await
        {
            Ok(Ok(b)) => Ok(ReqBody::Full(b.to_bytes())),
            Ok(Err(_)) => Err((400, "bad request body", "DPE")),
            Err(_) => Err((408, "request body timeout", "-")),
        };
    }
    let mut prefix: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut len = 0usize;
    // Polled without a waker: a body that would wait is handed on, and whoever polls it next
    // (the upstream connection) registers its own. Once, a pending body gets a yield first:
    // an HTTP/2 request's DATA usually arrived with its HEADERS but is decoded only in the
    // connection task's next pass (this task runs first), and a unary call should stay
    // replayable rather than be streamed for want of one scheduling turn.
    let mut yielded = false;
    loop {
        let polled = {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            Pin::new(&mut body).poll_frame(&mut cx)
        };
        match polled {
            Poll::Ready(None) => {
                let mut all = bytes::BytesMut::with_capacity(len);
                for f in prefix {
                    if let Ok(d) = f.into_data() {
                        all.extend_from_slice(&d);
                    }
                }
                return Ok(ReqBody::Full(all.freeze()));
            }
            Poll::Ready(Some(Ok(f))) => {
                let is_data = f.is_data();
                len += f.data_ref().map_or(0, |d| d.len());
                prefix.push_back(f);
                // Trailers end the body; only a stream keeps them.
                if len > max || !is_data {
                    break;
                }
            }
            Poll::Ready(Some(Err(_))) => return Err((400, "bad request body", "DPE")),
            Poll::Pending if !yielded => {
                yielded = true;
                tokio::task::yield_now().await;
            }
            Poll::Pending => break,
        }
    }
    let seen = Arc::new(AtomicU64::new(len as u64));
    Ok(ReqBody::Streaming(Streamed {
        prefix,
        rest: body,
        seen,
    }))
}

/// A request body being streamed upstream: the frames read while deciding, then the rest.
struct Streamed {
    prefix: VecDeque<Frame<Bytes>>,
    rest: Incoming,
    /// Body bytes so far, for `istio_request_bytes` and the access log.
    seen: Arc<AtomicU64>,
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(f) = this.prefix.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        match Pin::new(&mut this.rest).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.seen.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let queued: u64 = self
            .prefix
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        let rest = self.rest.size_hint();
        let mut h = SizeHint::new();
        h.set_lower(rest.lower() + queued);
        if let Some(u) = rest.upper() {
            h.set_upper(u + queued);
        }
        h
    }
}

async fn forward_with_retries(
    inner: &Arc<Inner>,
    ctx: &Arc<ConnCtx>,
    dest: &l7::RouteDestination,
    retries: Option<&l7::RetryPolicy>,
    parts: http::request::Parts,
    body: ReqBody,
    info: &mut Info,
) -> Result<Upstream, UpstreamError> {
    // A streamed body goes out once: nothing is kept to replay (as Envoy once its retry buffer
    // overflows), so a failed try is the answer.
    let (replay, mut stream) = match body {
        ReqBody::Full(b) => (Some(b), None),
        ReqBody::Streaming(s) => (None, Some(s)),
    };
    let attempts = if replay.is_some() {
        retries.map(|r| r.attempts).unwrap_or(0)
    } else {
        0
    };
    let per_try = retries
        .and_then(|r| r.per_try_timeout)
        .and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero());
    let backoff = retries
        .and_then(|r| r.backoff)
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or(Duration::from_millis(25));
    let authority = info.authority.clone();
    let mut n = 0;
    // Held for the duration of a retry (`connectionPool.http.maxRetries`).
    let mut _retry_slot: Option<RetrySlot> = None;
    loop {
        let body = match (&replay, stream.take()) {
            (Some(b), _) => full_body(b.clone()),
            (None, Some(s)) => s.boxed(),
            // Unreachable: a streamed body allows no second try.
            (None, None) => return Err(UpstreamError::Reset("request body already sent".into())),
        };
        let f = forward_once(
            inner,
            ctx,
            dest,
            clone_parts(&parts),
            body,
            Some(info),
            &authority,
        );
        let r = match per_try {
            Some(t) => tokio::time::timeout(t, f)
                .await
                .unwrap_or(Err(UpstreamError::Timeout)),
            None => f.await,
        };
        let retry = match (&r, retries) {
            (_, None) => false,
            (Ok((resp, _)), Some(p)) => retriable_status(p, resp.status().as_u16()),
            (Err(e), Some(p)) => retriable_error(p, e),
        };
        if !retry {
            return r;
        }
        if n >= attempts {
            info.retries_exhausted = attempts > 0;
            return r;
        }
        // Envoy's retry circuit breaker: with `maxRetries` retries already in flight in the
        // destination, the last response (or error) is the answer.
        if let Some(c) = &info.cluster {
            // This request's previous retry is over: its slot must not count against itself.
            _retry_slot = None;
            match c.retry_slot() {
                Some(slot) => _retry_slot = Some(slot),
                None => return r,
            }
        }
        n += 1;
        drop(r);
        // Jittered exponential backoff (Envoy: base × 2^n, random in [0, that]).
        let max = backoff.saturating_mul(1 << n.min(6));
        tokio::time::sleep(max.mul_f64(rand::random::<f64>().max(0.1))).await;
    }
}

/// One try: endpoints → cluster admission → endpoint → upstream request.
async fn forward_once(
    inner: &Arc<Inner>,
    ctx: &Arc<ConnCtx>,
    dest: &l7::RouteDestination,
    mut parts: http::request::Parts,
    body: UpBody,
    info: Option<&mut Info>,
    authority: &str,
) -> Result<Upstream, UpstreamError> {
    let port = if dest.port == 0 {
        ctx.port
    } else {
        dest.port as u16
    };
    let (cfg, eps) = if dest.host.is_empty() {
        // Workload-addressed traffic: the workload itself.
        let Some(w) = &ctx.workload else {
            return Err(UpstreamError::NoHealthy);
        };
        let zmesh_core::hbone::server::Target::Addr(a) = ctx.target else {
            return Err(UpstreamError::NoHealthy);
        };
        (
            None,
            vec![Endpoint {
                workload: w.clone(),
                addr: a,
            }],
        )
    } else {
        let cfg = inner.l7.load().service(&dest.host).or_else(|| {
            let svc = inner.state.read().service_by_host(&dest.host)?;
            inner.service_config(&svc)
        });
        match inner.endpoints(&dest.host, &dest.subset, port, cfg.as_deref()) {
            Ok((_, eps)) => (cfg, eps),
            // Undefined subset: Istio answers 503 (no cluster).
            Err(UndefinedSubset) => return Err(UpstreamError::NoHealthy),
        }
    };
    let policy = Policy::resolve(cfg.as_deref(), &dest.subset, port);
    // An upgrade (the only request that still has `Upgrade` here) is HTTP/1.1 by definition.
    let upgrade = parts.headers.contains_key(UPGRADE);
    let h2 = !upgrade
        && (parts.version == Version::HTTP_2
            || matches!(
                ctx.app_protocol,
                zmesh_core::state::AppProtocol::Http2 | zmesh_core::state::AppProtocol::Grpc
            ));
    let kind = match (upgrade, h2) {
        (true, _) => ConnKind::Upgrade,
        (false, true) => ConnKind::Http2,
        (false, false) => ConnKind::Http1,
    };
    let hash_key = match policy.lb.as_ref().and_then(|l| l.policy.as_ref()) {
        Some(l7::load_balancer::Policy::ConsistentHash(ch)) => match &ch.hash_key {
            Some(l7::consistent_hash::HashKey::HttpHeaderName(h)) => parts
                .headers
                .get(h.as_str())
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            Some(l7::consistent_hash::HashKey::UseSourceIp(true)) => {
                Some(ctx.client_addr.ip().to_string())
            }
            Some(l7::consistent_hash::HashKey::HttpQueryParameterName(q)) => {
                parts.uri.query().and_then(|qs| {
                    qs.split('&')
                        .find_map(|kv| kv.strip_prefix(&format!("{q}=")).map(str::to_string))
                })
            }
            _ => None,
        },
        _ => None,
    };
    let cluster = inner.upstreams.cluster(
        &format!(
            "outbound|{port}|{}|{}|{}",
            dest.subset,
            dest.host,
            if h2 { "h2" } else { "h1" }
        ),
        policy,
    );
    let Some(ep) = cluster.pick(&eps, hash_key.as_deref()) else {
        return Err(UpstreamError::NoHealthy);
    };
    let admitted = inner.upstreams.admit(&cluster).await?;
    if let Some(i) = info {
        i.dest = Some(ep.clone());
        i.service = dest.host.clone();
        i.cluster = Some(cluster.clone());
    }
    // Upstream request form: origin-form + Host for HTTP/1, absolute for HTTP/2.
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or("/".into());
    if h2 {
        parts.version = Version::HTTP_2;
        parts.uri = format!("http://{authority}{pq}")
            .parse()
            .unwrap_or(parts.uri);
        parts.headers.remove(HOST);
    } else {
        parts.version = Version::HTTP_11;
        parts.uri = pq.parse().unwrap_or(parts.uri);
        if !parts.headers.contains_key(HOST)
            && let Ok(v) = HeaderValue::from_str(authority)
        {
            parts.headers.insert(HOST, v);
        }
    }
    let req = Request::from_parts(parts, body);
    // Built only when a new upstream tunnel is opened (a reused connection needs none).
    let th = || tunnel_headers(ctx, &dest.host);
    let r = inner
        .upstreams
        .send(&cluster, &ep, req, kind, admitted, th)
        .await;
    cluster.record_outcome(
        &ep.workload.uid,
        r.as_ref().ok().map(|(resp, _)| resp.status().as_u16()),
        eps.len(),
    );
    r
}

/// Attach telemetry (metrics + access log, on body completion) to a response.
fn finish(
    inner: &Arc<Inner>,
    ctx: &Arc<ConnCtx>,
    info: Info,
    resp: Response<RespBody>,
    flags: &'static str,
    lease: Option<Lease>,
) -> Response<RespBody> {
    let (mut parts, body) = resp.into_parts();
    if let Ok(v) = HeaderValue::from_str(&info.request_id) {
        parts.headers.entry("x-request-id").or_insert(v);
    }
    let code = parts.status.as_u16();
    let tracked = Tracked {
        inner: body,
        bytes: AtomicU64::new(0),
        done: Some(Done {
            waypoint: inner.clone(),
            ctx: ctx.clone(),
            info,
            code,
            flags,
            _lease: lease,
        }),
    };
    Response::from_parts(parts, tracked.boxed())
}

/// The 101 to the client, and a task relaying the upgraded stream that records telemetry
/// (and releases the upstream lease) when the stream ends.
fn finish_upgrade(
    inner: &Arc<Inner>,
    ctx: &Arc<ConnCtx>,
    info: Info,
    resp: Response<RespBody>,
    lease: Option<Lease>,
    client: hyper::upgrade::OnUpgrade,
) -> Response<RespBody> {
    let (mut parts, _) = resp.into_parts();
    let (Some(upstream), Some(lease)) = (
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>(),
        lease,
    ) else {
        // A 101 not from an endpoint (a direct response): nothing to relay to.
        let (r, f) = local_reply(502, "no upgraded upstream connection", "UPE");
        return finish(inner, ctx, info, r, f, None);
    };
    if let Ok(v) = HeaderValue::from_str(&info.request_id) {
        parts.headers.entry("x-request-id").or_insert(v);
    }
    let idle = lease
        .idle_timeout()
        .unwrap_or(crate::upgrade::DEFAULT_IDLE_TIMEOUT);
    let mut done = Done {
        waypoint: inner.clone(),
        ctx: ctx.clone(),
        info,
        code: parts.status.as_u16(),
        flags: "-",
        _lease: Some(lease),
    };
    let force = inner.drain.force_close();
    // Tracked by the drain: shutdown waits for the stream for the grace period, then cuts it.
    inner.drain.spawn(async move {
        let (moved, r) = crate::upgrade::relay(client, upstream, idle, force).await;
        if let Err(e) = &r {
            debug!(request_id = %done.info.request_id, "upgraded stream ended: {e}");
            done.flags = e.flag();
        }
        done.info.req_bytes += moved.from_client;
        done.report(moved.from_upstream);
    });
    Response::from_parts(parts, full(Bytes::new()))
}

struct Done {
    waypoint: Arc<Inner>,
    ctx: Arc<ConnCtx>,
    info: Info,
    code: u16,
    flags: &'static str,
    _lease: Option<Lease>,
}

impl Done {
    fn report(self, resp_bytes: u64) {
        let Done {
            waypoint,
            ctx,
            info,
            code,
            flags,
            ..
        } = self;
        let dst = info.dest.as_ref().map(|e| e.workload.clone());
        let src = ctx.src_workload.as_ref();
        let (svc_name, svc_ns) = match info.service.split_once('.') {
            Some((n, rest)) => (
                n.to_string(),
                rest.split('.').next().unwrap_or("").to_string(),
            ),
            None => (info.service.clone(), String::new()),
        };
        let unknown = || "unknown".to_string();
        let labels = RequestLabels {
            reporter: "waypoint".into(),
            source_workload: src.map(|w| w.workload_name.clone()).unwrap_or_else(unknown),
            // Kiali and Istio's dashboards group by these (the app/version labels as ztunnel
            // fills them: canonical name and revision).
            source_canonical_service: src
                .map(|w| w.canonical_name.clone())
                .unwrap_or_else(unknown),
            source_canonical_revision: src
                .map(|w| w.canonical_revision.clone())
                .unwrap_or_else(unknown),
            source_workload_namespace: ctx
                .peer_identity
                .as_ref()
                .map(|i| i.namespace().to_string())
                .unwrap_or_else(unknown),
            source_principal: ctx
                .peer_identity
                .as_ref()
                .map(|i| i.to_string())
                .unwrap_or_else(unknown),
            source_app: src
                .map(|w| w.canonical_name.clone())
                .unwrap_or_else(unknown),
            source_version: src
                .map(|w| w.canonical_revision.clone())
                .unwrap_or_else(unknown),
            source_cluster: src.map(|w| w.cluster_id.clone()).unwrap_or_else(unknown),
            destination_workload: dst
                .as_ref()
                .map(|w| w.workload_name.clone())
                .unwrap_or_else(unknown),
            destination_canonical_service: dst
                .as_ref()
                .map(|w| w.canonical_name.clone())
                .unwrap_or_else(unknown),
            destination_canonical_revision: dst
                .as_ref()
                .map(|w| w.canonical_revision.clone())
                .unwrap_or_else(unknown),
            destination_workload_namespace: dst
                .as_ref()
                .map(|w| w.namespace.clone())
                .unwrap_or_else(unknown),
            destination_principal: dst
                .as_ref()
                .map(|w| w.identity().to_string())
                .unwrap_or_else(unknown),
            destination_app: dst
                .as_ref()
                .map(|w| w.canonical_name.clone())
                .unwrap_or_else(unknown),
            destination_version: dst
                .as_ref()
                .map(|w| w.canonical_revision.clone())
                .unwrap_or_else(unknown),
            destination_service: if info.service.is_empty() {
                unknown()
            } else {
                info.service.clone()
            },
            destination_service_name: if svc_name.is_empty() {
                unknown()
            } else {
                svc_name
            },
            destination_service_namespace: if svc_ns.is_empty() { unknown() } else { svc_ns },
            destination_cluster: dst
                .as_ref()
                .map(|w| w.cluster_id.clone())
                .unwrap_or_else(unknown),
            request_protocol: info.protocol.into(),
            response_code: code.to_string(),
            grpc_response_status: String::new(),
            response_flags: flags.into(),
            connection_security_policy: "mutual_tls".into(),
        };
        let ms = info.started.elapsed().as_secs_f64() * 1000.0;
        let req_bytes = info.req_bytes
            + info
                .req_streamed
                .as_ref()
                .map_or(0, |n| n.load(Ordering::Relaxed));
        waypoint
            .l7_metrics
            .record(&labels, ms, req_bytes, resp_bytes);
        if let Some(span) = info.trace
            && let Some(tracer) = &*waypoint.tracer.load()
        {
            let target = ctx.target.to_string();
            let host = if info.service.is_empty() {
                target.rsplit_once(':').map_or(target.as_str(), |(h, _)| h)
            } else {
                &info.service
            };
            tracer.finish(
                *span,
                &crate::trace::Outcome {
                    host,
                    port: ctx.port,
                    method: &info.method,
                    protocol: info.protocol,
                    status: code,
                    response_flags: flags,
                    upstream_cluster: info.cluster.as_ref().map(|c| c.name.as_str()),
                    request_id: &info.request_id,
                    request_size: req_bytes,
                    response_size: resp_bytes,
                    peer: ctx.client_addr.ip(),
                },
            );
        }
        tracing::info!(
            target: "access",
            direction = "waypoint",
            method = %info.method,
            path = %info.path,
            authority = %info.authority,
            protocol = info.protocol,
            response_code = code,
            response_flags = flags,
            route = %info.route,
            request_id = %info.request_id,
            src_addr = %ctx.client_addr,
            src_identity = %labels.source_principal,
            dst_service = %labels.destination_service,
            dst_workload = %labels.destination_workload,
            upstream = info.dest.as_ref().map(|e| e.addr.to_string()).unwrap_or_default(),
            bytes_sent = req_bytes,
            bytes_recv = resp_bytes,
            duration_ms = ms as u64,
            "request complete"
        );
    }
}

/// A response body that reports telemetry and releases the upstream lease when finished.
struct Tracked {
    inner: RespBody,
    bytes: AtomicU64,
    done: Option<Done>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            d.report(self.bytes.load(Ordering::Relaxed));
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(d) = this.done.take() {
                    d.report(this.bytes.load(Ordering::Relaxed));
                }
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
