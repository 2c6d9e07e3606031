//! AuthorizationPolicy and PeerAuthentication → `istio.security.Authorization` (ztunnel's L4
//! policies), the way istiod does it for ambient mode.
//!
//! **AuthorizationPolicy** (resource name `ns/name`): scope GLOBAL in the root namespace
//! without a selector, NAMESPACE without a selector, WORKLOAD_SELECTOR with one (the selected
//! workloads list the policy in `Workload.authorization_policies`; a root-namespace selector
//! selects in every namespace). Policies with `targetRef(s)` are bound to a waypoint or gateway,
//! not to ztunnel, and are skipped here. One Istio rule → one [`pb::Rule`] with up to three
//! kinds of clauses (all must match): `from` (one clause; each source is one Match, any may
//! match), `to` (one clause; each operation is one Match), `when` (one clause per L4 condition:
//! values and notValues in one Match).
//!
//! ztunnel cannot see HTTP, so L7 attributes (`paths`, `methods`, `hosts`, `requestPrincipals`,
//! `remoteIpBlocks`, `request.*` conditions, ...) are handled as istiod does, always erring on
//! the restrictive side: an ALLOW rule with any L7 attribute is **omitted** (it allows less);
//! a DENY rule keeps its L4 parts and **drops** its L7 parts (it denies more). A DENY source or
//! operation made only of L7 attributes becomes an empty Match, which ztunnel never matches, so
//! that part has no effect — Istio behaves the same (istio/istio#61126). Both are logged as
//! warnings; they are not errors.
//!
//! **PeerAuthentication** STRICT → the DENY-without-identity policy of
//! [`Policy::strict_mtls`], named `converted_peer_authentication_<name>`. Precedence is
//! Istio's: a workload (selector) PeerAuthentication beats the namespace one, which beats the
//! mesh-wide one in the root namespace; `UNSET` inherits. A mesh-wide or namespace STRICT is
//! sent with GLOBAL/NAMESPACE scope when nothing below it relaxes it; when some namespace or
//! workload PeerAuthentication says PERMISSIVE/DISABLE, it is sent with WORKLOAD_SELECTOR scope
//! instead and bound to exactly the workloads for which it is the deciding policy (so the
//! relaxed workloads are excluded). `portLevelMtls` (selector policies only, as in Istio) adds
//! `destination_ports`/`not_destination_ports` to that match.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use zmesh_core::state::{Match, PEER_AUTHENTICATION_PREFIX, Policy, PolicyScope, StringMatch};
use zmesh_proto::security as pb;

use super::{TranslateError, TranslateOptions, Translated};
use crate::k8s::{self, Labels};
use crate::store::{ObjectKey, Snapshot};

/// Pod label/annotation keys and values Istio uses here.
const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// A pod as policy binding sees it: where it is and its labels.
#[derive(Clone, Debug)]
struct PodRef(std::sync::Arc<k8s::Pod>);

impl PodRef {
    fn namespace(&self) -> &str {
        &self.0.metadata.namespace
    }
    fn name(&self) -> &str {
        &self.0.metadata.name
    }
    fn labels(&self) -> &Labels {
        &self.0.metadata.labels
    }
}

/// The pods, indexed by namespace: a selector policy only looks at its own namespace's pods
/// (root-namespace policies excepted), so 1 000 policies over 10 000 pods stay cheap.
struct Pods {
    all: Vec<PodRef>,
    by_namespace: std::collections::HashMap<String, Vec<usize>>,
}

impl Pods {
    fn new(all: Vec<PodRef>) -> Pods {
        let mut by_namespace: std::collections::HashMap<String, Vec<usize>> = Default::default();
        for (i, p) in all.iter().enumerate() {
            by_namespace
                .entry(p.namespace().to_string())
                .or_default()
                .push(i);
        }
        Pods { all, by_namespace }
    }

    /// Pods of `namespace`, or of every namespace.
    fn in_scope<'a>(
        &'a self,
        namespace: &str,
        everywhere: bool,
    ) -> Box<dyn Iterator<Item = &'a PodRef> + 'a> {
        if everywhere {
            return Box::new(self.all.iter());
        }
        let idx = self
            .by_namespace
            .get(namespace)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        Box::new(idx.iter().map(|&i| &self.all[i]))
    }
}

/// Pod `(namespace, name)` → keys of the WORKLOAD_SELECTOR policies bound to it.
pub type Bindings = BTreeMap<(String, String), BTreeSet<String>>;

/// Everything this module derives from a snapshot.
#[derive(Debug, Default)]
pub struct Compiled {
    /// Resource name (`ns/name`) → policy, in name order.
    pub policies: BTreeMap<String, pb::Authorization>,
    pub errors: Vec<TranslateError>,
    /// Pod `(namespace, name)` → keys of the WORKLOAD_SELECTOR policies bound to it.
    pub bindings: Bindings,
}

impl Compiled {
    fn bind(&mut self, pod: &PodRef, key: &str) {
        self.bindings
            .entry((pod.namespace().to_string(), pod.name().to_string()))
            .or_default()
            .insert(key.to_string());
    }
}

/// Translate AuthorizationPolicies and PeerAuthentications into `out`.
pub fn translate(snap: &Snapshot, opts: &TranslateOptions, out: &mut Translated) {
    emit(compile(snap, opts), out);
}

/// Add compiled policies (and their errors) to `out`.
pub fn emit(compiled: Compiled, out: &mut Translated) {
    for (name, policy) in &compiled.policies {
        out.add(zmesh_proto::AUTHORIZATION_TYPE_URL, name.clone(), policy);
    }
    out.errors.extend(compiled.errors);
}

/// Translate the policies and work out which workloads the selector-scoped ones bind to.
/// Pure function of the snapshot: [`super::workloads`] calls it too, for the bindings.
pub fn compile(snap: &Snapshot, opts: &TranslateOptions) -> Compiled {
    // Pods that fail to parse are reported by the workload translation, not here.
    let pods = Pods::new(
        snap.parsed_of_kind::<k8s::Pod>("Pod")
            .filter_map(|(_, p)| p.ok())
            .map(PodRef)
            .collect(),
    );
    let mut c = Compiled::default();
    authorization_policies(snap, opts, &pods, &mut c);
    peer_authentications(snap, opts, &pods, &mut c);
    c
}

// ---------------------------------------------------------------------------------------------
// AuthorizationPolicy

fn authorization_policies(snap: &Snapshot, opts: &TranslateOptions, pods: &Pods, c: &mut Compiled) {
    for (key, parsed) in snap.parsed_of_kind::<k8s::AuthorizationPolicy>("AuthorizationPolicy") {
        let ap = match parsed {
            Ok(ap) => ap,
            Err(e) => {
                c.errors.push(error(key, &e.field, &e.reason));
                continue;
            }
        };
        match convert_authorization_policy(key, &ap, opts) {
            Ok(None) => {}
            Ok(Some((policy, selector))) => {
                let name = format!("{}/{}", key.namespace, key.name);
                if let Some(selector) = selector {
                    // A root-namespace selector policy selects in every namespace (Istio).
                    let everywhere = key.namespace == opts.root_namespace;
                    for pod in pods
                        .in_scope(&key.namespace, everywhere)
                        .filter(|p| k8s::selector_matches(&selector, p.labels()))
                    {
                        c.bind(pod, &name);
                    }
                }
                c.policies.insert(name, policy);
            }
            Err(e) => {
                tracing::error!(error = %e, "AuthorizationPolicy skipped");
                c.errors.push(e);
            }
        }
    }
}

fn error(key: &ObjectKey, field: &str, reason: &str) -> TranslateError {
    TranslateError {
        object: key.clone(),
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

/// One AuthorizationPolicy. `Ok(None)`: not for ztunnel. `Ok(Some((policy, selector)))`, the
/// selector being set for WORKLOAD_SELECTOR scope.
fn convert_authorization_policy(
    key: &ObjectKey,
    ap: &k8s::AuthorizationPolicy,
    opts: &TranslateOptions,
) -> Result<Option<(pb::Authorization, Option<Labels>)>, TranslateError> {
    let spec = &ap.spec;
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        tracing::debug!(policy = %key, "AuthorizationPolicy with targetRefs is for waypoints/gateways, not ztunnel");
        return Ok(None);
    }
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => pb::Action::Allow,
        "DENY" => pb::Action::Deny,
        a @ ("AUDIT" | "CUSTOM") => {
            return Err(error(
                key,
                "spec.action",
                &format!(
                    "action {a} is not enforced by ztunnel (needs a waypoint with targetRefs); policy skipped"
                ),
            ));
        }
        other => {
            return Err(error(
                key,
                "spec.action",
                &format!(
                    "unknown action {other:?} (expected ALLOW, DENY, AUDIT or CUSTOM); policy skipped"
                ),
            ));
        }
    };
    let selector = spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .filter(|l| !l.is_empty());
    let scope = if selector.is_some() {
        pb::Scope::WorkloadSelector
    } else if key.namespace == opts.root_namespace {
        pb::Scope::Global
    } else {
        pb::Scope::Namespace
    };
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        let converted = convert_rule(rule, &field).map_err(|(f, r)| error(key, &f, &r))?;
        if converted.l7.is_empty() {
            rules.push(converted.rule);
        } else if action == pb::Action::Allow {
            tracing::warn!(policy = %key, rule = %field, l7 = ?converted.l7,
                "ALLOW rule uses HTTP attributes ztunnel cannot check: rule omitted (allows less); bind the policy to a waypoint with targetRefs to enforce it");
        } else {
            tracing::warn!(policy = %key, rule = %field, l7 = ?converted.l7,
                "DENY rule uses HTTP attributes ztunnel cannot check: enforced without them (denies more); bind the policy to a waypoint with targetRefs to enforce it exactly");
            if converted.inert {
                tracing::warn!(policy = %key, rule = %field,
                    "DENY rule has a source or operation made only of HTTP attributes: that part never matches at L4, so the rule has no effect in ztunnel");
            }
            rules.push(converted.rule);
        }
    }
    let dry_run = ap
        .metadata
        .annotations
        .get(DRY_RUN_ANNOTATION)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    Ok(Some((
        pb::Authorization {
            name: key.name.clone(),
            namespace: key.namespace.clone(),
            scope: scope as i32,
            action: action as i32,
            rules,
            dry_run,
            extensions: Vec::new(),
        },
        selector,
    )))
}

/// A converted rule and what L7 content it had (field paths).
struct ConvertedRule {
    rule: pb::Rule,
    l7: Vec<String>,
    /// Some source/operation became an empty Match (only L7 attributes).
    inert: bool,
}

type FieldResult<T> = Result<T, (String, String)>;

fn convert_rule(rule: &k8s::AuthzRule, field: &str) -> FieldResult<ConvertedRule> {
    let mut l7 = Vec::new();
    let mut inert = false;
    let mut clauses = Vec::new();

    if !rule.from.is_empty() {
        let mut matches = Vec::new();
        for (j, from) in rule.from.iter().enumerate() {
            let f = format!("{field}.from[{j}].source");
            let s = &from.source;
            let m = pb::Match {
                principals: strings(&s.principals, true),
                not_principals: strings(&s.not_principals, true),
                namespaces: strings(&s.namespaces, false),
                not_namespaces: strings(&s.not_namespaces, false),
                service_accounts: service_accounts(&s.service_accounts, &f, "serviceAccounts")?,
                not_service_accounts: service_accounts(
                    &s.not_service_accounts,
                    &f,
                    "notServiceAccounts",
                )?,
                source_ips: cidrs(&s.ip_blocks, &f, "ipBlocks")?,
                not_source_ips: cidrs(&s.not_ip_blocks, &f, "notIpBlocks")?,
                ..Default::default()
            };
            // Checked even though dropped: a typo must be reported, not silently ignored.
            cidrs(&s.remote_ip_blocks, &f, "remoteIpBlocks")?;
            cidrs(&s.not_remote_ip_blocks, &f, "notRemoteIpBlocks")?;
            let before = l7.len();
            note_l7(
                &mut l7,
                &f,
                "requestPrincipals",
                !s.request_principals.is_empty(),
            );
            note_l7(
                &mut l7,
                &f,
                "notRequestPrincipals",
                !s.not_request_principals.is_empty(),
            );
            note_l7(
                &mut l7,
                &f,
                "remoteIpBlocks",
                !s.remote_ip_blocks.is_empty(),
            );
            note_l7(
                &mut l7,
                &f,
                "notRemoteIpBlocks",
                !s.not_remote_ip_blocks.is_empty(),
            );
            if l7.len() > before && m == pb::Match::default() {
                inert = true;
            }
            matches.push(m);
        }
        clauses.push(pb::Clause { matches });
    }

    if !rule.to.is_empty() {
        let mut matches = Vec::new();
        for (j, to) in rule.to.iter().enumerate() {
            let f = format!("{field}.to[{j}].operation");
            let op = &to.operation;
            let m = pb::Match {
                destination_ports: ports(&op.ports, &f, "ports")?,
                not_destination_ports: ports(&op.not_ports, &f, "notPorts")?,
                ..Default::default()
            };
            let before = l7.len();
            for (name, list) in [
                ("hosts", &op.hosts),
                ("notHosts", &op.not_hosts),
                ("methods", &op.methods),
                ("notMethods", &op.not_methods),
                ("paths", &op.paths),
                ("notPaths", &op.not_paths),
            ] {
                note_l7(&mut l7, &f, name, !list.is_empty());
            }
            if l7.len() > before && m == pb::Match::default() {
                inert = true;
            }
            matches.push(m);
        }
        clauses.push(pb::Clause { matches });
    }

    for (j, cond) in rule.when.iter().enumerate() {
        let f = format!("{field}.when[{j}]");
        if cond.values.is_empty() && cond.not_values.is_empty() {
            return Err((f, "condition has neither values nor notValues".into()));
        }
        let values: Vec<String> = cond.values.iter().map(|v| v.to_string()).collect();
        let not_values: Vec<String> = cond.not_values.iter().map(|v| v.to_string()).collect();
        let m = match cond.key.as_str() {
            "source.ip" => pb::Match {
                source_ips: cidrs(&values, &f, "values")?,
                not_source_ips: cidrs(&not_values, &f, "notValues")?,
                ..Default::default()
            },
            "destination.ip" => pb::Match {
                destination_ips: cidrs(&values, &f, "values")?,
                not_destination_ips: cidrs(&not_values, &f, "notValues")?,
                ..Default::default()
            },
            "source.namespace" => pb::Match {
                namespaces: strings(&values, false),
                not_namespaces: strings(&not_values, false),
                ..Default::default()
            },
            "source.principal" => pb::Match {
                principals: strings(&values, true),
                not_principals: strings(&not_values, true),
                ..Default::default()
            },
            "source.serviceAccount" => pb::Match {
                service_accounts: service_accounts(&values, &f, "values")?,
                not_service_accounts: service_accounts(&not_values, &f, "notValues")?,
                ..Default::default()
            },
            "destination.port" => pb::Match {
                destination_ports: ports(&cond.values, &f, "values")?,
                not_destination_ports: ports(&cond.not_values, &f, "notValues")?,
                ..Default::default()
            },
            "" => return Err((format!("{f}.key"), "must not be empty".into())),
            other => {
                // request.*, source.remote_ip, connection.sni, ...: needs the HTTP layer.
                note_l7(&mut l7, &f, other, true);
                continue;
            }
        };
        clauses.push(pb::Clause { matches: vec![m] });
    }

    Ok(ConvertedRule {
        rule: pb::Rule { clauses },
        l7,
        inert,
    })
}

fn note_l7(l7: &mut Vec<String>, field: &str, name: &str, present: bool) {
    if present {
        l7.push(format!("{field}.{name}"));
    }
}

/// Istio's string syntax: `*` = any non-empty value, `prefix*`, `*suffix`, else exact.
fn string_match(s: &str, principal: bool) -> pb::StringMatch {
    use pb::string_match::MatchType;
    // ztunnel compares principals without the scheme; accept them written with it.
    let s = if principal {
        s.strip_prefix("spiffe://").unwrap_or(s)
    } else {
        s
    };
    let m = if s == "*" {
        MatchType::Presence(())
    } else if let Some(rest) = s.strip_prefix('*') {
        MatchType::Suffix(rest.to_string())
    } else if let Some(rest) = s.strip_suffix('*') {
        MatchType::Prefix(rest.to_string())
    } else {
        MatchType::Exact(s.to_string())
    };
    pb::StringMatch {
        match_type: Some(m),
    }
}

fn strings(list: &[String], principal: bool) -> Vec<pb::StringMatch> {
    list.iter().map(|s| string_match(s, principal)).collect()
}

/// `10.0.0.0/8`, `1.2.3.4` (a /32), `fd00::/8`.
fn parse_cidr(s: &str) -> Option<IpNet> {
    if s.contains('/') {
        s.parse::<IpNet>().ok().map(|n| n.trunc())
    } else {
        s.parse::<IpAddr>().ok().map(IpNet::from)
    }
}

fn cidrs(list: &[String], field: &str, name: &str) -> FieldResult<Vec<pb::Address>> {
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            let net = parse_cidr(s.trim()).ok_or_else(|| {
                (
                    format!("{field}.{name}[{i}]"),
                    format!("invalid CIDR or IP address {s:?}; policy skipped"),
                )
            })?;
            Ok(pb::Address {
                address: match net.addr() {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                },
                length: u32::from(net.prefix_len()),
            })
        })
        .collect()
}

fn ports(list: &[k8s::StringOrInt], field: &str, name: &str) -> FieldResult<Vec<u32>> {
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            let s = p.to_string();
            s.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .map(u32::from)
                .ok_or_else(|| {
                    (
                        format!("{field}.{name}[{i}]"),
                        format!("invalid port {s:?} (expected 1-65535); policy skipped"),
                    )
                })
        })
        .collect()
}

/// `namespace/serviceaccount`.
fn service_accounts(
    list: &[String],
    field: &str,
    name: &str,
) -> FieldResult<Vec<pb::ServiceAccountMatch>> {
    list.iter()
        .enumerate()
        .map(|(i, s)| match s.split_once('/') {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                Ok(pb::ServiceAccountMatch {
                    namespace: ns.to_string(),
                    service_account: sa.to_string(),
                })
            }
            _ => Err((
                format!("{field}.{name}[{i}]"),
                format!("invalid service account {s:?} (expected namespace/name); policy skipped"),
            )),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// PeerAuthentication

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Unset,
    Strict,
    Permissive,
    Disable,
}

impl Mode {
    fn parse(s: Option<&str>) -> Option<Mode> {
        match s.unwrap_or("UNSET") {
            "UNSET" | "" => Some(Mode::Unset),
            "STRICT" => Some(Mode::Strict),
            "PERMISSIVE" => Some(Mode::Permissive),
            "DISABLE" => Some(Mode::Disable),
            _ => None,
        }
    }

    /// PERMISSIVE or DISABLE: plaintext allowed.
    fn relaxed(self) -> bool {
        matches!(self, Mode::Permissive | Mode::Disable)
    }
}

#[derive(Debug)]
struct PeerAuth {
    key: ObjectKey,
    selector: Option<Labels>,
    mode: Mode,
    /// Port → mode (selector policies only).
    ports: BTreeMap<u16, Mode>,
}

impl PeerAuth {
    fn relaxes_anything(&self) -> bool {
        self.mode.relaxed() || self.ports.values().any(|m| m.relaxed())
    }
}

fn parse_peer_auth(key: &ObjectKey, raw: &serde_json::Value) -> Result<PeerAuth, TranslateError> {
    let pa =
        k8s::parse::<k8s::PeerAuthentication>(raw).map_err(|e| error(key, &e.field, &e.reason))?;
    let bad_mode = |field: &str, m: &Option<String>| {
        error(
            key,
            field,
            &format!(
                "unknown mode {:?} (expected UNSET, STRICT, PERMISSIVE or DISABLE); policy skipped",
                m.as_deref().unwrap_or("")
            ),
        )
    };
    let mode_str = pa.spec.mtls.as_ref().and_then(|m| m.mode.clone());
    let mode =
        Mode::parse(mode_str.as_deref()).ok_or_else(|| bad_mode("spec.mtls.mode", &mode_str))?;
    let selector = pa
        .spec
        .selector
        .map(|s| s.match_labels)
        .filter(|l| !l.is_empty());
    let mut ports = BTreeMap::new();
    for (port, m) in &pa.spec.port_level_mtls {
        let field = format!("spec.portLevelMtls[{port}]");
        let p = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                error(
                    key,
                    &field,
                    "invalid port (expected 1-65535); policy skipped",
                )
            })?;
        let pm = Mode::parse(m.mode.as_deref())
            .ok_or_else(|| bad_mode(&format!("{field}.mode"), &m.mode))?;
        if pm != Mode::Unset {
            ports.insert(p, pm);
        }
    }
    if !ports.is_empty() && selector.is_none() {
        // Istio rejects this too: port-level settings need a workload selector.
        return Err(error(
            key,
            "spec.portLevelMtls",
            "port-level mTLS requires spec.selector; policy skipped",
        ));
    }
    Ok(PeerAuth {
        key: key.clone(),
        selector,
        mode,
        ports,
    })
}

fn peer_authentications(snap: &Snapshot, opts: &TranslateOptions, pods: &Pods, c: &mut Compiled) {
    let mut all = Vec::new();
    for (key, raw) in snap.of_kind("PeerAuthentication") {
        match parse_peer_auth(key, &raw) {
            Ok(pa) => all.push(pa),
            Err(e) => {
                tracing::error!(error = %e, "PeerAuthentication skipped");
                c.errors.push(e);
            }
        }
    }
    // Istio picks the oldest when several apply at the same level; we have no creation time in
    // file mode, so the first by name wins (the snapshot is in name order) and the rest warn.
    let mut mesh: Option<&PeerAuth> = None;
    let mut namespace_level: BTreeMap<&str, &PeerAuth> = BTreeMap::new();
    for pa in all.iter().filter(|p| p.selector.is_none()) {
        let first = if pa.key.namespace == opts.root_namespace {
            *mesh.get_or_insert(pa)
        } else {
            *namespace_level
                .entry(pa.key.namespace.as_str())
                .or_insert(pa)
        };
        if first.key != pa.key {
            tracing::warn!(ignored = %pa.key, used = %first.key,
                "more than one PeerAuthentication without selector in a namespace; using the first by name");
        }
    }
    let workload_level: Vec<&PeerAuth> = all.iter().filter(|p| p.selector.is_some()).collect();

    // The mode a namespace inherits when a workload policy says UNSET.
    let inherited = |ns: &str| -> (Mode, Option<&PeerAuth>) {
        if let Some(pa) = namespace_level.get(ns).filter(|p| p.mode != Mode::Unset) {
            return (pa.mode, Some(pa));
        }
        if let Some(pa) = mesh.filter(|p| p.mode != Mode::Unset) {
            return (pa.mode, Some(pa));
        }
        (Mode::Permissive, None)
    };

    // Which PeerAuthentication decides each pod's mode (None: nothing, PERMISSIVE).
    let mut decided_by: BTreeMap<ObjectKey, Vec<&PodRef>> = BTreeMap::new();
    for pod in &pods.all {
        let own = workload_level.iter().find(|pa| {
            pa.key.namespace == pod.namespace()
                && k8s::selector_matches(
                    pa.selector.as_ref().unwrap_or(&Labels::new()),
                    pod.labels(),
                )
        });
        let decider = match own {
            Some(pa) if pa.mode != Mode::Unset || !pa.ports.is_empty() => Some(*pa),
            _ => inherited(pod.namespace()).1,
        };
        if let Some(pa) = decider {
            decided_by.entry(pa.key.clone()).or_default().push(pod);
        }
    }

    let emit = |c: &mut Compiled, pa: &PeerAuth, scope: PolicyScope, m: Match| {
        let name = format!("{PEER_AUTHENTICATION_PREFIX}{}", pa.key.name);
        let mut policy = Policy::strict_mtls(&name, &pa.key.namespace, scope);
        policy.rules[0].clauses[0].matches = vec![m];
        let key = policy.key();
        if scope == PolicyScope::WorkloadSelector {
            for pod in decided_by.get(&pa.key).into_iter().flatten() {
                c.bind(pod, &key);
            }
        }
        c.policies.insert(key, pb::Authorization::from(&policy));
    };
    let strict_match = || Match {
        not_principals: vec![StringMatch::Presence],
        ..Match::default()
    };

    if let Some(pa) = mesh.filter(|p| p.mode == Mode::Strict) {
        let relaxed_below = all.iter().any(|p| p.key != pa.key && p.relaxes_anything());
        let scope = if relaxed_below {
            PolicyScope::WorkloadSelector
        } else {
            PolicyScope::Global
        };
        emit(c, pa, scope, strict_match());
    }
    for (ns, pa) in &namespace_level {
        if pa.mode != Mode::Strict {
            continue;
        }
        let relaxed_below = workload_level
            .iter()
            .any(|p| p.key.namespace == *ns && p.relaxes_anything());
        let scope = if relaxed_below {
            PolicyScope::WorkloadSelector
        } else {
            PolicyScope::Namespace
        };
        emit(c, pa, scope, strict_match());
    }
    for pa in &workload_level {
        let base = if pa.mode == Mode::Unset {
            inherited(&pa.key.namespace).0
        } else {
            pa.mode
        };
        let m = if base == Mode::Strict {
            Match {
                not_destination_ports: pa
                    .ports
                    .iter()
                    .filter(|(_, m)| m.relaxed())
                    .map(|(p, _)| *p)
                    .collect(),
                ..strict_match()
            }
        } else {
            let strict_ports: Vec<u16> = pa
                .ports
                .iter()
                .filter(|(_, m)| **m == Mode::Strict)
                .map(|(p, _)| *p)
                .collect();
            if strict_ports.is_empty() {
                continue;
            }
            Match {
                destination_ports: strict_ports,
                ..strict_match()
            }
        };
        // An UNSET selector policy without ports decides nothing: inherited policies cover it.
        if pa.mode == Mode::Unset && pa.ports.is_empty() {
            continue;
        }
        emit(c, pa, PolicyScope::WorkloadSelector, m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::string_match::MatchType;

    #[test]
    fn istio_string_syntax() {
        let m = |s| string_match(s, true).match_type.unwrap();
        assert_eq!(m("*"), MatchType::Presence(()));
        assert_eq!(
            m("cluster.local/*"),
            MatchType::Prefix("cluster.local/".into())
        );
        assert_eq!(m("*/sa/x"), MatchType::Suffix("/sa/x".into()));
        assert_eq!(
            m("spiffe://cluster.local/ns/a/sa/b"),
            MatchType::Exact("cluster.local/ns/a/sa/b".into())
        );
    }

    #[test]
    fn cidrs_and_ports() {
        let a = cidrs(&["10.1.2.3/8".into(), "fd00::1".into()], "f", "ipBlocks").unwrap();
        assert_eq!(a[0].address, vec![10, 0, 0, 0]);
        assert_eq!(a[0].length, 8);
        assert_eq!(a[1].length, 128);
        let e = cidrs(&["1.2.3.4".into(), "10.0.0.0/33".into()], "f", "ipBlocks").unwrap_err();
        assert_eq!(e.0, "f.ipBlocks[1]");
        let e = ports(&[k8s::StringOrInt::String("http".into())], "f", "ports").unwrap_err();
        assert_eq!(e.0, "f.ports[0]");
    }
}
