//! What the controller does with untrusted input, one function per fuzz target: the bodies of
//! `fuzz/fuzz_targets/controller_*.rs` (cargo-fuzz) and of `tests/parsers_never_panic.rs`
//! (stable), which both include this file with `#[path]`.

// why: each including crate calls the part it needs.
#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, LazyLock};

use prost::Message;
use serde_json::{Value, json};
use tonic::metadata::MetadataValue;
use zmesh_controller::ca::{AuthError, CaOptions, CaService, Caller, TokenAuthenticator};
use zmesh_controller::store::{ObjectKey, ObjectStore, Snapshot};
use zmesh_controller::translate::incremental::Incremental;
use zmesh_controller::translate::{TranslateOptions, translate_with_context};
use zmesh_controller::waypoints::{GatewayRef, Template, WaypointSettings, status_patch};
use zmesh_core::ca::CertificateAuthority;
use zmesh_proto::ca::istio_certificate_service_server::IstioCertificateService;

thread_local! {
    // why: nothing here waits on I/O; one current-thread runtime serves every call.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
}

/// Name the fuzzed file has in errors.
pub const FILE: &str = "fuzz/objects.yaml";

/// A YAML file of the file source (any kinds, several documents): parsed as the source does,
/// then translated as a whole and incrementally after `base` (the objects before the change).
/// Every problem must come back as an error naming the file, or the object and field.
pub fn yaml_file(base: &[Value], text: &str) {
    let mut errors = Vec::new();
    let objects = zmesh_controller::sources::file::parse_file(Path::new(FILE), text, &mut errors);
    for e in &errors {
        assert!(e.to_string().starts_with(FILE), "{e}");
    }
    let snap = Snapshot::from_objects(objects.into_iter().map(|(_, obj, _)| obj));
    translate(base, snap);
}

/// Translate `snap` fully, then incrementally after `base` (as the controller's loop does
/// when only pods changed).
pub fn translate(base: &[Value], snap: Snapshot) {
    let opts = TranslateOptions::default();
    let (out, _) = translate_with_context(&snap, &opts);
    for e in &out.errors {
        assert!(!e.field.is_empty(), "an error without a field: {e}");
    }
    let mut inc = Incremental::default();
    inc.translate(Snapshot::from_objects(base.iter().cloned()), &opts);
    inc.translate(snap, &opts);
}

/// Authenticates two fixed tokens: a node agent's and a workload's.
struct Tokens;

pub const NODE_TOKEN: &str = "node-1-bootstrap-token";
pub const SA_TOKEN: &str = "default-sleep-sa-token";

#[async_trait::async_trait]
impl TokenAuthenticator for Tokens {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        match token {
            NODE_TOKEN => Ok(Caller::Node {
                node: "node-1".into(),
            }),
            SA_TOKEN => Ok(Caller::ServiceAccount {
                namespace: "default".into(),
                service_account: "sleep".into(),
            }),
            _ => Err(AuthError::Invalid("unknown token".into())),
        }
    }
}

/// The CA service of a mesh with one pod (default/sleep on node-1).
static CA: LazyLock<CaService> = LazyLock::new(|| {
    let ca = CertificateAuthority::generate("cluster.local").expect("CA");
    let store = ObjectStore::new();
    store.upsert(
        ObjectKey::new("Pod", "default", "sleep-1"),
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "sleep-1", "namespace": "default"},
               "spec": {"serviceAccountName": "sleep", "nodeName": "node-1"},
               "status": {"podIP": "10.0.0.1", "phase": "Running"}}),
    );
    CaService::new(
        Arc::new(ca),
        Arc::new(Tokens),
        store,
        CaOptions::default(),
        Arc::default(),
    )
});

/// One `CreateCertificate` call (port 15012): `authorization` metadata, the CSR PEM, the
/// requested validity and the `ImpersonatedIdentity` metadata field, all from the caller.
/// True when a certificate was issued.
pub fn ca_request(
    authorization: &[u8],
    csr: &str,
    validity_duration: i64,
    impersonated: Option<prost_types::Value>,
) -> bool {
    let metadata = impersonated.map(|v| prost_types::Struct {
        fields: [(zmesh_controller::ca::IMPERSONATED_IDENTITY.to_string(), v)].into(),
    });
    let mut req = tonic::Request::new(zmesh_proto::ca::IstioCertificateRequest {
        csr: csr.to_string(),
        validity_duration,
        metadata,
    });
    if let Ok(v) = MetadataValue::try_from(authorization) {
        req.metadata_mut().insert("authorization", v);
    }
    let r = RUNTIME.with(|rt| rt.block_on(CA.create_certificate(req)));
    match r {
        Ok(resp) => {
            assert_eq!(resp.into_inner().cert_chain.len(), 2, "[leaf, root]");
            true
        }
        Err(status) => {
            assert!(!status.message().is_empty(), "a refusal says why");
            false
        }
    }
}

/// [`ca_request`] from bytes: `authorization`, then the impersonated identity (empty: none),
/// then the CSR, separated by NUL bytes; the validity from the CSR's length.
pub fn ca_request_bytes(data: &[u8]) {
    let mut parts = data.splitn(3, |b| *b == 0);
    let auth = parts.next().unwrap_or_default();
    let imp = parts.next().unwrap_or_default();
    let csr = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let imp = (!imp.is_empty()).then(|| prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(
            String::from_utf8_lossy(imp).into_owned(),
        )),
    });
    let _ = ca_request(auth, &csr, csr.len() as i64 * 97 - 3_600, imp);
}

/// A `DeltaDiscoveryRequest` from a proxy (15010/15012): decoded, checked, its node id parsed.
pub fn ads_request(data: &[u8]) {
    let Ok(req) = zmesh_proto::discovery::DeltaDiscoveryRequest::decode(data) else {
        return;
    };
    let _ = zmesh_controller::xds::server::validate(&req);
    if let Some(node) = &req.node {
        let _ = zmesh_core::xds::NodeId::parse(&node.id);
    }
}

/// A waypoint Gateway (`--kubernetes`): its objects rendered from the template, its status
/// patch computed from what the cluster shows.
pub fn waypoint_gateway(gw: &Value) {
    static TEMPLATE: LazyLock<Template> =
        LazyLock::new(|| Template::embedded().expect("the embedded template parses"));
    let s = |p: &str| {
        gw.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let gateway = GatewayRef {
        namespace: s("/metadata/namespace"),
        name: s("/metadata/name"),
        uid: s("/metadata/uid"),
    };
    let settings = WaypointSettings {
        image: "ghcr.io/zmesh/waypoint:1.2.3".into(),
        xds_address: "https://zmesh-controller.zmesh-system.svc:15012".into(),
        control_plane_identity: "spiffe://cluster.local/ns/zmesh-system/sa/zmesh-controller".into(),
        trust_domain: "cluster.local".into(),
        cluster_id: "Kubernetes".into(),
        ca_root_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
    };
    let _ = zmesh_controller::waypoints::is_live_waypoint(gw);
    let _ = TEMPLATE.render(&settings, &gateway);
    for observed in [
        zmesh_controller::waypoints::Observed::default(),
        zmesh_controller::waypoints::Observed {
            error: Some("apply failed".into()),
            deployment: Some((format!("{}/{}", gateway.namespace, gateway.name), 1)),
            service: Some(("shop/waypoint".into(), vec!["10.96.0.10".into()])),
        },
    ] {
        let _ = status_patch(gw, &observed, "2025-01-31T12:00:00Z");
    }
}
