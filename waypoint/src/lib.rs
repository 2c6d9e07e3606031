//! zmesh waypoint: the L7 proxy of ambient mode.
//!
//! ztunnels send traffic for services (or workloads) that use a waypoint to the waypoint's
//! HBONE listener (15008), with the CONNECT authority set to the original service `VIP:port`
//! (or `hostname:port`). The waypoint detects the protocol (declared `appProtocol` of the
//! service port, else sniffing), applies the service's L7 configuration ([`store::L7Store`]:
//! authorization, routes, faults, rate limits, retries, timeouts, mirrors) and tunnels each
//! request over HBONE to the chosen endpoint's ztunnel, presenting its own identity.
//! HTTP/1.1 Upgrade requests (WebSocket; not `h2c`) go through the same pipeline and, once
//! the endpoint answers 101, are relayed as a byte stream ([`upgrade`]).
//!
//! Layout: [`sniff`] protocol detection, [`store`] the L7 configuration from xDS and
//! [`validate`] its checks (NACK), [`matcher`] matching and L7 authz, [`http`] the
//! request pipeline, [`upgrade`] HTTP/1.1 Upgrade (WebSocket) forwarding, [`upstream`]
//! clusters/LB/outlier detection/connection pools, [`stats`]
//! Istio metrics, [`trace`] spans and their OTLP export, [`app`] the process around it (xDS,
//! certificates, admin, readiness, drain) used by the `waypoint` binary.

pub mod app;
pub mod coalesce;
pub mod cors;
pub mod http;
pub mod matcher;
pub mod sniff;
pub mod stats;
pub mod store;
pub mod trace;
pub mod upgrade;
pub mod upstream;
pub mod validate;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::http::{HeaderMap, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zmesh_core::certs::{CertificateManager, WorkloadCertificate};
use zmesh_core::drain::Drain;
use zmesh_core::hbone::H2Config;
use zmesh_core::hbone::pool::{Pool, PoolOptions};
use zmesh_core::hbone::server::{
    self, ConnectHandler, InboundRequest, Responder, ServerConn, Target,
};
use zmesh_core::identity::Identity;
use zmesh_core::metrics::{
    ConnectionRecorder, Metrics, Reporter, ResponseFlags, SecurityPolicy, TcpLabels, traffic_labels,
};
use zmesh_core::socket::{self, SocketError};
use zmesh_core::state::{AppProtocol, Service, StateStore, Workload};
use zmesh_core::worker::{self, WorkerError, WorkerThread};
use zmesh_proto::l7;

use crate::sniff::Detected;
use crate::stats::L7Metrics;
use crate::store::L7Store;
use crate::upstream::{Endpoint, Policy, UpstreamConfig, Upstreams};

/// Errors starting the waypoint.
#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    #[error("cannot bind the waypoint HBONE listener: {0}")]
    Bind(#[from] SocketError),
    #[error("waypoint: {0}")]
    Worker(#[from] WorkerError),
    #[error(transparent)]
    Tracing(#[from] trace::TraceError),
}

/// Waypoint settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The waypoint's own identity (its certificate is presented to ztunnels and endpoints).
    pub identity: Identity,
    /// `(namespace, name)` of the waypoint Gateway (for AuthorizationPolicy targetRefs).
    pub gateway_namespace: String,
    pub gateway_name: String,
    /// HBONE listener (15008).
    pub hbone_addr: SocketAddr,
    pub h2: H2Config,
    /// HBONE port of the endpoints' ztunnels, with per-node overrides (tests).
    pub peer_hbone_port: u16,
    pub peer_hbone_ports: HashMap<String, u16>,
    pub connect_timeout: Duration,
    /// Protocol sniffing gives up (→ TCP) after this long without a decision.
    pub sniff_timeout: Duration,
    /// Replay buffer: a request body up to this size that has arrived when the request is
    /// routed is kept so retries and mirrors can replay it; a larger or still-arriving body
    /// (a stream) is forwarded as it comes, without retries or mirror.
    pub max_request_body: usize,
    /// Largest request header block (HTTP/1 read buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Time to receive a full HTTP/1 request head.
    pub header_read_timeout: Duration,
    /// Worker threads, each a single-threaded runtime with its own HBONE listener
    /// (`SO_REUSEPORT`) and upstream pool ([`zmesh_core::worker`]). 0: serve on the caller's
    /// runtime.
    pub workers: usize,
    /// Spans exported over OTLP, fixed (flags). `None`: the control plane decides (the
    /// `WaypointTelemetry` of this Gateway); without it, no tracing at all (trace headers pass
    /// untouched).
    pub tracing: Option<trace::TracingConfig>,
    /// Settings of a tracer the control plane turns on (its endpoint and sampling replace
    /// these).
    pub tracing_defaults: trace::TracingConfig,
}

impl Config {
    pub fn new(identity: Identity, hbone_addr: SocketAddr) -> Self {
        Config {
            gateway_namespace: identity.namespace().to_string(),
            gateway_name: "waypoint".into(),
            identity,
            hbone_addr,
            h2: H2Config::default(),
            peer_hbone_port: zmesh_core::hbone::HBONE_PORT,
            peer_hbone_ports: HashMap::new(),
            connect_timeout: Duration::from_secs(10),
            sniff_timeout: Duration::from_millis(200),
            max_request_body: 4 << 20,
            max_header_bytes: 64 << 10,
            header_read_timeout: Duration::from_secs(10),
            workers: 0,
            tracing: None,
            tracing_defaults: trace::TracingConfig::new(""),
        }
    }
}

/// Shared state of a running waypoint.
pub struct Inner {
    pub cfg: Config,
    pub state: Arc<StateStore>,
    pub l7: Arc<L7Store>,
    pub certs: Arc<CertificateManager>,
    pub upstreams: Upstreams,
    pub metrics: Arc<Metrics>,
    pub l7_metrics: Arc<L7Metrics>,
    pub(crate) buckets: Mutex<HashMap<String, http::Bucket>>,
    /// Empty unless tracing is on (flags, or the control plane).
    pub tracer: Arc<trace::TracerSlot>,
    pub drain: Drain,
    /// Cancelled once draining is over: worker runtimes then stop (dropping what is left).
    stopped: CancellationToken,
}

/// A running waypoint.
pub struct Waypoint {
    pub inner: Arc<Inner>,
    pub hbone_addr: SocketAddr,
    /// Joined by [`Waypoint::drain`].
    threads: Mutex<Vec<WorkerThread>>,
}

impl Waypoint {
    /// Bind the HBONE listener(s) and serve.
    pub async fn start(
        cfg: Config,
        state: Arc<StateStore>,
        l7: Arc<L7Store>,
        certs: Arc<CertificateManager>,
        metrics: Arc<Metrics>,
    ) -> Result<Waypoint, WaypointError> {
        let std_listeners = worker::reuseport_listeners(cfg.hbone_addr, cfg.workers, false)?;
        let listener = if cfg.workers == 0 {
            Some(socket::listen(cfg.hbone_addr, false)?)
        } else {
            None
        };
        let bound = std_listeners
            .first()
            .map(|l| l.local_addr())
            .or_else(|| listener.as_ref().map(|l| l.local_addr()));
        let hbone_addr = match bound {
            Some(Ok(a)) => a,
            Some(Err(source)) => {
                return Err(SocketError::Listen {
                    addr: cfg.hbone_addr,
                    source,
                }
                .into());
            }
            None => cfg.hbone_addr,
        };
        let pool = Pool::new(cfg.h2.clone(), PoolOptions::default(), certs.clone());
        let upstreams = Upstreams::new(
            UpstreamConfig {
                identity: cfg.identity.clone(),
                src_ip: hbone_addr.ip(),
                peer_hbone_port: cfg.peer_hbone_port,
                peer_hbone_ports: cfg.peer_hbone_ports.clone(),
                connect_timeout: cfg.connect_timeout,
                pending_timeout: Duration::from_secs(30),
            },
            pool,
            cfg.workers,
        );
        certs.prefetch(&cfg.identity);
        let stopped = CancellationToken::new();
        // Exporters run on this (the control) runtime, until the workers have stopped.
        let tracer = Arc::new(trace::TracerSlot::default());
        let trace_id = trace::WaypointIdentity {
            gateway_name: cfg.gateway_name.clone(),
            gateway_namespace: cfg.gateway_namespace.clone(),
            trust_domain: cfg.identity.trust_domain().to_string(),
            ip: hbone_addr.ip(),
        };
        match &cfg.tracing {
            Some(t) => {
                let stop = stopped.child_token();
                let started = trace::Tracer::start(t, &trace_id, stop.clone())?;
                tracer.set(Some((started, stop)));
            }
            None => {
                tokio::spawn(trace::follow(
                    tracer.clone(),
                    l7.clone(),
                    format!("{}/{}", cfg.gateway_namespace, cfg.gateway_name),
                    cfg.tracing_defaults.clone(),
                    trace_id,
                    stopped.clone(),
                ));
            }
        }
        let inner = Arc::new(Inner {
            l7_metrics: L7Metrics::register(&metrics),
            cfg: cfg.clone(),
            state,
            l7,
            certs,
            upstreams,
            metrics,
            buckets: Mutex::new(HashMap::new()),
            tracer,
            drain: Drain::new(),
            stopped,
        });
        // `connectionPool.http.idleTimeout`: a sweep closes upstream connections left idle
        // too long (checking only on reuse would keep unused ones open for ever).
        let sweep = Arc::downgrade(&inner);
        let stopped = inner.stopped.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_SWEEP_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.cancelled() => return,
                }
                let Some(inner) = sweep.upgrade() else { return };
                let n = inner.upstreams.close_idle();
                if n > 0 {
                    debug!(connections = n, "closed idle upstream connections");
                }
            }
        });
        let collector = stats::ClusterCollector(Arc::downgrade(&inner));
        inner
            .metrics
            .with_registry(|r| r.register_collector(Box::new(collector)));
        let handler: Arc<dyn ConnectHandler> = Arc::new(Handler {
            inner: inner.clone(),
        });
        if let Some(listener) = listener {
            tokio::spawn(server::serve(
                listener,
                cfg.h2.clone(),
                handler.clone(),
                inner.drain.clone(),
            ));
        }
        let mut threads = Vec::new();
        for (index, l) in std_listeners.into_iter().enumerate() {
            match start_worker(index, l, inner.clone(), handler.clone()).await {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // The workers already started end with this.
                    inner.drain.stopping().cancel();
                    inner.stopped.cancel();
                    return Err(e.into());
                }
            }
        }
        info!(addr = %hbone_addr, identity = %cfg.identity, workers = cfg.workers, "waypoint started");
        Ok(Waypoint {
            inner,
            hbone_addr,
            threads: Mutex::new(threads),
        })
    }

    /// Stop accepting and close connections.
    pub fn shutdown(&self) {
        self.inner.drain.stopping().cancel();
        self.inner.drain.force_close().cancel();
        self.inner.stopped.cancel();
    }

    /// Stop accepting, give live connections up to `grace` to finish, then close the rest and
    /// wait for the worker threads to end. Returns how many connections were cut.
    pub async fn drain(&self, grace: Duration) -> usize {
        let cut = self.inner.drain.shutdown(grace).await;
        self.inner.stopped.cancel();
        let threads = std::mem::take(
            &mut *self
                .threads
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for t in threads {
            t.join().await;
        }
        cut
    }
}

/// Start worker `index` ([`zmesh_core::worker`]) serving `listener` with its own upstream
/// pool. Returns once the worker runs.
async fn start_worker(
    index: usize,
    listener: std::net::TcpListener,
    inner: Arc<Inner>,
    handler: Arc<dyn ConnectHandler>,
) -> Result<WorkerThread, WorkerError> {
    let (thread, ()) = worker::spawn("waypoint", index, move || {
        let listener = TcpListener::from_std(listener)?;
        let cfg = &inner.cfg;
        // Created here: its connections' driver tasks run on this worker.
        inner.upstreams.set_worker_pool(
            index,
            Pool::new(cfg.h2.clone(), PoolOptions::default(), inner.certs.clone()),
        );
        let serve = server::serve(listener, cfg.h2.clone(), handler, inner.drain.clone());
        // Keep the runtime (and the connections it drives) until draining is over.
        let run = async move {
            tokio::join!(serve, inner.stopped.cancelled());
        };
        Ok(((), run))
    })
    .await?;
    Ok(thread)
}

/// How often idle upstream connections are checked against their idle timeout: the
/// granularity of `connectionPool.http.idleTimeout`.
const IDLE_SWEEP_PERIOD: Duration = Duration::from_millis(250);

/// Per-tunnel context: what the CONNECT was for and who sent it.
pub struct ConnCtx {
    pub id: u64,
    /// The service addressed (VIP:port or hostname:port).
    pub service: Option<Arc<Service>>,
    /// A workload addressed directly by its IP.
    pub workload: Option<Arc<Workload>>,
    pub target: Target,
    pub port: u16,
    pub peer_identity: Option<Identity>,
    /// Original client address (HBONE `forwarded: for=`), else the peer.
    pub client_addr: SocketAddr,
    pub src_workload: Option<Arc<Workload>>,
    pub app_protocol: AppProtocol,
}

struct Handler {
    inner: Arc<Inner>,
}

/// The client address of the HBONE `forwarded` header (`for="ip:port"`).
#[doc(hidden)] // pub for the fuzz targets and tests/parsers_never_panic.rs
pub fn forwarded_for(h: &HeaderMap) -> Option<SocketAddr> {
    let v = h.get("forwarded")?.to_str().ok()?;
    v.split([';', ','])
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case("for"))
        .and_then(|(_, v)| v.trim_matches('"').parse().ok())
}

#[async_trait::async_trait]
impl ConnectHandler for Handler {
    async fn certificate(&self, _local: SocketAddr) -> Result<Arc<WorkloadCertificate>, String> {
        self.inner
            .certs
            .fetch(&self.inner.cfg.identity)
            .await
            .map_err(|e| e.to_string())
    }

    async fn handle(&self, conn: Arc<ServerConn>, req: InboundRequest, responder: Responder) {
        let inner = self.inner.clone();
        let (service, workload) = {
            let st = inner.state.read();
            match &req.target {
                Target::Addr(a) => match st.service_by_vip(a.ip()) {
                    Some(s) => (Some(s), None),
                    None => (None, st.workload_by_ip(a.ip())),
                },
                Target::Host(h, _) => (st.service_by_host(h), None),
            }
        };
        if service.is_none() && workload.is_none() {
            debug!(target = %req.target, "waypoint: unknown CONNECT target");
            responder.reject(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
        let port = req.target.port();
        let app_protocol = service
            .as_ref()
            .and_then(|s| s.port(port).map(|p| p.app_protocol))
            .unwrap_or_default();
        let client_addr = forwarded_for(&req.headers).unwrap_or(conn.peer);
        let src_workload = inner
            .state
            .read()
            .workload_by_ip(client_addr.ip())
            .filter(|w| Some(w.identity()) == conn.peer_identity);
        let ctx = Arc::new(ConnCtx {
            id: conn.id,
            service,
            workload,
            target: req.target.clone(),
            port,
            peer_identity: conn.peer_identity.clone(),
            client_addr,
            src_workload,
            app_protocol,
        });
        let mut stream = match responder.accept(HeaderMap::new()) {
            Ok(s) => s,
            Err(e) => {
                debug!("client went away before the tunnel opened: {e}");
                return;
            }
        };
        let detected = match app_protocol {
            AppProtocol::Http11 => (Detected::Http1, bytes::Bytes::new()),
            AppProtocol::Http2 | AppProtocol::Grpc => (Detected::Http2, bytes::Bytes::new()),
            AppProtocol::Tcp | AppProtocol::Tls => (Detected::Tcp, bytes::Bytes::new()),
            AppProtocol::Unknown => {
                match sniff::detect(&mut stream, inner.cfg.sniff_timeout).await {
                    Ok(d) => d,
                    Err(e) => {
                        debug!("tunnel failed during protocol detection: {e}");
                        return;
                    }
                }
            }
        };
        let io = sniff::Rewind::new(detected.1, stream);
        match detected.0 {
            Detected::Tcp => tcp_proxy(inner, ctx, io).await,
            d => http::serve_connection(inner, ctx, io, d).await,
        }
    }

    fn handshake_failed(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        flag: &'static str,
        reason: &str,
    ) {
        debug!(%peer, %local, flag, "waypoint HBONE handshake failed: {reason}");
    }

    fn is_illegal_port(&self, port: u16) -> bool {
        port == self.inner.cfg.hbone_addr.port() || port == zmesh_core::hbone::HBONE_PORT
    }
}

impl Inner {
    /// Endpoints of `host` (a service key or hostname) on `port`, restricted to `subset`.
    /// `Err(())` when the subset is not defined (Istio answers 503 for it).
    pub fn endpoints(
        &self,
        host: &str,
        subset: &str,
        port: u16,
        cfg: Option<&l7::ServiceConfig>,
    ) -> Result<(Option<Arc<Service>>, Vec<Endpoint>), UndefinedSubset> {
        let st = self.state.read();
        let Some(svc) = st.service_by_host(host) else {
            return Ok((None, Vec::new()));
        };
        let subset_uids = if subset.is_empty() {
            None
        } else {
            let s = cfg.and_then(|c| c.subsets.iter().find(|s| s.name == subset));
            match s {
                Some(s) => Some(s.workload_uids.clone()),
                None => return Err(UndefinedSubset),
            }
        };
        let eps = st
            .endpoints(&svc, port)
            .into_iter()
            .filter(|(w, _)| {
                subset_uids
                    .as_ref()
                    .is_none_or(|u| u.binary_search(&w.uid).is_ok())
            })
            .filter_map(|(w, tp)| {
                let ip = *w.addresses.first()?;
                Some(Endpoint {
                    addr: SocketAddr::new(ip, tp),
                    workload: w,
                })
            })
            .collect();
        Ok((Some(svc), eps))
    }

    /// The L7 config of a service, by key or hostname.
    pub fn service_config(&self, svc: &Service) -> Option<Arc<l7::ServiceConfig>> {
        self.l7.load().service_for(svc)
    }
}

/// A route names a DestinationRule subset that does not exist (Istio answers 503).
#[derive(Debug, Clone, Copy)]
pub struct UndefinedSubset;

/// Pick a destination among weighted ones (weight 0 is never chosen).
pub fn pick_weighted(ds: &[l7::RouteDestination]) -> Option<&l7::RouteDestination> {
    let total: u64 = ds.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 {
        return ds.first().filter(|_| ds.len() == 1);
    }
    let mut r = rand::random::<u64>() % total;
    for d in ds {
        let w = u64::from(d.weight);
        if r < w {
            return Some(d);
        }
        r -= w;
    }
    None
}

/// Opaque TCP: one routing decision per connection (TcpRoutes, weights), then a byte relay.
/// Counted in `istio_tcp_*` with `reporter="waypoint"`, as Envoy's waypoint does; a
/// connection that finds no upstream is counted as opened, failed and closed.
async fn tcp_proxy<S>(inner: Arc<Inner>, ctx: Arc<ConnCtx>, mut io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let started = Instant::now();
    let Some(svc) = ctx.service.clone() else {
        // A workload addressed directly: forward to it as-is.
        if let Some(w) = &ctx.workload {
            let ep = Endpoint {
                workload: w.clone(),
                addr: match &ctx.target {
                    Target::Addr(a) => *a,
                    Target::Host(..) => return,
                },
            };
            relay_tcp(&inner, &ctx, &mut io, ep, None, started).await;
        }
        return;
    };
    let no_upstream = |why: &str| {
        warn!(service = %svc.hostname, "{why}");
        let r = ConnectionRecorder::new(inner.metrics.clone(), tcp_labels(&ctx, None, Some(&svc)));
        r.fail(ResponseFlags::Connect);
    };
    let cfg = inner.service_config(&svc);
    let dst_ip = match &ctx.target {
        Target::Addr(a) => Some(a.ip()),
        Target::Host(..) => None,
    };
    let src_ns = ctx
        .peer_identity
        .as_ref()
        .map(|i| i.namespace().to_string());
    let route = cfg.as_ref().and_then(|c| {
        c.tcp_routes.iter().find(|r| {
            r.matches.is_empty()
                || r.matches
                    .iter()
                    .any(|m| matcher::tcp_match(m, ctx.port, dst_ip, src_ns.as_deref()))
        })
    });
    let default_dest = l7::RouteDestination {
        host: svc.hostname.clone(),
        weight: 100,
        ..Default::default()
    };
    let dest = match route {
        Some(r) => pick_weighted(&r.destinations).cloned(),
        None => Some(default_dest),
    };
    let Some(dest) = dest else {
        no_upstream("TCP route has no destination with weight");
        return;
    };
    let port = if dest.port == 0 {
        ctx.port
    } else {
        dest.port as u16
    };
    let (dcfg, dsvc) = if dest.host == svc.hostname {
        (cfg.clone(), Some(svc.clone()))
    } else {
        (
            inner.l7.load().service(&dest.host),
            inner.state.read().service_by_host(&dest.host),
        )
    };
    let Ok((_, eps)) = inner.endpoints(&dest.host, &dest.subset, port, dcfg.as_deref()) else {
        no_upstream("TCP route to an undefined subset");
        return;
    };
    let policy = Policy::resolve(dcfg.as_deref(), &dest.subset, port);
    let cluster = inner.upstreams.cluster(
        &format!("tcp|{}|{}|{}", port, dest.subset, dest.host),
        policy,
    );
    let Some(ep) = cluster.pick(&eps, Some(&ctx.client_addr.ip().to_string())) else {
        no_upstream("no healthy upstream for TCP connection");
        return;
    };
    relay_tcp(&inner, &ctx, &mut io, ep, dsvc.as_deref(), started).await;
}

/// `istio_tcp_*` labels of a connection through the waypoint.
fn tcp_labels(ctx: &ConnCtx, dst: Option<&Workload>, svc: Option<&Service>) -> TcpLabels {
    traffic_labels(
        Reporter::Waypoint,
        ctx.src_workload.as_deref(),
        ctx.peer_identity.as_ref(),
        dst,
        svc,
        SecurityPolicy::MutualTls,
    )
}

async fn relay_tcp<S>(
    inner: &Inner,
    ctx: &ConnCtx,
    io: &mut S,
    ep: Endpoint,
    svc: Option<&Service>,
    started: Instant,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let service = svc.map_or("-", |s| s.hostname.as_str());
    let recorder = ConnectionRecorder::new(
        inner.metrics.clone(),
        tcp_labels(ctx, Some(&ep.workload), svc),
    );
    let mut up = match inner
        .upstreams
        .tcp_tunnel(&ep, http::tunnel_headers(ctx, service))
        .await
    {
        Ok(s) => s,
        Err(e) => {
            warn!(endpoint = %ep.addr, "TCP upstream failed: {e}");
            recorder.fail(ResponseFlags::Connect);
            return;
        }
    };
    let force = inner.drain.force_close();
    let r = tokio::select! {
        r = tokio::io::copy_bidirectional(io, &mut up) => r,
        _ = force.cancelled() => Err(std::io::Error::other("waypoint shutting down")),
    };
    let (sent, recv, err) = match r {
        Ok((a, b)) => (a, b, None),
        Err(e) => (0, 0, Some(e.to_string())),
    };
    // From the waypoint's point of view: received from the client, sent back to it.
    recorder.add_received(sent);
    recorder.add_sent(recv);
    if err.is_some() {
        recorder.fail(ResponseFlags::Connect);
    }
    drop(recorder);
    tracing::info!(
        target: "access",
        direction = "waypoint",
        protocol = "tcp",
        src_addr = %ctx.client_addr,
        src_identity = ctx.peer_identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
        dst_service = service,
        dst_addr = %ep.addr,
        dst_workload = %ep.workload.name,
        bytes_sent = sent,
        bytes_recv = recv,
        duration_ms = started.elapsed().as_millis() as u64,
        error = err.unwrap_or_default(),
        "connection complete"
    );
}
