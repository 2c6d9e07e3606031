//! The controller's admin (15000, loopback only: `/config_dump`, `/logging`, `/quitquitquit`)
//! and readiness (15021: `/healthz/ready`, `/healthz/live`) servers, on
//! [`zmesh_core::admin`] as in ztunnel and the waypoint.
//!
//! [`AdminServers::start`] runs before anything slow (the Kubernetes source's first lists, the
//! CA root Secret), so a controller that is still starting answers 503 and shows why, instead
//! of refusing connections. `/healthz/ready` passes once three things are done:
//!
//! | blocker | released when |
//! |---|---|
//! | [`SOURCE_SYNC`] | the config source's first full load: the file source's first read of the directory, or every watched Kubernetes kind listed once ([`Status::track_kube_sync`]) |
//! | [`CA`] | the CA root is loaded (files, Secret) or generated |
//! | [`XDS_LISTENERS`] | the first translation is in the cache and the xDS (and metrics) ports are bound |
//!
//! `/quitquitquit` cancels [`AdminServers::quit`]; the binary treats it as SIGTERM.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use zmesh_core::admin::{self, AdminHandler, Readiness, ReadyBlocker};
use zmesh_core::ca::CertificateAuthority;
use zmesh_core::certs::rfc3339;
use zmesh_core::telemetry::LogHandle;

use crate::ca::RootSource;
use crate::controller::{ControllerAddrs, ControllerConfig, ControllerError};
use crate::sources::file::SourceError;
use crate::xds::cache::ResourceCache;
use crate::xds::server::AdsServer;

/// Readiness blocker: the config source's first full sync.
pub const SOURCE_SYNC: &str = "config-sync";
/// Readiness blocker: the CA root.
pub const CA: &str = "ca";
/// Readiness blocker: first translation done and xDS listeners bound.
pub const XDS_LISTENERS: &str = "xds-listeners";

/// What feeds the controller's object store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceKind {
    /// A directory of Kubernetes YAML, polled.
    File { dir: PathBuf },
    /// Watches of the API server.
    Kubernetes,
    /// The embedding program fills the store itself (tests, benchmarks): synced once the
    /// controller starts.
    Embedded,
}

/// The CA root, as shown by `/config_dump`.
#[derive(Clone, Debug, Serialize)]
pub struct CaInfo {
    pub trust_domain: String,
    pub source: RootSource,
    /// SHA-256 of the root certificate's DER, hex pairs separated by `:` (as `openssl x509
    /// -fingerprint -sha256` prints it), to compare with the bundle a proxy was given.
    pub root_sha256_fingerprint: String,
    pub subject: Option<String>,
    pub serial: Option<String>,
    /// RFC 3339.
    pub not_before: Option<String>,
    pub not_after: Option<String>,
}

impl CaInfo {
    pub fn of(ca: &CertificateAuthority, source: RootSource) -> CaInfo {
        let der = ca.root_der();
        let fingerprint = Sha256::digest(der.as_ref())
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        let parsed = x509_parser::parse_x509_certificate(der.as_ref()).ok();
        let time = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            let at = if secs >= 0 {
                SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs.unsigned_abs())
            } else {
                SystemTime::UNIX_EPOCH - std::time::Duration::from_secs(secs.unsigned_abs())
            };
            rfc3339(at)
        };
        CaInfo {
            trust_domain: ca.trust_domain().to_string(),
            source,
            root_sha256_fingerprint: fingerprint,
            subject: parsed.as_ref().map(|(_, c)| c.subject().to_string()),
            serial: parsed.as_ref().map(|(_, c)| c.raw_serial_as_string()),
            not_before: parsed.as_ref().map(|(_, c)| time(c.validity().not_before)),
            not_after: parsed.as_ref().map(|(_, c)| time(c.validity().not_after)),
        }
    }
}

/// What is served, once the controller runs.
struct Serving {
    cache: Arc<ResourceCache>,
    ads: AdsServer,
    addrs: ControllerAddrs,
    identity: Option<String>,
    translation_errors: Arc<Mutex<BTreeSet<String>>>,
}

#[derive(Default)]
struct Inner {
    source: Option<SourceKind>,
    synced_at: Option<String>,
    source_blocker: Option<ReadyBlocker>,
    /// Kubernetes: kinds not listed yet.
    pending_kinds: Option<watch::Receiver<BTreeSet<&'static str>>>,
    /// File mode: problems of the latest load.
    file_errors: Option<watch::Receiver<Vec<SourceError>>>,
    ca: Option<CaInfo>,
    ca_blocker: Option<ReadyBlocker>,
    serving: Option<Serving>,
    listeners_blocker: Option<ReadyBlocker>,
    admin_addrs: (Option<SocketAddr>, Option<SocketAddr>),
}

/// The controller's state as the admin and readiness servers see it; filled in as the
/// controller starts.
pub struct Status {
    readiness: Arc<Readiness>,
    inner: Mutex<Inner>,
}

impl Status {
    /// A status with all three readiness blockers pending.
    pub fn new() -> Arc<Status> {
        let readiness = Readiness::new();
        let inner = Inner {
            source_blocker: Some(readiness.register(SOURCE_SYNC)),
            ca_blocker: Some(readiness.register(CA)),
            listeners_blocker: Some(readiness.register(XDS_LISTENERS)),
            ..Inner::default()
        };
        Arc::new(Status {
            readiness,
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn readiness(&self) -> &Arc<Readiness> {
        &self.readiness
    }

    pub fn source(&self) -> Option<SourceKind> {
        self.lock().source.clone()
    }

    pub fn set_source(&self, kind: SourceKind) {
        self.lock().source = Some(kind);
    }

    pub(crate) fn set_file_errors(&self, errors: watch::Receiver<Vec<SourceError>>) {
        self.lock().file_errors = Some(errors);
    }

    /// The source's first full sync is done (idempotent).
    pub fn source_synced(&self) {
        let mut inner = self.lock();
        if let Some(b) = inner.source_blocker.take() {
            inner.synced_at = Some(rfc3339(SystemTime::now()));
            info!(source = ?inner.source, "config source synced");
            b.ready();
        }
    }

    pub fn is_synced(&self) -> bool {
        self.lock().synced_at.is_some()
    }

    /// Kubernetes mode: shows `pending` in `/config_dump` and releases [`SOURCE_SYNC`] once it
    /// is empty (every kind listed once). No deadline: a kind that cannot be listed keeps the
    /// controller unready, since it would serve an incomplete mesh.
    pub fn track_kube_sync(
        self: &Arc<Self>,
        mut pending: watch::Receiver<BTreeSet<&'static str>>,
        stop: CancellationToken,
    ) {
        {
            let mut inner = self.lock();
            inner.source = Some(SourceKind::Kubernetes);
            inner.pending_kinds = Some(pending.clone());
        }
        let status = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                r = pending.wait_for(BTreeSet::is_empty) => if r.is_ok() { status.source_synced() },
            }
        });
    }

    /// The CA root is in place.
    pub fn ca_loaded(&self, ca: &CertificateAuthority, source: RootSource) {
        let info = CaInfo::of(ca, source);
        let mut inner = self.lock();
        inner.ca = Some(info);
        if let Some(b) = inner.ca_blocker.take() {
            b.ready();
        }
    }

    /// The first translation is cached and the listeners are bound.
    pub(crate) fn serving(
        &self,
        cache: Arc<ResourceCache>,
        ads: AdsServer,
        addrs: ControllerAddrs,
        identity: Option<String>,
        translation_errors: Arc<Mutex<BTreeSet<String>>>,
    ) {
        let mut inner = self.lock();
        inner.serving = Some(Serving {
            cache,
            ads,
            addrs,
            identity,
            translation_errors,
        });
        if let Some(b) = inner.listeners_blocker.take() {
            b.ready();
        }
    }

    /// Per type URL served (with no resources yet too): version, count, names and versions.
    fn resources(cache: &ResourceCache, served: &[String]) -> Value {
        let mut types = cache.versions();
        for t in served {
            types.entry(t.clone()).or_insert(0);
        }
        let mut out = serde_json::Map::new();
        for (type_url, version) in types {
            let (_, snap) = cache.snapshot(&type_url);
            // why names and versions only: a platform engineer compares them with what a proxy
            // holds; the content is in the proxy's own dump, and here it would be megabytes.
            let resources: Vec<Value> = snap
                .iter()
                .map(|(name, r)| json!({"name": &**name, "version": &*r.version}))
                .collect();
            out.insert(
                type_url,
                json!({"version": version, "count": resources.len(), "resources": resources}),
            );
        }
        Value::Object(out)
    }
}

impl AdminHandler for Status {
    fn config_dump(&self) -> Value {
        let pending = self.readiness.pending();
        let inner = self.lock();
        // {"kind": "file", "dir": ..., "synced": ...}: the kind's fields and the sync state.
        let mut source = serde_json::to_value(&inner.source).unwrap_or(Value::Null);
        if !source.is_object() {
            source = json!({"kind": null});
        }
        if let Some(obj) = source.as_object_mut() {
            obj.insert("synced".into(), json!(inner.synced_at.is_some()));
            obj.insert("synced_at".into(), json!(inner.synced_at));
            if let Some(p) = &inner.pending_kinds {
                let kinds: Vec<&str> = p.borrow().iter().copied().collect();
                obj.insert("pending_kinds".into(), json!(kinds));
            }
            if let Some(e) = &inner.file_errors {
                let errors: Vec<String> = e.borrow().iter().map(ToString::to_string).collect();
                obj.insert("errors".into(), json!(errors));
            }
        }
        let (admin, readiness) = inner.admin_addrs;
        let serving = inner.serving.as_ref();
        let addrs = serving.map(|s| s.addrs.clone()).unwrap_or_default();
        json!({
            "component": "zmesh-controller",
            "ready": pending.is_empty(),
            "not_ready": pending,
            "source": source,
            "ca": inner.ca,
            "identity": serving.and_then(|s| s.identity.clone()),
            "listeners": {
                "xds_plaintext": addrs.xds_plaintext,
                "xds_tls": addrs.xds_tls,
                "metrics": addrs.metrics,
                "admin": admin,
                "readiness": readiness,
            },
            "translation_errors": serving.map(|s| s.translation_errors.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect::<Vec<_>>()),
            "resources": serving.map(|s| Self::resources(&s.cache, s.ads.served_types())),
            "clients": serving.map(|s| s.ads.clients()),
        })
    }
}

/// The admin and readiness servers of one controller.
pub struct AdminServers {
    pub status: Arc<Status>,
    pub admin: Option<SocketAddr>,
    pub readiness: Option<SocketAddr>,
    /// Cancelled by `POST /quitquitquit`.
    pub quit: CancellationToken,
    /// Stops both servers.
    servers: CancellationToken,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ControllerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ControllerError::Bind { what, addr, source })
}

impl AdminServers {
    /// Bind and serve `cfg.admin_addr` and `cfg.readiness_addr` (either may be off). The
    /// admin address must be loopback: it can dump the mesh's configuration and stop the
    /// controller.
    pub async fn start(cfg: &ControllerConfig) -> Result<AdminServers, ControllerError> {
        if let Some(a) = cfg.admin_addr
            && !a.ip().to_canonical().is_loopback()
        {
            return Err(ControllerError::AdminNotLoopback(a));
        }
        let status = Status::new();
        let quit = CancellationToken::new();
        let servers = CancellationToken::new();
        let mut addrs = (None, None);
        if let Some(addr) = cfg.admin_addr {
            let l = bind("admin", addr).await?;
            addrs.0 = l.local_addr().ok();
            let handler: Arc<dyn AdminHandler> = status.clone();
            let (logs, q, s): (Option<LogHandle>, _, _) =
                (cfg.logs.clone(), quit.clone(), servers.clone());
            tokio::spawn(async move {
                let serve = admin::serve_admin(l, handler, logs, q);
                tokio::select! {
                    _ = s.cancelled() => {}
                    r = serve => if let Err(e) = r { error!("admin server stopped: {e}") },
                }
            });
        }
        if let Some(addr) = cfg.readiness_addr {
            let l = bind("readiness", addr).await?;
            addrs.1 = l.local_addr().ok();
            let (r, s) = (status.readiness.clone(), servers.clone());
            tokio::spawn(async move {
                if let Err(e) = admin::serve_readiness(l, r, s).await {
                    error!("readiness server stopped: {e}");
                }
            });
        }
        status.lock().admin_addrs = addrs;
        Ok(AdminServers {
            status,
            admin: addrs.0,
            readiness: addrs.1,
            quit,
            servers,
        })
    }

    /// Stop both servers.
    pub fn stop(&self) {
        self.servers.cancel();
    }
}

impl Drop for AdminServers {
    fn drop(&mut self) {
        // why: an embedder that gives up before the controller starts must not leave the
        // ports open.
        self.servers.cancel();
    }
}
