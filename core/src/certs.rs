//! Workload certificates and their life cycle.
//!
//! * [`WorkloadCertificate`]: one identity's key, chain and trust bundle, plus the rustls
//!   configurations built from them (cached, see [`crate::tls`]).
//! * [`CertificateProvider`]: where certificates come from (the in-process CA today, the
//!   controller's CA service later).
//! * [`CertificateManager`]: per-identity cache with single-flight first fetch and background
//!   renewal at half-life. Renewal swaps an `Arc`, so live TLS sessions are never disturbed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::ca::{CertificateAuthority, generate_csr};
use crate::identity::Identity;

/// A workload's certificate: private key, chain (leaf first) and trust bundle.
///
/// The fields are public for inspection (and for tests that extend `roots`); rustls configs are
/// cached on first use, so changes made after `server_config()`/`client_config()` are not seen.
#[derive(Debug)]
pub struct WorkloadCertificate {
    pub identity: Identity,
    /// Leaf first, intermediates after (never the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Trust bundle peers are verified against.
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    serial: Vec<u8>,
    /// rustls configs built from this certificate (built once, see `tls.rs`).
    pub(crate) tls: crate::tls::ConfigCache,
}

/// Why a certificate could not be obtained or accepted.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(
        "certificate for {identity}: CA response is empty (expected PEM chain: leaf first, root bundle last)"
    )]
    EmptyChain { identity: Identity },
    #[error(
        "certificate for {identity}: CA response has a single element; expected leaf first and the root bundle last"
    )]
    NoRoots { identity: Identity },
    #[error("certificate for {identity}: invalid PEM in CA response element {index}: {reason}")]
    BadPem {
        identity: Identity,
        index: usize,
        reason: String,
    },
    #[error("certificate for {identity}: cannot parse the leaf certificate: {reason}")]
    BadLeaf { identity: Identity, reason: String },
    #[error(
        "certificate for {identity}: leaf certificate carries URI SANs {presented:?}, none equal to the requested identity"
    )]
    IdentityMismatch {
        identity: Identity,
        presented: Vec<String>,
    },
    #[error(
        "certificate for {identity}: leaf certificate does not match our private key: {reason}"
    )]
    KeyMismatch { identity: Identity, reason: String },
    #[error("certificate for {identity}: cannot create a key and CSR: {reason}")]
    Csr { identity: Identity, reason: String },
    #[error("certificate for {identity}: the CA did not sign our CSR: {source}")]
    Provider {
        identity: Identity,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "certificate for {identity} expired at {not_after} and renewal has not succeeded yet (last error: {last_error})"
    )]
    Expired {
        identity: Identity,
        not_after: String,
        last_error: String,
    },
    #[error("certificate for {identity} is unavailable: {reason}")]
    Unavailable { identity: Identity, reason: String },
    #[error(
        "certificate for {identity}: no tokio runtime to run the certificate fetcher on (called outside a runtime)"
    )]
    NoRuntime { identity: Identity },
}

impl WorkloadCertificate {
    /// Build from a CA response: PEM chain (leaf first, last element = root bundle, possibly
    /// holding several roots) and our private key. Checks the leaf's URI SAN equals `identity`
    /// and that the leaf matches `key`.
    pub fn from_pem_chain(
        identity: Identity,
        chain_pem: &[String],
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, CertError> {
        let Some((bundle, certs)) = chain_pem.split_last() else {
            return Err(CertError::EmptyChain { identity });
        };
        if certs.is_empty() {
            return Err(CertError::NoRoots { identity });
        }
        let mut chain = Vec::new();
        for (index, pem) in certs.iter().enumerate() {
            chain.extend(parse_pem_certs(&identity, index, pem)?);
        }
        let roots = parse_pem_certs(&identity, chain_pem.len() - 1, bundle)?;
        Self::from_parts(identity, chain, key, roots)
    }

    /// Build from DER parts (chain leaf first, trust bundle separately). Same checks as
    /// [`Self::from_pem_chain`].
    pub fn from_parts(
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CertError> {
        let Some(leaf) = chain.first() else {
            return Err(CertError::EmptyChain { identity });
        };
        let (not_before, not_after, serial, sans) = {
            let (_, x509) =
                x509_parser::parse_x509_certificate(leaf).map_err(|e| CertError::BadLeaf {
                    identity: identity.clone(),
                    reason: e.to_string(),
                })?;
            let validity = x509.validity();
            (
                asn1_to_system(validity.not_before.timestamp()),
                asn1_to_system(validity.not_after.timestamp()),
                x509.raw_serial().to_vec(),
                crate::tls::uri_sans(leaf),
            )
        };
        let wanted = identity.to_string();
        if !sans.contains(&wanted) {
            return Err(CertError::IdentityMismatch {
                identity,
                presented: sans,
            });
        }
        // why: a CA answering with someone else's certificate would only fail later, at every handshake.
        if let Err(e) = rustls::sign::CertifiedKey::from_der(
            chain.clone(),
            key.clone_key(),
            &crate::tls::provider(),
        ) {
            return Err(CertError::KeyMismatch {
                identity,
                reason: e.to_string(),
            });
        }
        Ok(WorkloadCertificate {
            identity,
            chain,
            key,
            roots,
            not_before,
            not_after,
            serial,
            tls: Default::default(),
        })
    }

    pub fn is_expired(&self) -> bool {
        SystemTime::now() >= self.not_after
    }

    /// Half-life: `not_before + (not_after - not_before) / 2`.
    pub fn refresh_at(&self) -> SystemTime {
        let total = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + total / 2
    }

    /// Leaf serial number, lowercase hex.
    pub fn serial_hex(&self) -> String {
        self.serial.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn parse_pem_certs(
    identity: &Identity,
    index: usize,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::BadPem {
            identity: identity.clone(),
            index,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::BadPem {
            identity: identity.clone(),
            index,
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn asn1_to_system(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    }
}

/// RFC 3339 in UTC with second precision (`2025-01-31T12:00:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

/// Where certificates come from: the in-process CA now, the controller's CA gRPC service later.
#[async_trait::async_trait]
pub trait CertificateProvider: Send + Sync + 'static {
    /// Sign `csr_pem` for `identity`, returning the PEM chain (leaf first, last = roots).
    async fn sign(
        &self,
        identity: &Identity,
        csr_pem: String,
        lifetime: Duration,
    ) -> Result<Vec<String>, CertError>;
}

/// A [`CertificateProvider`] backed by a CA held in this process.
pub struct InProcessCa(pub Arc<CertificateAuthority>);

#[async_trait::async_trait]
impl CertificateProvider for InProcessCa {
    async fn sign(
        &self,
        identity: &Identity,
        csr_pem: String,
        lifetime: Duration,
    ) -> Result<Vec<String>, CertError> {
        self.0
            .sign_csr(&csr_pem, identity, lifetime)
            .map_err(|e| CertError::Provider {
                identity: identity.clone(),
                source: Box::new(e),
            })
    }
}

/// Tuning of [`CertificateManager`].
#[derive(Clone, Debug)]
pub struct ManagerOptions {
    /// Requested certificate lifetime.
    pub lifetime: Duration,
    /// Fraction of the usable validity after which to renew (0.5 = half-life, as Istio).
    pub renew_fraction: f64,
    /// Never renew sooner than this after an issuance (guards against CAs issuing
    /// certificates shorter than requested: no request storm).
    pub min_renew_interval: Duration,
    /// First retry delay after a failed request; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            lifetime: Duration::from_secs(24 * 3600),
            renew_fraction: 0.5,
            min_renew_interval: Duration::from_millis(500),
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }
}

#[derive(Clone)]
enum CertState {
    /// First request in flight.
    Initializing,
    /// A certificate is being served; `renewal_error` is set while renewals fail.
    Available {
        cert: Arc<WorkloadCertificate>,
        renewal_error: Option<String>,
    },
    /// No certificate was ever obtained; retrying in the background.
    Failed { error: String },
}

struct Slot {
    rx: watch::Receiver<CertState>,
    task: AbortHandle,
}

/// Per-identity certificate cache with background renewal. The fetchers run on the runtime
/// that created the manager (else on the caller's, when created outside a runtime).
pub struct CertificateManager {
    provider: Arc<dyn CertificateProvider>,
    options: ManagerOptions,
    slots: RwLock<HashMap<Identity, Slot>>,
    rotations: Arc<AtomicU64>,
    /// Where fetchers run: the runtime that created the manager (a proxy's control runtime).
    /// A first fetch may come from a data-path worker; its fetcher (and the renewals after
    /// it) must not live and die with that worker, and CA calls belong off the data threads.
    runtime: Option<tokio::runtime::Handle>,
}

impl CertificateManager {
    pub fn new(provider: Arc<dyn CertificateProvider>, lifetime: Duration) -> Arc<Self> {
        Self::with_options(
            provider,
            ManagerOptions {
                lifetime,
                ..Default::default()
            },
        )
    }

    pub fn with_options(
        provider: Arc<dyn CertificateProvider>,
        options: ManagerOptions,
    ) -> Arc<Self> {
        Arc::new(CertificateManager {
            provider,
            options,
            slots: RwLock::new(HashMap::new()),
            rotations: Arc::new(AtomicU64::new(0)),
            runtime: tokio::runtime::Handle::try_current().ok(),
        })
    }

    /// Cached certificate for `id`. The first call starts a background fetcher (one per
    /// identity, so concurrent first calls make one request) and waits for its first answer;
    /// later calls are a read lock and an `Arc` clone.
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCertificate>, CertError> {
        let mut rx = {
            let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
            match slots.get(id) {
                Some(slot) => {
                    if let Some(done) = resolve(id, &slot.rx.borrow()) {
                        return done;
                    }
                    slot.rx.clone()
                }
                None => {
                    drop(slots);
                    self.ensure_slot(id)?
                }
            }
        };
        let state = rx
            .wait_for(|s| !matches!(s, CertState::Initializing))
            .await
            .map_err(|_| CertError::Unavailable {
                identity: id.clone(),
                reason: "certificate fetcher stopped (identity forgotten or manager shut down)"
                    .into(),
            })?;
        resolve(id, &state).unwrap_or_else(|| {
            Err(CertError::Unavailable {
                identity: id.clone(),
                reason: "still initializing".into(),
            })
        })
    }

    /// Start fetching in the background (used when a local workload appears).
    pub fn prefetch(self: &Arc<Self>, id: &Identity) {
        if let Err(e) = self.ensure_slot(id) {
            tracing::warn!(identity = %id, error = %e, "cannot prefetch certificate");
        }
    }

    /// Stop renewing and drop the certificate of a workload that left this node.
    pub fn forget(&self, id: &Identity) {
        let removed = self
            .slots
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        if let Some(slot) = removed {
            slot.task.abort();
            tracing::info!(identity = %id, "certificate forgotten, renewals stopped");
        }
    }

    /// For /config_dump: one object per identity, sorted by identity.
    pub fn dump(&self) -> serde_json::Value {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        let mut ids: Vec<&Identity> = slots.keys().collect();
        ids.sort();
        let entries = ids
            .into_iter()
            .map(|id| {
                let state = slots[id].rx.borrow().clone();
                match state {
                    CertState::Initializing => {
                        serde_json::json!({"identity": id.to_string(), "state": "Initializing"})
                    }
                    CertState::Failed { error } => serde_json::json!({
                        "identity": id.to_string(), "state": "Unavailable", "error": error,
                    }),
                    CertState::Available {
                        cert,
                        renewal_error,
                    } => serde_json::json!({
                        "identity": id.to_string(),
                        "state": if cert.is_expired() { "Expired" } else { "Available" },
                        "serial": cert.serial_hex(),
                        "not_before": rfc3339(cert.not_before),
                        "not_after": rfc3339(cert.not_after),
                        "error": renewal_error,
                    }),
                }
            })
            .collect();
        serde_json::Value::Array(entries)
    }

    /// Number of successful renewals so far (first issuances not counted).
    pub fn rotations(&self) -> u64 {
        self.rotations.load(Ordering::Relaxed)
    }

    fn ensure_slot(&self, id: &Identity) -> Result<watch::Receiver<CertState>, CertError> {
        let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.get(id) {
            return Ok(slot.rx.clone());
        }
        let handle = match &self.runtime {
            Some(h) => h.clone(),
            None => tokio::runtime::Handle::try_current().map_err(|_| CertError::NoRuntime {
                identity: id.clone(),
            })?,
        };
        let (tx, rx) = watch::channel(CertState::Initializing);
        let worker = Worker {
            identity: id.clone(),
            provider: self.provider.clone(),
            options: self.options.clone(),
            rotations: self.rotations.clone(),
            tx,
        };
        let task = handle.spawn(worker.run()).abort_handle();
        slots.insert(
            id.clone(),
            Slot {
                rx: rx.clone(),
                task,
            },
        );
        Ok(rx)
    }
}

impl Drop for CertificateManager {
    fn drop(&mut self) {
        let slots = self.slots.get_mut().unwrap_or_else(PoisonError::into_inner);
        for (_, slot) in slots.drain() {
            slot.task.abort();
        }
    }
}

/// `None` while the first request is in flight.
fn resolve(
    id: &Identity,
    state: &CertState,
) -> Option<Result<Arc<WorkloadCertificate>, CertError>> {
    match state {
        CertState::Initializing => None,
        CertState::Available {
            cert,
            renewal_error,
        } => Some(if cert.is_expired() {
            Err(CertError::Expired {
                identity: id.clone(),
                not_after: rfc3339(cert.not_after),
                last_error: renewal_error.clone().unwrap_or_else(|| "none yet".into()),
            })
        } else {
            Ok(cert.clone())
        }),
        CertState::Failed { error } => Some(Err(CertError::Unavailable {
            identity: id.clone(),
            reason: format!("retrying in the background; last error: {error}"),
        })),
    }
}

/// Background fetcher/renewer of one identity's certificate.
struct Worker {
    identity: Identity,
    provider: Arc<dyn CertificateProvider>,
    options: ManagerOptions,
    rotations: Arc<AtomicU64>,
    tx: watch::Sender<CertState>,
}

impl Worker {
    async fn run(self) {
        let mut current: Option<Arc<WorkloadCertificate>> = None;
        let mut backoff = self.options.initial_backoff;
        loop {
            let requested_at = SystemTime::now();
            let delay = match self.request().await {
                Ok(cert) => {
                    let cert = Arc::new(cert);
                    if current.is_some() {
                        self.rotations.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(identity = %self.identity, serial = %cert.serial_hex(),
                            not_after = %rfc3339(cert.not_after), "certificate renewed");
                    } else {
                        tracing::info!(identity = %self.identity, serial = %cert.serial_hex(),
                            not_after = %rfc3339(cert.not_after), "certificate issued");
                    }
                    let delay = self.renew_delay(&cert, requested_at);
                    current = Some(cert.clone());
                    self.tx.send_replace(CertState::Available {
                        cert,
                        renewal_error: None,
                    });
                    backoff = self.options.initial_backoff;
                    delay
                }
                Err(e) => {
                    let error = e.to_string();
                    tracing::warn!(identity = %self.identity, error = %error, retry_in = ?backoff,
                        "certificate request failed");
                    self.tx.send_replace(match &current {
                        // why: keep serving the old certificate while it is valid.
                        Some(cert) => CertState::Available {
                            cert: cert.clone(),
                            renewal_error: Some(error),
                        },
                        None => CertState::Failed { error },
                    });
                    let delay = backoff;
                    backoff = (backoff * 2).min(self.options.max_backoff);
                    delay
                }
            };
            if self.tx.is_closed() {
                return; // nobody can read the result anymore
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn request(&self) -> Result<WorkloadCertificate, CertError> {
        let (csr, key) = generate_csr(&self.identity).map_err(|e| CertError::Csr {
            identity: self.identity.clone(),
            reason: e.to_string(),
        })?;
        let chain = self
            .provider
            .sign(&self.identity, csr, self.options.lifetime)
            .await?;
        WorkloadCertificate::from_pem_chain(self.identity.clone(), &chain, key)
    }

    /// Renew after `renew_fraction` of the usable window. The window starts at the later of
    /// `not_before` and our request time: CAs backdate `not_before` for clock skew, which would
    /// otherwise make short-lived certificates look half-used on arrival. For real lifetimes
    /// (hours) this equals [`WorkloadCertificate::refresh_at`] within the backdating.
    fn renew_delay(&self, cert: &WorkloadCertificate, requested_at: SystemTime) -> Duration {
        let start = cert.not_before.max(requested_at);
        let window = cert
            .not_after
            .duration_since(start)
            .unwrap_or(Duration::ZERO);
        let fraction = self.options.renew_fraction.clamp(0.0, 1.0);
        let renew_at = start + window.mul_f64(fraction);
        renew_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .max(self.options.min_renew_interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::tests::{echo, handshake_with, id};
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
    const HTTPBIN: &str = "spiffe://cluster.local/ns/default/sa/httpbin";

    /// Counts calls, optionally delays them and fails the calls whose number is in `fail`.
    struct TestProvider {
        ca: InProcessCa,
        calls: AtomicUsize,
        delay: Duration,
        fail: Vec<usize>,
    }

    impl TestProvider {
        fn new(delay: Duration, fail: Vec<usize>) -> Arc<Self> {
            let ca = CertificateAuthority::generate("cluster.local").unwrap();
            Arc::new(TestProvider {
                ca: InProcessCa(Arc::new(ca)),
                calls: AtomicUsize::new(0),
                delay,
                fail,
            })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    #[async_trait::async_trait]
    impl CertificateProvider for TestProvider {
        async fn sign(
            &self,
            identity: &Identity,
            csr_pem: String,
            lifetime: Duration,
        ) -> Result<Vec<String>, CertError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(self.delay).await;
            if self.fail.contains(&n) {
                return Err(CertError::Provider {
                    identity: identity.clone(),
                    source: format!("injected failure #{n}").into(),
                });
            }
            self.ca.sign(identity, csr_pem, lifetime).await
        }
    }

    #[test]
    fn from_pem_chain_checks() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let other = CertificateAuthority::generate("cluster.local").unwrap();
        let identity = id(SLEEP);
        let (csr, key) = generate_csr(&identity).unwrap();
        let chain = ca
            .sign_csr(&csr, &identity, Duration::from_secs(3600))
            .unwrap();

        // Root bundle with two roots.
        let bundle = vec![chain[0].clone(), ca.root_pem() + &other.root_pem()];
        let cert = WorkloadCertificate::from_pem_chain(identity.clone(), &bundle, key.clone_key())
            .unwrap();
        assert_eq!(cert.roots, vec![ca.root_der(), other.root_der()]);
        let half = cert.not_before + cert.not_after.duration_since(cert.not_before).unwrap() / 2;
        assert_eq!(cert.refresh_at(), half);
        assert!(cert.refresh_at() > SystemTime::now());

        let wrong = id(HTTPBIN);
        let err = WorkloadCertificate::from_pem_chain(wrong, &chain, key.clone_key()).unwrap_err();
        assert!(
            matches!(&err, CertError::IdentityMismatch { presented, .. } if presented == &[SLEEP.to_string()])
        );
        assert!(err.to_string().contains(HTTPBIN));

        let (_, other_key) = generate_csr(&identity).unwrap();
        assert!(matches!(
            WorkloadCertificate::from_pem_chain(identity.clone(), &chain, other_key),
            Err(CertError::KeyMismatch { .. })
        ));
        assert!(matches!(
            WorkloadCertificate::from_pem_chain(identity.clone(), &chain[..1], key.clone_key()),
            Err(CertError::NoRoots { .. })
        ));
        assert!(matches!(
            WorkloadCertificate::from_pem_chain(identity.clone(), &[], key.clone_key()),
            Err(CertError::EmptyChain { .. })
        ));
        let garbage = vec![chain[0].clone(), "garbage".to_string()];
        assert!(matches!(
            WorkloadCertificate::from_pem_chain(identity, &garbage, key),
            Err(CertError::BadPem { index: 1, .. })
        ));
    }

    #[tokio::test]
    async fn fetcher_outlives_the_runtime_that_asked_first() {
        let provider = TestProvider::new(Duration::from_millis(50), vec![]);
        let mgr = CertificateManager::new(provider.clone(), Duration::from_secs(3600));
        let identity = id(SLEEP);
        // A data-path worker's runtime asks first, then goes away (worker shut down).
        let (m, i) = (mgr.clone(), identity.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async { m.prefetch(&i) });
        })
        .join()
        .unwrap();
        let cert = mgr.fetch(&identity).await.expect("the fetcher still runs");
        assert_eq!(cert.identity, identity);
        assert_eq!(provider.calls(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_fetches_make_one_request() {
        let provider = TestProvider::new(Duration::from_millis(200), vec![]);
        let mgr = CertificateManager::new(provider.clone(), Duration::from_secs(3600));
        let identity = id(SLEEP);
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let mgr = mgr.clone();
                let identity = identity.clone();
                tokio::spawn(async move { mgr.fetch(&identity).await.unwrap() })
            })
            .collect();
        let mut certs = Vec::new();
        for t in tasks {
            certs.push(t.await.unwrap());
        }
        assert_eq!(provider.calls(), 1);
        assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));
        assert_eq!(certs[0].identity, identity);
        // Later calls hit the cache.
        let again = mgr.fetch(&identity).await.unwrap();
        assert!(Arc::ptr_eq(&again, &certs[0]));
        assert_eq!(provider.calls(), 1);
        // Another identity is another request.
        mgr.fetch(&id(HTTPBIN)).await.unwrap();
        assert_eq!(provider.calls(), 2);

        let dump = mgr.dump();
        let entries = dump.as_array().unwrap();
        assert_eq!(entries.len(), 2);
        let sleep = entries.iter().find(|e| e["identity"] == SLEEP).unwrap();
        assert_eq!(sleep["state"], "Available");
        assert_eq!(sleep["serial"], certs[0].serial_hex());
        assert_eq!(sleep["not_after"], rfc3339(certs[0].not_after));
        let na = sleep["not_after"].as_str().unwrap();
        assert!(
            na.len() == 20 && na.ends_with('Z') && na.as_bytes()[10] == b'T',
            "{na}"
        );
        assert_eq!(mgr.rotations(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn rotation_at_half_life_keeps_live_connections() {
        let provider = TestProvider::new(Duration::ZERO, vec![]);
        let mgr = CertificateManager::new(provider.clone(), Duration::from_secs(3));
        let (server_id, client_id) = (id(HTTPBIN), id(SLEEP));
        let start = Instant::now();
        let server_cert = mgr.fetch(&server_id).await.unwrap();
        let client_cert = mgr.fetch(&client_id).await.unwrap();

        // A connection established with the first certificates.
        let (s, c) = handshake_with(
            server_cert.server_config().unwrap(),
            client_cert
                .client_config(std::slice::from_ref(&server_id))
                .unwrap(),
        )
        .await;
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        echo(&mut c, &mut s, b"before rotation").await;

        // Wait for the server certificate to be renewed.
        let renewed = loop {
            let now = mgr.fetch(&server_id).await.unwrap();
            if !Arc::ptr_eq(&now, &server_cert) {
                break now;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "no rotation within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let elapsed = start.elapsed();
        // Half-life of a ~3 s certificate (x509 times have second precision).
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed <= Duration::from_millis(2500),
            "renewed after {elapsed:?}"
        );
        assert!(mgr.rotations() >= 1);
        assert_ne!(renewed.serial_hex(), server_cert.serial_hex());
        assert!(renewed.not_after > server_cert.not_after);

        // The old connection is untouched.
        echo(&mut c, &mut s, b"after rotation").await;

        // New handshakes present the new certificate.
        let client_now = mgr.fetch(&client_id).await.unwrap();
        let (s2, c2) = handshake_with(
            renewed.server_config().unwrap(),
            client_now
                .client_config(std::slice::from_ref(&server_id))
                .unwrap(),
        )
        .await;
        let (mut s2, mut c2) = (s2.unwrap(), c2.unwrap());
        let presented = c2.get_ref().1.peer_certificates().unwrap()[0].clone();
        assert_eq!(presented, renewed.chain[0]);
        echo(&mut c2, &mut s2, b"new connection").await;

        // Renewals keep going (and the old connection still works).
        let before = mgr.rotations();
        tokio::time::sleep(Duration::from_millis(1800)).await;
        assert!(mgr.rotations() > before);
        echo(&mut c, &mut s, b"much later").await;
    }

    #[tokio::test]
    async fn forget_stops_renewals() {
        let provider = TestProvider::new(Duration::ZERO, vec![]);
        let mgr = CertificateManager::new(provider.clone(), Duration::from_secs(2));
        let identity = id(SLEEP);
        let first = mgr.fetch(&identity).await.unwrap();
        assert_eq!(provider.calls(), 1);
        mgr.forget(&identity);
        assert_eq!(mgr.dump(), serde_json::json!([]));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(
            provider.calls(),
            1,
            "a forgotten identity must not be renewed"
        );
        assert_eq!(mgr.rotations(), 0);
        // Fetching again starts over with a new certificate.
        let second = mgr.fetch(&identity).await.unwrap();
        assert_eq!(provider.calls(), 2);
        assert_ne!(first.serial_hex(), second.serial_hex());
    }

    #[tokio::test]
    async fn dropping_manager_stops_tasks() {
        let provider = TestProvider::new(Duration::ZERO, vec![]);
        let mgr = CertificateManager::new(provider.clone(), Duration::from_secs(2));
        mgr.prefetch(&id(SLEEP));
        mgr.fetch(&id(HTTPBIN)).await.unwrap();
        // prefetch ran in the background
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(provider.calls(), 2);
        drop(mgr);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(provider.calls(), 2, "tasks must stop with the manager");
        // Only the test's handle keeps the provider alive: the workers released theirs.
        assert_eq!(Arc::strong_count(&provider), 1);
    }

    #[tokio::test]
    async fn failures_are_retried_and_old_cert_kept() {
        // Call 1 (first issuance) fails, call 3 (first renewal) fails.
        let provider = TestProvider::new(Duration::ZERO, vec![1, 3]);
        let mgr = CertificateManager::with_options(
            provider.clone(),
            ManagerOptions {
                lifetime: Duration::from_secs(4),
                initial_backoff: Duration::from_millis(300),
                ..Default::default()
            },
        );
        let identity = id(SLEEP);
        let err = mgr.fetch(&identity).await.unwrap_err();
        assert!(matches!(err, CertError::Unavailable { .. }), "{err}");
        assert!(err.to_string().contains("injected failure #1"), "{err}");
        assert_eq!(mgr.dump()[0]["state"], "Unavailable");

        tokio::time::sleep(Duration::from_millis(500)).await;
        let cert = mgr.fetch(&identity).await.unwrap();
        assert_eq!(provider.calls(), 2);

        // First renewal (~2 s) fails: the old certificate is still served.
        let deadline = Instant::now() + Duration::from_secs(4);
        while provider.calls() < 3 {
            assert!(Instant::now() < deadline, "no renewal attempt");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let still = mgr.fetch(&identity).await.unwrap();
        assert!(Arc::ptr_eq(&still, &cert));
        assert!(
            mgr.dump()[0]["error"]
                .as_str()
                .unwrap()
                .contains("injected failure #3")
        );
        assert_eq!(mgr.rotations(), 0);

        // The retry (after the backoff) succeeds.
        let deadline = Instant::now() + Duration::from_secs(2);
        while mgr.rotations() == 0 {
            assert!(Instant::now() < deadline, "retry did not renew");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let renewed = mgr.fetch(&identity).await.unwrap();
        assert!(!Arc::ptr_eq(&renewed, &cert));
        assert!(mgr.dump()[0]["error"].is_null());
    }
}
