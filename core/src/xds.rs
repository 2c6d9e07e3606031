//! Control-plane clients: the Delta ADS client ([`XdsClient`], a [`ConfigSource`]) and the CA
//! client ([`CaClient`], a [`CertificateProvider`]), speaking istiod's wire protocol so they work
//! against zmesh's controller and against istiod alike.
//!
//! **xDS** (`envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`):
//! one stream, wildcard subscriptions to `istio.workload.Address` and
//! `istio.security.Authorization`, node id `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`.
//! Every response is applied to the [`StateStore`] as one atomic [`StateUpdate`] (upserts and
//! removals) and ACKed; resources that fail to decode are NACKed (per-resource errors joined
//! with `"; "`) while the good ones of the same response still apply. On reconnect the client
//! sends `initial_resource_versions` of everything it holds, so only changes come back. While
//! disconnected the state is kept and served; reconnects back off exponentially with jitter
//! (100 ms → 15 s). The store is marked synced after the first response of every type.
//!
//! **Metrics** ([`XdsMetrics`], Istio's `istio_xds_*`): streams ended per [`TerminationReason`],
//! responses and their encoded bytes per type URL. The proxies register them when their
//! config source is an `XdsClient` ([`ConfigSource::register_metrics`]).
//!
//! **Extra types**: [`XdsClient::with_extra_type`] subscribes (wildcard) to another type URL
//! whose resources go to a [`ResourceHandler`] instead of the [`StateStore`] (the waypoint's
//! L7 configuration). The handler gets each response's upserts and removals in one call and
//! returns per-resource errors, which are NACKed like decoding errors (the previous version of
//! those resources stays held). Extra types count for the initial sync: the store is marked
//! synced only once every subscribed type, extra ones included, has had its first response —
//! except types added with [`XdsClient::with_optional_type`].
//!
//! **CA** (`istio.v1.auth.IstioCertificateService/CreateCertificate`): CSR in, PEM chain out,
//! authenticated with `authorization: Bearer <token>` (+ `clusterid`), and in node-agent mode
//! the `ImpersonatedIdentity` metadata field.
//!
//! **TLS** to the control plane: the server must chain to the configured roots and present
//! one of the expected SPIFFE identities as a URI SAN (zmesh's controller), or — when a DNS
//! name is configured — be valid for that name (istiod's serving certificate).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::{
    EncodeLabel, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prost::Message;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_name;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};
use zmesh_proto::ca::IstioCertificateRequest;
use zmesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use zmesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use zmesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node};
use zmesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

use crate::certs::{CertError, CertificateProvider};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::state::{ConfigSource, Policy, Service, StateError, StateStore, StateUpdate, Workload};

/// Largest xDS response accepted (Istio's ztunnel: 200 MiB).
pub const MAX_RESPONSE_BYTES: usize = 200 * 1024 * 1024;
/// Node id IP used when the instance IP is unknown (Istio's default).
pub const UNKNOWN_INSTANCE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1));
/// Metadata field of a CSR request naming the identity a node agent asks for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// gRPC code put in NACKs' `error_detail` (INVALID_ARGUMENT).
const NACK_CODE: i32 = 3;

/// Why talking to the control plane failed.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error(
        "control plane address {address:?} is invalid: {reason} (expected http://host:port or https://host:port)"
    )]
    BadAddress { address: String, reason: String },
    #[error(
        "control plane address {address} uses https but no root certificates were configured to verify it"
    )]
    NoRoots { address: String },
    #[error("cannot read root certificates from {path}: {reason}")]
    Roots { path: String, reason: String },
    #[error("TLS settings for {address}: {reason}")]
    Tls { address: String, reason: String },
    #[error("cannot read the token file {path}: {reason}")]
    Token { path: String, reason: String },
    #[error("the token or cluster id is not a valid HTTP header value")]
    BadHeader,
    #[error("connecting to {address} failed: {reason}")]
    Connect { address: String, reason: String },
    #[error("{address}: xDS stream failed: {code:?}: {message}")]
    Stream {
        address: String,
        code: tonic::Code,
        message: String,
    },
    #[error("{address} closed the xDS stream")]
    Closed { address: String },
    #[error("{address}: no response to the xDS stream request within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
}

/// Istio's proxy node id: `<type>~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeId {
    /// `ztunnel`, `waypoint`, `sidecar`, ...
    pub proxy_type: String,
    pub ip: String,
    pub pod_name: String,
    pub pod_namespace: String,
    /// `<namespace>.svc.cluster.local`.
    pub domain: String,
}

impl NodeId {
    pub fn new(proxy_type: &str, ip: IpAddr, pod_name: &str, pod_namespace: &str) -> Self {
        NodeId {
            proxy_type: proxy_type.to_string(),
            ip: ip.to_string(),
            pod_name: pod_name.to_string(),
            pod_namespace: pod_namespace.to_string(),
            domain: format!("{pod_namespace}.svc.cluster.local"),
        }
    }

    /// Parse a node id; `None` when it does not have Istio's four `~`-separated parts.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split('~');
        let (t, ip, pod, domain) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || t.is_empty() {
            return None;
        }
        // why: namespaces cannot contain dots, pod names can.
        let (pod_name, pod_namespace) = pod.rsplit_once('.')?;
        Some(NodeId {
            proxy_type: t.to_string(),
            ip: ip.to_string(),
            pod_name: pod_name.to_string(),
            pod_namespace: pod_namespace.to_string(),
            domain: domain.to_string(),
        })
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}~{}~{}.{}~{}",
            self.proxy_type, self.ip, self.pod_name, self.pod_namespace, self.domain
        )
    }
}

/// Where the bearer token comes from. A file is re-read for every connection and request
/// (projected service-account tokens rotate).
#[derive(Clone, Debug, Default)]
pub enum TokenSource {
    #[default]
    None,
    Literal(String),
    File(PathBuf),
}

impl TokenSource {
    pub fn read(&self) -> Result<Option<String>, XdsError> {
        match self {
            TokenSource::None => Ok(None),
            TokenSource::Literal(t) => Ok(Some(t.trim().to_string())),
            TokenSource::File(p) => std::fs::read_to_string(p)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|e| XdsError::Token {
                    path: p.display().to_string(),
                    reason: e.to_string(),
                }),
        }
    }
}

/// How to verify the control plane's TLS certificate.
#[derive(Clone, Debug, Default)]
pub struct ControlPlaneTls {
    /// Trust anchors (the mesh root bundle).
    pub roots: Vec<CertificateDer<'static>>,
    /// Accept a server presenting one of these URI SANs (e.g.
    /// `spiffe://cluster.local/ns/istio-system/sa/zmesh-controller`).
    pub identities: Vec<String>,
    /// Or a server certificate valid for this DNS name (also sent as SNI), e.g.
    /// `istiod.istio-system.svc`.
    pub dns_name: Option<String>,
}

impl ControlPlaneTls {
    /// Roots from a PEM file (one or more certificates).
    pub fn load_roots(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, XdsError> {
        let err = |reason: String| XdsError::Roots {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let roots = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(e.to_string()))?;
        if roots.is_empty() {
            return Err(err("no CERTIFICATE block".into()));
        }
        Ok(roots)
    }

    fn client_config(&self, address: &str) -> Result<Arc<ClientConfig>, XdsError> {
        let err = |reason: String| XdsError::Tls {
            address: address.to_string(),
            reason,
        };
        if self.roots.is_empty() {
            return Err(XdsError::NoRoots {
                address: address.to_string(),
            });
        }
        if self.identities.is_empty() && self.dns_name.is_none() {
            return Err(err(
                "neither an expected server identity nor a DNS name to verify".into(),
            ));
        }
        let mut store = RootCertStore::empty();
        for r in &self.roots {
            store.add(r.clone()).map_err(|e| err(e.to_string()))?;
        }
        let dns = match &self.dns_name {
            Some(n) => Some(
                ServerName::try_from(n.clone()).map_err(|e| err(format!("DNS name {n:?}: {e}")))?,
            ),
            None => None,
        };
        let provider = crate::tls::provider();
        let verifier = ControlPlaneVerifier {
            roots: Arc::new(store),
            identities: self.identities.clone(),
            dns,
            algs: provider.signature_verification_algorithms,
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| err(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        config.alpn_protocols = vec![crate::tls::ALPN_H2.to_vec()];
        config.enable_sni = self.dns_name.is_some();
        Ok(Arc::new(config))
    }
}

/// The server's certificate was fine cryptographically but is not the control plane we want.
#[derive(Debug, thiserror::Error)]
#[error(
    "control plane certificate presents URI SANs {presented:?}, expected one of {expected:?}{}",
    .dns.as_ref().map(|d| format!(" or a certificate valid for {d}")).unwrap_or_default()
)]
struct ControlPlaneIdentityMismatch {
    presented: Vec<String>,
    expected: Vec<String>,
    dns: Option<String>,
}

#[derive(Debug)]
struct ControlPlaneVerifier {
    roots: Arc<RootCertStore>,
    identities: Vec<String>,
    dns: Option<ServerName<'static>>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ControlPlaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert =
            crate::tls::verify_chain(&self.roots, end_entity, intermediates, now, &self.algs)?;
        let presented = crate::tls::uri_sans(end_entity);
        if presented.iter().any(|p| self.identities.contains(p)) {
            return Ok(ServerCertVerified::assertion());
        }
        if let Some(dns) = &self.dns
            && verify_server_name(&cert, dns).is_ok()
        {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(ControlPlaneIdentityMismatch {
                presented,
                expected: self.identities.clone(),
                dns: self.dns.as_ref().map(|d| d.to_str().into_owned()),
            })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Connects TCP then TLS with our verifier (tonic's own TLS cannot check SPIFFE SANs).
#[derive(Clone)]
struct TlsConnector {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    timeout: Duration,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().ok_or("address has no host")?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(15012);
            let connect = async {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                let _ = tcp.set_nodelay(true);
                let tls = tokio_rustls::TlsConnector::from(this.config.clone())
                    .connect(this.server_name.clone(), tcp)
                    .await?;
                Ok::<_, std::io::Error>(tls)
            };
            let tls = tokio::time::timeout(this.timeout, connect)
                .await
                .map_err(|_| format!("TCP+TLS connect to {host}:{port} timed out"))??;
            Ok(TokioIo::new(tls))
        })
    }
}

/// How to reach a control-plane endpoint (xDS or CA).
#[derive(Clone, Debug)]
pub struct ControlPlaneEndpoint {
    /// `http://host:port` (plaintext, local use) or `https://host:port`.
    pub address: String,
    /// Required for `https`.
    pub tls: Option<ControlPlaneTls>,
    pub connect_timeout: Duration,
}

impl ControlPlaneEndpoint {
    pub fn new(address: impl Into<String>, tls: Option<ControlPlaneTls>) -> Self {
        ControlPlaneEndpoint {
            address: address.into(),
            tls,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// A lazily connecting channel (reconnects by itself on the next call after a failure).
    pub fn channel(&self) -> Result<Channel, XdsError> {
        let bad = |reason: String| XdsError::BadAddress {
            address: self.address.clone(),
            reason,
        };
        let uri: Uri = self.address.parse().map_err(|e| bad(format!("{e}")))?;
        let authority = uri
            .authority()
            .ok_or_else(|| bad("no host:port".into()))?
            .clone();
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            other => return Err(bad(format!("unsupported scheme {other:?}"))),
        };
        // why: TLS is done by our connector, so tonic must see a plain http URI.
        let endpoint = Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if !https {
            return Ok(endpoint.connect_lazy());
        }
        let tls = self.tls.as_ref().ok_or_else(|| XdsError::NoRoots {
            address: self.address.clone(),
        })?;
        let config = tls.client_config(&self.address)?;
        let server_name = match &tls.dns_name {
            Some(n) => ServerName::try_from(n.clone()).map_err(|e| XdsError::Tls {
                address: self.address.clone(),
                reason: e.to_string(),
            })?,
            None => crate::tls::server_name(),
        };
        Ok(endpoint.connect_with_connector_lazy(TlsConnector {
            config,
            server_name,
            timeout: self.connect_timeout,
        }))
    }
}

/// Add `authorization: Bearer <token>` and `clusterid` to a request.
fn auth_metadata(
    md: &mut MetadataMap,
    token: &TokenSource,
    cluster_id: Option<&str>,
) -> Result<(), XdsError> {
    if let Some(t) = token.read()? {
        let v = MetadataValue::try_from(format!("Bearer {t}")).map_err(|_| XdsError::BadHeader)?;
        md.insert("authorization", v);
    }
    if let Some(c) = cluster_id {
        md.insert(
            "clusterid",
            MetadataValue::try_from(c).map_err(|_| XdsError::BadHeader)?,
        );
    }
    Ok(())
}

/// Configuration of [`XdsClient`].
#[derive(Clone, Debug)]
pub struct XdsConfig {
    pub endpoint: ControlPlaneEndpoint,
    pub node: NodeId,
    /// Node metadata (`NAME`, `NAMESPACE`, `INSTANCE_IPS`, `NODE_NAME`, `CLUSTER_ID`, ...).
    pub metadata: BTreeMap<String, String>,
    pub token: TokenSource,
    pub cluster_id: Option<String>,
    /// Type URLs subscribed (wildcard).
    pub types: Vec<String>,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How long to wait for the stream to open (response headers).
    pub open_timeout: Duration,
}

impl XdsConfig {
    /// A ztunnel's subscription: Address + Authorization, Istio's node id and metadata.
    pub fn ztunnel(
        endpoint: ControlPlaneEndpoint,
        node_name: &str,
        pod_name: &str,
        pod_namespace: &str,
        instance_ip: Option<IpAddr>,
    ) -> Self {
        let ip = instance_ip.unwrap_or(UNKNOWN_INSTANCE_IP);
        let metadata = BTreeMap::from([
            ("NAME".to_string(), pod_name.to_string()),
            ("NAMESPACE".to_string(), pod_namespace.to_string()),
            ("INSTANCE_IPS".to_string(), ip.to_string()),
            ("NODE_NAME".to_string(), node_name.to_string()),
        ]);
        XdsConfig {
            endpoint,
            node: NodeId::new("ztunnel", ip, pod_name, pod_namespace),
            metadata,
            token: TokenSource::None,
            cluster_id: None,
            types: vec![
                ADDRESS_TYPE_URL.to_string(),
                AUTHORIZATION_TYPE_URL.to_string(),
            ],
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
            open_timeout: Duration::from_secs(15),
        }
    }

    /// A waypoint's subscription: Address + Authorization for the state store (the L7 types
    /// are added with [`XdsClient::with_extra_type`]); node id `waypoint~<ip>~<pod>.<ns>~...`.
    pub fn waypoint(
        endpoint: ControlPlaneEndpoint,
        pod_name: &str,
        pod_namespace: &str,
        instance_ip: Option<IpAddr>,
    ) -> Self {
        let ip = instance_ip.unwrap_or(UNKNOWN_INSTANCE_IP);
        let mut cfg = XdsConfig::ztunnel(endpoint, "", pod_name, pod_namespace, instance_ip);
        cfg.metadata.remove("NODE_NAME");
        cfg.node = NodeId::new("waypoint", ip, pod_name, pod_namespace);
        cfg
    }

    fn node(&self) -> Node {
        let fields = self
            .metadata
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(v.clone())),
                    },
                )
            })
            .collect();
        Node {
            id: self.node.to_string(),
            cluster: self.cluster_id.clone().unwrap_or_default(),
            metadata: Some(prost_types::Struct { fields }),
            build_version: String::new(),
        }
    }
}

/// Live counters of an [`XdsClient`] (tests, admin).
#[derive(Debug, Default)]
pub struct XdsStatus {
    /// Streams opened (first one included).
    pub connects: AtomicU64,
    pub responses: AtomicU64,
    pub nacks_sent: AtomicU64,
    pub connected: AtomicBool,
    /// Every subscribed type (extra types included) has had its first response.
    pub synced: AtomicBool,
}

impl XdsStatus {
    /// JSON for config dumps.
    pub fn dump(&self) -> serde_json::Value {
        serde_json::json!({
            "connected": self.connected.load(Ordering::Relaxed),
            "synced": self.synced.load(Ordering::Relaxed),
            "connects": self.connects.load(Ordering::Relaxed),
            "responses": self.responses.load(Ordering::Relaxed),
            "nacks_sent": self.nacks_sent.load(Ordering::Relaxed),
        })
    }
}

/// Why an ADS stream ended: the `reason` label of `istio_xds_connection_terminations_total`,
/// with Istio's values. How our failures map onto them is in [`stream_termination`] and
/// `XdsClient::session_inner`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum TerminationReason {
    /// The stream could not be opened, or the connection under it failed.
    ConnectionError,
    /// The server ended the stream with a gRPC error status.
    Error,
    /// The stream ended so that we reconnect at once: the server said it is going away and
    /// expects us back. (Istio also counts streams its client drops itself, e.g. on a new
    /// token; ours never drops a working stream.)
    Reconnect,
    /// The server ended the stream cleanly (gRPC status OK).
    Complete,
}

impl TerminationReason {
    /// Istio's label value.
    pub fn as_str(self) -> &'static str {
        match self {
            TerminationReason::ConnectionError => "ConnectionError",
            TerminationReason::Error => "Error",
            TerminationReason::Reconnect => "Reconnect",
            TerminationReason::Complete => "Complete",
        }
    }
}

impl EncodeLabelValue for TerminationReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct ReasonLabel {
    reason: TerminationReason,
}

impl EncodeLabelSet for ReasonLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        ("reason", self.reason).encode(encoder.encode_label())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct UrlLabel {
    url: String,
}

impl EncodeLabelSet for UrlLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        ("url", self.url.as_str()).encode(encoder.encode_label())
    }
}

/// `url` of responses whose type URL the client did not subscribe to (they are NACKed): a
/// misbehaving server cannot grow the label set without bound.
pub const UNSUBSCRIBED_URL_LABEL: &str = "unknown";

/// Istio's xDS client metrics. Clones share the counters; give them to a client with
/// [`XdsClient::with_metrics`] (the proxies do it through [`ConfigSource::register_metrics`]).
#[derive(Clone, Debug, Default)]
pub struct XdsMetrics {
    /// `istio_xds_connection_terminations_total{reason}`
    terminations: Family<ReasonLabel, Counter>,
    /// `istio_xds_message_total{url}`
    messages: Family<UrlLabel, Counter>,
    /// `istio_xds_message_bytes_total{url}`
    message_bytes: Family<UrlLabel, Counter>,
}

impl XdsMetrics {
    /// New counters, registered in `metrics` under the `istio_` prefix.
    pub fn new(metrics: &Metrics) -> Self {
        let m = XdsMetrics::default();
        metrics.with_registry(|r| {
            let istio = r.sub_registry_with_prefix("istio");
            istio.register(
                "xds_connection_terminations",
                "Streams to the xDS server that ended, by reason",
                m.terminations.clone(),
            );
            istio.register(
                "xds_message",
                "xDS responses received, by type URL",
                m.messages.clone(),
            );
            istio.register(
                "xds_message_bytes",
                "Protobuf-encoded size of the xDS responses received, by type URL",
                m.message_bytes.clone(),
            );
        });
        m
    }

    /// Streams that ended for `reason` so far.
    pub fn terminations(&self, reason: TerminationReason) -> u64 {
        self.terminations
            .get(&ReasonLabel { reason })
            .map_or(0, |c| c.get())
    }

    fn record_termination(&self, reason: TerminationReason) {
        self.terminations
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Count one response (before it is applied: NACKed ones were received too).
    fn record_response(&self, resp: &DeltaDiscoveryResponse, subscribed: &[String]) {
        let url = if subscribed.contains(&resp.type_url) {
            resp.type_url.clone()
        } else {
            UNSUBSCRIBED_URL_LABEL.to_string()
        };
        let label = UrlLabel { url };
        self.messages.get_or_create(&label).inc();
        // usize → u64 never truncates on the targets we build for.
        self.message_bytes
            .get_or_create(&label)
            .inc_by(resp.encoded_len() as u64);
    }
}

/// One resource of an extra type as received: name, version and the encoded body
/// (`Any.value`, whose type URL has already been checked against the response's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedResource {
    pub name: String,
    pub version: String,
    pub value: Vec<u8>,
}

/// A resource a [`ResourceHandler`] could not apply; it is NACKed with this message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{name}: {message}")]
pub struct ResourceError {
    pub name: String,
    pub message: String,
}

/// Receives the resources of an extra type URL (see [`XdsClient::with_extra_type`]).
pub trait ResourceHandler: Send + Sync + 'static {
    /// Apply one response of `type_url`: `updated` are added or changed, `removed` are gone.
    /// Apply it as one unit (readers should never see half a response). Resources listed in
    /// the returned errors are NACKed and must keep their previous version (if any); the
    /// others count as applied. Must not block for long: it runs on the xDS stream's task.
    fn apply_resources(
        &self,
        type_url: &str,
        updated: &[ReceivedResource],
        removed: &[String],
    ) -> Vec<ResourceError>;
}

/// What a resource name stands for in the state (Address names are workloads or services).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Held {
    Workload(String),
    Service(String),
    Policy(String),
    /// A resource of an extra type (its handler keeps the content).
    Extra,
}

/// The Delta ADS client; see the module docs.
pub struct XdsClient {
    cfg: XdsConfig,
    stop: CancellationToken,
    status: Arc<XdsStatus>,
    /// Extra type URLs and their handlers (not in `cfg.types`).
    extra: Vec<(String, Arc<dyn ResourceHandler>)>,
    /// Extra types the initial sync does not wait for (see [`XdsClient::with_optional_type`]).
    optional: Vec<String>,
    metrics: Option<XdsMetrics>,
}

impl XdsClient {
    pub fn new(cfg: XdsConfig) -> Self {
        XdsClient {
            cfg,
            stop: CancellationToken::new(),
            status: Arc::default(),
            extra: Vec::new(),
            optional: Vec::new(),
            metrics: None,
        }
    }

    /// Record Istio's `istio_xds_*` metrics in `metrics` (registered by their creator, see
    /// [`XdsMetrics::new`]).
    pub fn with_metrics(mut self, metrics: XdsMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Also subscribe (wildcard) to `type_url`, handing its resources to `handler` instead of
    /// the state store. A type already subscribed (in [`XdsConfig::types`] or added before) is
    /// moved to this handler.
    pub fn with_extra_type(
        mut self,
        type_url: impl Into<String>,
        handler: Arc<dyn ResourceHandler>,
    ) -> Self {
        let type_url = type_url.into();
        self.cfg.types.retain(|t| *t != type_url);
        self.extra.retain(|(t, _)| *t != type_url);
        self.optional.retain(|t| *t != type_url);
        self.extra.push((type_url, handler));
        self
    }

    /// Like [`XdsClient::with_extra_type`], for a type the proxy can run without: the initial
    /// sync does not wait for its first response. A control plane older than the proxy ignores
    /// a type it does not serve, and the proxy must still become ready against it (a new
    /// waypoint during a rolling upgrade of the controller).
    pub fn with_optional_type(
        self,
        type_url: impl Into<String>,
        handler: Arc<dyn ResourceHandler>,
    ) -> Self {
        let type_url = type_url.into();
        let mut c = self.with_extra_type(type_url.clone(), handler);
        c.optional.push(type_url);
        c
    }

    /// Every subscribed type URL: the state store's, then the extra ones.
    pub fn type_urls(&self) -> Vec<String> {
        self.cfg
            .types
            .iter()
            .cloned()
            .chain(self.extra.iter().map(|(t, _)| t.clone()))
            .collect()
    }

    fn handler(&self, type_url: &str) -> Option<&Arc<dyn ResourceHandler>> {
        self.extra
            .iter()
            .find(|(t, _)| t == type_url)
            .map(|(_, h)| h)
    }

    /// Cancelling `stop` ends [`ConfigSource::run`] (the state is left as it is).
    pub fn with_stop(mut self, stop: CancellationToken) -> Self {
        self.stop = stop;
        self
    }

    pub fn status(&self) -> Arc<XdsStatus> {
        self.status.clone()
    }
}

/// What the client holds, across reconnects: per type, name → (version, what it is).
#[derive(Default)]
struct HeldResources {
    types: HashMap<String, HashMap<String, (String, Held)>>,
    synced: HashSet<String>,
}

/// One decoded resource.
enum Decoded {
    Workload(Box<Workload>),
    Service(Service),
    Policy(Policy),
}

fn decode(type_url: &str, r: &zmesh_proto::discovery::Resource) -> Result<Decoded, String> {
    let any = r.resource.as_ref().ok_or("resource has no body")?;
    if any.type_url != type_url {
        return Err(format!(
            "resource body has type {:?}, the response is for {type_url:?}",
            any.type_url
        ));
    }
    match type_url {
        ADDRESS_TYPE_URL => {
            use zmesh_proto::workload::address::Type;
            let a = zmesh_proto::workload::Address::decode(any.value.as_slice())
                .map_err(|e| format!("cannot decode istio.workload.Address: {e}"))?;
            match a.r#type {
                Some(Type::Workload(w)) => Workload::try_from(w)
                    .map(|w| Decoded::Workload(Box::new(w)))
                    .map_err(|e| e.to_string()),
                Some(Type::Service(s)) => Service::try_from(s)
                    .map(Decoded::Service)
                    .map_err(|e| e.to_string()),
                None => Err("Address has neither a workload nor a service".into()),
            }
        }
        AUTHORIZATION_TYPE_URL => {
            let a = zmesh_proto::security::Authorization::decode(any.value.as_slice())
                .map_err(|e| format!("cannot decode istio.security.Authorization: {e}"))?;
            Policy::try_from(a)
                .map(Decoded::Policy)
                .map_err(|e| e.to_string())
        }
        other => Err(format!("unsupported type {other:?}")),
    }
}

fn remove_held(update: &mut StateUpdate, held: Held) {
    match held {
        Held::Workload(k) => update.remove_workloads.push(k),
        Held::Service(k) => update.remove_services.push(k),
        Held::Policy(k) => update.remove_policies.push(k),
        Held::Extra => {}
    }
}

/// The body of a resource of an extra type, checked against the response's type URL.
fn extra_body(type_url: &str, r: &zmesh_proto::discovery::Resource) -> Result<Vec<u8>, String> {
    let any = r.resource.as_ref().ok_or("resource has no body")?;
    if any.type_url != type_url {
        return Err(format!(
            "resource body has type {:?}, the response is for {type_url:?}",
            any.type_url
        ));
    }
    Ok(any.value.clone())
}

impl HeldResources {
    /// Apply one response atomically; returns the ACK/NACK to send.
    fn apply(
        &mut self,
        store: &StateStore,
        types: &[String],
        handler: Option<&Arc<dyn ResourceHandler>>,
        resp: DeltaDiscoveryResponse,
    ) -> DeltaDiscoveryRequest {
        let type_url = resp.type_url.clone();
        let mut errors = Vec::new();
        if let Some(handler) = handler {
            self.apply_extra(handler.as_ref(), &resp, &mut errors);
        } else if !types.contains(&type_url) {
            errors.push(format!("type {type_url:?} was not subscribed"));
        } else {
            let held = self.types.entry(type_url.clone()).or_default();
            let mut update = StateUpdate::default();
            let mut fresh = Vec::new();
            for name in &resp.removed_resources {
                if let Some((_, h)) = held.remove(name) {
                    remove_held(&mut update, h);
                }
            }
            for r in &resp.resources {
                let (h, ok) = match decode(&type_url, r) {
                    Ok(Decoded::Workload(w)) => {
                        let h = Held::Workload(w.uid.clone());
                        update.upsert_workloads.push(*w);
                        (h, true)
                    }
                    Ok(Decoded::Service(s)) => {
                        let h = Held::Service(s.key());
                        update.upsert_services.push(s);
                        (h, true)
                    }
                    Ok(Decoded::Policy(p)) => {
                        let h = Held::Policy(p.key());
                        update.upsert_policies.push(p);
                        (h, true)
                    }
                    Err(e) => {
                        errors.push(format!("{}: {e}", r.name));
                        (Held::Extra, false)
                    }
                };
                if !ok {
                    continue; // why: keep the last good version of this resource
                }
                // A name that changed what it stands for (service → workload, new uid)
                // drops the old object in the same atomic update.
                if let Some((_, old)) = held.get(&r.name)
                    && *old != h
                {
                    remove_held(&mut update, old.clone());
                }
                fresh.push((r.name.clone(), r.version.clone(), h));
            }
            let outcome = store.apply(update);
            for e in &outcome.rejected {
                errors.push(e.to_string());
            }
            for (name, version, h) in fresh {
                held.insert(name, (version, h));
            }
            self.synced.insert(type_url.clone());
        }
        let error_detail = (!errors.is_empty()).then(|| zmesh_proto::google::rpc::Status {
            code: NACK_CODE,
            message: errors.join("; "),
            details: Vec::new(),
        });
        DeltaDiscoveryRequest {
            type_url,
            response_nonce: resp.nonce,
            error_detail,
            ..Default::default()
        }
    }

    /// One response of an extra type: bodies checked here, content applied by the handler.
    fn apply_extra(
        &mut self,
        handler: &dyn ResourceHandler,
        resp: &DeltaDiscoveryResponse,
        errors: &mut Vec<String>,
    ) {
        let type_url = resp.type_url.as_str();
        let mut updated = Vec::with_capacity(resp.resources.len());
        for r in &resp.resources {
            match extra_body(type_url, r) {
                Ok(value) => updated.push(ReceivedResource {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    value,
                }),
                Err(e) => errors.push(format!("{}: {e}", r.name)),
            }
        }
        let rejected = handler.apply_resources(type_url, &updated, &resp.removed_resources);
        let held = self.types.entry(type_url.to_string()).or_default();
        for name in &resp.removed_resources {
            held.remove(name);
        }
        for r in updated {
            // why: a rejected resource keeps its last good version (the handler kept it too).
            if !rejected.iter().any(|e| e.name == r.name) {
                held.insert(r.name, (r.version, Held::Extra));
            }
        }
        errors.extend(rejected.iter().map(ToString::to_string));
        self.synced.insert(type_url.to_string());
    }
}

/// Jittered delay in [d/2, d].
fn jitter(d: Duration) -> Duration {
    let f: f64 = rand::random();
    d.mul_f64(0.5 + f * 0.5)
}

/// How a stream ended, other than by `stop`: what to count and what to log.
type Ended = (TerminationReason, XdsError);

/// Who ended a stream that failed with `s` after it had opened, in Istio's terms.
///
/// tonic attaches the local error (connection reset, EOF, keepalive timeout, h2 error) as the
/// status' source when it made the status itself; a status the server sent in its trailers has
/// none. So:
/// - a source: the transport failed under the stream (the control plane died, the network
///   broke), whatever code tonic chose → `ConnectionError`;
/// - `Unavailable`, `Cancelled`, `DeadlineExceeded` or `Unknown` from the server: it is going
///   away and expects us back (our controller's shutdown, istiod's connection age limit, a
///   proxy resetting the stream); Istio's client counts these as `Reconnect` too;
/// - any other code from the server (`InvalidArgument`, `PermissionDenied`, ...) → `Error`.
fn stream_termination(s: &tonic::Status) -> TerminationReason {
    use std::error::Error as _;
    if s.source().is_some() {
        return TerminationReason::ConnectionError;
    }
    match s.code() {
        tonic::Code::Unavailable
        | tonic::Code::Cancelled
        | tonic::Code::DeadlineExceeded
        | tonic::Code::Unknown => TerminationReason::Reconnect,
        _ => TerminationReason::Error,
    }
}

impl XdsClient {
    /// One stream: `(received at least one response, how it ended)`; `Ok` when stopped.
    async fn session(
        &self,
        store: &StateStore,
        held: &mut HeldResources,
    ) -> (bool, Result<(), Ended>) {
        let mut got_response = false;
        let r = self.session_inner(store, held, &mut got_response).await;
        self.status.connected.store(false, Ordering::Relaxed);
        (got_response, r)
    }

    /// Runs one stream. Each way out names its [`TerminationReason`]; in short:
    /// - the stream never opened (bad channel settings, unreadable token, no response headers
    ///   within `open_timeout`, refused, TLS failure, or a status instead of headers) →
    ///   `ConnectionError`, as Istio's client counts any failure to open the stream;
    /// - the stream failed after opening → [`stream_termination`];
    /// - the server ended the response stream with status OK → `Complete`;
    /// - our ACKs could no longer be sent (tonic dropped the request stream: the HTTP/2 stream
    ///   or connection is gone) → `ConnectionError`.
    async fn session_inner(
        &self,
        store: &StateStore,
        held: &mut HeldResources,
        got_response: &mut bool,
    ) -> Result<(), Ended> {
        let conn = |e: XdsError| (TerminationReason::ConnectionError, e);
        let cfg = &self.cfg;
        let address = cfg.endpoint.address.clone();
        let channel = cfg.endpoint.channel().map_err(conn)?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let all_types = self.type_urls();
        // Room for every initial request plus ACKs: the initial sends never block.
        let (tx, mut rx) = mpsc::channel::<DeltaDiscoveryRequest>(16 + all_types.len());
        let node = cfg.node();
        for t in &all_types {
            let initial = held
                .types
                .get(t)
                .map(|m| m.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            let _ = tx
                .send(DeltaDiscoveryRequest {
                    node: Some(node.clone()),
                    type_url: t.clone(),
                    initial_resource_versions: initial,
                    ..Default::default()
                })
                .await;
        }
        let outbound = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut req = tonic::Request::new(outbound);
        auth_metadata(req.metadata_mut(), &cfg.token, cfg.cluster_id.as_deref()).map_err(conn)?;
        let open = client.delta_aggregated_resources(req);
        let mut inbound = tokio::select! {
            _ = self.stop.cancelled() => return Ok(()),
            r = tokio::time::timeout(cfg.open_timeout, open) => match r {
                Err(_) => return Err(conn(XdsError::Timeout { address, timeout: cfg.open_timeout })),
                Ok(Err(s)) => return Err(conn(stream_err(&address, s))),
                Ok(Ok(resp)) => resp.into_inner(),
            },
        };
        self.status.connects.fetch_add(1, Ordering::Relaxed);
        self.status.connected.store(true, Ordering::Relaxed);
        info!(%address, node = %cfg.node, "xDS stream open");
        loop {
            let msg = tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                m = inbound.message() => m,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => {
                    return Err((TerminationReason::Complete, XdsError::Closed { address }));
                }
                Err(s) => return Err((stream_termination(&s), stream_err(&address, s))),
            };
            *got_response = true;
            self.status.responses.fetch_add(1, Ordering::Relaxed);
            if let Some(m) = &self.metrics {
                m.record_response(&resp, &all_types);
            }
            debug!(type_url = %resp.type_url, version = %resp.system_version_info,
                resources = resp.resources.len(), removed = resp.removed_resources.len(), "xDS response");
            let handler = self.handler(&resp.type_url);
            let ack = held.apply(store, &cfg.types, handler, resp);
            if let Some(e) = &ack.error_detail {
                self.status.nacks_sent.fetch_add(1, Ordering::Relaxed);
                warn!(type_url = %ack.type_url, "NACK: {}", e.message);
            }
            if !self.status.synced.load(Ordering::Relaxed)
                && all_types
                    .iter()
                    .filter(|t| !self.optional.contains(t))
                    .all(|t| held.synced.contains(t))
            {
                info!(%address, "xDS initial sync complete");
                self.status.synced.store(true, Ordering::Relaxed);
                if !store.is_synced() {
                    store.mark_synced();
                }
            }
            if tx.send(ack).await.is_err() {
                return Err(conn(XdsError::Closed { address }));
            }
        }
    }
}

fn stream_err(address: &str, s: tonic::Status) -> XdsError {
    XdsError::Stream {
        address: address.to_string(),
        code: s.code(),
        message: s.message().to_string(),
    }
}

#[async_trait::async_trait]
impl ConfigSource for XdsClient {
    async fn run(self: Box<Self>, store: Arc<StateStore>) -> Result<(), StateError> {
        let mut held = HeldResources::default();
        let mut backoff = self.cfg.initial_backoff;
        loop {
            if self.stop.is_cancelled() {
                return Ok(());
            }
            let (worked, result) = self.session(&store, &mut held).await;
            if self.stop.is_cancelled() {
                return Ok(());
            }
            if worked {
                // why: a stream that worked and then broke (controller restart) reconnects
                // quickly; only repeated failures back off further.
                backoff = self.cfg.initial_backoff;
            }
            match result {
                Ok(()) => warn!(address = %self.cfg.endpoint.address,
                    "xDS stream ended; reconnecting (keeping the last configuration)"),
                Err((reason, e)) => {
                    if let Some(m) = &self.metrics {
                        m.record_termination(reason);
                    }
                    warn!(
                        reason = reason.as_str(),
                        "{e}; reconnecting in about {backoff:?} (keeping the last configuration)"
                    )
                }
            }
            let delay = jitter(backoff);
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
            backoff = (backoff * 2).min(self.cfg.max_backoff);
        }
    }

    fn name(&self) -> &str {
        "xds"
    }

    fn register_metrics(&mut self, metrics: &Metrics) {
        // why: metrics given with `with_metrics` were registered by whoever made them;
        // registering them again would print every series twice.
        if self.metrics.is_none() {
            self.metrics = Some(XdsMetrics::new(metrics));
        }
    }
}

/// Configuration of [`CaClient`].
#[derive(Clone, Debug)]
pub struct CaClientConfig {
    pub endpoint: ControlPlaneEndpoint,
    pub token: TokenSource,
    pub cluster_id: Option<String>,
    /// Node-agent mode: name the requested identity in `ImpersonatedIdentity` metadata.
    pub impersonate: bool,
    /// Deadline of one CreateCertificate call.
    pub timeout: Duration,
}

impl CaClientConfig {
    pub fn new(endpoint: ControlPlaneEndpoint, token: TokenSource) -> Self {
        CaClientConfig {
            endpoint,
            token,
            cluster_id: None,
            impersonate: true,
            timeout: Duration::from_secs(10),
        }
    }
}

/// The CA refused or could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("CA at {address} refused the request: {code:?}: {message}")]
    Refused {
        address: String,
        code: tonic::Code,
        message: String,
    },
    #[error("CA at {address} did not answer within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    #[error(transparent)]
    Setup(#[from] XdsError),
}

/// [`CertificateProvider`] over `IstioCertificateService/CreateCertificate`.
pub struct CaClient {
    cfg: CaClientConfig,
    client: IstioCertificateServiceClient<Channel>,
}

impl CaClient {
    /// Builds a lazily connecting client (no network I/O here).
    pub fn new(cfg: CaClientConfig) -> Result<Self, XdsError> {
        let client = IstioCertificateServiceClient::new(cfg.endpoint.channel()?);
        Ok(CaClient { cfg, client })
    }

    /// Request a chain for `identity` (PEM, leaf first, root bundle last).
    pub async fn create_certificate(
        &self,
        identity: &Identity,
        csr_pem: String,
        lifetime: Duration,
    ) -> Result<Vec<String>, CaClientError> {
        let metadata = self.cfg.impersonate.then(|| prost_types::Struct {
            fields: BTreeMap::from([(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
                },
            )]),
        });
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem,
            validity_duration: i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX),
            metadata,
        });
        auth_metadata(
            req.metadata_mut(),
            &self.cfg.token,
            self.cfg.cluster_id.as_deref(),
        )?;
        req.set_timeout(self.cfg.timeout);
        let address = self.cfg.endpoint.address.clone();
        let mut client = self.client.clone();
        let resp = tokio::time::timeout(self.cfg.timeout, client.create_certificate(req))
            .await
            .map_err(|_| CaClientError::Timeout {
                address: address.clone(),
                timeout: self.cfg.timeout,
            })?
            .map_err(|s| CaClientError::Refused {
                address,
                code: s.code(),
                message: s.message().to_string(),
            })?;
        Ok(resp.into_inner().cert_chain)
    }
}

#[async_trait::async_trait]
impl CertificateProvider for CaClient {
    async fn sign(
        &self,
        identity: &Identity,
        csr_pem: String,
        lifetime: Duration,
    ) -> Result<Vec<String>, CertError> {
        self.create_certificate(identity, csr_pem, lifetime)
            .await
            .map_err(|e| CertError::Provider {
                identity: identity.clone(),
                source: Box::new(e),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_round_trip() {
        let n = NodeId::new(
            "ztunnel",
            "10.0.0.1".parse().unwrap(),
            "ztunnel-abc",
            "istio-system",
        );
        let s = n.to_string();
        assert_eq!(
            s,
            "ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
        );
        assert_eq!(NodeId::parse(&s), Some(n));
        let dotted = NodeId::parse("waypoint~1.1.1.1~a.b.c.ns~ns.svc.cluster.local").unwrap();
        assert_eq!(dotted.pod_name, "a.b.c");
        assert_eq!(dotted.pod_namespace, "ns");
        assert!(NodeId::parse("nonsense").is_none());
        assert!(NodeId::parse("a~b~c~d~e").is_none());
    }

    /// Records what it was given; rejects resources named `bad*`.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<(Vec<String>, Vec<String>)>>);

    impl ResourceHandler for Recorder {
        fn apply_resources(
            &self,
            _type_url: &str,
            updated: &[ReceivedResource],
            removed: &[String],
        ) -> Vec<ResourceError> {
            self.0.lock().unwrap().push((
                updated.iter().map(|r| r.name.clone()).collect(),
                removed.to_vec(),
            ));
            updated
                .iter()
                .filter(|r| r.name.starts_with("bad"))
                .map(|r| ResourceError {
                    name: r.name.clone(),
                    message: "rejected".into(),
                })
                .collect()
        }
    }

    fn res(name: &str, type_url: &str) -> zmesh_proto::discovery::Resource {
        zmesh_proto::discovery::Resource {
            name: name.into(),
            version: "v1".into(),
            resource: Some(prost_types::Any {
                type_url: type_url.into(),
                value: vec![1, 2, 3],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn extra_types_go_to_their_handler_and_nack_per_resource() {
        const T: &str = "type.googleapis.com/test.Extra";
        let store = StateStore::new();
        let rec = Arc::new(Recorder::default());
        let handler: Arc<dyn ResourceHandler> = rec.clone();
        let mut held = HeldResources::default();
        let ack = held.apply(
            &store,
            &[],
            Some(&handler),
            DeltaDiscoveryResponse {
                type_url: T.into(),
                nonce: "n1".into(),
                resources: vec![res("good", T), res("bad", T), res("wrong", "other")],
                ..Default::default()
            },
        );
        let e = ack.error_detail.expect("NACK");
        assert!(e.message.contains("bad: rejected"), "{}", e.message);
        assert!(
            e.message.contains("wrong: resource body has type"),
            "{}",
            e.message
        );
        assert_eq!(ack.response_nonce, "n1");
        assert_eq!(rec.0.lock().unwrap()[0].0, vec!["good", "bad"]);
        let names: HashSet<&String> = held.types[T].keys().collect();
        assert_eq!(names, HashSet::from([&"good".to_string()]));
        assert!(held.synced.contains(T));
        let ack = held.apply(
            &store,
            &[],
            Some(&handler),
            DeltaDiscoveryResponse {
                type_url: T.into(),
                nonce: "n2".into(),
                removed_resources: vec!["good".into()],
                ..Default::default()
            },
        );
        assert!(ack.error_detail.is_none());
        assert!(held.types[T].is_empty());
        assert_eq!(rec.0.lock().unwrap()[1].1, vec!["good"]);
        // The state store was never touched.
        assert!(!store.is_synced());
    }

    #[test]
    fn stream_endings_map_to_istio_termination_reasons() {
        use TerminationReason::*;
        use tonic::{Code, Status};
        // Sent by the server: "come back" codes, then real errors.
        for code in [
            Code::Unavailable,
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Unknown,
        ] {
            assert_eq!(
                stream_termination(&Status::new(code, "x")),
                Reconnect,
                "{code:?}"
            );
        }
        for code in [
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::InvalidArgument,
            Code::Internal,
            Code::ResourceExhausted,
        ] {
            assert_eq!(
                stream_termination(&Status::new(code, "x")),
                Error,
                "{code:?}"
            );
        }
        // Made by tonic from a local transport error (it keeps the error as the source).
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let s = Status::from_error(Box::new(reset));
        assert_eq!(stream_termination(&s), ConnectionError, "{s:?}");
        assert_eq!(ConnectionError.as_str(), "ConnectionError");
        assert_eq!(Complete.as_str(), "Complete");
    }

    #[test]
    fn bad_addresses() {
        let e = ControlPlaneEndpoint::new("ftp://x:1", None)
            .channel()
            .unwrap_err();
        assert!(e.to_string().contains("unsupported scheme"), "{e}");
        let e = ControlPlaneEndpoint::new("https://127.0.0.1:15012", None)
            .channel()
            .unwrap_err();
        assert!(matches!(e, XdsError::NoRoots { .. }), "{e}");
    }
}
