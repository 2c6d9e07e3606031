//! Bidirectional byte copying between two streams, with half-close and adaptive buffers.
//!
//! Both proxies spend most of their time here, so the shape is chosen for speed and memory:
//! - streams hand over [`Bytes`] chunks ([`BytesStream`]), so data read from a socket goes into
//!   an HTTP/2 DATA frame without another copy, and data received from HTTP/2 is written out
//!   without a buffer of our own;
//! - a socket's read buffer is allocated only once it is readable, small at first and larger as
//!   the flow grows, so ten thousand idle connections cost almost nothing;
//! - when one side reaches EOF the other side's write half is shut down and the reverse direction
//!   keeps flowing until it ends too (TCP half-close semantics end to end).

use std::future::poll_fn;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// First read buffer of a connection: enough for a typical request.
const INITIAL_BUFFER: usize = 2 * 1024;
/// After this many bytes in one direction, the flow is a bulk transfer.
const MEDIUM_AFTER: u64 = 64 * 1024;
const MEDIUM_BUFFER: usize = 32 * 1024;
const LARGE_AFTER: u64 = 2 * 1024 * 1024;
const LARGE_BUFFER: usize = 256 * 1024;

/// A byte stream that reads and writes whole [`Bytes`] chunks and can half-close.
pub trait BytesStream: Send {
    /// Read the next chunk; `Ok(None)` is EOF. `scratch` is this direction's reusable buffer
    /// and `hint` how much the caller would like to read at once.
    fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &mut BytesMut,
        hint: usize,
    ) -> Poll<io::Result<Option<Bytes>>>;

    /// Write some of `data`, advancing it past what was taken.
    fn poll_write_bytes(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>>;

    /// Flush buffered writes, if the stream buffers.
    fn poll_flush_bytes(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Signal EOF to the peer while still reading (TCP `shutdown(SHUT_WR)`, HTTP/2 END_STREAM).
    fn poll_shutdown_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl BytesStream for TcpStream {
    fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &mut BytesMut,
        hint: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        // Wait for readability before touching the buffer: idle connections hold no memory.
        ready!(self.poll_read_ready(cx))?;
        if scratch.capacity() - scratch.len() < hint / 2 {
            scratch.reserve(hint);
        }
        // `poll_read` rather than `try_read_buf`: a read that does not fill the buffer shows
        // the socket is drained, and `poll_read` then clears its readiness, so the next call
        // waits for epoll instead of spending a `recvfrom` on EAGAIN (one syscall of the seven
        // each small request costs a proxy).
        let spare = scratch.spare_capacity_mut();
        let mut buf = ReadBuf::uninit(spare);
        let start = buf.filled().as_ptr();
        ready!(std::pin::Pin::new(&mut *self).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        if buf.filled().as_ptr() != start {
            return Poll::Ready(Err(io::Error::other("read went to an unexpected buffer")));
        }
        if n == 0 {
            return Poll::Ready(Ok(None));
        }
        // SAFETY: `poll_read` initialised and filled the first `n` bytes of the spare capacity
        // (the pointer check above rules out a swapped buffer), so they may join `len`.
        unsafe { scratch.set_len(scratch.len() + n) };
        Poll::Ready(Ok(Some(scratch.split().freeze())))
    }

    fn poll_write_bytes(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        let n = ready!(std::pin::Pin::new(&mut *self).poll_write(cx, data))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        data.advance(n);
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::pin::Pin::new(self).poll_shutdown(cx)
    }
}

/// Live byte counters of one proxied connection, readable while it runs.
#[derive(Debug, Default)]
pub struct CopyStats {
    /// Bytes that went from the first stream to the second.
    pub a_to_b: AtomicU64,
    /// Bytes that went from the second stream to the first.
    pub b_to_a: AtomicU64,
}

impl CopyStats {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn a_to_b(&self) -> u64 {
        self.a_to_b.load(Ordering::Relaxed)
    }

    pub fn b_to_a(&self) -> u64 {
        self.b_to_a.load(Ordering::Relaxed)
    }
}

enum State {
    Reading,
    Writing(Bytes),
    Flushing,
    ShuttingDown,
    Done,
}

/// One direction of the copy.
struct Direction {
    state: State,
    scratch: BytesMut,
    total: u64,
}

impl Direction {
    fn new() -> Self {
        Direction {
            state: State::Reading,
            scratch: BytesMut::new(),
            total: 0,
        }
    }

    fn hint(&self) -> usize {
        if self.total >= LARGE_AFTER {
            LARGE_BUFFER
        } else if self.total >= MEDIUM_AFTER {
            MEDIUM_BUFFER
        } else {
            INITIAL_BUFFER
        }
    }

    fn poll<R: BytesStream + ?Sized, W: BytesStream + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        counter: &AtomicU64,
    ) -> Poll<io::Result<()>> {
        loop {
            match &mut self.state {
                State::Reading => {
                    let hint = self.hint();
                    match r.poll_read_bytes(cx, &mut self.scratch, hint) {
                        Poll::Ready(Ok(Some(chunk))) => self.state = State::Writing(chunk),
                        Poll::Ready(Ok(None)) => self.state = State::Flushing,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {
                            // An idle, small flow gives its read buffer back (the data it held
                            // has been handed on): ten thousand idle connections should cost
                            // almost nothing. Bulk flows keep theirs to avoid allocation churn.
                            if self.scratch.is_empty()
                                && self.scratch.capacity() > 0
                                && self.total < MEDIUM_AFTER
                            {
                                self.scratch = BytesMut::new();
                            }
                            // Nothing to read: make sure what we wrote reaches the peer.
                            ready!(w.poll_flush_bytes(cx))?;
                            return Poll::Pending;
                        }
                    }
                }
                State::Writing(chunk) => {
                    while !chunk.is_empty() {
                        let before = chunk.len();
                        ready!(w.poll_write_bytes(cx, chunk))?;
                        let n = (before - chunk.len()) as u64;
                        self.total += n;
                        counter.fetch_add(n, Ordering::Relaxed);
                    }
                    self.state = State::Reading;
                }
                State::Flushing => {
                    ready!(w.poll_flush_bytes(cx))?;
                    self.state = State::ShuttingDown;
                }
                State::ShuttingDown => {
                    // A peer that already went away cannot be told about EOF; that is not an
                    // error for the direction still flowing.
                    match ready!(w.poll_shutdown_write(cx)) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                    self.state = State::Done;
                    self.scratch = BytesMut::new();
                }
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// Copy both ways between `a` and `b` until both directions reached EOF (or one failed).
/// Byte counts are published into `stats` as they flow, so callers can report them even when
/// the copy is cancelled.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B, stats: &CopyStats) -> io::Result<()>
where
    A: BytesStream + ?Sized,
    B: BytesStream + ?Sized,
{
    let mut ab = Direction::new();
    let mut ba = Direction::new();
    poll_fn(|cx| {
        let ab_done = match ab.poll(cx, a, b, &stats.a_to_b) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => false,
        };
        let ba_done = match ba.poll(cx, b, a, &stats.b_to_a) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => false,
        };
        if ab_done && ba_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        // client <-> (a  proxy  b) <-> server
        let (mut client, mut a) = pair().await;
        let (mut b, mut server) = pair().await;
        let stats = CopyStats::new();
        let st = stats.clone();
        let proxy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b, &st).await });

        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            // Half-closed: the reverse direction must still deliver.
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        server.write_all(b"reply after EOF").await.unwrap();
        server.shutdown().await.unwrap();
        let back = writer.await.unwrap();
        assert_eq!(back, b"reply after EOF");
        proxy.await.unwrap().unwrap();
        assert_eq!(stats.a_to_b(), payload.len() as u64);
        assert_eq!(stats.b_to_a(), 15);
    }

    #[tokio::test]
    async fn reset_is_an_error() {
        let (client, mut a) = pair().await;
        let (mut b, _server) = pair().await;
        let sock = socket2::SockRef::from(&client);
        sock.set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(client); // RST
        let stats = CopyStats::new();
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            copy_bidirectional(&mut a, &mut b, &stats),
        )
        .await
        .expect("copy must notice the reset");
        assert!(r.is_err());
    }
}
