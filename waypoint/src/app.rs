//! The waypoint process around the L7 engine: configuration source (Delta ADS with the L7
//! types delivered to the [`L7Store`]), workload certificate, admin (`/config_dump`,
//! `/logging`, `/quitquitquit`, loopback only), Prometheus metrics, readiness and graceful
//! drain. The `waypoint` binary is a thin flag parser over [`App`]; tests start it in-process.
//!
//! Readiness (`/healthz/ready`) waits for two things: the first full xDS sync of *every*
//! subscribed type (Address, Authorization and both L7 types — a waypoint that routed before
//! it had its VirtualServices would send traffic to the wrong versions), and the waypoint's own
//! certificate (without it no ztunnel can reach it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use zmesh_core::admin::{self, AdminHandler, Readiness};
use zmesh_core::certs::{CertificateManager, CertificateProvider};
use zmesh_core::metrics::Metrics;
use zmesh_core::state::{ConfigSource, StateStore};
use zmesh_core::telemetry::LogHandle;
use zmesh_core::xds::XdsStatus;

use crate::store::L7Store;
use crate::{Config, Waypoint, WaypointError};

/// Why the waypoint process could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Waypoint(#[from] WaypointError),
    #[error("cannot bind the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the admin listener must be on a loopback address (it can dump config and stop the \
         waypoint), got {0}"
    )]
    AdminNotLoopback(SocketAddr),
}

/// Settings of the waypoint process.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// The L7 engine (identity, HBONE listener, limits).
    pub waypoint: Config,
    /// Admin API (15000); must be loopback.
    pub admin_addr: Option<SocketAddr>,
    /// Prometheus metrics (15020).
    pub metrics_addr: Option<SocketAddr>,
    /// `/healthz/ready` (15021).
    pub readiness_addr: Option<SocketAddr>,
    /// Time live connections get to finish on shutdown.
    pub drain_grace: Duration,
    /// Lifetime requested for the waypoint's certificate.
    pub cert_lifetime: Duration,
}

impl AppConfig {
    /// Istio's ports for everything besides the engine's own settings.
    pub fn new(waypoint: Config) -> Self {
        AppConfig {
            waypoint,
            admin_addr: Some(([127, 0, 0, 1], 15000).into()),
            metrics_addr: Some(([0, 0, 0, 0], 15020).into()),
            readiness_addr: Some(([0, 0, 0, 0], 15021).into()),
            drain_grace: Duration::from_secs(5),
            cert_lifetime: Duration::from_secs(24 * 3600),
        }
    }
}

/// Where the listeners bound (ports may have been 0).
#[derive(Debug, Clone, Default)]
pub struct BoundAddrs {
    pub hbone: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub readiness: Option<SocketAddr>,
}

/// A running waypoint process.
pub struct App {
    pub waypoint: Waypoint,
    pub addrs: BoundAddrs,
    pub readiness: Arc<Readiness>,
    pub state: Arc<StateStore>,
    pub l7: Arc<L7Store>,
    pub metrics: Arc<Metrics>,
    /// Cancelled by `/quitquitquit` (and by [`App::shutdown`]).
    pub quit: CancellationToken,
    servers: CancellationToken,
    source: JoinHandle<()>,
    drain_grace: Duration,
}

struct Dump {
    state: Arc<StateStore>,
    l7: Arc<L7Store>,
    certs: Arc<CertificateManager>,
    cfg: Config,
    addrs: BoundAddrs,
    xds: Option<Arc<XdsStatus>>,
    inner: Arc<crate::Inner>,
}

impl AdminHandler for Dump {
    fn stats(&self) -> Option<String> {
        let mut s = self.inner.upstreams.stats_text();
        if let Some(t) = self.inner.tracer.get() {
            s.push_str(&t.stats_text());
        }
        Some(s)
    }

    fn config_dump(&self) -> serde_json::Value {
        serde_json::json!({
            "proxy": "waypoint",
            "identity": self.cfg.identity.to_string(),
            "gateway": format!("{}/{}", self.cfg.gateway_namespace, self.cfg.gateway_name),
            "listeners": {
                "hbone": self.addrs.hbone,
                "admin": self.addrs.admin,
                "metrics": self.addrs.metrics,
                "readiness": self.addrs.readiness,
            },
            "xds": self.xds.as_ref().map(|s| s.dump()),
            "synced": self.state.is_synced(),
            "l7": self.l7.dump(),
            "state": self.state.read().dump(),
            "certificates": self.certs.dump(),
            "tracing": self.inner.tracer.get().map(|t| serde_json::json!({
                "otlp_endpoint": t.endpoint(),
                "sampling_percent": t.sampling_percent(),
            })),
        })
    }
}

async fn bind(
    what: &'static str,
    addr: Option<SocketAddr>,
) -> Result<Option<TcpListener>, AppError> {
    match addr {
        None => Ok(None),
        Some(addr) => TcpListener::bind(addr)
            .await
            .map(Some)
            .map_err(|source| AppError::Bind { what, addr, source }),
    }
}

impl App {
    /// Bind everything and start serving. `source` feeds `state` (and, for an
    /// [`XdsClient`](zmesh_core::xds::XdsClient) built with [`L7Store::subscribe`], `l7`);
    /// it must mark the state synced only once everything it delivers has arrived.
    /// `xds` (the client's status) is shown in `/config_dump`.
    pub async fn start(
        cfg: AppConfig,
        mut source: Box<dyn ConfigSource>,
        l7: Arc<L7Store>,
        provider: Arc<dyn CertificateProvider>,
        xds: Option<Arc<XdsStatus>>,
        logs: Option<LogHandle>,
    ) -> Result<App, AppError> {
        if let Some(a) = cfg.admin_addr
            && !a.ip().to_canonical().is_loopback()
        {
            return Err(AppError::AdminNotLoopback(a));
        }
        let admin_l = bind("admin", cfg.admin_addr).await?;
        let metrics_l = bind("metrics", cfg.metrics_addr).await?;
        let ready_l = bind("readiness", cfg.readiness_addr).await?;
        let local = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());

        let readiness = Readiness::new();
        let config_ready = readiness.register("config");
        let cert_ready = readiness.register("certificate");
        let metrics = Metrics::new("waypoint");
        // The xDS client's `istio_xds_*` (none for a static source), as Istio registers them.
        source.register_metrics(&metrics);
        let state = StateStore::new();
        let certs = CertificateManager::new(provider, cfg.cert_lifetime);
        let servers = CancellationToken::new();
        let quit = CancellationToken::new();

        let waypoint = Waypoint::start(
            cfg.waypoint.clone(),
            state.clone(),
            l7.clone(),
            certs.clone(),
            metrics.clone(),
        )
        .await?;
        let addrs = BoundAddrs {
            hbone: Some(waypoint.hbone_addr),
            admin: local(&admin_l),
            metrics: local(&metrics_l),
            readiness: local(&ready_l),
        };

        // Configuration.
        let source_name = source.name().to_string();
        let st = state.clone();
        let source = tokio::spawn(async move {
            if let Err(e) = source.run(st).await {
                error!(source = %source_name, "config source stopped: {e}");
            }
        });
        let (st, stop) = (state.clone(), servers.clone());
        tokio::spawn(async move {
            let mut rx = st.generation();
            loop {
                if st.is_synced() {
                    info!("configuration synced");
                    config_ready.ready();
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = rx.changed() => if r.is_err() { return },
                }
            }
        });
        // Own certificate, retried until it is issued.
        let (c, id, stop) = (
            certs.clone(),
            cfg.waypoint.identity.clone(),
            servers.clone(),
        );
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                match c.fetch(&id).await {
                    Ok(_) => {
                        cert_ready.ready();
                        return;
                    }
                    Err(e) => warn!("waypoint certificate for {id}: {e}; retrying in {delay:?}"),
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        });

        // Admin, metrics, readiness.
        if let Some(l) = admin_l {
            let handler = Arc::new(Dump {
                state: state.clone(),
                l7: l7.clone(),
                certs: certs.clone(),
                cfg: cfg.waypoint.clone(),
                addrs: addrs.clone(),
                xds,
                inner: waypoint.inner.clone(),
            });
            let (q, s) = (quit.clone(), servers.clone());
            tokio::spawn(async move {
                let serve = admin::serve_admin(l, handler, logs, q);
                tokio::select! {
                    _ = s.cancelled() => {}
                    r = serve => if let Err(e) = r { error!("admin server stopped: {e}") },
                }
            });
        }
        if let Some(l) = metrics_l {
            tokio::spawn(admin::serve_metrics(l, metrics.clone(), servers.clone()));
        }
        if let Some(l) = ready_l {
            tokio::spawn(admin::serve_readiness(
                l,
                readiness.clone(),
                servers.clone(),
            ));
        }
        info!(?addrs, identity = %cfg.waypoint.identity, "waypoint process started");
        Ok(App {
            waypoint,
            addrs,
            readiness,
            state,
            l7,
            metrics,
            quit,
            servers,
            source,
            drain_grace: cfg.drain_grace,
        })
    }

    /// Wait until configuration and certificate are in (readiness passes).
    pub async fn wait_ready(&self) {
        while !self.readiness.is_ready() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Drain: stop accepting, give live connections the grace period, then stop everything
    /// (config source included).
    pub async fn shutdown(self) {
        info!("draining for up to {:?}", self.drain_grace);
        let cut = self.waypoint.drain(self.drain_grace).await;
        self.servers.cancel();
        self.quit.cancel();
        self.source.abort();
        info!(cut, "waypoint stopped");
    }
}
