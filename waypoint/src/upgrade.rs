//! HTTP/1.1 Upgrade (WebSocket and any other protocol but `h2c`), forwarded as Envoy does by
//! default.
//!
//! An upgrade request goes through the whole pipeline of [`crate::http`] (authz, route,
//! rewrite, header operations, fault, rate limit, destination, load balancing, outlier
//! detection) with `Connection: upgrade` and `Upgrade` kept, and is sent once — no retries, no
//! mirror — on an upstream HTTP/1.1 connection of its own
//! ([`crate::upstream::ConnKind::Upgrade`]), even when the cluster would otherwise use HTTP/2.
//! A route timeout bounds the wait for the response head only. When the endpoint answers
//! `101 Switching Protocols`, the 101 goes back to the client and [`relay`] then copies bytes
//! both ways between the two upgraded connections until both directions have ended (an EOF on
//! one side shuts down the write side of the other, the reverse direction keeps flowing), the
//! stream has been idle for the idle timeout, or the waypoint shuts down. Any other answer is
//! an ordinary response.
//!
//! `h2c` is not forwarded: it is an upgrade of this hop's connection to HTTP/2, not an
//! end-to-end protocol. It is removed from an `Upgrade` list that offers others
//! (`websocket, h2c` goes upstream as `websocket`); alone, the header is dropped as hop-by-hop. HTTP/2 downstream
//! (extended CONNECT, RFC 8441) is not supported: HTTP/2 forbids the `upgrade` header, which is
//! dropped.
//!
//! Telemetry: the request counts once in `istio_requests_total` (`response_code="101"`), and
//! its access-log line, duration and byte counts are recorded when the upgraded stream ends,
//! as Envoy logs an upgraded stream at its end.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{CONNECTION, UPGRADE};
use http::{HeaderMap, HeaderValue, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Idle timeout of an upgraded stream when the destination sets none
/// (`connectionPool.http.idleTimeout`): an hour, Envoy's default connection idle timeout, so
/// a quiet WebSocket is not cut while an abandoned one does not stay forever.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Time for both connections to be handed over once the 101 is on its way: the client's after
/// the 101 has been written, the endpoint's at once.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an upgraded stream ended other than by both sides closing.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("client connection not handed over after the 101: {0}")]
    Downstream(hyper::Error),
    #[error("upstream connection not handed over after the 101: {0}")]
    Upstream(hyper::Error),
    #[error("upgraded connections not handed over within {0:?}")]
    HandoverTimeout(Duration),
    #[error("upgraded stream idle for {0:?}")]
    Idle(Duration),
    #[error("upgraded stream failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("upgraded stream cut: the waypoint is shutting down")]
    Shutdown,
}

impl RelayError {
    /// Envoy response flag for the access log and `istio_requests_total`.
    pub fn flag(&self) -> &'static str {
        match self {
            RelayError::Downstream(_) | RelayError::Shutdown => "DC",
            RelayError::Upstream(_) | RelayError::HandoverTimeout(_) => "UC",
            RelayError::Idle(_) => "SI",
            RelayError::Io(_) => "-",
        }
    }
}

/// Whether a token list header value (`Connection`, `Upgrade`) holds `token`.
fn has_token(v: &HeaderValue, token: &[u8]) -> bool {
    v.as_bytes()
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// The `Upgrade` value to forward when this request asks to switch protocols: HTTP/1.1,
/// `Connection: upgrade` and an `Upgrade` offering some protocol other than `h2c` (which is
/// taken out of the list). A normal request costs a version compare and one header lookup.
pub fn requested(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let proto = headers.get(UPGRADE)?;
    let proto = if has_token(proto, b"h2c") {
        without_token(proto, b"h2c")?
    } else if proto.as_bytes().trim_ascii().is_empty() {
        return None;
    } else {
        proto.clone()
    };
    headers
        .get_all(CONNECTION)
        .iter()
        .any(|v| has_token(v, b"upgrade"))
        .then_some(proto)
}

/// `v` without `token` and empty list items, `None` when nothing is left.
fn without_token(v: &HeaderValue, token: &[u8]) -> Option<HeaderValue> {
    let kept: Vec<&[u8]> = v
        .as_bytes()
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case(token))
        .collect();
    if kept.is_empty() {
        return None;
    }
    // The parts come from a valid header value, so the joined value is valid too.
    HeaderValue::from_bytes(&kept.join(&b", "[..])).ok()
}

/// Bytes that went through an upgraded stream.
#[derive(Debug, Default)]
pub struct Transferred {
    /// From the client to the endpoint.
    pub from_client: u64,
    /// From the endpoint to the client.
    pub from_upstream: u64,
}

/// Counters shared by both directions and the idle watch (one task: plain atomics).
struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last read that carried data.
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has been read for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = self.start + last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// An upgraded connection that counts what is read from it and records activity.
struct Metered<'a, T> {
    io: T,
    read: &'a AtomicU64,
    activity: &'a Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.read.fetch_add(n, Ordering::Relaxed);
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Wait for both connections to be handed over, then copy bytes both ways until both
/// directions have ended (half-close: an EOF from one side shuts down the write side of the
/// other), nothing moved for `idle`, or `force` is cancelled. Buffers are tokio's fixed 8 KiB
/// per direction. Returns what went through either way, whatever the outcome.
pub async fn relay(
    client: OnUpgrade,
    upstream: OnUpgrade,
    idle: Duration,
    force: CancellationToken,
) -> (Transferred, Result<(), RelayError>) {
    let handover = async {
        let (c, u) = tokio::join!(client, upstream);
        Ok::<_, RelayError>((
            c.map_err(RelayError::Downstream)?,
            u.map_err(RelayError::Upstream)?,
        ))
    };
    let (c, u) = match tokio::time::timeout(HANDOVER_TIMEOUT, handover).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return (Transferred::default(), Err(e)),
        Err(_) => {
            return (
                Transferred::default(),
                Err(RelayError::HandoverTimeout(HANDOVER_TIMEOUT)),
            );
        }
    };
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let (from_client, from_upstream) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut c = Metered {
        io: TokioIo::new(c),
        read: &from_client,
        activity: &activity,
    };
    let mut u = Metered {
        io: TokioIo::new(u),
        read: &from_upstream,
        activity: &activity,
    };
    let r = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut c, &mut u) => {
            r.map(|_| ()).map_err(RelayError::from)
        }
        () = activity.idle(idle) => Err(RelayError::Idle(idle)),
        () = force.cancelled() => Err(RelayError::Shutdown),
    };
    let t = Transferred {
        from_client: from_client.load(Ordering::Relaxed),
        from_upstream: from_upstream.load(Ordering::Relaxed),
    };
    (t, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn detects_upgrades_but_not_h2c_nor_http2() {
        let ws = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(
            requested(Version::HTTP_11, &ws)
                .as_ref()
                .map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        let split = headers(&[
            ("connection", "keep-alive"),
            ("connection", "upgrade"),
            ("upgrade", "custom/1"),
        ]);
        assert!(requested(Version::HTTP_11, &split).is_some());
        // h2c is a hop-by-hop upgrade: taken out of a list that offers more.
        let both = headers(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket, H2C,, custom/2"),
        ]);
        assert_eq!(
            requested(Version::HTTP_11, &both)
                .as_ref()
                .map(|v| v.as_bytes()),
            Some(&b"websocket, custom/2"[..])
        );
        // HTTP/2 forbids Upgrade (RFC 9113 §8.2.2); HTTP/1.0 has none.
        assert!(requested(Version::HTTP_2, &ws).is_none());
        assert!(requested(Version::HTTP_10, &ws).is_none());
        for h in [
            headers(&[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", "h2c"),
            ]),
            headers(&[("connection", "upgrade"), ("upgrade", "h2c, ,")]),
            headers(&[("upgrade", "websocket")]),
            headers(&[("connection", "upgrade-not"), ("upgrade", "websocket")]),
            headers(&[("connection", "upgrade"), ("upgrade", " ")]),
            headers(&[("connection", "upgrade")]),
            HeaderMap::new(),
        ] {
            assert!(requested(Version::HTTP_11, &h).is_none(), "{h:?}");
        }
    }

    #[tokio::test]
    async fn idle_watch_restarts_on_activity() {
        let a = Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        };
        let idle = Duration::from_millis(200);
        tokio::time::sleep(Duration::from_millis(120)).await;
        a.touch();
        a.idle(idle).await;
        // The read at 120 ms moved the deadline from 200 ms to 320 ms.
        let e = a.start.elapsed();
        assert!(e >= Duration::from_millis(320), "{e:?}");
        assert!(e < Duration::from_secs(2), "{e:?}");
    }
}
