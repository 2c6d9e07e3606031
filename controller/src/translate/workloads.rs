//! Namespace/Pod/Service/EndpointSlice/ServiceEntry → `istio.workload.Address`, named as istiod
//! names them: workloads by uid (`<cluster>//v1/Pod/<ns>/<name>`), services by
//! `<ns>/<hostname>`.
//!
//! - Every pod with an IP is a workload. Pods enrolled in ambient (namespace labelled
//!   `istio.io/dataplane-mode=ambient` or the pod itself labelled `ambient`, and the pod not
//!   labelled `none`) get HBONE; the others are sent with tunnel NONE, as istiod does, so that
//!   ztunnel can identify them and reach them in plaintext.
//! - A workload lists the services it backs (`services`, key `ns/hostname`) with resolved
//!   target ports: selector services via the pod labels, selector-less services via their
//!   EndpointSlices, ServiceEntries via `workloadSelector`. Endpoints that are not pods
//!   (EndpointSlice addresses of selector-less services, ServiceEntry `endpoints`) become
//!   workloads of their own (tunnel NONE).
//! - Waypoints: `istio.io/use-waypoint` on the pod/service, else on its namespace (`none` on
//!   the pod/service opts out). As in Istio, the waypoint Gateway's `istio.io/waypoint-for`
//!   label (default `service`) decides whether services, workloads or both use it. Deviation:
//!   when the Gateway object is missing, istiod drops the binding; we keep it for services and
//!   explicitly labelled pods (not for namespace-inherited workload binding), pointing at the
//!   waypoint's hostname — traffic then fails closed instead of silently bypassing L7 policy.
//! - Status: UNHEALTHY when the pod reports a phase other than Running or a Ready condition
//!   other than True; a pod that reports neither (typical in file mode) is HEALTHY.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, LazyLock};

use ipnet::IpNet;
use regex::Regex;
use zmesh_proto::workload as pb;

use super::authz::Bindings;
use super::{TranslateOptions, Translated};
use crate::k8s::{self, IntOrString, Labels};
use crate::store::{ObjectKey, Snapshot};

/// Kubernetes cluster DNS suffix of service hostnames.
pub const DOMAIN_SUFFIX: &str = "cluster.local";
/// Port on which waypoints accept HBONE.
pub const WAYPOINT_HBONE_PORT: u32 = 15008;

const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
const USE_WAYPOINT: &str = "istio.io/use-waypoint";
const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// Labels that mark a waypoint's own pods and Service (they never use a waypoint themselves).
const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
const GATEWAY_MANAGED_LABEL: &str = "gateway.istio.io/managed";

/// A CronJob's Jobs are named `<cronjob>-<scheduled time in minutes>`.
static CRONJOB_JOB_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(.+)-\d{8,10}$").expect("constant regex"));

/// `<name>.<ns>.svc.cluster.local`.
pub fn service_hostname(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.svc.{DOMAIN_SUFFIX}")
}

/// Parsed objects of a snapshot, indexed for the joins below.
struct Index<'a> {
    namespaces: BTreeMap<&'a str, Arc<k8s::Namespace>>,
    pods: Vec<(&'a ObjectKey, Arc<k8s::Pod>)>,
    /// Namespace → indexes into `pods` (selectors never cross namespaces).
    pods_by_namespace: HashMap<String, Vec<usize>>,
    services: Vec<(&'a ObjectKey, Arc<k8s::Service>)>,
    /// (namespace, name) → index into `services`.
    services_by_name: HashMap<(&'a str, &'a str), usize>,
    slices: Vec<(&'a ObjectKey, Arc<k8s::EndpointSlice>)>,
    service_entries: Vec<(&'a ObjectKey, Arc<k8s::ServiceEntry>)>,
    gateways: BTreeMap<(String, String), Arc<k8s::Gateway>>,
}

fn parse_all<'a, T: serde::de::DeserializeOwned + Send + Sync + 'static>(
    snap: &'a Snapshot,
    kind: &'a str,
    out: &mut Translated,
) -> Vec<(&'a ObjectKey, Arc<T>)> {
    snap.parsed_of_kind::<T>(kind)
        .filter_map(|(key, parsed)| match parsed {
            Ok(v) => Some((key, v)),
            Err(e) => {
                tracing::error!(object = %key, field = %e.field, reason = %e.reason, "object skipped");
                out.error(key, e.field, e.reason);
                None
            }
        })
        .collect()
}

impl<'a> Index<'a> {
    fn build(snap: &'a Snapshot, out: &mut Translated) -> Index<'a> {
        Self::build_parts(snap, out, true)
    }

    /// `with_pods: false` leaves out pods, EndpointSlices and ServiceEntries: what
    /// [`translate_pods`] needs to translate a few pods against an unchanged rest.
    fn build_parts(snap: &'a Snapshot, out: &mut Translated, with_pods: bool) -> Index<'a> {
        let pods: Vec<(&'a ObjectKey, Arc<k8s::Pod>)> = if with_pods {
            parse_all(snap, "Pod", out)
        } else {
            Vec::new()
        };
        let mut pods_by_namespace: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, (k, _)) in pods.iter().enumerate() {
            pods_by_namespace
                .entry(k.namespace.clone())
                .or_default()
                .push(i);
        }
        let services: Vec<(&'a ObjectKey, Arc<k8s::Service>)> = parse_all(snap, "Service", out);
        let services_by_name = services
            .iter()
            .enumerate()
            .map(|(i, (k, _))| ((k.namespace.as_str(), k.name.as_str()), i))
            .collect();
        Index {
            namespaces: parse_all::<k8s::Namespace>(snap, "Namespace", out)
                .into_iter()
                .map(|(k, v)| (k.name.as_str(), v))
                .collect(),
            pods,
            pods_by_namespace,
            services,
            services_by_name,
            slices: if with_pods {
                parse_all(snap, "EndpointSlice", out)
            } else {
                Vec::new()
            },
            service_entries: if with_pods {
                parse_all(snap, "ServiceEntry", out)
            } else {
                Vec::new()
            },
            gateways: parse_all::<k8s::Gateway>(snap, "Gateway", out)
                .into_iter()
                .map(|(k, v)| ((k.namespace.clone(), k.name.clone()), v))
                .collect(),
        }
    }

    fn namespace_labels(&self, ns: &str) -> Option<&Labels> {
        self.namespaces.get(ns).map(|n| &n.metadata.labels)
    }

    fn service(&self, ns: &str, name: &str) -> Option<&k8s::Service> {
        let i = *self.services_by_name.get(&(ns, name))?;
        Some(&self.services[i].1)
    }

    /// Pods of one namespace, in key order.
    fn pods_in<'s>(
        &'s self,
        ns: &str,
    ) -> impl Iterator<Item = &'s (&'a ObjectKey, Arc<k8s::Pod>)> + 's {
        self.pods_by_namespace
            .get(ns)
            .into_iter()
            .flatten()
            .map(|&i| &self.pods[i])
    }
}

/// Who asks for a waypoint.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WaypointUser {
    Service,
    Workload,
}

impl Index<'_> {
    /// The waypoint an object uses (see the module docs for the rules).
    fn waypoint(
        &self,
        namespace: &str,
        labels: &Labels,
        user: WaypointUser,
        network: &str,
    ) -> Option<pb::GatewayAddress> {
        if labels.contains_key(GATEWAY_NAME_LABEL) || labels.contains_key(GATEWAY_MANAGED_LABEL) {
            return None;
        }
        let (source, explicit) = if labels.contains_key(USE_WAYPOINT) {
            (labels, true)
        } else {
            (self.namespace_labels(namespace)?, false)
        };
        let name = source.get(USE_WAYPOINT)?;
        if name.is_empty() || name == "none" {
            return None;
        }
        let wp_ns = source
            .get(USE_WAYPOINT_NAMESPACE)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or(namespace);
        let allowed = match self.gateways.get(&(wp_ns.to_string(), name.clone())) {
            Some(gw) => {
                let waypoint_for = gw
                    .metadata
                    .labels
                    .get(WAYPOINT_FOR)
                    .map(String::as_str)
                    .unwrap_or("service");
                match user {
                    WaypointUser::Service => matches!(waypoint_for, "service" | "all"),
                    WaypointUser::Workload => matches!(waypoint_for, "workload" | "all"),
                }
            }
            None => user == WaypointUser::Service || explicit,
        };
        if !allowed {
            return None;
        }
        // The waypoint's VIP when its Service is known (what istiod sends), else its hostname.
        let vip = self
            .service(wp_ns, name)
            .and_then(|s| cluster_ips(&s.spec).into_iter().next());
        let destination = match vip {
            Some(ip) => pb::gateway_address::Destination::Address(pb::NetworkAddress {
                network: network.to_string(),
                address: ip_bytes(ip),
                length: None,
            }),
            None => pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
                namespace: wp_ns.to_string(),
                hostname: service_hostname(name, wp_ns),
            }),
        };
        Some(pb::GatewayAddress {
            destination: Some(destination),
            hbone_mtls_port: WAYPOINT_HBONE_PORT,
        })
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The service's cluster IPs (none for headless services); unparsable entries are skipped
/// here and reported by [`translate_service`].
fn cluster_ips(spec: &k8s::ServiceSpec) -> Vec<IpAddr> {
    let list: Vec<&String> = if spec.cluster_ips.is_empty() {
        vec![&spec.cluster_ip]
    } else {
        spec.cluster_ips.iter().collect()
    };
    list.into_iter()
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .collect()
}

fn port_u32(p: i64) -> Option<u32> {
    u32::try_from(p).ok().filter(|p| (1..=65535).contains(p))
}

/// Pod `(namespace, name)` → the services it backs (`ns/hostname` → resolved ports).
pub type Backs = HashMap<(String, String), BTreeMap<String, Vec<pb::Port>>>;

/// A pod workload's resource name.
pub fn pod_uid(opts: &TranslateOptions, key: &ObjectKey) -> String {
    format!("{}//v1/Pod/{}/{}", opts.cluster_id, key.namespace, key.name)
}

/// Translate all addresses into `out`. Returns which services each pod backs, so that
/// [`translate_pods`] can later re-translate single pods against the same rest.
pub fn translate(
    snap: &Snapshot,
    opts: &TranslateOptions,
    bindings: &Bindings,
    out: &mut Translated,
) -> Backs {
    let idx = Index::build(snap, out);
    let mut addresses: BTreeMap<String, pb::Address> = BTreeMap::new();
    // Pod (ns, name) → services it backs.
    let mut backs: Backs = HashMap::new();
    // Non-pod endpoints (uid → workload).
    let mut extra_workloads: BTreeMap<String, pb::Workload> = BTreeMap::new();

    for (key, svc) in &idx.services {
        translate_service(
            &idx,
            opts,
            key,
            svc,
            &mut addresses,
            &mut backs,
            &mut extra_workloads,
            out,
        );
    }
    for (key, se) in &idx.service_entries {
        translate_service_entry(
            &idx,
            opts,
            key,
            se,
            &mut addresses,
            &mut backs,
            &mut extra_workloads,
            out,
        );
    }
    for (key, pod) in &idx.pods {
        if let Some(w) = translate_pod(&idx, opts, key, pod, &backs, bindings, out) {
            addresses.insert(
                w.uid.clone(),
                pb::Address {
                    r#type: Some(pb::address::Type::Workload(w)),
                },
            );
        }
    }
    for (uid, w) in extra_workloads {
        // A pod's uid can't collide with these (different uid shapes).
        addresses.insert(
            uid,
            pb::Address {
                r#type: Some(pb::address::Type::Workload(w)),
            },
        );
    }
    for (name, address) in addresses {
        out.resources
            .entry(zmesh_proto::ADDRESS_TYPE_URL.to_string())
            .or_default()
            .insert(
                name,
                prost_types::Any {
                    type_url: zmesh_proto::ADDRESS_TYPE_URL.to_string(),
                    value: encode_address(address),
                },
            );
    }
    backs
}

/// Re-translate only the pods `keys` of `snap`, given the `backs` and `bindings` of an earlier
/// full translation that are still valid for them (the caller checks that nothing they depend
/// on changed: see [`super::incremental`]). Returns each pod's uid and its encoded Address, or
/// `None` when the pod is not a workload (no IP, finished). Errors about these pods go to `out`.
pub fn translate_pods(
    snap: &Snapshot,
    opts: &TranslateOptions,
    backs: &Backs,
    bindings: &Bindings,
    keys: &[&ObjectKey],
    out: &mut Translated,
) -> Vec<(String, Option<Vec<u8>>)> {
    // Parse errors of other objects were reported by the full translation; drop them here.
    let idx = Index::build_parts(snap, &mut Translated::default(), false);
    keys.iter()
        .map(|key| {
            let address = match snap.parsed::<k8s::Pod>(key) {
                Some(Ok(pod)) => translate_pod(&idx, opts, key, &pod, backs, bindings, out),
                _ => None,
            };
            let address = address.map(|w| {
                encode_address(pb::Address {
                    r#type: Some(pb::address::Type::Workload(w)),
                })
            });
            (pod_uid(opts, key), address)
        })
        .collect()
}

/// Encode an Address with its workload's `services` map in key order. prost keeps protobuf
/// maps in a `HashMap`, whose iteration order (and so the encoding) changes from run to run;
/// the xDS layer compares encodings to find changed resources, so the same input must give
/// the same bytes. Protobuf decoders merge repeated occurrences of a message field, so the
/// workload is encoded without its services, then once per service entry, in order.
fn encode_address(mut address: pb::Address) -> Vec<u8> {
    use prost::Message;
    let services = match &mut address.r#type {
        Some(pb::address::Type::Workload(w)) if w.services.len() > 1 => {
            std::mem::take(&mut w.services)
        }
        _ => return address.encode_to_vec(),
    };
    let mut buf = address.encode_to_vec();
    let mut sorted: Vec<_> = services.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, ports) in sorted {
        let part = pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                services: [(key, ports)].into_iter().collect(),
                ..Default::default()
            })),
        };
        buf.extend(part.encode_to_vec());
    }
    buf
}

/// Resolve a service port's `targetPort` against a pod's containers (Istio's `FindPort`):
/// a number as is, unset/0 = the service port, a name looked up among container ports of the
/// same protocol. `None`: the name is not found; that port is left out for this pod.
fn resolve_target_port(sp: &k8s::ServicePort, pod: &k8s::Pod) -> Option<u32> {
    match &sp.target_port {
        None | Some(IntOrString::Int(0)) => port_u32(sp.port),
        Some(IntOrString::Int(n)) => port_u32(*n),
        Some(IntOrString::String(name)) => {
            let proto = sp.protocol.as_deref().unwrap_or("TCP");
            pod.spec
                .containers
                .iter()
                .flat_map(|c| &c.ports)
                .find(|cp| cp.name == *name && cp.protocol.as_deref().unwrap_or("TCP") == proto)
                .and_then(|cp| port_u32(cp.container_port))
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn translate_service(
    idx: &Index,
    opts: &TranslateOptions,
    key: &ObjectKey,
    svc: &k8s::Service,
    addresses: &mut BTreeMap<String, pb::Address>,
    backs: &mut Backs,
    extra: &mut BTreeMap<String, pb::Workload>,
    out: &mut Translated,
) {
    let spec = &svc.spec;
    if spec.type_.as_deref() == Some("ExternalName") {
        // A DNS alias: no VIP, no endpoints, nothing for ztunnel.
        return;
    }
    let hostname = service_hostname(&key.name, &key.namespace);
    let svc_key = format!("{}/{hostname}", key.namespace);

    let mut vips = Vec::new();
    let listed: Vec<(String, &String)> = if spec.cluster_ips.is_empty() {
        vec![("spec.clusterIP".to_string(), &spec.cluster_ip)]
    } else {
        spec.cluster_ips
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("spec.clusterIPs[{i}]"), s))
            .collect()
    };
    for (field, s) in listed {
        if s.is_empty() || s == "None" {
            continue;
        }
        match s.parse::<IpAddr>() {
            Ok(ip) => vips.push(pb::NetworkAddress {
                network: opts.network.clone(),
                address: ip_bytes(ip),
                length: None,
            }),
            Err(_) => out.error(
                key,
                field,
                format!("invalid IP address {s:?}; address left out"),
            ),
        }
    }

    let mut ports = Vec::new();
    let mut valid_ports = Vec::new();
    for (i, sp) in spec.ports.iter().enumerate() {
        let Some(port) = port_u32(sp.port) else {
            out.error(
                key,
                format!("spec.ports[{i}].port"),
                format!("invalid port {} (expected 1-65535); port left out", sp.port),
            );
            continue;
        };
        let target = match &sp.target_port {
            None | Some(IntOrString::Int(0)) => port,
            Some(IntOrString::Int(n)) => match port_u32(*n) {
                Some(t) => t,
                None => {
                    out.error(
                        key,
                        format!("spec.ports[{i}].targetPort"),
                        format!("invalid port {n} (expected 1-65535); port left out"),
                    );
                    continue;
                }
            },
            // Named: resolved per workload (0 tells ztunnel to use the workload's mapping).
            Some(IntOrString::String(_)) => 0,
        };
        ports.push(pb::Port {
            service_port: port,
            target_port: target,
            app_protocol: 0,
        });
        valid_ports.push(sp);
    }

    // Endpoints.
    match spec.selector.as_ref().filter(|s| !s.is_empty()) {
        Some(selector) => {
            for (pk, pod) in idx.pods_in(&key.namespace) {
                if !k8s::selector_matches(selector, &pod.metadata.labels) {
                    continue;
                }
                let pl: Vec<pb::Port> = valid_ports
                    .iter()
                    .filter_map(|sp| {
                        Some(pb::Port {
                            service_port: port_u32(sp.port)?,
                            target_port: resolve_target_port(sp, pod)?,
                            app_protocol: 0,
                        })
                    })
                    .collect();
                backs
                    .entry((pk.namespace.clone(), pk.name.clone()))
                    .or_default()
                    .insert(svc_key.clone(), pl);
            }
        }
        None => endpoint_slices(idx, opts, key, &svc_key, &valid_ports, backs, extra),
    }

    let service = pb::Service {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        hostname,
        addresses: vips,
        ports,
        waypoint: idx.waypoint(
            &key.namespace,
            &svc.metadata.labels,
            WaypointUser::Service,
            &opts.network,
        ),
        ..Default::default()
    };
    addresses.insert(
        svc_key,
        pb::Address {
            r#type: Some(pb::address::Type::Service(service)),
        },
    );
}

/// Endpoints of a selector-less service, from the EndpointSlices labelled with its name.
fn endpoint_slices(
    idx: &Index,
    opts: &TranslateOptions,
    key: &ObjectKey,
    svc_key: &str,
    service_ports: &[&k8s::ServicePort],
    backs: &mut Backs,
    extra: &mut BTreeMap<String, pb::Workload>,
) {
    let pod_by_ip: HashMap<String, &ObjectKey> = idx
        .pods_in(&key.namespace)
        .flat_map(|(k, p)| pod_ips(p).into_iter().map(move |ip| (ip.to_string(), *k)))
        .collect();
    for (sk, slice) in &idx.slices {
        if sk.namespace != key.namespace
            || slice.metadata.labels.get("kubernetes.io/service-name") != Some(&key.name)
        {
            continue;
        }
        // Service port ↔ slice port by port name.
        let ports: Vec<pb::Port> = service_ports
            .iter()
            .filter_map(|sp| {
                let ep = slice.ports.iter().find(|p| p.name == sp.name)?;
                Some(pb::Port {
                    service_port: port_u32(sp.port)?,
                    target_port: port_u32(ep.port?)?,
                    app_protocol: 0,
                })
            })
            .collect();
        for ep in &slice.endpoints {
            for addr in &ep.addresses {
                let by_ref = ep
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind == "Pod")
                    .map(|r| (key.namespace.clone(), r.name.clone()));
                let pod = by_ref.or_else(|| {
                    pod_by_ip
                        .get(addr)
                        .map(|k| (k.namespace.clone(), k.name.clone()))
                });
                if let Some(pod) = pod {
                    backs
                        .entry(pod)
                        .or_default()
                        .insert(svc_key.to_string(), ports.clone());
                    continue;
                }
                let Ok(ip) = addr.parse::<IpAddr>() else {
                    // FQDN slices: nothing ztunnel can address.
                    continue;
                };
                let uid = format!(
                    "{}/discovery.k8s.io/EndpointSlice/{}/{}/{addr}",
                    opts.cluster_id, sk.namespace, sk.name
                );
                let w = extra.entry(uid.clone()).or_insert_with(|| pb::Workload {
                    uid,
                    name: key.name.clone(),
                    namespace: key.namespace.clone(),
                    addresses: vec![ip_bytes(ip)],
                    network: opts.network.clone(),
                    trust_domain: opts.trust_domain.clone(),
                    service_account: "default".into(),
                    node: ep.node_name.clone(),
                    canonical_name: key.name.clone(),
                    canonical_revision: "latest".into(),
                    workload_name: key.name.clone(),
                    workload_type: pb::WorkloadType::Pod as i32,
                    cluster_id: opts.cluster_id.clone(),
                    status: if ep.conditions.ready == Some(false) {
                        pb::WorkloadStatus::Unhealthy as i32
                    } else {
                        pb::WorkloadStatus::Healthy as i32
                    },
                    ..Default::default()
                });
                w.services.insert(
                    svc_key.to_string(),
                    pb::PortList {
                        ports: ports.clone(),
                    },
                );
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn translate_service_entry(
    idx: &Index,
    opts: &TranslateOptions,
    key: &ObjectKey,
    se: &k8s::ServiceEntry,
    addresses: &mut BTreeMap<String, pb::Address>,
    backs: &mut Backs,
    extra: &mut BTreeMap<String, pb::Workload>,
    out: &mut Translated,
) {
    let spec = &se.spec;
    // Validate everything first: one bad field skips the whole entry, naming the field.
    let mut vips = Vec::new();
    for (i, a) in spec.addresses.iter().enumerate() {
        let parsed = if a.contains('/') {
            a.parse::<IpNet>()
                .ok()
                .map(|n| (n.addr(), Some(u32::from(n.prefix_len()))))
        } else {
            a.parse::<IpAddr>().ok().map(|ip| (ip, None))
        };
        match parsed {
            Some((ip, length)) => vips.push(pb::NetworkAddress {
                network: opts.network.clone(),
                address: ip_bytes(ip),
                // A single address is sent without a length, as istiod does.
                length: length.filter(|l| *l != if ip.is_ipv4() { 32 } else { 128 }),
            }),
            None => {
                out.error(
                    key,
                    format!("spec.addresses[{i}]"),
                    format!("invalid IP address or CIDR {a:?}; ServiceEntry skipped"),
                );
                return;
            }
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let Some(number) = port_u32(p.number) else {
            out.error(
                key,
                format!("spec.ports[{i}].number"),
                format!(
                    "invalid port {} (expected 1-65535); ServiceEntry skipped",
                    p.number
                ),
            );
            return;
        };
        let target = match p.target_port {
            None | Some(0) => number,
            Some(t) => match port_u32(t) {
                Some(t) => t,
                None => {
                    out.error(
                        key,
                        format!("spec.ports[{i}].targetPort"),
                        format!("invalid port {t} (expected 1-65535); ServiceEntry skipped"),
                    );
                    return;
                }
            },
        };
        ports.push((p, number, target));
    }
    if spec.hosts.is_empty() {
        out.error(
            key,
            "spec.hosts",
            "must list at least one host; ServiceEntry skipped",
        );
        return;
    }
    let service_ports: Vec<pb::Port> = ports
        .iter()
        .map(|(_, number, target)| pb::Port {
            service_port: *number,
            target_port: *target,
            app_protocol: 0,
        })
        .collect();
    let waypoint = idx.waypoint(
        &key.namespace,
        &se.metadata.labels,
        WaypointUser::Service,
        &opts.network,
    );

    let mut keys = Vec::new();
    for (i, host) in spec.hosts.iter().enumerate() {
        let svc_key = format!("{}/{host}", key.namespace);
        if addresses.contains_key(&svc_key) {
            out.error(
                key,
                format!("spec.hosts[{i}]"),
                format!("host {host:?} is already defined in namespace {} by another Service or ServiceEntry; host skipped", key.namespace),
            );
            continue;
        }
        addresses.insert(
            svc_key.clone(),
            pb::Address {
                r#type: Some(pb::address::Type::Service(pb::Service {
                    name: key.name.clone(),
                    namespace: key.namespace.clone(),
                    hostname: host.clone(),
                    addresses: vips.clone(),
                    ports: service_ports.clone(),
                    subject_alt_names: spec.subject_alt_names.clone(),
                    waypoint: waypoint.clone(),
                    ..Default::default()
                })),
            },
        );
        keys.push(svc_key);
    }

    // Endpoints: selected pods, or inline endpoints.
    if let Some(sel) = spec.workload_selector.as_ref() {
        for (pk, _) in idx
            .pods_in(&key.namespace)
            .filter(|(_, p)| k8s::selector_matches(&sel.labels, &p.metadata.labels))
        {
            let entry = backs
                .entry((pk.namespace.clone(), pk.name.clone()))
                .or_default();
            for k in &keys {
                entry.insert(k.clone(), service_ports.clone());
            }
        }
        return;
    }
    for (i, ep) in spec.endpoints.iter().enumerate() {
        let Ok(ip) = ep.address.parse::<IpAddr>() else {
            // DNS names (resolution: DNS) are resolved by the client, not sent as workloads.
            tracing::debug!(object = %key, endpoint = i, "ServiceEntry endpoint is not an IP; not a workload");
            continue;
        };
        let ep_ports: Vec<pb::Port> = ports
            .iter()
            .map(|(p, number, target)| pb::Port {
                service_port: *number,
                target_port: ep
                    .ports
                    .get(&p.name)
                    .and_then(|t| port_u32(*t))
                    .unwrap_or(*target),
                app_protocol: 0,
            })
            .collect();
        let uid = format!(
            "{}/networking.istio.io/ServiceEntry/{}/{}/{}",
            opts.cluster_id, key.namespace, key.name, ep.address
        );
        let (canonical_name, canonical_revision) = canonical(&ep.labels, &key.name);
        let w = extra.entry(uid.clone()).or_insert_with(|| pb::Workload {
            uid,
            name: key.name.clone(),
            namespace: key.namespace.clone(),
            addresses: vec![ip_bytes(ip)],
            network: if ep.network.is_empty() {
                opts.network.clone()
            } else {
                ep.network.clone()
            },
            trust_domain: opts.trust_domain.clone(),
            service_account: if ep.service_account.is_empty() {
                "default".into()
            } else {
                ep.service_account.clone()
            },
            canonical_name,
            canonical_revision,
            workload_name: key.name.clone(),
            workload_type: pb::WorkloadType::Pod as i32,
            cluster_id: opts.cluster_id.clone(),
            ..Default::default()
        });
        for k in &keys {
            w.services.insert(
                k.clone(),
                pb::PortList {
                    ports: ep_ports.clone(),
                },
            );
        }
    }
}

/// The pod's IPs (status.podIPs, else status.podIP); unparsable ones are left out.
pub(super) fn pod_ips(pod: &k8s::Pod) -> Vec<IpAddr> {
    let listed: Vec<&str> = if pod.status.pod_ips.is_empty() {
        vec![pod.status.pod_ip.as_str()]
    } else {
        pod.status.pod_ips.iter().map(|p| p.ip.as_str()).collect()
    };
    listed
        .into_iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Istio's canonical service labels, with defaults.
fn canonical(labels: &Labels, fallback_name: &str) -> (String, String) {
    let first = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()).cloned())
    };
    (
        first(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| fallback_name.to_string()),
        first(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".to_string()),
    )
}

/// Workload name and type from the pod's controller (Istio's `GetDeployMetaFromPod`).
fn workload_name_type(pod: &k8s::Pod) -> (String, pb::WorkloadType) {
    let owners = &pod.metadata.owner_references;
    let owner = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first());
    let Some(owner) = owner.filter(|o| !o.name.is_empty()) else {
        return (pod.metadata.name.clone(), pb::WorkloadType::Pod);
    };
    match owner.kind.as_str() {
        "ReplicaSet" => {
            // A Deployment's ReplicaSet is `<deployment>-<pod-template-hash>`.
            let hash = pod.metadata.labels.get("pod-template-hash");
            match hash.and_then(|h| owner.name.strip_suffix(&format!("-{h}"))) {
                Some(deployment) => (deployment.to_string(), pb::WorkloadType::Deployment),
                None => (owner.name.clone(), pb::WorkloadType::Pod),
            }
        }
        "Job" => match CRONJOB_JOB_NAME.captures(&owner.name) {
            Some(c) => (c[1].to_string(), pb::WorkloadType::Cronjob),
            None => (owner.name.clone(), pb::WorkloadType::Job),
        },
        _ => (owner.name.clone(), pb::WorkloadType::Pod),
    }
}

fn pod_healthy(pod: &k8s::Pod) -> bool {
    if pod.status.phase.as_deref().is_some_and(|p| p != "Running") {
        return false;
    }
    match &pod.status.conditions {
        Some(conds) => conds
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        None => true,
    }
}

fn translate_pod(
    idx: &Index,
    opts: &TranslateOptions,
    key: &ObjectKey,
    pod: &k8s::Pod,
    backs: &Backs,
    bindings: &Bindings,
    out: &mut Translated,
) -> Option<pb::Workload> {
    // A finished pod's IP may already belong to a new pod: it is not a workload any more.
    if matches!(pod.status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let ips = pod_ips(pod);
    if ips.is_empty() {
        if !pod.status.pod_ip.is_empty() || !pod.status.pod_ips.is_empty() {
            out.error(
                key,
                "status.podIP",
                format!("invalid IP address {:?}; pod skipped", pod.status.pod_ip),
            );
        }
        // No IP yet (pending): nothing to address.
        return None;
    }
    let labels = &pod.metadata.labels;
    let ns_mode = idx
        .namespace_labels(&key.namespace)
        .and_then(|l| l.get(DATAPLANE_MODE));
    let enrolled = match labels.get(DATAPLANE_MODE).map(String::as_str) {
        Some("none") => false,
        Some("ambient") => true,
        _ => ns_mode.is_some_and(|m| m == "ambient"),
    };
    // Host-network pods share the node's network namespace: they cannot be captured.
    let hbone = enrolled && !pod.spec.host_network;
    let (workload_name, workload_type) = workload_name_type(pod);
    let (canonical_name, canonical_revision) = canonical(labels, &workload_name);
    let service_account = [&pod.spec.service_account_name, &pod.spec.service_account]
        .into_iter()
        .find(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| "default".into());
    let pod_key = (key.namespace.clone(), key.name.clone());
    let services = backs
        .get(&pod_key)
        .map(|m| {
            m.iter()
                .map(|(k, ports)| {
                    (
                        k.clone(),
                        pb::PortList {
                            ports: ports.clone(),
                        },
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Some(pb::Workload {
        uid: pod_uid(opts, key),
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        addresses: ips.into_iter().map(ip_bytes).collect(),
        network: opts.network.clone(),
        tunnel_protocol: if hbone {
            pb::TunnelProtocol::Hbone
        } else {
            pb::TunnelProtocol::None
        } as i32,
        trust_domain: opts.trust_domain.clone(),
        service_account,
        waypoint: if hbone {
            idx.waypoint(
                &key.namespace,
                labels,
                WaypointUser::Workload,
                &opts.network,
            )
        } else {
            None
        },
        node: pod.spec.node_name.clone(),
        canonical_name,
        canonical_revision,
        workload_type: workload_type as i32,
        workload_name,
        services,
        authorization_policies: bindings
            .get(&pod_key)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default(),
        status: if pod_healthy(pod) {
            pb::WorkloadStatus::Healthy
        } else {
            pb::WorkloadStatus::Unhealthy
        } as i32,
        cluster_id: opts.cluster_id.clone(),
        network_mode: if pod.spec.host_network {
            pb::NetworkMode::HostNetwork
        } else {
            pb::NetworkMode::Standard
        } as i32,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> k8s::Pod {
        k8s::parse(&v).unwrap()
    }

    #[test]
    fn workload_names_from_owners() {
        let p = pod(json!({"metadata": {"name": "reviews-v1-7d9f-abcde",
            "labels": {"pod-template-hash": "7d9f"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": "reviews-v1-7d9f", "controller": true}]}}));
        assert_eq!(
            workload_name_type(&p),
            ("reviews-v1".to_string(), pb::WorkloadType::Deployment)
        );
        let p = pod(json!({"metadata": {"name": "backup-28930140-x",
            "ownerReferences": [{"kind": "Job", "name": "backup-28930140"}]}}));
        assert_eq!(
            workload_name_type(&p),
            ("backup".to_string(), pb::WorkloadType::Cronjob)
        );
        let p = pod(json!({"metadata": {"name": "db-0",
            "ownerReferences": [{"kind": "StatefulSet", "name": "db"}]}}));
        assert_eq!(
            workload_name_type(&p),
            ("db".to_string(), pb::WorkloadType::Pod)
        );
        let p = pod(json!({"metadata": {"name": "lonely"}}));
        assert_eq!(
            workload_name_type(&p),
            ("lonely".to_string(), pb::WorkloadType::Pod)
        );
    }

    #[test]
    fn encoding_is_deterministic() {
        use prost::Message;
        let services: HashMap<String, pb::PortList> = (0..20)
            .map(|i| (format!("ns/svc{i}"), pb::PortList::default()))
            .collect();
        let address = pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: "u".into(),
                services,
                ..Default::default()
            })),
        };
        let first = encode_address(address.clone());
        for _ in 0..5 {
            // A fresh HashMap (new random seed) each time.
            let mut copy = address.clone();
            if let Some(pb::address::Type::Workload(w)) = &mut copy.r#type {
                w.services = w.services.clone().into_iter().collect();
            }
            assert_eq!(encode_address(copy), first);
        }
        assert_eq!(pb::Address::decode(first.as_slice()).unwrap(), address);
    }

    #[test]
    fn health() {
        assert!(pod_healthy(&pod(json!({"status": {"podIP": "10.0.0.1"}}))));
        assert!(!pod_healthy(&pod(json!({"status": {"phase": "Pending"}}))));
        assert!(!pod_healthy(&pod(
            json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}})
        )));
        assert!(pod_healthy(&pod(
            json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
        )));
    }

    #[test]
    fn named_target_ports() {
        let p = pod(json!({"spec": {"containers": [{"name": "c", "ports": [
            {"name": "http", "containerPort": 8080},
            {"name": "dns", "containerPort": 5353, "protocol": "UDP"}]}]}}));
        let sp = |t: serde_json::Value| -> k8s::ServicePort {
            k8s::parse(&json!({"port": 80, "targetPort": t})).unwrap()
        };
        assert_eq!(resolve_target_port(&sp(json!("http")), &p), Some(8080));
        assert_eq!(
            resolve_target_port(&sp(json!("dns")), &p),
            None,
            "protocol must match"
        );
        assert_eq!(resolve_target_port(&sp(json!(9090)), &p), Some(9090));
        assert_eq!(resolve_target_port(&sp(json!(0)), &p), Some(80));
    }
}
