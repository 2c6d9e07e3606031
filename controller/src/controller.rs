//! The controller, wired: source → [`ObjectStore`] → (debounced) translation →
//! [`ResourceCache`] → Delta ADS on 15010 (plaintext, local use) and 15012 (TLS, with the CA).
//!
//! Start-up order matters for clients reconnecting to a restarted controller: the source is
//! loaded and translated *before* the ports open, so a client presenting its
//! `initial_resource_versions` is compared against the complete state and receives only real
//! changes, never a burst of removals followed by re-adds. The admin and readiness servers
//! ([`crate::admin`]) open first, so a starting controller answers 503 rather than nothing.
//!
//! Files in the config directory besides the Kubernetes YAML:
//! - `nodes/<node>.token`: bootstrap tokens (see [`crate::ca`]);
//! - `ca/root-cert.pem`, `ca/root-key.pem`: the CA root, generated on first start when missing.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tracing::{error, info, warn};
use zmesh_core::ca::CertificateAuthority;
use zmesh_core::metrics::Metrics;
use zmesh_core::telemetry::LogHandle;

use crate::admin::{AdminServers, SourceKind, Status};
use crate::ca::{
    CaMetrics, CaOptions, CaService, CaSetupError, FileTokenAuthenticator, RootSource, TOKENS_DIR,
    TokenAuthenticator,
};
use crate::sources::file::FileSource;
use crate::store::{ObjectStore, Snapshot};
use crate::translate::incremental::{Incremental, Output};
use crate::translate::{TranslateOptions, Translated};
use crate::xds::cache::ResourceCache;
use crate::xds::server::{AdsMetrics, AdsOptions, AdsServer, tcp_incoming, tls_incoming};

/// A translation function (the real [`crate::translate::translate`] by default; tests may
/// substitute).
pub type Translator = Arc<dyn Fn(&Snapshot, &TranslateOptions) -> Translated + Send + Sync>;

/// Where and how the controller runs.
#[derive(Clone)]
pub struct ControllerConfig {
    /// Directory of Kubernetes YAML (file mode), bootstrap tokens and the CA root.
    pub config_dir: Option<PathBuf>,
    /// Watch `config_dir` with the file source (off: the store is fed by the embedder).
    pub file_source: bool,
    /// Plaintext ADS (Istio: 15010). Meant for local use; no CA here.
    pub xds_plaintext_addr: Option<SocketAddr>,
    /// TLS ADS + CA (Istio: 15012).
    pub xds_tls_addr: Option<SocketAddr>,
    /// Prometheus metrics (15014).
    pub metrics_addr: Option<SocketAddr>,
    /// Admin API (Istio: 15000; loopback only). Off by default in the library: embedders
    /// (tests, benchmarks, the demo) run several components in one network namespace; the
    /// binary's `--admin-addr` defaults to 127.0.0.1:15000.
    pub admin_addr: Option<SocketAddr>,
    /// `/healthz/ready` (Istio: 15021). Off by default in the library, as `admin_addr`; the
    /// binary's `--readiness-addr` defaults to 0.0.0.0:15021.
    pub readiness_addr: Option<SocketAddr>,
    /// Log filter control for the admin `/logging` (None: 501).
    pub logs: Option<LogHandle>,
    /// Trust domain of a newly generated root (a loaded root brings its own).
    pub trust_domain: String,
    /// Namespace the controller runs in (its identity: `ns/<namespace>/sa/zmesh-controller`).
    pub namespace: String,
    /// A CA root loaded by the embedder (Kubernetes: from a Secret); wins over the paths.
    pub root: Option<Arc<CertificateAuthority>>,
    /// Where `root` came from (admin view); default [`RootSource::Embedder`].
    pub root_source: Option<RootSource>,
    /// Default `<config_dir>/ca/root-cert.pem` and `root-key.pem`.
    pub root_cert: Option<PathBuf>,
    pub root_key: Option<PathBuf>,
    /// Store changes within this window are translated once; ADS pushes use it too.
    pub debounce: Duration,
    pub translate: TranslateOptions,
    pub ca: CaOptions,
    pub translator: Option<Translator>,
    /// Default: bootstrap tokens from `<config_dir>/nodes`.
    pub authenticator: Option<Arc<dyn TokenAuthenticator>>,
    /// Use this object store (an embedder that feeds objects itself, or a pre-loaded one)
    /// instead of a fresh one.
    pub store: Option<Arc<ObjectStore>>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            config_dir: None,
            file_source: true,
            xds_plaintext_addr: Some(([127, 0, 0, 1], 15010).into()),
            xds_tls_addr: Some(([0, 0, 0, 0], 15012).into()),
            metrics_addr: Some(([0, 0, 0, 0], 15014).into()),
            admin_addr: None,
            readiness_addr: None,
            logs: None,
            trust_domain: zmesh_core::identity::DEFAULT_TRUST_DOMAIN.into(),
            namespace: "istio-system".into(),
            root: None,
            root_source: None,
            root_cert: None,
            root_key: None,
            debounce: Duration::from_millis(100),
            translate: TranslateOptions::default(),
            ca: CaOptions::default(),
            translator: None,
            authenticator: None,
            store: None,
        }
    }
}

impl ControllerConfig {
    /// Every port on 127.0.0.1 with an OS-assigned number (tests, the loopback demo).
    pub fn loopback(config_dir: impl Into<PathBuf>) -> Self {
        let lo = SocketAddr::from(([127, 0, 0, 1], 0));
        ControllerConfig {
            config_dir: Some(config_dir.into()),
            xds_plaintext_addr: Some(lo),
            xds_tls_addr: Some(lo),
            metrics_addr: None,
            ..Default::default()
        }
    }
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Ca(#[from] CaSetupError),
    #[error(
        "plaintext xDS must listen on a loopback address, not {0}: it serves the whole mesh \
         configuration without TLS or authentication (remote proxies use the TLS port, 15012, \
         with tokens); give a 127.0.0.1 or [::1] address, or \"off\""
    )]
    PlaintextNotLoopback(SocketAddr),
    #[error(
        "the admin API must listen on a loopback address, not {0}: it dumps the mesh's \
         configuration and can stop the controller; give a 127.0.0.1 or [::1] address, or \
         \"off\""
    )]
    AdminNotLoopback(SocketAddr),
}

/// Where the controller's listeners bound.
#[derive(Clone, Debug, Default)]
pub struct ControllerAddrs {
    pub xds_plaintext: Option<SocketAddr>,
    pub xds_tls: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub readiness: Option<SocketAddr>,
}

/// A running controller.
pub struct Controller {
    pub addrs: ControllerAddrs,
    pub store: Arc<ObjectStore>,
    pub cache: Arc<ResourceCache>,
    pub ca: Arc<CertificateAuthority>,
    pub metrics: Arc<Metrics>,
    pub ads_metrics: Arc<AdsMetrics>,
    pub ca_metrics: Arc<CaMetrics>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    admin: AdminServers,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ControllerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ControllerError::Bind { what, addr, source })
}

/// Runs translation and feeds the cache; logs each translation error once while it persists.
struct TranslationLoop {
    store: Arc<ObjectStore>,
    cache: Arc<ResourceCache>,
    /// A substitute translator (always full), or None: the real one, incremental.
    translator: Option<Translator>,
    incremental: Incremental,
    opts: TranslateOptions,
    errors_gauge: Gauge,
    reported: BTreeSet<String>,
    /// `reported`, for the admin view.
    shared_errors: Arc<Mutex<BTreeSet<String>>>,
    /// Subscribed before the first snapshot, so no change slips between the two.
    rx: tokio::sync::watch::Receiver<u64>,
}

impl TranslationLoop {
    async fn translate_once(&mut self) {
        self.rx.mark_unchanged();
        let snap = self.store.snapshot();
        let o = self.opts.clone();
        let work: Box<dyn FnOnce() -> (Option<Incremental>, Output) + Send> = match &self.translator
        {
            Some(t) => {
                let t = t.clone();
                Box::new(move || (None, Output::Full(t(&snap, &o))))
            }
            None => {
                let mut inc = std::mem::take(&mut self.incremental);
                Box::new(move || {
                    let out = inc.translate(snap, &o);
                    (Some(inc), out)
                })
            }
        };
        // why: translation of a large cluster is CPU work; keep it off the async workers.
        let out = match tokio::task::spawn_blocking(work).await {
            Ok((inc, out)) => {
                if let Some(inc) = inc {
                    self.incremental = inc;
                }
                out
            }
            Err(e) => {
                // The incremental state went with the failed task: the next one is full.
                error!("translation failed (keeping the previous resources): {e}");
                return;
            }
        };
        let (errors, summary) = match out {
            Output::Full(t) => (t.errors, self.cache.update(t.resources)),
            Output::Addresses {
                upserts,
                removed,
                errors,
            } => (
                errors,
                self.cache
                    .apply(zmesh_proto::ADDRESS_TYPE_URL, upserts, removed),
            ),
        };
        let now: BTreeSet<String> = errors.iter().map(ToString::to_string).collect();
        for e in now.difference(&self.reported) {
            warn!("translation error: {e}");
        }
        for e in self.reported.difference(&now) {
            info!("translation error resolved: {e}");
        }
        self.errors_gauge.set(now.len() as i64);
        if now != self.reported {
            now.clone_into(
                &mut self
                    .shared_errors
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
        }
        self.reported = now;
        for (type_url, (upserted, removed)) in &summary.changed {
            info!(%type_url, upserted, removed, version = self.cache.version(type_url), "resources changed");
        }
    }

    /// Translates on change, at most once per `debounce` window: a change after a quiet
    /// window is translated at once (no added latency), later changes within the window wait
    /// for its end and are translated together.
    async fn run(mut self, debounce: Duration, stop: CancellationToken) {
        let mut last: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = self.rx.changed() => if r.is_err() { return },
            }
            if let Some(t) = last {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep_until(t + debounce) => {}
                }
            }
            last = Some(tokio::time::Instant::now());
            self.translate_once().await;
        }
    }
}

impl Controller {
    /// Open the admin and readiness ports, load, translate, then open the xDS ports. Returns
    /// once everything is bound.
    pub async fn start(cfg: ControllerConfig) -> Result<Controller, ControllerError> {
        let admin = AdminServers::start(&cfg).await?;
        Self::start_with(cfg, admin).await
    }

    /// [`start`](Self::start) with admin servers the embedder started earlier, so that what
    /// it does before (the Kubernetes source's first lists, the CA root Secret) is already
    /// visible on them. `cfg.admin_addr` and `cfg.readiness_addr` are not used here.
    pub async fn start_with(
        cfg: ControllerConfig,
        admin: AdminServers,
    ) -> Result<Controller, ControllerError> {
        if let Some(a) = cfg.xds_plaintext_addr
            && !a.ip().to_canonical().is_loopback()
        {
            return Err(ControllerError::PlaintextNotLoopback(a));
        }
        let status = admin.status.clone();
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let store = cfg.store.clone().unwrap_or_default();

        // CA root.
        let (ca, root_source) = match (&cfg.root, &cfg.root_cert, &cfg.root_key, &cfg.config_dir) {
            (Some(root), ..) => (
                root.clone(),
                cfg.root_source.clone().unwrap_or(RootSource::Embedder),
            ),
            (None, Some(c), Some(k), _) => {
                let (ca, source) = crate::ca::load_or_create_root(c, k, &cfg.trust_domain)?;
                (Arc::new(ca), source)
            }
            (None, c, k, Some(dir)) => {
                let c = c.clone().unwrap_or_else(|| dir.join("ca/root-cert.pem"));
                let k = k.clone().unwrap_or_else(|| dir.join("ca/root-key.pem"));
                let (ca, source) = crate::ca::load_or_create_root(&c, &k, &cfg.trust_domain)?;
                (Arc::new(ca), source)
            }
            _ => {
                warn!("no config directory or root paths: using an ephemeral CA root");
                let ca = CertificateAuthority::generate(&cfg.trust_domain)
                    .map_err(CaSetupError::from)?;
                (Arc::new(ca), RootSource::Generated { cert: None })
            }
        };
        status.ca_loaded(&ca, root_source);
        let mut topts = cfg.translate.clone();
        if ca.trust_domain() != cfg.trust_domain {
            info!(root = %ca.trust_domain(), configured = %cfg.trust_domain,
                "the CA root's trust domain is used");
        }
        topts.trust_domain = ca.trust_domain().to_string();

        // Metrics.
        let metrics = Metrics::new("zmesh-controller");
        let ads_metrics = Arc::new(AdsMetrics::default());
        let ca_metrics = Arc::new(CaMetrics::default());
        let errors_gauge = Gauge::default();
        metrics.with_registry(|r| {
            ads_metrics.register(r);
            ca_metrics.register(r);
            r.register(
                "zmesh_controller_translation_errors",
                "objects that currently fail to translate",
                errors_gauge.clone(),
            );
        });

        // Source: load once before translating, then watch.
        if let (Some(dir), true) = (&cfg.config_dir, cfg.file_source) {
            status.set_source(SourceKind::File { dir: dir.clone() });
            let source = FileSource::new(dir.clone());
            let errors = source.load_once(&store);
            for e in &errors {
                warn!("config: {e}");
            }
            status.set_file_errors(source.errors());
            track_file_sync(&status, &source, &errors, stop.clone());
            let (s, st) = (store.clone(), stop.clone());
            tasks.push(tokio::spawn(async move { source.run(s, st).await }));
        } else if status.source().is_none() {
            // The embedder filled the store before starting us.
            status.set_source(SourceKind::Embedded);
            status.source_synced();
        }

        // Translation: once now (complete state before any client connects), then on change.
        let cache = ResourceCache::new();
        let translation_errors = Arc::new(Mutex::new(BTreeSet::new()));
        let mut tl = TranslationLoop {
            shared_errors: translation_errors.clone(),
            rx: store.generation(),
            store: store.clone(),
            cache: cache.clone(),
            translator: cfg.translator.clone(),
            incremental: Incremental::default(),
            opts: topts,
            errors_gauge,
            reported: BTreeSet::new(),
        };
        tl.translate_once().await;
        tasks.push(tokio::spawn(tl.run(cfg.debounce, stop.clone())));

        // Servers.
        let ads = AdsServer::new(
            cache.clone(),
            AdsOptions {
                debounce: cfg.debounce,
                ..Default::default()
            },
            ads_metrics.clone(),
            stop.clone(),
        );
        let mut addrs = ControllerAddrs {
            admin: admin.admin,
            readiness: admin.readiness,
            ..ControllerAddrs::default()
        };
        let mut served_identity = None;
        let grpc = || {
            Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        };
        if let Some(addr) = cfg.xds_plaintext_addr {
            let l = bind("plaintext xDS", addr).await?;
            addrs.xds_plaintext = l.local_addr().ok();
            let router = grpc().add_service(ads.clone().into_service());
            let st = stop.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = router
                    .serve_with_incoming_shutdown(tcp_incoming(l), st.cancelled_owned())
                    .await
                {
                    error!("plaintext xDS server stopped: {e}");
                }
            }));
        }
        if let Some(addr) = cfg.xds_tls_addr {
            let identity = crate::ca::controller_identity(ca.trust_domain(), &cfg.namespace)?;
            let tls = crate::ca::server_tls_config(ca.clone(), identity.clone())?;
            let auth: Arc<dyn TokenAuthenticator> = match &cfg.authenticator {
                Some(a) => a.clone(),
                None => Arc::new(FileTokenAuthenticator::new(
                    cfg.config_dir.clone().unwrap_or_default().join(TOKENS_DIR),
                )),
            };
            let ca_svc = CaService::new(
                ca.clone(),
                auth.clone(),
                store.clone(),
                cfg.ca.clone(),
                ca_metrics.clone(),
            );
            let l = bind("TLS xDS/CA", addr).await?;
            addrs.xds_tls = l.local_addr().ok();
            served_identity = Some(identity.to_string());
            info!(%identity, addr = ?addrs.xds_tls, "TLS xDS and CA serving");
            let router = grpc()
                .add_service(ads.clone().with_authenticator(auth).into_service())
                .add_service(ca_svc.into_service());
            let st = stop.clone();
            tasks.push(tokio::spawn(async move {
                let incoming = tls_incoming(l, tls, st.clone());
                if let Err(e) = router
                    .serve_with_incoming_shutdown(incoming, st.cancelled_owned())
                    .await
                {
                    error!("TLS xDS/CA server stopped: {e}");
                }
            }));
        }
        if let Some(addr) = cfg.metrics_addr {
            let l = bind("metrics", addr).await?;
            addrs.metrics = l.local_addr().ok();
            let (m, st) = (metrics.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = zmesh_core::admin::serve_metrics(l, m, st).await {
                    error!("metrics server stopped: {e}");
                }
            }));
        }
        // why: every client's initial push encodes the whole state (megabytes at 10k pods);
        // glibc keeps that freed heap in its arenas for good unless asked to hand it back.
        let st = stop.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = st.cancelled() => {}
                _ = zmesh_core::process::trim_free_memory_every(Duration::from_secs(1)) => {}
            }
        }));
        status.serving(
            cache.clone(),
            ads,
            addrs.clone(),
            served_identity,
            translation_errors,
        );
        info!(?addrs, trust_domain = %ca.trust_domain(), "controller started");
        Ok(Controller {
            addrs,
            store,
            cache,
            ca,
            metrics,
            ads_metrics,
            ca_metrics,
            stop,
            tasks,
            admin,
        })
    }

    /// Stop everything: ADS streams end with `Unavailable` (clients reconnect elsewhere or
    /// later), ports close. Waits up to 5 s, then aborts what is left.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.admin.stop();
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        info!("controller stopped");
    }

    /// Token cancelled by [`Controller::shutdown`].
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Token cancelled by the admin `POST /quitquitquit`: the embedder should then call
    /// [`Controller::shutdown`] (the binary does, as on SIGTERM).
    pub fn quit_token(&self) -> CancellationToken {
        self.admin.quit.clone()
    }

    /// What the admin and readiness servers show.
    pub fn status(&self) -> &Arc<Status> {
        &self.admin.status
    }
}

/// File mode: the first load counts as the sync unless the directory itself could not be
/// read (then nothing was loaded); in that case the first later load that reads it does.
fn track_file_sync(
    status: &Arc<Status>,
    source: &FileSource,
    first: &[crate::sources::file::SourceError],
    stop: CancellationToken,
) {
    let dir = source.dir().to_path_buf();
    let unreadable = move |errors: &[crate::sources::file::SourceError]| {
        errors.iter().any(|e| e.document.is_none() && e.file == dir)
    };
    if !unreadable(first) {
        status.source_synced();
        return;
    }
    let (status, mut rx) = (status.clone(), source.errors());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
            if !unreadable(&rx.borrow_and_update()) {
                status.source_synced();
                return;
            }
        }
    });
}
