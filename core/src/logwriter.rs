//! Where log lines go: stderr, each line written at once or gathered and flushed on an interval.
//!
//! Why gather: the waypoint logs a line per request, and one `write` per line was ~10 % of its
//! CPU at 1000 requests/s (the syscall, and waking the reader of the pipe). Envoy buffers its
//! access logs the same way. What is never delayed: a WARN or ERROR line flushes at once, with
//! everything before it, in order; so does a full buffer ([`HIGH_WATER`]), an explicit
//! [`LogWriter::flush_now`] (process exit) and a panic (the hook installed with the flusher).
//! A process killed outright loses at most one interval of lines.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Buffered bytes that trigger a flush by the writing thread rather than the flusher.
pub const HIGH_WATER: usize = 32 * 1024;

/// A log sink: every line goes into a shared buffer, written to `W` when the buffer flushes.
pub struct LogWriter<W> {
    shared: Arc<Shared<W>>,
    /// Flush after every line (no flush interval).
    immediate: bool,
}

impl<W> Clone for LogWriter<W> {
    fn clone(&self) -> Self {
        LogWriter {
            shared: self.shared.clone(),
            immediate: self.immediate,
        }
    }
}

struct Shared<W> {
    pending: Mutex<Vec<u8>>,
    /// The output and a spare buffer; holding this lock across "take pending, write" keeps
    /// chunks in order when two threads flush at once.
    out: Mutex<(W, Vec<u8>)>,
}

impl<W: Write + Send + 'static> LogWriter<W> {
    /// A writer to `out`: with `interval` lines are gathered and flushed at least that often
    /// (by a thread of its own, started here); without, each line is written at once.
    pub fn new(out: W, interval: Option<Duration>) -> LogWriter<W> {
        let writer = LogWriter {
            shared: Arc::new(Shared {
                pending: Mutex::new(Vec::new()),
                out: Mutex::new((out, Vec::new())),
            }),
            immediate: interval.is_none(),
        };
        let Some(interval) = interval else {
            return writer;
        };
        let shared = writer.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(interval);
                    shared.flush();
                }
            });
        match spawned {
            Ok(_) => writer,
            // No thread, no timed flush: write each line at once rather than hold lines back.
            Err(_) => LogWriter {
                immediate: true,
                ..writer
            },
        }
    }

    /// Write out everything gathered so far (call before the process exits).
    pub fn flush_now(&self) {
        self.shared.flush();
    }

    /// Whether each line is written at once.
    pub fn is_immediate(&self) -> bool {
        self.immediate
    }
}

impl<W: Write> Shared<W> {
    fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        let (sink, spare) = &mut *out;
        {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if pending.is_empty() {
                return;
            }
            std::mem::swap(&mut *pending, spare);
        }
        // A log sink that fails (stderr closed) has nowhere to report it; the lines are dropped,
        // as an unbuffered writer would drop them.
        let _ = sink.write_all(spare).and_then(|()| sink.flush());
        spare.clear();
        // Keep a burst's buffer from staying allocated forever.
        spare.shrink_to(HIGH_WATER * 2);
    }

    fn append(&self, line: &[u8]) -> usize {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.extend_from_slice(line);
        pending.len()
    }
}

/// One event's output (tracing-subscriber writes a formatted line through it, then drops it).
pub struct LineGuard<'a, W: Write> {
    shared: &'a Shared<W>,
    urgent: bool,
    len: usize,
}

impl<W: Write> Write for LineGuard<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.len = self.shared.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for LineGuard<'_, W> {
    fn drop(&mut self) {
        if self.urgent || self.len >= HIGH_WATER {
            self.shared.flush();
        }
    }
}

impl<'a, W: Write + Send + 'static> MakeWriter<'a> for LogWriter<W> {
    type Writer = LineGuard<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        LineGuard {
            shared: &self.shared,
            urgent: self.immediate,
            len: 0,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        // Levels order by verbosity: WARN and ERROR are the ones at or below WARN.
        LineGuard {
            shared: &self.shared,
            urgent: self.immediate || *meta.level() <= Level::WARN,
            len: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    /// A sink tests can read, counting the writes it received.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut s = self.0.lock().unwrap();
            s.0.extend_from_slice(buf);
            s.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().0.clone()).unwrap()
        }
        fn writes(&self) -> usize {
            self.0.lock().unwrap().1
        }
    }

    fn subscriber(w: LogWriter<Sink>) -> impl tracing::Subscriber {
        tracing_subscriber::registry().with(tracing_subscriber::fmt::layer().with_writer(w))
    }

    #[test]
    fn info_lines_wait_for_the_interval_and_leave_in_one_write() {
        let sink = Sink::default();
        let w = LogWriter::new(sink.clone(), Some(Duration::from_secs(1)));
        tracing::subscriber::with_default(subscriber(w.clone()), || {
            for i in 0..20 {
                tracing::info!(i, "request complete");
            }
        });
        assert_eq!(sink.text(), "", "lines were written before the interval");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.text().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never flushed");
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = sink.text();
        assert_eq!(text.lines().count(), 20, "{text}");
        assert!(text.lines().next().unwrap().contains("i=0"), "{text}");
        assert_eq!(sink.writes(), 1, "20 lines should leave in one write");
    }

    #[test]
    fn warn_flushes_at_once_with_the_lines_before_it_in_order() {
        let sink = Sink::default();
        let w = LogWriter::new(sink.clone(), Some(Duration::from_secs(3600)));
        tracing::subscriber::with_default(subscriber(w), || {
            tracing::info!("first");
            tracing::info!("second");
            assert_eq!(sink.text(), "");
            tracing::warn!("trouble");
        });
        let text = sink.text();
        let order: Vec<_> = ["first", "second", "trouble"]
            .iter()
            .map(|m| {
                text.find(m)
                    .unwrap_or_else(|| panic!("{m} missing: {text}"))
            })
            .collect();
        assert!(order.windows(2).all(|p| p[0] < p[1]), "{text}");
    }

    #[test]
    fn a_full_buffer_flushes_without_waiting() {
        let sink = Sink::default();
        let w = LogWriter::new(sink.clone(), Some(Duration::from_secs(3600)));
        let big = "x".repeat(1000);
        tracing::subscriber::with_default(subscriber(w.clone()), || {
            for _ in 0..(HIGH_WATER / 1000 + 1) {
                tracing::info!(%big, "line");
            }
        });
        assert!(sink.text().len() >= HIGH_WATER, "{}", sink.text().len());
        tracing::subscriber::with_default(subscriber(w.clone()), || tracing::info!("tail"));
        assert!(!sink.text().contains("tail"));
        w.flush_now();
        assert!(sink.text().ends_with("tail\n"), "{}", sink.text());
    }

    #[test]
    fn without_an_interval_every_line_is_written_at_once() {
        let sink = Sink::default();
        let w = LogWriter::new(sink.clone(), None);
        assert!(w.is_immediate());
        tracing::subscriber::with_default(subscriber(w), || {
            tracing::info!("one");
            assert!(sink.text().contains("one"));
            tracing::info!("two");
        });
        assert_eq!(sink.writes(), 2);
    }
}
