//! The Delta ADS server (`envoy.service.discovery.v3.AggregatedDiscoveryService`), as Istio's
//! ztunnel expects it from istiod.
//!
//! Per stream and per type URL the server tracks:
//! - the subscription: wildcard (empty subscribe list on the first request, or `"*"`) and/or
//!   named resources, changed later by `resource_names_subscribe`/`_unsubscribe`;
//! - what the client holds: seeded from `initial_resource_versions` on (re)connect, advanced on
//!   ACK. A NACK leaves it at the last ACKed state, but the NACKed versions are remembered so
//!   the same content is not pushed again (it would only be NACKed again); a later change of
//!   the resource is pushed normally;
//! - at most one response in flight: the next delta is computed when the ACK/NACK arrives,
//!   which also coalesces changes for slow clients.
//!
//! Pushes are debounced (cache changes within `debounce` become one response per type) and
//! carry only resources whose version differs from what the client holds, plus removals.
//! `system_version_info` is the cache's per-type version.
//!
//! Malformed requests end the stream with `InvalidArgument`; unknown type URLs are ignored with
//! a warning (no response), as istiod does for types it does not serve.
//!
//! On the TLS listener ([`AdsServer::with_authenticator`]) a stream opens only with a bearer
//! token the CA would accept (node bootstrap token or service-account token), else
//! `Unauthenticated`; the plaintext listener is for local use and asks for none.
//!
//! Every open stream is listed by [`AdsServer::clients`] (the admin `/config_dump`): who it is,
//! what it subscribed to, and the last ACK and NACK per type.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::Stream;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};
use zmesh_core::xds::NodeId;
// why: the server answers with pre-encoded resources (same bytes on the wire as
// `DeltaDiscoveryResponse`; see `zmesh_proto::ads_wire`).
use zmesh_proto::ads_wire::DeltaDiscoveryResponseWire as DeltaDiscoveryResponse;
use zmesh_proto::ads_wire::server::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use zmesh_proto::discovery::{DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse};

use super::cache::{CachedResource, Changes, Name, ResourceCache};
use crate::ca::TokenAuthenticator;

/// Most names one request may carry (subscribe + unsubscribe + initial versions), and most
/// names one stream may subscribe to per type. Bounds per-stream memory.
pub const MAX_NAMES: usize = 200_000;
/// Responses queued per stream before the stream's task waits for the client to read.
const OUTBOUND_QUEUE: usize = 4;
/// A push of at least this many resources (a client's initial sync) counts as large.
const LARGE_PUSH_RESOURCES: usize = 1000;
/// How long a large push waits for a slot before going out anyway (a client that never ACKs
/// must not stall the others for longer than this).
const LARGE_PUSH_WAIT: Duration = Duration::from_secs(5);

/// Largest request accepted (initial_resource_versions of a large mesh fit easily).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
/// Largest response (Istio's ztunnel accepts 200 MiB).
pub const MAX_RESPONSE_BYTES: usize = 200 * 1024 * 1024;

/// Tuning of the ADS server.
#[derive(Clone, Debug)]
pub struct AdsOptions {
    /// Cache changes within this window are pushed as one delta.
    pub debounce: Duration,
    /// Type URLs served (others are ignored with a warning). Types present in the cache are
    /// always served too. The default serves ztunnel's Address and Authorization and the
    /// waypoint's L7 types, so a subscriber to a type that has no resources yet still gets its
    /// (empty) first response and can finish its initial sync.
    pub types: Vec<String>,
    /// Large pushes (initial syncs) in flight at once, from build to ACK. When 100 proxies
    /// connect together, building and encoding all their full states at once multiplied the
    /// controller's peak memory (each is megabytes at 10k pods) for no gain in time.
    pub concurrent_large_pushes: usize,
}

impl Default for AdsOptions {
    fn default() -> Self {
        AdsOptions {
            debounce: Duration::from_millis(100),
            types: vec![
                zmesh_proto::ADDRESS_TYPE_URL.to_string(),
                zmesh_proto::AUTHORIZATION_TYPE_URL.to_string(),
                zmesh_proto::L7_SERVICE_TYPE_URL.to_string(),
                zmesh_proto::L7_AUTHZ_TYPE_URL.to_string(),
                zmesh_proto::L7_TELEMETRY_TYPE_URL.to_string(),
            ],
            concurrent_large_pushes: 8,
        }
    }
}

type TypeLabel = Vec<(String, String)>;

fn type_label(type_url: &str) -> TypeLabel {
    vec![("type_url".to_string(), type_url.to_string())]
}

/// ADS metrics (registered under `zmesh_xds_*`).
#[derive(Debug, Default)]
pub struct AdsMetrics {
    /// NACKs received, by type URL.
    pub nacks: Family<TypeLabel, Counter>,
    /// Responses sent, by type URL.
    pub pushes: Family<TypeLabel, Counter>,
    /// Resources sent (added or changed), by type URL.
    pub resources_sent: Family<TypeLabel, Counter>,
    /// Open Delta ADS streams.
    pub streams: Gauge,
    /// Streams ended with InvalidArgument.
    pub rejected_streams: Counter,
    /// Streams refused for a missing or invalid token (TLS listener).
    pub unauthenticated_streams: Counter,
}

impl AdsMetrics {
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("zmesh_xds");
        r.register("nacks", "xDS NACKs received", self.nacks.clone());
        r.register("pushes", "xDS responses sent", self.pushes.clone());
        r.register(
            "resources_sent",
            "xDS resources sent (added or changed)",
            self.resources_sent.clone(),
        );
        r.register("streams", "open Delta ADS streams", self.streams.clone());
        r.register(
            "rejected_streams",
            "Delta ADS streams ended because of a malformed request",
            self.rejected_streams.clone(),
        );
        r.register(
            "unauthenticated_streams",
            "Delta ADS streams refused for a missing or invalid token",
            self.unauthenticated_streams.clone(),
        );
    }

    /// NACKs counted for one type (tests, status).
    pub fn nack_count(&self, type_url: &str) -> u64 {
        self.nacks.get_or_create(&type_label(type_url)).get()
    }

    /// Responses sent for one type.
    pub fn push_count(&self, type_url: &str) -> u64 {
        self.pushes.get_or_create(&type_label(type_url)).get()
    }
}

struct Inner {
    cache: Arc<ResourceCache>,
    opts: AdsOptions,
    metrics: Arc<AdsMetrics>,
    stop: CancellationToken,
    next_stream: AtomicU64,
    large_pushes: Arc<tokio::sync::Semaphore>,
    /// Open streams by id, for [`AdsServer::clients`]. why a plain map under one lock: it is
    /// touched on connect, disconnect and once per ACK/NACK, never per resource.
    clients: Mutex<BTreeMap<u64, ClientStatus>>,
}

impl Inner {
    fn update_client(&self, id: u64, f: impl FnOnce(&mut ClientStatus)) {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = clients.get_mut(&id) {
            f(c);
        }
    }
}

/// Longest NACK message kept for the admin view (it comes from the client, unbounded).
const MAX_NACK_MESSAGE: usize = 2048;

/// One open Delta ADS stream, as the admin `/config_dump` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ClientStatus {
    /// The server's number for the stream (also the prefix of its nonces).
    pub stream: u64,
    /// `tls` (15012, authenticated) or `plaintext` (15010, local).
    pub listener: &'static str,
    pub peer: Option<SocketAddr>,
    /// Who the bearer token says the client is (TLS listener).
    pub caller: Option<String>,
    /// SPIFFE identity of the client certificate, when one was presented.
    pub peer_identity: Option<String>,
    /// `node.id` of the first request (Istio's `type~ip~pod.namespace~domain`).
    pub node_id: Option<String>,
    /// From `node_id`, when it has Istio's form.
    pub proxy_type: Option<String>,
    /// `namespace/name` of the proxy's pod, from `node_id`.
    pub pod: Option<String>,
    /// RFC 3339, UTC.
    pub connected_at: String,
    /// Per subscribed type URL.
    pub types: BTreeMap<String, TypeStatus>,
}

/// One type's subscription on one stream.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TypeStatus {
    pub wildcard: bool,
    /// Explicitly subscribed names.
    pub subscribed_names: usize,
    /// Resources the client holds, as far as the server knows (initial versions, then ACKs).
    pub acked_resources: usize,
    pub last_ack: Option<AckStatus>,
    pub last_nack: Option<NackStatus>,
}

/// The last response a client accepted.
#[derive(Clone, Debug, Serialize)]
pub struct AckStatus {
    /// The response's `system_version_info` (the cache's type version).
    pub version: String,
    pub nonce: String,
    pub at: String,
}

/// The last response a client rejected.
#[derive(Clone, Debug, Serialize)]
pub struct NackStatus {
    pub version: String,
    pub nonce: String,
    pub at: String,
    /// `error_detail` as the client sent it (code and message, the message cut at 2 KiB).
    pub code: i32,
    pub error: String,
}

/// Removes a stream from the client list when its task ends (however it ends).
struct Registered {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.inner
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

fn now_rfc3339() -> String {
    zmesh_core::certs::rfc3339(SystemTime::now())
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The ADS service. Clone freely; all clones share the cache, metrics and stop token.
#[derive(Clone)]
pub struct AdsServer {
    inner: Arc<Inner>,
    /// Streams must present a token this accepts (the TLS listener, 15012); `None` on the
    /// plaintext listener, which is for local use only.
    auth: Option<Arc<dyn TokenAuthenticator>>,
}

impl AdsServer {
    /// `stop` ends every open stream with `Unavailable` (controller shutdown).
    pub fn new(
        cache: Arc<ResourceCache>,
        opts: AdsOptions,
        metrics: Arc<AdsMetrics>,
        stop: CancellationToken,
    ) -> Self {
        AdsServer {
            inner: Arc::new(Inner {
                cache,
                large_pushes: Arc::new(tokio::sync::Semaphore::new(
                    opts.concurrent_large_pushes.max(1),
                )),
                opts,
                metrics,
                stop,
                next_stream: AtomicU64::new(1),
                clients: Mutex::new(BTreeMap::new()),
            }),
            auth: None,
        }
    }

    /// This service with every stream authenticated like a CA request (`authorization:
    /// Bearer <token>`): the config describes every workload, policy and certificate
    /// address in the mesh, and is not for anyone who can reach the port.
    pub fn with_authenticator(mut self, auth: Arc<dyn TokenAuthenticator>) -> Self {
        self.auth = Some(auth);
        self
    }

    pub fn metrics(&self) -> &Arc<AdsMetrics> {
        &self.inner.metrics
    }

    /// Type URLs served even while the cache has none of them ([`AdsOptions::types`]).
    pub fn served_types(&self) -> &[String] {
        &self.inner.opts.types
    }

    /// The open streams of every listener sharing this server (clones share the list),
    /// oldest first.
    pub fn clients(&self) -> Vec<ClientStatus> {
        self.inner
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// The tonic service, with Istio-sized message limits.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Err(Status::unimplemented(
            "state-of-the-world ADS is not served; use DeltaAggregatedResources",
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let peer = peer_addr(&request);
        let peer_identity = request
            .extensions()
            .get::<TlsConnInfo>()
            .and_then(|i| i.peer_identity.as_ref())
            .map(ToString::to_string);
        let mut caller = None;
        if let Some(auth) = &self.auth {
            match crate::ca::authenticate(auth.as_ref(), request.metadata()).await {
                Ok(c) => {
                    debug!(?peer, caller = %c, "ADS stream authenticated");
                    caller = Some(c.to_string());
                }
                Err(status) => {
                    warn!(?peer, "ADS stream refused: {}", status.message());
                    self.inner.metrics.unauthenticated_streams.inc();
                    return Err(status);
                }
            }
        }
        let inbound = request.into_inner();
        let (tx, mut rx) = mpsc::channel(OUTBOUND_QUEUE);
        let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
        self.inner
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                ClientStatus {
                    stream: id,
                    listener: if self.auth.is_some() {
                        "tls"
                    } else {
                        "plaintext"
                    },
                    peer,
                    caller,
                    peer_identity,
                    node_id: None,
                    proxy_type: None,
                    pod: None,
                    connected_at: now_rfc3339(),
                    types: BTreeMap::new(),
                },
            );
        let stream = AdsStream {
            id,
            _registered: Registered {
                inner: self.inner.clone(),
                id,
            },
            peer,
            inner: self.inner.clone(),
            tx,
            node: None,
            types: BTreeMap::new(),
            warned_types: HashSet::new(),
            nonce: 0,
        };
        tokio::spawn(stream.run(inbound));
        let out = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(Response::new(Box::pin(out)))
    }
}

/// A response in flight: what it changes in the client's view once ACKed.
struct InFlight {
    nonce: String,
    /// The response's `system_version_info`.
    version: u64,
    /// name → new version (None: removed).
    changes: Vec<(Name, Option<Arc<str>>)>,
    /// A large push's slot, given back with the ACK/NACK (or when the stream ends).
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Name → version, per stream. why foldhash: SipHash of 12k names per initial sync was a
/// tenth of the controller's CPU; foldhash is seeded per process, so still not predictable.
type NameMap = HashMap<Name, Arc<str>, foldhash::quality::RandomState>;

/// One type's subscription on one stream.
#[derive(Default)]
struct TypeSub {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client holds (initial_resource_versions, then ACKs). Names and versions are
    /// the cache's own allocations, shared.
    acked: NameMap,
    /// Versions the client NACKed: not pushed again until they change.
    rejected: NameMap,
    /// Cache type version the last push was computed against.
    seen_version: u64,
    /// Next push must diff everything (new subscription, wildcard change).
    full_diff: bool,
    /// Newly subscribed names to check explicitly.
    pending_names: BTreeSet<String>,
    /// The next push must be sent even if empty (answer to a first request).
    must_respond: bool,
    inflight: Option<InFlight>,
    /// A push was due while a response was in flight: push when it is answered.
    deferred: bool,
}

impl TypeSub {
    fn subscribed(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    fn client_has(&self, name: &str, version: &str) -> bool {
        self.acked.get(name).is_some_and(|v| **v == *version)
            || self.rejected.get(name).is_some_and(|v| **v == *version)
    }

    fn client_knows(&self, name: &str) -> bool {
        self.acked.contains_key(name) || self.rejected.contains_key(name)
    }
}

/// Why a stream ends.
enum End {
    /// Client closed or went away.
    Closed,
    /// Protocol violation: tell the client why.
    Invalid(String),
    Shutdown,
}

struct AdsStream {
    id: u64,
    /// Listed in [`AdsServer::clients`] while the stream lives.
    _registered: Registered,
    peer: Option<SocketAddr>,
    inner: Arc<Inner>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    node: Option<String>,
    types: BTreeMap<String, TypeSub>,
    warned_types: HashSet<String>,
    nonce: u64,
}

impl AdsStream {
    fn who(&self) -> String {
        match (&self.node, self.peer) {
            (Some(n), Some(p)) => format!("{n} ({p})"),
            (Some(n), None) => n.clone(),
            (None, Some(p)) => p.to_string(),
            (None, None) => format!("stream {}", self.id),
        }
    }

    async fn run(mut self, mut inbound: Streaming<DeltaDiscoveryRequest>) {
        self.inner.metrics.streams.inc();
        let mut changes = self.inner.cache.subscribe();
        changes.mark_unchanged();
        let stop = self.inner.stop.clone();
        let debounce = self.inner.opts.debounce;
        let mut deadline: Option<Instant> = None;
        let mut last_push: Option<Instant> = None;
        let end = loop {
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let step = tokio::select! {
                _ = stop.cancelled() => Err(End::Shutdown),
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => self.on_request(req).await,
                    Ok(None) => Err(End::Closed),
                    Err(status) => {
                        debug!(client = %self.who(), "ADS stream error: {status}");
                        Err(End::Closed)
                    }
                },
                r = changes.changed(), if deadline.is_none() => match r {
                    Ok(()) => {
                        // Leading edge: a change after a quiet window goes out at once;
                        // changes within `debounce` of the last push wait for the window's
                        // end and leave as one delta (a burst costs at most one push per
                        // window, an isolated change no added latency).
                        let now = Instant::now();
                        deadline = Some(last_push.map_or(now, |t| (t + debounce).max(now)));
                        Ok(())
                    }
                    Err(_) => Err(End::Shutdown),
                },
                _ = sleep => {
                    deadline = None;
                    changes.mark_unchanged();
                    last_push = Some(Instant::now());
                    self.push_all().await
                }
            };
            if let Err(end) = step {
                break end;
            }
        };
        match end {
            End::Closed => debug!(client = %self.who(), "ADS stream closed"),
            End::Invalid(msg) => {
                warn!(client = %self.who(), "ending ADS stream: {msg}");
                self.inner.metrics.rejected_streams.inc();
                let _ = self.tx.try_send(Err(Status::invalid_argument(msg)));
            }
            End::Shutdown => {
                let _ = self
                    .tx
                    .try_send(Err(Status::unavailable("controller is shutting down")));
            }
        }
        self.inner.metrics.streams.dec();
    }

    fn known_type(&self, type_url: &str) -> bool {
        self.inner.opts.types.iter().any(|t| t == type_url)
            || self.inner.cache.version(type_url) > 0
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), End> {
        validate(&req).map_err(End::Invalid)?;
        if let Some(node) = &req.node
            && self.node.is_none()
            && !node.id.is_empty()
        {
            let parsed = NodeId::parse(&node.id);
            match &parsed {
                Some(n) => info!(client = %n, peer = ?self.peer, "ADS client connected"),
                None => {
                    info!(node = %node.id, peer = ?self.peer, "ADS client connected (node id not in Istio's form)")
                }
            }
            self.node = Some(node.id.clone());
            self.inner.update_client(self.id, |c| {
                c.node_id = Some(node.id.clone());
                if let Some(n) = parsed {
                    c.proxy_type = Some(n.proxy_type);
                    c.pod = Some(format!("{}/{}", n.pod_namespace, n.pod_name));
                }
            });
        }
        let type_url = req.type_url.clone();
        if !self.known_type(&type_url) {
            if self.warned_types.insert(type_url.clone()) {
                warn!(client = %self.who(), %type_url, "request for an unknown type URL ignored");
            }
            return Ok(());
        }
        let first = !self.types.contains_key(&type_url);
        let who = self.who();
        let metrics = self.inner.metrics.clone();
        let sub = self.types.entry(type_url.clone()).or_default();

        // Subscription changes and answered deferred pushes are pushed now; plain cache
        // changes wait for the debounce timer.
        let mut push_now = first
            || !req.resource_names_subscribe.is_empty()
            || !req.resource_names_unsubscribe.is_empty();

        // ACK / NACK of our last response.
        let mut answered: Option<(u64, String)> = None;
        if !req.response_nonce.is_empty() {
            match sub.inflight.take() {
                Some(f) if f.nonce == req.response_nonce => {
                    push_now |= std::mem::take(&mut sub.deferred);
                    answered = Some((f.version, f.nonce.clone()));
                    match &req.error_detail {
                        None => {
                            for (name, v) in f.changes {
                                sub.rejected.remove(&name);
                                match v {
                                    Some(v) => sub.acked.insert(name, v),
                                    None => sub.acked.remove(&name),
                                };
                            }
                        }
                        Some(err) => {
                            metrics.nacks.get_or_create(&type_label(&type_url)).inc();
                            warn!(client = %who, %type_url, nonce = %f.nonce, code = err.code,
                            "client NACKed a push: {}", err.message);
                            for (name, v) in f.changes {
                                match v {
                                    Some(v) => {
                                        sub.rejected.insert(name, v);
                                    }
                                    // why: a removal cannot fail to decode; clients (Istio's ztunnel
                                    // included) apply it even when other resources are NACKed.
                                    None => {
                                        sub.acked.remove(&name);
                                        sub.rejected.remove(&name);
                                    }
                                }
                            }
                        }
                    }
                }
                Some(f) => {
                    debug!(client = %who, nonce = %req.response_nonce, expected = %f.nonce, "stale nonce ignored");
                    sub.inflight = Some(f);
                }
                None => {
                    debug!(client = %who, nonce = %req.response_nonce, "nonce of an older response ignored")
                }
            }
        }

        if first {
            sub.wildcard = req.resource_names_subscribe.is_empty()
                || req.resource_names_subscribe.iter().any(|n| n == "*");
            sub.acked = req
                .initial_resource_versions
                .iter()
                .map(|(k, v)| (Name::from(k.as_str()), Arc::from(v.as_str())))
                .collect();
            sub.full_diff = true;
            sub.must_respond = true;
        } else if !req.initial_resource_versions.is_empty() {
            debug!(client = %who, %type_url, "initial_resource_versions on a later request ignored");
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                if !sub.wildcard {
                    sub.wildcard = true;
                    sub.full_diff = true;
                }
            } else if sub.names.insert(name.clone()) && !sub.wildcard {
                sub.pending_names.insert(name.clone());
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                if sub.wildcard {
                    sub.wildcard = false;
                    // why: the client drops what it got through the wildcard itself.
                    let names = &sub.names;
                    sub.acked.retain(|k, _| names.contains(&**k));
                    sub.rejected.retain(|k, _| names.contains(&**k));
                }
            } else {
                sub.names.remove(name);
                sub.pending_names.remove(name);
                if !sub.wildcard {
                    sub.acked.remove(name.as_str());
                    sub.rejected.remove(name.as_str());
                }
            }
        }
        if sub.names.len() > MAX_NAMES {
            return Err(End::Invalid(format!(
                "subscription to more than {MAX_NAMES} {type_url} resources refused"
            )));
        }
        if !req.resource_names_subscribe.is_empty() && !first {
            // why: a named subscription answers even if nothing is new, so the client knows.
            sub.must_respond = true;
        }
        let (wildcard, names, acked) = (sub.wildcard, sub.names.len(), sub.acked.len());
        self.inner.update_client(self.id, |c| {
            let t = c.types.entry(type_url.clone()).or_default();
            t.wildcard = wildcard;
            t.subscribed_names = names;
            t.acked_resources = acked;
            if let Some((version, nonce)) = answered {
                let (version, at) = (version.to_string(), now_rfc3339());
                match &req.error_detail {
                    None => t.last_ack = Some(AckStatus { version, nonce, at }),
                    Some(err) => {
                        t.last_nack = Some(NackStatus {
                            version,
                            nonce,
                            at,
                            code: err.code,
                            error: truncate(&err.message, MAX_NACK_MESSAGE),
                        })
                    }
                }
            }
        });
        if push_now {
            self.push(&type_url).await?;
        }
        Ok(())
    }

    async fn push_all(&mut self) -> Result<(), End> {
        let types: Vec<String> = self.types.keys().cloned().collect();
        for t in types {
            self.push(&t).await?;
        }
        Ok(())
    }

    /// Compute and send the delta for one type, unless a response is in flight.
    async fn push(&mut self, type_url: &str) -> Result<(), End> {
        let cache = self.inner.cache.clone();
        let Some(sub) = self.types.get_mut(type_url) else {
            return Ok(());
        };
        if sub.inflight.is_some() {
            sub.deferred = true; // recomputed when the ACK/NACK arrives
            return Ok(());
        }
        // Names to look at, and the cache version they are relative to.
        let (version, candidates): (u64, Vec<(Name, Option<CachedResource>)>) = match (
            sub.full_diff,
            cache.changes_since(type_url, sub.seen_version),
        ) {
            (false, (v, Changes::None)) => {
                let (_, c) = cache.get_many(type_url, sub.pending_names.iter().map(|s| s.as_str()));
                (v, c)
            }
            (false, (v, Changes::Names(mut names))) => {
                names.extend(sub.pending_names.iter().map(|s| Name::from(s.as_str())));
                let (_, c) = cache.get_many(type_url, names.iter().map(|s| &**s));
                (v, c)
            }
            (_, (v, _)) => {
                let (_, snap) = cache.snapshot(type_url);
                let gone: BTreeSet<Name> = sub
                    .acked
                    .keys()
                    .chain(sub.rejected.keys())
                    .filter(|k| !snap.contains_key(&***k))
                    .cloned()
                    .chain(
                        sub.pending_names
                            .iter()
                            .filter(|k| !snap.contains_key(k.as_str()))
                            .map(|k| Name::from(k.as_str())),
                    )
                    .collect();
                let mut out: Vec<(Name, Option<CachedResource>)> =
                    snap.into_iter().map(|(k, r)| (k, Some(r))).collect();
                out.extend(gone.into_iter().map(|k| (k, None)));
                (v, out)
            }
        };
        // why: a stream already holding a slot (its other type's initial sync, not yet ACKed)
        // must not wait for a second one: it would not read that ACK while waiting.
        let holds_slot = self
            .types
            .values()
            .any(|t| t.inflight.as_ref().is_some_and(|f| f.slot.is_some()));
        let Some(sub) = self.types.get_mut(type_url) else {
            return Ok(());
        };
        let slot = if candidates.len() >= LARGE_PUSH_RESOURCES && !holds_slot {
            let slots = self.inner.large_pushes.clone();
            tokio::select! {
                _ = self.inner.stop.cancelled() => return Err(End::Shutdown),
                r = tokio::time::timeout(LARGE_PUSH_WAIT, slots.acquire_owned()) => r.ok().and_then(Result::ok),
            }
        } else {
            None
        };
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        let mut changes = Vec::new();
        for (name, res) in candidates {
            if !sub.subscribed(&name) {
                continue;
            }
            match res {
                Some(r) => {
                    if sub.client_has(&name, &r.version) {
                        // A reconnecting client's names were its own copies: share the cache's.
                        if let Some((k, v)) = sub.acked.get_key_value(&*name)
                            && !Arc::ptr_eq(k, &name)
                            && *v == r.version
                        {
                            sub.acked.remove(&*name);
                            sub.acked.insert(name, r.version);
                        }
                        continue;
                    }
                    resources.push(r.encoded.clone());
                    changes.push((name, Some(r.version)));
                }
                None => {
                    // why: a named resource that does not exist is reported as removed, so a
                    // client waiting for it learns the answer.
                    if sub.client_knows(&name) || sub.pending_names.contains(&*name) {
                        removed.push(name.to_string());
                        changes.push((name, None));
                    }
                }
            }
        }
        sub.seen_version = version;
        sub.full_diff = false;
        sub.pending_names.clear();
        if resources.is_empty() && removed.is_empty() && !sub.must_respond {
            return Ok(());
        }
        sub.must_respond = false;
        self.nonce += 1;
        let nonce = format!("{}-{}", self.id, self.nonce);
        let n_res = resources.len() as u64;
        debug!(client = %self.who(), %type_url, version, resources = n_res, removed = removed.len(), %nonce, "push");
        let sub = self.types.get_mut(type_url).expect("present above");
        sub.inflight = Some(InFlight {
            nonce: nonce.clone(),
            version,
            changes,
            slot,
        });
        let resp = DeltaDiscoveryResponse {
            system_version_info: version.to_string(),
            resources,
            type_url: type_url.to_string(),
            nonce,
            removed_resources: removed,
        };
        let m = &self.inner.metrics;
        m.pushes.get_or_create(&type_label(type_url)).inc();
        m.resources_sent
            .get_or_create(&type_label(type_url))
            .inc_by(n_res);
        tokio::select! {
            r = self.tx.send(Ok(resp)) => r.map_err(|_| End::Closed),
            _ = self.inner.stop.cancelled() => Err(End::Shutdown),
        }
    }
}

/// Structural checks; the error text goes back to the client.
#[doc(hidden)] // pub for the fuzz targets and tests/parsers_never_panic.rs
pub fn validate(req: &DeltaDiscoveryRequest) -> Result<(), String> {
    if req.type_url.is_empty() {
        return Err("DeltaDiscoveryRequest has an empty type_url".into());
    }
    let n = req.resource_names_subscribe.len()
        + req.resource_names_unsubscribe.len()
        + req.initial_resource_versions.len();
    if n > MAX_NAMES {
        return Err(format!(
            "DeltaDiscoveryRequest for {} carries {n} resource names; at most {MAX_NAMES} are accepted",
            req.type_url
        ));
    }
    let empty = |v: &[String]| v.iter().any(String::is_empty);
    if empty(&req.resource_names_subscribe) || empty(&req.resource_names_unsubscribe) {
        return Err(format!(
            "DeltaDiscoveryRequest for {} subscribes or unsubscribes an empty resource name",
            req.type_url
        ));
    }
    if req.initial_resource_versions.keys().any(String::is_empty) {
        return Err(format!(
            "DeltaDiscoveryRequest for {} has an empty name in initial_resource_versions",
            req.type_url
        ));
    }
    if req.error_detail.is_some() && req.response_nonce.is_empty() {
        return Err(format!(
            "DeltaDiscoveryRequest for {} carries error_detail (a NACK) without response_nonce",
            req.type_url
        ));
    }
    Ok(())
}

/// The client's address, on plaintext and on TLS connections.
pub fn peer_addr<T>(request: &Request<T>) -> Option<SocketAddr> {
    request.remote_addr().or_else(|| {
        request
            .extensions()
            .get::<TlsConnInfo>()
            .and_then(|i| i.tcp.remote_addr())
    })
}

/// Per-connection information of a TLS connection (the client certificate is optional).
#[derive(Clone, Debug)]
pub struct TlsConnInfo {
    pub tcp: TcpConnectInfo,
    /// SPIFFE identity of the client certificate, when one was presented.
    pub peer_identity: Option<zmesh_core::identity::Identity>,
}

/// A server-side TLS connection tonic can serve.
pub struct TlsConn(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for TlsConn {
    type ConnectInfo = TlsConnInfo;

    fn connect_info(&self) -> TlsConnInfo {
        let (tcp, session) = self.0.get_ref();
        TlsConnInfo {
            tcp: tcp.connect_info(),
            peer_identity: zmesh_core::tls::peer_identity(session),
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// TLS handshakes taking longer than this are dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted connections waiting for tonic (handshake done) before accepting pauses.
const ACCEPT_QUEUE: usize = 64;
/// Concurrent TLS handshakes; accepting waits beyond that (a handshake flood stays bounded).
const MAX_HANDSHAKES: usize = 512;

/// Accept TLS connections on `listener` until `stop`, handshaking each in its own task (a slow
/// handshake never delays others). The stream feeds `Server::serve_with_incoming_shutdown`.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) -> impl Stream<Item = Result<TlsConn, std::io::Error>> + Send + 'static {
    let (tx, mut rx) = mpsc::channel::<Result<TlsConn, std::io::Error>>(ACCEPT_QUEUE);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => return,
                p = handshakes.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // why: EMFILE and friends are transient; back off instead of spinning.
                        warn!("accept on the TLS xDS/CA port failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsConn(tls))).await;
                    }
                    Ok(Err(e)) => debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Plain TCP connections from `listener` for tonic (TCP_NODELAY set).
pub fn tcp_incoming(
    listener: TcpListener,
) -> impl Stream<Item = Result<TcpStream, std::io::Error>> + Send + 'static {
    futures::stream::unfold(listener, |l| async move {
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    return Some((Ok(s), l));
                }
                Err(e) => {
                    // why: EMFILE and friends are transient; back off instead of ending the server.
                    warn!("accept on the plaintext xDS port failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}
