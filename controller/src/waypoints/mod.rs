//! Waypoint reconciliation (Kubernetes mode only): every Gateway API `Gateway` with
//! `gatewayClassName: istio-waypoint` becomes, in its namespace, the objects of
//! `manifests/templates/waypoint.yaml` (see [`render`]): a ServiceAccount, a ConfigMap with the
//! mesh CA root, a Deployment running the `waypoint` binary and a ClusterIP Service on HBONE
//! 15008, all named after the Gateway, owned by it (`controller: true`,
//! `blockOwnerDeletion: true`) and labelled `app.kubernetes.io/managed-by: zmesh-controller` +
//! `gateway.networking.k8s.io/gateway-name: <gateway>`.
//!
//! How:
//! - Watches: Gateways (`gateway.networking.k8s.io/v1`, all namespaces), and the Deployments
//!   and Services carrying the managed-by label (their status feeds the Gateway's status, and
//!   an edit by someone else is undone). Nothing is reconciled before the first Gateway list
//!   has arrived: an incomplete view would make live waypoints look orphaned.
//! - Apply: server-side apply, field manager `zmesh-controller`, `force` (the controller owns
//!   these objects; a conflicting manager is overridden, as Istio's deployment controller
//!   does). It runs on every Gateway change, on every change of an owned Deployment/Service
//!   made by someone else (our own writes are recognised by their resourceVersion and
//!   ignored, so applies never feed back into themselves), at start, and on every resync.
//! - An object of the same name that is not labelled as ours for this Gateway (a user's own
//!   Deployment called `waypoint`, say) is never overwritten: the Gateway reports why in its
//!   `Programmed` condition and is retried, so labelling or deleting the object resolves it.
//! - Deletion: when a Gateway is deleted (or stops being of class `istio-waypoint`), its
//!   objects are deleted explicitly, found by the two labels, with a uid precondition. The
//!   garbage collector would do it too, but only if the owner reference was in place; and a
//!   Gateway deleted while the controller was down is caught by the *sweep* (at start, after
//!   each Gateway relist and each resync): every managed object whose Gateway is not a current
//!   waypoint is deleted. Before deleting, the Gateway is read once more from the API server,
//!   so a stale watch cache (for example of a second controller replica) never removes the
//!   objects of a live waypoint.
//! - Status, written to the Gateway's status subresource (merge patch, guarded by the
//!   Gateway's resourceVersion, only when it changes): `Accepted=True` (reason `Accepted`),
//!   and `Programmed`, with Istio's meaning "traffic can be sent to it":
//!   `True`/`Programmed` once the Service has a cluster IP *and* the Deployment has at least
//!   one available replica; until then `False` with reason `AddressNotAssigned` (no cluster
//!   IP yet) or `Pending` (no available replica yet, or the objects could not be applied: the
//!   message names the object and the API error). `status.addresses` lists the Service's
//!   cluster IPs (type `IPAddress`). Every condition carries the Gateway's
//!   `observedGeneration`; `lastTransitionTime` changes only when the condition's status does.
//!   So `zmesh waypoint apply --wait` can wait for `Programmed=True`.
//! - Errors (403 from RBAC, 409, 5xx, timeouts) are logged with the Gateway and the object,
//!   and the Gateway is retried with exponential backoff; other Gateways are unaffected and
//!   the controller never stops because of them.
//! - Several replicas: every replica reconciles (no leader election). That is safe: the
//!   applies are idempotent (same manager, same content), status writes are guarded by the
//!   resourceVersion and compute the same result, and deletions tolerate 404.

pub mod render;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions,
    PropagationPolicy,
};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use render::{
    GATEWAY_API_VERSION, GATEWAY_NAME_LABEL, GatewayRef, MANAGED_BY, MANAGED_BY_LABEL, OWNED_KINDS,
    OwnedKind, RenderError, Template, WAYPOINT_CLASS, WaypointSettings,
};

/// Timing of the reconciler.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// First and largest delay before a failed Gateway is tried again.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Every Gateway is re-applied and orphans are swept this often (drift of objects that
    /// are not watched, such as the ServiceAccount, is corrected then).
    pub resync: Duration,
    /// Bound on one Gateway's reconciliation (all its API calls) and on one sweep.
    pub request_timeout: Duration,
    /// How often the Gateway kind is looked for again when its CRD is not installed.
    pub absent_retry: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(120),
            resync: Duration::from_secs(300),
            request_timeout: Duration::from_secs(30),
            absent_retry: Duration::from_secs(60),
        }
    }
}

/// A Gateway, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GatewayKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for GatewayKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why one Gateway could not be reconciled (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{action} {kind} {namespace}/{name}: {}", api_message(source))]
    Api {
        action: &'static str,
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(
        "{kind} {namespace}/{name} exists and was not made by zmesh-controller for this Gateway; not overwriting it (delete it, or label it {MANAGED_BY_LABEL}={MANAGED_BY} and {GATEWAY_NAME_LABEL}={gateway} to hand it over)"
    )]
    NotOurs {
        kind: &'static str,
        namespace: String,
        name: String,
        gateway: String,
    },
    #[error("Gateway {0} has no metadata.uid (owner references need it)")]
    NoUid(GatewayKey),
    #[error("gave up after {0:?} (API server slow or unreachable)")]
    Timeout(Duration),
}

/// An API error as one line: `403 Forbidden: <the API server's message>` (kube's own
/// rendering repeats the whole Status object).
fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
        other => other.to_string(),
    }
}

/// Reconciles waypoint Gateways into Deployments, Services and ServiceAccounts.
pub struct WaypointReconciler {
    client: Client,
    template: Arc<Template>,
    settings: WaypointSettings,
    timing: Timing,
}

impl WaypointReconciler {
    pub fn new(client: Client, template: Template, settings: WaypointSettings) -> Self {
        WaypointReconciler {
            client,
            template: Arc::new(template),
            settings,
            timing: Timing::default(),
        }
    }

    pub fn with_timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// Run until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        // why bounded: watchers wait when the loop is busy applying, instead of buffering
        // without limit.
        let (tx, rx) = mpsc::channel(256);
        let mut watchers = Vec::new();
        watchers.push(tokio::spawn(watch(
            Api::all_with(self.client.clone(), &gateway_resource()),
            watcher::Config::default(),
            Source::Gateways,
            tx.clone(),
            cancel.clone(),
            self.timing,
        )));
        for kind in ["Deployment", "Service"] {
            let Some(k) = render::owned_kind(kind) else {
                continue;
            };
            watchers.push(tokio::spawn(watch(
                Api::all_with(self.client.clone(), &resource(k)),
                watcher::Config::default().labels(&managed_selector(None)),
                Source::Owned(k.kind),
                tx.clone(),
                cancel.clone(),
                self.timing,
            )));
        }
        drop(tx);
        let mut state = State {
            client: self.client,
            template: self.template,
            settings: self.settings,
            timing: self.timing,
            waypoints: BTreeMap::new(),
            synced: false,
            written: HashMap::new(),
            due: BTreeMap::new(),
            failures: HashMap::new(),
            sweep_due: None,
            next_resync: Instant::now() + self.timing.resync,
        };
        state.run(rx, cancel).await;
        for w in watchers {
            w.abort();
        }
    }
}

fn gateway_resource() -> ApiResource {
    ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: GATEWAY_API_VERSION.into(),
        kind: "Gateway".into(),
        plural: "gateways".into(),
    }
}

fn resource(k: &OwnedKind) -> ApiResource {
    ApiResource {
        group: k.group.into(),
        version: k.version.into(),
        api_version: k.api_version(),
        kind: k.kind.into(),
        plural: k.plural.into(),
    }
}

/// `managed-by=zmesh-controller[,gateway-name=<gateway>]`.
fn managed_selector(gateway: Option<&str>) -> String {
    match gateway {
        Some(g) => format!("{MANAGED_BY_LABEL}={MANAGED_BY},{GATEWAY_NAME_LABEL}={g}"),
        None => format!("{MANAGED_BY_LABEL}={MANAGED_BY}"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Gateways,
    Owned(&'static str),
}

enum Input {
    /// A complete (re)list.
    Listed(Source, Vec<Value>),
    Applied(Source, Value),
    Deleted(Source, Value),
}

/// One watcher: lists, watches, and on any error starts over (a relist) after a backoff.
async fn watch(
    api: Api<DynamicObject>,
    config: watcher::Config,
    source: Source,
    tx: mpsc::Sender<Input>,
    cancel: CancellationToken,
    timing: Timing,
) {
    let what = match source {
        Source::Gateways => "Gateway",
        Source::Owned(kind) => kind,
    };
    let mut backoff = timing.backoff_initial;
    let mut reported_absent = false;
    loop {
        let mut stream = watcher(api.clone(), config.clone()).boxed();
        let mut buffer = Vec::new();
        let delay = loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return,
                n = stream.next() => n,
            };
            let input = match next {
                None => break timing.backoff_initial,
                Some(Err(e)) => {
                    let code = match &e {
                        watcher::Error::InitialListFailed(kube::Error::Api(s))
                        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
                        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
                        watcher::Error::WatchError(s) => Some(s.code),
                        _ => None,
                    };
                    if matches!(e, watcher::Error::InitialListFailed(_)) && code == Some(404) {
                        if !reported_absent {
                            info!(
                                kind = what,
                                "waypoints: {what} is not served by the API server (Gateway API CRDs not installed?); looking again in {:?}",
                                timing.absent_retry
                            );
                            reported_absent = true;
                        }
                        break timing.absent_retry;
                    }
                    warn!(kind = what, error = %e, retry_in = ?backoff, "waypoints: watch failed");
                    let d = backoff;
                    backoff = (backoff * 2).min(timing.backoff_max);
                    break d;
                }
                Some(Ok(event)) => {
                    backoff = timing.backoff_initial;
                    match event {
                        watcher::Event::Init => {
                            buffer.clear();
                            continue;
                        }
                        watcher::Event::InitApply(o) => {
                            buffer.extend(to_value(o));
                            continue;
                        }
                        watcher::Event::InitDone => {
                            reported_absent = false;
                            Input::Listed(source, std::mem::take(&mut buffer))
                        }
                        watcher::Event::Apply(o) => match to_value(o) {
                            Some(v) => Input::Applied(source, v),
                            None => continue,
                        },
                        watcher::Event::Delete(o) => match to_value(o) {
                            Some(v) => Input::Deleted(source, v),
                            None => continue,
                        },
                    }
                }
            };
            if tx.send(input).await.is_err() {
                return;
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

fn to_value(o: DynamicObject) -> Option<Value> {
    serde_json::to_value(o)
        .inspect_err(|e| warn!(error = %e, "waypoints: object not representable as JSON; skipped"))
        .ok()
}

fn meta_str<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v.get("metadata")?.get(field)?.as_str()
}

fn label<'a>(v: &'a Value, label: &str) -> Option<&'a str> {
    v.pointer("/metadata/labels")?.get(label)?.as_str()
}

fn gateway_key(v: &Value) -> Option<GatewayKey> {
    Some(GatewayKey {
        namespace: meta_str(v, "namespace")?.to_string(),
        name: meta_str(v, "name")?.to_string(),
    })
}

/// The Gateway an owned object belongs to (its namespace and gateway-name label), if it is
/// ours.
fn owner_key(v: &Value) -> Option<GatewayKey> {
    if label(v, MANAGED_BY_LABEL) != Some(MANAGED_BY) {
        return None;
    }
    Some(GatewayKey {
        namespace: meta_str(v, "namespace")?.to_string(),
        name: label(v, GATEWAY_NAME_LABEL)?.to_string(),
    })
}

/// A Gateway that should have a waypoint: class `istio-waypoint`, not being deleted.
pub fn is_live_waypoint(gateway: &Value) -> bool {
    gateway
        .pointer("/spec/gatewayClassName")
        .and_then(Value::as_str)
        == Some(WAYPOINT_CLASS)
        && gateway.pointer("/metadata/deletionTimestamp").is_none()
}

/// Written object: kind, namespace, name.
type WrittenKey = (String, String, String);

struct State {
    client: Client,
    template: Arc<Template>,
    settings: WaypointSettings,
    timing: Timing,
    /// Current waypoint Gateways, as last seen by the watch.
    waypoints: BTreeMap<GatewayKey, Value>,
    /// The first Gateway list has arrived.
    synced: bool,
    /// resourceVersion of each object as our last write left it: watch events carrying it
    /// are our own and trigger nothing.
    written: HashMap<WrittenKey, String>,
    /// Gateways to reconcile, and when.
    due: BTreeMap<GatewayKey, Instant>,
    /// Consecutive failures per Gateway (backoff).
    failures: HashMap<GatewayKey, u32>,
    sweep_due: Option<Instant>,
    next_resync: Instant,
}

impl State {
    async fn run(&mut self, mut rx: mpsc::Receiver<Input>, cancel: CancellationToken) {
        loop {
            let wake = self.next_wakeup();
            tokio::select! {
                // why biased: drain watch input before working, so work sees the latest state.
                biased;
                _ = cancel.cancelled() => return,
                input = rx.recv() => match input {
                    Some(input) => self.handle(input),
                    None => return,
                },
                _ = tokio::time::sleep_until(wake) => self.work().await,
            }
        }
    }

    fn next_wakeup(&self) -> Instant {
        let mut wake = self.next_resync;
        if self.synced {
            if let Some(s) = self.sweep_due {
                wake = wake.min(s);
            }
            if let Some(d) = self.due.values().min() {
                wake = wake.min(*d);
            }
        }
        wake
    }

    fn enqueue(&mut self, key: GatewayKey) {
        self.due.insert(key, Instant::now());
    }

    /// True when `v` is exactly what our last write of it returned.
    fn is_own_write(&self, kind: &str, v: &Value) -> bool {
        let (Some(ns), Some(name), Some(rv)) = (
            meta_str(v, "namespace"),
            meta_str(v, "name"),
            meta_str(v, "resourceVersion"),
        ) else {
            return false;
        };
        self.written
            .get(&(kind.to_string(), ns.to_string(), name.to_string()))
            .is_some_and(|w| w == rv)
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Listed(Source::Gateways, items) => {
                let fresh: BTreeMap<GatewayKey, Value> = items
                    .into_iter()
                    .filter(is_live_waypoint)
                    .filter_map(|g| Some((gateway_key(&g)?, g)))
                    .collect();
                // Re-apply everything listed (start, relist) and clean up what disappeared.
                let gone: Vec<GatewayKey> = self
                    .waypoints
                    .keys()
                    .filter(|k| !fresh.contains_key(*k))
                    .cloned()
                    .collect();
                self.waypoints = fresh;
                let keys: Vec<GatewayKey> = self.waypoints.keys().cloned().collect();
                for k in keys.into_iter().chain(gone) {
                    self.enqueue(k);
                }
                if !self.synced {
                    info!(
                        waypoints = self.waypoints.len(),
                        "waypoints: Gateways listed; reconciling"
                    );
                }
                self.synced = true;
                self.sweep_due = Some(Instant::now());
            }
            Input::Applied(Source::Gateways, g) => {
                let Some(key) = gateway_key(&g) else { return };
                if is_live_waypoint(&g) {
                    let own = self.is_own_write("Gateway", &g);
                    self.waypoints.insert(key.clone(), g);
                    if !own {
                        self.enqueue(key);
                    }
                } else if self.waypoints.remove(&key).is_some() {
                    // No longer a waypoint (class changed, or being deleted).
                    self.enqueue(key);
                }
            }
            Input::Deleted(Source::Gateways, g) => {
                let Some(key) = gateway_key(&g) else { return };
                if self.waypoints.remove(&key).is_some() || is_live_waypoint(&g) {
                    self.enqueue(key);
                }
            }
            Input::Listed(Source::Owned(kind), items) => {
                for v in items {
                    if let (Some(key), false) = (owner_key(&v), self.is_own_write(kind, &v)) {
                        self.enqueue(key);
                    }
                }
            }
            Input::Applied(Source::Owned(kind), v) => {
                if let (Some(key), false) = (owner_key(&v), self.is_own_write(kind, &v)) {
                    debug!(gateway = %key, kind, "waypoints: owned object changed");
                    self.enqueue(key);
                }
            }
            Input::Deleted(Source::Owned(kind), v) => {
                if let Some(key) = owner_key(&v) {
                    // Recreated when the Gateway still exists; nothing to do otherwise.
                    if self.waypoints.contains_key(&key) {
                        debug!(gateway = %key, kind, "waypoints: owned object deleted");
                        self.enqueue(key);
                    }
                }
            }
        }
    }

    async fn work(&mut self) {
        let now = Instant::now();
        if now >= self.next_resync {
            self.next_resync = now + self.timing.resync;
            if self.synced {
                let keys: Vec<GatewayKey> = self.waypoints.keys().cloned().collect();
                for k in keys {
                    self.enqueue(k);
                }
                self.sweep_due = Some(now);
            }
            return;
        }
        if !self.synced {
            return;
        }
        if self.sweep_due.is_some_and(|s| s <= now) {
            self.sweep_due = None;
            let t = self.timing.request_timeout;
            let result = match tokio::time::timeout(t, self.sweep()).await {
                Ok(r) => r,
                Err(_) => Err(ReconcileError::Timeout(t)),
            };
            if let Err(e) = result {
                // why not exponential: a sweep is cheap and also runs at every resync.
                let retry_in = self.timing.backoff_max.min(self.timing.backoff_initial * 4);
                warn!(error = %e, ?retry_in, "waypoints: looking for objects of deleted Gateways failed");
                self.sweep_due = Some(Instant::now() + retry_in);
            }
            return;
        }
        let Some(key) = self
            .due
            .iter()
            .filter(|(_, d)| **d <= now)
            .min_by_key(|(_, d)| **d)
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        self.due.remove(&key);
        let t = self.timing.request_timeout;
        let result = match tokio::time::timeout(t, self.reconcile(&key)).await {
            Ok(r) => r,
            Err(_) => Err(ReconcileError::Timeout(t)),
        };
        match result {
            Ok(()) => {
                if self.failures.remove(&key).is_some() {
                    info!(gateway = %key, "waypoints: reconciled after earlier failures");
                }
            }
            Err(e) => {
                let n = self.failures.entry(key.clone()).or_default();
                let delay = backoff(self.timing, *n);
                *n = n.saturating_add(1);
                warn!(gateway = %key, error = %e, retry_in = ?delay, "waypoints: reconciling Gateway failed");
                // A newer change enqueued meanwhile keeps its earlier time.
                let at = Instant::now() + delay;
                self.due.entry(key).or_insert(at);
            }
        }
    }

    /// Delete managed objects whose Gateway is not a current waypoint.
    async fn sweep(&mut self) -> Result<(), ReconcileError> {
        let mut orphans = BTreeSet::new();
        for k in OWNED_KINDS {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource(k));
            let list = api
                .list(&ListParams::default().labels(&managed_selector(None)))
                .await
                .map_err(|source| ReconcileError::Api {
                    action: "listing",
                    kind: k.kind,
                    namespace: "*".into(),
                    name: "*".into(),
                    source,
                })?;
            for o in list.items {
                let v = serde_json::to_value(o).unwrap_or(Value::Null);
                if let Some(key) = owner_key(&v)
                    && !self.waypoints.contains_key(&key)
                {
                    orphans.insert(key);
                }
            }
        }
        for key in orphans {
            info!(gateway = %key, "waypoints: objects of a Gateway that is gone; deleting them");
            self.enqueue(key);
        }
        Ok(())
    }

    async fn reconcile(&mut self, key: &GatewayKey) -> Result<(), ReconcileError> {
        match self.waypoints.get(key).cloned() {
            Some(gw) => self.apply(key, &gw).await,
            None => self.remove(key).await,
        }
    }

    fn record(&mut self, kind: &str, v: &Value) {
        if let (Some(ns), Some(name), Some(rv)) = (
            meta_str(v, "namespace"),
            meta_str(v, "name"),
            meta_str(v, "resourceVersion"),
        ) {
            self.written.insert(
                (kind.to_string(), ns.to_string(), name.to_string()),
                rv.to_string(),
            );
        }
    }

    async fn apply(&mut self, key: &GatewayKey, gw: &Value) -> Result<(), ReconcileError> {
        let uid = meta_str(gw, "uid").ok_or_else(|| ReconcileError::NoUid(key.clone()))?;
        let docs = self.template.render(
            &self.settings,
            &GatewayRef {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                uid: uid.to_string(),
            },
        )?;
        let mut observed = Observed::default();
        let mut failure = None;
        for doc in docs {
            let (Some(k), Some(name)) = (
                doc.get("kind")
                    .and_then(Value::as_str)
                    .and_then(render::owned_kind),
                meta_str(&doc, "name").map(str::to_string),
            ) else {
                continue; // Template::parse guarantees both.
            };
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &key.namespace, &resource(k));
            if let Err(e) = self.check_ours(&api, key, k.kind, &name).await {
                failure = Some(e);
                break;
            }
            let params = PatchParams::apply(MANAGED_BY).force();
            match api.patch(&name, &params, &Patch::Apply(&doc)).await {
                Ok(obj) => {
                    let v = serde_json::to_value(obj).unwrap_or(Value::Null);
                    self.record(k.kind, &v);
                    observed.observe(k.kind, &key.namespace, &name, &v);
                }
                Err(source) => {
                    failure = Some(ReconcileError::Api {
                        action: "applying",
                        kind: k.kind,
                        namespace: key.namespace.clone(),
                        name,
                        source,
                    });
                    break;
                }
            }
        }
        if let Some(e) = &failure {
            observed.error = Some(e.to_string());
        } else {
            debug!(gateway = %key, "waypoints: objects applied");
        }
        let status = self.write_status(key, gw, &observed).await;
        match (failure, status) {
            (Some(e), Err(se)) => {
                warn!(gateway = %key, error = %se, "waypoints: writing the Gateway status failed");
                Err(e)
            }
            (Some(e), Ok(())) => Err(e),
            (None, r) => r,
        }
    }

    /// Refuse to take over an object of the same name that someone else made (as Istio
    /// does): a forced apply would silently overwrite it. Objects we wrote in this run are
    /// known to be ours, so this costs one read per object after a start.
    async fn check_ours(
        &self,
        api: &Api<DynamicObject>,
        key: &GatewayKey,
        kind: &'static str,
        name: &str,
    ) -> Result<(), ReconcileError> {
        let known = (kind.to_string(), key.namespace.clone(), name.to_string());
        if self.written.contains_key(&known) {
            return Ok(());
        }
        let existing = api
            .get_opt(name)
            .await
            .map_err(|source| ReconcileError::Api {
                action: "reading",
                kind,
                namespace: key.namespace.clone(),
                name: name.to_string(),
                source,
            })?;
        let theirs = existing.is_some_and(|o| {
            owner_key(&serde_json::to_value(o).unwrap_or(Value::Null)).as_ref() != Some(key)
        });
        if theirs {
            return Err(ReconcileError::NotOurs {
                kind,
                namespace: key.namespace.clone(),
                name: name.to_string(),
                gateway: key.name.clone(),
            });
        }
        Ok(())
    }

    async fn write_status(
        &mut self,
        key: &GatewayKey,
        gw: &Value,
        observed: &Observed,
    ) -> Result<(), ReconcileError> {
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        );
        let now = serde_json::to_value(now)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let Some(patch) = status_patch(gw, observed, &now) else {
            return Ok(());
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &key.namespace, &gateway_resource());
        let result = api
            .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| ReconcileError::Api {
                action: "writing the status of",
                kind: "Gateway",
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                source,
            })?;
        let v = serde_json::to_value(result).unwrap_or(Value::Null);
        self.record("Gateway", &v);
        // Keep the cache current: the next reconcile compares against what we wrote.
        if is_live_waypoint(&v) {
            self.waypoints.insert(key.clone(), v);
        }
        Ok(())
    }

    /// The Gateway is gone (or no longer a waypoint): delete what we made for it.
    async fn remove(&mut self, key: &GatewayKey) -> Result<(), ReconcileError> {
        // Ask the API server itself: our watch may lag behind (another replica may have just
        // created these objects for a Gateway we have not seen yet).
        let gateways: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &key.namespace, &gateway_resource());
        match gateways.get_opt(&key.name).await {
            Ok(Some(g)) => {
                let v = serde_json::to_value(g).unwrap_or(Value::Null);
                if is_live_waypoint(&v) {
                    debug!(gateway = %key, "waypoints: Gateway exists after all; applying");
                    self.waypoints.insert(key.clone(), v.clone());
                    return self.apply(key, &v).await;
                }
            }
            Ok(None) => {}
            // The kind itself is gone (CRD uninstalled): so is the Gateway.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(ReconcileError::Api {
                    action: "reading",
                    kind: "Gateway",
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    source,
                });
            }
        }
        // A label value has at most 63 characters: a longer name never got objects.
        if key.name.len() > 63 {
            return Ok(());
        }
        let selector = managed_selector(Some(&key.name));
        for k in OWNED_KINDS.iter().rev() {
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &key.namespace, &resource(k));
            let err = |action, name: &str, source| ReconcileError::Api {
                action,
                kind: k.kind,
                namespace: key.namespace.clone(),
                name: name.to_string(),
                source,
            };
            let list = api
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(|e| err("listing", "*", e))?;
            for o in list.items {
                let Some(name) = o.metadata.name.clone() else {
                    continue;
                };
                // Checked here too: deleting someone else's object is the one mistake this
                // must never make, whatever the server did with the selector.
                let v = serde_json::to_value(&o).unwrap_or(Value::Null);
                if owner_key(&v).as_ref() != Some(key) {
                    continue;
                }
                let params = DeleteParams {
                    propagation_policy: Some(PropagationPolicy::Background),
                    // Never delete a same-named object created after our list.
                    preconditions: o.metadata.uid.clone().map(|uid| Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                match api.delete(&name, &params).await {
                    Ok(_) => {
                        info!(gateway = %key, kind = k.kind, object = %format!("{}/{name}", key.namespace),
                            "waypoints: deleted (its Gateway is gone)");
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                    Err(e) => return Err(err("deleting", &name, e)),
                }
                self.written
                    .remove(&(k.kind.to_string(), key.namespace.clone(), name));
            }
        }
        self.written.remove(&(
            "Gateway".to_string(),
            key.namespace.clone(),
            key.name.clone(),
        ));
        Ok(())
    }
}

fn backoff(timing: Timing, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.min(16));
    timing
        .backoff_initial
        .saturating_mul(factor)
        .min(timing.backoff_max)
}

/// What the last apply saw of a waypoint's objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Why applying failed, if it did.
    pub error: Option<String>,
    /// `namespace/name` of the Deployment and its `status.availableReplicas` (absent: 0).
    pub deployment: Option<(String, i64)>,
    /// `namespace/name` of the Service and its cluster IPs (none while not allocated).
    pub service: Option<(String, Vec<String>)>,
}

impl Observed {
    fn observe(&mut self, kind: &str, namespace: &str, name: &str, v: &Value) {
        let id = format!("{namespace}/{name}");
        match kind {
            "Deployment" => {
                let available = v
                    .pointer("/status/availableReplicas")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                self.deployment = Some((id, available));
            }
            "Service" => {
                let mut ips: Vec<String> = v
                    .pointer("/spec/clusterIPs")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default();
                if ips.is_empty()
                    && let Some(ip) = v.pointer("/spec/clusterIP").and_then(Value::as_str)
                {
                    ips.push(ip.to_string());
                }
                ips.retain(|ip| ip.parse::<std::net::IpAddr>().is_ok());
                self.service = Some((id, ips));
            }
            _ => {}
        }
    }
}

/// The conditions and addresses the Gateway should have.
fn desired_status(gw: &Value, observed: &Observed) -> (Vec<Value>, Vec<Value>) {
    let addresses: Vec<Value> = observed
        .service
        .as_ref()
        .map(|(_, ips)| {
            ips.iter()
                .map(|ip| json!({"type": "IPAddress", "value": ip}))
                .collect()
        })
        .unwrap_or_default();
    let name = meta_str(gw, "name").unwrap_or_default();
    let namespace = meta_str(gw, "namespace").unwrap_or_default();
    let (programmed, reason, message) = if let Some(e) = &observed.error {
        (
            false,
            "Pending",
            format!("waypoint objects could not be applied (retrying): {e}"),
        )
    } else if observed
        .service
        .as_ref()
        .is_none_or(|(_, ips)| ips.is_empty())
    {
        (
            false,
            "AddressNotAssigned",
            format!("waiting for Service {namespace}/{name} to get a cluster IP"),
        )
    } else if observed.deployment.as_ref().is_none_or(|(_, n)| *n < 1) {
        (
            false,
            "Pending",
            format!("waiting for Deployment {namespace}/{name} to have an available replica"),
        )
    } else {
        (
            true,
            "Programmed",
            format!(
                "Resource programmed, assigned to service(s) {name}.{namespace}.svc.{}:15008",
                crate::translate::workloads::DOMAIN_SUFFIX
            ),
        )
    };
    let status = |b: bool| if b { "True" } else { "False" };
    let conditions = vec![
        json!({"type": "Accepted", "status": "True", "reason": "Accepted",
               "message": "Resource accepted"}),
        json!({"type": "Programmed", "status": status(programmed), "reason": reason,
               "message": message}),
    ];
    (conditions, addresses)
}

/// The merge patch for the Gateway's status subresource, or `None` when the status already
/// says this. Conditions of other types (set by someone else) are kept;
/// `lastTransitionTime` (`now` when needed) changes only with a condition's status.
pub fn status_patch(gw: &Value, observed: &Observed, now: &str) -> Option<Value> {
    let (ours, addresses) = desired_status(gw, observed);
    let generation = gw.pointer("/metadata/generation").cloned();
    let current: Vec<Value> = gw
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let type_of = |c: &Value| c.get("type").and_then(Value::as_str).map(str::to_string);
    let mut conditions = Vec::new();
    for mut c in ours {
        let old = current.iter().find(|o| type_of(o) == type_of(&c));
        let transition = match old {
            Some(o) if o.get("status") == c.get("status") => o
                .get("lastTransitionTime")
                .cloned()
                .unwrap_or_else(|| json!(now)),
            _ => json!(now),
        };
        c["lastTransitionTime"] = transition;
        if let Some(g) = &generation {
            c["observedGeneration"] = g.clone();
        }
        conditions.push(c);
    }
    for c in &current {
        if !matches!(type_of(c).as_deref(), Some("Accepted" | "Programmed")) {
            conditions.push(c.clone());
        }
    }
    let current_addresses = gw
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let same_conditions =
        conditions.len() == current.len() && conditions.iter().all(|c| current.contains(c));
    if same_conditions && current_addresses == addresses {
        return None;
    }
    let mut patch = json!({"status": {
        "conditions": conditions,
        "addresses": if addresses.is_empty() { Value::Null } else { json!(addresses) },
    }});
    // Optimistic concurrency: a concurrent writer makes this a 409, and we retry on fresh data.
    if let Some(rv) = meta_str(gw, "resourceVersion") {
        patch["metadata"] = json!({"resourceVersion": rv});
    }
    Some(patch)
}

#[cfg(test)]
mod tests;
