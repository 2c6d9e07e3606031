//! The real `XdsClient` against a real tonic Delta ADS server on loopback, scripted by the
//! test: which responses go out, and how each stream ends (status OK, a gRPC error, "come back
//! later", the server process going away). Checks the `istio_xds_*` metrics and when the
//! initial sync completes with extra and optional types.
//!
//! The server is scripted rather than the controller's (`controller/tests/ads.rs` runs the
//! client against that one) because the controller crate depends on this one, and because only
//! a script can end streams in each of the ways the termination reasons distinguish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use zmesh_core::metrics::{Metrics, sample_sum};
use zmesh_core::state::{
    ConfigSource, Policy, PolicyAction, PolicyScope, PortMapping, Rule, Service, StateStore,
    Workload,
};
use zmesh_core::xds::{
    ControlPlaneEndpoint, ReceivedResource, ResourceError, ResourceHandler, TerminationReason,
    UNSUBSCRIBED_URL_LABEL, XdsClient, XdsConfig, XdsMetrics,
};
use zmesh_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use zmesh_proto::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use zmesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

const WAIT: Duration = Duration::from_secs(10);
const MESSAGES: &str = "istio_xds_message_total";
const BYTES: &str = "istio_xds_message_bytes_total";
const TERMINATIONS: &str = "istio_xds_connection_terminations_total";

type ResponseTx = mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, Status>>;
type BoxStream<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

/// One client stream as the server sees it; the test reads its requests and writes responses.
struct Session {
    requests: Streaming<DeltaDiscoveryRequest>,
    /// Dropping it ends the response stream with status OK.
    responses: Option<ResponseTx>,
}

impl Session {
    async fn request(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(WAIT, self.requests.message())
            .await
            .expect("a request in time")
            .expect("request stream healthy")
            .expect("request stream open")
    }

    fn send(&self, r: Result<DeltaDiscoveryResponse, Status>) {
        self.responses
            .as_ref()
            .expect("response stream open")
            .send(r)
            .expect("server stream alive");
    }

    /// Send `r` and return the client's ACK or NACK of it.
    async fn push(&mut self, r: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let nonce = r.nonce.clone();
        self.send(Ok(r));
        let ack = self.request().await;
        assert_eq!(ack.response_nonce, nonce, "the answer to our response");
        ack
    }

    /// Read the client's initial request of each subscribed type.
    async fn initial_requests(&mut self) {
        let mut types: Vec<String> = Vec::new();
        for _ in 0..2 {
            let r = self.request().await;
            assert!(r.response_nonce.is_empty(), "initial request: {r:?}");
            types.push(r.type_url);
        }
        types.sort();
        assert_eq!(types, [AUTHORIZATION_TYPE_URL, ADDRESS_TYPE_URL]);
    }
}

struct ScriptedAds {
    sessions: mpsc::UnboundedSender<Session>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for ScriptedAds {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("delta only"))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.sessions
            .send(Session {
                requests: request.into_inner(),
                responses: Some(tx),
            })
            .map_err(|_| Status::internal("test over"))?;
        let out = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(Response::new(Box::pin(out)))
    }
}

/// A Delta ADS server on its own runtime (its own thread), so that killing it drops its
/// listener and every connection at once, as when the control plane's process dies.
struct TestServer {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    sessions: mpsc::UnboundedReceiver<Session>,
}

impl TestServer {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, sessions) = mpsc::unbounded_channel();
        runtime.spawn(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            let incoming = futures::stream::unfold(l, |l| async move {
                let r = l.accept().await.map(|(s, _)| s);
                Some((r, l))
            });
            tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(ScriptedAds {
                    sessions: tx,
                }))
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        TestServer {
            addr,
            runtime: Some(runtime),
            sessions,
        }
    }

    async fn next_session(&mut self) -> Session {
        tokio::time::timeout(WAIT, self.sessions.recv())
            .await
            .expect("the client (re)connects in time")
            .expect("server running")
    }

    /// The control plane goes away: listener and connections closed, nothing said.
    fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn workload(name: &str, ip: &str) -> Workload {
    Workload {
        uid: format!("Kubernetes//v1/Pod/default/{name}"),
        name: name.into(),
        namespace: "default".into(),
        service_account: name.into(),
        addresses: vec![ip.parse().unwrap()],
        trust_domain: "cluster.local".into(),
        ..Workload::default()
    }
}

fn resource<M: Message>(name: &str, type_url: &str, body: &M) -> Resource {
    Resource {
        name: name.into(),
        version: "v1".into(),
        resource: Some(prost_types::Any {
            type_url: type_url.into(),
            value: body.encode_to_vec(),
        }),
        ..Default::default()
    }
}

fn response(type_url: &str, nonce: &str, resources: Vec<Resource>) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        system_version_info: "1".into(),
        type_url: type_url.into(),
        nonce: nonce.into(),
        resources,
        ..Default::default()
    }
}

fn address_response(nonce: &str, workloads: &[Workload]) -> DeltaDiscoveryResponse {
    let mut resources: Vec<Resource> = workloads
        .iter()
        .map(|w| {
            resource(
                &w.uid,
                ADDRESS_TYPE_URL,
                &zmesh_proto::workload::Address::from(w),
            )
        })
        .collect();
    let svc = Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        vips: vec![(String::new(), "10.96.0.10".parse().unwrap())],
        ports: vec![PortMapping::new(80, 8080)],
        subject_alt_names: Vec::new(),
        waypoint: None,
    };
    resources.push(resource(
        &svc.key(),
        ADDRESS_TYPE_URL,
        &zmesh_proto::workload::Address::from(&svc),
    ));
    response(ADDRESS_TYPE_URL, nonce, resources)
}

fn authz_response(nonce: &str) -> DeltaDiscoveryResponse {
    let p = Policy {
        name: "deny".into(),
        namespace: "default".into(),
        scope: PolicyScope::Namespace,
        action: PolicyAction::Deny,
        dry_run: false,
        rules: vec![Rule::default()],
    };
    let body = zmesh_proto::security::Authorization::from(&p);
    response(
        AUTHORIZATION_TYPE_URL,
        nonce,
        vec![resource(&p.key(), AUTHORIZATION_TYPE_URL, &body)],
    )
}

fn sample(metrics: &Metrics, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    sample_sum(&metrics.encode(), metric, labels)
}

fn terminations(metrics: &Metrics, reason: &str) -> f64 {
    sample(metrics, TERMINATIONS, &[("reason", reason)]).unwrap_or(0.0)
}

#[tokio::test]
async fn xds_metrics_count_responses_per_type_and_stream_endings_per_reason() {
    let mut server = TestServer::start();
    let metrics = Metrics::new("ztunnel");
    let xm = XdsMetrics::new(&metrics);
    let mut cfg = XdsConfig::ztunnel(
        ControlPlaneEndpoint::new(format!("http://{}", server.addr), None),
        "node-1",
        "ztunnel-x",
        "istio-system",
        None,
    );
    cfg.initial_backoff = Duration::from_millis(20);
    cfg.max_backoff = Duration::from_millis(100);
    let stop = CancellationToken::new();
    let client = XdsClient::new(cfg)
        .with_metrics(xm.clone())
        .with_stop(stop.clone());
    let store = StateStore::new();
    let st: Arc<StateStore> = store.clone();
    let run = tokio::spawn(Box::new(client).run(st));

    // Stream 1: two Address responses and one Authorization response, all ACKed.
    let mut s = server.next_session().await;
    s.initial_requests().await;
    let a1 = address_response("a1", &[workload("a", "10.0.0.1")]);
    let z1 = authz_response("z1");
    let a2 = address_response("a2", &[workload("b", "10.0.0.2")]);
    let sizes = (a1.encoded_len(), z1.encoded_len(), a2.encoded_len());
    for r in [a1, z1, a2] {
        let ack = s.push(r).await;
        assert!(ack.error_detail.is_none(), "ACK, not NACK: {ack:?}");
    }
    assert!(store.is_synced());
    assert_eq!(store.read().workloads().count(), 2);
    let text = metrics.encode();
    let addr = [("url", ADDRESS_TYPE_URL)];
    let authz = [("url", AUTHORIZATION_TYPE_URL)];
    assert_eq!(sample_sum(&text, MESSAGES, &addr), Some(2.0), "{text}");
    assert_eq!(sample_sum(&text, MESSAGES, &authz), Some(1.0), "{text}");
    // Bytes: exactly the protobuf-encoded size of what the server sent, per type.
    let (a1_len, z1_len, a2_len) = sizes;
    assert!(z1_len > 0 && a1_len > 0);
    assert_eq!(
        sample_sum(&text, BYTES, &addr),
        Some((a1_len + a2_len) as f64),
        "{text}"
    );
    assert_eq!(
        sample_sum(&text, BYTES, &authz),
        Some(z1_len as f64),
        "{text}"
    );
    assert!(text.contains("# TYPE istio_xds_message counter"), "{text}");
    assert_eq!(sample_sum(&text, TERMINATIONS, &[]), None, "{text}");

    // A type nobody subscribed to: NACKed, and counted under one fixed label, so a server
    // cannot grow the label set.
    const ODD: &str = "type.googleapis.com/some.Unsubscribed";
    let odd = response(ODD, "x1", Vec::new());
    let odd_len = odd.encoded_len();
    let nack = s.push(odd).await;
    assert!(nack.error_detail.is_some(), "NACK: {nack:?}");
    let text = metrics.encode();
    let unknown = [("url", UNSUBSCRIBED_URL_LABEL)];
    assert_eq!(sample_sum(&text, MESSAGES, &unknown), Some(1.0), "{text}");
    assert_eq!(
        sample_sum(&text, BYTES, &unknown),
        Some(odd_len as f64),
        "{text}"
    );
    assert!(!text.contains(ODD), "{text}");

    // The server ends the stream cleanly (status OK): Complete; the client comes back.
    s.responses = None;
    let mut s = server.next_session().await;
    assert_eq!(terminations(&metrics, "Complete"), 1.0);
    assert_eq!(xm.terminations(TerminationReason::Complete), 1);
    // The reconnect asks only for changes to what it holds.
    let first = s.request().await;
    assert!(!first.initial_resource_versions.is_empty(), "{first:?}");
    let _ = s.request().await;

    // A gRPC error status from the server: Error.
    s.send(Err(Status::permission_denied("test: not allowed")));
    let mut s = server.next_session().await;
    assert_eq!(terminations(&metrics, "Error"), 1.0);
    s.initial_requests().await;

    // The server is going away and says so (Unavailable, as our controller's shutdown does):
    // Reconnect.
    s.send(Err(Status::unavailable("test: shutting down")));
    let mut s = server.next_session().await;
    assert_eq!(terminations(&metrics, "Reconnect"), 1.0);
    s.initial_requests().await;
    let a3 = address_response("a3", &[workload("a", "10.0.0.1")]);
    s.push(a3).await;
    assert_eq!(sample(&metrics, MESSAGES, &addr), Some(3.0));

    // The control plane dies without a word: the transport fails under the stream, then
    // reconnects are refused: ConnectionError, and nothing else moves.
    server.kill();
    let deadline = tokio::time::Instant::now() + WAIT;
    while xm.terminations(TerminationReason::ConnectionError) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ConnectionError counted: {}",
            metrics.encode()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(terminations(&metrics, "ConnectionError") >= 2.0);
    assert_eq!(terminations(&metrics, "Complete"), 1.0);
    assert_eq!(terminations(&metrics, "Error"), 1.0);
    assert_eq!(terminations(&metrics, "Reconnect"), 1.0);
    drop(s);

    // Stopping the client is not a termination.
    let before = metrics.encode();
    stop.cancel();
    tokio::time::timeout(WAIT, run)
        .await
        .expect("client stops")
        .unwrap()
        .unwrap();
    let cut = |t: &str| sample_sum(t, TERMINATIONS, &[]);
    assert_eq!(cut(&metrics.encode()), cut(&before));
}

/// An `XdsClient` handed to a proxy (`ConfigSource::register_metrics`) records into the
/// proxy's registry; another config source registers nothing. (Families without samples are
/// not printed, so registration shows once something is counted.)
#[tokio::test]
async fn an_xds_source_records_into_the_proxy_registry() {
    let metrics = Metrics::new("ztunnel");
    let mut local: Box<dyn ConfigSource> = Box::new(zmesh_core::state::LocalConfig::from_file(
        "/nonexistent.yaml",
    ));
    local.register_metrics(&metrics);
    assert!(!metrics.encode().contains("istio_xds_"));

    // A port nobody listens on: every attempt is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = XdsConfig::ztunnel(
        ControlPlaneEndpoint::new(format!("http://{closed}"), None),
        "node-1",
        "ztunnel-x",
        "istio-system",
        None,
    );
    cfg.initial_backoff = Duration::from_millis(10);
    let stop = CancellationToken::new();
    let mut xds: Box<dyn ConfigSource> = Box::new(XdsClient::new(cfg).with_stop(stop.clone()));
    xds.register_metrics(&metrics);
    let run = tokio::spawn(xds.run(StateStore::new()));
    let deadline = tokio::time::Instant::now() + WAIT;
    while terminations(&metrics, "ConnectionError") < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            metrics.encode()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    tokio::time::timeout(WAIT, run)
        .await
        .expect("client stops")
        .unwrap()
        .unwrap();
    assert!(
        metrics
            .encode()
            .contains("# TYPE istio_xds_connection_terminations counter\n")
    );
}

/// Records the resource names each extra type delivered.
#[derive(Default)]
struct Received(std::sync::Mutex<Vec<(String, Vec<String>)>>);

impl ResourceHandler for Received {
    fn apply_resources(
        &self,
        type_url: &str,
        updated: &[ReceivedResource],
        _removed: &[String],
    ) -> Vec<ResourceError> {
        let names = updated.iter().map(|r| r.name.clone()).collect();
        self.0.lock().unwrap().push((type_url.to_string(), names));
        Vec::new()
    }
}

/// A required extra type holds up the initial sync; an optional one (a type an older control
/// plane does not serve) does not, and is still delivered when it comes.
#[tokio::test]
async fn optional_types_do_not_hold_up_the_initial_sync() {
    const REQUIRED: &str = "type.googleapis.com/test.Required";
    const OPTIONAL: &str = "type.googleapis.com/test.Optional";
    let mut server = TestServer::start();
    let cfg = XdsConfig::ztunnel(
        ControlPlaneEndpoint::new(format!("http://{}", server.addr), None),
        "node-1",
        "ztunnel-x",
        "istio-system",
        None,
    );
    let received = Arc::new(Received::default());
    let stop = CancellationToken::new();
    let client = XdsClient::new(cfg)
        .with_extra_type(REQUIRED, received.clone())
        .with_optional_type(OPTIONAL, received.clone())
        .with_stop(stop.clone());
    let status = client.status();
    let store = StateStore::new();
    let run = tokio::spawn(Box::new(client).run(store.clone()));

    let mut s = server.next_session().await;
    let mut types = Vec::new();
    for _ in 0..4 {
        types.push(s.request().await.type_url);
    }
    types.sort();
    assert_eq!(
        types,
        [AUTHORIZATION_TYPE_URL, ADDRESS_TYPE_URL, OPTIONAL, REQUIRED],
        "every type is subscribed"
    );
    for r in [
        address_response("a1", &[workload("a", "10.0.0.1")]),
        authz_response("z1"),
    ] {
        s.push(r).await;
    }
    assert!(
        !store.is_synced(),
        "the required extra type has not answered"
    );
    let body = prost_types::Any::default();
    s.push(response(
        REQUIRED,
        "r1",
        vec![resource("req", REQUIRED, &body)],
    ))
    .await;
    // The server never answers OPTIONAL (it does not know it), yet the proxy is ready.
    assert!(store.is_synced(), "synced without the optional type");
    assert!(status.dump()["synced"].as_bool().unwrap_or(false));
    // When the optional type does come, its resources are delivered as usual.
    let ack = s
        .push(response(
            OPTIONAL,
            "o1",
            vec![resource("opt", OPTIONAL, &body)],
        ))
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    assert_eq!(
        *received.0.lock().unwrap(),
        [
            (REQUIRED.to_string(), vec!["req".to_string()]),
            (OPTIONAL.to_string(), vec!["opt".to_string()]),
        ]
    );
    stop.cancel();
    run.await.unwrap().unwrap();
}
