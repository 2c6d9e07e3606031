//! Wiring: binds the listeners, starts the config source, certificate manager, connection pool,
//! proxies and admin servers, and shuts them down in order.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use zmesh_core::admin::{self, AdminHandler, Readiness};
use zmesh_core::certs::{CertificateManager, CertificateProvider};
use zmesh_core::drain::Drain;
use zmesh_core::hbone::pool::{Pool, PoolOptions};
use zmesh_core::hbone::{HBONE_PORT, server};
use zmesh_core::metrics::Metrics;
use zmesh_core::socket;
use zmesh_core::state::{ConfigSource, StateStore};
use zmesh_core::telemetry::LogHandle;

use crate::config::{Config, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, SOCKS5_PORT};
use crate::proxy::connection_manager::ConnectionManager;
use crate::proxy::inbound::Inbound;
use crate::proxy::{ProxyInputs, inbound_passthrough, outbound, socks5};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where each listener actually bound (ports may have been 0).
#[derive(Debug, Clone, Default)]
pub struct BoundAddrs {
    pub outbound: Option<SocketAddr>,
    pub inbound_plaintext: Option<SocketAddr>,
    pub hbone: Option<SocketAddr>,
    pub socks5: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub readiness: Option<SocketAddr>,
}

/// A running ztunnel.
pub struct Ztunnel {
    pub addrs: BoundAddrs,
    pub inputs: Arc<ProxyInputs>,
    pub readiness: Arc<Readiness>,
    /// Cancelled by `/quitquitquit` (and by [`Ztunnel::shutdown`]).
    pub quit: CancellationToken,
    servers: CancellationToken,
}

struct Dump {
    pi: Arc<ProxyInputs>,
    addrs: BoundAddrs,
    redirect: Option<crate::redirect::StatusHandle>,
}

impl AdminHandler for Dump {
    fn config_dump(&self) -> serde_json::Value {
        let cfg = &self.pi.cfg;
        serde_json::json!({
            "node": cfg.node,
            "listeners": {
                "outbound": self.addrs.outbound,
                "inbound_plaintext": self.addrs.inbound_plaintext,
                "hbone": self.addrs.hbone,
                "socks5": self.addrs.socks5,
                "admin": self.addrs.admin,
                "metrics": self.addrs.metrics,
                "readiness": self.addrs.readiness,
            },
            "transparent": cfg.transparent,
            "trust_domain": cfg.trust_domain,
            "state": self.pi.state.read().dump(),
            "certificates": self.pi.certs.dump(),
            "inbound_connections": self.pi.connections.len(),
            "hbone_pool_connections": self.pi.pool.connections(),
            "redirect": self.redirect.as_ref().and_then(|r| r.lock().ok().map(|s| serde_json::json!(*s))),
        })
    }
}

async fn bind_opt(
    addr: Option<SocketAddr>,
    transparent: bool,
) -> Result<Option<TcpListener>, AppError> {
    match addr {
        Some(a) => Ok(Some(socket::listen(a, transparent)?)),
        None => Ok(None),
    }
}

impl Ztunnel {
    /// Bind everything and start serving. Returns once listeners are bound; readiness follows
    /// when the config source has synced.
    pub async fn start(
        cfg: Config,
        source: Box<dyn ConfigSource>,
        ca: Arc<dyn CertificateProvider>,
        logs: Option<LogHandle>,
    ) -> Result<Ztunnel, AppError> {
        let readiness = Readiness::new();
        let config_ready = readiness.register("config");
        let metrics = Metrics::new("ztunnel");
        let state = StateStore::new();
        let certs = CertificateManager::new(ca, cfg.cert_lifetime);
        let pool = Pool::new(
            cfg.h2.clone(),
            PoolOptions {
                keep_source_address: cfg.keep_source_address,
                mark: Some(socket::PROXY_MARK),
            },
            certs.clone(),
        );
        let drain = Drain::new();
        let servers = CancellationToken::new();
        let quit = CancellationToken::new();

        let outbound_l = bind_opt(cfg.outbound_addr, cfg.transparent).await?;
        let inbound_l = bind_opt(cfg.inbound_plaintext_addr, cfg.transparent).await?;
        let hbone_l = socket::listen(cfg.hbone_addr, cfg.transparent)?;
        let socks_l = bind_opt(cfg.socks5_addr, false).await?;
        let admin_l = bind_opt(cfg.admin_addr, false).await?;
        let metrics_l = bind_opt(cfg.metrics_addr, false).await?;
        let ready_l = bind_opt(cfg.readiness_addr, false).await?;
        let local = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
        let addrs = BoundAddrs {
            outbound: local(&outbound_l),
            inbound_plaintext: local(&inbound_l),
            hbone: hbone_l.local_addr().ok(),
            socks5: local(&socks_l),
            admin: local(&admin_l),
            metrics: local(&metrics_l),
            readiness: local(&ready_l),
        };

        // Our own listener ports, whatever they were configured to, plus Istio's defaults:
        // a CONNECT or capture to one of them would loop.
        let mut illegal: HashSet<u16> = [
            OUTBOUND_PORT,
            INBOUND_PLAINTEXT_PORT,
            HBONE_PORT,
            SOCKS5_PORT,
        ]
        .into_iter()
        .collect();
        for a in [
            addrs.outbound,
            addrs.inbound_plaintext,
            addrs.hbone,
            addrs.socks5,
        ]
        .into_iter()
        .flatten()
        {
            illegal.insert(a.port());
        }

        let pi = Arc::new(ProxyInputs {
            cfg: cfg.clone(),
            state: state.clone(),
            certs: certs.clone(),
            pool,
            metrics: metrics.clone(),
            drain: drain.clone(),
            connections: ConnectionManager::new(),
            illegal_ports: illegal.into_iter().collect(),
        });

        // Configuration.
        let source_name = source.name().to_string();
        let st = state.clone();
        tokio::spawn(async move {
            if let Err(e) = source.run(st).await {
                error!(source = %source_name, "config source stopped: {e}");
            }
        });
        let st = state.clone();
        let stop = servers.clone();
        tokio::spawn(async move {
            let mut rx = st.generation();
            loop {
                if st.is_synced() {
                    config_ready.ready();
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = rx.changed() => if r.is_err() { return },
                }
            }
        });
        tokio::spawn(track_local_certificates(pi.clone(), servers.clone()));
        tokio::spawn(pi.connections.clone().watch(state.clone(), servers.clone()));

        // Data plane.
        let inbound: Arc<dyn server::ConnectHandler> = Arc::new(Inbound { pi: pi.clone() });
        tokio::spawn(server::serve(
            hbone_l,
            cfg.h2.clone(),
            inbound,
            drain.clone(),
        ));
        if let Some(l) = outbound_l {
            tokio::spawn(outbound::serve(pi.clone(), l));
        }
        if let Some(l) = inbound_l {
            tokio::spawn(inbound_passthrough::serve(pi.clone(), l));
        }
        if let Some(l) = socks_l {
            tokio::spawn(socks5::serve(pi.clone(), l));
        }

        // eBPF capture of enrolled pods (after the listeners are bound).
        // Not ready until capture works: a node whose redirection cannot be set up must not
        // look healthy (its enrolled pods would not be captured).
        let redirect = (cfg.redirect.clone()).map(|rc| {
            let ready = readiness.register("redirect");
            crate::redirect::spawn(pi.clone(), rc, servers.clone(), ready)
        });

        // Admin, metrics, readiness.
        if let Some(l) = admin_l {
            let handler = Arc::new(Dump {
                pi: pi.clone(),
                addrs: addrs.clone(),
                redirect,
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
        info!(node = %cfg.node, ?addrs, "ztunnel started");
        Ok(Ztunnel {
            addrs,
            inputs: pi,
            readiness,
            quit,
            servers,
        })
    }

    pub fn state(&self) -> &Arc<StateStore> {
        &self.inputs.state
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inputs.metrics
    }

    pub fn pool(&self) -> &Pool {
        &self.inputs.pool
    }

    pub fn certs(&self) -> &Arc<CertificateManager> {
        &self.inputs.certs
    }

    /// Wait until the config source has delivered its first full snapshot.
    pub async fn wait_ready(&self) {
        let mut rx = self.inputs.state.generation();
        while !self.readiness.is_ready() {
            let _ = tokio::time::timeout(std::time::Duration::from_millis(50), rx.changed()).await;
        }
    }

    /// Stop accepting, give live connections `cfg.drain_grace` to finish, then stop everything.
    pub async fn shutdown(self) {
        let grace = self.inputs.cfg.drain_grace;
        info!("draining for up to {grace:?}");
        let cut = self.inputs.drain.shutdown(grace).await;
        self.servers.cancel();
        self.quit.cancel();
        info!(cut, "ztunnel stopped");
    }
}

/// Keep certificates of local workloads fetched ahead of their first connection, and drop
/// those of workloads that left this node.
async fn track_local_certificates(pi: Arc<ProxyInputs>, stop: CancellationToken) {
    let mut rx = pi.state.generation();
    let mut known = HashSet::new();
    loop {
        let current: HashSet<_> = {
            let st = pi.state.read();
            st.workloads()
                .filter(|w| pi.is_local(w))
                .map(|w| w.identity())
                .collect()
        };
        for id in current.difference(&known) {
            pi.certs.prefetch(id);
        }
        for id in known.difference(&current) {
            pi.certs.forget(id);
        }
        known = current;
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}
