//! Upstream side: per-destination clusters (endpoints of a service or subset), load balancing,
//! outlier detection, DestinationRule connection-pool limits, and HTTP connections carried over
//! HBONE to the endpoint's ztunnel.
//!
//! Connection-pool model (Envoy's, simplified): an upstream HTTP connection is "busy" while a
//! request/response is on it; `maxConnections` bounds busy connections; a request that finds
//! none free waits in a pending queue of at most `http1MaxPendingRequests`, beyond which it is
//! answered 503 with flag `UO`; a request that queued stays pending until it is bound to a
//! ready connection (a new one counts once connected). A connection that reached
//! `maxRequestsPerConnection` keeps its slot until it has actually closed (as Envoy counts it):
//! together, why two callers against one connection already overflow now and then.
//!
//! An HTTP/1.1 Upgrade (WebSocket) goes out on a connection of its own ([`ConnKind::Upgrade`]):
//! never taken from nor returned to the idle list, since after a `101` it carries the upgraded
//! stream and no more HTTP. It holds its connection slot and counts as an active request until
//! the upgraded stream ends (the [`Lease`] is held that long), as Envoy counts it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use zmesh_core::hbone::pool::{ConnectRequest, Pool, WorkloadKey};
use zmesh_core::identity::Identity;
use zmesh_core::state::Workload;
use zmesh_proto::l7;

/// A request body sent upstream: complete (replayable) or still streaming in.
pub type UpBody = http_body_util::combinators::BoxBody<Bytes, crate::http::BoxError>;
/// Why an upstream request did not produce a response.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream connection pool overflow (DestinationRule connectionPool limits reached)")]
    Overflow,
    #[error("no healthy upstream")]
    NoHealthy,
    #[error("upstream connect error: {0}")]
    Connect(String),
    #[error("upstream connect error or disconnect/reset before headers. reset reason: {0}")]
    Reset(String),
    #[error("upstream request timeout")]
    Timeout,
}

impl UpstreamError {
    /// Envoy response flag.
    pub fn flag(&self) -> &'static str {
        match self {
            UpstreamError::Overflow => "UO",
            UpstreamError::NoHealthy => "UH",
            UpstreamError::Connect(_) => "UF",
            UpstreamError::Reset(_) => "UC",
            UpstreamError::Timeout => "UT",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            UpstreamError::Timeout => 504,
            _ => 503,
        }
    }
}

/// The upstream connection a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// A pooled HTTP/1.1 connection.
    Http1,
    /// A pooled HTTP/2 connection.
    Http2,
    /// A new HTTP/1.1 connection for this request alone, able to switch protocols (`101`):
    /// an Upgrade request.
    Upgrade,
}

/// Effective destination policy (service policy with subset / port overrides applied).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    pub lb: Option<l7::LoadBalancer>,
    pub pool: Option<l7::ConnectionPool>,
    pub outlier: Option<l7::OutlierDetection>,
}

impl Policy {
    pub fn resolve(cfg: Option<&l7::ServiceConfig>, subset: &str, port: u16) -> Policy {
        let mut p = Policy::default();
        let Some(cfg) = cfg else { return p };
        let mut apply = |tp: &l7::TrafficPolicy| {
            if tp.load_balancer.is_some() {
                p.lb = tp.load_balancer.clone();
            }
            if tp.connection_pool.is_some() {
                p.pool = tp.connection_pool;
            }
            if tp.outlier_detection.is_some() {
                p.outlier = tp.outlier_detection;
            }
            for pl in tp
                .port_level_settings
                .iter()
                .filter(|pl| pl.port == u32::from(port))
            {
                if pl.load_balancer.is_some() {
                    p.lb = pl.load_balancer.clone();
                }
                if pl.connection_pool.is_some() {
                    p.pool = pl.connection_pool;
                }
                if pl.outlier_detection.is_some() {
                    p.outlier = pl.outlier_detection;
                }
            }
        };
        if let Some(tp) = &cfg.traffic_policy {
            apply(tp);
        }
        if let Some(tp) = cfg
            .subsets
            .iter()
            .find(|s| s.name == subset)
            .and_then(|s| s.traffic_policy.as_ref())
        {
            apply(tp);
        }
        p
    }
}

#[derive(Debug, Default)]
struct EndpointHealth {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    /// Envoy's ejection multiplier: +1 per ejection, −1 per `interval` spent healthy since
    /// `ejected_until` (applied lazily when the host is ejected again).
    times_ejected: u32,
    active: u32,
}

/// Envoy's `max_ejection_time` default (Istio does not expose it): an ejection never lasts
/// longer than this, however often the host was ejected (unless the base time is longer).
const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// A time far after `t` (100 years), for ejections whose configured end an `Instant` cannot
/// hold.
fn far_after(t: Instant) -> Instant {
    t.checked_add(Duration::from_secs(100 * 365 * 24 * 3600))
        .unwrap_or(t)
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<UpBody>),
    H2(hyper::client::conn::http2::SendRequest<UpBody>),
}

impl Sender {
    /// Wait until the connection can take a request; an error means it is closed.
    async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }
}

struct UpConn {
    sender: Sender,
    uses: u32,
    /// When it was put on the idle list (for `connectionPool.http.idleTimeout`).
    idle_since: Instant,
    /// Cancelled when the connection task has finished (the connection is closed).
    closed: CancellationToken,
}

/// Counters for one cluster (Envoy's `upstream_rq_pending_overflow` etc.).
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub pending_overflow: AtomicU64,
    pub pending_total: AtomicU64,
    pub cx_total: AtomicU64,
    pub ejections: AtomicU64,
    /// Idle upstream connections closed by `idleTimeout`.
    pub cx_idle_timeout: AtomicU64,
    /// Retries not attempted because `maxRetries` were already in flight.
    pub retry_overflow: AtomicU64,
}

/// Whether an Envoy stat only grows or goes up and down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatKind {
    Counter,
    Gauge,
}

/// The endpoints of one destination (service + subset + port + protocol).
pub struct Cluster {
    pub name: String,
    pub policy: Policy,
    conn_slots: Option<Arc<Semaphore>>,
    pending: AtomicU32,
    active_rq: AtomicU32,
    /// Retries in flight (Envoy's `max_retries` circuit breaker).
    active_retries: AtomicU32,
    rr: AtomicUsize,
    /// Origin of the outlier-detection interval ticks (Envoy's interval timer starts with the
    /// cluster): ejections end, and ejection multipliers decay, only on a tick.
    epoch: Instant,
    health: Mutex<HashMap<String, EndpointHealth>>,
    /// Idle connections per (worker, endpoint): a connection's task runs on the worker that
    /// opened it, so a request reuses only its own worker's connections and never hops threads.
    idle: Mutex<HashMap<(usize, SocketAddr), Vec<UpConn>>>,
    pub stats: ClusterStats,
}

/// One chosen endpoint.
#[derive(Clone)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    pub addr: SocketAddr,
}

impl Cluster {
    #[doc(hidden)] // pub for the fuzz targets and tests/parsers_never_panic.rs
    pub fn new(name: String, policy: Policy) -> Arc<Self> {
        let max_conn = policy.pool.as_ref().map(|p| p.max_connections).unwrap_or(0);
        Arc::new(Cluster {
            name,
            conn_slots: (max_conn > 0).then(|| Arc::new(Semaphore::new(max_conn as usize))),
            policy,
            pending: AtomicU32::new(0),
            active_rq: AtomicU32::new(0),
            active_retries: AtomicU32::new(0),
            rr: AtomicUsize::new(0),
            epoch: Instant::now(),
            health: Mutex::new(HashMap::new()),
            idle: Mutex::new(HashMap::new()),
            stats: ClusterStats::default(),
        })
    }

    /// Envoy's per-cluster stats (the names of `/stats` and, prefixed `envoy_cluster_`, of
    /// `/metrics`), read now: what operators grep for after a circuit-breaker test.
    pub fn envoy_stats(&self) -> [(&'static str, StatKind, u64); 8] {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let now = Instant::now();
        let ejected = self
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|e| e.ejected_until.is_some_and(|t| t > now))
            .count() as u64;
        [
            (
                "upstream_cx_idle_timeout",
                StatKind::Counter,
                load(&self.stats.cx_idle_timeout),
            ),
            (
                "upstream_cx_total",
                StatKind::Counter,
                load(&self.stats.cx_total),
            ),
            (
                "upstream_rq_pending_active",
                StatKind::Gauge,
                u64::from(self.pending.load(Ordering::Relaxed)),
            ),
            (
                "upstream_rq_pending_overflow",
                StatKind::Counter,
                load(&self.stats.pending_overflow),
            ),
            (
                "upstream_rq_pending_total",
                StatKind::Counter,
                load(&self.stats.pending_total),
            ),
            (
                "upstream_rq_retry_overflow",
                StatKind::Counter,
                load(&self.stats.retry_overflow),
            ),
            (
                "outlier_detection.ejections_active",
                StatKind::Gauge,
                ejected,
            ),
            (
                "outlier_detection.ejections_enforced_total",
                StatKind::Counter,
                load(&self.stats.ejections),
            ),
        ]
    }

    /// `connectionPool.http.idleTimeout`, else Envoy's default for upstream connections (1 h).
    fn idle_timeout(&self) -> Duration {
        self.policy
            .pool
            .as_ref()
            .and_then(|p| p.idle_timeout)
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(3600))
    }

    /// Close idle connections unused for longer than the idle timeout. Returns how many.
    fn close_idle(&self, now: Instant) -> usize {
        let timeout = self.idle_timeout();
        let mut closed = 0;
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        for list in idle.values_mut() {
            let before = list.len();
            // Dropping the sender ends the connection task: hyper closes the connection.
            list.retain(|c| now.saturating_duration_since(c.idle_since) < timeout);
            closed += before - list.len();
        }
        idle.retain(|_, l| !l.is_empty());
        drop(idle);
        self.stats
            .cx_idle_timeout
            .fetch_add(closed as u64, Ordering::Relaxed);
        closed
    }

    /// A slot for one retry, or None when `connectionPool.http.maxRetries` retries are
    /// already in flight in this cluster (Envoy then returns the last response as is).
    pub fn retry_slot(self: &Arc<Self>) -> Option<RetrySlot> {
        let max = self.policy.pool.as_ref().map_or(0, |p| p.max_retries);
        let prev = self.active_retries.fetch_add(1, Ordering::AcqRel);
        let slot = RetrySlot(self.clone());
        if max > 0 && prev >= max {
            drop(slot);
            self.stats.retry_overflow.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(slot)
    }

    /// `connectionPool.tcp.connectTimeout` when set, else the waypoint's default.
    fn connect_timeout(&self, default: Duration) -> Duration {
        self.policy
            .pool
            .as_ref()
            .and_then(|p| p.connect_timeout)
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(default)
    }

    fn is_ejected(&self, uid: &str, now: Instant) -> bool {
        let h = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        h.get(uid)
            .and_then(|e| e.ejected_until)
            .is_some_and(|t| t > now)
    }

    /// Indices (into `uids`) of the endpoints to balance over: those not ejected, or all of
    /// them while fewer than `minHealthPercent` are (Envoy's panic threshold, which Istio sets
    /// from that field; unset, it is off and an all-ejected cluster has no endpoint: 503 `UH`).
    fn usable(&self, uids: &[&str], now: Instant) -> Vec<usize> {
        let live: Vec<usize> = (0..uids.len())
            .filter(|&i| !self.is_ejected(uids[i], now))
            .collect();
        let min_health = self
            .policy
            .outlier
            .as_ref()
            .map_or(0, |o| o.min_health_percent.min(100) as usize);
        if min_health > 0 && live.len() * 100 < uids.len() * min_health {
            return (0..uids.len()).collect();
        }
        live
    }

    /// Choose an endpoint among `candidates` (healthy per the control plane), excluding
    /// ejected ones. `hash` is the consistent-hash key when the policy asks for one.
    pub fn pick(&self, candidates: &[Endpoint], hash: Option<&str>) -> Option<Endpoint> {
        let uids: Vec<&str> = candidates.iter().map(|e| e.workload.uid.as_str()).collect();
        let live: Vec<&Endpoint> = self
            .usable(&uids, Instant::now())
            .into_iter()
            .map(|i| &candidates[i])
            .collect();
        if live.is_empty() {
            return None;
        }
        use l7::load_balancer::{Policy as P, Simple};
        let policy = self.policy.lb.as_ref().and_then(|l| l.policy.clone());
        let idx = match policy {
            Some(P::ConsistentHash(_)) => match hash {
                // Rendezvous hashing: stable per key, minimal movement when endpoints change.
                Some(k) => live
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, e)| fnv(&[k.as_bytes(), e.workload.uid.as_bytes()]))
                    .map(|(i, _)| i)
                    .unwrap_or(0),
                None => rand::random::<u64>() as usize % live.len(),
            },
            Some(P::Simple(s)) if s == Simple::RoundRobin as i32 => {
                self.rr.fetch_add(1, Ordering::Relaxed) % live.len()
            }
            Some(P::Simple(s)) if s == Simple::Random as i32 => {
                rand::random::<u64>() as usize % live.len()
            }
            // LEAST_REQUEST (Istio's default): power of two choices on active requests.
            _ => {
                let a = rand::random::<u64>() as usize % live.len();
                let b = rand::random::<u64>() as usize % live.len();
                let h = self.health.lock().unwrap_or_else(PoisonError::into_inner);
                let act = |i: usize| h.get(&live[i].workload.uid).map(|e| e.active).unwrap_or(0);
                if act(b) < act(a) { b } else { a }
            }
        };
        Some(live[idx].clone())
    }

    /// Record the outcome of a request to `uid` for outlier detection. `status` None means a
    /// locally detected failure (connect error, reset, timeout), counted as a 5xx as Envoy does.
    pub fn record_outcome(&self, uid: &str, status: Option<u16>, total_hosts: usize) {
        self.record_outcome_at(uid, status, total_hosts, Instant::now());
    }

    /// `outlierDetection.interval` (Istio's default 10 s).
    fn outlier_interval(od: &l7::OutlierDetection) -> Duration {
        od.interval
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(10))
    }

    /// The first interval tick at or after `t` ([`far_after`] `t` when an Instant cannot
    /// hold it).
    fn next_tick(&self, t: Instant, interval: Duration) -> Instant {
        let since = t.saturating_duration_since(self.epoch);
        // In nanoseconds (u128: no overflow): a tick count times the interval overflows a
        // Duration for extreme configured intervals.
        let step = interval.as_nanos().max(1);
        let offset = since.as_nanos().div_ceil(step) * step;
        let offset = u64::try_from(offset / 1_000_000_000)
            .ok()
            .map(|secs| Duration::new(secs, (offset % 1_000_000_000) as u32));
        offset
            .and_then(|o| self.epoch.checked_add(o))
            .unwrap_or_else(|| far_after(t))
    }

    fn record_outcome_at(&self, uid: &str, status: Option<u16>, total_hosts: usize, now: Instant) {
        let Some(od) = &self.policy.outlier else {
            return;
        };
        let is_5xx = status.is_none_or(|s| s >= 500);
        let is_gw = status.is_none_or(|s| matches!(s, 502..=504));
        let mut h = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        let ejected_now = h
            .values()
            .filter(|e| e.ejected_until.is_some_and(|t| t > now))
            .count();
        let e = h.entry(uid.to_string()).or_default();
        if !is_5xx {
            e.consecutive_5xx = 0;
            e.consecutive_gateway = 0;
            return;
        }
        // Saturating: with 5xx ejection disabled (consecutive5xxErrors: 0) nothing resets it.
        e.consecutive_5xx = e.consecutive_5xx.saturating_add(1);
        if is_gw {
            e.consecutive_gateway = e.consecutive_gateway.saturating_add(1);
        }
        let limit_5xx = od.consecutive_5xx_errors.unwrap_or(5);
        let trip = (limit_5xx > 0 && e.consecutive_5xx >= limit_5xx)
            || od
                .consecutive_gateway_errors
                .is_some_and(|g| g > 0 && e.consecutive_gateway >= g);
        if !trip || e.ejected_until.is_some_and(|t| t > now) {
            return;
        }
        let max_pct = if od.max_ejection_percent == 0 {
            10
        } else {
            od.max_ejection_percent.min(100)
        };
        // As Envoy: the first ejection always happens (10 % of fewer than 10 hosts would
        // otherwise forbid any); further ones only while the ejected share stays within it.
        let allowed = (total_hosts * max_pct as usize) / 100;
        if ejected_now > 0 && ejected_now + 1 > allowed {
            return;
        }
        let base = od
            .base_ejection_time
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(Duration::from_secs(30));
        let interval = Self::outlier_interval(od);
        // Envoy decrements the multiplier on every interval tick the host spends healthy, so
        // a host that failed once long ago is not punished as a repeat offender.
        if let Some(healthy_since) = e.ejected_until {
            let healthy = now.saturating_duration_since(healthy_since);
            let ticks = healthy.as_nanos() / interval.as_nanos();
            e.times_ejected = e
                .times_ejected
                .saturating_sub(u32::try_from(ticks).unwrap_or(u32::MAX));
        }
        e.times_ejected = e.times_ejected.saturating_add(1);
        let duration = base
            .saturating_mul(e.times_ejected)
            .min(MAX_EJECTION_TIME.max(base));
        // Envoy returns ejected hosts only from its interval timer: the first tick after
        // the ejection time has passed. Times too long for an Instant (a Duration of up to
        // i64::MAX seconds decodes) eject for as long as one can represent.
        let end = now.checked_add(duration).unwrap_or_else(|| far_after(now));
        let until = self.next_tick(end, interval);
        e.ejected_until = Some(until);
        e.consecutive_5xx = 0;
        e.consecutive_gateway = 0;
        self.stats.ejections.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            cluster = %self.name,
            endpoint = %uid,
            "outlier detection ejected endpoint for {:?}",
            until.saturating_duration_since(now)
        );
    }

    fn track_active(&self, uid: &str, delta: i32) {
        let mut h = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        let e = h.entry(uid.to_string()).or_default();
        e.active = e.active.saturating_add_signed(delta);
    }
}

fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Holds what a request occupies upstream until its response body is finished: the
/// connection (returned to the idle list when reusable), the connection slot, counters.
pub struct Lease {
    cluster: Arc<Cluster>,
    /// (worker, endpoint) of the idle list the connection goes back to.
    idle_key: (usize, SocketAddr),
    uid: String,
    conn: Option<UpConn>,
    /// The connection served an Upgrade: it never goes back to the idle list.
    dedicated: bool,
    permit: Option<OwnedSemaphorePermit>,
    _rq: ActiveRq,
}

impl Lease {
    /// `connectionPool.http.idleTimeout` of the destination, when set (non-zero).
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.cluster
            .policy
            .pool
            .as_ref()
            .and_then(|p| p.idle_timeout)
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| !d.is_zero())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.cluster.track_active(&self.uid, -1);
        let max_rq = self
            .cluster
            .policy
            .pool
            .as_ref()
            .map(|p| p.max_requests_per_connection)
            .unwrap_or(0);
        let Some(conn) = self.conn.take() else { return };
        let reusable = !self.dedicated
            && !conn.closed.is_cancelled()
            && (max_rq == 0 || conn.uses < max_rq)
            && match &conn.sender {
                Sender::H1(s) => !s.is_closed(),
                Sender::H2(s) => !s.is_closed(),
            };
        if reusable {
            let mut idle = self
                .cluster
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let list = idle.entry(self.idle_key).or_default();
            // Bounded: never keep more idle connections than slots (or 64).
            let cap = self
                .cluster
                .conn_slots
                .as_ref()
                .map(|_| {
                    self.cluster
                        .policy
                        .pool
                        .as_ref()
                        .map(|p| p.max_connections as usize)
                        .unwrap_or(64)
                })
                .unwrap_or(64);
            if list.len() < cap {
                let mut conn = conn;
                conn.idle_since = Instant::now();
                list.push(conn);
            }
            return;
        }
        // Not reusable: the slot is free once the connection has really closed.
        let closed = conn.closed.clone();
        drop(conn);
        if let Some(p) = self.permit.take() {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), closed.cancelled()).await;
                drop(p);
            });
        }
    }
}

struct ActiveRq(Arc<Cluster>);

/// One retry in flight in its cluster, until dropped.
pub struct RetrySlot(Arc<Cluster>);

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.0.active_retries.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ActiveRq {
    fn drop(&mut self) {
        self.0.active_rq.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Settings for reaching endpoints.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub identity: Identity,
    pub src_ip: IpAddr,
    /// HBONE port of endpoints' ztunnels (15008), per node overrides (tests).
    pub peer_hbone_port: u16,
    pub peer_hbone_ports: HashMap<String, u16>,
    pub connect_timeout: Duration,
    /// How long a request may wait in the pending queue.
    pub pending_timeout: Duration,
}

/// All clusters and the HBONE pools.
pub struct Upstreams {
    pub cfg: UpstreamConfig,
    /// Used off the worker threads (in-process tests serving on the caller's runtime).
    pool: Pool,
    /// One pool per worker, set when the worker starts: an HBONE connection's driver task runs
    /// on the runtime that opened it, so each worker must tunnel over its own connections to
    /// keep a request on one thread (Envoy's per-worker connection pools).
    worker_pools: Vec<OnceLock<Pool>>,
    clusters: Mutex<HashMap<String, Arc<Cluster>>>,
}

impl Upstreams {
    pub fn new(cfg: UpstreamConfig, pool: Pool, workers: usize) -> Self {
        Upstreams {
            cfg,
            pool,
            worker_pools: (0..workers).map(|_| OnceLock::new()).collect(),
            clusters: Mutex::new(HashMap::new()),
        }
    }

    /// Give worker `index` its own pool (created on that worker's runtime).
    pub fn set_worker_pool(&self, index: usize, pool: Pool) {
        if let Some(slot) = self.worker_pools.get(index) {
            let _ = slot.set(pool);
        }
    }

    /// The pool of the calling worker thread, else the shared one.
    fn pool(&self) -> &Pool {
        self.worker_pools
            .get(zmesh_core::worker::index())
            .and_then(OnceLock::get)
            .unwrap_or(&self.pool)
    }

    /// The cluster named `name` with `policy`; rebuilt when the policy changed.
    pub fn cluster(&self, name: &str, policy: Policy) -> Arc<Cluster> {
        let mut c = self.clusters.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = c.get(name)
            && existing.policy == policy
        {
            return existing.clone();
        }
        let new = Cluster::new(name.to_string(), policy);
        c.insert(name.to_string(), new.clone());
        new
    }

    /// Close the idle connections of every cluster that outlived its idle timeout; run
    /// periodically (a sweep, so an unused connection is closed, not merely skipped).
    pub fn close_idle(&self) -> usize {
        let now = Instant::now();
        self.clusters().iter().map(|c| c.close_idle(now)).sum()
    }

    /// Envoy-style `/stats` text: `cluster.<name>.<stat>: <value>` per line, sorted, as
    /// `pilot-agent request GET stats` shows them for Envoy.
    pub fn stats_text(&self) -> String {
        let mut clusters = self.clusters();
        clusters.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out = String::new();
        for c in clusters {
            for (stat, _, v) in c.envoy_stats() {
                out.push_str(&format!("cluster.{}.{stat}: {v}\n", c.name));
            }
        }
        out
    }

    pub fn clusters(&self) -> Vec<Arc<Cluster>> {
        self.clusters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Take a request slot in `cluster` (connection slot or pending queue).
    pub async fn admit(
        &self,
        cluster: &Arc<Cluster>,
    ) -> Result<(Option<OwnedSemaphorePermit>, ActiveRqGuard), UpstreamError> {
        let pool = cluster.policy.pool.unwrap_or_default();
        let prev = cluster.active_rq.fetch_add(1, Ordering::AcqRel);
        let mut guard = ActiveRqGuard(Some(ActiveRq(cluster.clone())), None);
        if pool.http2_max_requests > 0 && prev >= pool.http2_max_requests {
            cluster
                .stats
                .pending_overflow
                .fetch_add(1, Ordering::Relaxed);
            return Err(UpstreamError::Overflow);
        }
        let Some(sem) = &cluster.conn_slots else {
            return Ok((None, guard));
        };
        if let Ok(p) = sem.clone().try_acquire_owned() {
            return Ok((Some(p), guard));
        }
        cluster.stats.pending_total.fetch_add(1, Ordering::Relaxed);
        let max_pending = pool.http1_max_pending_requests;
        let prev = cluster.pending.fetch_add(1, Ordering::AcqRel);
        if max_pending > 0 && prev >= max_pending {
            cluster.pending.fetch_sub(1, Ordering::AcqRel);
            cluster
                .stats
                .pending_overflow
                .fetch_add(1, Ordering::Relaxed);
            return Err(UpstreamError::Overflow);
        }
        let pending = Pending(cluster.clone());
        let r = tokio::time::timeout(self.cfg.pending_timeout, sem.clone().acquire_owned()).await;
        match r {
            Ok(Ok(p)) => {
                guard.1 = Some(pending);
                Ok((Some(p), guard))
            }
            _ => {
                drop(pending);
                cluster
                    .stats
                    .pending_overflow
                    .fetch_add(1, Ordering::Relaxed);
                Err(UpstreamError::Overflow)
            }
        }
    }

    fn hbone_addr(&self, w: &Workload, ip: IpAddr) -> SocketAddr {
        let port = self
            .cfg
            .peer_hbone_ports
            .get(&w.node)
            .copied()
            .unwrap_or(self.cfg.peer_hbone_port);
        SocketAddr::new(ip, port)
    }

    /// An HBONE tunnel to `ep` for opaque TCP.
    pub async fn tcp_tunnel(
        &self,
        ep: &Endpoint,
        tunnel_headers: HeaderMap,
    ) -> Result<zmesh_core::hbone::H2Stream, UpstreamError> {
        let key = WorkloadKey {
            src_id: self.cfg.identity.clone(),
            dst_id: vec![ep.workload.identity()],
            dst: self.hbone_addr(&ep.workload, ep.addr.ip()),
            src: self.cfg.src_ip,
        };
        let req = ConnectRequest {
            authority: ep.addr.to_string(),
            headers: tunnel_headers,
        };
        tokio::time::timeout(self.cfg.connect_timeout, self.pool().connect(&key, req))
            .await
            .map_err(|_| UpstreamError::Connect("HBONE connect timed out".into()))?
            .map_err(|e| UpstreamError::Connect(e.to_string()))
    }

    async fn open(
        &self,
        cluster: &Cluster,
        ep: &Endpoint,
        kind: ConnKind,
        tunnel_headers: HeaderMap,
    ) -> Result<UpConn, UpstreamError> {
        let key = WorkloadKey {
            src_id: self.cfg.identity.clone(),
            dst_id: vec![ep.workload.identity()],
            dst: self.hbone_addr(&ep.workload, ep.addr.ip()),
            src: self.cfg.src_ip,
        };
        let req = ConnectRequest {
            authority: ep.addr.to_string(),
            headers: tunnel_headers,
        };
        let connect_timeout = cluster.connect_timeout(self.cfg.connect_timeout);
        let stream = tokio::time::timeout(connect_timeout, self.pool().connect(&key, req))
            .await
            .map_err(|_| UpstreamError::Connect("HBONE connect timed out".into()))?
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        cluster.stats.cx_total.fetch_add(1, Ordering::Relaxed);
        let closed = CancellationToken::new();
        let done = closed.clone();
        let sender = if kind == ConnKind::Http2 {
            let io = TokioIo::new(crate::coalesce::Coalesce::new(stream));
            let (s, conn) = tokio::time::timeout(
                connect_timeout,
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io),
            )
            .await
            .map_err(|_| UpstreamError::Connect("HTTP/2 handshake timed out".into()))?
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
            tokio::spawn(async move {
                let _ = conn.await;
                done.cancel();
            });
            Sender::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| UpstreamError::Connect(e.to_string()))?;
            if kind == ConnKind::Upgrade {
                // Hands the connection over to `hyper::upgrade::on(response)` after a 101.
                tokio::spawn(async move {
                    let _ = conn.with_upgrades().await;
                    done.cancel();
                });
            } else {
                tokio::spawn(async move {
                    let _ = conn.await;
                    done.cancel();
                });
            }
            Sender::H1(s)
        };
        Ok(UpConn {
            sender,
            uses: 0,
            idle_since: Instant::now(),
            closed,
        })
    }

    /// Send one request to `ep` (a slot was admitted) over a connection of `kind`. Returns the
    /// response head and body with the lease to hold until the body (or, after a `101`, the
    /// upgraded stream) is done.
    pub async fn send(
        &self,
        cluster: &Arc<Cluster>,
        ep: &Endpoint,
        mut req: Request<UpBody>,
        kind: ConnKind,
        admitted: (Option<OwnedSemaphorePermit>, ActiveRqGuard),
        tunnel_headers: impl FnOnce() -> HeaderMap,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        let (permit, mut rq) = admitted;
        let h2 = kind == ConnKind::Http2;
        let dedicated = kind == ConnKind::Upgrade;
        let idle_key = (zmesh_core::worker::index(), ep.addr);
        let reused = if dedicated {
            None
        } else {
            let mut idle = cluster.idle.lock().unwrap_or_else(PoisonError::into_inner);
            let mut found = None;
            if let Some(list) = idle.get_mut(&idle_key) {
                let timeout = cluster.idle_timeout();
                while let Some(c) = list.pop() {
                    if c.idle_since.elapsed() >= timeout {
                        cluster
                            .stats
                            .cx_idle_timeout
                            .fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let ok = !c.closed.is_cancelled()
                        && match &c.sender {
                            Sender::H1(s) => {
                                !s.is_closed() && matches!(c.sender, Sender::H1(_)) && !h2
                            }
                            Sender::H2(s) => !s.is_closed() && h2,
                        };
                    if ok {
                        found = Some(c);
                        break;
                    }
                }
            }
            found
        };
        let mut tunnel_headers = Some(tunnel_headers);
        let mut conn = match reused {
            Some(c) => c,
            None => {
                let headers = tunnel_headers.take().map(|f| f()).unwrap_or_default();
                self.open(cluster, ep, kind, headers).await?
            }
        };
        if conn.sender.ready().await.is_err() {
            // An idle connection can turn out closed only now: its driver had not yet run when
            // it was picked (the server closed it, or a response body was dropped unread). The
            // request was not sent, so a fresh connection is safe — a mirror or a request
            // without retries must not fail for it.
            let Some(headers) = tunnel_headers.take() else {
                return Err(UpstreamError::Reset("connection closed".into()));
            };
            conn = self.open(cluster, ep, kind, headers()).await?;
            if conn.sender.ready().await.is_err() {
                return Err(UpstreamError::Reset("connection closed".into()));
            }
        }
        // Bound to a ready connection: no longer pending.
        rq.1 = None;
        cluster.track_active(&ep.workload.uid, 1);
        let lease = Lease {
            cluster: cluster.clone(),
            idle_key,
            uid: ep.workload.uid.clone(),
            conn: None,
            dedicated,
            permit,
            _rq: rq.0.take().expect("fresh guard"),
        };
        conn.uses += 1;
        let max_rq = cluster
            .policy
            .pool
            .as_ref()
            .map(|p| p.max_requests_per_connection)
            .unwrap_or(0);
        // Not on an Upgrade: its `Connection: upgrade` must stay, and its connection is not
        // reused anyway.
        if kind == ConnKind::Http1 && max_rq > 0 && conn.uses >= max_rq {
            // Last request on this connection: tell the server too.
            req.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        let resp = match &mut conn.sender {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        };
        let mut lease = lease;
        match resp {
            Ok(r) => {
                lease.conn = Some(conn);
                Ok((r, lease))
            }
            Err(e) => Err(UpstreamError::Reset(e.to_string())),
        }
    }
}

/// Counts a request as active in its cluster until it is done, and as pending until it has a
/// ready connection when it had to queue.
pub struct ActiveRqGuard(Option<ActiveRq>, Option<Pending>);

/// A request in its cluster's pending queue. Like Envoy, a request that queued stays pending
/// until it is bound to a ready connection (a new one counts once connected), not merely until
/// a connection slot frees up: that is what makes two callers against `maxConnections: 1`,
/// `http1MaxPendingRequests: 1` overflow now and then (the seeds' fortio `-c 2` run).
struct Pending(Arc<Cluster>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(outlier: l7::OutlierDetection) -> Arc<Cluster> {
        Cluster::new(
            "reviews".into(),
            Policy {
                outlier: Some(outlier),
                ..Policy::default()
            },
        )
    }

    fn fail(c: &Cluster, uid: &str, times: u32, hosts: usize) {
        for _ in 0..times {
            c.record_outcome(uid, Some(503), hosts);
        }
    }

    #[test]
    fn default_max_ejection_percent_still_ejects_one_of_a_few_hosts() {
        let c = cluster(l7::OutlierDetection {
            consecutive_5xx_errors: Some(2),
            ..Default::default()
        });
        let now = Instant::now();
        fail(&c, "a", 1, 3);
        assert!(!c.is_ejected("a", now), "one 5xx of 2 ejects nobody");
        c.record_outcome("a", Some(200), 3);
        fail(&c, "a", 1, 3);
        assert!(!c.is_ejected("a", now), "a success resets the count");
        fail(&c, "a", 1, 3);
        assert!(
            c.is_ejected("a", Instant::now()),
            "2 consecutive 5xx of 3 hosts"
        );
        assert_eq!(c.stats.ejections.load(Ordering::Relaxed), 1);
        // 10 % of 3 hosts: a second ejection would exceed it.
        fail(&c, "b", 5, 3);
        assert!(!c.is_ejected("b", Instant::now()));
        assert_eq!(c.usable(&["a", "b", "c"], Instant::now()), vec![1, 2]);
    }

    #[test]
    fn max_ejection_percent_bounds_further_ejections() {
        let c = cluster(l7::OutlierDetection {
            consecutive_5xx_errors: Some(1),
            max_ejection_percent: 50,
            ..Default::default()
        });
        for uid in ["a", "b", "c"] {
            fail(&c, uid, 1, 4);
        }
        let now = Instant::now();
        let ejected: Vec<_> = ["a", "b", "c"]
            .into_iter()
            .filter(|u| c.is_ejected(u, now))
            .collect();
        assert_eq!(ejected, ["a", "b"], "50 % of 4 hosts");
        // 100 %: everything may go, and then no endpoint is left (503 UH upstream of here).
        let all = cluster(l7::OutlierDetection {
            consecutive_5xx_errors: Some(1),
            max_ejection_percent: 100,
            ..Default::default()
        });
        fail(&all, "a", 1, 2);
        fail(&all, "b", 1, 2);
        assert!(all.usable(&["a", "b"], Instant::now()).is_empty());
    }

    #[test]
    fn min_health_percent_balances_over_all_hosts_below_it() {
        let c = cluster(l7::OutlierDetection {
            consecutive_5xx_errors: Some(1),
            max_ejection_percent: 100,
            min_health_percent: 60,
            ..Default::default()
        });
        fail(&c, "a", 1, 3);
        // 2 of 3 healthy (67 % >= 60 %): the ejected host is skipped.
        assert_eq!(c.usable(&["a", "b", "c"], Instant::now()), vec![1, 2]);
        fail(&c, "b", 1, 3);
        // 1 of 3 healthy (33 %): panic mode, all hosts.
        assert_eq!(c.usable(&["a", "b", "c"], Instant::now()), vec![0, 1, 2]);
    }

    #[test]
    fn connect_timeout_from_the_destination_rule_or_the_default() {
        let default = Duration::from_secs(10);
        let none = Cluster::new("a".into(), Policy::default());
        assert_eq!(none.connect_timeout(default), default);
        let set = Cluster::new(
            "b".into(),
            Policy {
                pool: Some(l7::ConnectionPool {
                    connect_timeout: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 250_000_000,
                    }),
                    ..Default::default()
                }),
                ..Policy::default()
            },
        );
        assert_eq!(set.connect_timeout(default), Duration::from_millis(250));
    }

    fn ms(n: u64) -> prost_types::Duration {
        prost_types::Duration {
            seconds: (n / 1000) as i64,
            nanos: ((n % 1000) * 1_000_000) as i32,
        }
    }

    #[test]
    fn ejection_ends_on_the_first_interval_tick_after_the_base_time() {
        let c = cluster(l7::OutlierDetection {
            consecutive_5xx_errors: Some(1),
            base_ejection_time: Some(ms(50)),
            interval: Some(ms(1000)),
            ..Default::default()
        });
        let t0 = c.epoch + Duration::from_millis(100);
        c.record_outcome_at("a", Some(503), 2, t0);
        // 50 ms of base time, but hosts come back only on the interval timer (t = 1 s).
        assert!(c.is_ejected("a", t0 + Duration::from_millis(60)));
        assert!(c.is_ejected("a", c.epoch + Duration::from_millis(999)));
        assert!(!c.is_ejected("a", c.epoch + Duration::from_millis(1000)));
        // A short interval: back right after the base time.
        let fast = cluster(l7::OutlierDetection {
            consecutive_5xx_errors: Some(1),
            base_ejection_time: Some(ms(50)),
            interval: Some(ms(10)),
            ..Default::default()
        });
        fast.record_outcome_at("a", Some(503), 2, fast.epoch);
        assert!(fast.is_ejected("a", fast.epoch + Duration::from_millis(45)));
        assert!(!fast.is_ejected("a", fast.epoch + Duration::from_millis(50)));
    }

    #[test]
    fn extreme_ejection_times_and_intervals_do_not_overflow_the_clock() {
        // Found by tests/parsers_never_panic.rs: Instant + Duration panicked on overflow.
        let huge = prost_types::Duration {
            seconds: i64::MAX,
            nanos: 999_999_999,
        };
        for (base, interval) in [(huge, ms(10)), (ms(10), huge), (huge, huge)] {
            let c = cluster(l7::OutlierDetection {
                consecutive_5xx_errors: Some(1),
                base_ejection_time: Some(base),
                interval: Some(interval),
                ..Default::default()
            });
            c.record_outcome_at("a", Some(503), 2, c.epoch);
            assert!(c.is_ejected("a", c.epoch + Duration::from_secs(3600)));
        }
        // A 1 ns interval: the tick count no longer fits u32, the end stays exact.
        let c = cluster(l7::OutlierDetection {
            consecutive_5xx_errors: Some(1),
            base_ejection_time: Some(ms(30_000)),
            interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 1,
            }),
            ..Default::default()
        });
        c.record_outcome_at("a", Some(503), 2, c.epoch + Duration::from_secs(10));
        assert!(c.is_ejected("a", c.epoch + Duration::from_secs(39)));
        assert!(!c.is_ejected("a", c.epoch + Duration::from_secs(41)));
    }

    #[test]
    fn repeat_ejections_grow_and_decay_per_healthy_interval() {
        let c = cluster(l7::OutlierDetection {
            consecutive_5xx_errors: Some(1),
            base_ejection_time: Some(ms(100)),
            interval: Some(ms(100)),
            ..Default::default()
        });
        let at = |n: u64| c.epoch + Duration::from_millis(n);
        c.record_outcome_at("a", None, 2, at(0));
        assert!(c.is_ejected("a", at(99)) && !c.is_ejected("a", at(100)));
        // Ejected again right away: twice the base time.
        c.record_outcome_at("a", None, 2, at(100));
        assert!(c.is_ejected("a", at(299)) && !c.is_ejected("a", at(300)));
        // Three ejections in a row: 3x.
        c.record_outcome_at("a", None, 2, at(300));
        assert!(c.is_ejected("a", at(599)) && !c.is_ejected("a", at(600)));
        // Healthy for two intervals (600 → 800): the multiplier went 3 → 1, so the next
        // ejection is 2x, not 4x.
        c.record_outcome_at("a", None, 2, at(800));
        assert!(c.is_ejected("a", at(999)) && !c.is_ejected("a", at(1000)));
    }

    #[test]
    fn ejection_time_is_capped_at_envoys_maximum() {
        let c = cluster(l7::OutlierDetection {
            consecutive_5xx_errors: Some(1),
            base_ejection_time: Some(ms(200_000)),
            interval: Some(ms(1000)),
            ..Default::default()
        });
        let mut now = c.epoch;
        for _ in 0..3 {
            c.record_outcome_at("a", None, 2, now);
            now = c.health.lock().unwrap()["a"].ejected_until.unwrap();
        }
        // 200 s, then 400 capped to 300 s, then 300 s again.
        assert_eq!(now - c.epoch, Duration::from_secs(800));
    }
}
