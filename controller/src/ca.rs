//! The CA service: `istio.v1.auth.IstioCertificateService/CreateCertificate` on port 15012.
//!
//! A caller gets a certificate only for an identity it may hold:
//!
//! 1. **Authentication** — `authorization: Bearer <token>` metadata, checked by a
//!    [`TokenAuthenticator`]:
//!    - file mode ([`FileTokenAuthenticator`]): per-node bootstrap tokens, one file per node,
//!      `<config-dir>/nodes/<node-name>.token`, holding the token (surrounding whitespace
//!      ignored, at least [`MIN_TOKEN_LEN`] characters). The caller is the node agent of
//!      `<node-name>`. Files are re-read on every request, so adding or revoking a node needs
//!      no restart. [`write_bootstrap_token`] creates one.
//!    - Kubernetes ([`KubeAuthenticator`]): a TokenReview of the service-account token. A token
//!      of a configured node-agent service account (ztunnel's, `istio-system/ztunnel` by
//!      default) makes the caller the node agent of the node named by the bound token's
//!      `authentication.kubernetes.io/node-name` claim, or failing that of the node its
//!      `authentication.kubernetes.io/pod-name` pod runs on. Headers such as `clusterid` are
//!      never trusted for the node: any client could set them. Any other service account may
//!      obtain only its own identity.
//! 2. **The requested identity** is the CSR's single SPIFFE URI SAN; an `ImpersonatedIdentity`
//!    metadata field, when present, must name the same identity.
//! 3. **Authorization** — a node agent may obtain an identity only if a Pod with that namespace
//!    and `spec.serviceAccountName` is scheduled on its node (`spec.nodeName`), according to the
//!    object store.
//!
//! Refusals: `Unauthenticated` (no or invalid token), `PermissionDenied` (identity not held on
//! the caller's node, or not the caller's own, or a foreign trust domain), `InvalidArgument`
//! (bad CSR or metadata); each message names what was refused and why. Validity is the
//! requested `validity_duration`, capped at the configured maximum (24 h by default).
//! The response is `[leaf, root bundle]`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use zmesh_core::ca::{CaError, CertificateAuthority};
use zmesh_core::identity::Identity;
use zmesh_proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use zmesh_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};

use crate::store::ObjectStore;

/// Directory (under the config directory) holding `<node>.token` files.
pub const TOKENS_DIR: &str = "nodes";
/// Shortest bootstrap token accepted (shorter files are ignored with a warning).
pub const MIN_TOKEN_LEN: usize = 16;
/// Default and maximum certificate lifetime.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Metadata field naming the identity a node agent asks for (Istio's ztunnel sets it).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Name of the controller's Service (manifests/controller.yaml).
pub const CONTROLLER_SERVICE_NAME: &str = "zmesh-controller";
/// Service account of the controller (its 15012 serving certificate carries this identity).
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "zmesh-controller";
/// Bound-token claims, as TokenReview reports them in `user.extra`.
pub const NODE_NAME_CLAIM: &str = "authentication.kubernetes.io/node-name";
pub const POD_NAME_CLAIM: &str = "authentication.kubernetes.io/pod-name";

/// Who is asking, once authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A node agent (ztunnel) acting for the pods scheduled on `node`.
    Node { node: String },
    /// A workload asking for its own identity.
    ServiceAccount {
        namespace: String,
        service_account: String,
    },
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Node { node } => write!(f, "node agent of node {node:?}"),
            Caller::ServiceAccount {
                namespace,
                service_account,
            } => write!(f, "service account {namespace}/{service_account}"),
        }
    }
}

/// Authentication failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// The token is not valid (answered with `Unauthenticated`).
    #[error("{0}")]
    Invalid(String),
    /// The token could not be checked (answered with `Unavailable`; the caller retries).
    #[error("token check unavailable: {0}")]
    Unavailable(String),
}

/// Turns a bearer token into a [`Caller`].
#[async_trait::async_trait]
pub trait TokenAuthenticator: Send + Sync + 'static {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError>;
}

/// File mode: `<dir>/<node>.token` files (see the module docs).
pub struct FileTokenAuthenticator {
    dir: PathBuf,
}

impl FileTokenAuthenticator {
    /// `dir` is usually `<config-dir>/nodes`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileTokenAuthenticator { dir: dir.into() }
    }
}

/// Constant-time comparison (a token check must not leak how much of a prefix matched).
fn same_token(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[async_trait::async_trait]
impl TokenAuthenticator for FileTokenAuthenticator {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        let dir = self.dir.clone();
        let token = token.to_string();
        // why: directory I/O off the async workers.
        tokio::task::spawn_blocking(move || {
            let entries = std::fs::read_dir(&dir).map_err(|e| {
                AuthError::Invalid(format!(
                    "no bootstrap tokens are configured ({}: {e})",
                    dir.display()
                ))
            })?;
            let mut found = None;
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().and_then(|e| e.to_str()) != Some("token") {
                    continue;
                }
                let Some(node) = path.file_stem().and_then(|s| s.to_str()) else {
                    continue;
                };
                // why: a token file is tiny; refuse to read anything large.
                if entry.metadata().map(|m| m.len() > 4096).unwrap_or(true) {
                    continue;
                }
                let Ok(content) = std::fs::read_to_string(&path) else {
                    continue;
                };
                let expected = content.trim();
                if expected.len() < MIN_TOKEN_LEN {
                    warn!(file = %path.display(), "bootstrap token shorter than {MIN_TOKEN_LEN} characters ignored");
                    continue;
                }
                if same_token(expected.as_bytes(), token.as_bytes()) && found.is_none() {
                    found = Some(node.to_string());
                }
            }
            found.map(|node| Caller::Node { node }).ok_or_else(|| {
                AuthError::Invalid(format!(
                    "bearer token matches no bootstrap token in {}",
                    dir.display()
                ))
            })
        })
        .await
        .map_err(|e| AuthError::Unavailable(e.to_string()))?
    }
}

/// Create `<dir>/<node>.token` with a fresh random token (mode 0600) and return the token.
pub fn write_bootstrap_token(dir: &Path, node: &str) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let bytes: [u8; 32] = rand::random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join(format!("{node}.token")))?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")?;
    Ok(token)
}

/// The result of a Kubernetes TokenReview.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReviewedUser {
    pub username: String,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Reviews a token (Kubernetes `TokenReview`, or a fake in tests).
#[async_trait::async_trait]
pub trait TokenReviewer: Send + Sync + 'static {
    async fn review(&self, token: &str) -> Result<ReviewedUser, AuthError>;
}

/// TokenReview through the Kubernetes API.
pub struct KubeTokenReviewer {
    client: kube::Client,
    /// Audiences the token must carry (Istio's CA uses `istio-ca`); empty = the API server's.
    audiences: Vec<String>,
}

impl KubeTokenReviewer {
    pub fn new(client: kube::Client, audiences: Vec<String>) -> Self {
        KubeTokenReviewer { client, audiences }
    }
}

#[async_trait::async_trait]
impl TokenReviewer for KubeTokenReviewer {
    async fn review(&self, token: &str) -> Result<ReviewedUser, AuthError> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            api.create(&kube::api::PostParams::default(), &review),
        )
        .await
        .map_err(|_| AuthError::Unavailable("TokenReview timed out after 10s".into()))?
        .map_err(|e| AuthError::Unavailable(format!("TokenReview failed: {e}")))?;
        let status = out.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Invalid(format!(
                "TokenReview rejected the token: {}",
                status.error.unwrap_or_else(|| "not authenticated".into())
            )));
        }
        let user = status.user.unwrap_or_default();
        Ok(ReviewedUser {
            username: user.username.unwrap_or_default(),
            extra: user.extra.unwrap_or_default(),
        })
    }
}

/// Kubernetes mode: service-account tokens reviewed by a [`TokenReviewer`].
pub struct KubeAuthenticator<R> {
    reviewer: R,
    /// `(namespace, service account)` of node agents.
    node_agents: Vec<(String, String)>,
    store: Arc<ObjectStore>,
}

impl<R: TokenReviewer> KubeAuthenticator<R> {
    /// `store` resolves a bound token's pod to its node when the token has no node claim.
    pub fn new(reviewer: R, node_agents: Vec<(String, String)>, store: Arc<ObjectStore>) -> Self {
        KubeAuthenticator {
            reviewer,
            node_agents,
            store,
        }
    }
}

#[async_trait::async_trait]
impl<R: TokenReviewer> TokenAuthenticator for KubeAuthenticator<R> {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        let user = self.reviewer.review(token).await?;
        let Some((namespace, sa)) = user
            .username
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
        else {
            return Err(AuthError::Invalid(format!(
                "token belongs to {:?}, not to a service account",
                user.username
            )));
        };
        let is_agent = self
            .node_agents
            .iter()
            .any(|(n, s)| n == namespace && s == sa);
        if !is_agent {
            return Ok(Caller::ServiceAccount {
                namespace: namespace.to_string(),
                service_account: sa.to_string(),
            });
        }
        let claim = |k: &str| user.extra.get(k).and_then(|v| v.first()).cloned();
        if let Some(node) = claim(NODE_NAME_CLAIM) {
            return Ok(Caller::Node { node });
        }
        if let Some(pod) = claim(POD_NAME_CLAIM) {
            let key = crate::store::ObjectKey::new("Pod", namespace, &pod);
            let node = self
                .store
                .snapshot()
                .parsed::<crate::k8s::Pod>(&key)
                .and_then(Result::ok)
                .map(|p| p.spec.node_name.clone())
                .filter(|n| !n.is_empty());
            return node.map(|node| Caller::Node { node }).ok_or_else(|| {
                AuthError::Invalid(format!(
                    "node agent {namespace}/{sa}: its pod {namespace}/{pod} is unknown or not scheduled"
                ))
            });
        }
        Err(AuthError::Invalid(format!(
            "node agent {namespace}/{sa}: the token has no {NODE_NAME_CLAIM} or {POD_NAME_CLAIM} claim (a bound, projected service-account token is required)"
        )))
    }
}

/// Why the CA or its serving certificate could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CaSetupError {
    #[error("CA root {what} {path}: {reason}")]
    Io {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error(
        "CA root: {present} exists but {missing} does not; provide both or neither (then a new root is generated)"
    )]
    HalfRoot { present: String, missing: String },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("controller serving certificate: {0}")]
    Serving(String),
    #[error("CA root Secret {namespace}/{name}: {reason}")]
    Secret {
        namespace: String,
        name: String,
        reason: String,
    },
}

/// Where the CA root came from (shown by the admin `/config_dump`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RootSource {
    /// Loaded from PEM files.
    File { cert: PathBuf },
    /// Generated at this start; written to `cert` (and its key file), or kept in memory only.
    Generated { cert: Option<PathBuf> },
    /// Loaded from, or generated and stored in, a Kubernetes Secret.
    KubernetesSecret {
        namespace: String,
        name: String,
        /// This controller created the Secret (first start of the mesh).
        created: bool,
    },
    /// Handed over by the program embedding the controller.
    Embedder,
}

/// Load the root from `cert_path`/`key_path`, or generate one (ECDSA P-256, 10 years) and
/// persist it there (key mode 0600) when neither exists.
pub fn load_or_create_root(
    cert_path: &Path,
    key_path: &Path,
    trust_domain: &str,
) -> Result<(CertificateAuthority, RootSource), CaSetupError> {
    let io = |what, path: &Path, e: std::io::Error| CaSetupError::Io {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let cert =
                std::fs::read_to_string(cert_path).map_err(|e| io("certificate", cert_path, e))?;
            let key = std::fs::read_to_string(key_path).map_err(|e| io("key", key_path, e))?;
            let ca = CertificateAuthority::from_pem(&cert, &key)?;
            info!(trust_domain = %ca.trust_domain(), cert = %cert_path.display(), "CA root loaded");
            Ok((
                ca,
                RootSource::File {
                    cert: cert_path.to_path_buf(),
                },
            ))
        }
        (false, false) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let ca = CertificateAuthority::generate(trust_domain)?;
            for p in [cert_path, key_path] {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| io("directory", dir, e))?;
                }
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(key_path)
                .map_err(|e| io("key", key_path, e))?;
            f.write_all(ca.key_pem().as_bytes())
                .map_err(|e| io("key", key_path, e))?;
            std::fs::write(cert_path, ca.root_pem())
                .map_err(|e| io("certificate", cert_path, e))?;
            info!(%trust_domain, cert = %cert_path.display(), "CA root generated");
            Ok((
                ca,
                RootSource::Generated {
                    cert: Some(cert_path.to_path_buf()),
                },
            ))
        }
        (true, false) => Err(CaSetupError::HalfRoot {
            present: cert_path.display().to_string(),
            missing: key_path.display().to_string(),
        }),
        (false, true) => Err(CaSetupError::HalfRoot {
            present: key_path.display().to_string(),
            missing: cert_path.display().to_string(),
        }),
    }
}

/// Kubernetes: load the root from Secret `namespace/name` (keys `ca-cert.pem`, `ca-key.pem`,
/// as Istio's `istio-ca-secret`), or generate one and create the Secret. Two controllers
/// racing to create it both end up with the winner's root.
pub async fn load_or_create_root_secret(
    client: kube::Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> Result<(CertificateAuthority, RootSource), CaSetupError> {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    let err = |reason: String| CaSetupError::Secret {
        namespace: namespace.to_string(),
        name: name.to_string(),
        reason,
    };
    let api: kube::Api<Secret> = kube::Api::namespaced(client, namespace);
    let from_secret = |s: &Secret| -> Result<CertificateAuthority, CaSetupError> {
        let get = |k: &str| {
            s.data
                .as_ref()
                .and_then(|d| d.get(k))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .ok_or_else(|| err(format!("has no {k} key")))
        };
        Ok(CertificateAuthority::from_pem(
            &get("ca-cert.pem")?,
            &get("ca-key.pem")?,
        )?)
    };
    let source = |created| RootSource::KubernetesSecret {
        namespace: namespace.to_string(),
        name: name.to_string(),
        created,
    };
    if let Some(s) = api.get_opt(name).await.map_err(|e| err(e.to_string()))? {
        return Ok((from_secret(&s)?, source(false)));
    }
    let ca = CertificateAuthority::generate(trust_domain)?;
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        type_: Some("istio.io/ca-root".into()),
        data: Some(BTreeMap::from([
            ("ca-cert.pem".into(), ByteString(ca.root_pem().into_bytes())),
            ("ca-key.pem".into(), ByteString(ca.key_pem().into_bytes())),
        ])),
        ..Default::default()
    };
    match api.create(&kube::api::PostParams::default(), &secret).await {
        Ok(_) => Ok((ca, source(true))),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = api.get(name).await.map_err(|e| err(e.to_string()))?;
            Ok((from_secret(&s)?, source(false)))
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// The controller's own serving certificate for port 15012, issued by the CA for
/// `spiffe://<td>/ns/<namespace>/sa/zmesh-controller` and re-issued at half-life.
struct ServingCert {
    ca: Arc<CertificateAuthority>,
    identity: Identity,
    /// DNS SANs, for clients that verify the control plane by host name.
    dns_names: Vec<String>,
    lifetime: Duration,
    current: Mutex<Option<(Arc<CertifiedKey>, SystemTime)>>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    fn issue(&self) -> Result<(Arc<CertifiedKey>, SystemTime), CaSetupError> {
        let now = SystemTime::now();
        let cert = self.ca.issue_with_dns(
            &self.identity,
            &self.dns_names,
            now - Duration::from_secs(60),
            now + self.lifetime,
        )?;
        let key = CertifiedKey::from_der(
            cert.chain.clone(),
            cert.key.clone_key(),
            &zmesh_core::tls::provider(),
        )
        .map_err(|e| CaSetupError::Serving(e.to_string()))?;
        Ok((Arc::new(key), cert.refresh_at()))
    }

    fn get(&self) -> Option<Arc<CertifiedKey>> {
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        match &*cur {
            Some((k, refresh)) if SystemTime::now() < *refresh => return Some(k.clone()),
            _ => {}
        }
        match self.issue() {
            Ok((k, refresh)) => {
                *cur = Some((k.clone(), refresh));
                Some(k)
            }
            Err(e) => {
                warn!("cannot renew the controller serving certificate: {e}");
                // why: an old but still valid certificate beats refusing every handshake.
                cur.as_ref().map(|(k, _)| k.clone())
            }
        }
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

/// The controller's identity: `spiffe://<td>/ns/<namespace>/sa/zmesh-controller`.
pub fn controller_identity(trust_domain: &str, namespace: &str) -> Result<Identity, CaSetupError> {
    Identity::new(trust_domain, namespace, CONTROLLER_SERVICE_ACCOUNT)
        .map_err(|e| CaSetupError::Serving(e.to_string()))
}

/// Host names of the controller's Service in `namespace` (manifests/controller.yaml), as
/// Istio's istiod certificate carries `istiod.istio-system.svc`: a client may verify the
/// control plane by name (`ztunnel --control-plane-dns-name`) instead of by SPIFFE identity.
pub fn controller_dns_names(namespace: &str) -> Vec<String> {
    let svc = CONTROLLER_SERVICE_NAME;
    vec![
        format!("{svc}.{namespace}.svc"),
        format!("{svc}.{namespace}.svc.cluster.local"),
        format!("{svc}.{namespace}"),
        svc.to_string(),
    ]
}

/// TLS for port 15012: TLS 1.3, ALPN h2, the controller's SPIFFE certificate (with the
/// Service's DNS names); client certificates are verified when presented but optional
/// (bootstrap uses tokens).
pub fn server_tls_config(
    ca: Arc<CertificateAuthority>,
    identity: Identity,
) -> Result<Arc<rustls::ServerConfig>, CaSetupError> {
    let provider = zmesh_core::tls::provider();
    let serving = ServingCert {
        ca: ca.clone(),
        dns_names: controller_dns_names(identity.namespace()),
        identity,
        lifetime: DEFAULT_CERT_TTL,
        current: Mutex::new(None),
    };
    let first = serving.issue()?;
    *serving
        .current
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(first);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.root_der())
        .map_err(|e| CaSetupError::Serving(e.to_string()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| CaSetupError::Serving(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CaSetupError::Serving(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(serving));
    config.alpn_protocols = vec![zmesh_core::tls::ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Limits of the CA service.
#[derive(Clone, Debug)]
pub struct CaOptions {
    /// Lifetime when the request asks for none.
    pub default_ttl: Duration,
    /// Longer requests are capped to this.
    pub max_ttl: Duration,
}

impl Default for CaOptions {
    fn default() -> Self {
        CaOptions {
            default_ttl: DEFAULT_CERT_TTL,
            max_ttl: DEFAULT_CERT_TTL,
        }
    }
}

type ResultLabel = Vec<(String, String)>;

/// CA metrics: `zmesh_ca_requests_total{result}`.
#[derive(Debug, Default)]
pub struct CaMetrics {
    pub requests: Family<ResultLabel, Counter>,
}

impl CaMetrics {
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.sub_registry_with_prefix("zmesh_ca").register(
            "requests",
            "CreateCertificate requests by result",
            self.requests.clone(),
        );
    }

    fn count(&self, result: &str) {
        self.requests
            .get_or_create(&vec![("result".to_string(), result.to_string())])
            .inc();
    }

    /// Requests counted with `result` (ok, unauthenticated, denied, invalid, error).
    pub fn get(&self, result: &str) -> u64 {
        self.requests
            .get_or_create(&vec![("result".to_string(), result.to_string())])
            .get()
    }
}

/// The `IstioCertificateService` implementation.
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    auth: Arc<dyn TokenAuthenticator>,
    store: Arc<ObjectStore>,
    opts: CaOptions,
    metrics: Arc<CaMetrics>,
}

impl CaService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        auth: Arc<dyn TokenAuthenticator>,
        store: Arc<ObjectStore>,
        opts: CaOptions,
        metrics: Arc<CaMetrics>,
    ) -> Self {
        CaService {
            ca,
            auth,
            store,
            opts,
            metrics,
        }
    }

    pub fn into_service(self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self)
    }

    async fn handle(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<(Caller, Identity, Vec<String>), Status> {
        let caller = authenticate(self.auth.as_ref(), request.metadata()).await?;
        let req = request.into_inner();
        let identity = csr_identity(&req.csr)?;
        if let Some(v) = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
        {
            let named = match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => s.as_str(),
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "metadata {IMPERSONATED_IDENTITY} must be a string"
                    )));
                }
            };
            if named != identity.to_string() {
                return Err(Status::invalid_argument(format!(
                    "metadata {IMPERSONATED_IDENTITY} {named:?} differs from the CSR's identity {identity}"
                )));
            }
        }
        if identity.trust_domain() != self.ca.trust_domain() {
            return Err(Status::permission_denied(format!(
                "{identity} is outside this mesh's trust domain {:?}",
                self.ca.trust_domain()
            )));
        }
        self.authorize(&caller, &identity)?;
        let ttl = match req.validity_duration {
            d if d < 0 => {
                return Err(Status::invalid_argument(format!(
                    "validity_duration {d} is negative"
                )));
            }
            0 => self.opts.default_ttl,
            d => Duration::from_secs(d.unsigned_abs()).min(self.opts.max_ttl),
        };
        let chain = self
            .ca
            .sign_csr(&req.csr, &identity, ttl)
            .map_err(|e| match e {
                CaError::InvalidCsr { .. } | CaError::CsrIdentityMismatch { .. } => {
                    Status::invalid_argument(e.to_string())
                }
                CaError::ForeignTrustDomain { .. } => Status::permission_denied(e.to_string()),
                other => Status::internal(other.to_string()),
            })?;
        Ok((caller, identity, chain))
    }

    fn authorize(&self, caller: &Caller, identity: &Identity) -> Result<(), Status> {
        match caller {
            Caller::ServiceAccount {
                namespace,
                service_account,
            } => {
                if identity.namespace() == namespace
                    && identity.service_account() == service_account
                {
                    Ok(())
                } else {
                    Err(Status::permission_denied(format!(
                        "{caller} may obtain only its own identity, not {identity}"
                    )))
                }
            }
            Caller::Node { node } => {
                let snap = self.store.snapshot();
                let mut nodes: Vec<String> = Vec::new();
                // Typed views (memoized): pods pass through here for every certificate.
                for (key, pod) in snap.parsed_of_kind::<crate::k8s::Pod>("Pod") {
                    let Ok(pod) = pod else { continue };
                    if key.namespace != identity.namespace() || is_terminated(&pod) {
                        continue;
                    }
                    let sa = [&pod.spec.service_account_name, &pod.spec.service_account]
                        .into_iter()
                        .find(|s| !s.is_empty())
                        .map_or("default", String::as_str);
                    if sa != identity.service_account() {
                        continue;
                    }
                    let on = pod.spec.node_name.as_str();
                    if on == node {
                        return Ok(());
                    }
                    nodes.push(if on.is_empty() {
                        "<unscheduled>".into()
                    } else {
                        on.to_string()
                    });
                }
                nodes.sort();
                nodes.dedup();
                if nodes.is_empty() {
                    Err(Status::permission_denied(format!(
                        "{caller} may not obtain {identity}: no known pod in namespace {:?} runs as service account {:?}",
                        identity.namespace(),
                        identity.service_account()
                    )))
                } else {
                    Err(Status::permission_denied(format!(
                        "{caller} may not obtain {identity}: its pods run on {nodes:?}, not on {node:?}"
                    )))
                }
            }
        }
    }
}

fn is_terminated(pod: &crate::k8s::Pod) -> bool {
    matches!(pod.status.phase.as_deref(), Some("Succeeded" | "Failed"))
}

/// The caller of a gRPC request on 15012 (CA and ADS), from its `authorization: Bearer`
/// metadata: `Unauthenticated` without a valid token, `Unavailable` when it cannot be checked.
pub(crate) async fn authenticate(
    auth: &dyn TokenAuthenticator,
    md: &tonic::metadata::MetadataMap,
) -> Result<Caller, Status> {
    let token = bearer_token(md)?;
    auth.authenticate(&token).await.map_err(|e| match e {
        AuthError::Invalid(m) => Status::unauthenticated(format!("invalid token: {m}")),
        AuthError::Unavailable(m) => Status::unavailable(m),
    })
}

fn bearer_token(md: &tonic::metadata::MetadataMap) -> Result<String, Status> {
    let Some(v) = md.get("authorization") else {
        return Err(Status::unauthenticated(
            "missing `authorization: Bearer <token>` metadata",
        ));
    };
    let v = v
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization metadata is not valid text"))?;
    let token = v
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Status::unauthenticated("authorization metadata is not of the form `Bearer <token>`")
        })?;
    Ok(token.to_string())
}

/// The identity a CSR asks for: its single SPIFFE URI SAN.
fn csr_identity(csr_pem: &str) -> Result<Identity, Status> {
    if csr_pem.len() > 64 * 1024 {
        return Err(Status::invalid_argument("CSR larger than 64 KiB"));
    }
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        Status::invalid_argument(format!("CSR is not a valid PEM PKCS#10 request: {e}"))
    })?;
    let uris: Vec<String> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            rcgen::SanType::URI(u) => Some(u.as_str().to_string()),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(Status::invalid_argument(format!(
            "CSR must carry exactly one URI SAN (the SPIFFE identity), it carries {uris:?}"
        )));
    };
    uri.parse::<Identity>()
        .map_err(|e| Status::invalid_argument(format!("CSR URI SAN: {e}")))
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = crate::xds::server::peer_addr(&request);
        match self.handle(request).await {
            Ok((caller, identity, cert_chain)) => {
                self.metrics.count("ok");
                info!(%caller, %identity, ?peer, "certificate issued");
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(status) => {
                let result = match status.code() {
                    tonic::Code::Unauthenticated => "unauthenticated",
                    tonic::Code::PermissionDenied => "denied",
                    tonic::Code::InvalidArgument => "invalid",
                    _ => "error",
                };
                self.metrics.count(result);
                warn!(?peer, code = ?status.code(), "certificate refused: {}", status.message());
                Err(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_tokens() {
        let dir = std::env::temp_dir().join(format!("zmesh-tokens-{}", rand::random::<u64>()));
        let t1 = write_bootstrap_token(&dir, "node-1").unwrap();
        std::fs::write(dir.join("short.token"), "abc").unwrap();
        std::fs::write(dir.join("README"), &t1).unwrap();
        let a = FileTokenAuthenticator::new(&dir);
        assert_eq!(
            a.authenticate(&t1).await.unwrap(),
            Caller::Node {
                node: "node-1".into()
            }
        );
        assert!(matches!(
            a.authenticate("abc").await,
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            a.authenticate("x".repeat(64).as_str()).await,
            Err(AuthError::Invalid(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        let e = a.authenticate(&t1).await.unwrap_err();
        assert!(e.to_string().contains("no bootstrap tokens"), "{e}");
    }

    #[test]
    fn bearer_parsing() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(
            bearer_token(&md).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        md.insert("authorization", "Basic abc".parse().unwrap());
        assert!(bearer_token(&md).is_err());
        md.insert("authorization", "bearer  tok ".parse().unwrap());
        assert_eq!(bearer_token(&md).unwrap(), "tok");
    }
}
