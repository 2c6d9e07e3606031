//! Write coalescing for the HTTP/2 connections the waypoint carries inside HBONE streams.
//!
//! h2 writes each frame in pieces (frame header, payload, the next frame...), and flushes
//! after each pass of its connection task. Written straight into an HBONE stream, every piece
//! became its own HBONE DATA frame, TLS record and `writev` (≈ 5 per request instead of 2),
//! each waking the connection task and the next proxy again: the ≈ 1 ms per HTTP/2 request,
//! and the queue that never drained at 1000 requests/s. [`Coalesce`] buffers the pieces until
//! h2 flushes, so they leave as one DATA frame.
//!
//! It also defers a flush once: an HTTP/2 client sends a request's HEADERS in one pass of its
//! connection task and, only after that pass opened the stream, the body's DATA (from the
//! body task it just woke). Yielding once before the first flush lets the body task run
//! first (both tasks are on this worker's single-threaded runtime), so HEADERS and DATA go
//! out in one write.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf};

/// Room for a default-size (16 KiB) HTTP/2 frame, its header and what precedes it: a write
/// at least this large bypasses the buffer, and unbuffered, a vectored frame would be sent as
/// one HBONE DATA frame per slice (`H2Stream` writes one slice at a time).
const BUFFER: usize = 32 * 1024;

/// A write-coalescing wrapper (see the module docs). Reads pass through.
pub struct Coalesce<S> {
    inner: BufWriter<S>,
    /// A flush of the current buffer was deferred once already.
    yielded: bool,
}

impl<S: AsyncWrite> Coalesce<S> {
    pub fn new(io: S) -> Self {
        Coalesce {
            inner: BufWriter::with_capacity(BUFFER, io),
            yielded: false,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.yielded && !self.inner.buffer().is_empty() {
            // Run the other ready tasks of this runtime first (see the module docs); the
            // self-wake puts this task back at the end of the run queue, no syscall.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let r = ready!(Pin::new(&mut self.inner).poll_flush(cx));
        self.yielded = false;
        Poll::Ready(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncWriteExt;

    /// Records each write it gets.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn pieces_leave_as_one_write_per_flush() {
        let w = Writes::default();
        let mut c = Coalesce::new(w.clone());
        c.write_all(b"frame head").await.unwrap();
        c.write_all(&[7u8; 1024]).await.unwrap();
        assert!(
            w.0.lock().unwrap().is_empty(),
            "nothing leaves before the flush"
        );
        // The first poll_flush defers once (self-wake); `flush()` completes regardless.
        c.flush().await.unwrap();
        c.write_all(b"next").await.unwrap();
        c.flush().await.unwrap();
        let writes = w.0.lock().unwrap();
        assert_eq!(writes.len(), 2, "one write per flush");
        assert_eq!(writes[0].len(), 10 + 1024);
        assert_eq!(writes[1], b"next");
    }

    #[tokio::test]
    async fn a_full_frame_and_its_header_leave_together() {
        let w = Writes::default();
        let mut c = Coalesce::new(w.clone());
        let (head, payload) = ([0u8; 9], vec![1u8; 16 * 1024]);
        let mut bufs = [io::IoSlice::new(&head), io::IoSlice::new(&payload)];
        let mut bufs = &mut bufs[..];
        while !bufs.is_empty() {
            let n = c.write_vectored(bufs).await.unwrap();
            io::IoSlice::advance_slices(&mut bufs, n);
        }
        c.flush().await.unwrap();
        let writes = w.0.lock().unwrap();
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].len(), 9 + 16 * 1024);
    }
}
