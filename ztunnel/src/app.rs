//! Wiring: binds the listeners, starts the config source, certificate manager, data-path
//! workers and admin servers, and shuts them down in order.
//!
//! Threads (Envoy's model, [`zmesh_core::worker`]): [`Ztunnel::start`] runs on the control
//! runtime (the caller's) and leaves there the config source, certificate fetches, the
//! connection manager, eBPF redirection and the admin/metrics/readiness servers. The data path
//! runs on `cfg.workers` worker threads, each with a current-thread runtime, its own
//! `SO_REUSEPORT` listeners on 15001/15006/15008/15080 and its own HBONE [`Pool`]; state,
//! certificates, metrics and drain are shared ([`ProxyInputs`]).

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
use zmesh_core::worker::{self, WorkerError, WorkerThread};

use crate::config::{Config, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, SOCKS5_PORT};
use crate::proxy::connection_manager::ConnectionManager;
use crate::proxy::inbound::Inbound;
use crate::proxy::{ProxyInputs, inbound_passthrough, outbound, socks5};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
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
    workers: Vec<Worker>,
    /// Cancelled once draining is over (or the `Ztunnel` is dropped): each worker's runtime
    /// then stops, dropping what is left on it (idle pooled connections), and its thread ends.
    stop_workers: CancellationToken,
}

/// A data-path worker, as the control runtime sees it.
struct Worker {
    thread: WorkerThread,
    /// The worker's HBONE pool (for stats; only the worker connects through it).
    pool: Pool,
}

/// One worker's data-path listeners, bound but not yet adopted by its runtime.
struct WorkerListeners {
    hbone: std::net::TcpListener,
    outbound: Option<std::net::TcpListener>,
    inbound_plaintext: Option<std::net::TcpListener>,
    socks5: Option<std::net::TcpListener>,
}

struct Dump {
    pi: Arc<ProxyInputs>,
    addrs: BoundAddrs,
    pools: Vec<Pool>,
    redirect: Option<crate::redirect::StatusHandle>,
}

impl AdminHandler for Dump {
    fn config_dump(&self) -> serde_json::Value {
        let cfg = &self.pi.cfg;
        let workers: Vec<_> = self
            .pools
            .iter()
            .enumerate()
            .map(|(i, p)| {
                serde_json::json!({
                    "index": i,
                    "hbone_pool_connections": p.connections(),
                    "hbone_pool_opened_total": p.opened_total(),
                })
            })
            .collect();
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
            "hbone_pool_connections": self.pools.iter().map(Pool::connections).sum::<usize>(),
            "workers": workers,
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

/// The data-path listeners of `n` workers: each port bound `n` times with `SO_REUSEPORT`
/// (port 0: the first socket picks it, the others share it).
fn bind_workers(cfg: &Config, n: usize) -> Result<Vec<WorkerListeners>, AppError> {
    let each = |addr: Option<SocketAddr>, transparent: bool| match addr {
        Some(a) => worker::reuseport_listeners(a, n, transparent)
            .map(|ls| ls.into_iter().map(Some).collect::<Vec<_>>()),
        None => Ok((0..n).map(|_| None).collect()),
    };
    let hbone = worker::reuseport_listeners(cfg.hbone_addr, n, cfg.transparent)?;
    let outbound = each(cfg.outbound_addr, cfg.transparent)?;
    let inbound_plaintext = each(cfg.inbound_plaintext_addr, cfg.transparent)?;
    // Loopback only, never a capture target: not transparent.
    let socks5 = each(cfg.socks5_addr, false)?;
    Ok(hbone
        .into_iter()
        .zip(outbound)
        .zip(inbound_plaintext)
        .zip(socks5)
        .map(
            |(((hbone, outbound), inbound_plaintext), socks5)| WorkerListeners {
                hbone,
                outbound,
                inbound_plaintext,
                socks5,
            },
        )
        .collect())
}

/// Start data-path worker `index` on `listeners` with its own HBONE pool; it serves until
/// `stop` is cancelled (after draining).
async fn start_worker(
    index: usize,
    listeners: WorkerListeners,
    pi: Arc<ProxyInputs>,
    stop: CancellationToken,
) -> Result<Worker, WorkerError> {
    let (thread, pool) = worker::spawn("ztunnel", index, move || {
        let cfg = &pi.cfg;
        // Created on the worker: its reaper and its connections' driver tasks run here, so a
        // tunnelled connection and the HBONE connection carrying it share one thread.
        let pool = Pool::new(
            cfg.h2.clone(),
            PoolOptions {
                keep_source_address: cfg.keep_source_address,
                mark: Some(socket::PROXY_MARK),
            },
            pi.certs.clone(),
        );
        let adopt = |l: Option<std::net::TcpListener>| l.map(TcpListener::from_std).transpose();
        let hbone = TcpListener::from_std(listeners.hbone)?;
        let outbound_l = adopt(listeners.outbound)?;
        let inbound_l = adopt(listeners.inbound_plaintext)?;
        let socks_l = adopt(listeners.socks5)?;
        // Accept loops end when draining starts; the connections they spawned are tracked
        // by the shared drain.
        let inbound: Arc<dyn server::ConnectHandler> = Arc::new(Inbound { pi: pi.clone() });
        tokio::spawn(server::serve(
            hbone,
            cfg.h2.clone(),
            inbound,
            pi.drain.clone(),
        ));
        if let Some(l) = outbound_l {
            tokio::spawn(outbound::serve(pi.clone(), pool.clone(), l));
        }
        if let Some(l) = inbound_l {
            tokio::spawn(inbound_passthrough::serve(pi.clone(), l));
        }
        if let Some(l) = socks_l {
            tokio::spawn(socks5::serve(pi.clone(), pool.clone(), l));
        }
        // Keep the runtime (and the connections it drives) until draining is over.
        Ok((pool, stop.cancelled_owned()))
    })
    .await?;
    Ok(Worker { thread, pool })
}

impl Ztunnel {
    /// Bind everything and start serving: the data path on `cfg.workers` worker threads, the
    /// rest on the caller's runtime. Returns once listeners are bound and the workers run;
    /// readiness follows when the config source has synced.
    pub async fn start(
        cfg: Config,
        mut source: Box<dyn ConfigSource>,
        ca: Arc<dyn CertificateProvider>,
        logs: Option<LogHandle>,
    ) -> Result<Ztunnel, AppError> {
        let readiness = Readiness::new();
        let config_ready = readiness.register("config");
        let metrics = Metrics::new("ztunnel");
        // The xDS client's `istio_xds_*` (nothing for a local file), as Istio registers them.
        source.register_metrics(&metrics);
        let state = StateStore::new();
        // Created here, on the control runtime: certificate fetches and renewals run here
        // whichever worker first asks.
        let certs = CertificateManager::new(ca, cfg.cert_lifetime);
        let drain = Drain::new();
        let servers = CancellationToken::new();
        let quit = CancellationToken::new();
        let stop_workers = CancellationToken::new();

        let n_workers = cfg.workers.max(1);
        let worker_listeners = bind_workers(&cfg, n_workers)?;
        let admin_l = bind_opt(cfg.admin_addr, false).await?;
        let metrics_l = bind_opt(cfg.metrics_addr, false).await?;
        let ready_l = bind_opt(cfg.readiness_addr, false).await?;
        let local = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
        let local_std = |l: Option<&std::net::TcpListener>| l.and_then(|l| l.local_addr().ok());
        let first = worker_listeners.first();
        let addrs = BoundAddrs {
            outbound: local_std(first.and_then(|w| w.outbound.as_ref())),
            inbound_plaintext: local_std(first.and_then(|w| w.inbound_plaintext.as_ref())),
            hbone: local_std(first.map(|w| &w.hbone)),
            socks5: local_std(first.and_then(|w| w.socks5.as_ref())),
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
            metrics: metrics.clone(),
            drain: drain.clone(),
            connections: ConnectionManager::new(),
            illegal_ports: illegal.into_iter().collect(),
        });

        // Data plane.
        let mut workers = Vec::with_capacity(n_workers);
        for (index, listeners) in worker_listeners.into_iter().enumerate() {
            match start_worker(index, listeners, pi.clone(), stop_workers.clone()).await {
                Ok(w) => workers.push(w),
                Err(e) => {
                    // The workers already started end with these (nothing was accepted yet).
                    drain.stopping().cancel();
                    stop_workers.cancel();
                    return Err(e.into());
                }
            }
        }

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
                pools: workers.iter().map(|w| w.pool.clone()).collect(),
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
        info!(node = %cfg.node, workers = n_workers, ?addrs, "ztunnel started");
        Ok(Ztunnel {
            addrs,
            inputs: pi,
            readiness,
            quit,
            servers,
            workers,
            stop_workers,
        })
    }

    pub fn state(&self) -> &Arc<StateStore> {
        &self.inputs.state
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inputs.metrics
    }

    /// Each worker's HBONE pool, in worker order.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.workers.iter().map(|w| &w.pool)
    }

    /// Live pooled HBONE connections, all workers.
    pub fn pool_connections(&self) -> usize {
        self.pools().map(Pool::connections).sum()
    }

    /// HBONE connections opened since start, all workers.
    pub fn pool_opened_total(&self) -> u64 {
        self.pools().map(Pool::opened_total).sum()
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

    /// Stop accepting (every worker), give live connections `cfg.drain_grace` to finish, then
    /// stop the workers, wait for their threads, and stop everything else.
    pub async fn shutdown(mut self) {
        let grace = self.inputs.cfg.drain_grace;
        info!("draining for up to {grace:?}");
        let cut = self.inputs.drain.shutdown(grace).await;
        // No listener accepts any more and the connection tasks have ended (or were cut):
        // what the workers' runtimes still hold (idle pooled connections) can go.
        self.stop_workers.cancel();
        for w in std::mem::take(&mut self.workers) {
            w.thread.join().await;
        }
        self.servers.cancel();
        self.quit.cancel();
        info!(cut, "ztunnel stopped");
    }
}

impl Drop for Ztunnel {
    /// Dropped without [`Ztunnel::shutdown`] (tests): stop the workers rather than leave
    /// their threads serving; not joined.
    fn drop(&mut self) {
        self.stop_workers.cancel();
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
