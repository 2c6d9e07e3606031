//! Protocol detection on a tunnel: HTTP/2 connection preface or an HTTP/1.x request line,
//! otherwise opaque TCP. The bytes read are replayed through [`Rewind`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Tcp,
}

/// Classify `buf`: Some(decision) when it is decided, None when more bytes could change it.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Detected::Http2);
    }
    let mut maybe = false;
    for m in METHODS {
        let k = buf.len().min(m.len());
        if buf[..k] == m[..k] {
            if k == m.len() {
                return Some(Detected::Http1);
            }
            maybe = true;
        }
    }
    if maybe { None } else { Some(Detected::Tcp) }
}

/// Read from `s` until the protocol is known, the peer stops sending, or `wait` passed (a
/// server-first protocol: TCP).
pub async fn detect<S: AsyncRead + Unpin>(
    s: &mut S,
    wait: Duration,
) -> io::Result<(Detected, Bytes)> {
    let mut buf = BytesMut::with_capacity(64);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if !buf.is_empty()
            && let Some(d) = classify(&buf)
        {
            return Ok((d, buf.freeze()));
        }
        let mut chunk = [0u8; 64];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Err(_) => return Ok((Detected::Tcp, buf.freeze())),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A stream with some already-read bytes put back in front.
pub struct Rewind<S> {
    pre: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(pre: Bytes, inner: S) -> Self {
        Rewind { pre, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(Detected::Http2)
        );
        assert_eq!(classify(b"PRI * "), None);
        assert_eq!(classify(b"hello"), Some(Detected::Tcp));
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Tcp));
    }
}
