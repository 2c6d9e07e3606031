//! HBONE server: accepts mTLS connections, serves HTTP/2 `CONNECT` requests.
//!
//! The server owns the protocol: the TLS handshake with the certificate of the workload the
//! connection was addressed to, HTTP/2 settings, and request validation with Istio's status
//! codes (400 for a non-CONNECT method, an unparsable authority or a port of the proxy itself).
//! What a valid request means (which workload, policy, upstream) is the [`ConnectHandler`]'s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, Method, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, Span, debug, info_span, warn};

use super::{H2Config, H2Stream, h2_io_error, next_connection_id};
use crate::certs::WorkloadCertificate;
use crate::drain::Drain;
use crate::identity::Identity;
use crate::telemetry::InstrumentVerbose;

/// One accepted HBONE (TLS + HTTP/2) connection.
#[derive(Debug, Clone)]
pub struct ServerConn {
    pub id: u64,
    pub peer: SocketAddr,
    /// Local address the connection arrived on (the original destination when steered here).
    pub local: SocketAddr,
    /// The client's SPIFFE identity from its certificate.
    pub peer_identity: Option<Identity>,
    /// The identity we presented.
    pub local_identity: Identity,
}

/// The CONNECT target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `ip:port`, the usual form.
    Addr(SocketAddr),
    /// `hostname:port`: a service hostname (double-HBONE / waypoint forms).
    Host(String, u16),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Host(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

impl Target {
    pub fn port(&self) -> u16 {
        match self {
            Target::Addr(a) => a.port(),
            Target::Host(_, p) => *p,
        }
    }

    /// Parse an HTTP/2 `:authority` of a CONNECT request.
    pub fn parse(authority: &str) -> Option<Target> {
        if let Ok(a) = authority.parse::<SocketAddr>() {
            return Some(Target::Addr(a));
        }
        let (host, port) = authority.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let valid_host = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        (valid_host && port != 0).then(|| Target::Host(host.to_ascii_lowercase(), port))
    }
}

/// A validated CONNECT request.
#[derive(Debug)]
pub struct InboundRequest {
    pub target: Target,
    pub headers: HeaderMap,
    /// The stream's span (`connect{stream}` inside `hbone_server{conn, peer}`).
    pub span: Span,
}

/// The answer to a CONNECT request.
pub struct Responder {
    respond: SendResponse<Bytes>,
    recv: RecvStream,
}

impl Responder {
    /// Refuse the tunnel with `status` (Istio: 400 bad request, 401 denied, 503 unavailable).
    pub fn reject(mut self, status: StatusCode) {
        let resp = Response::builder().status(status).body(());
        if let Ok(resp) = resp {
            let _ = self.respond.send_response(resp, true);
        }
    }

    /// Accept the tunnel: answer 200 (with `headers`, e.g. response baggage) and return it.
    pub fn accept(mut self, headers: HeaderMap) -> std::io::Result<H2Stream> {
        let mut resp = Response::builder().status(StatusCode::OK);
        if let Some(h) = resp.headers_mut() {
            h.extend(headers);
        }
        let resp = resp.body(()).map_err(std::io::Error::other)?;
        let send = self
            .respond
            .send_response(resp, false)
            .map_err(h2_io_error)?;
        Ok(H2Stream::new(send, self.recv, None))
    }
}

/// What the proxy does with HBONE connections and requests.
#[async_trait::async_trait]
pub trait ConnectHandler: Send + Sync + 'static {
    /// The certificate to present on a connection that arrived at `local`.
    async fn certificate(&self, local: SocketAddr) -> Result<Arc<WorkloadCertificate>, String>;

    /// A CONNECT request that passed protocol validation. Must answer through `responder`.
    async fn handle(&self, conn: Arc<ServerConn>, req: InboundRequest, responder: Responder);

    /// A connection that failed before any request (TLS or HTTP/2 handshake), for metrics.
    fn handshake_failed(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        flag: &'static str,
        reason: &str,
    );

    /// Ports of the proxy's own listeners, which a CONNECT must never target (loops).
    fn is_illegal_port(&self, port: u16) -> bool;

    /// True when [`ConnectHandler::handle`] enters `req.span` itself wherever it logs above
    /// debug level: the server then skips entering the span on every poll of the tunnel
    /// unless debug logging is on ([`crate::telemetry::InstrumentVerbose`]).
    fn enters_span_itself(&self) -> bool {
        false
    }
}

/// Accept HBONE connections on `listener` until `drain` says stop.
pub async fn serve(
    listener: TcpListener,
    cfg: H2Config,
    handler: Arc<dyn ConnectHandler>,
    drain: Drain,
) {
    let stop = drain.stopping();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("HBONE accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        let cfg = cfg.clone();
        let d = drain.clone();
        let id = next_connection_id();
        let span = info_span!("hbone_server", conn = id, %peer);
        drain.spawn(serve_conn(id, tcp, peer, cfg, handler, d, span));
    }
}

async fn serve_conn(
    id: u64,
    tcp: TcpStream,
    peer: SocketAddr,
    cfg: H2Config,
    handler: Arc<dyn ConnectHandler>,
    drain: Drain,
    span: Span,
) {
    let Some((conn, info)) = establish(id, tcp, peer, &cfg, handler.as_ref())
        .instrument(span.clone())
        .await
    else {
        return;
    };
    // The connection driver is polled for every frame: its span is entered only when debug
    // logging is on (streams get it as their parent explicitly).
    serve_streams(conn, info, handler, drain, span.clone())
        .instrument_verbose(span)
        .await
}

type ServerConnection = h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, Bytes>;

/// TLS and HTTP/2 handshakes; `None` when they failed (reported to the handler).
async fn establish(
    id: u64,
    tcp: TcpStream,
    peer: SocketAddr,
    cfg: &H2Config,
    handler: &dyn ConnectHandler,
) -> Option<(ServerConnection, Arc<ServerConn>)> {
    let local = match tcp.local_addr() {
        Ok(a) => a,
        Err(e) => {
            debug!("connection gone before handshake: {e}");
            return None;
        }
    };
    let _ = tcp.set_nodelay(true);
    let cert = match handler.certificate(local).await {
        Ok(c) => c,
        Err(reason) => {
            handler.handshake_failed(peer, local, "TLS_FAILURE", &reason);
            debug!("no certificate for {local}: {reason}");
            return None;
        }
    };
    let tls_cfg = match cert.server_config() {
        Ok(c) => c,
        Err(e) => {
            handler.handshake_failed(peer, local, "TLS_FAILURE", &e.to_string());
            warn!("cannot build TLS config for {}: {e}", cert.identity);
            return None;
        }
    };
    let tls = match tokio::time::timeout(
        cfg.handshake_timeout,
        tokio_rustls::TlsAcceptor::from(tls_cfg).accept(tcp),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = crate::tls::describe_handshake_error(&e);
            debug!("TLS handshake failed: {reason}");
            handler.handshake_failed(peer, local, "TLS_FAILURE", &reason);
            return None;
        }
        Err(_) => {
            handler.handshake_failed(peer, local, "TLS_FAILURE", "TLS handshake timed out");
            return None;
        }
    };
    let peer_identity = crate::tls::peer_identity(tls.get_ref().1);
    let conn_info = Arc::new(ServerConn {
        id,
        peer,
        local,
        peer_identity,
        local_identity: cert.identity.clone(),
    });
    let handshake = h2::server::Builder::new()
        .initial_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(cfg.max_frame_size)
        .max_header_list_size(cfg.server_max_header_list)
        .max_send_buffer_size(cfg.server_send_buffer)
        .max_concurrent_streams(cfg.server_max_concurrent_streams)
        .handshake::<_, Bytes>(tls);
    let conn = match tokio::time::timeout(cfg.handshake_timeout, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            handler.handshake_failed(peer, local, "H2_HANDSHAKE_FAILURE", &e.to_string());
            debug!("HTTP/2 handshake failed: {e}");
            return None;
        }
        Err(_) => {
            handler.handshake_failed(
                peer,
                local,
                "H2_HANDSHAKE_FAILURE",
                "HTTP/2 handshake timed out",
            );
            return None;
        }
    };
    debug!(peer_identity = ?conn_info.peer_identity, "HBONE connection established");
    Some((conn, conn_info))
}

/// Accept CONNECT streams until the connection ends or shutdown cuts it.
async fn serve_streams(
    mut conn: ServerConnection,
    conn_info: Arc<ServerConn>,
    handler: Arc<dyn ConnectHandler>,
    drain: Drain,
    span: Span,
) {
    let stop = drain.stopping();
    let force = drain.force_close();
    let mut draining = false;
    loop {
        let next = tokio::select! {
            _ = stop.cancelled(), if !draining => {
                // Tell the client to open new streams elsewhere; running streams go on.
                conn.graceful_shutdown();
                draining = true;
                continue;
            }
            _ = force.cancelled() => return,
            n = conn.accept() => n,
        };
        match next {
            None => break,
            Some(Err(e)) => {
                debug!("HBONE connection error: {e}");
                break;
            }
            Some(Ok((req, respond))) => {
                let handler = handler.clone();
                let info = conn_info.clone();
                let stream_id = respond.stream_id().as_u32();
                let span = info_span!(parent: &span, "connect", stream = stream_id);
                let quiet = handler.enters_span_itself();
                let stream = dispatch(handler, info, req, respond, span.clone());
                if quiet {
                    drain.spawn(stream.instrument_verbose(span));
                } else {
                    drain.spawn(stream.instrument(span));
                }
            }
        }
    }
}

async fn dispatch(
    handler: Arc<dyn ConnectHandler>,
    conn: Arc<ServerConn>,
    req: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
    span: Span,
) {
    let (parts, recv) = req.into_parts();
    let responder = Responder { respond, recv };
    if parts.method != Method::CONNECT {
        debug!(method = %parts.method, "refusing non-CONNECT request");
        responder.reject(StatusCode::BAD_REQUEST);
        return;
    }
    let Some(target) = parts
        .uri
        .authority()
        .and_then(|a| Target::parse(a.as_str()))
    else {
        debug!(uri = %parts.uri, "refusing CONNECT with an unparsable authority");
        responder.reject(StatusCode::BAD_REQUEST);
        return;
    };
    if handler.is_illegal_port(target.port()) {
        debug!(%target, "refusing CONNECT to one of the proxy's own ports");
        responder.reject(StatusCode::BAD_REQUEST);
        return;
    }
    handler
        .handle(
            conn,
            InboundRequest {
                target,
                headers: parts.headers,
                span,
            },
            responder,
        )
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_targets() {
        assert_eq!(
            Target::parse("10.0.0.5:8080"),
            Some(Target::Addr("10.0.0.5:8080".parse().unwrap()))
        );
        assert_eq!(
            Target::parse("[::1]:80"),
            Some(Target::Addr("[::1]:80".parse().unwrap()))
        );
        assert_eq!(
            Target::parse("Reviews.default.svc.cluster.local:9080"),
            Some(Target::Host(
                "reviews.default.svc.cluster.local".into(),
                9080
            ))
        );
        for bad in [
            "",
            "10.0.0.5",
            "10.0.0.5:",
            ":80",
            "a b:80",
            "host:99999",
            "host:0",
            "[::1]",
        ] {
            assert_eq!(Target::parse(bad), None, "{bad}");
        }
    }
}
