//! Incremental translation: when the only changes since the last translation are pods whose
//! change cannot affect anything but their own workload, only those pods are re-translated.
//!
//! At 10 000 pods a full translation costs ~100 ms of CPU; pod churn (an IP assigned, a
//! readiness flip) is by far the most frequent change in a cluster and used to pay all of it.
//!
//! What other resources read from a pod, and so what must be unchanged for the fast path:
//! - labels: service selectors (the `services` of its workload), policy selectors (its
//!   `authorization_policies`), L7 subsets (the waypoint's endpoint lists);
//! - containers: named target ports (its own `services` entry);
//! - whether the pod has finished (Succeeded/Failed): L7 subsets leave finished pods out;
//! - its IPs, but only where a selector-less service's EndpointSlices are matched to pods by
//!   IP: the fast path is not taken in a namespace that has EndpointSlices and the IPs moved;
//! - whether it parses at all.
//!
//! Additions and removals of pods, and every other kind of change, take the full path. The
//! fast path is checked against full translation by a randomized test below.

use std::collections::{BTreeMap, BTreeSet};

use prost_types::Any;

use super::{PodContext, TranslateError, TranslateOptions, Translated, translate_with_context};
use crate::k8s;
use crate::store::{ObjectKey, Snapshot};

/// The result of one [`Incremental::translate`].
#[derive(Debug)]
pub enum Output {
    /// Everything, from a full translation.
    Full(Translated),
    /// Only these Address resources changed; every other resource is as before.
    Addresses {
        upserts: BTreeMap<String, Any>,
        removed: Vec<String>,
        /// The complete current error list (not only the changed pods').
        errors: Vec<TranslateError>,
    },
}

struct Previous {
    snap: Snapshot,
    opts: TranslateOptions,
    ctx: PodContext,
    errors: Vec<TranslateError>,
}

/// Translation that remembers the previous input (see the module docs).
#[derive(Default)]
pub struct Incremental {
    prev: Option<Previous>,
}

/// Whether a change of `key` between `old` and `new` only affects the pod's own workload.
fn local_pod_change(old: &Snapshot, new: &Snapshot, key: &ObjectKey) -> bool {
    if key.kind != "Pod" {
        return false;
    }
    let (Some(Ok(a)), Some(Ok(b))) = (old.parsed::<k8s::Pod>(key), new.parsed::<k8s::Pod>(key))
    else {
        return false;
    };
    let finished = |p: &k8s::Pod| matches!(p.status.phase.as_deref(), Some("Succeeded" | "Failed"));
    a.metadata.namespace == b.metadata.namespace
        && a.metadata.labels == b.metadata.labels
        && a.spec.containers == b.spec.containers
        && finished(&a) == finished(&b)
        && (super::workloads::pod_ips(&a) == super::workloads::pod_ips(&b)
            || !new.any_in("EndpointSlice", &key.namespace))
}

impl Incremental {
    /// Translate `snap`, re-using the previous translation where the change allows.
    pub fn translate(&mut self, snap: Snapshot, opts: &TranslateOptions) -> Output {
        if let Some(prev) = self.prev.as_mut().filter(|p| p.opts == *opts) {
            let changed = snap.changed_since(&prev.snap);
            if changed
                .iter()
                .all(|k| local_pod_change(&prev.snap, &snap, k))
            {
                let mut out = Translated::default();
                let addresses = super::workloads::translate_pods(
                    &snap,
                    opts,
                    &prev.ctx.backs,
                    &prev.ctx.bindings,
                    &changed,
                    &mut out,
                );
                let keys: BTreeSet<&ObjectKey> = changed.iter().copied().collect();
                prev.errors.retain(|e| !keys.contains(&e.object));
                prev.errors.extend(out.errors);
                let mut upserts = BTreeMap::new();
                let mut removed = Vec::new();
                for (uid, address) in addresses {
                    match address {
                        Some(value) => {
                            upserts.insert(
                                uid,
                                Any {
                                    type_url: zmesh_proto::ADDRESS_TYPE_URL.to_string(),
                                    value,
                                },
                            );
                        }
                        None => removed.push(uid),
                    }
                }
                let errors = prev.errors.clone();
                prev.snap = snap;
                return Output::Addresses {
                    upserts,
                    removed,
                    errors,
                };
            }
        }
        let (out, ctx) = translate_with_context(&snap, opts);
        self.prev = Some(Previous {
            snap,
            opts: opts.clone(),
            ctx,
            errors: out.errors.clone(),
        });
        Output::Full(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// A small deterministic generator (xorshift64*), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545F4914F6CDD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
            &v[self.below(v.len() as u64) as usize]
        }
    }

    const NAMESPACES: [&str; 3] = ["a", "b", "c"];
    const APPS: [&str; 3] = ["web", "db", "cache"];

    fn pod(rng: &mut Rng, ns: &str, name: &str) -> Value {
        let app = *rng.pick(&APPS);
        let phase = *rng.pick(&["Running", "Running", "Running", "Pending", "Succeeded"]);
        let ip = match rng.below(6) {
            0 => String::new(),
            1 => "not-an-ip".to_string(),
            n => format!("10.{}.0.{}", n, rng.below(20) + 1),
        };
        let ready = if rng.below(3) == 0 { "False" } else { "True" };
        let mut labels = json!({"app": app, "version": *rng.pick(&["v1", "v2"])});
        if rng.below(8) == 0 {
            labels["istio.io/dataplane-mode"] = json!("none");
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {
                "nodeName": *rng.pick(&["n1", "n2"]),
                "serviceAccountName": *rng.pick(&["sa1", "sa2"]),
                "containers": [{"name": "c", "ports": [
                    {"name": "http", "containerPort": *rng.pick(&[8080, 9090])}
                ]}]
            },
            "status": {"phase": phase, "podIP": ip,
                "conditions": [{"type": "Ready", "status": ready}]}
        })
    }

    /// Mutate one field of a pod the way clusters do (IP, readiness, phase, node, labels).
    fn mutate(rng: &mut Rng, mut p: Value) -> Value {
        match rng.below(7) {
            0 => {
                p["status"]["podIP"] = json!(format!("10.9.{}.{}", rng.below(3), rng.below(9) + 1))
            }
            1 => p["status"]["podIP"] = json!(""),
            2 => {
                p["status"]["conditions"][0]["status"] = json!(*rng.pick(&["True", "False"]));
            }
            3 => p["status"]["phase"] = json!(*rng.pick(&["Running", "Failed", "Pending"])),
            4 => p["metadata"]["labels"]["app"] = json!(*rng.pick(&APPS)),
            5 => {
                p["spec"]["containers"][0]["ports"][0]["containerPort"] =
                    json!(*rng.pick(&[8080, 9090]))
            }
            _ => p["spec"]["nodeName"] = json!(*rng.pick(&["n1", "n2", "n3"])),
        }
        p
    }

    fn cluster(rng: &mut Rng) -> Vec<Value> {
        let mut objs = Vec::new();
        for (i, ns) in NAMESPACES.iter().enumerate() {
            let mut labels = json!({"istio.io/dataplane-mode": "ambient"});
            if i == 1 {
                labels["istio.io/use-waypoint"] = json!("wp");
            }
            objs.push(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": labels}}));
            for (j, app) in APPS.iter().enumerate() {
                objs.push(json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": app, "namespace": ns},
                    "spec": {"clusterIP": format!("10.96.{i}.{j}"), "selector": {"app": app},
                        "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}));
                objs.push(json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                    "metadata": {"name": format!("allow-{app}"), "namespace": ns},
                    "spec": {"selector": {"matchLabels": {"app": app}},
                        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/a/sa/sa1"]}}]}]}}));
            }
            objs.push(
                json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                "metadata": {"name": "web", "namespace": ns},
                "spec": {"host": "web", "subsets": [
                    {"name": "v1", "labels": {"version": "v1"}},
                    {"name": "v2", "labels": {"version": "v2"}}]}}),
            );
            for k in 0..8 {
                objs.push(pod(rng, ns, &format!("p{k}")));
            }
        }
        // Namespace c: a selector-less service whose endpoints are matched to pods by IP.
        objs.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "ext", "namespace": "c"},
            "spec": {"clusterIP": "10.96.9.9", "ports": [{"name": "http", "port": 80}]}}));
        objs.push(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "ext-1", "namespace": "c",
                "labels": {"kubernetes.io/service-name": "ext"}},
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.9.0.1", "10.9.1.2", "10.2.0.3"]}]}),
        );
        objs
    }

    fn full_view(
        resources: &BTreeMap<String, BTreeMap<String, Any>>,
    ) -> BTreeMap<(String, String), Vec<u8>> {
        resources
            .iter()
            .flat_map(|(t, m)| {
                m.iter()
                    .map(move |(n, a)| ((t.clone(), n.clone()), a.value.clone()))
            })
            .collect()
    }

    fn error_set(errors: &[TranslateError]) -> BTreeSet<String> {
        errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn fast_path_matches_full_translation() {
        let opts = TranslateOptions::default();
        let mut fast_paths = 0;
        for seed in 1..=25u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
            let mut objects: BTreeMap<ObjectKey, Value> = cluster(&mut rng)
                .into_iter()
                .map(|o| (ObjectKey::of(&o).expect("key"), o))
                .collect();
            let snap = |objects: &BTreeMap<ObjectKey, Value>| {
                Snapshot::from_objects(objects.values().cloned())
            };
            // Objects are shared between snapshots as in the store: rebuild from the previous
            // snapshot's objects so unchanged ones keep their identity.
            let store = crate::store::ObjectStore::new();
            for (k, v) in &objects {
                store.upsert(k.clone(), v.clone());
            }
            let mut inc = Incremental::default();
            let Output::Full(first) = inc.translate(store.snapshot(), &opts) else {
                panic!("the first translation is full");
            };
            let mut served = full_view(&first.resources);
            for step in 0..40 {
                // One to three changes per step, mostly pod mutations.
                for _ in 0..=rng.below(3) {
                    let pods: Vec<ObjectKey> = objects
                        .keys()
                        .filter(|k| k.kind == "Pod")
                        .cloned()
                        .collect();
                    match rng.below(20) {
                        0 if !pods.is_empty() => {
                            let k = rng.pick(&pods).clone();
                            objects.remove(&k);
                            store.remove(&k);
                        }
                        1 => {
                            let ns = *rng.pick(&NAMESPACES);
                            let o = pod(&mut rng, ns, &format!("new{step}"));
                            store.upsert(ObjectKey::of(&o).expect("key"), o.clone());
                            objects.insert(ObjectKey::of(&o).expect("key"), o);
                        }
                        2 => {
                            let ns = *rng.pick(&NAMESPACES);
                            let k = ObjectKey::new("Namespace", "", ns);
                            let mut o = objects[&k].clone();
                            o["metadata"]["labels"]["istio.io/dataplane-mode"] =
                                json!(*rng.pick(&["ambient", "none"]));
                            store.upsert(k.clone(), o.clone());
                            objects.insert(k, o);
                        }
                        _ if !pods.is_empty() => {
                            let k = rng.pick(&pods).clone();
                            let o = mutate(&mut rng, objects[&k].clone());
                            store.upsert(k.clone(), o.clone());
                            objects.insert(k, o);
                        }
                        _ => {}
                    }
                }
                let current = store.snapshot();
                let expected = super::super::translate(&snap(&objects), &opts);
                match inc.translate(current, &opts) {
                    Output::Full(t) => {
                        assert_eq!(error_set(&t.errors), error_set(&expected.errors));
                        served = full_view(&t.resources);
                    }
                    Output::Addresses {
                        upserts,
                        removed,
                        errors,
                    } => {
                        fast_paths += 1;
                        assert_eq!(
                            error_set(&errors),
                            error_set(&expected.errors),
                            "seed {seed} step {step}: errors"
                        );
                        for (n, a) in upserts {
                            served.insert((zmesh_proto::ADDRESS_TYPE_URL.into(), n), a.value);
                        }
                        for n in removed {
                            served.remove(&(zmesh_proto::ADDRESS_TYPE_URL.to_string(), n));
                        }
                    }
                }
                let want = full_view(&expected.resources);
                if served != want {
                    let diff: Vec<_> = want
                        .keys()
                        .chain(served.keys())
                        .filter(|k| want.get(*k) != served.get(*k))
                        .collect();
                    panic!("seed {seed} step {step}: incremental output differs at {diff:?}");
                }
            }
        }
        assert!(
            fast_paths > 300,
            "the fast path should be taken for most pod changes (taken {fast_paths} times)"
        );
    }

    #[test]
    fn label_changes_and_new_pods_take_the_full_path() {
        let opts = TranslateOptions::default();
        let store = crate::store::ObjectStore::new();
        let mut rng = Rng(7);
        for o in cluster(&mut rng) {
            store.upsert(ObjectKey::of(&o).expect("key"), o);
        }
        let mut inc = Incremental::default();
        assert!(matches!(
            inc.translate(store.snapshot(), &opts),
            Output::Full(_)
        ));
        // Nothing changed: an empty delta.
        match inc.translate(store.snapshot(), &opts) {
            Output::Addresses {
                upserts, removed, ..
            } => assert!(upserts.is_empty() && removed.is_empty()),
            other => panic!("{other:?}"),
        }
        let key = ObjectKey::new("Pod", "a", "p0");
        let mut p = (*store.snapshot().get(&key).expect("pod")).clone();
        p["status"]["podIP"] = json!("10.1.2.3");
        p["status"]["phase"] = json!("Running");
        store.upsert(key.clone(), p.clone());
        match inc.translate(store.snapshot(), &opts) {
            Output::Addresses { upserts, .. } => {
                assert_eq!(upserts.len(), 1);
                assert!(upserts.contains_key("Kubernetes//v1/Pod/a/p0"));
            }
            other => panic!("an IP change is local: {other:?}"),
        }
        p["metadata"]["labels"]["app"] = json!("brand-new");
        store.upsert(key, p);
        assert!(matches!(
            inc.translate(store.snapshot(), &opts),
            Output::Full(_)
        ));
        let o = json!({"kind": "Pod", "metadata": {"name": "fresh", "namespace": "a"},
            "status": {"podIP": "10.7.7.7"}});
        store.upsert(ObjectKey::of(&o).expect("key"), o);
        assert!(matches!(
            inc.translate(store.snapshot(), &opts),
            Output::Full(_)
        ));
    }
}
