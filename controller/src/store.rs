//! The object store: every source (Kubernetes watches, a YAML directory) writes the objects it
//! sees here, as raw JSON keyed by kind/namespace/name. Translation reads a snapshot and does not
//! know which source an object came from.

use std::any::{Any, TypeId};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::watch;

use crate::k8s::{self, ParseError};

/// Identifies one Kubernetes object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// `Pod`, `Service`, `AuthorizationPolicy`, ... (the `kind` field).
    pub kind: String,
    /// Empty for cluster-scoped objects (Namespace).
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl ObjectKey {
    pub fn new(kind: &str, namespace: &str, name: &str) -> Self {
        ObjectKey {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Key of a raw object (`kind`, `metadata.namespace`, `metadata.name`), if it has them.
    pub fn of(obj: &Value) -> Option<Self> {
        let kind = obj.get("kind")?.as_str()?;
        let meta = obj.get("metadata")?;
        let name = meta.get("name")?.as_str()?;
        let namespace = meta.get("namespace").and_then(Value::as_str).unwrap_or("");
        Some(ObjectKey::new(kind, namespace, name))
    }
}

/// One stored object: its JSON text and the typed views parsed from it so far.
///
/// A stored object never changes (an update stores a new one), so each typed view is parsed
/// once per object version instead of once per translation: at 10 000 pods, re-parsing
/// everything on every change was a third of the translation time.
///
/// The object is kept as compact JSON text, not as a `serde_json::Value`: a Value tree costs a
/// B-tree node per JSON object (~8 KB for a small pod against ~1 KB of text), and at 10 000
/// pods the trees were half of the controller's memory. Consumers read typed views; the raw
/// Value is itself a (memoized) view, materialized only for the objects someone asks for.
#[derive(Debug)]
pub struct StoredObject {
    text: Box<str>,
    parsed: Mutex<Vec<(TypeId, Arc<dyn Any + Send + Sync>)>>,
}

/// Compact JSON text of an object (maps serialize in key order, so equal objects give equal
/// text).
fn json_text(raw: &Value) -> Box<str> {
    // A Value always serializes (its map keys are strings).
    serde_json::to_string(raw)
        .unwrap_or_else(|_| "null".into())
        .into_boxed_str()
}

impl StoredObject {
    fn new(raw: &Value) -> Arc<Self> {
        Arc::new(StoredObject {
            text: json_text(raw),
            parsed: Mutex::new(Vec::new()),
        })
    }

    fn same_as(&self, raw: &Value) -> bool {
        *self.text == *json_text(raw)
    }

    /// The object as a JSON Value (memoized like the typed views).
    pub fn raw(&self) -> Arc<Value> {
        self.parsed::<Value>()
            .unwrap_or_else(|_| Arc::new(Value::Null))
    }

    /// The typed view `T` of this object (parsed on first use; errors are remembered too).
    pub fn parsed<T: DeserializeOwned + Send + Sync + 'static>(
        &self,
    ) -> Result<Arc<T>, ParseError> {
        type Parsed<T> = Result<Arc<T>, ParseError>;
        let id = TypeId::of::<Parsed<T>>();
        let mut cache = self.parsed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, any)) = cache.iter().find(|(t, _)| *t == id)
            && let Some(r) = any.downcast_ref::<Parsed<T>>()
        {
            return r.clone();
        }
        // why: through a Value, so that errors name the field exactly as before (a text
        // deserializer would add line/column positions of the compact text).
        let r: Parsed<T> = serde_json::from_str::<Value>(&self.text)
            .map_err(|e| ParseError {
                field: String::new(),
                reason: e.to_string(),
            })
            .and_then(|v| k8s::parse::<T>(&v))
            .map(Arc::new);
        cache.push((id, Arc::new(r.clone())));
        r
    }
}

/// Objects of one kind in one namespace.
type Shard = BTreeMap<ObjectKey, Arc<StoredObject>>;

/// An immutable view of all objects, as translation sees them.
///
/// Objects are sharded by kind and namespace, and shards are shared between snapshots and
/// copied on write: taking a snapshot copies a few hundred shard pointers, and a change copies
/// only its own shard. (A flat map of 12 000 keys cost a 12 000-entry copy per translation —
/// half of the work of a one-pod update.)
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    shards: BTreeMap<String, BTreeMap<String, Arc<Shard>>>,
}

/// Push onto `out` the keys that differ between two shards (walked in key order).
fn diff_shards<'a>(
    older: Option<&'a Shard>,
    newer: Option<&'a Shard>,
    out: &mut Vec<&'a ObjectKey>,
) {
    let (mut a, mut b) = (
        older.into_iter().flatten().peekable(),
        newer.into_iter().flatten().peekable(),
    );
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return,
            (Some((ka, _)), None) => {
                out.push(*ka);
                a.next();
            }
            (None, Some((kb, _))) => {
                out.push(*kb);
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.push(*ka);
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push(*kb);
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(va, vb) {
                        out.push(*kb);
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

impl Snapshot {
    fn shard(&self, kind: &str, namespace: &str) -> Option<&Arc<Shard>> {
        self.shards.get(kind)?.get(namespace)
    }

    fn stored(&self, key: &ObjectKey) -> Option<&Arc<StoredObject>> {
        self.shard(&key.kind, &key.namespace)?.get(key)
    }

    fn insert(&mut self, key: ObjectKey, obj: Arc<StoredObject>) {
        let shard = self
            .shards
            .entry(key.kind.clone())
            .or_default()
            .entry(key.namespace.clone())
            .or_default();
        Arc::make_mut(shard).insert(key, obj);
    }

    fn remove(&mut self, key: &ObjectKey) -> bool {
        let Some(by_ns) = self.shards.get_mut(&key.kind) else {
            return false;
        };
        let Some(shard) = by_ns.get_mut(&key.namespace) else {
            return false;
        };
        if !shard.contains_key(key) {
            return false;
        }
        Arc::make_mut(shard).remove(key);
        if shard.is_empty() {
            by_ns.remove(&key.namespace);
            if by_ns.is_empty() {
                self.shards.remove(&key.kind);
            }
        }
        true
    }

    /// Objects of one kind, in key order.
    fn stored_of_kind<'a>(
        &'a self,
        kind: &'a str,
    ) -> impl Iterator<Item = (&'a ObjectKey, &'a Arc<StoredObject>)> + 'a {
        self.shards
            .get(kind)
            .into_iter()
            .flat_map(|by_ns| by_ns.values())
            .flat_map(|shard| shard.iter())
    }

    /// All objects of one kind as JSON, in key order (deterministic translation output).
    /// Prefer [`Snapshot::parsed_of_kind`]: this materializes (and keeps) each object's Value.
    pub fn of_kind<'a>(
        &'a self,
        kind: &'a str,
    ) -> impl Iterator<Item = (&'a ObjectKey, Arc<Value>)> + 'a {
        self.stored_of_kind(kind).map(|(k, v)| (k, v.raw()))
    }

    /// All objects of one kind ordered by (creationTimestamp, namespace, name): Istio's order
    /// when objects conflict (the oldest wins).
    pub fn oldest_first<'a>(&'a self, kind: &'a str) -> Vec<(&'a ObjectKey, Arc<Value>)> {
        let mut list: Vec<(String, &ObjectKey, Arc<Value>)> = self
            .of_kind(kind)
            .map(|(k, v)| {
                let ts = v
                    .pointer("/metadata/creationTimestamp")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                (ts, k, v)
            })
            .collect();
        list.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        list.into_iter().map(|(_, k, v)| (k, v)).collect()
    }

    /// All objects of one kind with their typed view `T` (memoized, see [`StoredObject`]).
    pub fn parsed_of_kind<'a, T: DeserializeOwned + Send + Sync + 'static>(
        &'a self,
        kind: &'a str,
    ) -> impl Iterator<Item = (&'a ObjectKey, Result<Arc<T>, ParseError>)> + 'a {
        self.stored_of_kind(kind).map(|(k, v)| (k, v.parsed::<T>()))
    }

    /// Objects of one kind in one namespace with their typed view `T`, in key order.
    pub fn parsed_in<'a, T: DeserializeOwned + Send + Sync + 'static>(
        &'a self,
        kind: &'a str,
        namespace: &'a str,
    ) -> impl Iterator<Item = (&'a ObjectKey, Result<Arc<T>, ParseError>)> + 'a {
        self.shard(kind, namespace)
            .into_iter()
            .flat_map(|shard| shard.iter())
            .map(|(k, v)| (k, v.parsed::<T>()))
    }

    pub fn get(&self, key: &ObjectKey) -> Option<Arc<Value>> {
        self.stored(key).map(|v| v.raw())
    }

    /// The typed view `T` of one object (memoized, see [`StoredObject`]).
    pub fn parsed<T: DeserializeOwned + Send + Sync + 'static>(
        &self,
        key: &ObjectKey,
    ) -> Option<Result<Arc<T>, ParseError>> {
        self.stored(key).map(|v| v.parsed::<T>())
    }

    pub fn len(&self) -> usize {
        self.shards
            .values()
            .flat_map(|by_ns| by_ns.values())
            .map(|s| s.len())
            .sum()
    }

    /// Keys added, changed or removed since `older` (objects are immutable and shared between
    /// snapshots, so a changed object is a different allocation; unchanged shards are the same
    /// allocation and skipped). Sorted by key.
    pub fn changed_since<'a>(&'a self, older: &'a Snapshot) -> Vec<&'a ObjectKey> {
        let mut out = Vec::new();
        let kinds: std::collections::BTreeSet<&String> =
            self.shards.keys().chain(older.shards.keys()).collect();
        for kind in kinds {
            let (a, b) = (older.shards.get(kind), self.shards.get(kind));
            let namespaces: std::collections::BTreeSet<&String> = a
                .into_iter()
                .flat_map(|m| m.keys())
                .chain(b.into_iter().flat_map(|m| m.keys()))
                .collect();
            for ns in namespaces {
                let (sa, sb) = (a.and_then(|m| m.get(ns)), b.and_then(|m| m.get(ns)));
                if let (Some(x), Some(y)) = (sa, sb)
                    && Arc::ptr_eq(x, y)
                {
                    continue;
                }
                diff_shards(sa.map(|s| &**s), sb.map(|s| &**s), &mut out);
            }
        }
        out
    }

    /// Whether any object of `kind` lives in `namespace`.
    pub fn any_in(&self, kind: &str, namespace: &str) -> bool {
        self.shard(kind, namespace).is_some_and(|s| !s.is_empty())
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// Build a snapshot directly (tests, golden files).
    pub fn from_objects(objects: impl IntoIterator<Item = Value>) -> Self {
        let mut s = Snapshot::default();
        for o in objects {
            if let Some(k) = ObjectKey::of(&o) {
                s.insert(k, StoredObject::new(&o));
            }
        }
        s
    }
}

/// Shared, versioned object store. Writers are the sources; each change bumps a generation
/// that the translation loop watches (and debounces).
pub struct ObjectStore {
    inner: RwLock<Snapshot>,
    generation: watch::Sender<u64>,
}

impl Default for ObjectStore {
    fn default() -> Self {
        ObjectStore {
            inner: RwLock::new(Snapshot::default()),
            generation: watch::channel(0).0,
        }
    }
}

impl ObjectStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Snapshot> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Insert or replace one object. Returns false (and changes nothing) when it is identical.
    pub fn upsert(&self, key: ObjectKey, obj: Value) -> bool {
        let mut s = self.write();
        if s.stored(&key).is_some_and(|old| old.same_as(&obj)) {
            return false;
        }
        s.insert(key, StoredObject::new(&obj));
        drop(s);
        self.bump();
        true
    }

    pub fn remove(&self, key: &ObjectKey) -> bool {
        let removed = self.write().remove(key);
        if removed {
            self.bump();
        }
        removed
    }

    /// Replace every object of the given kinds with `objects` (a full relist, or a reload of a
    /// directory): objects of those kinds not in the list are removed.
    pub fn replace_kinds(&self, kinds: &[&str], objects: Vec<(ObjectKey, Value)>) -> bool {
        let mut s = self.write();
        let mut changed = false;
        let fresh: BTreeMap<ObjectKey, Value> = objects.into_iter().collect();
        let gone: Vec<ObjectKey> = kinds
            .iter()
            .flat_map(|kind| s.stored_of_kind(kind))
            .filter(|(k, _)| !fresh.contains_key(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            changed |= s.remove(k);
        }
        for (k, v) in fresh {
            if s.stored(&k).is_some_and(|old| old.same_as(&v)) {
                continue;
            }
            s.insert(k, StoredObject::new(&v));
            changed = true;
        }
        drop(s);
        if changed {
            self.bump();
        }
        changed
    }

    pub fn snapshot(&self) -> Snapshot {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Bumped on every change.
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, ip: &str) -> Value {
        json!({"kind": "Pod", "metadata": {"name": name, "namespace": "default"}, "status": {"podIP": ip}})
    }

    #[test]
    fn snapshots_are_isolated_and_report_what_changed() {
        let s = ObjectStore::new();
        for (n, ip) in [("a", "10.0.0.1"), ("b", "10.0.0.2")] {
            let p = pod(n, ip);
            s.upsert(ObjectKey::of(&p).unwrap(), p);
        }
        let other = json!({"kind": "Pod", "metadata": {"name": "c", "namespace": "other"}});
        s.upsert(ObjectKey::of(&other).unwrap(), other);
        let before = s.snapshot();
        let b2 = pod("b", "10.0.0.9");
        s.upsert(ObjectKey::of(&b2).unwrap(), b2);
        s.remove(&ObjectKey::new("Pod", "default", "a"));
        let d = pod("d", "10.0.0.4");
        s.upsert(ObjectKey::of(&d).unwrap(), d);
        let after = s.snapshot();
        // The earlier snapshot is untouched (copy on write).
        assert_eq!(before.len(), 3);
        assert_eq!(
            before.get(&ObjectKey::new("Pod", "default", "b")).unwrap()["status"]["podIP"],
            "10.0.0.2"
        );
        let changed: Vec<String> = after
            .changed_since(&before)
            .iter()
            .map(|k| k.name.clone())
            .collect();
        assert_eq!(changed, ["a", "b", "d"]);
        assert!(after.changed_since(&after).is_empty());
        assert!(after.any_in("Pod", "other") && !after.any_in("Pod", "nowhere"));
        s.remove(&ObjectKey::new("Pod", "other", "c"));
        assert!(!s.snapshot().any_in("Pod", "other"));
    }

    #[test]
    fn upsert_remove_replace() {
        let s = ObjectStore::new();
        let rx = s.generation();
        let k = ObjectKey::of(&pod("a", "10.0.0.1")).unwrap();
        assert!(s.upsert(k.clone(), pod("a", "10.0.0.1")));
        assert!(
            !s.upsert(k.clone(), pod("a", "10.0.0.1")),
            "identical is no change"
        );
        assert_eq!(*rx.borrow(), 1);
        let ns = json!({"kind": "Namespace", "metadata": {"name": "default"}});
        s.upsert(ObjectKey::of(&ns).unwrap(), ns);
        // Relist of pods: a replaced by b; the namespace stays.
        let b = pod("b", "10.0.0.2");
        assert!(s.replace_kinds(&["Pod"], vec![(ObjectKey::of(&b).unwrap(), b)]));
        let snap = s.snapshot();
        assert_eq!(
            snap.of_kind("Pod")
                .map(|(k, _)| k.name.clone())
                .collect::<Vec<_>>(),
            vec!["b"]
        );
        assert_eq!(snap.of_kind("Namespace").count(), 1);
        assert!(s.remove(&ObjectKey::new("Namespace", "", "default")));
        assert!(s.snapshot().of_kind("Namespace").next().is_none());
    }
}
