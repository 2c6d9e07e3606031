//! L4 authorization policies: the validated, internal form of `istio.security.Authorization`.
//!
//! Only the data lives here; how a policy is evaluated against a connection is in
//! [`crate::authz`].

use ipnet::IpNet;
use serde::Serialize;
use zmesh_proto::security as pb;

use super::workload::{ip_from_bytes, ip_to_bytes, port_u16};
use super::{FieldError, StateError};

/// Which workloads a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum PolicyScope {
    /// Every workload in the mesh.
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Only workloads that list the policy in their `authorization_policies`.
    WorkloadSelector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// A string comparison (`istio.security.StringMatch`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Matches any non-empty value (for identity fields: "the peer has an identity").
    Presence,
}

/// A peer service account (namespace + name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// A conjunction of L4 conditions; see [`crate::authz`] for the semantics of each field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Match {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

impl Match {
    /// True when no field is set. Such a match never matches (Istio skips it): it is what an
    /// L7-only rule turns into at L4.
    pub fn is_empty(&self) -> bool {
        *self == Match::default()
    }
}

/// Any of the matches (OR).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Clause {
    pub matches: Vec<Match>,
}

/// All of the clauses (AND).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

/// An L4 authorization policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: PolicyScope,
    pub action: PolicyAction,
    /// Evaluated and logged, never enforced.
    pub dry_run: bool,
    /// Any of the rules (OR). No rules: matches nothing (an ALLOW without rules allows nothing).
    pub rules: Vec<Rule>,
}

/// Prefix istiod gives policies converted from PeerAuthentication.
pub const PEER_AUTHENTICATION_PREFIX: &str = "converted_peer_authentication_";

impl Policy {
    /// The policy's key: `namespace/name` (also its xDS resource name).
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The policy that implements PeerAuthentication STRICT for ztunnel (what istiod sends): a
    /// DENY whose single match is `not_principals: [Presence]`, i.e. it denies every connection
    /// without a peer identity (plaintext).
    pub fn strict_mtls(name: &str, namespace: &str, scope: PolicyScope) -> Policy {
        Policy {
            name: name.to_string(),
            namespace: namespace.to_string(),
            scope,
            action: PolicyAction::Deny,
            dry_run: false,
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![Match {
                        not_principals: vec![StringMatch::Presence],
                        ..Match::default()
                    }],
                }],
            }],
        }
    }

    /// Checks the invariants every stored policy must hold.
    pub fn validate(&self) -> Result<(), StateError> {
        if self.name.is_empty() {
            return Err(FieldError::new(
                "name",
                "must not be empty (it is part of the policy's key)",
            )
            .into_state("policy", self.key()));
        }
        Ok(())
    }
}

// ---- wire conversions ----

fn string_match_from_wire(m: &pb::StringMatch, field: &str) -> Result<StringMatch, FieldError> {
    use pb::string_match::MatchType;
    match &m.match_type {
        Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
        Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
        Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
        Some(MatchType::Presence(_)) => Ok(StringMatch::Presence),
        None => Err(FieldError::new(
            field,
            "string match has none of exact, prefix, suffix, presence",
        )),
    }
}

fn string_match_to_wire(m: &StringMatch) -> pb::StringMatch {
    use pb::string_match::MatchType;
    pb::StringMatch {
        match_type: Some(match m {
            StringMatch::Exact(s) => MatchType::Exact(s.clone()),
            StringMatch::Prefix(s) => MatchType::Prefix(s.clone()),
            StringMatch::Suffix(s) => MatchType::Suffix(s.clone()),
            StringMatch::Presence => MatchType::Presence(()),
        }),
    }
}

/// A CIDR from raw bytes + prefix length.
pub(crate) fn cidr_from_wire(a: &pb::Address, field: &str) -> Result<IpNet, FieldError> {
    let ip = ip_from_bytes(&a.address, &format!("{field}.address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    // Checked before narrowing so that e.g. 288 cannot wrap around to a valid 32.
    let len = u8::try_from(a.length)
        .ok()
        .filter(|l| u32::from(*l) <= max)
        .ok_or_else(|| {
            FieldError::new(
                format!("{field}.length"),
                format!("invalid CIDR length {} for {ip} (at most {max})", a.length),
            )
        })?;
    IpNet::new(ip, len).map_err(|e| FieldError::new(format!("{field}.length"), e.to_string()))
}

fn cidr_to_wire(n: &IpNet) -> pb::Address {
    pb::Address {
        address: ip_to_bytes(n.addr()),
        length: u32::from(n.prefix_len()),
    }
}

fn match_from_wire(m: &pb::Match, field: &str) -> Result<Match, FieldError> {
    let strings = |list: &[pb::StringMatch], name: &str| -> Result<Vec<StringMatch>, FieldError> {
        list.iter()
            .enumerate()
            .map(|(i, s)| string_match_from_wire(s, &format!("{field}.{name}[{i}]")))
            .collect()
    };
    let cidrs = |list: &[pb::Address], name: &str| -> Result<Vec<IpNet>, FieldError> {
        list.iter()
            .enumerate()
            .map(|(i, a)| cidr_from_wire(a, &format!("{field}.{name}[{i}]")))
            .collect()
    };
    let ports = |list: &[u32], name: &str| -> Result<Vec<u16>, FieldError> {
        list.iter()
            .enumerate()
            .map(|(i, p)| port_u16(*p, &format!("{field}.{name}[{i}]")))
            .collect()
    };
    let sas = |list: &[pb::ServiceAccountMatch]| -> Vec<ServiceAccountMatch> {
        list.iter()
            .map(|s| ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    Ok(Match {
        namespaces: strings(&m.namespaces, "namespaces")?,
        not_namespaces: strings(&m.not_namespaces, "not_namespaces")?,
        principals: strings(&m.principals, "principals")?,
        not_principals: strings(&m.not_principals, "not_principals")?,
        service_accounts: sas(&m.service_accounts),
        not_service_accounts: sas(&m.not_service_accounts),
        source_ips: cidrs(&m.source_ips, "source_ips")?,
        not_source_ips: cidrs(&m.not_source_ips, "not_source_ips")?,
        destination_ips: cidrs(&m.destination_ips, "destination_ips")?,
        not_destination_ips: cidrs(&m.not_destination_ips, "not_destination_ips")?,
        destination_ports: ports(&m.destination_ports, "destination_ports")?,
        not_destination_ports: ports(&m.not_destination_ports, "not_destination_ports")?,
    })
}

fn match_to_wire(m: &Match) -> pb::Match {
    let strings = |l: &[StringMatch]| l.iter().map(string_match_to_wire).collect();
    let cidrs = |l: &[IpNet]| l.iter().map(cidr_to_wire).collect();
    let ports = |l: &[u16]| l.iter().map(|p| u32::from(*p)).collect();
    let sas = |l: &[ServiceAccountMatch]| {
        l.iter()
            .map(|s| pb::ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    pb::Match {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        service_accounts: sas(&m.service_accounts),
        not_service_accounts: sas(&m.not_service_accounts),
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: cidrs(&m.source_ips),
        not_source_ips: cidrs(&m.not_source_ips),
        destination_ips: cidrs(&m.destination_ips),
        not_destination_ips: cidrs(&m.not_destination_ips),
        destination_ports: ports(&m.destination_ports),
        not_destination_ports: ports(&m.not_destination_ports),
        extensions: Vec::new(),
    }
}

fn convert_policy(a: pb::Authorization) -> Result<Policy, FieldError> {
    let scope = match pb::Scope::try_from(a.scope) {
        Ok(pb::Scope::Global) => PolicyScope::Global,
        Ok(pb::Scope::Namespace) => PolicyScope::Namespace,
        Ok(pb::Scope::WorkloadSelector) => PolicyScope::WorkloadSelector,
        Err(_) => {
            return Err(FieldError::new(
                "scope",
                format!("unknown enum value {}", a.scope),
            ));
        }
    };
    // An unknown action must never be guessed: ALLOW vs DENY flips the meaning.
    let action = match pb::Action::try_from(a.action) {
        Ok(pb::Action::Allow) => PolicyAction::Allow,
        Ok(pb::Action::Deny) => PolicyAction::Deny,
        Err(_) => {
            return Err(FieldError::new(
                "action",
                format!("unknown enum value {}", a.action),
            ));
        }
    };
    let mut rules = Vec::with_capacity(a.rules.len());
    for (ri, r) in a.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(r.clauses.len());
        for (ci, c) in r.clauses.iter().enumerate() {
            let matches = c
                .matches
                .iter()
                .enumerate()
                .map(|(mi, m)| {
                    match_from_wire(m, &format!("rules[{ri}].clauses[{ci}].matches[{mi}]"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            clauses.push(Clause { matches });
        }
        rules.push(Rule { clauses });
    }
    Ok(Policy {
        name: a.name,
        namespace: a.namespace,
        scope,
        action,
        dry_run: a.dry_run,
        rules,
    })
}

impl TryFrom<pb::Authorization> for Policy {
    type Error = StateError;

    fn try_from(a: pb::Authorization) -> Result<Self, StateError> {
        let key = format!("{}/{}", a.namespace, a.name);
        let out = convert_policy(a).map_err(|e| e.into_state("policy", key))?;
        out.validate()?;
        Ok(out)
    }
}

impl From<&Policy> for pb::Authorization {
    fn from(p: &Policy) -> Self {
        pb::Authorization {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            scope: (match p.scope {
                PolicyScope::Global => pb::Scope::Global,
                PolicyScope::Namespace => pb::Scope::Namespace,
                PolicyScope::WorkloadSelector => pb::Scope::WorkloadSelector,
            }) as i32,
            action: (match p.action {
                PolicyAction::Allow => pb::Action::Allow,
                PolicyAction::Deny => pb::Action::Deny,
            }) as i32,
            rules: p
                .rules
                .iter()
                .map(|r| pb::Rule {
                    clauses: r
                        .clauses
                        .iter()
                        .map(|c| pb::Clause {
                            matches: c.matches.iter().map(match_to_wire).collect(),
                        })
                        .collect(),
                })
                .collect(),
            dry_run: p.dry_run,
            extensions: Vec::new(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn full_policy() -> Policy {
        let sm = vec![
            StringMatch::Exact("a".into()),
            StringMatch::Prefix("b".into()),
            StringMatch::Suffix("c".into()),
            StringMatch::Presence,
        ];
        let sa = vec![ServiceAccountMatch {
            namespace: "ns".into(),
            service_account: "sa".into(),
        }];
        let nets: Vec<IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "fd00::1/128".parse().unwrap(),
        ];
        Policy {
            name: "everything".into(),
            namespace: "default".into(),
            scope: PolicyScope::WorkloadSelector,
            action: PolicyAction::Deny,
            dry_run: true,
            rules: vec![
                Rule {
                    clauses: vec![
                        Clause {
                            matches: vec![Match {
                                namespaces: sm.clone(),
                                not_namespaces: sm.clone(),
                                principals: sm.clone(),
                                not_principals: sm,
                                service_accounts: sa.clone(),
                                not_service_accounts: sa,
                                source_ips: nets.clone(),
                                not_source_ips: nets.clone(),
                                destination_ips: nets.clone(),
                                not_destination_ips: nets,
                                destination_ports: vec![80, 443],
                                not_destination_ports: vec![9999],
                            }],
                        },
                        Clause::default(),
                    ],
                },
                Rule::default(),
            ],
        }
    }

    #[test]
    fn round_trip_through_proto() {
        let p = full_policy();
        let back = Policy::try_from(pb::Authorization::from(&p)).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.key(), "default/everything");
    }

    #[test]
    fn strict_mtls_shape() {
        let p = Policy::strict_mtls("strict", "istio-system", PolicyScope::Global);
        assert_eq!(p.action, PolicyAction::Deny);
        assert_eq!(p.rules.len(), 1);
        assert_eq!(
            p.rules[0].clauses[0].matches,
            vec![Match {
                not_principals: vec![StringMatch::Presence],
                ..Match::default()
            }]
        );
    }

    #[test]
    fn conversion_errors_name_the_field() {
        type Mutate = fn(&mut pb::Authorization);
        fn first(a: &mut pb::Authorization) -> &mut pb::Match {
            &mut a.rules[0].clauses[0].matches[0]
        }
        let cases: &[(&str, Mutate, &str)] = &[
            (
                "cidr too long v4",
                |a| first(a).source_ips[0].length = 33,
                "rules[0].clauses[0].matches[0].source_ips[0].length",
            ),
            (
                "cidr length wraps u8",
                |a| first(a).destination_ips[0].length = 256 + 8,
                "rules[0].clauses[0].matches[0].destination_ips[0].length",
            ),
            (
                "cidr too long v6",
                |a| first(a).not_source_ips[1].length = 129,
                "not_source_ips[1].length",
            ),
            (
                "bad address bytes",
                |a| first(a).not_destination_ips[0].address = vec![1, 2],
                "not_destination_ips[0].address",
            ),
            (
                "port too big",
                |a| first(a).destination_ports[1] = 65536,
                "destination_ports[1]",
            ),
            (
                "empty string match",
                |a| first(a).principals[2].match_type = None,
                "principals[2]",
            ),
            ("unknown action", |a| a.action = 5, "action"),
            ("unknown scope", |a| a.scope = 5, "scope"),
            ("empty name", |a| a.name.clear(), "name"),
        ];
        for (what, mutate, field) in cases {
            let mut wire = pb::Authorization::from(&full_policy());
            mutate(&mut wire);
            let err = Policy::try_from(wire).expect_err(what).to_string();
            assert!(err.contains(field), "{what}: {err:?} should name {field}");
            assert!(err.starts_with("policy \"default/"), "{what}: {err:?}");
        }
    }

    #[test]
    fn cidr_error_message_is_readable() {
        let mut wire = pb::Authorization::from(&full_policy());
        wire.rules[0].clauses[0].matches[0].source_ips[0].length = 40;
        let err = Policy::try_from(wire).unwrap_err().to_string();
        assert!(
            err.contains("invalid CIDR length 40 for 10.0.0.0 (at most 32)"),
            "{err}"
        );
    }
}
