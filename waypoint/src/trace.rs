//! Distributed tracing: the waypoint's span per HTTP request, exported over OTLP/gRPC, as Envoy
//! does in an Istio waypoint with an OpenTelemetry provider.
//!
//! Off unless an exporter is configured — fixed by the waypoint's flags ([`TracingConfig`]),
//! or by the control plane: the `WaypointTelemetry` the controller resolves for this waypoint
//! from Telemetry resources and the mesh config, followed at run time ([`follow`]). Off, the
//! request path does not look at a single trace header (pure passthrough; `x-request-id` is
//! handled elsewhere).
//!
//! When on, for each request:
//! - **Incoming context**: a valid W3C `traceparent` wins; else B3 multi-header
//!   (`x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`, `x-b3-flags`); else B3 single (`b3`).
//!   Invalid values count as no context (W3C rules: version `00` is exactly 55 characters,
//!   lowercase hex, all-zero ids invalid, version `ff` invalid; several `traceparent` headers
//!   are invalid).
//! - **Sampling**: the caller's sampled flag is honoured; a B3 caller may defer (no sampling
//!   state) and a new trace is sampled with the configured percentage (Istio's default 1 %).
//! - **Our span**: a new random span id, the caller's trace id (a new random one when there is
//!   no context), the caller's span as parent.
//! - **Outgoing headers** (set on the request before routing, so every try and mirror carries
//!   them): `traceparent` = `00-<trace>-<our span>-<flags>`, and the B3 set (`x-b3-traceid`,
//!   `x-b3-spanid` = ours, `x-b3-parentspanid` = the caller's span, `x-b3-sampled`; `b3`
//!   rewritten when the caller sent it), so an application propagating either format joins the
//!   trace. `tracestate` passes through when the context came from `traceparent`; otherwise it
//!   belongs to no trace we continue and is removed.
//!   A request with **no context that is not sampled is left untouched**: adding an unsampled
//!   context would cost two allocations per request on the 99 % path for no span (Envoy would
//!   inject one; an application downstream then starts its own root, as without a mesh).
//! - **Span** (sampled only, so an unsampled request allocates nothing beyond the header
//!   rewrite): kind SERVER, named as Istio's route decorator `<service host>:<port>/*`, from
//!   when the request arrived to when its response body was done (the point where telemetry
//!   records the request), with Envoy's and Istio's tags (`http.method`, `http.url`,
//!   `http.status_code`, `response_flags`, `upstream_cluster`, `node_id`, `zone`,
//!   `istio.canonical_service`, `istio.namespace`, `guid:x-request-id`, `user_agent`,
//!   `request_size`, `response_size`, ...) as string attributes, as Envoy sends them; status
//!   ERROR (and tag `error`) for 5xx.
//!
//! Why SERVER: Envoy reports one span per request from a waypoint, and a span that starts when
//! a request is received and ends when its response is sent is the server side of that hop —
//! the caller's CLIENT span is its parent and the application's SERVER span its child. Istio's
//! gateways report theirs as CLIENT (Envoy's egress operation), which tracing backends that
//! derive endpoints and RED metrics from SERVER spans cannot use (istio/istio#55637).
//!
//! Export: spans go into a bounded queue (full: dropped and counted, never waited for); a task
//! on the control runtime sends them in batches of up to `batch_size` or every
//! `flush_interval` to `opentelemetry.proto.collector.trace.v1.TraceService/Export`, with
//! connect and request timeouts; after a failure it backs off (doubling, capped) before the
//! next attempt, and the spans of a failed export are counted, not retried (as Envoy's
//! exporter). Counters are in the admin `/stats` (`tracing.opentelemetry.*`).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use http::header::{HeaderName, USER_AGENT};
use http::{HeaderMap, HeaderValue, Uri};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use crate::store::L7Store;
use zmesh_proto::l7;
use zmesh_proto::otlp_collector::ExportTraceServiceRequest;
use zmesh_proto::otlp_collector::trace_service_client::TraceServiceClient;
use zmesh_proto::otlp_common::{AnyValue, InstrumentationScope, KeyValue, any_value};
use zmesh_proto::otlp_resource::Resource;
use zmesh_proto::otlp_trace::{ResourceSpans, ScopeSpans, Span, Status, span, status};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
pub const B3_SINGLE: HeaderName = HeaderName::from_static("b3");

/// W3C trace flag: the caller may have recorded (sampled) its span.
pub const FLAG_SAMPLED: u8 = 0x01;

/// Errors configuring the tracer.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("tracing: OTLP endpoint {endpoint:?} is not usable: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("tracing: sampling percentage {0} is not within 0..=100")]
    Sampling(f64),
}

/// Tracing settings. Tracing is on when the waypoint [`crate::Config`] has one.
#[derive(Debug, Clone)]
pub struct TracingConfig {
    /// OTLP/gRPC collector, `http://host:4317` (plaintext, as Istio's `opentelemetry`
    /// provider sends to an in-cluster collector).
    pub endpoint: String,
    /// Percentage of new traces (no sampling decision from the caller) that are sampled.
    pub sampling_percent: f64,
    /// Resource `service.name`; default `<gateway name>.<namespace>`, as Istio names a
    /// waypoint's spans.
    pub service_name: Option<String>,
    /// Span tag `node_id` (Envoy's node id); default
    /// `waypoint~<HBONE ip>~<gateway>.<namespace>~<namespace>.svc.cluster.local`.
    pub node_id: Option<String>,
    /// Span tag `zone` (the proxy's locality zone; empty when unknown, as Envoy).
    pub zone: String,
    /// Span tag `istio.cluster_id`, when known.
    pub cluster_id: Option<String>,
    /// Spans waiting for export at most; more are dropped (and counted).
    pub queue_capacity: usize,
    /// Spans per Export call; a full batch is sent without waiting for the interval.
    pub batch_size: usize,
    /// Spans waiting are sent at least this often.
    pub flush_interval: Duration,
    pub connect_timeout: Duration,
    /// Time an Export call may take (connection included).
    pub export_timeout: Duration,
    /// Wait after a failed export before the next attempt, doubled per failure up to
    /// `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl TracingConfig {
    /// Defaults as the OpenTelemetry SDKs' batch span processor (queue 2048, batches of 512)
    /// and Envoy's OpenTelemetry tracer (flush every 5 s); Istio's 1 % sampling.
    pub fn new(endpoint: impl Into<String>) -> Self {
        TracingConfig {
            endpoint: endpoint.into(),
            sampling_percent: 1.0,
            service_name: None,
            node_id: None,
            zone: String::new(),
            cluster_id: None,
            queue_capacity: 2048,
            batch_size: 512,
            flush_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            export_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Header parsing and formatting.

/// Where an incoming context came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    W3c,
    B3Multi,
    B3Single,
}

/// The caller's span context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// W3C trace flags (B3: the sampled bit only).
    pub flags: u8,
    /// The caller's sampling decision; `None`: left to us (B3 without a sampling state).
    pub sampled: Option<bool>,
    pub source: Source,
}

/// What a request's headers say about its trace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Incoming {
    pub context: Option<SpanContext>,
    /// A sampling decision sent without ids (`b3: 0`, `x-b3-sampled: 1` alone).
    pub sampled: Option<bool>,
}

impl Incoming {
    /// The caller's decision, if it made one.
    pub fn decision(&self) -> Option<bool> {
        self.context.and_then(|c| c.sampled).or(self.sampled)
    }
}

fn hex_val(c: u8, upper_ok: bool) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' if upper_ok => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decode exactly `out.len() * 2` hex characters.
fn decode_hex(s: &[u8], out: &mut [u8], upper_ok: bool) -> bool {
    if s.len() != out.len() * 2 {
        return false;
    }
    for (i, o) in out.iter_mut().enumerate() {
        match (hex_val(s[2 * i], upper_ok), hex_val(s[2 * i + 1], upper_ok)) {
            (Some(h), Some(l)) => *o = h << 4 | l,
            _ => return false,
        }
    }
    true
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn encode_hex(b: &[u8], out: &mut [u8]) {
    for (i, x) in b.iter().enumerate() {
        out[2 * i] = HEX[usize::from(x >> 4)];
        out[2 * i + 1] = HEX[usize::from(x & 0xf)];
    }
}

fn nonzero(b: &[u8]) -> bool {
    b.iter().any(|&x| x != 0)
}

/// Parse a W3C `traceparent` value: (trace id, parent id, flags).
pub fn parse_traceparent(v: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    if v.len() < 55 {
        return None;
    }
    let mut version = [0u8; 1];
    if !decode_hex(&v[0..2], &mut version, false) || version[0] == 0xff {
        return None;
    }
    // Version 00 is exactly 55 characters; a later version may append fields after a '-'.
    match (version[0], v.len()) {
        (_, 55) => {}
        (0, _) => return None,
        (_, _) if v[55] == b'-' => {}
        _ => return None,
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let mut trace = [0u8; 16];
    let mut span = [0u8; 8];
    let mut flags = [0u8; 1];
    if !decode_hex(&v[3..35], &mut trace, false)
        || !decode_hex(&v[36..52], &mut span, false)
        || !decode_hex(&v[53..55], &mut flags, false)
        || !nonzero(&trace)
        || !nonzero(&span)
    {
        return None;
    }
    Some((trace, span, flags[0]))
}

/// `00-<trace>-<span>-<flags>`.
pub fn format_traceparent(trace: &[u8; 16], span: &[u8; 8], flags: u8) -> [u8; 55] {
    let mut out = [b'-'; 55];
    out[0] = b'0';
    out[1] = b'0';
    encode_hex(trace, &mut out[3..35]);
    encode_hex(span, &mut out[36..52]);
    encode_hex(&[flags], &mut out[53..55]);
    out
}

/// A B3 trace id: 64 or 128 bits of hex (64 bits are the low half of a 128-bit id).
fn parse_b3_trace_id(v: &[u8]) -> Option<[u8; 16]> {
    let mut id = [0u8; 16];
    let ok = match v.len() {
        32 => decode_hex(v, &mut id, true),
        16 => decode_hex(v, &mut id[8..], true),
        _ => false,
    };
    (ok && nonzero(&id)).then_some(id)
}

fn parse_b3_span_id(v: &[u8]) -> Option<[u8; 8]> {
    let mut id = [0u8; 8];
    (decode_hex(v, &mut id, true) && nonzero(&id)).then_some(id)
}

/// `x-b3-sampled`: `1`/`0` (and the legacy `true`/`false`).
fn parse_b3_sampled(v: &[u8]) -> Option<bool> {
    match v {
        b"1" | b"true" => Some(true),
        b"0" | b"false" => Some(false),
        _ => None,
    }
}

/// The one value of header `name` (a repeated header is as good as none).
fn single<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a [u8]> {
    let mut it = h.get_all(name).iter();
    let first = it.next()?;
    it.next().is_none().then(|| first.as_bytes())
}

/// B3 multi-header context (`x-b3-*`).
pub fn parse_b3_multi(h: &HeaderMap) -> Incoming {
    // Debug (`x-b3-flags: 1`) implies an accept decision.
    let debug = single(h, &B3_FLAGS) == Some(b"1");
    let sampled = if debug {
        Some(true)
    } else {
        single(h, &B3_SAMPLED).and_then(parse_b3_sampled)
    };
    let trace = single(h, &B3_TRACE_ID).and_then(parse_b3_trace_id);
    let span = single(h, &B3_SPAN_ID).and_then(parse_b3_span_id);
    let context = match (trace, span) {
        (Some(trace_id), Some(span_id)) => Some(SpanContext {
            trace_id,
            span_id,
            flags: u8::from(sampled == Some(true)),
            sampled,
            source: Source::B3Multi,
        }),
        _ => None,
    };
    Incoming { context, sampled }
}

/// B3 single header: `{trace}-{span}[-{sampling}[-{parent span}]]`, or `{sampling}` alone
/// (`0`, `1`, `d` for debug).
pub fn parse_b3_single(v: &[u8]) -> Incoming {
    let state = |s: &[u8]| match s {
        b"1" | b"d" => Some(Some(true)),
        b"0" => Some(Some(false)),
        _ => None,
    };
    let mut parts = v.split(|&c| c == b'-');
    let (Some(first), second) = (parts.next(), parts.next()) else {
        return Incoming::default();
    };
    let Some(second) = second else {
        return Incoming {
            context: None,
            sampled: state(first).flatten(),
        };
    };
    let sampled = match parts.next() {
        None => None,
        Some(s) => match state(s) {
            Some(d) => d,
            None => return Incoming::default(),
        },
    };
    // A parent span id, if any, must be well-formed, and nothing may follow it.
    if let Some(p) = parts.next()
        && (parse_b3_span_id(p).is_none() || parts.next().is_some())
    {
        return Incoming::default();
    }
    let (Some(trace_id), Some(span_id)) = (parse_b3_trace_id(first), parse_b3_span_id(second))
    else {
        return Incoming::default();
    };
    Incoming {
        context: Some(SpanContext {
            trace_id,
            span_id,
            flags: u8::from(sampled == Some(true)),
            sampled,
            source: Source::B3Single,
        }),
        sampled,
    }
}

/// The incoming trace context: `traceparent` first, then B3 multi, then B3 single.
pub fn extract(h: &HeaderMap) -> Incoming {
    if let Some((trace_id, span_id, flags)) = single(h, &TRACEPARENT).and_then(parse_traceparent) {
        return Incoming {
            context: Some(SpanContext {
                trace_id,
                span_id,
                flags,
                sampled: Some(flags & FLAG_SAMPLED != 0),
                source: Source::W3c,
            }),
            sampled: None,
        };
    }
    let multi =
        if h.contains_key(B3_TRACE_ID) || h.contains_key(B3_SAMPLED) || h.contains_key(B3_FLAGS) {
            parse_b3_multi(h)
        } else {
            Incoming::default()
        };
    if multi.context.is_some() {
        return multi;
    }
    match single(h, &B3_SINGLE).map(parse_b3_single) {
        Some(s) if s.context.is_some() || multi.sampled.is_none() => s,
        _ => multi,
    }
}

/// A B3 trace id as the shortest form that keeps it: 16 hex characters when the high half is
/// zero (a 64-bit trace started by a B3 caller stays as it was sent), else 32.
fn b3_trace_hex(trace: &[u8; 16], out: &mut [u8; 32]) -> usize {
    if nonzero(&trace[..8]) {
        encode_hex(trace, out);
        32
    } else {
        encode_hex(&trace[8..], &mut out[..16]);
        16
    }
}

fn header(bytes: &[u8]) -> Option<HeaderValue> {
    // Hex and '-' only: always a valid header value.
    HeaderValue::from_bytes(bytes).ok()
}

/// Write our context into the upstream request's headers.
pub fn inject(
    h: &mut HeaderMap,
    trace: &[u8; 16],
    span: &[u8; 8],
    parent: Option<&[u8; 8]>,
    flags: u8,
    source: Option<Source>,
) {
    let sampled = flags & FLAG_SAMPLED != 0;
    if let Some(v) = header(&format_traceparent(trace, span, flags)) {
        h.insert(TRACEPARENT, v);
    }
    if source != Some(Source::W3c) {
        h.remove(TRACESTATE);
    }
    let mut t = [0u8; 32];
    let tn = b3_trace_hex(trace, &mut t);
    let mut s = [0u8; 16];
    encode_hex(span, &mut s);
    let mut p = [0u8; 16];
    if let Some(parent) = parent {
        encode_hex(parent, &mut p);
    }
    if let Some(v) = header(&t[..tn]) {
        h.insert(B3_TRACE_ID, v);
    }
    if let Some(v) = header(&s) {
        h.insert(B3_SPAN_ID, v);
    }
    match parent.and_then(|_| header(&p)) {
        Some(v) => {
            h.insert(B3_PARENT_SPAN_ID, v);
        }
        None => {
            h.remove(B3_PARENT_SPAN_ID);
        }
    }
    h.insert(
        B3_SAMPLED,
        HeaderValue::from_static(if sampled { "1" } else { "0" }),
    );
    // `x-b3-sampled` carries the decision; a debug flag is not forwarded.
    h.remove(B3_FLAGS);
    if h.contains_key(B3_SINGLE) {
        let mut b = Vec::with_capacity(32 + 1 + 16 + 2 + 17);
        b.extend_from_slice(&t[..tn]);
        b.push(b'-');
        b.extend_from_slice(&s);
        b.extend_from_slice(if sampled { b"-1" } else { b"-0" });
        if parent.is_some() {
            b.push(b'-');
            b.extend_from_slice(&p);
        }
        if let Some(v) = header(&b) {
            h.insert(B3_SINGLE, v);
        }
    }
}

/// Random non-zero ids (all-zero ids are invalid in both formats).
fn new_trace_id() -> [u8; 16] {
    loop {
        let r = rand::random::<u128>();
        if r != 0 {
            return r.to_be_bytes();
        }
    }
}

fn new_span_id() -> [u8; 8] {
    loop {
        let r = rand::random::<u64>();
        if r != 0 {
            return r.to_be_bytes();
        }
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

// ---------------------------------------------------------------------------------------------
// The tracer.

/// A sampled request's span, from its start until its response is done.
#[derive(Debug)]
pub struct ActiveSpan {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub flags: u8,
    trace_state: String,
    start: SystemTime,
    url: String,
    user_agent: String,
}

/// How a traced request ended (what the span reports besides its start).
pub struct Outcome<'a> {
    /// The destination service host (or the addressed `ip:port`), for the span name.
    pub host: &'a str,
    pub port: u16,
    pub method: &'a str,
    /// `http` or `http2`, as the metrics' `request_protocol`.
    pub protocol: &'a str,
    pub status: u16,
    pub response_flags: &'a str,
    /// The cluster of the last try (`outbound|port|subset|host|h1`), if one was chosen.
    pub upstream_cluster: Option<&'a str>,
    pub request_id: &'a str,
    pub request_size: u64,
    pub response_size: u64,
    pub peer: IpAddr,
}

/// Export counters (admin `/stats`, `tracing.opentelemetry.*`).
#[derive(Debug, Default)]
pub struct TraceStats {
    /// Spans the collector accepted.
    pub spans_sent: AtomicU64,
    /// Spans dropped because the queue was full.
    pub spans_dropped: AtomicU64,
    /// Spans lost to failed exports (or rejected by the collector).
    pub spans_failed: AtomicU64,
    /// Export calls that failed.
    pub export_failures: AtomicU64,
}

/// The tracer: sampling, header rewriting, span queue; its exporter runs on the runtime that
/// created it (the control runtime).
pub struct Tracer {
    /// The collector (a new one means a new tracer).
    endpoint: String,
    /// `f64` bits (changed at run time by [`Tracer::set_sampling_percent`]).
    sampling: AtomicU64,
    queue: Mutex<Vec<Span>>,
    capacity: usize,
    batch_size: usize,
    ready: Notify,
    pub stats: TraceStats,
    /// Tags every span carries (proxy identity).
    fixed_tags: Vec<KeyValue>,
    resource: Resource,
}

/// Identity of the waypoint for the span tags and resource.
#[derive(Clone, Debug)]
pub struct WaypointIdentity {
    pub gateway_name: String,
    pub gateway_namespace: String,
    pub trust_domain: String,
    pub ip: IpAddr,
}

fn kv(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
    }
}

fn valid_percent(p: f64) -> Result<f64, TraceError> {
    if (0.0..=100.0).contains(&p) {
        Ok(p)
    } else {
        Err(TraceError::Sampling(p))
    }
}

impl Tracer {
    /// Validate `cfg`, and start the exporter on the current runtime; it stops when `stop` is
    /// cancelled (after one last flush).
    pub fn start(
        cfg: &TracingConfig,
        id: &WaypointIdentity,
        stop: CancellationToken,
    ) -> Result<Arc<Tracer>, TraceError> {
        let tracer = Arc::new(Tracer::new(cfg, id)?);
        let client = TraceServiceClient::new(channel(cfg)?);
        tokio::spawn(export_loop(
            tracer.clone(),
            client,
            ExportTiming::from(cfg),
            stop,
        ));
        info!(endpoint = %cfg.endpoint, sampling_percent = cfg.sampling_percent, "tracing: exporting spans over OTLP/gRPC");
        Ok(tracer)
    }

    /// The tracer without an exporter (spans stay queued; for tests of the request side).
    pub fn new(cfg: &TracingConfig, id: &WaypointIdentity) -> Result<Tracer, TraceError> {
        let pct = valid_percent(cfg.sampling_percent)?;
        let (name, ns) = (id.gateway_name.as_str(), id.gateway_namespace.as_str());
        let node_id = cfg
            .node_id
            .clone()
            .unwrap_or_else(|| format!("waypoint~{}~{name}.{ns}~{ns}.svc.cluster.local", id.ip));
        let mut fixed_tags = vec![
            kv("component", "proxy"),
            kv("node_id", node_id),
            kv("zone", cfg.zone.clone()),
            // Istio's custom tags: the proxy's own workload (a waypoint: its Gateway).
            kv("istio.canonical_service", name),
            kv("istio.canonical_revision", "latest"),
            kv("istio.namespace", ns),
            kv("istio.mesh_id", id.trust_domain.as_str()),
        ];
        if let Some(c) = &cfg.cluster_id {
            fixed_tags.push(kv("istio.cluster_id", c.clone()));
        }
        let service_name = cfg
            .service_name
            .clone()
            .unwrap_or_else(|| format!("{name}.{ns}"));
        Ok(Tracer {
            endpoint: cfg.endpoint.clone(),
            sampling: AtomicU64::new(pct.to_bits()),
            queue: Mutex::new(Vec::new()),
            capacity: cfg.queue_capacity.max(1),
            batch_size: cfg.batch_size.max(1),
            ready: Notify::new(),
            stats: TraceStats::default(),
            fixed_tags,
            resource: Resource {
                attributes: vec![kv("service.name", service_name)],
                dropped_attributes_count: 0,
            },
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn sampling_percent(&self) -> f64 {
        f64::from_bits(self.sampling.load(Ordering::Relaxed))
    }

    pub fn set_sampling_percent(&self, p: f64) -> Result<(), TraceError> {
        let p = valid_percent(p)?;
        self.sampling.store(p.to_bits(), Ordering::Relaxed);
        Ok(())
    }

    fn roll(&self) -> bool {
        let p = self.sampling_percent();
        // No random draw at the ends (0 % and 100 % are common in tests and debugging).
        p >= 100.0 || (p > 0.0 && rand::random::<f64>() * 100.0 < p)
    }

    /// A request arrives: decide, rewrite its trace headers for the upstream, and return its
    /// span when sampled. `authority` and `uri` make `http.url`.
    pub fn start_request(
        &self,
        h: &mut HeaderMap,
        uri: &Uri,
        authority: &str,
    ) -> Option<Box<ActiveSpan>> {
        let incoming = extract(h);
        let ctx = incoming.context;
        let sampled = incoming.decision().unwrap_or_else(|| self.roll());
        if ctx.is_none() && !sampled {
            // Nothing to continue and nothing recorded: leave the request as it came.
            return None;
        }
        let trace_id = ctx.map_or_else(new_trace_id, |c| c.trace_id);
        let span_id = new_span_id();
        let parent = ctx.map(|c| c.span_id);
        // Flags other than "sampled" (e.g. W3C level 2's "random") are kept as the caller set
        // them.
        let flags = ctx.map_or(0, |c| c.flags & !FLAG_SAMPLED) | u8::from(sampled);
        let trace_state = match ctx {
            Some(c) if sampled && c.source == Source::W3c => single(h, &TRACESTATE)
                .and_then(|v| std::str::from_utf8(v).ok())
                .unwrap_or("")
                .to_string(),
            _ => String::new(),
        };
        inject(
            h,
            &trace_id,
            &span_id,
            parent.as_ref(),
            flags,
            ctx.map(|c| c.source),
        );
        if !sampled {
            return None;
        }
        let pq = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut url = format!("http://{authority}{pq}");
        // Envoy truncates `http.url` to 256 bytes.
        if url.len() > 256 {
            let mut cut = 256;
            while !url.is_char_boundary(cut) {
                cut -= 1;
            }
            url.truncate(cut);
        }
        let user_agent = h
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        Some(Box::new(ActiveSpan {
            trace_id,
            span_id,
            parent,
            flags,
            trace_state,
            start: SystemTime::now(),
            url,
            user_agent,
        }))
    }

    /// The response is done: build the span and queue it for export (dropped and counted when
    /// the queue is full).
    pub fn finish(&self, s: ActiveSpan, o: &Outcome<'_>) {
        let end = SystemTime::now().max(s.start);
        let error = o.status >= 500;
        let cluster = o
            .upstream_cluster
            .map_or("-".to_string(), istio_cluster_name);
        let protocol = if o.protocol == "http2" {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        };
        let mut attributes = self.fixed_tags.clone();
        attributes.extend([
            kv("guid:x-request-id", o.request_id),
            kv("http.url", s.url),
            kv("http.method", o.method),
            kv("http.protocol", protocol),
            kv("user_agent", s.user_agent),
            kv("peer.address", o.peer.to_string()),
            kv("request_size", o.request_size.to_string()),
            kv("response_size", o.response_size.to_string()),
            kv("upstream_cluster", cluster.clone()),
            kv("upstream_cluster.name", cluster),
            kv("http.status_code", o.status.to_string()),
            kv("response_flags", o.response_flags),
        ]);
        if error {
            attributes.push(kv("error", "true"));
        }
        // Bits 8-9: whether the parent is remote is known (it is, when there is one).
        let remote = if s.parent.is_some() { 0x300 } else { 0x100 };
        let span = Span {
            trace_id: s.trace_id.to_vec(),
            span_id: s.span_id.to_vec(),
            trace_state: s.trace_state,
            parent_span_id: s.parent.map(|p| p.to_vec()).unwrap_or_default(),
            name: format!("{}:{}/*", o.host, o.port),
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: unix_nanos(s.start),
            end_time_unix_nano: unix_nanos(end),
            attributes,
            dropped_attributes_count: 0,
            status: error.then(|| Status {
                message: String::new(),
                code: status::StatusCode::Error as i32,
            }),
            flags: u32::from(s.flags) | remote,
        };
        self.push(span);
    }

    fn push(&self, span: Span) {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if q.len() >= self.capacity {
            drop(q);
            self.stats.spans_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push(span);
        // One wake-up of the exporter per full batch, not per span.
        if q.len() == self.batch_size {
            self.ready.notify_one();
        }
    }

    /// Spans waiting for export.
    pub fn queued(&self) -> usize {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn take(&self) -> Vec<Span> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// `/stats` lines, as Envoy names its OpenTelemetry tracer's stats.
    pub fn stats_text(&self) -> String {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "tracing.opentelemetry.spans_sent: {}\ntracing.opentelemetry.spans_dropped: {}\n\
             tracing.opentelemetry.spans_failed: {}\ntracing.opentelemetry.export_failures: {}\n",
            get(&s.spans_sent),
            get(&s.spans_dropped),
            get(&s.spans_failed),
            get(&s.export_failures),
        )
    }

    fn request(&self, spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "zmesh-waypoint".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }
}

/// The waypoint's tracer: none, one fixed by flags, or one that follows the control plane's
/// `WaypointTelemetry` for this waypoint ([`follow`]). A request reads it once (lock-free).
#[derive(Default)]
pub struct TracerSlot {
    current: ArcSwapOption<Tracer>,
    /// Stops the current tracer's exporter (after one last flush).
    stop: Mutex<Option<CancellationToken>>,
}

impl TracerSlot {
    /// For the request path: no reference count touched.
    pub fn load(&self) -> arc_swap::Guard<Option<Arc<Tracer>>> {
        self.current.load()
    }

    pub fn get(&self) -> Option<Arc<Tracer>> {
        self.current.load_full()
    }

    /// Install `next` (a tracer and what stops its exporter) and stop the previous one.
    pub fn set(&self, next: Option<(Arc<Tracer>, CancellationToken)>) {
        let (tracer, stop) = next.unzip();
        self.current.store(tracer);
        let old = std::mem::replace(
            &mut *self.stop.lock().unwrap_or_else(PoisonError::into_inner),
            stop,
        );
        if let Some(old) = old {
            old.cancel();
        }
    }
}

/// Keep `slot` in line with the `WaypointTelemetry` named `key` ("<namespace>/<gateway>") in
/// `l7`: start a tracer when tracing is turned on, change its sampling in place, replace it
/// when the collector changes, drop it when tracing is turned off. `defaults` gives every
/// setting but the endpoint and the sampling. Runs until `stopped`.
pub async fn follow(
    slot: Arc<TracerSlot>,
    l7: Arc<L7Store>,
    key: String,
    defaults: TracingConfig,
    id: WaypointIdentity,
    stopped: CancellationToken,
) {
    loop {
        let changed = l7.changed();
        tokio::pin!(changed);
        // Registered before reading: a change from here on wakes us.
        changed.as_mut().enable();
        let want = l7
            .load()
            .telemetry
            .get(&key)
            .and_then(|t| t.tracing.clone());
        apply_telemetry(&slot, want.as_ref(), &defaults, &id, &stopped);
        tokio::select! {
            _ = changed => {}
            _ = stopped.cancelled() => return,
        }
    }
}

fn apply_telemetry(
    slot: &TracerSlot,
    want: Option<&l7::Tracing>,
    defaults: &TracingConfig,
    id: &WaypointIdentity,
    stopped: &CancellationToken,
) {
    match (want, slot.get()) {
        (None, None) => {}
        (None, Some(_)) => {
            info!("tracing: turned off by the control plane");
            slot.set(None);
        }
        (Some(w), Some(cur)) if cur.endpoint() == w.otlp_endpoint => {
            let pct = w.random_sampling_percentage;
            if cur.sampling_percent() != pct {
                match cur.set_sampling_percent(pct) {
                    Ok(()) => info!(sampling_percent = pct, "tracing: sampling changed"),
                    Err(e) => warn!("tracing: {e}; keeping {} %", cur.sampling_percent()),
                }
            }
        }
        (Some(w), _) => {
            let mut cfg = defaults.clone();
            cfg.endpoint = w.otlp_endpoint.clone();
            cfg.sampling_percent = w.random_sampling_percentage;
            let stop = stopped.child_token();
            match Tracer::start(&cfg, id, stop.clone()) {
                Ok(t) => slot.set(Some((t, stop))),
                Err(e) => warn!(
                    provider = %w.provider,
                    "tracing: the control plane's telemetry for this waypoint is not usable: {e}"
                ),
            }
        }
    }
}

/// Istio's cluster name: ours carries the upstream protocol as a fifth field (`|h1`, `|h2`),
/// Envoy's `outbound|<port>|<subset>|<host>` does not.
fn istio_cluster_name(c: &str) -> String {
    c.strip_suffix("|h1")
        .or_else(|| c.strip_suffix("|h2"))
        .unwrap_or(c)
        .to_string()
}

fn channel(cfg: &TracingConfig) -> Result<Channel, TraceError> {
    let bad = |reason: String| TraceError::Endpoint {
        endpoint: cfg.endpoint.clone(),
        reason,
    };
    let uri: Uri = cfg.endpoint.parse().map_err(|e| bad(format!("{e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        other => {
            return Err(bad(format!(
                "scheme {other:?}: only plaintext http://host:port is supported"
            )));
        }
    }
    if uri.authority().is_none() {
        return Err(bad("no host:port".into()));
    }
    // Lazy: the waypoint starts (and serves) whether or not the collector is up; each export
    // connects if it must.
    Ok(Endpoint::from_shared(cfg.endpoint.clone())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(cfg.connect_timeout)
        .timeout(cfg.export_timeout)
        .tcp_nodelay(true)
        .connect_lazy())
}

#[derive(Clone, Copy)]
struct ExportTiming {
    flush_interval: Duration,
    export_timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
}

impl From<&TracingConfig> for ExportTiming {
    fn from(c: &TracingConfig) -> Self {
        ExportTiming {
            flush_interval: c.flush_interval.max(Duration::from_millis(1)),
            export_timeout: c.export_timeout,
            backoff_initial: c.backoff_initial,
            backoff_max: c.backoff_max.max(c.backoff_initial),
        }
    }
}

/// Send what is queued, a batch per call. `Err` after the first failed call (the rest of what
/// was taken is counted as failed too: the collector is not reachable now).
async fn flush(
    tracer: &Tracer,
    client: &mut TraceServiceClient<Channel>,
    timeout: Duration,
) -> Result<(), String> {
    let mut spans = tracer.take();
    while !spans.is_empty() {
        let rest = spans.split_off(spans.len().min(tracer.batch_size));
        let n = spans.len() as u64;
        let call = client.export(tracer.request(spans));
        let r = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        };
        let s = &tracer.stats;
        match r {
            Ok(resp) => {
                let rejected = resp
                    .partial_success
                    .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0))
                    .min(n);
                s.spans_sent.fetch_add(n - rejected, Ordering::Relaxed);
                s.spans_failed.fetch_add(rejected, Ordering::Relaxed);
            }
            Err(e) => {
                s.export_failures.fetch_add(1, Ordering::Relaxed);
                s.spans_failed
                    .fetch_add(n + rest.len() as u64, Ordering::Relaxed);
                return Err(e);
            }
        }
        spans = rest;
    }
    Ok(())
}

async fn export_loop(
    tracer: Arc<Tracer>,
    mut client: TraceServiceClient<Channel>,
    t: ExportTiming,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(t.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = t.backoff_initial;
    // While set, the collector failed: nothing is sent before this instant (spans queue up
    // meanwhile, and are dropped once the queue is full).
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tracer.ready.notified() => {}
            _ = stop.cancelled() => {
                // Spans of the requests drained at shutdown: one bounded last attempt.
                if retry_at.is_none() && tracer.queued() > 0 {
                    let last = t.export_timeout.min(Duration::from_secs(2));
                    if let Err(e) = flush(&tracer, &mut client, last).await {
                        debug!("tracing: last export at shutdown failed: {e}");
                    }
                }
                return;
            }
        }
        if retry_at.is_some_and(|at| tokio::time::Instant::now() < at) || tracer.queued() == 0 {
            continue;
        }
        match flush(&tracer, &mut client, t.export_timeout).await {
            Ok(()) => {
                if retry_at.take().is_some() {
                    info!("tracing: exporting spans again");
                }
                backoff = t.backoff_initial;
            }
            Err(e) => {
                // Logged once per outage, not per attempt.
                if retry_at.is_none() {
                    warn!("tracing: span export failed, retrying with backoff: {e}");
                } else {
                    debug!(?backoff, "tracing: span export failed again: {e}");
                }
                retry_at = Some(tokio::time::Instant::now() + backoff);
                backoff = (backoff * 2).min(t.backoff_max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const TRACE: [u8; 16] = [
        0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47,
        0x36,
    ];
    const SPAN: [u8; 8] = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];

    fn headers(kv: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in kv {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn get<'a>(h: &'a HeaderMap, k: &str) -> Option<&'a str> {
        h.get(k).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn traceparent_valid() {
        assert_eq!(parse_traceparent(TP.as_bytes()), Some((TRACE, SPAN, 1)));
        let unsampled = TP.replace("-01", "-00");
        assert_eq!(
            parse_traceparent(unsampled.as_bytes()),
            Some((TRACE, SPAN, 0))
        );
        // A later version may carry more fields after a '-'.
        let v1 = format!("{}-extra", TP.replacen("00", "01", 1));
        assert_eq!(parse_traceparent(v1.as_bytes()), Some((TRACE, SPAN, 1)));
        assert_eq!(&format_traceparent(&TRACE, &SPAN, 1)[..], TP.as_bytes());
    }

    #[test]
    fn traceparent_invalid() {
        let bad = [
            "",
            "00",
            // Uppercase hex.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // All-zero trace id, all-zero span id.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Version ff is invalid; version 00 has nothing after the flags.
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01extra",
            // Wrong lengths and separators.
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bx-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            // Multi-byte characters where hex is expected never panic.
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ];
        for b in bad {
            assert_eq!(parse_traceparent(b.as_bytes()), None, "{b:?}");
            let h = headers(&[("traceparent", b)]);
            assert_eq!(extract(&h).context, None, "{b:?}");
        }
        // Two traceparent headers: neither is trusted.
        let h = headers(&[("traceparent", TP), ("traceparent", TP)]);
        assert_eq!(extract(&h), Incoming::default());
    }

    #[test]
    fn b3_multi() {
        let h = headers(&[
            ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-parentspanid", "1111111111111111"),
            ("x-b3-sampled", "1"),
        ]);
        let c = extract(&h).context.unwrap();
        assert_eq!(
            (c.trace_id, c.span_id, c.sampled, c.source),
            (TRACE, SPAN, Some(true), Source::B3Multi)
        );
        // 64-bit trace id: the low half of a 128-bit one. Uppercase is accepted (B3 callers
        // vary); no sampling state: the decision is ours.
        let h = headers(&[
            ("x-b3-traceid", "A3CE929D0E0E4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
        ]);
        let c = extract(&h).context.unwrap();
        assert_eq!(c.trace_id[..8], [0; 8]);
        assert_eq!(c.trace_id[8..], TRACE[8..]);
        assert_eq!(c.sampled, None);
        // Debug implies sampled; "false" is the legacy "0".
        let h = headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-flags", "1"),
        ]);
        assert_eq!(extract(&h).decision(), Some(true));
        let h = headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "false"),
        ]);
        assert_eq!(extract(&h).decision(), Some(false));
        // A decision alone.
        let h = headers(&[("x-b3-sampled", "0")]);
        assert_eq!(
            extract(&h),
            Incoming {
                context: None,
                sampled: Some(false)
            }
        );
    }

    #[test]
    fn b3_multi_invalid() {
        let bad: &[&[(&str, &str)]] = &[
            // No span id; all-zero ids; wrong lengths; not hex.
            &[("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736")],
            &[
                ("x-b3-traceid", "0000000000000000"),
                ("x-b3-spanid", "00f067aa0ba902b7"),
            ],
            &[
                ("x-b3-traceid", "a3ce929d0e0e4736"),
                ("x-b3-spanid", "0000000000000000"),
            ],
            &[
                ("x-b3-traceid", "a3ce929d0e0e473"),
                ("x-b3-spanid", "00f067aa0ba902b7"),
            ],
            &[
                ("x-b3-traceid", "a3ce929d0e0e4736a3ce929d0e0e47"),
                ("x-b3-spanid", "00f067aa0ba902b7"),
            ],
            &[
                ("x-b3-traceid", "a3ce929d0e0e4736"),
                ("x-b3-spanid", "00f067aa0ba902bz"),
            ],
        ];
        for h in bad {
            assert_eq!(extract(&headers(h)).context, None, "{h:?}");
        }
    }

    #[test]
    fn b3_single() {
        let h = headers(&[(
            "b3",
            "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1-1111111111111111",
        )]);
        let c = extract(&h).context.unwrap();
        assert_eq!(
            (c.trace_id, c.span_id, c.sampled, c.source),
            (TRACE, SPAN, Some(true), Source::B3Single)
        );
        let c = parse_b3_single(b"a3ce929d0e0e4736-00f067aa0ba902b7")
            .context
            .unwrap();
        assert_eq!(c.sampled, None);
        assert_eq!(
            parse_b3_single(b"a3ce929d0e0e4736-00f067aa0ba902b7-d").decision(),
            Some(true)
        );
        assert_eq!(
            parse_b3_single(b"a3ce929d0e0e4736-00f067aa0ba902b7-0").decision(),
            Some(false)
        );
        assert_eq!(
            parse_b3_single(b"0"),
            Incoming {
                context: None,
                sampled: Some(false)
            }
        );
        assert_eq!(parse_b3_single(b"d").decision(), Some(true));
        for bad in [
            "",
            "x",
            "a3ce929d0e0e4736",
            "a3ce929d0e0e4736-",
            "a3ce929d0e0e4736-00f067aa0ba902b7-2",
            "a3ce929d0e0e4736-00f067aa0ba902b7-1-",
            "a3ce929d0e0e4736-00f067aa0ba902b7-1-xyz",
            "a3ce929d0e0e4736-00f067aa0ba902b7-1-1111111111111111-more",
            "0000000000000000-00f067aa0ba902b7-1",
            "a3ce929d0e0e4736-0000000000000000",
            "-00f067aa0ba902b7",
        ] {
            assert_eq!(parse_b3_single(bad.as_bytes()).context, None, "{bad:?}");
        }
    }

    #[test]
    fn precedence() {
        // traceparent wins over B3.
        let h = headers(&[
            ("traceparent", TP),
            ("x-b3-traceid", "1111111111111111"),
            ("x-b3-spanid", "2222222222222222"),
        ]);
        assert_eq!(extract(&h).context.unwrap().source, Source::W3c);
        // An invalid traceparent falls back to B3 multi, then to B3 single.
        let h = headers(&[
            ("traceparent", "garbage"),
            ("x-b3-traceid", "1111111111111111"),
            ("x-b3-spanid", "2222222222222222"),
            ("b3", "3333333333333333-4444444444444444"),
        ]);
        assert_eq!(extract(&h).context.unwrap().source, Source::B3Multi);
        let h = headers(&[
            ("x-b3-traceid", "bad"),
            ("b3", "3333333333333333-4444444444444444-1"),
        ]);
        assert_eq!(extract(&h).context.unwrap().source, Source::B3Single);
        assert_eq!(extract(&HeaderMap::new()), Incoming::default());
    }

    #[test]
    fn inject_both_formats() {
        let our = [0xab; 8];
        let mut h = headers(&[
            ("traceparent", TP),
            ("tracestate", "vendor=x"),
            ("x-b3-flags", "1"),
            ("b3", "0"),
        ]);
        inject(&mut h, &TRACE, &our, Some(&SPAN), 1, Some(Source::W3c));
        assert_eq!(
            get(&h, "traceparent"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-abababababababab-01")
        );
        assert_eq!(get(&h, "tracestate"), Some("vendor=x"));
        assert_eq!(
            get(&h, "x-b3-traceid"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(get(&h, "x-b3-spanid"), Some("abababababababab"));
        assert_eq!(get(&h, "x-b3-parentspanid"), Some("00f067aa0ba902b7"));
        assert_eq!(get(&h, "x-b3-sampled"), Some("1"));
        assert_eq!(get(&h, "x-b3-flags"), None);
        assert_eq!(
            get(&h, "b3"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736-abababababababab-1-00f067aa0ba902b7")
        );

        // A new root (no parent), unsampled, from B3: 64-bit trace ids stay 64-bit in B3,
        // tracestate is not ours to keep, no parent header.
        let mut trace64 = [0u8; 16];
        trace64[8..].copy_from_slice(&SPAN);
        let mut h = headers(&[("tracestate", "vendor=x"), ("x-b3-parentspanid", "1")]);
        inject(&mut h, &trace64, &our, None, 0, Some(Source::B3Multi));
        assert_eq!(
            get(&h, "traceparent"),
            Some("00-000000000000000000f067aa0ba902b7-abababababababab-00")
        );
        assert_eq!(get(&h, "x-b3-traceid"), Some("00f067aa0ba902b7"));
        assert_eq!(get(&h, "x-b3-parentspanid"), None);
        assert_eq!(get(&h, "x-b3-sampled"), Some("0"));
        assert_eq!(get(&h, "tracestate"), None);
        assert_eq!(get(&h, "b3"), None, "b3 single is rewritten, never added");
    }

    fn tracer(pct: f64) -> Tracer {
        let mut cfg = TracingConfig::new("http://127.0.0.1:4317");
        cfg.sampling_percent = pct;
        cfg.queue_capacity = 2;
        let id = WaypointIdentity {
            gateway_name: "waypoint".into(),
            gateway_namespace: "default".into(),
            trust_domain: "cluster.local".into(),
            ip: [127, 0, 0, 1].into(),
        };
        Tracer::new(&cfg, &id).unwrap()
    }

    fn outcome(status: u16) -> Outcome<'static> {
        Outcome {
            host: "reviews.default.svc.cluster.local",
            port: 9080,
            method: "GET",
            protocol: "http",
            status,
            response_flags: "-",
            upstream_cluster: Some("outbound|9080|v1|reviews.default.svc.cluster.local|h1"),
            request_id: "rid",
            request_size: 0,
            response_size: 10,
            peer: [127, 0, 0, 10].into(),
        }
    }

    fn attr<'a>(s: &'a Span, k: &str) -> Option<&'a str> {
        s.attributes.iter().find(|a| a.key == k).and_then(|a| {
            match a.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(v) => Some(v.as_str()),
                _ => None,
            }
        })
    }

    #[test]
    fn start_and_finish() {
        let t = tracer(0.0);
        let uri: Uri = "/reviews/1?x=y".parse().unwrap();
        // Sampled caller at 0 %: honoured; the span continues the caller's trace.
        let mut h = headers(&[("traceparent", TP), ("user-agent", "curl/8")]);
        let s = t.start_request(&mut h, &uri, "reviews:9080").unwrap();
        assert_eq!((s.trace_id, s.parent), (TRACE, Some(SPAN)));
        let tp = get(&h, "traceparent").unwrap().to_string();
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{tp}"
        );
        assert!(
            !tp.contains("00f067aa0ba902b7"),
            "our span id replaces the caller's"
        );
        t.finish(*s, &outcome(503));
        let spans = t.take();
        assert_eq!(spans.len(), 1);
        let sp = &spans[0];
        assert_eq!(sp.trace_id, TRACE);
        assert_eq!(sp.parent_span_id, SPAN);
        assert_eq!(sp.name, "reviews.default.svc.cluster.local:9080/*");
        assert_eq!(sp.kind, span::SpanKind::Server as i32);
        assert!(sp.end_time_unix_nano >= sp.start_time_unix_nano);
        assert_eq!(
            sp.status.as_ref().unwrap().code,
            status::StatusCode::Error as i32
        );
        assert_eq!(attr(sp, "http.status_code"), Some("503"));
        assert_eq!(
            attr(sp, "http.url"),
            Some("http://reviews:9080/reviews/1?x=y")
        );
        assert_eq!(attr(sp, "user_agent"), Some("curl/8"));
        assert_eq!(attr(sp, "error"), Some("true"));
        assert_eq!(
            attr(sp, "upstream_cluster"),
            Some("outbound|9080|v1|reviews.default.svc.cluster.local")
        );
        assert_eq!(attr(sp, "istio.canonical_service"), Some("waypoint"));
        assert_eq!(attr(sp, "istio.namespace"), Some("default"));
        assert_eq!(attr(sp, "guid:x-request-id"), Some("rid"));

        // Unsampled caller: headers rewritten (new span id, flags 00), no span.
        let mut h = headers(&[("traceparent", &TP.replace("-01", "-00"))]);
        assert!(t.start_request(&mut h, &uri, "a").is_none());
        let tp = get(&h, "traceparent").unwrap();
        assert!(
            tp.ends_with("-00") && !tp.contains("00f067aa0ba902b7"),
            "{tp}"
        );
        assert_eq!(get(&h, "x-b3-sampled"), Some("0"));

        // No context, not sampled: untouched.
        let mut h = headers(&[("tracestate", "a=b")]);
        assert!(t.start_request(&mut h, &uri, "a").is_none());
        assert_eq!(h.len(), 1);

        // No context at 100 %: a new trace, a root span.
        t.set_sampling_percent(100.0).unwrap();
        let mut h = HeaderMap::new();
        let s = t.start_request(&mut h, &uri, "a").unwrap();
        assert_eq!(s.parent, None);
        assert!(nonzero(&s.trace_id));
        assert_eq!(get(&h, "x-b3-sampled"), Some("1"));
        assert!(t.set_sampling_percent(101.0).is_err());
    }

    #[test]
    fn full_queue_drops() {
        let t = tracer(100.0);
        let uri: Uri = "/".parse().unwrap();
        for _ in 0..5 {
            let s = t.start_request(&mut HeaderMap::new(), &uri, "a").unwrap();
            t.finish(*s, &outcome(200));
        }
        assert_eq!(t.queued(), 2);
        assert_eq!(t.stats.spans_dropped.load(Ordering::Relaxed), 3);
        assert!(
            t.stats_text()
                .contains("tracing.opentelemetry.spans_dropped: 3")
        );
    }

    #[test]
    fn endpoint_checked() {
        for bad in ["https://c:4317", "c:4317", "http://", "not a uri"] {
            let cfg = TracingConfig::new(bad);
            assert!(channel_uri_ok(&cfg).is_err(), "{bad:?}");
        }
        assert!(channel_uri_ok(&TracingConfig::new("http://otel.istio-system:4317")).is_ok());
    }

    /// The endpoint checks of `channel` without creating the (runtime-bound) channel.
    fn channel_uri_ok(cfg: &TracingConfig) -> Result<(), TraceError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { channel(cfg).map(|_| ()) })
    }
}
