//! Local YAML configuration: a [`ConfigSource`] reading workloads, services, policies and
//! PeerAuthentications from a file, close to Istio's `LOCAL_XDS` format (camelCase fields).
//!
//! ```yaml
//! workloads:
//! - uid: cluster1//v1/Pod/default/sleep   # default: <clusterId|Kubernetes>//v1/Pod/<ns>/<name>
//!   name: sleep
//!   namespace: default
//!   serviceAccount: sleep                 # default: default
//!   trustDomain: cluster.local            # default: cluster.local
//!   workloadIps: ["10.0.0.1"]
//!   protocol: HBONE                       # HBONE | TCP (default TCP = NONE)
//!   node: node1
//!   network: ""
//!   canonicalName: sleep                  # default: name
//!   canonicalRevision: v1                 # default: latest
//!   workloadName: sleep                   # default: name
//!   workloadType: deployment              # deployment | cronjob | pod | job
//!   clusterId: cluster1
//!   services: {"default/echo.default.svc.cluster.local": {80: 8080}}
//!   authorizationPolicies: ["default/allow-sleep"]
//!   healthy: true                         # default: true
//!   waypoint: {hostname: "default/waypoint.default.svc.cluster.local", hbonePort: 15008}
//!   # also networkGateway (same shape, or {address: "net/ip"}), applicationTunnel {protocol: PROXY, port: 15088}
//! services:
//! - name: echo
//!   namespace: default
//!   hostname: echo.default.svc.cluster.local   # default: <name>.<namespace>.svc.cluster.local
//!   vips: ["10.96.0.1", "net1/10.96.0.2"]      # "ip" or "network/ip"
//!   ports: {80: 8080}
//!   subjectAltNames: ["spiffe://cluster.local/ns/default/sa/echo"]
//! policies:
//! - name: allow-sleep
//!   namespace: default
//!   scope: Namespace          # Global | Namespace | WorkloadSelector (default Namespace)
//!   action: Allow             # Allow | Deny (required)
//!   dryRun: false
//!   rules:                    # rules[rule][clause][match]
//!   - - - principals: [{exact: "cluster.local/ns/default/sa/sleep"}]
//!         destinationPorts: [8080]
//!       - sourceIps: ["10.0.0.0/8"]
//! peerAuthentications:
//! - {name: default, namespace: istio-system, mode: STRICT}   # STRICT | PERMISSIVE | DISABLE
//! ```
//!
//! String matches are `{exact: s}`, `{prefix: s}`, `{suffix: s}`, `{presence: {}}`, or a plain
//! string in AuthorizationPolicy syntax: `"*"` = presence, `"x*"` = prefix, `"*x"` = suffix,
//! anything else exact. A service account match without `namespace` uses the policy's.
//! A STRICT PeerAuthentication becomes [`Policy::strict_mtls`] named
//! `converted_peer_authentication_<name>`, namespace-scoped, or global when its namespace is ""
//! or [`ROOT_NAMESPACE`]; PERMISSIVE and DISABLE produce nothing.
//!
//! Each object is validated on its own: an invalid one is reported (naming the file, its
//! section and index, and the field) and skipped, the rest applies. On a reload, an invalid
//! object whose key can still be read keeps its last good version instead of disappearing.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::Notify;

use super::store::ROOT_NAMESPACE;
use super::workload::{
    ApplicationTunnel, ApplicationTunnelProtocol, GatewayAddress, GatewayDestination, PortMapping,
    TunnelProtocol, Workload,
};
use super::{
    ApplyOutcome, Clause, ConfigSource, FieldError, Match, PEER_AUTHENTICATION_PREFIX, Policy,
    PolicyAction, PolicyScope, Rule, Service, ServiceAccountMatch, StateError, StateStore,
    StateUpdate, StringMatch,
};

/// Istio's default cluster id, used in default workload uids.
const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
const DEFAULT_HBONE_PORT: u16 = 15008;

// ---- the file format ----

/// Top level; the sections stay untyped here so one bad object cannot fail the whole file.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawFile {
    workloads: Option<Vec<Value>>,
    services: Option<Vec<Value>>,
    policies: Option<Vec<Value>>,
    peer_authentications: Option<Vec<Value>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalWorkload {
    #[serde(default)]
    uid: String,
    name: String,
    namespace: String,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    trust_domain: String,
    #[serde(default)]
    workload_ips: Vec<String>,
    #[serde(default)]
    protocol: LocalProtocol,
    #[serde(default)]
    node: String,
    #[serde(default)]
    network: String,
    #[serde(default)]
    canonical_name: String,
    #[serde(default)]
    canonical_revision: String,
    #[serde(default)]
    workload_name: String,
    #[serde(default)]
    workload_type: String,
    #[serde(default)]
    cluster_id: String,
    #[serde(default)]
    services: BTreeMap<String, BTreeMap<u16, u16>>,
    #[serde(default)]
    authorization_policies: Vec<String>,
    #[serde(default)]
    healthy: Option<bool>,
    #[serde(default)]
    waypoint: Option<LocalGateway>,
    #[serde(default)]
    network_gateway: Option<LocalGateway>,
    #[serde(default)]
    application_tunnel: Option<LocalAppTunnel>,
}

#[derive(Deserialize, Default, Clone, Copy)]
enum LocalProtocol {
    #[serde(rename = "HBONE")]
    Hbone,
    #[default]
    #[serde(rename = "TCP", alias = "NONE")]
    Tcp,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalGateway {
    /// `ns/hostname`.
    hostname: Option<String>,
    /// `ip` or `network/ip`.
    address: Option<String>,
    hbone_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalAppTunnel {
    #[serde(default)]
    protocol: LocalAppTunnelProtocol,
    port: Option<u16>,
}

#[derive(Deserialize, Default, Clone, Copy)]
enum LocalAppTunnelProtocol {
    #[default]
    #[serde(rename = "NONE")]
    None,
    #[serde(rename = "PROXY")]
    Proxy,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalService {
    name: String,
    namespace: String,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    vips: Vec<String>,
    #[serde(default)]
    ports: BTreeMap<u16, u16>,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    #[serde(default)]
    waypoint: Option<LocalGateway>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalPolicy {
    name: String,
    namespace: String,
    #[serde(default)]
    scope: LocalScope,
    action: LocalAction,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    rules: Vec<Vec<Vec<LocalMatch>>>,
}

#[derive(Deserialize, Default, Clone, Copy)]
enum LocalScope {
    #[serde(alias = "GLOBAL")]
    Global,
    #[default]
    #[serde(alias = "NAMESPACE")]
    Namespace,
    #[serde(alias = "WORKLOAD_SELECTOR")]
    WorkloadSelector,
}

#[derive(Deserialize, Clone, Copy)]
enum LocalAction {
    #[serde(alias = "ALLOW")]
    Allow,
    #[serde(alias = "DENY")]
    Deny,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct LocalMatch {
    namespaces: Vec<Value>,
    not_namespaces: Vec<Value>,
    principals: Vec<Value>,
    not_principals: Vec<Value>,
    service_accounts: Vec<LocalServiceAccount>,
    not_service_accounts: Vec<LocalServiceAccount>,
    source_ips: Vec<String>,
    not_source_ips: Vec<String>,
    destination_ips: Vec<String>,
    not_destination_ips: Vec<String>,
    destination_ports: Vec<u16>,
    not_destination_ports: Vec<u16>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalServiceAccount {
    namespace: Option<String>,
    service_account: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalPeerAuthentication {
    name: String,
    #[serde(default)]
    namespace: String,
    mode: LocalMtlsMode,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
enum LocalMtlsMode {
    #[serde(rename = "STRICT")]
    Strict,
    #[serde(rename = "PERMISSIVE")]
    Permissive,
    #[serde(rename = "DISABLE")]
    Disable,
    #[serde(rename = "UNSET")]
    Unset,
}

// ---- conversions ----

/// Error messages use the file's camelCase names, while shared validation speaks snake_case.
fn camel(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut upper = false;
    for c in field.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn parse_ip(s: &str, field: &str) -> Result<IpAddr, FieldError> {
    s.trim()
        .parse()
        .map_err(|_| FieldError::new(field, format!("{s:?} is not an IP address")))
}

/// `"ip"` or `"network/ip"` (an empty network, `"/ip"`, is allowed).
fn parse_network_ip(s: &str, field: &str) -> Result<(String, IpAddr), FieldError> {
    let (network, ip) = s.split_once('/').unwrap_or(("", s));
    let ip = ip.parse().map_err(|_| {
        FieldError::new(
            field,
            format!("{s:?} is not of the form \"ip\" or \"network/ip\""),
        )
    })?;
    Ok((network.to_string(), ip))
}

fn parse_cidr(s: &str, field: &str) -> Result<IpNet, FieldError> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(FieldError::new(
        field,
        format!("{s:?} is not a CIDR (\"10.0.0.0/8\") or an IP address"),
    ))
}

fn parse_string_match(v: &Value, field: &str) -> Result<StringMatch, FieldError> {
    if let Value::String(s) = v {
        // AuthorizationPolicy syntax, so policies can be copied from Istio resources.
        return Ok(if s == "*" {
            StringMatch::Presence
        } else if let Some(rest) = s.strip_prefix('*') {
            StringMatch::Suffix(rest.to_string())
        } else if let Some(rest) = s.strip_suffix('*') {
            StringMatch::Prefix(rest.to_string())
        } else {
            StringMatch::Exact(s.clone())
        });
    }
    let bad = || {
        FieldError::new(
            field,
            format!(
                "{v} is not a string match: expected a string or one of {{exact: s}}, \
                 {{prefix: s}}, {{suffix: s}}, {{presence: {{}}}}"
            ),
        )
    };
    let Value::Object(map) = v else {
        return Err(bad());
    };
    if map.len() != 1 {
        return Err(bad());
    }
    let Some((kind, val)) = map.iter().next() else {
        return Err(bad());
    };
    let text = || val.as_str().map(str::to_string).ok_or_else(bad);
    match kind.as_str() {
        "exact" => Ok(StringMatch::Exact(text()?)),
        "prefix" => Ok(StringMatch::Prefix(text()?)),
        "suffix" => Ok(StringMatch::Suffix(text()?)),
        "presence" => Ok(StringMatch::Presence),
        _ => Err(bad()),
    }
}

fn gateway(g: &LocalGateway, field: &str) -> Result<GatewayAddress, FieldError> {
    let destination = match (&g.hostname, &g.address) {
        (Some(h), None) => {
            let (namespace, hostname) = super::workload::split_key(h).ok_or_else(|| {
                FieldError::new(
                    format!("{field}.hostname"),
                    format!("{h:?} is not of the form \"namespace/hostname\""),
                )
            })?;
            GatewayDestination::Hostname {
                namespace: namespace.to_string(),
                hostname: hostname.to_string(),
            }
        }
        (None, Some(a)) => {
            let (network, ip) = parse_network_ip(a, &format!("{field}.address"))?;
            GatewayDestination::Address { network, ip }
        }
        _ => {
            return Err(FieldError::new(
                field,
                "needs exactly one of hostname or address",
            ));
        }
    };
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port: g.hbone_port.unwrap_or(DEFAULT_HBONE_PORT),
    })
}

fn default_uid(cluster_id: &str, namespace: &str, name: &str) -> String {
    let cluster = if cluster_id.is_empty() {
        DEFAULT_CLUSTER_ID
    } else {
        cluster_id
    };
    format!("{cluster}//v1/Pod/{namespace}/{name}")
}

fn or_default(s: String, default: &str) -> String {
    if s.is_empty() { default.to_string() } else { s }
}

fn convert_workload(l: LocalWorkload) -> Result<Workload, FieldError> {
    let addresses = l
        .workload_ips
        .iter()
        .enumerate()
        .map(|(i, s)| parse_ip(s, &format!("workloadIps[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let w = Workload {
        uid: if l.uid.is_empty() {
            default_uid(&l.cluster_id, &l.namespace, &l.name)
        } else {
            l.uid
        },
        addresses,
        network: l.network,
        node: l.node,
        protocol: match l.protocol {
            LocalProtocol::Hbone => TunnelProtocol::Hbone,
            LocalProtocol::Tcp => TunnelProtocol::None,
        },
        trust_domain: l.trust_domain,
        // Kubernetes gives every pod the "default" service account unless told otherwise.
        service_account: l.service_account.unwrap_or_else(|| "default".to_string()),
        canonical_name: or_default(l.canonical_name, &l.name),
        canonical_revision: or_default(l.canonical_revision, "latest"),
        workload_name: or_default(l.workload_name, &l.name),
        workload_type: or_default(l.workload_type, "deployment"),
        cluster_id: l.cluster_id,
        services: l
            .services
            .into_iter()
            .map(|(k, ports)| {
                let ports = ports
                    .into_iter()
                    .map(|(s, t)| PortMapping::new(s, t))
                    .collect();
                (k, ports)
            })
            .collect(),
        authorization_policies: l.authorization_policies,
        healthy: l.healthy.unwrap_or(true),
        waypoint: l
            .waypoint
            .as_ref()
            .map(|g| gateway(g, "waypoint"))
            .transpose()?,
        network_gateway: l
            .network_gateway
            .as_ref()
            .map(|g| gateway(g, "networkGateway"))
            .transpose()?,
        application_tunnel: l.application_tunnel.map(|t| ApplicationTunnel {
            protocol: match t.protocol {
                LocalAppTunnelProtocol::None => ApplicationTunnelProtocol::None,
                LocalAppTunnelProtocol::Proxy => ApplicationTunnelProtocol::Proxy,
            },
            port: t.port,
        }),
        name: l.name,
        namespace: l.namespace,
    };
    w.validate_fields()
        .map_err(|e| FieldError::new(camel(&e.field), e.reason))?;
    Ok(w)
}

fn default_hostname(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.svc.cluster.local")
}

fn convert_service(l: LocalService) -> Result<Service, FieldError> {
    let vips = l
        .vips
        .iter()
        .enumerate()
        .map(|(i, s)| parse_network_ip(s, &format!("vips[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let s = Service {
        hostname: l
            .hostname
            .unwrap_or_else(|| default_hostname(&l.name, &l.namespace)),
        vips,
        ports: l
            .ports
            .into_iter()
            .map(|(s, t)| PortMapping::new(s, t))
            .collect(),
        subject_alt_names: l.subject_alt_names,
        waypoint: l
            .waypoint
            .as_ref()
            .map(|g| gateway(g, "waypoint"))
            .transpose()?,
        name: l.name,
        namespace: l.namespace,
    };
    s.validate_fields()
        .map_err(|e| FieldError::new(camel(&e.field), e.reason))?;
    Ok(s)
}

fn convert_match(l: &LocalMatch, policy_ns: &str, field: &str) -> Result<Match, FieldError> {
    let strings = |list: &[Value], name: &str| -> Result<Vec<StringMatch>, FieldError> {
        list.iter()
            .enumerate()
            .map(|(i, v)| parse_string_match(v, &format!("{field}.{name}[{i}]")))
            .collect()
    };
    let cidrs = |list: &[String], name: &str| -> Result<Vec<IpNet>, FieldError> {
        list.iter()
            .enumerate()
            .map(|(i, s)| parse_cidr(s, &format!("{field}.{name}[{i}]")))
            .collect()
    };
    let sas = |list: &[LocalServiceAccount]| -> Vec<ServiceAccountMatch> {
        list.iter()
            .map(|s| ServiceAccountMatch {
                namespace: s.namespace.clone().unwrap_or_else(|| policy_ns.to_string()),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    Ok(Match {
        namespaces: strings(&l.namespaces, "namespaces")?,
        not_namespaces: strings(&l.not_namespaces, "notNamespaces")?,
        principals: strings(&l.principals, "principals")?,
        not_principals: strings(&l.not_principals, "notPrincipals")?,
        service_accounts: sas(&l.service_accounts),
        not_service_accounts: sas(&l.not_service_accounts),
        source_ips: cidrs(&l.source_ips, "sourceIps")?,
        not_source_ips: cidrs(&l.not_source_ips, "notSourceIps")?,
        destination_ips: cidrs(&l.destination_ips, "destinationIps")?,
        not_destination_ips: cidrs(&l.not_destination_ips, "notDestinationIps")?,
        destination_ports: l.destination_ports.clone(),
        not_destination_ports: l.not_destination_ports.clone(),
    })
}

fn convert_policy(l: LocalPolicy) -> Result<Policy, FieldError> {
    let mut rules = Vec::with_capacity(l.rules.len());
    for (ri, r) in l.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(r.len());
        for (ci, c) in r.iter().enumerate() {
            let matches = c
                .iter()
                .enumerate()
                .map(|(mi, m)| convert_match(m, &l.namespace, &format!("rules[{ri}][{ci}][{mi}]")))
                .collect::<Result<Vec<_>, _>>()?;
            clauses.push(Clause { matches });
        }
        rules.push(Rule { clauses });
    }
    if l.name.is_empty() {
        return Err(FieldError::new("name", "must not be empty"));
    }
    Ok(Policy {
        name: l.name,
        namespace: l.namespace,
        scope: match l.scope {
            LocalScope::Global => PolicyScope::Global,
            LocalScope::Namespace => PolicyScope::Namespace,
            LocalScope::WorkloadSelector => PolicyScope::WorkloadSelector,
        },
        action: match l.action {
            LocalAction::Allow => PolicyAction::Allow,
            LocalAction::Deny => PolicyAction::Deny,
        },
        dry_run: l.dry_run,
        rules,
    })
}

/// The policy a PeerAuthentication turns into (None: nothing to enforce at L4).
fn convert_peer_authentication(l: LocalPeerAuthentication) -> Result<Option<Policy>, FieldError> {
    if l.name.is_empty() {
        return Err(FieldError::new("name", "must not be empty"));
    }
    if l.mode != LocalMtlsMode::Strict {
        return Ok(None);
    }
    let name = format!("{PEER_AUTHENTICATION_PREFIX}{}", l.name);
    Ok(Some(
        if l.namespace.is_empty() || l.namespace == ROOT_NAMESPACE {
            Policy::strict_mtls(&name, ROOT_NAMESPACE, PolicyScope::Global)
        } else {
            Policy::strict_mtls(&name, &l.namespace, PolicyScope::Namespace)
        },
    ))
}

// ---- object keys read from raw values (for messages and keep-last-good) ----

fn str_field<'a>(v: &'a Value, name: &str) -> &'a str {
    v.get(name).and_then(Value::as_str).unwrap_or("")
}

fn workload_key(v: &Value) -> Option<String> {
    let uid = str_field(v, "uid");
    if !uid.is_empty() {
        return Some(uid.to_string());
    }
    let (ns, name) = (str_field(v, "namespace"), str_field(v, "name"));
    (!ns.is_empty() && !name.is_empty()).then(|| default_uid(str_field(v, "clusterId"), ns, name))
}

fn service_key(v: &Value) -> Option<String> {
    let (ns, name) = (str_field(v, "namespace"), str_field(v, "name"));
    let host = match str_field(v, "hostname") {
        "" if !name.is_empty() => default_hostname(name, ns),
        h => h.to_string(),
    };
    (!ns.is_empty() && !host.is_empty()).then(|| format!("{ns}/{host}"))
}

fn policy_key(v: &Value) -> Option<String> {
    let name = str_field(v, "name");
    (!name.is_empty()).then(|| format!("{}/{}", str_field(v, "namespace"), name))
}

fn peer_authentication_key(v: &Value) -> Option<String> {
    let name = str_field(v, "name");
    let ns = match str_field(v, "namespace") {
        "" => ROOT_NAMESPACE,
        ns => ns,
    };
    (!name.is_empty()).then(|| format!("{ns}/{PEER_AUTHENTICATION_PREFIX}{name}"))
}

// ---- parsing a document ----

/// The result of reading a document leniently.
#[derive(Debug, Default)]
pub struct LocalLoad {
    /// A snapshot (`replace_all`) of every valid object.
    pub update: StateUpdate,
    /// One error per invalid (skipped) object.
    pub errors: Vec<StateError>,
    /// Keys of invalid objects that could still be identified (their last good version is kept
    /// on reload).
    pub invalid_workloads: Vec<String>,
    pub invalid_services: Vec<String>,
    pub invalid_policies: Vec<String>,
}

struct Section<'a> {
    source: &'a str,
    name: &'static str,
    errors: &'a mut Vec<StateError>,
    invalid_keys: &'a mut Vec<String>,
}

impl Section<'_> {
    /// Converts each raw object; failures are recorded with the object's index and name.
    fn convert<L: DeserializeOwned, T>(
        &mut self,
        values: Vec<Value>,
        key: fn(&Value) -> Option<String>,
        convert: impl Fn(L) -> Result<T, FieldError>,
    ) -> Vec<T> {
        let mut out = Vec::with_capacity(values.len());
        for (index, v) in values.into_iter().enumerate() {
            let result = serde_json::from_value::<L>(v.clone())
                .map_err(|e| {
                    let e = e.to_string();
                    // Missing/unknown field errors already name the field.
                    let named = e.starts_with("missing field") || e.starts_with("unknown field");
                    match culprit_field::<L>(&v).filter(|_| !named) {
                        Some(field) => format!("field `{field}`: {e}"),
                        None => e,
                    }
                })
                .and_then(|l| convert(l).map_err(|e| format!("field `{}`: {}", e.field, e.reason)));
            match result {
                Ok(t) => out.push(t),
                Err(message) => {
                    let k = key(&v);
                    self.errors.push(StateError::Object {
                        source_name: self.source.to_string(),
                        section: self.name,
                        index,
                        name: k.clone().unwrap_or_else(|| "unnamed".to_string()),
                        message,
                    });
                    self.invalid_keys.extend(k);
                }
            }
        }
        out
    }
}

/// serde's type errors do not say where they are; find the top-level field that causes it: the
/// one whose removal makes the object parse (or merely complain that it is missing).
fn culprit_field<L: DeserializeOwned>(v: &Value) -> Option<String> {
    let Value::Object(obj) = v else {
        return None;
    };
    obj.keys()
        .find(|k| {
            let mut without = obj.clone();
            without.remove(*k);
            match serde_json::from_value::<L>(Value::Object(without)) {
                Ok(_) => true,
                Err(e) => e.to_string() == format!("missing field `{k}`"),
            }
        })
        .cloned()
}

/// Reads a document: a syntax error (or a wrong top-level shape) is an error, an invalid
/// object is recorded in [`LocalLoad::errors`] and skipped.
fn parse_document(yaml: &str, source: &str) -> Result<LocalLoad, StateError> {
    // An empty (or comment-only) document is an empty configuration, not an error.
    let raw: RawFile = if yaml
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        RawFile::default()
    } else {
        // YAML 1.2 scalars: `namespace: y` or `name: on` stay strings (the objects are first
        // read untyped, so YAML 1.1 booleans would otherwise turn into `true`).
        let options = serde_saphyr::options! {
            strict_booleans: true,
            leading_zero_numbers_as_strings: true,
            underscored_numbers_as_strings: true,
        };
        serde_saphyr::from_str_with_options(yaml, options).map_err(|e| StateError::Syntax {
            source_name: source.to_string(),
            message: e.to_string(),
        })?
    };
    let mut load = LocalLoad::default();
    load.update.replace_all = true;
    let errors = &mut load.errors;

    load.update.upsert_workloads = Section {
        source,
        name: "workloads",
        errors,
        invalid_keys: &mut load.invalid_workloads,
    }
    .convert(
        raw.workloads.unwrap_or_default(),
        workload_key,
        convert_workload,
    );
    load.update.upsert_services = Section {
        source,
        name: "services",
        errors,
        invalid_keys: &mut load.invalid_services,
    }
    .convert(
        raw.services.unwrap_or_default(),
        service_key,
        convert_service,
    );
    let mut policies = Section {
        source,
        name: "policies",
        errors,
        invalid_keys: &mut load.invalid_policies,
    }
    .convert(raw.policies.unwrap_or_default(), policy_key, convert_policy);
    let converted = Section {
        source,
        name: "peerAuthentications",
        errors,
        invalid_keys: &mut load.invalid_policies,
    }
    .convert(
        raw.peer_authentications.unwrap_or_default(),
        peer_authentication_key,
        convert_peer_authentication,
    );
    policies.extend(converted.into_iter().flatten());
    load.update.upsert_policies = policies;
    Ok(load)
}

// ---- the config source ----

/// Asks a running [`LocalConfig`] to re-read its file now.
#[derive(Debug, Clone)]
pub struct Reloader(Arc<Notify>);

impl Reloader {
    pub fn reload(&self) {
        // Stores a permit if the source is busy, so the request is not lost.
        self.0.notify_one();
    }
}

/// A YAML file as configuration source (see the module docs for the format).
#[derive(Debug)]
pub struct LocalConfig {
    path: PathBuf,
    name: String,
    poll_interval: Duration,
    reload: Arc<Notify>,
}

impl LocalConfig {
    /// A source reading `path`, re-read when its modification time or size changes (polled
    /// every second) or when [`Reloader::reload`] is called.
    pub fn from_file(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        LocalConfig {
            name: format!("local file {}", path.display()),
            path,
            poll_interval: Duration::from_secs(1),
            reload: Arc::new(Notify::new()),
        }
    }

    /// Changes how often the file's modification time is checked.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    pub fn reloader(&self) -> Reloader {
        Reloader(Arc::clone(&self.reload))
    }

    /// Parses a YAML document strictly: any invalid object is an error. The update is a
    /// snapshot (`replace_all`).
    #[allow(clippy::should_implement_trait)] // Not `FromStr`: it yields an update, not a source.
    pub fn from_str(yaml: &str) -> Result<StateUpdate, StateError> {
        let mut load = parse_document(yaml, "<inline>")?;
        match load.errors.is_empty() {
            true => Ok(load.update),
            false => Err(load.errors.swap_remove(0)),
        }
    }

    /// Parses a YAML document leniently: invalid objects are listed and skipped.
    /// `source_name` (e.g. the file path) prefixes every error.
    pub fn parse(yaml: &str, source_name: &str) -> Result<LocalLoad, StateError> {
        parse_document(yaml, source_name)
    }

    fn path_str(&self) -> String {
        self.path.display().to_string()
    }

    async fn read(&self) -> Result<String, StateError> {
        tokio::fs::read_to_string(&self.path)
            .await
            .map_err(|e| StateError::Io {
                path: self.path_str(),
                reason: e.to_string(),
            })
    }

    /// Parses `text` and applies it; invalid objects keep their current version if any.
    fn apply_text(&self, store: &StateStore, text: &str) -> Result<ApplyOutcome, StateError> {
        let mut load = parse_document(text, &self.path_str())?;
        for e in &load.errors {
            tracing::warn!(error = %e, "skipping invalid configuration object");
        }
        keep_last_good(store, &mut load);
        let out = store.apply(load.update);
        tracing::info!(
            source = %self.name,
            upserted = out.upserted,
            removed = out.removed,
            invalid = load.errors.len() + out.rejected.len(),
            "configuration applied"
        );
        Ok(out)
    }
}

/// Re-upserts the current version of objects that are invalid in the new document, so a typo
/// does not silently drop e.g. a DENY policy.
fn keep_last_good(store: &StateStore, load: &mut LocalLoad) {
    let st = store.read();
    let u = &mut load.update;
    let present: HashSet<String> = u.upsert_workloads.iter().map(|w| w.uid.clone()).collect();
    for k in load
        .invalid_workloads
        .iter()
        .filter(|k| !present.contains(*k))
    {
        if let Some(w) = st.workload_by_uid(k) {
            u.upsert_workloads.push((*w).clone());
        }
    }
    let present: HashSet<String> = u.upsert_services.iter().map(Service::key).collect();
    for k in load
        .invalid_services
        .iter()
        .filter(|k| !present.contains(*k))
    {
        if let Some(s) = st.service_by_host(k) {
            u.upsert_services.push((*s).clone());
        }
    }
    let present: HashSet<String> = u.upsert_policies.iter().map(Policy::key).collect();
    for k in load
        .invalid_policies
        .iter()
        .filter(|k| !present.contains(*k))
    {
        if let Some(p) = st.policy(k) {
            u.upsert_policies.push((*p).clone());
        }
    }
}

async fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = tokio::fs::metadata(path).await.ok()?;
    Some((m.modified().ok()?, m.len()))
}

#[async_trait::async_trait]
impl ConfigSource for LocalConfig {
    async fn run(self: Box<Self>, store: Arc<StateStore>) -> Result<(), StateError> {
        // The first read must succeed: starting with no configuration would look ready but
        // route nothing.
        let mut last_stamp = file_stamp(&self.path).await;
        let mut last_text = self.read().await?;
        self.apply_text(&store, &last_text)?;
        store.mark_synced();

        let mut tick = tokio::time::interval(self.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                _ = self.reload.notified() => true,
            };
            // Stamp before reading: a write racing with the read shows up on the next poll.
            let stamp = file_stamp(&self.path).await;
            if !forced && stamp == last_stamp {
                continue;
            }
            last_stamp = stamp;
            let text = match self.read().await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "keeping the last good configuration");
                    continue;
                }
            };
            if !forced && text == last_text {
                continue;
            }
            if let Err(e) = self.apply_text(&store, &text) {
                tracing::warn!(error = %e, "keeping the last good configuration");
            }
            last_text = text;
        }
    }

    fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
# A complete example.
workloads:
- uid: cluster1//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  trustDomain: cluster.local
  workloadIps: ["10.0.0.1", "fd00::1"]
  protocol: HBONE
  node: node1
  network: ""
  canonicalName: sleep-app
  canonicalRevision: v1
  workloadName: sleep-deploy
  workloadType: pod
  clusterId: cluster1
  services: {"default/echo.default.svc.cluster.local": {80: 8080}}
  authorizationPolicies: ["default/selected"]
  healthy: true
  waypoint: {hostname: "default/waypoint.default.svc.cluster.local"}
  networkGateway: {address: "net2/192.168.0.1", hbonePort: 15009}
  applicationTunnel: {protocol: PROXY, port: 15088}
- name: echo
  namespace: default
  workloadIps: [10.0.0.2]
  services:
    default/echo.default.svc.cluster.local:
      80: 9090
services:
- name: echo
  namespace: default
  vips: ["10.96.0.1", "net1/10.96.0.2", "/10.96.0.3"]
  ports: {80: 8080, 443: 8443}
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/echo"]
policies:
- name: allow-sleep
  namespace: default
  action: Allow
  rules:
  - - - principals: [{exact: "cluster.local/ns/default/sa/sleep"}, "cluster.local/ns/other/*", "*/sa/admin", "*"]
        notPrincipals: [{prefix: "x"}, {suffix: "y"}, {presence: {}}]
        namespaces: [default]
        notNamespaces: [kube-system]
        serviceAccounts: [{serviceAccount: sleep}, {namespace: other, serviceAccount: admin}]
        notServiceAccounts: [{namespace: bad, serviceAccount: bad}]
        sourceIps: ["10.0.0.0/8", "10.1.2.3"]
        notSourceIps: ["fd00::/8"]
        destinationIps: ["10.0.0.2/32"]
        notDestinationIps: ["10.0.0.3"]
        destinationPorts: [8080]
        notDestinationPorts: [9999]
      - destinationPorts: [80]
    - []
  - []
- name: deny-dry
  namespace: istio-system
  scope: GLOBAL
  action: DENY
  dryRun: true
- name: selected
  namespace: default
  scope: WorkloadSelector
  action: Deny
peerAuthentications:
- {name: mesh, namespace: istio-system, mode: STRICT}
- {name: ns, namespace: secure, mode: STRICT}
- {name: open, namespace: open, mode: PERMISSIVE}
"#;

    #[test]
    fn full_example() {
        let u = LocalConfig::from_str(EXAMPLE).unwrap();
        assert!(u.replace_all);
        assert_eq!(u.upsert_workloads.len(), 2);
        assert_eq!(u.upsert_services.len(), 1);
        assert_eq!(u.upsert_policies.len(), 5);

        let w = &u.upsert_workloads[0];
        assert_eq!(w.uid, "cluster1//v1/Pod/default/sleep");
        assert_eq!(w.addresses.len(), 2);
        assert_eq!(w.protocol, TunnelProtocol::Hbone);
        assert_eq!(
            w.identity().to_string(),
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert_eq!(
            (
                w.canonical_name.as_str(),
                w.canonical_revision.as_str(),
                w.workload_name.as_str()
            ),
            ("sleep-app", "v1", "sleep-deploy")
        );
        assert_eq!(w.workload_type, "pod");
        assert_eq!(
            w.services["default/echo.default.svc.cluster.local"],
            vec![PortMapping::new(80, 8080)]
        );
        assert_eq!(
            w.waypoint,
            Some(GatewayAddress {
                destination: GatewayDestination::Hostname {
                    namespace: "default".into(),
                    hostname: "waypoint.default.svc.cluster.local".into()
                },
                hbone_mtls_port: 15008
            })
        );
        assert_eq!(
            w.network_gateway
                .as_ref()
                .map(|g| (&g.destination, g.hbone_mtls_port)),
            Some((
                &GatewayDestination::Address {
                    network: "net2".into(),
                    ip: "192.168.0.1".parse().unwrap()
                },
                15009
            ))
        );
        assert_eq!(
            w.application_tunnel,
            Some(ApplicationTunnel {
                protocol: ApplicationTunnelProtocol::Proxy,
                port: Some(15088)
            })
        );

        // Defaults.
        let d = &u.upsert_workloads[1];
        assert_eq!(d.uid, "Kubernetes//v1/Pod/default/echo");
        assert_eq!(d.service_account, "default");
        assert_eq!(d.protocol, TunnelProtocol::None);
        assert!(d.healthy);
        assert_eq!(
            (d.canonical_name.as_str(), d.canonical_revision.as_str()),
            ("echo", "latest")
        );

        let s = &u.upsert_services[0];
        assert_eq!(s.key(), "default/echo.default.svc.cluster.local");
        let vips: Vec<String> = s.vips.iter().map(|(n, ip)| format!("{n}/{ip}")).collect();
        assert_eq!(vips, vec!["/10.96.0.1", "net1/10.96.0.2", "/10.96.0.3"]);
        assert_eq!(
            s.ports,
            vec![PortMapping::new(80, 8080), PortMapping::new(443, 8443)]
        );

        let p = &u.upsert_policies[0];
        assert_eq!(
            (p.scope, p.action, p.dry_run),
            (PolicyScope::Namespace, PolicyAction::Allow, false)
        );
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.rules[0].clauses.len(), 2);
        assert!(p.rules[0].clauses[1].matches.is_empty());
        let m = &p.rules[0].clauses[0].matches[0];
        assert_eq!(
            m.principals,
            vec![
                StringMatch::Exact("cluster.local/ns/default/sa/sleep".into()),
                StringMatch::Prefix("cluster.local/ns/other/".into()),
                StringMatch::Suffix("/sa/admin".into()),
                StringMatch::Presence,
            ]
        );
        assert_eq!(
            m.not_principals,
            vec![
                StringMatch::Prefix("x".into()),
                StringMatch::Suffix("y".into()),
                StringMatch::Presence
            ]
        );
        assert_eq!(m.namespaces, vec![StringMatch::Exact("default".into())]);
        assert_eq!(
            m.service_accounts[0].namespace, "default",
            "defaults to the policy's namespace"
        );
        assert_eq!(m.service_accounts[1].namespace, "other");
        assert_eq!(m.not_service_accounts.len(), 1);
        assert_eq!(
            m.source_ips,
            vec![
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "10.1.2.3/32".parse().unwrap()
            ]
        );
        assert_eq!(
            m.not_destination_ips,
            vec!["10.0.0.3/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            (m.destination_ports.clone(), m.not_destination_ports.clone()),
            (vec![8080], vec![9999])
        );

        let by_key = |k: &str| u.upsert_policies.iter().find(|p| p.key() == k).unwrap();
        let dry = by_key("istio-system/deny-dry");
        assert_eq!(
            (dry.scope, dry.action, dry.dry_run),
            (PolicyScope::Global, PolicyAction::Deny, true)
        );
        assert_eq!(
            by_key("default/selected").scope,
            PolicyScope::WorkloadSelector
        );
        assert_eq!(
            *by_key("istio-system/converted_peer_authentication_mesh"),
            Policy::strict_mtls(
                "converted_peer_authentication_mesh",
                "istio-system",
                PolicyScope::Global
            )
        );
        assert_eq!(
            by_key("secure/converted_peer_authentication_ns").scope,
            PolicyScope::Namespace
        );
    }

    #[test]
    fn example_applies_to_a_store() {
        let store = StateStore::new();
        let out = store.apply(LocalConfig::from_str(EXAMPLE).unwrap());
        assert!(out.rejected.is_empty(), "{:?}", out.rejected);
        let st = store.read();
        let svc = st.service_by_vip("10.96.0.1".parse().unwrap()).unwrap();
        let eps: Vec<(String, u16)> = st
            .endpoints(&svc, 80)
            .into_iter()
            .map(|(w, p)| (w.name.clone(), p))
            .collect();
        assert_eq!(
            eps,
            vec![("echo".to_string(), 9090), ("sleep".to_string(), 8080)]
        );
    }

    #[test]
    fn empty_documents() {
        for doc in [
            "",
            "\n  \n",
            "# nothing here\n",
            "workloads: []\n",
            "workloads:\n",
        ] {
            let u = LocalConfig::from_str(doc).unwrap_or_else(|e| panic!("{doc:?}: {e}"));
            assert!(u.upsert_workloads.is_empty() && u.replace_all, "{doc:?}");
        }
    }

    #[test]
    fn invalid_objects_are_skipped_and_named() {
        let doc = r#"
workloads:
- {name: ok, namespace: default, workloadIps: ["10.0.0.1"]}
- {name: badip, namespace: default, workloadIps: ["10.0.0.300"]}
- {name: typo, namespace: default, serviceAcount: x}
- {name: badproto, namespace: default, protocol: FOO}
- {name: badsa, namespace: default, serviceAccount: "a b"}
services:
- {name: s, namespace: default, vips: ["10.0.0.0/24"]}
policies:
- {name: good, namespace: default, action: Allow}
- name: bad-cidr
  namespace: default
  action: Deny
  rules: [[[{sourceIps: ["10.0.0.0/33"]}]]]
- {name: noaction, namespace: default}
- name: bad-match
  namespace: default
  action: Deny
  rules: [[[], [{principals: [{regex: "x"}]}]]]
- {name: bigport, namespace: default, action: Deny, rules: [[[{destinationPorts: [70000]}]]]}
peerAuthentications:
- {name: p, namespace: default, mode: SUPER_STRICT}
"#;
        let load = LocalConfig::parse(doc, "/etc/zmesh/config.yaml").unwrap();
        assert_eq!(load.update.upsert_workloads.len(), 1);
        assert_eq!(load.update.upsert_services.len(), 0);
        assert_eq!(load.update.upsert_policies.len(), 1);
        let errors: Vec<String> = load.errors.iter().map(|e| e.to_string()).collect();
        let expect: &[&[&str]] = &[
            &[
                "workloads[1] (Kubernetes//v1/Pod/default/badip)",
                "workloadIps[0]",
                "10.0.0.300",
            ],
            &[
                "workloads[2] (Kubernetes//v1/Pod/default/typo)",
                "unknown field `serviceAcount`",
            ],
            &[
                "workloads[3] (Kubernetes//v1/Pod/default/badproto)",
                "field `protocol`",
                "FOO",
            ],
            &["workloads[4]", "field `serviceAccount`"],
            &[
                "services[0] (default/s.default.svc.cluster.local)",
                "vips[0]",
            ],
            &[
                "policies[1] (default/bad-cidr)",
                "rules[0][0][0].sourceIps[0]",
                "10.0.0.0/33",
            ],
            &["policies[2] (default/noaction)", "missing field `action`"],
            &[
                "policies[3] (default/bad-match)",
                "rules[0][1][0].principals[0]",
            ],
            &["policies[4] (default/bigport)", "field `rules`", "70000"],
            &[
                "peerAuthentications[0] (default/converted_peer_authentication_p)",
                "SUPER_STRICT",
            ],
        ];
        assert_eq!(errors.len(), expect.len(), "{errors:#?}");
        for (err, parts) in errors.iter().zip(expect) {
            assert!(err.starts_with("config /etc/zmesh/config.yaml: "), "{err}");
            for p in *parts {
                assert!(err.contains(p), "{err:?} should contain {p:?}");
            }
        }
        assert!(
            load.invalid_policies
                .contains(&"default/bad-cidr".to_string())
        );

        // Strict parsing refuses the document, naming the first bad object.
        let err = LocalConfig::from_str(doc).unwrap_err().to_string();
        assert!(err.contains("workloads[1]"), "{err}");
    }

    #[test]
    fn yaml_1_1_booleans_stay_strings() {
        let u = LocalConfig::from_str(
            "workloads:\n- {name: on, namespace: y, node: no, serviceAccount: yes}\n",
        )
        .unwrap();
        let w = &u.upsert_workloads[0];
        assert_eq!(
            (w.name.as_str(), w.namespace.as_str(), w.node.as_str()),
            ("on", "y", "no")
        );
        assert_eq!(w.service_account, "yes");
    }

    #[test]
    fn syntax_errors() {
        for doc in [
            "workloads: [",
            "workloads: {a: 1}",
            "unknownSection: []",
            "- just a list",
        ] {
            let err = LocalConfig::parse(doc, "bad.yaml").unwrap_err();
            assert!(matches!(err, StateError::Syntax { .. }), "{doc:?}: {err:?}");
            assert!(err.to_string().starts_with("config bad.yaml: "), "{err}");
        }
    }

    #[test]
    fn string_match_forms() {
        let cases: &[(&str, Option<StringMatch>)] = &[
            (r#""a""#, Some(StringMatch::Exact("a".into()))),
            (r#""*""#, Some(StringMatch::Presence)),
            (r#""a*""#, Some(StringMatch::Prefix("a".into()))),
            (r#""*a""#, Some(StringMatch::Suffix("a".into()))),
            (r#"{"exact": "*"}"#, Some(StringMatch::Exact("*".into()))),
            (r#"{"prefix": "p"}"#, Some(StringMatch::Prefix("p".into()))),
            (r#"{"suffix": "s"}"#, Some(StringMatch::Suffix("s".into()))),
            (r#"{"presence": {}}"#, Some(StringMatch::Presence)),
            (r#"{"presence": null}"#, Some(StringMatch::Presence)),
            (r#"{"exact": 1}"#, None),
            (r#"{"exact": "a", "prefix": "b"}"#, None),
            (r#"{}"#, None),
            (r#"["a"]"#, None),
            (r#"7"#, None),
        ];
        for (json, want) in cases {
            let v: Value = serde_json::from_str(json).unwrap();
            let got = parse_string_match(&v, "principals[0]");
            match want {
                Some(w) => assert_eq!(got.as_ref().ok(), Some(w), "{json}"),
                None => assert_eq!(
                    got.map_err(|e| e.field).unwrap_err(),
                    "principals[0]",
                    "{json}"
                ),
            }
        }
    }

    fn temp_file(tag: &str, content: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "zmesh-state-{tag}-{}-{}.yaml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, content).unwrap();
        path
    }

    #[tokio::test]
    async fn run_reports_syntax_error_with_file_name() {
        let path = temp_file("syntax", "workloads: [\n");
        let store = StateStore::new();
        let err = Box::new(LocalConfig::from_file(&path))
            .run(store.clone())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(!store.is_synced());
        let missing = path.with_extension("missing");
        let err = Box::new(LocalConfig::from_file(&missing))
            .run(store)
            .await
            .unwrap_err();
        assert!(matches!(err, StateError::Io { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
    }

    async fn wait_for(
        store: &StateStore,
        what: &str,
        cond: impl Fn(&super::super::ProxyState) -> bool,
    ) {
        let mut rx = store.generation();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond(&store.read()) {
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!("timed out waiting for {what}");
            }
        }
    }

    #[tokio::test]
    async fn run_loads_reloads_and_keeps_last_good() {
        let v1 = r#"
workloads:
- {name: a, namespace: default, workloadIps: ["10.0.0.1"]}
policies:
- {name: deny, namespace: default, action: Deny, rules: [[[{sourceIps: ["10.9.0.0/16"]}]]]}
"#;
        // The policy now has a typo: its old version must stay. Workload a is renamed to b.
        let v2 = r#"
workloads:
- {name: b, namespace: default, workloadIps: ["10.0.0.2"]}
policies:
- {name: deny, namespace: default, action: Deny, rules: [[[{sourceIps: ["10.9.0.0/99"]}]]]}
"#;
        let path = temp_file("reload", v1);
        let store = StateStore::new();
        let source = LocalConfig::from_file(&path).with_poll_interval(Duration::from_millis(20));
        let reloader = source.reloader();
        assert!(source.name().contains(&path.display().to_string()));
        let task = tokio::spawn(Box::new(source).run(store.clone()));

        wait_for(&store, "first sync", |_| store.is_synced()).await;
        assert!(
            store
                .read()
                .workload_by_ip("10.0.0.1".parse().unwrap())
                .is_some()
        );
        let old_policy = store.read().policy("default/deny").unwrap();

        std::fs::write(&path, v2).unwrap();
        reloader.reload(); // mtime granularity may hide the change from the poll
        wait_for(&store, "reload", |st| {
            st.workload_by_ip("10.0.0.2".parse().unwrap()).is_some()
        })
        .await;
        {
            let st = store.read();
            assert!(st.workload_by_ip("10.0.0.1".parse().unwrap()).is_none());
            assert_eq!(
                st.policy("default/deny"),
                Some(old_policy),
                "invalid policy keeps its last good version"
            );
        }

        // A syntax error keeps everything.
        std::fs::write(&path, "workloads: [").unwrap();
        reloader.reload();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            store
                .read()
                .workload_by_ip("10.0.0.2".parse().unwrap())
                .is_some()
        );
        assert!(!task.is_finished(), "a bad reload must not stop the source");

        // Polling alone picks up a change (different size, so the stamp changes).
        std::fs::write(&path, "workloads: []\n# padding to change the size\n").unwrap();
        wait_for(&store, "poll", |st| st.workloads().count() == 0).await;
        task.abort();
        std::fs::remove_file(&path).unwrap();
    }
}
