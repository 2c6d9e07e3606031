//! Logging: the global tracing subscriber, runtime filter changes, and Istio-style access logs.
//!
//! [`init_logging`] installs a subscriber writing text or JSON to stderr behind a reloadable
//! `RUST_LOG`-style filter of `target=level` pairs; the returned [`LogHandle`] backs the admin
//! server's `/logging` endpoint. The filter is `tracing_subscriber`'s `Targets`, not `EnvFilter`:
//! span and field-value directives are not supported, and in exchange the proxies carry no regex
//! engine (~0.4 MB of ztunnel's resident code) and no per-span filter bookkeeping.
//! [`AccessLog::emit`] writes one event per finished connection on target `access` with Istio's field
//! names. [`capture_access_logs`] lets tests collect those events in memory.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tracing::field::{Field, Visit};

use crate::logwriter::LogWriter;
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::registry::Registry;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, reload};

/// Tracing target of access-log events.
pub const ACCESS_TARGET: &str = "access";

/// Most access events kept by a capture; older ones are dropped so a long test run stays bounded.
const CAPTURE_LIMIT: usize = 10_000;

/// Longest filter string accepted from `/logging` (it comes from an operator over HTTP).
const MAX_FILTER_LEN: usize = 4096;

/// Logging setup errors.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {filter:?}: {reason}")]
    InvalidFilter { filter: String, reason: String },
    #[error("log filter is longer than {MAX_FILTER_LEN} bytes")]
    FilterTooLong,
    #[error("a global tracing subscriber is already installed; logging was initialized twice")]
    AlreadyInitialized,
    #[error("cannot change the log filter: the logging subscriber is gone")]
    ReloadFailed(#[source] reload::Error),
}

type FilterHandle = reload::Handle<Targets, Registry>;

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct LogHandle {
    handle: FilterHandle,
    // Keeps the filter alive for a handle not attached to a subscriber (the reload handle is weak).
    _detached: Option<Arc<reload::Layer<Targets, Registry>>>,
    /// The output, to flush gathered lines at exit.
    output: Option<LogWriter<std::io::Stderr>>,
}

impl fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogHandle")
            .field("filter", &self.current())
            .finish()
    }
}

impl LogHandle {
    /// The filter in effect, e.g. `info,zmesh_core::hbone=debug`.
    pub fn current(&self) -> String {
        self.handle
            .with_current(|f| f.to_string())
            .unwrap_or_else(|_| "<unavailable>".to_string())
    }

    /// A handle whose filter is not attached to any subscriber: `set`/`current` work but change
    /// nothing else. For tests of code that takes a [`LogHandle`] (e.g. the admin server).
    pub fn detached(filter: &str) -> Result<LogHandle, TelemetryError> {
        let (layer, handle) = reload::Layer::new(parse_filter(filter)?);
        Ok(LogHandle {
            handle,
            _detached: Some(Arc::new(layer)),
            output: None,
        })
    }

    /// Write out log lines gathered for the flush interval (call before the process exits).
    pub fn flush(&self) {
        if let Some(o) = &self.output {
            o.flush_now();
        }
    }

    /// Replace the filter. A bad filter is rejected and the old one stays.
    pub fn set(&self, filter: &str) -> Result<(), TelemetryError> {
        let new = parse_filter(filter)?;
        self.handle
            .reload(new)
            .map_err(TelemetryError::ReloadFailed)
    }
}

/// Parse a `RUST_LOG`-style directive string (`info,zmesh_core::hbone=debug`) strictly: one bad
/// directive rejects the whole string, so an operator learns their change did nothing.
fn parse_filter(filter: &str) -> Result<Targets, TelemetryError> {
    if filter.len() > MAX_FILTER_LEN {
        return Err(TelemetryError::FilterTooLong);
    }
    let invalid = |reason: String| TelemetryError::InvalidFilter {
        filter: filter.to_string(),
        reason,
    };
    let trimmed = filter.trim();
    if trimmed.is_empty() {
        return Err(invalid("empty filter".to_string()));
    }
    // `Targets` accepts `=` or `x=` as "everything at trace"; an operator meant something else.
    for d in trimmed.split(',') {
        let d = d.trim();
        let (target, level) = d.split_once('=').unwrap_or(("", d));
        if d.is_empty() || (d.contains('=') && target.trim().is_empty()) {
            return Err(invalid(format!("directive {d:?} names no target")));
        }
        if d.contains('=')
            && (level.trim().is_empty() || level.trim().parse::<LevelFilter>().is_err())
        {
            return Err(invalid(format!(
                "directive {d:?}: {level:?} is not a level (off, error, warn, info, debug, trace)"
            )));
        }
    }
    trimmed
        .parse::<Targets>()
        .map_err(|e| invalid(e.to_string()))
}

/// Install the global subscriber: filter from `RUST_LOG` (falling back to `default_filter`, then
/// `info`), text or JSON lines on stderr. Access-log capture (see [`capture_access_logs`]) keeps
/// working under this subscriber.
///
/// With `flush_interval`, lines are gathered and written at least that often, WARN and ERROR
/// at once (see [`crate::logwriter`]); call [`LogHandle::flush`] before exiting. A panic
/// flushes first, so the lines before it are not lost. Without, each line is written at once.
pub fn init_logging(
    default_filter: &str,
    json: bool,
    flush_interval: Option<Duration>,
) -> Result<LogHandle, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => parse_filter(&env)?,
        _ if !default_filter.trim().is_empty() => parse_filter(default_filter)?,
        _ => parse_filter("info")?,
    };
    let (filter, handle) = reload::Layer::new(filter);
    let writer = LogWriter::new(std::io::stderr(), flush_interval.filter(|d| !d.is_zero()));
    let output: Box<dyn Layer<Registry> + Send + Sync> = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(writer.clone())
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(writer.clone())
            .boxed()
    };
    // The filter is per-layer on the output only, so capture sees access events whatever the level.
    tracing_subscriber::registry()
        .with(output.with_filter(filter))
        .with(capture_layer())
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInitialized)?;
    if !writer.is_immediate() {
        let w = writer.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            w.flush_now();
            previous(info);
        }));
    }
    Ok(LogHandle {
        handle,
        _detached: None,
        output: Some(writer),
    })
}

/// One finished connection, logged Istio-style.
#[derive(Clone, Debug, Default)]
pub struct AccessLog {
    pub src_addr: Option<SocketAddr>,
    pub src_workload: Option<String>,
    pub src_namespace: Option<String>,
    pub src_identity: Option<String>,
    pub dst_addr: Option<SocketAddr>,
    pub dst_hbone_addr: Option<SocketAddr>,
    pub dst_service: Option<String>,
    pub dst_workload: Option<String>,
    pub dst_namespace: Option<String>,
    pub dst_identity: Option<String>,
    /// `"inbound"` or `"outbound"`.
    pub direction: &'static str,
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    pub duration: Duration,
    pub error: Option<String>,
}

impl AccessLog {
    /// Emit the access-log event (target `access`). Unknown fields are left out, as Istio does;
    /// `duration` is rendered like Istio's `"13ms"`. Failed connections log at warn level.
    pub fn emit(&self) {
        let duration = format!("{}ms", self.duration.as_millis());
        macro_rules! access {
            ($lvl:expr) => {
                tracing::event!(
                    target: "access",
                    $lvl,
                    src.addr = self.src_addr.map(tracing::field::display),
                    src.workload = self.src_workload.as_deref(),
                    src.namespace = self.src_namespace.as_deref(),
                    src.identity = self.src_identity.as_deref(),
                    dst.addr = self.dst_addr.map(tracing::field::display),
                    dst.hbone_addr = self.dst_hbone_addr.map(tracing::field::display),
                    dst.service = self.dst_service.as_deref(),
                    dst.workload = self.dst_workload.as_deref(),
                    dst.namespace = self.dst_namespace.as_deref(),
                    dst.identity = self.dst_identity.as_deref(),
                    direction = self.direction,
                    bytes_sent = self.bytes_sent,
                    bytes_recv = self.bytes_recv,
                    duration = duration.as_str(),
                    error = self.error.as_deref(),
                    "connection complete"
                )
            };
        }
        if self.error.is_some() {
            access!(tracing::Level::WARN);
        } else {
            access!(tracing::Level::INFO);
        }
    }
}

type Buffer = Arc<Mutex<VecDeque<serde_json::Value>>>;

/// The capture buffer, created by the first [`capture_access_logs`] call.
static CAPTURE: OnceLock<Buffer> = OnceLock::new();

/// Copies access events into [`CAPTURE`] once capture is enabled; otherwise a cheap no-op.
/// Always installed through [`capture_layer`], which gives it its filter.
struct CaptureLayer;

/// The capture layer with a per-layer filter that only lets access events through.
///
/// Why the filter matters for speed: a layer without one enables *every* callsite, so the
/// `trace!` events and `trace_span!`s that h2, rustls and tokio put on each frame would all
/// be built, and every such span stored in the registry and entered on every poll, on the
/// data path — only to be dropped by the output filter. That was ~16 % of ztunnel's CPU at
/// 1000 small requests/s. With every layer filtered, callsites that no filter wants are
/// disabled once, at registration, and cost nothing afterwards.
fn capture_layer<S>() -> impl Layer<S> + Send + Sync
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    // Access events are INFO, or WARN for a failed connection.
    CaptureLayer.with_filter(Targets::new().with_target(ACCESS_TARGET, LevelFilter::INFO))
}

impl<S: Subscriber> Layer<S> for CaptureLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != ACCESS_TARGET {
            return;
        }
        let Some(buf) = CAPTURE.get() else { return };
        let mut fields = JsonVisitor(serde_json::Map::new());
        event.record(&mut fields);
        fields.0.insert(
            "level".to_string(),
            serde_json::Value::from(event.metadata().level().as_str()),
        );
        let mut buf = buf.lock().unwrap_or_else(PoisonError::into_inner);
        if buf.len() >= CAPTURE_LIMIT {
            buf.pop_front();
        }
        buf.push_back(serde_json::Value::Object(fields.0));
    }
}

struct JsonVisitor(serde_json::Map<String, serde_json::Value>);

impl Visit for JsonVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `display(..)` values arrive here; Debug of a DisplayValue is its Display form.
        self.0
            .insert(field.name().to_string(), format!("{value:?}").into());
    }
}

/// In-memory access logs for tests; see [`capture_access_logs`].
#[derive(Clone, Debug)]
pub struct AccessLogCapture {
    buf: Buffer,
}

impl AccessLogCapture {
    /// Captured events in order, each the JSON object of its fields (`src.addr`, `bytes_sent`, …,
    /// `message`, `level`). Shared by the whole process: parallel tests see each other's events.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        let buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        buf.iter().cloned().collect()
    }

    /// Forget everything captured so far.
    pub fn clear(&self) {
        self.buf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// Collect access-log events in memory (for tests). Safe to call many times: the first call
/// installs a global subscriber (capture plus test-friendly text output filtered by `RUST_LOG`,
/// default `info`) unless one is already installed — if it was installed by [`init_logging`], capture
/// works through it too.
pub fn capture_access_logs() -> AccessLogCapture {
    let buf = CAPTURE
        .get_or_init(|| {
            let filter = std::env::var("RUST_LOG")
                .ok()
                .and_then(|f| parse_filter(&f).ok())
                .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
            let output = tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(filter);
            // Failure means another subscriber is already global; if it is ours, capture still works.
            let _ = tracing_subscriber::registry()
                .with(output)
                .with(capture_layer())
                .try_init();
            Arc::new(Mutex::new(VecDeque::new()))
        })
        .clone();
    AccessLogCapture { buf }
}

/// Like [`tracing::Instrument::instrument`] for the long-lived, steady-state part of a
/// connection (the byte copy, an HTTP/2 connection driver), but the span is entered on a poll
/// only while debug or trace logging is on.
///
/// Entering and leaving a span on every poll costs ~1 µs of subscriber bookkeeping (registry
/// stack and reference count, a lookup per filtered layer); these futures are polled twice per
/// small request, and only the debug/trace events of h2 and our own `debug!`s fire inside
/// them. At info level nothing logs there, so the span would be entered for nobody. Events
/// above debug level that such a future emits must enter the span themselves
/// (`span.in_scope(|| warn!(..))`) to keep their context.
pub trait InstrumentVerbose: Sized {
    fn instrument_verbose(self, span: tracing::Span) -> VerboseInstrumented<Self> {
        VerboseInstrumented { inner: self, span }
    }
}

impl<F: std::future::Future> InstrumentVerbose for F {}

pin_project_lite::pin_project! {
    /// See [`InstrumentVerbose`].
    pub struct VerboseInstrumented<F> {
        #[pin]
        inner: F,
        span: tracing::Span,
    }
}

impl<F: std::future::Future> std::future::Future for VerboseInstrumented<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        // One relaxed atomic load; the subscriber updates it when /logging changes the filter.
        if LevelFilter::current() > LevelFilter::INFO {
            let _entered = this.span.enter();
            this.inner.poll(cx)
        } else {
            this.inner.poll(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With debug logging on, the span is entered while the future runs (so h2's and our
    /// debug events inside it keep their context). The info-level case is not tested: the
    /// level is process-wide and other tests install verbose subscribers concurrently.
    #[test]
    fn instrument_verbose_enters_the_span_at_debug() {
        let sub = tracing_subscriber::registry().with(LevelFilter::DEBUG);
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("verbose_test");
            let id = span.id();
            let inside = futures::executor::block_on(
                async { tracing::Span::current().id() }.instrument_verbose(span),
            );
            assert!(id.is_some());
            assert_eq!(inside, id);
        });
    }

    #[test]
    fn capture_sees_access_log_fields() {
        let cap = capture_access_logs();
        let log = AccessLog {
            src_addr: Some("10.0.0.1:5000".parse().unwrap()),
            src_workload: Some("sleep".into()),
            src_namespace: Some("default".into()),
            src_identity: Some("spiffe://cluster.local/ns/default/sa/sleep".into()),
            dst_addr: Some("10.0.0.2:8080".parse().unwrap()),
            dst_hbone_addr: Some("10.0.0.2:15008".parse().unwrap()),
            dst_service: Some("echo.default.svc.cluster.local".into()),
            dst_workload: Some("echo".into()),
            dst_namespace: Some("default".into()),
            dst_identity: None,
            direction: "outbound",
            bytes_sent: 67,
            bytes_recv: 490,
            duration: Duration::from_millis(13),
            error: None,
        };
        log.emit();
        let failed = AccessLog {
            src_workload: Some("capture-test-failed".into()),
            direction: "inbound",
            error: Some("connection refused".into()),
            ..Default::default()
        };
        failed.emit();
        let lines = cap.lines();
        let ok = lines
            .iter()
            .find(|l| l["src.workload"] == "sleep" && l["bytes_recv"] == 490)
            .expect("access log captured");
        assert_eq!(ok["src.addr"], "10.0.0.1:5000");
        assert_eq!(
            ok["src.identity"],
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert_eq!(ok["dst.addr"], "10.0.0.2:8080");
        assert_eq!(ok["dst.hbone_addr"], "10.0.0.2:15008");
        assert_eq!(ok["dst.service"], "echo.default.svc.cluster.local");
        assert_eq!(ok["dst.workload"], "echo");
        assert_eq!(ok["dst.namespace"], "default");
        assert_eq!(ok["direction"], "outbound");
        assert_eq!(ok["bytes_sent"], 67);
        assert_eq!(ok["duration"], "13ms");
        assert_eq!(ok["message"], "connection complete");
        assert_eq!(ok["level"], "INFO");
        assert!(ok.get("dst.identity").is_none());
        assert!(ok.get("error").is_none());
        let bad = lines
            .iter()
            .find(|l| l["src.workload"] == "capture-test-failed")
            .expect("failed access log captured");
        assert_eq!(bad["error"], "connection refused");
        assert_eq!(bad["level"], "WARN");
        assert!(bad.get("src.addr").is_none());
    }

    #[test]
    fn init_logging_after_capture_reports_already_initialized() {
        let _cap = capture_access_logs();
        assert!(matches!(
            init_logging("info", false, None),
            Err(TelemetryError::AlreadyInitialized)
        ));
    }

    #[test]
    fn detached_handle_set_and_current() {
        let h = LogHandle::detached("info").expect("filter");
        h.set("debug,hyper=warn").expect("valid");
        let now = h.current();
        assert!(now.contains("hyper=warn") && now.contains("debug"), "{now}");
        assert!(h.set("=").is_err());
        assert_eq!(h.current(), now);
    }

    #[test]
    fn strict_filter_parsing() {
        assert!(parse_filter("info,zmesh_core=debug").is_ok());
        assert!(matches!(
            parse_filter("zmesh=notalevel"),
            Err(TelemetryError::InvalidFilter { .. })
        ));
        assert!(parse_filter("  ").is_err());
        for bad in ["=", "=info", "zmesh=", "info,,debug", "a=b=c"] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
        assert!(
            parse_filter("zmesh_core").is_ok(),
            "a bare target means all its levels"
        );
        assert!(matches!(
            parse_filter(&"a".repeat(MAX_FILTER_LEN + 1)),
            Err(TelemetryError::FilterTooLong)
        ));
    }
}
