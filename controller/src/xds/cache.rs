//! The versioned xDS resource cache: what the controller currently serves.
//!
//! Per type URL the cache holds `name → (version, Any)`. A resource's version is a hash of its
//! encoded bytes, so it is the same after a controller restart: a client reconnecting with
//! `initial_resource_versions` is sent only what really changed. Each type also has a counter
//! (`system_version_info`) bumped whenever anything of that type changes.
//!
//! Subscribers (one per ADS stream) watch a single `watch` channel: notifications coalesce, so a
//! slow stream never blocks the writer or other streams. To avoid diffing everything on every
//! push, each type keeps a short, bounded log of which names changed at which type version; a
//! stream that fell further behind than the log reaches falls back to a full diff.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, PoisonError, RwLock};

use prost::bytes::Bytes;
use prost_types::Any;
use tokio::sync::watch;
use zmesh_proto::ads_wire::encode_resource;

/// How many change batches each type remembers.
const CHANGE_LOG_BATCHES: usize = 64;
/// Upper bound on names remembered across a type's change log (memory bound at 10k+ pods).
const CHANGE_LOG_NAMES: usize = 50_000;

/// A resource name, shared by the cache and every stream that tracks it (at 10k resources
/// and 100 streams, per-stream copies of the names were a quarter of the controller's memory).
pub type Name = Arc<str>;

/// One cached resource.
#[derive(Clone, Debug)]
pub struct CachedResource {
    /// Content hash (32 hex digits), stable across restarts.
    pub version: Arc<str>,
    pub resource: Arc<Any>,
    /// The `envoy.service.discovery.v3.Resource` (name, version, resource) encoded once, for
    /// every stream that sends it.
    pub encoded: Bytes,
}

/// What changed in one type since a given type version.
#[derive(Debug)]
pub enum Changes {
    /// Nothing changed.
    None,
    /// Exactly these names changed (added, modified or removed).
    Names(BTreeSet<Name>),
    /// The log does not reach back far enough: diff everything.
    Unknown,
}

#[derive(Default)]
struct TypeState {
    version: u64,
    resources: BTreeMap<Name, CachedResource>,
    /// `(type version after the change, names changed by it)`, oldest first.
    log: VecDeque<(u64, Arc<Vec<Name>>)>,
    log_names: usize,
}

impl TypeState {
    fn record(&mut self, changed: Vec<Name>) {
        self.version += 1;
        self.log_names += changed.len();
        self.log.push_back((self.version, Arc::new(changed)));
        while self.log.len() > CHANGE_LOG_BATCHES
            || (self.log_names > CHANGE_LOG_NAMES && self.log.len() > 1)
        {
            if let Some((_, names)) = self.log.pop_front() {
                self.log_names -= names.len();
            }
        }
    }

    fn changes_since(&self, since: u64) -> Changes {
        if since == self.version {
            return Changes::None;
        }
        // The log covers versions (first.0 - 1, self.version]; `since` must be inside.
        match self.log.front() {
            Some((first, _)) if since + 1 >= *first && since < self.version => {
                let mut names = BTreeSet::new();
                for (v, batch) in &self.log {
                    if *v > since {
                        names.extend(batch.iter().cloned());
                    }
                }
                Changes::Names(names)
            }
            _ => Changes::Unknown,
        }
    }
}

/// Result of one [`ResourceCache::update`]: per type URL, how many names changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UpdateSummary {
    /// type URL → (upserted, removed), only for types that changed.
    pub changed: BTreeMap<String, (usize, usize)>,
}

impl UpdateSummary {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty()
    }
}

/// The shared resource cache. Cheap to read concurrently; writers are the translation loop
/// (and tests).
pub struct ResourceCache {
    types: RwLock<BTreeMap<String, TypeState>>,
    /// Bumped after every change; ADS streams watch it.
    generation: watch::Sender<u64>,
}

impl Default for ResourceCache {
    fn default() -> Self {
        ResourceCache {
            types: RwLock::new(BTreeMap::new()),
            generation: watch::channel(0).0,
        }
    }
}

impl std::fmt::Debug for ResourceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceCache")
            .field("versions", &self.versions())
            .finish()
    }
}

/// Content version of an encoded resource: FNV-1a 128 of type URL and bytes, as hex. Not a
/// security boundary, only change detection; deterministic across processes and releases.
pub fn content_version(any: &Any) -> String {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let mut h = OFFSET;
    for b in any
        .type_url
        .bytes()
        .chain([0u8])
        .chain(any.value.iter().copied())
    {
        h ^= u128::from(b);
        h = h.wrapping_mul(PRIME);
    }
    format!("{h:032x}")
}

impl ResourceCache {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, TypeState>> {
        self.types.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, TypeState>> {
        self.types.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replace the whole content with a full translation output. Types the cache knows but
    /// `resources` lacks are emptied (translation omits types with no resources).
    pub fn update(&self, resources: BTreeMap<String, BTreeMap<String, Any>>) -> UpdateSummary {
        let mut all = resources;
        {
            let types = self.read();
            for t in types.keys() {
                all.entry(t.clone()).or_default();
            }
        }
        let mut summary = UpdateSummary::default();
        {
            let mut types = self.write();
            for (type_url, fresh) in all {
                let st = types.entry(type_url.clone()).or_default();
                if let Some(counts) = replace_type(st, fresh) {
                    summary.changed.insert(type_url, counts);
                }
            }
        }
        if !summary.is_empty() {
            self.generation.send_modify(|g| *g += 1);
        }
        summary
    }

    /// Replace only the resources of one type.
    pub fn update_type(&self, type_url: &str, fresh: BTreeMap<String, Any>) -> UpdateSummary {
        let mut summary = UpdateSummary::default();
        {
            let mut types = self.write();
            let st = types.entry(type_url.to_string()).or_default();
            if let Some(counts) = replace_type(st, fresh) {
                summary.changed.insert(type_url.to_string(), counts);
            }
        }
        if !summary.is_empty() {
            self.generation.send_modify(|g| *g += 1);
        }
        summary
    }

    /// Change only some resources of one type: `upserts` replace or add, `removed` go away;
    /// everything else stays as it is (an incremental translation's output).
    pub fn apply(
        &self,
        type_url: &str,
        upserts: BTreeMap<String, Any>,
        removed: Vec<String>,
    ) -> UpdateSummary {
        let mut summary = UpdateSummary::default();
        {
            let mut types = self.write();
            let st = types.entry(type_url.to_string()).or_default();
            let mut changed = Vec::new();
            let mut upserted = 0;
            for (name, any) in upserts {
                if let Some(name) = upsert(st, &name, any) {
                    changed.push(name);
                    upserted += 1;
                }
            }
            let mut gone = 0;
            for name in removed {
                if let Some((name, _)) = st.resources.remove_entry(name.as_str()) {
                    changed.push(name);
                    gone += 1;
                }
            }
            if !changed.is_empty() {
                st.record(changed);
                summary
                    .changed
                    .insert(type_url.to_string(), (upserted, gone));
            }
        }
        if !summary.is_empty() {
            self.generation.send_modify(|g| *g += 1);
        }
        summary
    }

    /// Watch this to learn that something changed (values are only a counter).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Current type version (`system_version_info`); 0 for a type never seen.
    pub fn version(&self, type_url: &str) -> u64 {
        self.read().get(type_url).map_or(0, |t| t.version)
    }

    /// All type versions.
    pub fn versions(&self) -> BTreeMap<String, u64> {
        self.read()
            .iter()
            .map(|(k, v)| (k.clone(), v.version))
            .collect()
    }

    /// Names changed in `type_url` after type version `since`, with the current type version
    /// (read under the same lock, so nothing between the two is missed).
    pub fn changes_since(&self, type_url: &str, since: u64) -> (u64, Changes) {
        match self.read().get(type_url) {
            Some(t) => (t.version, t.changes_since(since)),
            None if since == 0 => (0, Changes::None),
            None => (0, Changes::Unknown),
        }
    }

    /// Look up resources of one type: `(type version, name → resource or None if absent)`.
    pub fn get_many<'a>(
        &self,
        type_url: &str,
        names: impl IntoIterator<Item = &'a str>,
    ) -> (u64, Vec<(Name, Option<CachedResource>)>) {
        let types = self.read();
        let st = types.get(type_url);
        let version = st.map_or(0, |t| t.version);
        let out = names
            .into_iter()
            .map(|n| match st.and_then(|t| t.resources.get_key_value(n)) {
                Some((k, r)) => (k.clone(), Some(r.clone())),
                None => (Name::from(n), None),
            })
            .collect();
        (version, out)
    }

    /// A consistent copy of one type: `(type version, name → resource)`.
    pub fn snapshot(&self, type_url: &str) -> (u64, BTreeMap<Name, CachedResource>) {
        let types = self.read();
        match types.get(type_url) {
            Some(t) => (t.version, t.resources.clone()),
            None => (0, BTreeMap::new()),
        }
    }

    /// Number of resources of one type.
    pub fn len(&self, type_url: &str) -> usize {
        self.read().get(type_url).map_or(0, |t| t.resources.len())
    }

    /// True when no type holds any resource.
    pub fn is_empty(&self) -> bool {
        self.read().values().all(|t| t.resources.is_empty())
    }
}

/// Store one resource unless identical; its (shared) name when it changed. Most resources are
/// unchanged on an update: a byte comparison is cheaper than hashing.
fn upsert(st: &mut TypeState, name: &str, any: Any) -> Option<Name> {
    let fresh = |any: Any| {
        let version = content_version(&any);
        CachedResource {
            encoded: encode_resource(name, &version, &any),
            version: version.into(),
            resource: Arc::new(any),
        }
    };
    match st.resources.get_key_value(name) {
        Some((_, old))
            if old.resource.value == any.value && old.resource.type_url == any.type_url =>
        {
            None
        }
        Some((key, _)) => {
            // Keep the existing name allocation: streams hold it.
            let key = key.clone();
            st.resources.insert(key.clone(), fresh(any));
            Some(key)
        }
        None => {
            let key = Name::from(name);
            st.resources.insert(key.clone(), fresh(any));
            Some(key)
        }
    }
}

/// Replace one type's resources; `Some((upserted, removed))` when anything changed.
fn replace_type(st: &mut TypeState, fresh: BTreeMap<String, Any>) -> Option<(usize, usize)> {
    let mut changed = Vec::new();
    let mut upserted = 0;
    let removed_names: Vec<Name> = st
        .resources
        .keys()
        .filter(|k| !fresh.contains_key(&***k))
        .cloned()
        .collect();
    for name in &removed_names {
        st.resources.remove(name);
    }
    for (name, any) in fresh {
        if let Some(name) = upsert(st, &name, any) {
            changed.push(name);
            upserted += 1;
        }
    }
    let removed = removed_names.len();
    changed.extend(removed_names);
    if changed.is_empty() {
        return None;
    }
    st.record(changed);
    Some((upserted, removed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(v: &[u8]) -> Any {
        Any {
            type_url: "t".into(),
            value: v.to_vec(),
        }
    }

    fn map(items: &[(&str, &[u8])]) -> BTreeMap<String, Any> {
        items.iter().map(|(n, v)| (n.to_string(), any(v))).collect()
    }

    #[test]
    fn versions_and_change_log() {
        let c = ResourceCache::new();
        let rx = c.subscribe();
        let s = c.update(BTreeMap::from([(
            "t".into(),
            map(&[("a", b"1"), ("b", b"2")]),
        )]));
        assert_eq!(s.changed["t"], (2, 0));
        assert_eq!(c.version("t"), 1);
        assert!(rx.has_changed().unwrap());
        let (_, a) = c.snapshot("t");
        let va = a["a"].version.clone();
        // Identical content: no change, no version bump.
        assert!(
            c.update(BTreeMap::from([(
                "t".into(),
                map(&[("a", b"1"), ("b", b"2")])
            )]))
            .is_empty()
        );
        assert_eq!(c.version("t"), 1);
        // Change b, remove a, add c.
        c.update(BTreeMap::from([(
            "t".into(),
            map(&[("b", b"3"), ("c", b"4")]),
        )]));
        assert_eq!(c.version("t"), 2);
        match c.changes_since("t", 1).1 {
            Changes::Names(n) => assert_eq!(n, ["a", "b", "c"].map(Name::from).into()),
            other => panic!("{other:?}"),
        }
        assert!(matches!(c.changes_since("t", 2).1, Changes::None));
        match c.changes_since("t", 0).1 {
            Changes::Names(n) => assert_eq!(n.len(), 3),
            other => panic!("{other:?}"),
        }
        // A type missing from a full update is emptied.
        c.update(BTreeMap::new());
        assert_eq!(c.len("t"), 0);
        assert_eq!(c.version("t"), 3);
        // Versions are content hashes: the same content gets the same version again.
        c.update(BTreeMap::from([("t".into(), map(&[("a", b"1")]))]));
        assert_eq!(c.snapshot("t").1["a"].version, va);
    }

    #[test]
    fn apply_changes_only_the_named_resources() {
        let c = ResourceCache::new();
        c.update(BTreeMap::from([(
            "t".into(),
            map(&[("a", b"1"), ("b", b"2")]),
        )]));
        let va = c.snapshot("t").1["a"].version.clone();
        let s = c.apply("t", map(&[("b", b"3"), ("c", b"4")]), vec!["zz".into()]);
        assert_eq!(s.changed["t"], (2, 0), "unknown removals are not changes");
        assert_eq!(c.version("t"), 2);
        let (_, now) = c.snapshot("t");
        assert_eq!(now.len(), 3);
        assert_eq!(
            now["a"].version, va,
            "untouched resources keep their version"
        );
        match c.changes_since("t", 1).1 {
            Changes::Names(n) => assert_eq!(n, ["b", "c"].map(Name::from).into()),
            other => panic!("{other:?}"),
        }
        // Identical content and a removal.
        let s = c.apply("t", map(&[("b", b"3")]), vec!["a".into()]);
        assert_eq!(s.changed["t"], (0, 1));
        assert!(c.apply("t", map(&[("b", b"3")]), vec![]).is_empty());
        assert_eq!(c.version("t"), 3);
    }

    #[test]
    fn change_log_is_bounded() {
        let c = ResourceCache::new();
        for i in 0..(CHANGE_LOG_BATCHES as u64 + 10) {
            c.update_type("t", map(&[("a", &i.to_le_bytes())]));
        }
        assert!(matches!(c.changes_since("t", 1).1, Changes::Unknown));
        let v = c.version("t");
        assert!(matches!(c.changes_since("t", v - 1).1, Changes::Names(_)));
        assert!(matches!(c.changes_since("other", 0).1, Changes::None));
    }
}
