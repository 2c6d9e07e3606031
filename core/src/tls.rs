//! rustls configurations with Istio's (ztunnel's) verification rules.
//!
//! * TLS 1.3 only, AES-GCM suites only (no ChaCha20), aws-lc-rs, ALPN `h2`.
//! * Server: client certificate required, chained to our roots, and its SPIFFE identity must be
//!   in our trust domain (`TrustDomainVerifier`).
//! * Client: server chained to our roots with serverAuth EKU, then any URI SAN of the leaf must
//!   be one of the expected identities; the DNS name is not checked, SNI is off, no resumption.
//!
//! Verification failures carry a [`PeerVerificationError`] inside
//! `CertificateError::Other`, so logs say which identities were expected and presented.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, aws_lc_rs};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::certs::WorkloadCertificate;
use crate::identity::Identity;

/// ALPN for HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// Bound on cached client configs per certificate (distinct expected-identity sets).
const MAX_CACHED_CLIENT_CONFIGS: usize = 256;

/// aws-lc-rs provider restricted to TLS13_AES_256_GCM_SHA384 and TLS13_AES_128_GCM_SHA256.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
                    aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
                ],
                ..aws_lc_rs::default_provider()
            })
        })
        .clone()
}

/// Install aws-lc-rs as the process default (idempotent). The full provider is installed, not
/// the restricted one: other clients in the process (Kubernetes API, …) may need TLS 1.2.
pub fn install_default_provider() {
    // why: Err only means a provider is already installed, which is what we want.
    let _ = aws_lc_rs::default_provider().install_default();
}

/// The dummy server name clients pass (Istio uses 0.0.0.0; SNI is disabled anyway).
pub fn server_name() -> ServerName<'static> {
    ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into())
}

/// A TLS configuration could not be built from a workload certificate.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS config for {identity}: trust bundle is unusable: {reason}")]
    Roots { identity: Identity, reason: String },
    #[error("TLS config for {identity}: cannot build client certificate verifier: {reason}")]
    Verifier { identity: Identity, reason: String },
    #[error("TLS config for {identity}: certificate/key rejected by rustls: {source}")]
    Rustls {
        identity: Identity,
        #[source]
        source: Box<rustls::Error>,
    },
    #[error("TLS client config for {identity}: no expected server identities given")]
    NoExpectedIdentities { identity: Identity },
}

/// Why a peer's certificate was refused after its chain verified. Carried inside
/// `rustls::CertificateError::Other`; see [`describe_handshake_error`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerVerificationError {
    #[error("server identity mismatch (expected {expected:?}, got {presented:?})")]
    ServerIdentityMismatch {
        expected: Vec<String>,
        presented: Vec<String>,
    },
    #[error(
        "client trust domain mismatch (expected an identity in trust domain {expected:?}, got {presented:?})"
    )]
    ClientTrustDomainMismatch {
        expected: String,
        presented: Vec<String>,
    },
}

impl From<PeerVerificationError> for rustls::Error {
    fn from(e: PeerVerificationError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

/// rustls configs built from one [`WorkloadCertificate`], built on first use.
#[derive(Default)]
pub(crate) struct ConfigCache {
    server: OnceLock<Arc<ServerConfig>>,
    clients: Mutex<HashMap<Vec<Identity>, Arc<ClientConfig>>>,
}

impl std::fmt::Debug for ConfigCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigCache")
            .field("server", &self.server.get().is_some())
            .finish_non_exhaustive()
    }
}

impl WorkloadCertificate {
    /// TLS 1.3 only, ALPN h2, client certificate required and verified against `roots`, and
    /// the client leaf must carry a SPIFFE URI SAN in this certificate's trust domain.
    /// Built once per certificate.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        if let Some(config) = self.tls.server.get() {
            return Ok(config.clone());
        }
        let roots = self.root_store()?;
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Verifier {
                identity: self.identity.clone(),
                reason: e.to_string(),
            })?;
        let verifier = TrustDomainVerifier {
            inner,
            trust_domain: self.identity.trust_domain().to_string(),
        };
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| self.rustls_err(source))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|source| self.rustls_err(source))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        // why: our clients disable resumption, tickets would be wasted bytes.
        config.send_tls13_tickets = 0;
        let config = Arc::new(config);
        // why: a concurrent builder may have won; either config is equivalent.
        Ok(self.tls.server.get_or_init(|| config).clone())
    }

    /// TLS 1.3 only, ALPN h2, presents this certificate, SNI off, no resumption. The server
    /// must chain to `roots` (serverAuth EKU) and any URI SAN of its leaf must equal one of
    /// `expected`. Cached per expected set.
    pub fn client_config(&self, expected: &[Identity]) -> Result<Arc<ClientConfig>, TlsError> {
        if expected.is_empty() {
            return Err(TlsError::NoExpectedIdentities {
                identity: self.identity.clone(),
            });
        }
        let mut key = expected.to_vec();
        key.sort();
        key.dedup();
        if let Some(config) = self.client_cache().get(&key) {
            return Ok(config.clone());
        }
        let verifier = IdentityVerifier {
            roots: self.root_store()?,
            expected: key.iter().map(Identity::to_string).collect(),
            algs: provider().signature_verification_algorithms,
        };
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| self.rustls_err(source))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|source| self.rustls_err(source))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.enable_sni = false;
        config.resumption = Resumption::disabled();
        let config = Arc::new(config);
        let mut cache = self.client_cache();
        if cache.len() >= MAX_CACHED_CLIENT_CONFIGS {
            cache.clear(); // why: bound memory; rebuilding is cheap compared to a leak.
        }
        Ok(cache.entry(key).or_insert(config).clone())
    }

    fn client_cache(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<Identity>, Arc<ClientConfig>>> {
        self.tls
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn root_store(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut store = RootCertStore::empty();
        for root in &self.roots {
            store.add(root.clone()).map_err(|e| TlsError::Roots {
                identity: self.identity.clone(),
                reason: e.to_string(),
            })?;
        }
        if store.is_empty() {
            return Err(TlsError::Roots {
                identity: self.identity.clone(),
                reason: "no root certificates".into(),
            });
        }
        Ok(Arc::new(store))
    }

    fn rustls_err(&self, source: rustls::Error) -> TlsError {
        TlsError::Rustls {
            identity: self.identity.clone(),
            source: Box::new(source),
        }
    }
}

/// URI SANs of a certificate (empty if it does not parse).
pub(crate) fn uri_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, x509)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = x509.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_string()),
            _ => None,
        })
        .collect()
}

/// SPIFFE identity from the peer's leaf certificate (first URI SAN that parses).
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Identity> {
    let leaf = conn.peer_certificates()?.first()?;
    uri_sans(leaf).iter().find_map(|s| s.parse().ok())
}

/// The server certificate chains to `roots` (signature, validity, key usage); the name checks
/// are the caller's (SPIFFE URI SANs, not DNS names). Returns the parsed certificate.
pub(crate) fn verify_chain<'a>(
    roots: &RootCertStore,
    end_entity: &'a CertificateDer<'a>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<ParsedCertificate<'a>, rustls::Error> {
    let cert = ParsedCertificate::try_from(end_entity)?;
    verify_server_cert_signed_by_trust_anchor(&cert, roots, intermediates, now, algs.all)?;
    Ok(cert)
}

/// Client side: chain to our roots, then any URI SAN must be an expected identity.
#[derive(Debug)]
struct IdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<String>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_chain(&self.roots, end_entity, intermediates, now, &self.algs)?;
        let presented = uri_sans(end_entity);
        if presented.iter().any(|p| self.expected.contains(p)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(PeerVerificationError::ServerIdentityMismatch {
                expected: self.expected.clone(),
                presented,
            }
            .into())
        }
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

/// Server side: standard client verification plus "SPIFFE identity in our trust domain".
#[derive(Debug)]
struct TrustDomainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = uri_sans(end_entity);
        let in_domain = presented.iter().any(|s| {
            s.parse::<Identity>()
                .is_ok_and(|id| id.trust_domain() == self.trust_domain)
        });
        if in_domain {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(PeerVerificationError::ClientTrustDomainMismatch {
                expected: self.trust_domain.clone(),
                presented,
            }
            .into())
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Classify a handshake error for metrics/logs, e.g. "expired certificate", "unknown issuer",
/// "server identity mismatch (expected [...], got [...])", "client trust domain mismatch (...)",
/// "no client certificate". Errors the peer reported through an alert are prefixed "peer
/// rejected ...".
pub fn describe_handshake_error(err: &std::io::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = err
        .get_ref()
        .map(|e| e as &(dyn std::error::Error + 'static));
    while let Some(e) = source {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return describe_rustls_error(tls);
        }
        if let Some(peer) = e.downcast_ref::<PeerVerificationError>() {
            return peer.to_string();
        }
        source = e.source();
    }
    match err.kind() {
        std::io::ErrorKind::UnexpectedEof => "connection closed during TLS handshake".into(),
        _ => err.to_string(),
    }
}

fn describe_rustls_error(err: &rustls::Error) -> String {
    use rustls::Error as E;
    match err {
        E::InvalidCertificate(ce) => describe_certificate_error(ce),
        E::NoCertificatesPresented => "no client certificate".into(),
        E::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => {
                "no client certificate (peer requires one)".into()
            }
            AlertDescription::CertificateExpired => {
                "peer rejected our certificate: expired certificate".into()
            }
            AlertDescription::UnknownCA => "peer rejected our certificate: unknown issuer".into(),
            AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied => {
                format!("peer rejected our certificate ({alert:?})")
            }
            AlertDescription::DecryptError => {
                "peer rejected a signature (bad certificate signature or handshake signature)"
                    .into()
            }
            AlertDescription::ProtocolVersion => {
                "protocol version rejected by peer (TLS 1.3 required)".into()
            }
            AlertDescription::NoApplicationProtocol => {
                "no common ALPN protocol with peer (h2 required)".into()
            }
            other => format!("peer aborted the handshake (alert {other:?})"),
        },
        E::PeerIncompatible(p) => {
            format!("incompatible peer (TLS 1.3 with AES-GCM required): {p:?}")
        }
        E::NoApplicationProtocol => "no common ALPN protocol (h2 required)".into(),
        other => other.to_string(),
    }
}

fn describe_certificate_error(ce: &CertificateError) -> String {
    match ce {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "expired certificate".into()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "certificate not yet valid".into()
        }
        CertificateError::UnknownIssuer => "unknown issuer".into(),
        CertificateError::BadSignature => "bad certificate signature".into(),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "certificate not valid for this purpose (extended key usage)".into()
        }
        CertificateError::Other(OtherError(inner)) => {
            match inner.downcast_ref::<PeerVerificationError>() {
                Some(peer) => peer.to_string(),
                None => format!("invalid certificate: {inner}"),
            }
        }
        other => format!("invalid certificate: {other:?}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ca::CertificateAuthority;
    use std::time::{Duration, SystemTime};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

    pub(crate) type Handshake = (
        std::io::Result<server::TlsStream<DuplexStream>>,
        std::io::Result<client::TlsStream<DuplexStream>>,
    );

    pub(crate) fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    /// Runs both sides of a handshake over an in-memory pipe.
    pub(crate) async fn handshake_with(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> Handshake {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let accept = TlsAcceptor::from(server).accept(s);
        let connect = TlsConnector::from(client).connect(server_name(), c);
        tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(accept, connect)
        })
        .await
        .expect("handshake hung")
    }

    pub(crate) async fn handshake(
        server: &WorkloadCertificate,
        client: &WorkloadCertificate,
        expected: &[Identity],
    ) -> Handshake {
        handshake_with(
            server.server_config().unwrap(),
            client.client_config(expected).unwrap(),
        )
        .await
    }

    /// Sends `msg` both ways and checks it arrives.
    pub(crate) async fn echo<A, B>(a: &mut A, b: &mut B, msg: &[u8])
    where
        A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut buf = vec![0u8; msg.len()];
        a.write_all(msg).await.unwrap();
        a.flush().await.unwrap();
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg);
        b.write_all(msg).await.unwrap();
        b.flush().await.unwrap();
        a.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg);
    }

    fn valid(ca: &CertificateAuthority, identity: &Identity) -> WorkloadCertificate {
        let now = SystemTime::now();
        ca.issue(
            identity,
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
        .unwrap()
    }

    fn expired(ca: &CertificateAuthority, identity: &Identity) -> WorkloadCertificate {
        let now = SystemTime::now();
        ca.issue(
            identity,
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .unwrap()
    }

    fn rustls_err(e: &std::io::Error) -> &rustls::Error {
        e.get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .unwrap_or_else(|| panic!("not a rustls error: {e:?}"))
    }

    /// The client may finish its side of TLS 1.3 before the server refuses its certificate;
    /// then the refusal shows up on the first read.
    async fn client_refused(client: std::io::Result<client::TlsStream<DuplexStream>>) -> String {
        match client {
            Err(e) => describe_handshake_error(&e),
            Ok(mut stream) => {
                let mut buf = [0u8; 1];
                let e = stream
                    .read(&mut buf)
                    .await
                    .expect_err("client read should fail after server refused the handshake");
                describe_handshake_error(&e)
            }
        }
    }

    const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
    const HTTPBIN: &str = "spiffe://cluster.local/ns/default/sa/httpbin";

    #[tokio::test]
    async fn mutual_handshake_ok() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let server_cert = valid(&ca, &id(HTTPBIN));
        let client_cert = valid(&ca, &id(SLEEP));
        // expected set may contain several identities; any match is enough.
        let expected = [id("spiffe://cluster.local/ns/x/sa/y"), id(HTTPBIN)];
        let (s, c) = handshake(&server_cert, &client_cert, &expected).await;
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        {
            let (_, sconn) = s.get_ref();
            let (_, cconn) = c.get_ref();
            assert_eq!(peer_identity(sconn), Some(id(SLEEP)));
            assert_eq!(peer_identity(cconn), Some(id(HTTPBIN)));
            for conn in [&**sconn as &rustls::CommonState, &**cconn] {
                assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
                assert_eq!(
                    conn.protocol_version(),
                    Some(rustls::ProtocolVersion::TLSv1_3)
                );
                let suite = conn.negotiated_cipher_suite().unwrap().suite();
                assert!(
                    suite == rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
                        || suite == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
                    "{suite:?}"
                );
            }
        }
        echo(&mut c, &mut s, b"hello through mTLS").await;
    }

    #[tokio::test]
    async fn configs_are_cached() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let cert = valid(&ca, &id(SLEEP));
        assert!(Arc::ptr_eq(
            &cert.server_config().unwrap(),
            &cert.server_config().unwrap()
        ));
        let a = cert.client_config(&[id(HTTPBIN), id(SLEEP)]).unwrap();
        let b = cert.client_config(&[id(SLEEP), id(HTTPBIN)]).unwrap();
        let other = cert.client_config(&[id(HTTPBIN)]).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &other));
        assert!(matches!(
            cert.client_config(&[]),
            Err(TlsError::NoExpectedIdentities { .. })
        ));
        install_default_provider();
        install_default_provider(); // idempotent
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
        let suites: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(
            suites,
            [
                rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
            ]
        );
    }

    #[tokio::test]
    async fn client_from_other_trust_domain_refused() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let other_ca = CertificateAuthority::generate("other.td").unwrap();
        let mut server_cert = valid(&ca, &id(HTTPBIN));
        // why: the server trusts the other root too, so only the trust-domain rule can refuse.
        server_cert.roots.push(other_ca.root_der());
        let mut client_cert = valid(&other_ca, &id("spiffe://other.td/ns/default/sa/sleep"));
        client_cert.roots.push(ca.root_der());

        let (s, c) = handshake(&server_cert, &client_cert, &[id(HTTPBIN)]).await;
        let err = s.expect_err("server must refuse a client from another trust domain");
        match rustls_err(&err) {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
                assert!(matches!(
                    inner.downcast_ref::<PeerVerificationError>(),
                    Some(PeerVerificationError::ClientTrustDomainMismatch { .. })
                ));
            }
            other => panic!("unexpected error {other:?}"),
        }
        let msg = describe_handshake_error(&err);
        assert!(msg.starts_with("client trust domain mismatch"), "{msg}");
        assert!(
            msg.contains("cluster.local") && msg.contains("spiffe://other.td/ns/default/sa/sleep")
        );
        let client_msg = client_refused(c).await;
        assert!(
            client_msg.starts_with("peer rejected our certificate"),
            "{client_msg}"
        );

        // Control: same trust setup, client from our trust domain is accepted.
        let good = valid(&ca, &id(SLEEP));
        let (s, c) = handshake(&server_cert, &good, &[id(HTTPBIN)]).await;
        assert!(s.is_ok() && c.is_ok());
    }

    #[tokio::test]
    async fn client_from_untrusted_ca_refused() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let server_cert = valid(&ca, &id(HTTPBIN));
        // A CA we do not trust, issuing a certificate for an identity in our trust domain.
        let rogue = CertificateAuthority::generate("rogue.example").unwrap();
        let mut client_cert = valid(&rogue, &id(SLEEP));
        client_cert.roots = vec![ca.root_der()];
        let (s, c) = handshake(&server_cert, &client_cert, &[id(HTTPBIN)]).await;
        assert_eq!(describe_handshake_error(&s.unwrap_err()), "unknown issuer");
        assert_eq!(
            client_refused(c).await,
            "peer rejected our certificate: unknown issuer"
        );

        // An impostor CA with the same name as ours: found by name, refused on signature.
        let impostor = CertificateAuthority::generate("cluster.local").unwrap();
        let mut client_cert = valid(&impostor, &id(SLEEP));
        client_cert.roots = vec![ca.root_der()];
        let (s, c) = handshake(&server_cert, &client_cert, &[id(HTTPBIN)]).await;
        assert_eq!(
            describe_handshake_error(&s.unwrap_err()),
            "bad certificate signature"
        );
        assert_eq!(
            client_refused(c).await,
            "peer rejected a signature (bad certificate signature or handshake signature)"
        );
    }

    #[tokio::test]
    async fn expired_client_cert_refused() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let server_cert = valid(&ca, &id(HTTPBIN));
        let client_cert = expired(&ca, &id(SLEEP));
        assert!(client_cert.is_expired());
        let (s, c) = handshake(&server_cert, &client_cert, &[id(HTTPBIN)]).await;
        let err = s.expect_err("server must refuse an expired client certificate");
        assert!(matches!(
            rustls_err(&err),
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        ));
        assert_eq!(describe_handshake_error(&err), "expired certificate");
        assert_eq!(
            client_refused(c).await,
            "peer rejected our certificate: expired certificate"
        );
    }

    #[tokio::test]
    async fn expired_server_cert_refused() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let server_cert = expired(&ca, &id(HTTPBIN));
        let client_cert = valid(&ca, &id(SLEEP));
        let (s, c) = handshake(&server_cert, &client_cert, &[id(HTTPBIN)]).await;
        let err = c.expect_err("client must refuse an expired server certificate");
        assert_eq!(describe_handshake_error(&err), "expired certificate");
        let serr = s.expect_err("server sees the client's alert");
        assert_eq!(
            describe_handshake_error(&serr),
            "peer rejected our certificate: expired certificate"
        );
    }

    #[tokio::test]
    async fn server_identity_not_expected_refused() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let server_cert = valid(&ca, &id(HTTPBIN));
        let client_cert = valid(&ca, &id(SLEEP));
        let expected = [id("spiffe://cluster.local/ns/default/sa/reviews")];
        let (s, c) = handshake(&server_cert, &client_cert, &expected).await;
        let err = c.expect_err("client must refuse an unexpected server identity");
        match rustls_err(&err) {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
                assert!(matches!(
                    inner.downcast_ref::<PeerVerificationError>(),
                    Some(PeerVerificationError::ServerIdentityMismatch { .. })
                ));
            }
            other => panic!("unexpected error {other:?}"),
        }
        let msg = describe_handshake_error(&err);
        assert_eq!(
            msg,
            format!(
                "server identity mismatch (expected [\"spiffe://cluster.local/ns/default/sa/reviews\"], got [\"{HTTPBIN}\"])"
            )
        );
        assert!(s.is_err());
    }

    #[tokio::test]
    async fn client_without_certificate_refused() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let server_cert = valid(&ca, &id(HTTPBIN));
        let client_cert = valid(&ca, &id(SLEEP));
        let verifier = IdentityVerifier {
            roots: client_cert.root_store().unwrap(),
            expected: vec![HTTPBIN.to_string()],
            algs: provider().signature_verification_algorithms,
        };
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let (s, c) = handshake_with(server_cert.server_config().unwrap(), Arc::new(config)).await;
        let err = s.expect_err("server must require a client certificate");
        assert!(matches!(
            rustls_err(&err),
            rustls::Error::NoCertificatesPresented
        ));
        assert_eq!(describe_handshake_error(&err), "no client certificate");
        assert_eq!(
            client_refused(c).await,
            "no client certificate (peer requires one)"
        );
    }

    #[tokio::test]
    async fn tls12_only_client_refused() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let server_cert = valid(&ca, &id(HTTPBIN));
        let client_cert = valid(&ca, &id(SLEEP));
        let verifier = IdentityVerifier {
            roots: client_cert.root_store().unwrap(),
            expected: vec![HTTPBIN.to_string()],
            algs: provider().signature_verification_algorithms,
        };
        // Full aws-lc-rs provider: it has the TLS 1.2 suites a 1.2 client offers.
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS12])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_client_auth_cert(client_cert.chain.clone(), client_cert.key.clone_key())
                .unwrap();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let (s, c) = handshake_with(server_cert.server_config().unwrap(), Arc::new(config)).await;
        let serr = s.expect_err("server must refuse TLS 1.2");
        assert!(
            matches!(rustls_err(&serr), rustls::Error::PeerIncompatible(_)),
            "{serr:?}"
        );
        let cerr = c.expect_err("client handshake must fail");
        assert!(matches!(
            rustls_err(&cerr),
            rustls::Error::AlertReceived(AlertDescription::ProtocolVersion)
        ));
        assert_eq!(
            describe_handshake_error(&cerr),
            "protocol version rejected by peer (TLS 1.3 required)"
        );
    }

    #[test]
    fn describe_non_tls_errors() {
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(
            describe_handshake_error(&eof),
            "connection closed during TLS handshake"
        );
        let wrapped = std::io::Error::other(PeerVerificationError::ClientTrustDomainMismatch {
            expected: "cluster.local".into(),
            presented: vec![],
        });
        assert!(describe_handshake_error(&wrapped).starts_with("client trust domain mismatch"));
        assert_eq!(
            server_name(),
            ServerName::try_from("0.0.0.0").unwrap().to_owned()
        );
    }
}
