//! Prometheus metrics with Istio's names and labels.
//!
//! One [`Metrics`] per process holds the registry that the metrics server (port 15020) encodes.
//! Traffic metrics live under the `istio` prefix with Istio ztunnel's label set, in the order Istio
//! emits it, so existing dashboards and alerts work unchanged. Empty label values are rendered as
//! `"unknown"` by the encoder, like Istio does.
//!
//! Per-connection bookkeeping goes through [`ConnectionRecorder`], which guarantees that a connection is
//! counted as opened once and closed once, whatever path the proxy takes out of it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::identity::Identity;
use crate::state::{Service, Workload};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
    LabelSetEncoder, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

/// Which side of the connection reports the metric.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    /// The proxy on the client side (outbound).
    Source,
    /// The proxy on the server side (inbound).
    Destination,
    /// A waypoint between the two.
    Waypoint,
}

impl Reporter {
    /// Istio's label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
            Reporter::Waypoint => "waypoint",
        }
    }
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Istio's TCP response flags.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub enum ResponseFlags {
    /// No failure: `-`.
    #[default]
    None,
    /// Denied by authorization policy: `DENY`.
    Deny,
    /// Could not connect upstream: `CONNECT`.
    Connect,
    /// TLS handshake failed: `TLS_FAILURE`.
    TlsFailure,
    /// HTTP/2 handshake (HBONE) failed: `H2_HANDSHAKE_FAILURE`.
    H2HandshakeFailure,
    /// Dropped by network policy: `NETWORK_POLICY`.
    NetworkPolicy,
    /// Peer identity missing or wrong: `IDENTITY_ERROR`.
    IdentityError,
}

impl ResponseFlags {
    /// Istio's label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Deny => "DENY",
            ResponseFlags::Connect => "CONNECT",
            ResponseFlags::TlsFailure => "TLS_FAILURE",
            ResponseFlags::H2HandshakeFailure => "H2_HANDSHAKE_FAILURE",
            ResponseFlags::NetworkPolicy => "NETWORK_POLICY",
            ResponseFlags::IdentityError => "IDENTITY_ERROR",
        }
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Istio's `connection_security_policy` label.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub enum SecurityPolicy {
    /// The connection was mTLS (HBONE): `mutual_tls`.
    MutualTls,
    /// Plaintext or not known: `unknown`.
    #[default]
    Unknown,
}

impl SecurityPolicy {
    /// Istio's label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::Unknown => "unknown",
        }
    }
}

impl EncodeLabelValue for SecurityPolicy {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Istio's TCP traffic labels (`CommonTrafficLabels`).
///
/// `EncodeLabelSet` is implemented by hand (not derived) so that labels come out in Istio's emitted
/// order and empty strings are rendered as `"unknown"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    /// `"tcp"` for L4 traffic.
    pub request_protocol: String,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

impl TcpLabels {
    /// Labels with everything unknown except the reporter; `request_protocol` is `"tcp"`,
    /// `response_flags` is `-`. Fill in what is known with struct update syntax.
    pub fn new(reporter: Reporter) -> Self {
        TcpLabels {
            reporter,
            source_workload: String::new(),
            source_canonical_service: String::new(),
            source_canonical_revision: String::new(),
            source_workload_namespace: String::new(),
            source_principal: String::new(),
            source_app: String::new(),
            source_version: String::new(),
            source_cluster: String::new(),
            destination_service: String::new(),
            destination_service_namespace: String::new(),
            destination_service_name: String::new(),
            destination_workload: String::new(),
            destination_canonical_service: String::new(),
            destination_canonical_revision: String::new(),
            destination_workload_namespace: String::new(),
            destination_principal: String::new(),
            destination_app: String::new(),
            destination_version: String::new(),
            destination_cluster: String::new(),
            request_protocol: "tcp".to_string(),
            response_flags: ResponseFlags::None,
            connection_security_policy: SecurityPolicy::Unknown,
        }
    }
}

/// Istio renders missing values as "unknown" rather than an empty label.
fn or_unknown(s: &str) -> &str {
    if s.is_empty() { "unknown" } else { s }
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        ("reporter", self.reporter).encode(encoder.encode_label())?;
        let strings: [(&str, &str); 20] = [
            ("source_workload", &self.source_workload),
            ("source_canonical_service", &self.source_canonical_service),
            ("source_canonical_revision", &self.source_canonical_revision),
            ("source_workload_namespace", &self.source_workload_namespace),
            ("source_principal", &self.source_principal),
            ("source_app", &self.source_app),
            ("source_version", &self.source_version),
            ("source_cluster", &self.source_cluster),
            ("destination_service", &self.destination_service),
            (
                "destination_service_namespace",
                &self.destination_service_namespace,
            ),
            ("destination_service_name", &self.destination_service_name),
            ("destination_workload", &self.destination_workload),
            (
                "destination_canonical_service",
                &self.destination_canonical_service,
            ),
            (
                "destination_canonical_revision",
                &self.destination_canonical_revision,
            ),
            (
                "destination_workload_namespace",
                &self.destination_workload_namespace,
            ),
            ("destination_principal", &self.destination_principal),
            ("destination_app", &self.destination_app),
            ("destination_version", &self.destination_version),
            ("destination_cluster", &self.destination_cluster),
            ("request_protocol", &self.request_protocol),
        ];
        for (key, value) in strings {
            (key, or_unknown(value)).encode(encoder.encode_label())?;
        }
        ("response_flags", self.response_flags).encode(encoder.encode_label())?;
        (
            "connection_security_policy",
            self.connection_security_policy,
        )
            .encode(encoder.encode_label())?;
        Ok(())
    }
}

/// The canonical service name Istio reports: the canonical name label, else the workload name.
pub fn canonical(w: &Workload) -> &str {
    if w.canonical_name.is_empty() {
        &w.workload_name
    } else {
        &w.canonical_name
    }
}

/// Istio's TCP metric labels for one connection. Unknown values stay empty; the metrics
/// encoder renders them as `unknown`, as Istio does.
pub fn traffic_labels(
    reporter: Reporter,
    src: Option<&Workload>,
    src_identity: Option<&Identity>,
    dst: Option<&Workload>,
    service: Option<&Service>,
    security: SecurityPolicy,
) -> TcpLabels {
    let field = |w: Option<&Workload>, f: fn(&Workload) -> &str| w.map(f).unwrap_or("").to_string();
    // The source reporter presents the source's own certificate, so its identity is known; a
    // destination only knows what the peer proved (plaintext has no principal, whatever the
    // source address says).
    let src_principal = src_identity
        .map(|i| i.to_string())
        .or_else(|| {
            (reporter == Reporter::Source)
                .then(|| src.map(|w| w.identity().to_string()))
                .flatten()
        })
        .unwrap_or_default();
    TcpLabels {
        source_workload: field(src, |w| &w.workload_name),
        source_canonical_service: field(src, canonical),
        source_canonical_revision: field(src, |w| &w.canonical_revision),
        source_workload_namespace: field(src, |w| &w.namespace),
        source_principal: src_principal,
        source_app: field(src, canonical),
        source_version: field(src, |w| &w.canonical_revision),
        source_cluster: field(src, |w| &w.cluster_id),
        destination_service: service.map(|s| s.hostname.clone()).unwrap_or_default(),
        destination_service_namespace: service.map(|s| s.namespace.clone()).unwrap_or_default(),
        destination_service_name: service.map(|s| s.name.clone()).unwrap_or_default(),
        destination_workload: field(dst, |w| &w.workload_name),
        destination_canonical_service: field(dst, canonical),
        destination_canonical_revision: field(dst, |w| &w.canonical_revision),
        destination_workload_namespace: field(dst, |w| &w.namespace),
        destination_principal: dst.map(|w| w.identity().to_string()).unwrap_or_default(),
        destination_app: field(dst, canonical),
        destination_version: field(dst, |w| &w.canonical_revision),
        destination_cluster: field(dst, |w| &w.cluster_id),
        connection_security_policy: security,
        ..TcpLabels::new(reporter)
    }
}

/// The single `reporter` label of `istio_tcp_sockets_open`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ReporterLabel {
    pub reporter: Reporter,
}

impl EncodeLabelSet for ReporterLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        ("reporter", self.reporter).encode(encoder.encode_label())
    }
}

/// Labels of `istio_build`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct BuildLabels {
    component: String,
    tag: String,
}

impl EncodeLabelSet for BuildLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        ("component", self.component.as_str()).encode(encoder.encode_label())?;
        ("tag", self.tag.as_str()).encode(encoder.encode_label())
    }
}

/// Istio's L4 traffic metrics.
#[derive(Debug, Default)]
pub struct TcpMetrics {
    /// `istio_tcp_connections_opened_total`
    pub opened: Family<TcpLabels, Counter>,
    /// `istio_tcp_connections_closed_total`
    pub closed: Family<TcpLabels, Counter>,
    /// `istio_tcp_sent_bytes_total`
    pub sent_bytes: Family<TcpLabels, Counter>,
    /// `istio_tcp_received_bytes_total`
    pub received_bytes: Family<TcpLabels, Counter>,
    /// `istio_tcp_connections_failed_total`
    pub failed: Family<TcpLabels, Counter>,
    /// `istio_tcp_sockets_open{reporter}`
    pub sockets_open: Family<ReporterLabel, Gauge>,
}

impl TcpMetrics {
    /// Count a connection that failed before it was established (e.g. a TLS handshake failure),
    /// without an opened/closed pair. Set `labels.response_flags` to say why.
    pub fn record_failure(&self, labels: &TcpLabels) {
        self.failed.get_or_create(labels).inc();
    }

    fn register(&self, istio: &mut Registry) {
        istio.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            self.opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            self.closed.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            self.sent_bytes.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            self.received_bytes.clone(),
        );
        istio.register(
            "tcp_connections_failed",
            "The total number of TCP connections that failed to establish",
            self.failed.clone(),
        );
        istio.register(
            "tcp_sockets_open",
            "The number of currently open TCP sockets",
            self.sockets_open.clone(),
        );
    }
}

/// Reads the process file-descriptor usage at scrape time (`process_open_fds`, `process_max_fds`).
#[derive(Debug)]
struct ProcessCollector;

impl ProcessCollector {
    /// Entries in /proc/self/fd (includes the descriptor used to list it, like Prometheus' own
    /// process collector). `None` where /proc is unavailable.
    fn open_fds() -> Option<i64> {
        let dir = std::fs::read_dir("/proc/self/fd").ok()?;
        // Bounded by RLIMIT_NOFILE, so counting is cheap enough per scrape.
        Some(dir.filter(|e| e.is_ok()).count() as i64)
    }

    /// Soft RLIMIT_NOFILE.
    fn max_fds() -> Option<i64> {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes into the struct we pass, which is valid and properly sized.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        if rc != 0 {
            return None;
        }
        if lim.rlim_cur == libc::RLIM_INFINITY {
            return Some(i64::MAX);
        }
        Some(i64::try_from(lim.rlim_cur).unwrap_or(i64::MAX))
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        if let Some(open) = Self::open_fds() {
            let g = ConstGauge::new(open);
            let m = encoder.encode_descriptor(
                "process_open_fds",
                "Number of open file descriptors.",
                None,
                g.metric_type(),
            )?;
            g.encode(m)?;
        }
        if let Some(max) = Self::max_fds() {
            let g = ConstGauge::new(max);
            let m = encoder.encode_descriptor(
                "process_max_fds",
                "Maximum number of open file descriptors.",
                None,
                g.metric_type(),
            )?;
            g.encode(m)?;
        }
        Ok(())
    }
}

/// The process-wide metrics: the registry plus the metrics every proxy records.
#[derive(Debug)]
pub struct Metrics {
    /// L4 traffic metrics (`istio_tcp_*`).
    pub tcp: TcpMetrics,
    registry: Mutex<Registry>,
}

impl Metrics {
    /// Create the registry with `istio_build{component,tag}` (tag = this crate's version),
    /// the TCP metrics and the process fd collector.
    pub fn new(component: &str) -> Arc<Self> {
        let mut registry = Registry::default();
        // Process metrics are unprefixed, as in Istio.
        registry.register_collector(Box::new(ProcessCollector));
        let tcp = TcpMetrics::default();
        let istio = registry.sub_registry_with_prefix("istio");
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                component: component.to_string(),
                tag: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        istio.register("build", "Istio component build info", build);
        tcp.register(istio);
        Arc::new(Metrics {
            tcp,
            registry: Mutex::new(registry),
        })
    }

    /// Register more metrics. The closure gets the root registry; use
    /// `registry.sub_registry_with_prefix("istio")` for Istio-named metrics.
    pub fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        // A panic while registering leaves the registry usable; don't poison scrapes forever.
        let mut reg = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut reg)
    }

    /// Encode everything in the OpenMetrics text format (ends with `# EOF`).
    pub fn encode(&self) -> String {
        let reg = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail; an Err could only come from a custom collector.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
            tracing::warn!(error = %e, "metrics encoding failed; output is partial");
        }
        out
    }
}

/// Metric bookkeeping for one proxied connection.
///
/// Creating it counts `opened` and increments `sockets_open`; dropping it counts `closed` (and `failed`
/// when [`fail`](Self::fail) was called), flushes outstanding bytes and decrements `sockets_open` —
/// exactly once, since it happens in `Drop`.
#[derive(Debug)]
pub struct ConnectionRecorder {
    metrics: Arc<Metrics>,
    labels: TcpLabels,
    flags: Mutex<Option<ResponseFlags>>,
    // Bytes not yet added to the counters; kept apart so the hot path is one atomic add.
    pending_sent: AtomicU64,
    pending_received: AtomicU64,
    total_sent: AtomicU64,
    total_received: AtomicU64,
}

impl ConnectionRecorder {
    /// Start recording; counts the connection as opened now.
    pub fn new(metrics: Arc<Metrics>, labels: TcpLabels) -> Self {
        metrics.tcp.opened.get_or_create(&labels).inc();
        metrics
            .tcp
            .sockets_open
            .get_or_create(&ReporterLabel {
                reporter: labels.reporter,
            })
            .inc();
        ConnectionRecorder {
            metrics,
            labels,
            flags: Mutex::new(None),
            pending_sent: AtomicU64::new(0),
            pending_received: AtomicU64::new(0),
            total_sent: AtomicU64::new(0),
            total_received: AtomicU64::new(0),
        }
    }

    /// Bytes sent towards the client (the "response" direction in Istio terms).
    pub fn add_sent(&self, n: u64) {
        self.pending_sent.fetch_add(n, Ordering::Relaxed);
        self.total_sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes received from the client.
    pub fn add_received(&self, n: u64) {
        self.pending_received.fetch_add(n, Ordering::Relaxed);
        self.total_received.fetch_add(n, Ordering::Relaxed);
    }

    /// Total bytes sent so far (for access logs).
    pub fn bytes_sent(&self) -> u64 {
        self.total_sent.load(Ordering::Relaxed)
    }

    /// Total bytes received so far (for access logs).
    pub fn bytes_received(&self) -> u64 {
        self.total_received.load(Ordering::Relaxed)
    }

    /// Mark the connection failed; `flags` becomes the `response_flags` of the closed/failed
    /// counters (and of bytes flushed from now on). The last call wins.
    pub fn fail(&self, flags: ResponseFlags) {
        *self.flags.lock().unwrap_or_else(PoisonError::into_inner) = Some(flags);
    }

    /// The labels used for the close-time counters.
    fn final_labels(&self) -> TcpLabels {
        let flags = *self.flags.lock().unwrap_or_else(PoisonError::into_inner);
        match flags {
            Some(f) => TcpLabels {
                response_flags: f,
                ..self.labels.clone()
            },
            None => self.labels.clone(),
        }
    }

    /// Push the bytes counted so far into the counters. Call periodically on long-lived
    /// connections so byte rates show up before they close; `Drop` does a final flush.
    pub fn flush(&self) {
        let sent = self.pending_sent.swap(0, Ordering::Relaxed);
        let recv = self.pending_received.swap(0, Ordering::Relaxed);
        if sent == 0 && recv == 0 {
            return;
        }
        let labels = self.final_labels();
        if sent > 0 {
            self.metrics
                .tcp
                .sent_bytes
                .get_or_create(&labels)
                .inc_by(sent);
        }
        if recv > 0 {
            self.metrics
                .tcp
                .received_bytes
                .get_or_create(&labels)
                .inc_by(recv);
        }
    }
}

impl Drop for ConnectionRecorder {
    fn drop(&mut self) {
        self.flush();
        let failed = self
            .flags
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        let labels = self.final_labels();
        self.metrics.tcp.closed.get_or_create(&labels).inc();
        if failed {
            self.metrics.tcp.failed.get_or_create(&labels).inc();
        }
        self.metrics
            .tcp
            .sockets_open
            .get_or_create(&ReporterLabel {
                reporter: labels.reporter,
            })
            .dec();
    }
}

/// Sum of the samples of `metric` in a Prometheus text exposition whose labels include all of
/// `labels`; `None` when no sample matches. For readers of `/metrics` (tests, `zmesh status`).
pub fn sample_sum(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let prefix = format!("{metric}{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter(|l| {
            labels.iter().all(|(k, v)| {
                let pair = format!("{k}=\"{v}\"");
                l.contains(&format!("{{{pair}")) || l.contains(&format!(",{pair}"))
            })
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_sum_adds_matching_samples_only() {
        let text = "# TYPE x counter\n\
            x_total{a=\"1\",b=\"2\"} 3\n\
            x_total{a=\"1\",b=\"9\"} 4\n\
            x_total{xa=\"1\"} 100\n\
            x_total_other{a=\"1\"} 50\n";
        assert_eq!(sample_sum(text, "x_total", &[("a", "1")]), Some(7.0));
        assert_eq!(sample_sum(text, "x_total", &[("b", "9")]), Some(4.0));
        assert_eq!(sample_sum(text, "x_total", &[("a", "2")]), None);
        assert_eq!(sample_sum(text, "y_total", &[]), None);
    }

    fn labels() -> TcpLabels {
        TcpLabels {
            source_workload: "sleep".into(),
            source_workload_namespace: "default".into(),
            source_principal: "spiffe://cluster.local/ns/default/sa/sleep".into(),
            destination_service: "echo.default.svc.cluster.local".into(),
            destination_workload: "echo".into(),
            connection_security_policy: SecurityPolicy::MutualTls,
            ..TcpLabels::new(Reporter::Destination)
        }
    }

    fn counter(f: &Family<TcpLabels, Counter>, l: &TcpLabels) -> u64 {
        f.get(l).map(|c| c.get()).unwrap_or(0)
    }

    #[test]
    fn recorder_counts_opened_bytes_closed_once() {
        let m = Metrics::new("ztunnel");
        let l = labels();
        let rec = ConnectionRecorder::new(m.clone(), l.clone());
        assert_eq!(counter(&m.tcp.opened, &l), 1);
        assert_eq!(counter(&m.tcp.closed, &l), 0);
        let open = ReporterLabel {
            reporter: Reporter::Destination,
        };
        assert_eq!(m.tcp.sockets_open.get_or_create(&open).get(), 1);
        rec.add_sent(10);
        rec.add_sent(5);
        rec.add_received(7);
        assert_eq!(rec.bytes_sent(), 15);
        rec.flush();
        assert_eq!(counter(&m.tcp.sent_bytes, &l), 15);
        rec.add_received(3);
        drop(rec);
        assert_eq!(counter(&m.tcp.opened, &l), 1);
        assert_eq!(counter(&m.tcp.closed, &l), 1);
        assert_eq!(counter(&m.tcp.sent_bytes, &l), 15);
        assert_eq!(counter(&m.tcp.received_bytes, &l), 10);
        assert_eq!(counter(&m.tcp.failed, &l), 0);
        assert_eq!(m.tcp.sockets_open.get_or_create(&open).get(), 0);
    }

    #[test]
    fn failure_flag_lands_in_closed_and_failed() {
        let m = Metrics::new("ztunnel");
        let l = labels();
        let rec = ConnectionRecorder::new(m.clone(), l.clone());
        rec.add_received(4);
        rec.fail(ResponseFlags::Connect);
        drop(rec);
        let failed = TcpLabels {
            response_flags: ResponseFlags::Connect,
            ..l.clone()
        };
        assert_eq!(counter(&m.tcp.opened, &l), 1);
        assert_eq!(counter(&m.tcp.closed, &l), 0);
        assert_eq!(counter(&m.tcp.closed, &failed), 1);
        assert_eq!(counter(&m.tcp.failed, &failed), 1);
        assert_eq!(counter(&m.tcp.received_bytes, &failed), 4);
        let text = m.encode();
        assert!(
            text.contains("istio_tcp_connections_failed_total{reporter=\"destination\"")
                && text.contains("response_flags=\"CONNECT\""),
            "{text}"
        );
    }

    #[test]
    fn record_failure_without_opened() {
        let m = Metrics::new("ztunnel");
        let l = TcpLabels {
            response_flags: ResponseFlags::TlsFailure,
            ..TcpLabels::new(Reporter::Destination)
        };
        m.tcp.record_failure(&l);
        assert_eq!(counter(&m.tcp.failed, &l), 1);
        let text = m.encode();
        assert!(text.contains("response_flags=\"TLS_FAILURE\""), "{text}");
        assert!(
            !text.contains("istio_tcp_connections_opened_total{"),
            "{text}"
        );
    }

    #[test]
    fn encoded_text_has_istio_names_order_and_unknowns() {
        let m = Metrics::new("ztunnel");
        let _rec = ConnectionRecorder::new(m.clone(), labels());
        let text = m.encode();
        let expected = concat!(
            "istio_tcp_connections_opened_total{reporter=\"destination\",",
            "source_workload=\"sleep\",source_canonical_service=\"unknown\",",
            "source_canonical_revision=\"unknown\",source_workload_namespace=\"default\",",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\",",
            "source_app=\"unknown\",source_version=\"unknown\",source_cluster=\"unknown\",",
            "destination_service=\"echo.default.svc.cluster.local\",",
            "destination_service_namespace=\"unknown\",destination_service_name=\"unknown\",",
            "destination_workload=\"echo\",destination_canonical_service=\"unknown\",",
            "destination_canonical_revision=\"unknown\",destination_workload_namespace=\"unknown\",",
            "destination_principal=\"unknown\",destination_app=\"unknown\",",
            "destination_version=\"unknown\",destination_cluster=\"unknown\",",
            "request_protocol=\"tcp\",response_flags=\"-\",",
            "connection_security_policy=\"mutual_tls\"} 1\n",
        );
        assert!(text.contains(expected), "{text}");
        assert!(
            text.contains("istio_tcp_sockets_open{reporter=\"destination\"} 1"),
            "{text}"
        );
        let build = format!(
            "istio_build{{component=\"ztunnel\",tag=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
        assert!(text.contains("# TYPE process_open_fds gauge"), "{text}");
        assert!(text.contains("\nprocess_open_fds "), "{text}");
        assert!(text.contains("\nprocess_max_fds "), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn with_registry_adds_metrics() {
        let m = Metrics::new("waypoint");
        let c: Family<TcpLabels, Counter> = Family::default();
        m.with_registry(|r| {
            r.sub_registry_with_prefix("istio")
                .register("requests", "requests", c.clone())
        });
        c.get_or_create(&TcpLabels::new(Reporter::Source)).inc();
        assert!(
            m.encode()
                .contains("istio_requests_total{reporter=\"source\"")
        );
    }
}
