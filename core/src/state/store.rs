//! [`ProxyState`] (the indexes) and [`StateStore`] (shared, atomically updated state with change
//! notifications).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use tokio::sync::watch;

use super::{Policy, PolicyScope, Service, StateError, Workload};

/// Istio's root namespace: namespace-scoped policies there apply mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// One atomic batch of changes from a config source.
#[derive(Debug, Default, Clone)]
pub struct StateUpdate {
    pub upsert_workloads: Vec<Workload>,
    pub upsert_services: Vec<Service>,
    pub upsert_policies: Vec<Policy>,
    /// Workload uids.
    pub remove_workloads: Vec<String>,
    /// Service keys (`ns/hostname`).
    pub remove_services: Vec<String>,
    /// Policy keys (`ns/name`).
    pub remove_policies: Vec<String>,
    /// This update is a full snapshot: anything not upserted in it is removed.
    pub replace_all: bool,
}

impl StateUpdate {
    pub fn is_empty(&self) -> bool {
        self.upsert_workloads.is_empty()
            && self.upsert_services.is_empty()
            && self.upsert_policies.is_empty()
            && self.remove_workloads.is_empty()
            && self.remove_services.is_empty()
            && self.remove_policies.is_empty()
            && !self.replace_all
    }
}

/// What [`StateStore::apply`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Anything changed (identical re-sends do not count).
    pub changed: bool,
    /// A policy, or a workload's namespace / policy list, changed: live connections need a
    /// re-check.
    pub policy_changed: bool,
    /// Objects added or changed.
    pub upserted: usize,
    /// Objects removed.
    pub removed: usize,
    /// Objects refused by validation; the rest of the update was applied.
    pub rejected: Vec<StateError>,
}

/// A multimap from an address to object keys; the most recently indexed key wins lookups, so
/// two objects briefly sharing an IP (pod churn) resolve to the newer one.
type AddrIndex = HashMap<(String, IpAddr), Vec<String>>;

fn index_add(idx: &mut AddrIndex, addr: (String, IpAddr), key: &str) {
    let keys = idx.entry(addr).or_default();
    keys.retain(|k| k != key);
    keys.push(key.to_string());
}

fn index_remove(idx: &mut AddrIndex, addr: (String, IpAddr), key: &str) {
    if let Some(keys) = idx.get_mut(&addr) {
        keys.retain(|k| k != key);
        if keys.is_empty() {
            idx.remove(&addr);
        }
    }
}

fn set_remove(idx: &mut HashMap<String, BTreeSet<String>>, at: &str, key: &str) {
    if let Some(keys) = idx.get_mut(at) {
        keys.remove(key);
        if keys.is_empty() {
            idx.remove(at);
        }
    }
}

/// Workloads, services and policies with the indexes the data path needs.
#[derive(Debug, Default)]
pub struct ProxyState {
    /// The network this proxy is on; `*_by_ip` lookups use it.
    network: String,
    workloads: HashMap<String, Arc<Workload>>,
    workloads_by_addr: AddrIndex,
    services: HashMap<String, Arc<Service>>,
    services_by_vip: AddrIndex,
    services_by_hostname: HashMap<String, BTreeSet<String>>,
    /// Service key -> uids of the workloads that name it (computed from `Workload::services`,
    /// so the service and its endpoints may arrive in any order).
    endpoints: HashMap<String, BTreeSet<String>>,
    policies: HashMap<String, Arc<Policy>>,
    policies_by_namespace: HashMap<String, BTreeSet<String>>,
    global_policies: BTreeSet<String>,
}

impl ProxyState {
    /// An empty state for a proxy on `network` ("" for single-network meshes).
    pub fn new(network: impl Into<String>) -> Self {
        ProxyState {
            network: network.into(),
            ..Default::default()
        }
    }

    pub fn network(&self) -> &str {
        &self.network
    }

    /// The workload with this IP on the local network.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.workload_by_addr(&self.network, ip)
    }

    pub fn workload_by_addr(&self, network: &str, ip: IpAddr) -> Option<Arc<Workload>> {
        // Sockets may hand us IPv4-mapped IPv6 addresses; configuration uses plain IPv4.
        let uid = self
            .workloads_by_addr
            .get(&(network.to_string(), ip.to_canonical()))?
            .last()?;
        self.workloads.get(uid).cloned()
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<Arc<Workload>> {
        self.workloads.get(uid).cloned()
    }

    /// The service with this VIP on the local network.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<Arc<Service>> {
        self.service_by_addr(&self.network, ip)
    }

    pub fn service_by_addr(&self, network: &str, ip: IpAddr) -> Option<Arc<Service>> {
        let key = self
            .services_by_vip
            .get(&(network.to_string(), ip.to_canonical()))?
            .last()?;
        self.services.get(key).cloned()
    }

    /// By key (`ns/hostname`) or, when there is no `/`, by hostname (if several namespaces
    /// define the hostname, the lexically first key wins, so the answer is stable).
    pub fn service_by_host(&self, key_or_hostname: &str) -> Option<Arc<Service>> {
        if key_or_hostname.contains('/') {
            return self.services.get(key_or_hostname).cloned();
        }
        let key = self.services_by_hostname.get(key_or_hostname)?.first()?;
        self.services.get(key).cloned()
    }

    /// Endpoints of a service for a given service port: (workload, target port). Unhealthy
    /// workloads are excluded. The target port is the workload's own mapping for the port if it
    /// has a non-zero one, else the service's; endpoints with neither are excluded.
    pub fn endpoints(&self, svc: &Service, service_port: u16) -> Vec<(Arc<Workload>, u16)> {
        let key = svc.key();
        let Some(uids) = self.endpoints.get(&key) else {
            return Vec::new();
        };
        let svc_target = svc
            .port(service_port)
            .map(|p| p.target_port)
            .filter(|p| *p != 0);
        uids.iter()
            .filter_map(|uid| self.workloads.get(uid))
            .filter(|w| w.healthy)
            .filter_map(|w| {
                let own = w
                    .services
                    .get(&key)
                    .and_then(|ports| ports.iter().find(|p| p.service_port == service_port))
                    .map(|p| p.target_port)
                    .filter(|p| *p != 0);
                Some((Arc::clone(w), own.or(svc_target)?))
            })
            .collect()
    }

    /// Policies applying to a destination workload: namespace-scoped ones of its namespace ∪
    /// global ones (scope Global, or namespace-scoped in [`ROOT_NAMESPACE`]) ∪ the workload's
    /// own `authorization_policies`. Policies a workload names but we have not received yet are
    /// left out. Ordered by key, without duplicates.
    pub fn policies_for(&self, w: &Workload) -> Vec<Arc<Policy>> {
        let mut keys: BTreeSet<&str> = self.global_policies.iter().map(String::as_str).collect();
        if let Some(ns) = self.policies_by_namespace.get(&w.namespace) {
            keys.extend(ns.iter().map(String::as_str));
        }
        keys.extend(w.authorization_policies.iter().map(String::as_str));
        keys.into_iter()
            .filter_map(|k| self.policies.get(k).cloned())
            .collect()
    }

    pub fn policy(&self, key: &str) -> Option<Arc<Policy>> {
        self.policies.get(key).cloned()
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.policies.values()
    }

    /// Everything, sorted by key, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        fn sorted<T: serde::Serialize>(m: &HashMap<String, Arc<T>>) -> serde_json::Value {
            let mut v: Vec<_> = m.iter().collect();
            v.sort_by(|a, b| a.0.cmp(b.0));
            serde_json::Value::Array(
                v.into_iter()
                    .map(|(_, x)| {
                        serde_json::to_value(&**x)
                            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
                    })
                    .collect(),
            )
        }
        serde_json::json!({
            "network": self.network,
            "workloads": sorted(&self.workloads),
            "services": sorted(&self.services),
            "policies": sorted(&self.policies),
        })
    }

    /// Applies an update; invalid objects are rejected (listed in the outcome), the rest apply.
    pub fn apply(&mut self, update: StateUpdate) -> ApplyOutcome {
        let mut out = ApplyOutcome::default();
        let StateUpdate {
            upsert_workloads,
            upsert_services,
            upsert_policies,
            remove_workloads,
            remove_services,
            remove_policies,
            replace_all,
        } = update;
        // Validate first so a snapshot knows exactly what stays.
        let workloads = keep_valid(upsert_workloads, Workload::validate, &mut out);
        let services = keep_valid(upsert_services, Service::validate, &mut out);
        let policies = keep_valid(upsert_policies, Policy::validate, &mut out);

        if replace_all {
            let keep: HashSet<&str> = workloads.iter().map(|w| w.uid.as_str()).collect();
            let stale: Vec<String> = (self.workloads.keys())
                .filter(|k| !keep.contains(k.as_str()))
                .cloned()
                .collect();
            stale.iter().for_each(|k| self.remove_workload(k, &mut out));

            let keep: HashSet<String> = services.iter().map(Service::key).collect();
            let stale: Vec<String> = (self.services.keys())
                .filter(|k| !keep.contains(*k))
                .cloned()
                .collect();
            stale.iter().for_each(|k| self.remove_service(k, &mut out));

            let keep: HashSet<String> = policies.iter().map(Policy::key).collect();
            let stale: Vec<String> = (self.policies.keys())
                .filter(|k| !keep.contains(*k))
                .cloned()
                .collect();
            stale.iter().for_each(|k| self.remove_policy(k, &mut out));
        }
        remove_workloads
            .iter()
            .for_each(|k| self.remove_workload(k, &mut out));
        remove_services
            .iter()
            .for_each(|k| self.remove_service(k, &mut out));
        remove_policies
            .iter()
            .for_each(|k| self.remove_policy(k, &mut out));

        workloads
            .into_iter()
            .for_each(|w| self.upsert_workload(w, &mut out));
        services
            .into_iter()
            .for_each(|s| self.upsert_service(s, &mut out));
        policies
            .into_iter()
            .for_each(|p| self.upsert_policy(p, &mut out));
        out.changed = out.upserted > 0 || out.removed > 0;
        out
    }

    fn index_workload(&mut self, w: &Workload) {
        for ip in &w.addresses {
            index_add(
                &mut self.workloads_by_addr,
                (w.network.clone(), ip.to_canonical()),
                &w.uid,
            );
        }
        for svc in w.services.keys() {
            self.endpoints
                .entry(svc.clone())
                .or_default()
                .insert(w.uid.clone());
        }
    }

    fn unindex_workload(&mut self, w: &Workload) {
        for ip in &w.addresses {
            index_remove(
                &mut self.workloads_by_addr,
                (w.network.clone(), ip.to_canonical()),
                &w.uid,
            );
        }
        for svc in w.services.keys() {
            set_remove(&mut self.endpoints, svc, &w.uid);
        }
    }

    fn upsert_workload(&mut self, w: Workload, out: &mut ApplyOutcome) {
        if let Some(old) = self.workloads.get(&w.uid) {
            if **old == w {
                return;
            }
            // Policy selection depends on these two fields.
            if old.namespace != w.namespace
                || old.authorization_policies != w.authorization_policies
            {
                out.policy_changed = true;
            }
            let old = Arc::clone(old);
            self.unindex_workload(&old);
        }
        self.index_workload(&w);
        self.workloads.insert(w.uid.clone(), Arc::new(w));
        out.upserted += 1;
    }

    fn remove_workload(&mut self, uid: &str, out: &mut ApplyOutcome) {
        if let Some(old) = self.workloads.remove(uid) {
            self.unindex_workload(&old);
            out.removed += 1;
        }
    }

    fn index_service(&mut self, s: &Service, key: &str) {
        for (net, ip) in &s.vips {
            index_add(
                &mut self.services_by_vip,
                (net.clone(), ip.to_canonical()),
                key,
            );
        }
        self.services_by_hostname
            .entry(s.hostname.clone())
            .or_default()
            .insert(key.to_string());
    }

    fn unindex_service(&mut self, s: &Service, key: &str) {
        for (net, ip) in &s.vips {
            index_remove(
                &mut self.services_by_vip,
                (net.clone(), ip.to_canonical()),
                key,
            );
        }
        set_remove(&mut self.services_by_hostname, &s.hostname, key);
    }

    fn upsert_service(&mut self, s: Service, out: &mut ApplyOutcome) {
        let key = s.key();
        if let Some(old) = self.services.get(&key) {
            if **old == s {
                return;
            }
            let old = Arc::clone(old);
            self.unindex_service(&old, &key);
        }
        self.index_service(&s, &key);
        self.services.insert(key, Arc::new(s));
        out.upserted += 1;
    }

    fn remove_service(&mut self, key: &str, out: &mut ApplyOutcome) {
        if let Some(old) = self.services.remove(key) {
            self.unindex_service(&old, key);
            out.removed += 1;
        }
    }

    fn is_global(p: &Policy) -> bool {
        p.scope == PolicyScope::Global
            || (p.scope == PolicyScope::Namespace && p.namespace == ROOT_NAMESPACE)
    }

    fn index_policy(&mut self, p: &Policy, key: &str) {
        if Self::is_global(p) {
            self.global_policies.insert(key.to_string());
        } else if p.scope == PolicyScope::Namespace {
            self.policies_by_namespace
                .entry(p.namespace.clone())
                .or_default()
                .insert(key.to_string());
        }
        // WorkloadSelector policies are reached through Workload::authorization_policies.
    }

    fn unindex_policy(&mut self, p: &Policy, key: &str) {
        self.global_policies.remove(key);
        set_remove(&mut self.policies_by_namespace, &p.namespace, key);
    }

    fn upsert_policy(&mut self, p: Policy, out: &mut ApplyOutcome) {
        let key = p.key();
        if let Some(old) = self.policies.get(&key) {
            if **old == p {
                return;
            }
            let old = Arc::clone(old);
            self.unindex_policy(&old, &key);
        }
        self.index_policy(&p, &key);
        self.policies.insert(key, Arc::new(p));
        out.upserted += 1;
        out.policy_changed = true;
    }

    fn remove_policy(&mut self, key: &str, out: &mut ApplyOutcome) {
        if let Some(old) = self.policies.remove(key) {
            self.unindex_policy(&old, key);
            out.removed += 1;
            out.policy_changed = true;
        }
    }
}

fn keep_valid<T>(
    items: Vec<T>,
    validate: impl Fn(&T) -> Result<(), StateError>,
    out: &mut ApplyOutcome,
) -> Vec<T> {
    items
        .into_iter()
        .filter(|x| match validate(x) {
            Ok(()) => true,
            Err(e) => {
                out.rejected.push(e);
                false
            }
        })
        .collect()
}

/// The shared state of one proxy: read by the data path, written by config sources.
#[derive(Debug)]
pub struct StateStore {
    state: RwLock<ProxyState>,
    generation: watch::Sender<u64>,
    policy_generation: watch::Sender<u64>,
    synced: AtomicBool,
}

impl StateStore {
    /// A store for a single-network mesh (network "").
    pub fn new() -> Arc<Self> {
        Self::with_network("")
    }

    /// A store for a proxy on `network`: IP lookups without a network use it.
    pub fn with_network(network: impl Into<String>) -> Arc<Self> {
        Arc::new(StateStore {
            state: RwLock::new(ProxyState::new(network)),
            generation: watch::Sender::new(0),
            policy_generation: watch::Sender::new(0),
            synced: AtomicBool::new(false),
        })
    }

    /// Read access. Keep the guard for short critical sections only (copy out the `Arc`s you
    /// need); never hold it across an `.await`.
    pub fn read(&self) -> RwLockReadGuard<'_, ProxyState> {
        // A panic elsewhere while holding the lock must not take the data path down with it.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies an update atomically (readers see all of it or none of it), then bumps the
    /// generation counters if anything changed. Rejected objects are logged and returned.
    pub fn apply(&self, update: StateUpdate) -> ApplyOutcome {
        let out = {
            let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
            st.apply(update)
        };
        for e in &out.rejected {
            tracing::warn!(error = %e, "configuration object rejected");
        }
        // Bumped after the lock is released so woken watchers can read the new state.
        if out.changed {
            self.generation.send_modify(|g| *g += 1);
        }
        if out.policy_changed {
            self.policy_generation.send_modify(|g| *g += 1);
        }
        out
    }

    /// Bumped whenever a policy (or a workload's policy list) changes; connection managers
    /// re-check live connections.
    pub fn policy_generation(&self) -> watch::Receiver<u64> {
        self.policy_generation.subscribe()
    }

    /// Bumped on any change, and when the store first becomes synced.
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Records that a full snapshot has been applied (readiness).
    pub fn mark_synced(&self) {
        if !self.synced.swap(true, Ordering::AcqRel) {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::{PolicyAction, PortMapping, Rule};

    fn wl(uid: &str, ns: &str, ip: &str) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: ns.into(),
            service_account: "default".into(),
            addresses: vec![ip.parse().unwrap()],
            ..Workload::default()
        }
    }

    fn svc(ns: &str, host: &str, vip: &str, ports: &[(u16, u16)]) -> Service {
        Service {
            name: host.split('.').next().unwrap_or(host).into(),
            namespace: ns.into(),
            hostname: host.into(),
            vips: vec![(String::new(), vip.parse().unwrap())],
            ports: ports
                .iter()
                .map(|(s, t)| PortMapping::new(*s, *t))
                .collect(),
            subject_alt_names: vec![],
            waypoint: None,
        }
    }

    fn pol(ns: &str, name: &str, scope: PolicyScope) -> Policy {
        Policy {
            name: name.into(),
            namespace: ns.into(),
            scope,
            action: PolicyAction::Allow,
            dry_run: false,
            rules: vec![Rule::default()],
        }
    }

    fn backing(mut w: Workload, svc_key: &str, ports: &[(u16, u16)]) -> Workload {
        w.services.insert(
            svc_key.into(),
            ports
                .iter()
                .map(|(s, t)| PortMapping::new(*s, *t))
                .collect(),
        );
        w
    }

    fn upsert(
        st: &mut ProxyState,
        w: Vec<Workload>,
        s: Vec<Service>,
        p: Vec<Policy>,
    ) -> ApplyOutcome {
        st.apply(StateUpdate {
            upsert_workloads: w,
            upsert_services: s,
            upsert_policies: p,
            ..Default::default()
        })
    }

    #[test]
    fn lookups() {
        let mut st = ProxyState::default();
        let mut w2 = wl("w2", "default", "10.0.0.2");
        w2.addresses.push("fd00::2".parse().unwrap());
        let out = upsert(
            &mut st,
            vec![wl("w1", "default", "10.0.0.1"), w2],
            vec![svc(
                "default",
                "echo.default.svc.cluster.local",
                "10.96.0.1",
                &[(80, 8080)],
            )],
            vec![],
        );
        assert_eq!(out.upserted, 3);
        assert!(out.rejected.is_empty());

        let by_ip = |s: &str| st.workload_by_ip(s.parse().unwrap()).map(|w| w.uid.clone());
        assert_eq!(by_ip("10.0.0.1").as_deref(), Some("w1"));
        assert_eq!(by_ip("fd00::2").as_deref(), Some("w2"));
        // IPv4-mapped IPv6 (dual-stack sockets) finds the IPv4 workload.
        assert_eq!(by_ip("::ffff:10.0.0.2").as_deref(), Some("w2"));
        assert_eq!(by_ip("10.0.0.3"), None);
        assert!(
            st.workload_by_addr("other-net", "10.0.0.1".parse().unwrap())
                .is_none()
        );
        assert_eq!(
            st.workload_by_uid("w1").unwrap().addresses[0].to_string(),
            "10.0.0.1"
        );
        assert!(st.workload_by_uid("nope").is_none());

        let key = "default/echo.default.svc.cluster.local";
        assert_eq!(
            st.service_by_vip("10.96.0.1".parse().unwrap())
                .unwrap()
                .key(),
            key
        );
        assert!(st.service_by_vip("10.96.0.2".parse().unwrap()).is_none());
        assert_eq!(st.service_by_host(key).unwrap().key(), key);
        assert_eq!(
            st.service_by_host("echo.default.svc.cluster.local")
                .unwrap()
                .key(),
            key
        );
        assert!(
            st.service_by_host("other/echo.default.svc.cluster.local")
                .is_none()
        );
        assert_eq!(st.workloads().count(), 2);
        assert_eq!(st.services().count(), 1);
    }

    #[test]
    fn address_moves_with_the_workload() {
        let mut st = ProxyState::default();
        upsert(
            &mut st,
            vec![wl("w1", "default", "10.0.0.1")],
            vec![],
            vec![],
        );
        upsert(
            &mut st,
            vec![wl("w1", "default", "10.0.0.9")],
            vec![],
            vec![],
        );
        assert!(st.workload_by_ip("10.0.0.1".parse().unwrap()).is_none());
        assert_eq!(
            st.workload_by_ip("10.0.0.9".parse().unwrap()).unwrap().uid,
            "w1"
        );
    }

    #[test]
    fn shared_ip_resolves_to_newest_and_survives_removal() {
        let mut st = ProxyState::default();
        upsert(
            &mut st,
            vec![wl("old", "default", "10.0.0.1")],
            vec![],
            vec![],
        );
        upsert(
            &mut st,
            vec![wl("new", "default", "10.0.0.1")],
            vec![],
            vec![],
        );
        let ip = "10.0.0.1".parse().unwrap();
        assert_eq!(st.workload_by_ip(ip).unwrap().uid, "new");
        st.apply(StateUpdate {
            remove_workloads: vec!["new".into()],
            ..Default::default()
        });
        assert_eq!(st.workload_by_ip(ip).unwrap().uid, "old");
    }

    #[test]
    fn endpoints_port_mapping_and_health() {
        let key = "default/echo.default.svc.cluster.local";
        let mut st = ProxyState::default();
        let unhealthy = Workload {
            healthy: false,
            ..backing(wl("sick", "default", "10.0.0.4"), key, &[(80, 9090)])
        };
        upsert(
            &mut st,
            vec![
                // Own mapping wins.
                backing(wl("a", "default", "10.0.0.1"), key, &[(80, 9090)]),
                // No own mapping for 80: falls back to the service's target port.
                backing(wl("b", "default", "10.0.0.2"), key, &[(443, 8443)]),
                // Own mapping 0 = unspecified: service's target port.
                backing(wl("c", "default", "10.0.0.3"), key, &[(80, 0)]),
                unhealthy,
                // Backs another service only.
                backing(wl("d", "default", "10.0.0.5"), "default/other", &[(80, 1)]),
            ],
            vec![svc(
                "default",
                "echo.default.svc.cluster.local",
                "10.96.0.1",
                &[(80, 8080), (443, 0)],
            )],
            vec![],
        );
        let s = st.service_by_host(key).unwrap();
        let eps = |st: &ProxyState, port| -> Vec<(String, u16)> {
            st.endpoints(&s, port)
                .into_iter()
                .map(|(w, p)| (w.uid.clone(), p))
                .collect()
        };
        let cases: &[(u16, &[(&str, u16)])] = &[
            (80, &[("a", 9090), ("b", 8080), ("c", 8080)]),
            // Service target 0: only endpoints with their own mapping.
            (443, &[("b", 8443)]),
            // Port the service does not declare and nobody maps.
            (9999, &[]),
        ];
        for (port, want) in cases {
            let want: Vec<(String, u16)> = want.iter().map(|(u, p)| (u.to_string(), *p)).collect();
            assert_eq!(eps(&st, *port), want, "service port {port}");
        }

        // Removing a backing workload removes the endpoint.
        st.apply(StateUpdate {
            remove_workloads: vec!["a".into()],
            ..Default::default()
        });
        assert_eq!(eps(&st, 80).len(), 2);
    }

    #[test]
    fn policies_for_scopes() {
        let mut st = ProxyState::default();
        let mut w = wl("w1", "app", "10.0.0.1");
        w.authorization_policies = vec!["app/selected".into(), "app/not-received-yet".into()];
        upsert(
            &mut st,
            vec![w.clone()],
            vec![],
            vec![
                pol("app", "ns-wide", PolicyScope::Namespace),
                pol("other", "other-ns", PolicyScope::Namespace),
                pol("anywhere", "global", PolicyScope::Global),
                pol(ROOT_NAMESPACE, "root", PolicyScope::Namespace),
                pol("app", "selected", PolicyScope::WorkloadSelector),
                pol("app", "selected-elsewhere", PolicyScope::WorkloadSelector),
            ],
        );
        let keys: Vec<String> = st.policies_for(&w).iter().map(|p| p.key()).collect();
        assert_eq!(
            keys,
            vec![
                "anywhere/global",
                "app/ns-wide",
                "app/selected",
                "istio-system/root"
            ]
        );
        let other = wl("w2", "other", "10.0.0.2");
        let keys: Vec<String> = st.policies_for(&other).iter().map(|p| p.key()).collect();
        assert_eq!(
            keys,
            vec!["anywhere/global", "istio-system/root", "other/other-ns"]
        );

        // Changing a policy's scope re-indexes it.
        upsert(
            &mut st,
            vec![],
            vec![],
            vec![pol("app", "ns-wide", PolicyScope::WorkloadSelector)],
        );
        let keys: Vec<String> = st.policies_for(&w).iter().map(|p| p.key()).collect();
        assert!(!keys.contains(&"app/ns-wide".to_string()), "{keys:?}");
    }

    #[test]
    fn removal_and_replace_all() {
        let mut st = ProxyState::default();
        upsert(
            &mut st,
            vec![
                wl("w1", "default", "10.0.0.1"),
                wl("w2", "default", "10.0.0.2"),
            ],
            vec![
                svc("default", "a.example", "10.96.0.1", &[(80, 80)]),
                svc("default", "b.example", "10.96.0.2", &[(80, 80)]),
            ],
            vec![
                pol("default", "p1", PolicyScope::Namespace),
                pol("default", "p2", PolicyScope::Namespace),
            ],
        );
        let out = st.apply(StateUpdate {
            remove_workloads: vec!["w1".into(), "unknown".into()],
            remove_services: vec!["default/a.example".into()],
            remove_policies: vec!["default/p1".into()],
            ..Default::default()
        });
        assert_eq!(out.removed, 3, "unknown keys are ignored");
        assert!(out.policy_changed);
        assert!(st.workload_by_ip("10.0.0.1".parse().unwrap()).is_none());
        assert!(st.service_by_vip("10.96.0.1".parse().unwrap()).is_none());
        assert!(st.service_by_host("a.example").is_none());
        assert!(st.policy("default/p1").is_none());

        // Snapshot: only what it contains survives.
        let out = st.apply(StateUpdate {
            upsert_workloads: vec![wl("w3", "default", "10.0.0.3")],
            upsert_services: vec![svc("default", "b.example", "10.96.0.2", &[(80, 80)])],
            replace_all: true,
            ..Default::default()
        });
        assert!(out.changed && out.policy_changed);
        let uids: Vec<&str> = st.workloads().map(|w| w.uid.as_str()).collect();
        assert_eq!(uids, vec!["w3"]);
        assert_eq!(st.services().count(), 1, "unchanged service kept");
        assert_eq!(st.policies().count(), 0);
        assert!(st.workload_by_ip("10.0.0.2".parse().unwrap()).is_none());
        assert!(st.policies_for(&wl("x", "default", "10.0.0.9")).is_empty());
    }

    #[test]
    fn invalid_objects_are_rejected_others_apply() {
        let mut st = ProxyState::default();
        let out = upsert(
            &mut st,
            vec![
                wl("", "default", "10.0.0.1"),
                wl("ok", "default", "10.0.0.2"),
            ],
            vec![svc("", "nons.example", "10.96.0.1", &[])],
            vec![pol("default", "", PolicyScope::Namespace)],
        );
        assert_eq!(out.upserted, 1);
        assert_eq!(out.rejected.len(), 3);
        assert!(
            out.rejected[0].to_string().contains("uid"),
            "{:?}",
            out.rejected
        );
        assert!(st.workload_by_uid("ok").is_some());
    }

    #[test]
    fn identical_resend_is_not_a_change() {
        let mut st = ProxyState::default();
        let w = wl("w1", "default", "10.0.0.1");
        let p = pol("default", "p", PolicyScope::Namespace);
        assert!(upsert(&mut st, vec![w.clone()], vec![], vec![p.clone()]).changed);
        let out = upsert(&mut st, vec![w], vec![], vec![p]);
        assert!(!out.changed && !out.policy_changed, "{out:?}");
    }

    #[tokio::test]
    async fn generations_bump_on_the_right_changes() {
        let store = StateStore::new();
        let mut gen_rx = store.generation();
        let mut pol_rx = store.policy_generation();
        let mut w = wl("w1", "default", "10.0.0.1");

        // (update, generation bumped, policy generation bumped)
        let p = pol("default", "p", PolicyScope::Namespace);
        let mut p2 = p.clone();
        p2.dry_run = true;
        let mut w_pol = w.clone();
        w_pol.authorization_policies = vec!["default/p".into()];
        let mut w_moved = w_pol.clone();
        w_moved.addresses = vec!["10.0.0.9".parse().unwrap()];
        w.services = BTreeMap::new();
        let cases: Vec<(&str, StateUpdate, bool, bool)> = vec![
            (
                "new workload",
                StateUpdate {
                    upsert_workloads: vec![w.clone()],
                    ..Default::default()
                },
                true,
                false,
            ),
            (
                "same workload",
                StateUpdate {
                    upsert_workloads: vec![w.clone()],
                    ..Default::default()
                },
                false,
                false,
            ),
            (
                "new policy",
                StateUpdate {
                    upsert_policies: vec![p.clone()],
                    ..Default::default()
                },
                true,
                true,
            ),
            (
                "changed policy",
                StateUpdate {
                    upsert_policies: vec![p2],
                    ..Default::default()
                },
                true,
                true,
            ),
            (
                "workload policy list",
                StateUpdate {
                    upsert_workloads: vec![w_pol],
                    ..Default::default()
                },
                true,
                true,
            ),
            (
                "workload address only",
                StateUpdate {
                    upsert_workloads: vec![w_moved],
                    ..Default::default()
                },
                true,
                false,
            ),
            (
                "remove policy",
                StateUpdate {
                    remove_policies: vec![p.key()],
                    ..Default::default()
                },
                true,
                true,
            ),
            (
                "remove missing policy",
                StateUpdate {
                    remove_policies: vec![p.key()],
                    ..Default::default()
                },
                false,
                false,
            ),
        ];
        for (what, update, want_gen, want_pol) in cases {
            store.apply(update);
            assert_eq!(
                gen_rx.has_changed().unwrap(),
                want_gen,
                "{what}: generation"
            );
            assert_eq!(
                pol_rx.has_changed().unwrap(),
                want_pol,
                "{what}: policy generation"
            );
            gen_rx.borrow_and_update();
            pol_rx.borrow_and_update();
        }
        assert_eq!(*pol_rx.borrow(), 4);

        assert!(!store.is_synced());
        store.mark_synced();
        assert!(store.is_synced());
        assert!(
            gen_rx.has_changed().unwrap(),
            "sync wakes readiness waiters"
        );
    }

    #[test]
    fn store_is_shareable() {
        fn shared<T: Send + Sync + 'static>(_: &T) {}
        let store = StateStore::new();
        shared(&store);
        // Handles given out keep working from other threads.
        let s2 = Arc::clone(&store);
        std::thread::spawn(move || {
            s2.apply(StateUpdate {
                upsert_workloads: vec![wl("t", "default", "10.0.0.7")],
                ..Default::default()
            })
        })
        .join()
        .unwrap();
        assert!(store.read().workload_by_uid("t").is_some());
    }

    #[test]
    fn dump_is_sorted_json() {
        let mut st = ProxyState::default();
        upsert(
            &mut st,
            vec![
                wl("b", "default", "10.0.0.2"),
                wl("a", "default", "10.0.0.1"),
            ],
            vec![],
            vec![Policy::strict_mtls(
                "strict",
                "default",
                PolicyScope::Namespace,
            )],
        );
        let d = st.dump();
        assert_eq!(d["workloads"][0]["uid"], "a");
        assert_eq!(d["workloads"][1]["addresses"][0], "10.0.0.2");
        assert_eq!(
            d["policies"][0]["rules"][0]["clauses"][0]["matches"][0]["notPrincipals"][0],
            "presence"
        );
    }
}
