//! The three operational HTTP servers every proxy runs, on Istio's ports:
//!
//! | port | server | endpoints |
//! |---|---|---|
//! | 15000 (loopback only) | [`serve_admin`] | `/`, `/config_dump`, `/logging`, `/quitquitquit` |
//! | 15020 | [`serve_metrics`] | `/metrics`, `/stats/prometheus` |
//! | 15021 | [`serve_readiness`] | `/healthz/ready`, `/healthz/live` |
//!
//! All three share one small HTTP/1 server loop: a header-read timeout and a connection lifetime cap
//! so a stuck client cannot hold a slot forever, a bound on concurrent connections, one task per
//! connection so a bad client never stalls others, and a graceful stop when the shutdown token is
//! cancelled (in-flight responses finish, bounded by a grace period).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::telemetry::LogHandle;

/// A client must send its complete request head within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections (incl. idle keep-alive ones) are closed gracefully after this long.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// How long in-flight requests may take to finish once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Concurrent connections per server; more are closed on accept.
const MAX_CONNECTIONS: usize = 128;
/// Request heads larger than this are rejected by hyper (its minimum is 8 KiB).
const MAX_HEAD_SIZE: usize = 16 * 1024;
/// Pause after a failed accept (e.g. EMFILE) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
/// prometheus-client writes OpenMetrics text (with `# EOF`), as Istio's ztunnel does.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Errors that stop an admin server from starting.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "refusing to serve the admin API on {0}: it must listen on a loopback address \
         (127.0.0.1 or ::1) because it can dump config and stop the proxy"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot determine the admin listener's address: {0}")]
    LocalAddr(#[source] std::io::Error),
}

/// What the admin server shows; implemented by each proxy.
pub trait AdminHandler: Send + Sync + 'static {
    /// The proxy's current configuration and state for `/config_dump`.
    fn config_dump(&self) -> serde_json::Value;

    /// Envoy-style `/stats` text (`cluster.<name>.<stat>: <value>` lines), for a proxy that
    /// keeps such counters (the waypoint); `None`: `/stats` is 404.
    fn stats(&self) -> Option<String> {
        None
    }
}

type Body = Full<Bytes>;

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut body = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    respond(status, TEXT, body)
}

fn not_found(path: &str) -> Response<Body> {
    text(StatusCode::NOT_FOUND, format!("no such endpoint: {path}"))
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; use {allow}"),
    );
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    resp
}

fn is_get(m: &Method) -> bool {
    m == Method::GET || m == Method::HEAD
}

/// Value of `key` in a URL query string, percent-decoded. `None` when absent or undecodable.
fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k)? == key {
            percent_decode(v)
        } else {
            None
        }
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Serve one HTTP/1 connection until it ends, ages out or shutdown starts.
async fn serve_connection<F>(
    server: &'static str,
    stream: TcpStream,
    peer: SocketAddr,
    route: Arc<F>,
    shutdown: CancellationToken,
) where
    F: Fn(&Request<Incoming>) -> Response<Body> + Send + Sync + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        let resp = route(&req);
        async move { Ok::<_, Infallible>(resp) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_SIZE)
        .serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await.unwrap_or(Ok(()))
        }
        _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await.unwrap_or(Ok(()))
        }
    };
    if let Err(e) = result {
        tracing::debug!(server, %peer, error = %e, "connection ended with an error");
    }
}

/// The accept loop shared by the three servers. `route` answers a request synchronously: none of
/// the endpoints reads a body, which keeps them trivially bounded.
async fn serve_http<F>(
    server: &'static str,
    listener: TcpListener,
    shutdown: CancellationToken,
    route: F,
) where
    F: Fn(&Request<Incoming>) -> Response<Body> + Send + Sync + 'static,
{
    let route = Arc::new(route);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(server, %addr, "listening");
    }
    loop {
        // Reap finished connection tasks so the set stays bounded by MAX_CONNECTIONS.
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(server, error = %e, "accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(server, %peer, "too many connections; closing new one");
            continue;
        };
        let route = route.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            let _slot = slot;
            serve_connection(server, stream, peer, route, shutdown).await;
        });
    }
    drop(listener);
    // Connections saw the same token and are finishing their in-flight requests.
    let drained = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(server, "connections did not finish in time; aborting them");
    }
    tracing::info!(server, "stopped");
}

const ADMIN_INDEX: &str = "zmesh admin endpoints:\n\
    GET  /                  this list\n\
    GET  /config_dump       current configuration and state (JSON)\n\
    GET  /stats             Envoy-style cluster counters (waypoint)\n\
    GET  /logging           current log filter\n\
    POST /logging?level=F   set the log filter (RUST_LOG syntax, e.g. info,zmesh_core=debug)\n\
    POST /quitquitquit      shut the proxy down\n";

fn admin_route(
    req: &Request<Incoming>,
    handler: &dyn AdminHandler,
    logs: Option<&LogHandle>,
    shutdown: &CancellationToken,
) -> Response<Body> {
    let method = req.method();
    match req.uri().path() {
        "/" => {
            if !is_get(method) {
                return method_not_allowed("GET");
            }
            text(StatusCode::OK, ADMIN_INDEX)
        }
        "/config_dump" => {
            if !is_get(method) {
                return method_not_allowed("GET");
            }
            match serde_json::to_vec_pretty(&handler.config_dump()) {
                Ok(body) => respond(StatusCode::OK, JSON, body),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot serialize config dump: {e}"),
                ),
            }
        }
        "/stats" => {
            if !is_get(method) {
                return method_not_allowed("GET");
            }
            match handler.stats() {
                Some(body) => text(StatusCode::OK, body),
                None => text(
                    StatusCode::NOT_FOUND,
                    "this proxy keeps no /stats counters\n",
                ),
            }
        }
        "/logging" => {
            let Some(logs) = logs else {
                return text(
                    StatusCode::NOT_IMPLEMENTED,
                    "log level control is not available in this process",
                );
            };
            if is_get(method) {
                return text(
                    StatusCode::OK,
                    format!("current log level is {}", logs.current()),
                );
            }
            if method != Method::POST {
                return method_not_allowed("GET, POST");
            }
            let Some(level) = query_param(req.uri().query(), "level") else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "missing query parameter: use POST /logging?level=<filter>, \
                     e.g. level=info,zmesh_core=debug",
                );
            };
            match logs.set(&level) {
                Ok(()) => {
                    tracing::info!(filter = %logs.current(), "log filter changed via admin API");
                    text(
                        StatusCode::OK,
                        format!("current log level is {}", logs.current()),
                    )
                }
                Err(e) => text(StatusCode::BAD_REQUEST, e.to_string()),
            }
        }
        "/quitquitquit" => {
            if method != Method::POST {
                return method_not_allowed("POST");
            }
            tracing::info!("shutdown requested via admin API (/quitquitquit)");
            shutdown.cancel();
            text(StatusCode::OK, "OK")
        }
        other => not_found(other),
    }
}

/// Serve the admin API (Istio port 15000) until `shutdown` is cancelled.
///
/// The listener must be bound to a loopback address; anything else is refused with
/// [`AdminError::NotLoopback`]. `POST /quitquitquit` cancels `shutdown` — pass the process-wide token
/// so it stops the proxy (the admin server itself then stops too, after answering).
/// `/logging` answers 501 when `logs` is `None`.
pub async fn serve_admin(
    listener: TcpListener,
    handler: Arc<dyn AdminHandler>,
    logs: Option<LogHandle>,
    shutdown: CancellationToken,
) -> Result<(), AdminError> {
    let addr = listener.local_addr().map_err(AdminError::LocalAddr)?;
    if !addr.ip().to_canonical().is_loopback() {
        return Err(AdminError::NotLoopback(addr));
    }
    let token = shutdown.clone();
    serve_http("admin", listener, shutdown, move |req| {
        admin_route(req, handler.as_ref(), logs.as_ref(), &token)
    })
    .await;
    Ok(())
}

/// Serve Prometheus metrics (Istio port 15020) on `/metrics` and `/stats/prometheus` until
/// `shutdown` is cancelled. The body is OpenMetrics text.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), AdminError> {
    serve_http("metrics", listener, shutdown, move |req| {
        match req.uri().path() {
            "/metrics" | "/stats/prometheus" => {
                if !is_get(req.method()) {
                    return method_not_allowed("GET");
                }
                respond(StatusCode::OK, OPENMETRICS, metrics.encode())
            }
            other => not_found(other),
        }
    })
    .await;
    Ok(())
}

#[derive(Debug, Default)]
struct ReadyState {
    next_id: u64,
    pending: BTreeMap<u64, String>,
}

/// Tracks the startup tasks that must finish before the proxy reports ready (e.g. first xDS
/// response, first certificate).
#[derive(Debug, Default)]
pub struct Readiness {
    state: Arc<Mutex<ReadyState>>,
}

impl Readiness {
    pub fn new() -> Arc<Self> {
        Arc::new(Readiness::default())
    }

    /// Add a task that blocks readiness until its blocker is released.
    pub fn register(&self, name: &str) -> ReadyBlocker {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let id = st.next_id;
        st.next_id += 1;
        st.pending.insert(id, name.to_string());
        ReadyBlocker {
            state: self.state.clone(),
            id,
        }
    }

    /// True when no registered task is pending.
    pub fn is_ready(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pending
            .is_empty()
    }

    /// Names of the pending tasks, sorted (a name registered twice appears twice).
    pub fn pending(&self) -> Vec<String> {
        let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut names: Vec<String> = st.pending.values().cloned().collect();
        names.sort();
        names
    }
}

/// Holds readiness back until released.
///
/// Releasing is [`ready`](Self::ready) **or dropping**: a task that ends (or panics) without
/// reporting must not keep the proxy unready forever — liveness of the task is someone else's
/// concern. Keep the blocker alive for as long as the task is not done.
#[derive(Debug)]
#[must_use = "dropping a ReadyBlocker marks its task ready immediately"]
pub struct ReadyBlocker {
    state: Arc<Mutex<ReadyState>>,
    id: u64,
}

impl ReadyBlocker {
    /// Mark this task ready.
    pub fn ready(self) {
        // Drop does the work.
    }
}

impl Drop for ReadyBlocker {
    fn drop(&mut self) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pending
            .remove(&self.id);
    }
}

/// Serve `/healthz/ready` (Istio port 15021) until `shutdown` is cancelled: 200 `ready` once every
/// registered task is ready, else 503 listing the pending ones.
pub async fn serve_readiness(
    listener: TcpListener,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> Result<(), AdminError> {
    serve_http("readiness", listener, shutdown, move |req| {
        match req.uri().path() {
            "/healthz/ready" => {
                if !is_get(req.method()) {
                    return method_not_allowed("GET");
                }
                let pending = readiness.pending();
                if pending.is_empty() {
                    text(StatusCode::OK, "ready")
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {}", pending.join(", ")),
                    )
                }
            }
            // Liveness: answered by the process's own event loop (a TCP probe is answered by the
            // kernel even when the process is wedged). Always 200 while it runs: an unready
            // proxy (control plane away) must not be restarted and lose its last good config.
            "/healthz/live" => {
                if !is_get(req.method()) {
                    return method_not_allowed("GET");
                }
                text(StatusCode::OK, "alive")
            }
            other => not_found(other),
        }
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct TestHandler;

    impl AdminHandler for TestHandler {
        fn config_dump(&self) -> serde_json::Value {
            serde_json::json!({"workloads": [{"name": "echo", "namespace": "default"}]})
        }
    }

    struct Reply {
        status: StatusCode,
        content_type: String,
        body: String,
    }

    /// One real HTTP/1 request over a fresh connection.
    async fn request(addr: SocketAddr, method: Method, uri: &str) -> Reply {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
            .await
            .expect("response in time")
            .expect("response");
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Reply {
            status,
            content_type,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    async fn local() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = l.local_addr().expect("addr");
        (l, a)
    }

    async fn start_admin(
        logs: Option<LogHandle>,
    ) -> (
        SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<Result<(), AdminError>>,
    ) {
        let (l, addr) = local().await;
        let token = CancellationToken::new();
        let task = tokio::spawn(serve_admin(l, Arc::new(TestHandler), logs, token.clone()));
        (addr, token, task)
    }

    #[tokio::test]
    async fn admin_index_and_config_dump() {
        let (addr, token, task) = start_admin(None).await;
        let r = request(addr, Method::GET, "/").await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body.contains("/config_dump") && r.body.contains("/quitquitquit"));

        let r = request(addr, Method::GET, "/config_dump").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.content_type, JSON);
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        assert_eq!(v["workloads"][0]["name"], "echo");

        let r = request(addr, Method::GET, "/logging").await;
        assert_eq!(r.status, StatusCode::NOT_IMPLEMENTED);

        token.cancel();
        task.await.expect("join").expect("serve");
    }

    #[tokio::test]
    async fn admin_logging_get_set_and_bad_filter() {
        let logs = LogHandle::detached("info").expect("filter");
        let (addr, token, task) = start_admin(Some(logs.clone())).await;

        let r = request(addr, Method::GET, "/logging").await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body.contains("info"), "{}", r.body);

        let r = request(
            addr,
            Method::POST,
            "/logging?level=warn%2Czmesh_core%3A%3Ahbone%3Ddebug",
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let now = logs.current();
        assert!(
            now.contains("zmesh_core::hbone=debug") && now.contains("warn"),
            "{now}"
        );

        let r = request(addr, Method::POST, "/logging?level=zmesh=notalevel").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.body.contains("invalid log filter"), "{}", r.body);
        assert_eq!(logs.current(), now, "bad filter must not change anything");

        let r = request(addr, Method::POST, "/logging").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);

        let r = request(addr, Method::DELETE, "/logging").await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);

        token.cancel();
        task.await.expect("join").expect("serve");
    }

    #[tokio::test]
    async fn admin_404_and_405() {
        let (addr, token, task) = start_admin(None).await;
        assert_eq!(
            request(addr, Method::GET, "/nope").await.status,
            StatusCode::NOT_FOUND
        );
        // A proxy without Envoy-style counters (this handler's default) has no /stats.
        assert_eq!(
            request(addr, Method::GET, "/stats").await.status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            request(addr, Method::POST, "/config_dump").await.status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        let r = request(addr, Method::GET, "/quitquitquit").await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(!token.is_cancelled(), "GET must not shut down");
        token.cancel();
        task.await.expect("join").expect("serve");
    }

    #[tokio::test]
    async fn admin_quitquitquit_cancels_token_and_stops() {
        let (addr, token, task) = start_admin(None).await;
        let r = request(addr, Method::POST, "/quitquitquit").await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(token.is_cancelled());
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("server stops after quitquitquit")
            .expect("join")
            .expect("serve");
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }

    #[tokio::test]
    async fn admin_refuses_non_loopback_bind() {
        let l = TcpListener::bind("0.0.0.0:0").await.expect("bind");
        let err = serve_admin(l, Arc::new(TestHandler), None, CancellationToken::new())
            .await
            .expect_err("must refuse");
        assert!(matches!(err, AdminError::NotLoopback(_)));
        assert!(err.to_string().contains("loopback"));
    }

    #[tokio::test]
    async fn slow_client_does_not_block_others() {
        let (addr, token, task) = start_admin(None).await;
        // Half a request head, never finished.
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /config_dump HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        let r = request(addr, Method::GET, "/config_dump").await;
        assert_eq!(r.status, StatusCode::OK);
        token.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("stops despite the slow client")
            .expect("join")
            .expect("serve");
        // The server closed the half-open connection on shutdown.
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf))
            .await
            .expect("closed in time");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    #[tokio::test]
    async fn metrics_endpoints_serve_encoded_registry() {
        let metrics = Metrics::new("ztunnel");
        let (l, addr) = local().await;
        let token = CancellationToken::new();
        let task = tokio::spawn(serve_metrics(l, metrics, token.clone()));
        for path in ["/metrics", "/stats/prometheus"] {
            let r = request(addr, Method::GET, path).await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.content_type, OPENMETRICS);
            assert!(
                r.body.contains("istio_build{component=\"ztunnel\""),
                "{}",
                r.body
            );
            assert!(r.body.contains("process_open_fds"));
        }
        assert_eq!(
            request(addr, Method::GET, "/other").await.status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            request(addr, Method::POST, "/metrics").await.status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        token.cancel();
        task.await.expect("join").expect("serve");
    }

    #[tokio::test]
    async fn readiness_503_until_blockers_ready() {
        let readiness = Readiness::new();
        let xds = readiness.register("xds");
        let cert = readiness.register("certificate");
        let (l, addr) = local().await;
        let token = CancellationToken::new();
        let task = tokio::spawn(serve_readiness(l, readiness.clone(), token.clone()));

        let r = request(addr, Method::GET, "/healthz/ready").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.body.contains("certificate, xds"), "{}", r.body);
        let live = request(addr, Method::GET, "/healthz/live").await;
        assert_eq!(
            (live.status, live.body.as_str()),
            (StatusCode::OK, "alive\n")
        );

        xds.ready();
        let r = request(addr, Method::GET, "/healthz/ready").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(readiness.pending(), vec!["certificate".to_string()]);

        drop(cert); // dropping counts as ready
        assert!(readiness.is_ready());
        let r = request(addr, Method::GET, "/healthz/ready").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, "ready\n");

        assert_eq!(
            request(addr, Method::GET, "/healthz").await.status,
            StatusCode::NOT_FOUND
        );
        token.cancel();
        task.await.expect("join").expect("serve");
    }

    #[test]
    fn query_param_decoding() {
        assert_eq!(
            query_param(Some("a=1&level=info%2Cx%3Ddebug"), "level").as_deref(),
            Some("info,x=debug")
        );
        assert_eq!(
            query_param(Some("level=x=debug"), "level").as_deref(),
            Some("x=debug")
        );
        assert_eq!(query_param(Some("level=%zz"), "level"), None);
        assert_eq!(query_param(None, "level"), None);
    }
}
