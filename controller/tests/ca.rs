//! The CA service over TLS on loopback: bootstrap-token (file mode) and TokenReview (Kubernetes
//! mode, with a fake reviewer) authentication, node-locality authorization, clear refusals, and
//! `CertificateManager` fed by `CaClient`.

mod common_ads;
use common_ads as common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use zmesh_controller::ca::{
    AuthError, KubeAuthenticator, NODE_NAME_CLAIM, POD_NAME_CLAIM, ReviewedUser, TOKENS_DIR,
    TokenReviewer, write_bootstrap_token,
};
use zmesh_controller::controller::{Controller, ControllerConfig};
use zmesh_controller::store::{ObjectKey, ObjectStore};
use zmesh_core::ca::generate_csr;
use zmesh_core::certs::{CertificateManager, WorkloadCertificate};
use zmesh_core::identity::Identity;
use zmesh_core::xds::{
    CaClient, CaClientConfig, CaClientError, ControlPlaneEndpoint, ControlPlaneTls, TokenSource,
};
use zmesh_proto::ca::IstioCertificateRequest;
use zmesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const ECHO: &str = "spiffe://cluster.local/ns/default/sa/echo";
const CONTROLLER: &str = "spiffe://cluster.local/ns/istio-system/sa/zmesh-controller";

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

fn pods_store() -> Arc<ObjectStore> {
    let store = ObjectStore::new();
    for p in [
        pod("default", "sleep-1", "sleep", "10.0.0.1", "node-a"),
        pod("default", "echo-1", "echo", "10.0.0.2", "node-b"),
        pod("istio-system", "ztunnel-a", "ztunnel", "10.0.1.1", "node-a"),
    ] {
        store.upsert(ObjectKey::of(&p).unwrap(), p);
    }
    store
}

struct Setup {
    controller: Controller,
    dir: std::path::PathBuf,
    token_a: String,
}

async fn start(authenticator: Option<Arc<dyn zmesh_controller::ca::TokenAuthenticator>>) -> Setup {
    init();
    let dir = temp_dir("ca");
    let token_a = write_bootstrap_token(&dir.join(TOKENS_DIR), "node-a").unwrap();
    write_bootstrap_token(&dir.join(TOKENS_DIR), "node-b").unwrap();
    let controller = Controller::start(ControllerConfig {
        file_source: false,
        store: Some(pods_store()),
        authenticator,
        ..ControllerConfig::loopback(&dir)
    })
    .await
    .unwrap();
    Setup {
        controller,
        dir,
        token_a,
    }
}

impl Setup {
    fn endpoint(&self) -> ControlPlaneEndpoint {
        ControlPlaneEndpoint::new(
            format!("https://{}", self.controller.addrs.xds_tls.unwrap()),
            Some(ControlPlaneTls {
                roots: vec![self.controller.ca.root_der()],
                identities: vec![CONTROLLER.into()],
                dns_name: None,
            }),
        )
    }

    fn client(&self, token: TokenSource) -> CaClient {
        CaClient::new(CaClientConfig::new(self.endpoint(), token)).unwrap()
    }

    async fn raw(&self) -> IstioCertificateServiceClient<tonic::transport::Channel> {
        IstioCertificateServiceClient::new(self.endpoint().channel().unwrap())
    }

    async fn done(self) {
        self.controller.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn refused(e: CaClientError) -> (tonic::Code, String) {
    match e {
        CaClientError::Refused { code, message, .. } => (code, message),
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test]
async fn node_token_gets_local_pod_identity_and_chain_verifies() {
    let s = start(None).await;
    let client = s.client(TokenSource::Literal(s.token_a.clone()));
    let (csr, key) = generate_csr(&id(SLEEP)).unwrap();
    let chain = client
        .create_certificate(&id(SLEEP), csr, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(chain.len(), 2, "[leaf, root bundle]");
    assert_eq!(chain[1], s.controller.ca.root_pem());
    // The chain verifies against the root and matches our key and identity.
    let leaf = CertificateDer::from_pem_slice(chain[0].as_bytes()).unwrap();
    let (_, x509) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let root = s.controller.ca.root_der();
    let (_, root_x509) = x509_parser::parse_x509_certificate(&root).unwrap();
    x509.verify_signature(Some(root_x509.public_key())).unwrap();
    let life = x509.validity().not_after.timestamp() - x509.validity().not_before.timestamp();
    assert!((3600..=3600 + 120).contains(&life), "{life}");
    let cert = WorkloadCertificate::from_pem_chain(id(SLEEP), &chain, key).unwrap();
    assert_eq!(cert.roots, vec![root]);

    // Lifetimes above the maximum are capped (24 h).
    let (csr, _) = generate_csr(&id(SLEEP)).unwrap();
    let chain = client
        .create_certificate(&id(SLEEP), csr, Duration::from_secs(30 * 24 * 3600))
        .await
        .unwrap();
    let leaf = CertificateDer::from_pem_slice(chain[0].as_bytes()).unwrap();
    let (_, x509) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let life = x509.validity().not_after.timestamp() - x509.validity().not_before.timestamp();
    assert!(life <= 24 * 3600 + 120, "{life}");
    assert_eq!(s.controller.ca_metrics.get("ok"), 2);
    s.done().await;
}

#[tokio::test]
async fn refusals_are_clear() {
    let s = start(None).await;
    // A pod identity on another node.
    let client = s.client(TokenSource::Literal(s.token_a.clone()));
    let (csr, _) = generate_csr(&id(ECHO)).unwrap();
    let (code, msg) = refused(
        client
            .create_certificate(&id(ECHO), csr, Duration::from_secs(3600))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(msg.contains("node-b") && msg.contains(ECHO), "{msg}");

    // An identity no pod has.
    let ghost = "spiffe://cluster.local/ns/default/sa/ghost";
    let (csr, _) = generate_csr(&id(ghost)).unwrap();
    let (code, msg) = refused(
        client
            .create_certificate(&id(ghost), csr, Duration::from_secs(3600))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(msg.contains("no known pod"), "{msg}");

    // A foreign trust domain.
    let foreign = "spiffe://evil.example/ns/default/sa/sleep";
    let (csr, _) = generate_csr(&id(foreign)).unwrap();
    let (code, msg) = refused(
        client
            .create_certificate(&id(foreign), csr, Duration::from_secs(3600))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(msg.contains("trust domain"), "{msg}");

    // No token, a wrong token.
    for token in [
        TokenSource::None,
        TokenSource::Literal("not-a-valid-token-at-all".into()),
    ] {
        let (csr, _) = generate_csr(&id(SLEEP)).unwrap();
        let (code, msg) = refused(
            s.client(token)
                .create_certificate(&id(SLEEP), csr, Duration::from_secs(3600))
                .await
                .unwrap_err(),
        );
        assert_eq!(code, tonic::Code::Unauthenticated, "{msg}");
    }

    // Bad CSR; ImpersonatedIdentity differing from the CSR.
    let mut raw = s.raw().await;
    let with_token = |r: IstioCertificateRequest| {
        let mut req = tonic::Request::new(r);
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", s.token_a).parse().unwrap(),
        );
        req
    };
    let err = raw
        .create_certificate(with_token(IstioCertificateRequest {
            csr:
                "-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
            validity_duration: 3600,
            metadata: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("CSR"), "{}", err.message());

    let (csr, _) = generate_csr(&id(SLEEP)).unwrap();
    let err = raw
        .create_certificate(with_token(IstioCertificateRequest {
            csr,
            validity_duration: 3600,
            metadata: Some(prost_types::Struct {
                fields: BTreeMap::from([(
                    "ImpersonatedIdentity".to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(ECHO.into())),
                    },
                )]),
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("ImpersonatedIdentity"),
        "{}",
        err.message()
    );
    assert!(s.controller.ca_metrics.get("denied") >= 3);
    assert_eq!(s.controller.ca_metrics.get("unauthenticated"), 2);
    s.done().await;
}

#[tokio::test]
async fn client_refuses_a_server_with_another_identity() {
    let s = start(None).await;
    let mut ep = s.endpoint();
    ep.tls.as_mut().unwrap().identities =
        vec!["spiffe://cluster.local/ns/istio-system/sa/istiod".into()];
    let client = CaClient::new(CaClientConfig::new(
        ep,
        TokenSource::Literal(s.token_a.clone()),
    ))
    .unwrap();
    let (csr, _) = generate_csr(&id(SLEEP)).unwrap();
    let (code, _) = refused(
        client
            .create_certificate(&id(SLEEP), csr, Duration::from_secs(3600))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, tonic::Code::Unavailable);
    s.done().await;
}

#[tokio::test]
async fn certificate_manager_over_ca_client() {
    let s = start(None).await;
    let provider = Arc::new(s.client(TokenSource::Literal(s.token_a.clone())));
    let mgr = CertificateManager::new(provider, Duration::from_secs(3600));
    let cert = tokio::time::timeout(WAIT, mgr.fetch(&id(SLEEP)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cert.identity, id(SLEEP));
    assert!(!cert.is_expired());
    // The certificate is usable for mTLS.
    cert.server_config().unwrap();
    let err = tokio::time::timeout(WAIT, mgr.fetch(&id(ECHO)))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("node-b"), "{err}");
    s.done().await;
}

/// A fake TokenReview: token → user.
struct FakeReviewer(BTreeMap<String, ReviewedUser>);

#[async_trait::async_trait]
impl TokenReviewer for FakeReviewer {
    async fn review(&self, token: &str) -> Result<ReviewedUser, AuthError> {
        self.0
            .get(token)
            .cloned()
            .ok_or_else(|| AuthError::Invalid("TokenReview: token not authenticated".into()))
    }
}

fn user(name: &str, extra: &[(&str, &str)]) -> ReviewedUser {
    ReviewedUser {
        username: name.into(),
        extra: extra
            .iter()
            .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
            .collect(),
    }
}

#[tokio::test]
async fn kubernetes_token_review_mode() {
    let store = pods_store();
    let reviewer = FakeReviewer(BTreeMap::from([
        (
            "zt-node-claim".into(),
            user(
                "system:serviceaccount:istio-system:ztunnel",
                &[(NODE_NAME_CLAIM, "node-a")],
            ),
        ),
        (
            "zt-pod-claim".into(),
            user(
                "system:serviceaccount:istio-system:ztunnel",
                &[(POD_NAME_CLAIM, "ztunnel-a")],
            ),
        ),
        (
            "zt-unbound".into(),
            user("system:serviceaccount:istio-system:ztunnel", &[]),
        ),
        (
            "sleep-own".into(),
            user("system:serviceaccount:default:sleep", &[]),
        ),
        ("human".into(), user("alice@example.com", &[])),
    ]));
    let auth = KubeAuthenticator::new(
        reviewer,
        vec![("istio-system".into(), "ztunnel".into())],
        store.clone(),
    );
    let s = start(Some(Arc::new(auth))).await;
    let ask = |token: &str, ident: &str| {
        let client = s.client(TokenSource::Literal(token.into()));
        let ident = id(ident);
        async move {
            let (csr, _) = generate_csr(&ident).unwrap();
            client
                .create_certificate(&ident, csr, Duration::from_secs(600))
                .await
        }
    };
    // Node agent, node from the bound token's node claim or its pod.
    ask("zt-node-claim", SLEEP).await.unwrap();
    ask("zt-pod-claim", SLEEP).await.unwrap();
    let (code, msg) = refused(ask("zt-node-claim", ECHO).await.unwrap_err());
    assert_eq!(code, tonic::Code::PermissionDenied, "{msg}");
    let (code, msg) = refused(ask("zt-unbound", SLEEP).await.unwrap_err());
    assert_eq!(code, tonic::Code::Unauthenticated);
    assert!(msg.contains("bound"), "{msg}");
    // A workload gets only its own identity.
    ask("sleep-own", SLEEP).await.unwrap();
    let (code, msg) = refused(ask("sleep-own", ECHO).await.unwrap_err());
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(msg.contains("only its own identity"), "{msg}");
    // Not a service account; not authenticated; bootstrap tokens are not accepted here.
    let (code, _) = refused(ask("human", SLEEP).await.unwrap_err());
    assert_eq!(code, tonic::Code::Unauthenticated);
    let (code, _) = refused(ask("bogus", SLEEP).await.unwrap_err());
    assert_eq!(code, tonic::Code::Unauthenticated);
    // The setup wrote node bootstrap tokens, but this controller only accepts TokenReview.
    let (code, _) = refused(ask(&s.token_a.clone(), SLEEP).await.unwrap_err());
    assert_eq!(code, tonic::Code::Unauthenticated);
    s.done().await;
}

/// The 15012 certificate also carries the controller Service's DNS names, so a client may
/// verify the control plane by host name (`--control-plane-dns-name`) instead of by identity.
#[tokio::test]
async fn control_plane_verifiable_by_service_dns_name() {
    let s = start(None).await;
    let by_name = |name: &str| {
        let endpoint = ControlPlaneEndpoint::new(
            format!("https://{}", s.controller.addrs.xds_tls.unwrap()),
            Some(ControlPlaneTls {
                roots: vec![s.controller.ca.root_der()],
                identities: vec![],
                dns_name: Some(name.to_string()),
            }),
        );
        CaClient::new(CaClientConfig::new(
            endpoint,
            TokenSource::Literal(s.token_a.clone()),
        ))
        .unwrap()
    };
    for name in zmesh_controller::ca::controller_dns_names("istio-system") {
        let (csr, _) = generate_csr(&id(SLEEP)).unwrap();
        let chain = by_name(&name)
            .create_certificate(&id(SLEEP), csr, Duration::from_secs(3600))
            .await
            .unwrap_or_else(|e| panic!("verifying the controller as {name}: {e}"));
        assert_eq!(chain.len(), 2);
    }
    // Another Service's name is refused: the name really is checked.
    let (csr, _) = generate_csr(&id(SLEEP)).unwrap();
    let wrong = by_name("istiod.istio-system.svc")
        .create_certificate(&id(SLEEP), csr, Duration::from_secs(3600))
        .await;
    assert!(
        wrong.is_err(),
        "a certificate for another host name was accepted"
    );
    s.done().await;
}
