//! The Kubernetes source: one kube-rs watcher per kind of [`crate::k8s::KINDS`], on
//! `Api<DynamicObject>` (the store keeps raw JSON, so no typed schema is needed here).
//!
//! - A list or relist (`Init` … `InitApply` … `InitDone`) replaces the kind wholesale in the
//!   store; `Apply`/`Delete` upsert/remove one object.
//! - A watch that ends is resumed from the last resourceVersion (kube-rs). A `410 Gone` ERROR
//!   event makes kube-rs relist. A `410` returned as the HTTP status of the watch request is
//!   *not* handled by kube-rs (it would retry the same stale version forever): we restart the
//!   watcher, which relists.
//! - Versions are tried in [`crate::k8s::KindInfo::versions`] order; when the API server serves
//!   none (404: the CRD is not installed), the kind's objects are dropped, that is logged once,
//!   and the kind is retried slowly.
//! - Other errors are logged and retried with exponential backoff; one kind failing never
//!   stops the others.
//! - [`KubeSource::pending_kinds`] tells which kinds have not completed their first list yet
//!   (a kind that is not served counts as listed): the controller is not ready before every
//!   kind has been listed once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::k8s::{KINDS, KindInfo};
use crate::store::{ObjectKey, ObjectStore};

/// Retry timing of the Kubernetes source.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// How often a kind whose CRD is not installed is looked for again.
    pub absent_retry: Duration,
    /// First and largest delay between retries after an error.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            absent_retry: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// Watches the API server and mirrors the objects into the store.
pub struct KubeSource {
    client: Client,
    kinds: Vec<&'static KindInfo>,
    timing: Timing,
    /// Kinds whose first list has not completed yet.
    pending: Arc<watch::Sender<BTreeSet<&'static str>>>,
}

impl KubeSource {
    /// Watch every kind the controller serves.
    pub fn new(client: Client) -> Self {
        let kinds: Vec<&'static KindInfo> = KINDS.iter().collect();
        let pending = kinds.iter().map(|k| k.kind).collect();
        KubeSource {
            client,
            kinds,
            timing: Timing::default(),
            pending: Arc::new(watch::channel(pending).0),
        }
    }

    pub fn with_timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// Kinds not listed yet; empty once every kind has completed its first list (or turned
    /// out not to be served). Take it before [`run`](Self::run).
    pub fn pending_kinds(&self) -> watch::Receiver<BTreeSet<&'static str>> {
        self.pending.subscribe()
    }

    /// Run all watchers until `cancel`.
    pub async fn run(self, store: Arc<ObjectStore>, cancel: CancellationToken) {
        let tasks = self.kinds.iter().map(|info| {
            watch_kind(
                self.client.clone(),
                info,
                store.clone(),
                cancel.clone(),
                self.timing,
                self.pending.clone(),
            )
        });
        futures::future::join_all(tasks).await;
    }
}

/// How one watcher run ended.
enum Outcome {
    /// The API server does not serve this version (404 on the first list).
    NotServed,
    /// Start over with a fresh watcher (and so a fresh list).
    Restart,
    Cancelled,
}

async fn watch_kind(
    client: Client,
    info: &'static KindInfo,
    store: Arc<ObjectStore>,
    cancel: CancellationToken,
    timing: Timing,
    pending: Arc<watch::Sender<BTreeSet<&'static str>>>,
) {
    let listed = || {
        pending.send_if_modified(|p| p.remove(info.kind));
    };
    let mut reported_absent = false;
    loop {
        let mut served = false;
        for version in info.versions {
            match run_watcher(&client, info, version, &store, &cancel, timing, &listed).await {
                Outcome::Cancelled => return,
                Outcome::NotServed => continue,
                Outcome::Restart => {
                    served = true;
                    break;
                }
            }
        }
        if served {
            reported_absent = false;
            continue;
        }
        // Not installed: whatever we had of this kind is gone with it.
        store.replace_kinds(&[info.kind], Vec::new());
        // why: a kind that is not served has nothing to list; waiting for it would keep the
        // controller unready in every cluster without the optional CRDs.
        listed();
        if !reported_absent {
            tracing::info!(kind = info.kind, group = info.group, versions = ?info.versions,
                retry = ?timing.absent_retry, "kind not served by the API server (CRD not installed?); will look again");
            reported_absent = true;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(timing.absent_retry) => {}
        }
    }
}

fn api_status(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

async fn run_watcher(
    client: &Client,
    info: &'static KindInfo,
    version: &str,
    store: &ObjectStore,
    cancel: &CancellationToken,
    timing: Timing,
    on_listed: &(dyn Fn() + Sync),
) -> Outcome {
    let api_version = info.api_version(version);
    let ar = ApiResource {
        group: info.group.to_string(),
        version: version.to_string(),
        api_version: api_version.clone(),
        kind: info.kind.to_string(),
        plural: info.plural.to_string(),
    };
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let mut stream = watcher(api, watcher::Config::default()).boxed();
    let mut listed = false;
    let mut buffer: Vec<(ObjectKey, Value)> = Vec::new();
    let mut backoff = timing.backoff_initial;
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => return Outcome::Cancelled,
            n = stream.next() => n,
        };
        let event = match next {
            None => return Outcome::Restart,
            Some(Ok(event)) => event,
            Some(Err(e)) => {
                let code = api_status(&e);
                match (&e, code) {
                    (watcher::Error::InitialListFailed(_), Some(404)) => {
                        if listed {
                            tracing::warn!(kind = info.kind, %api_version, "kind no longer served");
                        }
                        return Outcome::NotServed;
                    }
                    (watcher::Error::WatchStartFailed(_), Some(410)) => {
                        tracing::info!(kind = info.kind, "watch start: 410 Gone; relisting");
                        return Outcome::Restart;
                    }
                    // kube-rs relists by itself on a 410 ERROR event.
                    (watcher::Error::WatchError(_), Some(410)) => {
                        tracing::info!(kind = info.kind, "watch: 410 Gone; relisting");
                        continue;
                    }
                    _ => {}
                }
                tracing::warn!(kind = info.kind, %api_version, error = %e, retry_in = ?backoff, "watch error");
                tokio::select! {
                    _ = cancel.cancelled() => return Outcome::Cancelled,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(timing.backoff_max);
                continue;
            }
        };
        backoff = timing.backoff_initial;
        match event {
            watcher::Event::Init => buffer.clear(),
            watcher::Event::InitApply(obj) => {
                if let Some(entry) = to_raw(info, &api_version, obj) {
                    buffer.push(entry);
                }
            }
            watcher::Event::InitDone => {
                listed = true;
                let count = buffer.len();
                let changed = store.replace_kinds(&[info.kind], std::mem::take(&mut buffer));
                tracing::debug!(kind = info.kind, %api_version, count, changed, "listed");
                on_listed();
            }
            watcher::Event::Apply(obj) => {
                if let Some((key, value)) = to_raw(info, &api_version, obj) {
                    store.upsert(key, value);
                }
            }
            watcher::Event::Delete(obj) => {
                if let Some((key, _)) = to_raw(info, &api_version, obj) {
                    store.remove(&key);
                }
            }
        }
    }
}

/// The raw object as the store keeps it: `kind`/`apiVersion` set (list items often lack
/// them), bulky fields nothing reads removed.
fn to_raw(info: &KindInfo, api_version: &str, obj: DynamicObject) -> Option<(ObjectKey, Value)> {
    let mut value = match serde_json::to_value(&obj) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(kind = info.kind, error = %e, "object not representable as JSON; skipped");
            return None;
        }
    };
    let map = value.as_object_mut()?;
    map.insert("kind".into(), Value::String(info.kind.to_string()));
    map.insert("apiVersion".into(), Value::String(api_version.to_string()));
    if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        if let Some(annotations) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    }
    match ObjectKey::of(&value) {
        Some(key) => Some((key, value)),
        None => {
            tracing::warn!(kind = info.kind, "object without metadata.name; skipped");
            None
        }
    }
}
