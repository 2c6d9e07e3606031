//! Shared helpers of the controller's integration tests: resource builders, an ADS server on
//! loopback fed directly through its `ResourceCache`, and a raw Delta ADS client that drives the
//! protocol message by message.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prost_types::Any;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use zmesh_controller::translate::{TranslateOptions, Translated};
use zmesh_controller::xds::cache::ResourceCache;
use zmesh_controller::xds::server::{AdsMetrics, AdsOptions, AdsServer, tcp_incoming};
use zmesh_core::state::{Policy, PolicyAction, PolicyScope, Rule, Workload};
use zmesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use zmesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node};
use zmesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

pub const WAIT: Duration = Duration::from_secs(10);
pub const NODE_ID: &str = "ztunnel~10.0.0.1~ztunnel-x.istio-system~istio-system.svc.cluster.local";

pub fn init() {
    zmesh_core::tls::install_default_provider();
}

/// A workload with uid `cluster//v1/Pod/<ns>/<name>` (the resource name), on `node`.
pub fn workload(ns: &str, name: &str, sa: &str, ip: &str, node: &str) -> Workload {
    Workload {
        uid: uid(ns, name),
        name: name.into(),
        namespace: ns.into(),
        service_account: sa.into(),
        addresses: vec![ip.parse().unwrap()],
        node: node.into(),
        trust_domain: "cluster.local".into(),
        ..Workload::default()
    }
}

pub fn uid(ns: &str, name: &str) -> String {
    format!("Kubernetes//v1/Pod/{ns}/{name}")
}

pub fn address_any(w: &Workload) -> Any {
    use prost::Message;
    Any {
        type_url: ADDRESS_TYPE_URL.into(),
        value: zmesh_proto::workload::Address::from(w).encode_to_vec(),
    }
}

pub fn policy_any(ns: &str, name: &str) -> Any {
    use prost::Message;
    let p = Policy {
        name: name.into(),
        namespace: ns.into(),
        scope: PolicyScope::Namespace,
        action: PolicyAction::Deny,
        dry_run: false,
        rules: vec![Rule::default()],
    };
    Any {
        type_url: AUTHORIZATION_TYPE_URL.into(),
        value: zmesh_proto::security::Authorization::from(&p).encode_to_vec(),
    }
}

/// Address resources for workloads, keyed by uid.
pub fn addresses(ws: &[Workload]) -> BTreeMap<String, Any> {
    ws.iter().map(|w| (w.uid.clone(), address_any(w))).collect()
}

/// A garbage Address resource (fails to decode on the client).
pub fn garbage_any() -> Any {
    Any {
        type_url: ADDRESS_TYPE_URL.into(),
        value: vec![0xff, 0xff, 0xff, 0x01],
    }
}

/// An ADS server on 127.0.0.1 (plaintext) over a cache the test writes directly.
pub struct AdsHarness {
    pub cache: Arc<ResourceCache>,
    pub metrics: Arc<AdsMetrics>,
    pub addr: SocketAddr,
    pub stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl AdsHarness {
    pub async fn start(cache: Arc<ResourceCache>, debounce: Duration) -> Self {
        Self::start_on(cache, debounce, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(cache: Arc<ResourceCache>, debounce: Duration, addr: SocketAddr) -> Self {
        let opts = AdsOptions {
            debounce,
            ..Default::default()
        };
        Self::start_with(cache, opts, addr).await
    }

    pub async fn start_with(cache: Arc<ResourceCache>, opts: AdsOptions, addr: SocketAddr) -> Self {
        let stop = CancellationToken::new();
        let metrics = Arc::new(AdsMetrics::default());
        let ads = AdsServer::new(cache.clone(), opts, metrics.clone(), stop.clone());
        let l = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = l.local_addr().unwrap();
        let st = stop.clone();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(ads.into_service())
                .serve_with_incoming_shutdown(tcp_incoming(l), st.cancelled_owned())
                .await
                .unwrap();
        });
        AdsHarness {
            cache,
            metrics,
            addr,
            stop,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop: streams end with Unavailable, the port closes.
    pub async fn kill(self) {
        self.stop.cancel();
        let abort = self.task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

/// A Delta ADS client driven message by message.
pub struct RawClient {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
            .max_decoding_message_size(200 << 20);
        let (tx, mut rx) = mpsc::channel(16);
        let out = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let rx = client
            .delta_aggregated_resources(out)
            .await
            .unwrap()
            .into_inner();
        RawClient { tx, rx }
    }

    pub async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    /// First request for a type: wildcard unless `names` are given.
    pub async fn subscribe(
        &self,
        type_url: &str,
        names: &[&str],
        initial: BTreeMap<String, String>,
    ) {
        self.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: NODE_ID.into(),
                ..Default::default()
            }),
            type_url: type_url.into(),
            resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
            initial_resource_versions: initial.into_iter().collect(),
            ..Default::default()
        })
        .await;
    }

    pub async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    pub async fn nack(&self, r: &DeltaDiscoveryResponse, msg: &str) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: Some(zmesh_proto::google::rpc::Status {
                code: 3,
                message: msg.into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    }

    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("no response within the deadline")
            .expect("stream failed")
            .expect("stream ended")
    }

    /// The stream's next event: a response or the final status.
    pub async fn next(&mut self) -> Result<Option<DeltaDiscoveryResponse>, tonic::Status> {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("nothing within the deadline")
    }

    /// Asserts nothing arrives for `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Ok(m) = tokio::time::timeout(d, self.rx.message()).await {
            panic!("expected no message, got {m:?}");
        }
    }
}

/// Names of the resources in a response, sorted.
pub fn names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut v: Vec<String> = r.resources.iter().map(|r| r.name.clone()).collect();
    v.sort();
    v
}

/// Name → version of a response's resources.
pub fn versions(r: &DeltaDiscoveryResponse) -> BTreeMap<String, String> {
    r.resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect()
}

/// A tiny stand-in translation (the real one is being written elsewhere): every Pod with
/// `status.podIP` becomes an Address workload, uid `Kubernetes//v1/Pod/<ns>/<name>`.
pub fn pods_translator(
    snap: &zmesh_controller::store::Snapshot,
    opts: &TranslateOptions,
) -> Translated {
    let mut out = Translated::default();
    for (key, pod) in snap.of_kind("Pod") {
        let Some(ip) = pod.pointer("/status/podIP").and_then(|v| v.as_str()) else {
            continue;
        };
        let sa = pod
            .pointer("/spec/serviceAccountName")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let node = pod
            .pointer("/spec/nodeName")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let Ok(ip) = ip.parse() else { continue };
        let w = Workload {
            uid: uid(&key.namespace, &key.name),
            name: key.name.clone(),
            namespace: key.namespace.clone(),
            service_account: sa.into(),
            addresses: vec![ip],
            node: node.into(),
            trust_domain: opts.trust_domain.clone(),
            protocol: zmesh_core::state::TunnelProtocol::Hbone,
            ..Workload::default()
        };
        out.add(
            ADDRESS_TYPE_URL,
            w.uid.clone(),
            &zmesh_proto::workload::Address::from(&w),
        );
    }
    out
}

/// A Pod object as the file source / Kubernetes would store it.
pub fn pod(ns: &str, name: &str, sa: &str, ip: &str, node: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"serviceAccountName": sa, "nodeName": node},
        "status": {"podIP": ip, "phase": "Running"},
    })
}

/// A unique temporary directory.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "zmesh-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Poll `f` until true (or panic after [`WAIT`]).
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
