//! HBONE: one HTTP/2 `CONNECT` stream per proxied TCP connection, over mutual TLS 1.3.
//!
//! - [`pool`]: the client side; pooled HTTP/2 connections keyed like Istio's
//!   (source identity, destination identities, destination address, source address).
//! - [`server`]: the server side; TLS with a per-destination certificate, request validation
//!   with Istio's status codes, and a [`server::ConnectHandler`] that decides what to do.
//! - [`H2Stream`]: the tunnel as a byte stream with half-close. Proxy logic uses it through
//!   [`crate::copy::BytesStream`] / `AsyncRead + AsyncWrite`, not through h2 types, so another
//!   transport (HTTP/3) can be added behind the same seam.

pub mod pool;
pub mod server;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::copy::BytesStream;

/// The HBONE port.
pub const HBONE_PORT: u16 = 15008;

/// HTTP/2 tuning shared by client and server. Defaults follow Istio's ztunnel: large windows
/// so one stream can fill a fast link, 1 MiB frames, 100 streams per pooled connection.
#[derive(Debug, Clone)]
pub struct H2Config {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub client_max_header_list: u32,
    pub server_max_header_list: u32,
    pub client_send_buffer: usize,
    pub server_send_buffer: usize,
    pub server_max_concurrent_streams: u32,
    /// Streams per pooled client connection before another connection is opened.
    pub max_streams_per_connection: usize,
    /// Pooled connections with no streams are closed after this long.
    pub idle_timeout: Duration,
    /// HTTP/2 PING interval; a connection whose PONG does not come back in
    /// `keepalive_timeout` is closed.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// TCP connect + TLS + HTTP/2 handshakes must finish within this.
    pub handshake_timeout: Duration,
}

impl Default for H2Config {
    fn default() -> Self {
        H2Config {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            client_max_header_list: 16 * 1024,
            server_max_header_list: 64 * 1024,
            client_send_buffer: 4 * 1024 * 1024,
            server_send_buffer: 4 * 1024 * 1024,
            server_max_concurrent_streams: 200,
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Process-unique ids for connections, used in tracing spans and logs.
pub fn next_connection_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Decrements a pooled connection's active-stream count when the stream ends.
pub(crate) struct StreamSlot(pub(crate) Arc<pool::ConnSlots>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// One HBONE tunnel: the DATA frames of a CONNECT stream as a byte stream.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Data received but not yet handed to an `AsyncRead` caller.
    pending: Bytes,
    read_eof: bool,
    write_closed: bool,
    _slot: Option<StreamSlot>,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("stream_id", &self.send.stream_id().as_u32())
            .finish()
    }
}

/// How h2 errors look to a byte-stream reader: a peer that resets with NO_ERROR or CANCEL
/// has just finished (Istio treats both as EOF).
fn is_graceful(e: &h2::Error) -> bool {
    matches!(e.reason(), Some(Reason::NO_ERROR) | Some(Reason::CANCEL))
}

pub(crate) fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    let kind = match e.reason() {
        Some(Reason::STREAM_CLOSED) => io::ErrorKind::BrokenPipe,
        Some(_) => io::ErrorKind::ConnectionReset,
        None => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, slot: Option<StreamSlot>) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            read_eof: false,
            write_closed: false,
            _slot: slot,
        }
    }

    fn poll_next_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }
        if self.read_eof {
            return Poll::Ready(Ok(None));
        }
        loop {
            return match ready!(self.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    // Window credit goes back as soon as we own the bytes: we hold at most
                    // one chunk, so memory stays bounded by the frame size.
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    if chunk.is_empty() {
                        continue;
                    }
                    Poll::Ready(Ok(Some(chunk)))
                }
                None => {
                    self.read_eof = true;
                    Poll::Ready(Ok(None))
                }
                Some(Err(e)) if is_graceful(&e) => {
                    self.read_eof = true;
                    Poll::Ready(Ok(None))
                }
                Some(Err(e)) => Poll::Ready(Err(h2_io_error(e))),
            };
        }
    }

    fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        if data.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        loop {
            self.send.reserve_capacity(data.len());
            match ready!(self.send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let chunk = data.split_to(n.min(data.len()));
                    self.send.send_data(chunk, false).map_err(h2_io_error)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }

    /// Half-close our direction. A peer that already reset the stream (it finished and
    /// dropped its side: CANCEL or NO_ERROR) needs no END_STREAM — and h2 would refuse one
    /// with "inactive stream", which is not a failure of the connection.
    fn poll_close_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed
            && let Poll::Ready(r) = self.send.poll_reset(cx)
        {
            self.write_closed = true;
            return Poll::Ready(match r {
                Ok(Reason::NO_ERROR | Reason::CANCEL) => Ok(()),
                Ok(reason) => Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!("HBONE stream reset by the peer: {reason}"),
                )),
                Err(e) if is_graceful(&e) => Ok(()),
                Err(e) => Err(h2_io_error(e)),
            });
        }
        Poll::Ready(self.close_write())
    }

    fn close_write(&mut self) -> io::Result<()> {
        if self.write_closed {
            return Ok(());
        }
        self.write_closed = true;
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => Ok(()),
            // The peer already reset the stream: nothing left to tell it.
            Err(e) if is_graceful(&e) => Ok(()),
            Err(e) => Err(h2_io_error(e)),
        }
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        // A stream dropped without a clean half-close (e.g. the other side of the proxy
        // failed) must not look like a clean EOF to the peer.
        if !self.write_closed {
            self.send.send_reset(Reason::CANCEL);
        }
    }
}

impl BytesStream for H2Stream {
    fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        _scratch: &mut BytesMut,
        _hint: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        self.poll_next_chunk(cx)
    }

    fn poll_write_bytes(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        self.poll_send(cx, data)
    }

    fn poll_shutdown_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_close_write(cx)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match ready!(this.poll_next_chunk(cx))? {
            None => Poll::Ready(Ok(())),
            Some(mut chunk) => {
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                chunk.advance(n);
                this.pending = chunk;
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        loop {
            this.send.reserve_capacity(buf.len());
            match ready!(this.send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    this.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_io_error)?;
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_close_write(cx)
    }
}

/// Errors of the HBONE client, worded for an operator reading the log.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("no certificate for source identity {identity}: {reason}")]
    Certificate { identity: String, reason: String },
    #[error("TCP connection to HBONE peer {peer} failed: {source}")]
    Connect {
        peer: SocketAddr,
        #[source]
        source: crate::socket::SocketError,
    },
    #[error(
        "TLS handshake with HBONE peer {peer} failed: {reason} (is port 15008 reachable and is the peer in our trust domain?)"
    )]
    Tls { peer: SocketAddr, reason: String },
    #[error("HTTP/2 handshake with HBONE peer {peer} failed: {reason}")]
    H2Handshake { peer: SocketAddr, reason: String },
    #[error("handshake with HBONE peer {peer} timed out after {timeout:?}")]
    HandshakeTimeout { peer: SocketAddr, timeout: Duration },
    #[error("HBONE connection to {peer} is closed: {reason}")]
    ConnectionClosed { peer: SocketAddr, reason: String },
    #[error("HBONE peer {peer} answered {status} to CONNECT {authority}{}", status_hint(*.status))]
    Status {
        peer: SocketAddr,
        authority: String,
        status: http::StatusCode,
    },
    #[error("invalid HBONE request for {authority}: {reason}")]
    BadRequest { authority: String, reason: String },
}

fn status_hint(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        401 => " (denied by authorization policy at the destination)",
        400 => " (the destination refused the request as malformed or misaddressed)",
        503 => " (no such workload at the destination, or its upstream connection failed)",
        _ => "",
    }
}

impl HboneError {
    /// Istio's `response_flags` for a failed connection.
    pub fn response_flag(&self) -> &'static str {
        match self {
            HboneError::Tls { .. } | HboneError::Certificate { .. } => "TLS_FAILURE",
            HboneError::H2Handshake { .. } => "H2_HANDSHAKE_FAILURE",
            HboneError::Status { status, .. } if status.as_u16() == 401 => "DENY",
            _ => "CONNECT",
        }
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A peer that answers, sends its data and then resets the stream (as an HTTP/2 server
    /// does once it is done with a request): our half-close afterwards is not an error, and
    /// what it sent before the reset is still read.
    #[tokio::test]
    async fn half_close_after_the_peer_reset_is_clean() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (read_done, reset_now) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(b).await.unwrap();
            let (_req, mut respond) = conn.accept().await.unwrap().unwrap();
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            send.send_data(Bytes::from_static(b"bye"), true).unwrap();
            tokio::spawn(async move {
                let _ = reset_now.await;
                send.send_reset(Reason::CANCEL);
            });
            // Keep the connection driven until the client is done.
            while let Some(r) = conn.accept().await {
                drop(r);
            }
        });
        let (client, conn) = h2::client::handshake(a).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let req = http::Request::connect("127.0.0.1:80").body(()).unwrap();
        let (resp, send) = client.send_request(req, false).unwrap();
        let recv = resp.await.unwrap().into_body();
        let mut stream = H2Stream::new(send, recv, None);
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut got)
            .await
            .unwrap();
        assert_eq!(got, b"bye");
        // The peer is done and resets the stream before we half-close.
        read_done.send(()).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        stream
            .shutdown()
            .await
            .expect("half-close after a peer reset");
        drop(stream);
        drop(client);
        server.abort();
    }
}
