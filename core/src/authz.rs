//! Istio's L4 authorization, evaluated on the destination side for each connection (and again
//! for live connections when policies change).
//!
//! Order (as ztunnel): dry-run DENY policies are only logged; any matching DENY denies; dry-run
//! ALLOW policies are only logged; with no (non-dry-run) ALLOW policy the connection is allowed;
//! otherwise some ALLOW policy must match.
//!
//! Matching: a policy matches if any rule matches; a rule if all its clauses match (no clauses:
//! match); a clause if any of its matches match; a [`Match`] if every non-empty field matches
//! (positive lists: any element; `not_*` lists: no element). An empty `Match` never matches.
//! Identity fields (principals, namespaces, service accounts) need a peer identity: without one
//! the positive forms never match and the `not_*` forms always do — which is how STRICT mTLS
//! (`not_principals: [presence]`) denies plaintext.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::identity::Identity;
use crate::state::{
    Clause, Match, Policy, PolicyAction, ProxyState, Rule, ServiceAccountMatch, StringMatch,
    Workload,
};

/// The reason given when ALLOW policies exist but none matched.
pub const NO_ALLOW_MATCHED: &str = "no ALLOW policy matched";

/// What the destination knows about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionAttributes {
    /// The peer's verified identity (HBONE); `None` for plaintext.
    pub src_identity: Option<Identity>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `policy` is the `ns/name` of the DENY policy that matched, or [`NO_ALLOW_MATCHED`].
    Deny {
        policy: String,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Evaluates `policies` (those applying to the destination) against a connection.
pub fn evaluate(policies: &[Arc<Policy>], conn: &ConnectionAttributes) -> Decision {
    let of = |action: PolicyAction, dry_run: bool| {
        policies
            .iter()
            .filter(move |p| p.action == action && p.dry_run == dry_run)
    };

    for p in of(PolicyAction::Deny, true) {
        if p.matches(conn) {
            tracing::info!(policy = %p.key(), ?conn, "dry-run DENY policy would deny this connection");
        }
    }
    if let Some(p) = of(PolicyAction::Deny, false).find(|p| p.matches(conn)) {
        tracing::debug!(policy = %p.key(), ?conn, "connection denied by DENY policy");
        return Decision::Deny { policy: p.key() };
    }

    let mut dry_allows = of(PolicyAction::Allow, true).peekable();
    if dry_allows.peek().is_some() {
        let mut matched = None;
        for p in dry_allows {
            if p.matches(conn) {
                matched = Some(p.key());
                break;
            }
        }
        match matched {
            Some(policy) => {
                tracing::info!(%policy, ?conn, "dry-run ALLOW policy would allow this connection")
            }
            None => tracing::info!(?conn, "dry-run ALLOW policies would deny this connection"),
        }
    }

    let mut any_allow = false;
    for p in of(PolicyAction::Allow, false) {
        any_allow = true;
        if p.matches(conn) {
            return Decision::Allow;
        }
    }
    if any_allow {
        tracing::debug!(?conn, "connection denied: no ALLOW policy matched");
        Decision::Deny {
            policy: NO_ALLOW_MATCHED.to_string(),
        }
    } else {
        Decision::Allow
    }
}

impl ProxyState {
    /// Authorizes a connection to `dst` with the policies that apply to it.
    pub fn authorize(&self, dst: &Workload, conn: &ConnectionAttributes) -> Decision {
        evaluate(&self.policies_for(dst), conn)
    }
}

impl Policy {
    /// Whether any rule matches (regardless of action or dry-run).
    pub fn matches(&self, conn: &ConnectionAttributes) -> bool {
        self.rules.iter().any(|r| r.matches(conn))
    }
}

impl Rule {
    /// All clauses match; a rule without clauses matches everything.
    pub fn matches(&self, conn: &ConnectionAttributes) -> bool {
        self.clauses.iter().all(|c| c.matches(conn))
    }
}

impl Clause {
    pub fn matches(&self, conn: &ConnectionAttributes) -> bool {
        self.matches.iter().any(|m| m.matches(conn))
    }
}

impl StringMatch {
    pub fn matches(&self, s: &str) -> bool {
        match self {
            StringMatch::Exact(x) => s == x,
            StringMatch::Prefix(x) => s.starts_with(x.as_str()),
            StringMatch::Suffix(x) => s.ends_with(x.as_str()),
            StringMatch::Presence => !s.is_empty(),
        }
    }
}

impl ServiceAccountMatch {
    pub fn matches(&self, id: &Identity) -> bool {
        self.namespace == id.namespace() && self.service_account == id.service_account()
    }
}

/// A positive list: empty = no condition; else some element must match.
fn any_of<T>(list: &[T], hit: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(hit)
}

/// A negative list: empty = no condition; else no element may match.
fn none_of<T>(list: &[T], hit: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || !list.iter().any(hit)
}

/// For identity fields: `hit(identity, element)`, where a missing identity hits nothing (so
/// positive lists fail and negative lists pass).
fn id_hit<'a, T>(
    id: Option<&'a Identity>,
    hit: impl Fn(&Identity, &T) -> bool + 'a,
) -> impl Fn(&T) -> bool + 'a {
    move |x| id.is_some_and(|id| hit(id, x))
}

fn ip_in(ip: IpAddr) -> impl Fn(&IpNet) -> bool {
    // Normalise IPv4-mapped IPv6 from dual-stack sockets so IPv4 CIDRs apply.
    let ip = ip.to_canonical();
    move |net| net.contains(&ip)
}

impl Match {
    pub fn matches(&self, conn: &ConnectionAttributes) -> bool {
        if self.is_empty() {
            return false;
        }
        let id = conn.src_identity.as_ref();
        let principal = id.map(Identity::principal);
        let principal_hit = |m: &StringMatch| principal.as_deref().is_some_and(|p| m.matches(p));
        let ns_hit = id_hit(id, |id, m: &StringMatch| m.matches(id.namespace()));
        let sa_hit = id_hit(id, |id, m: &ServiceAccountMatch| m.matches(id));
        let port_hit = |p: &u16| *p == conn.dst_port;

        any_of(&self.namespaces, &ns_hit)
            && none_of(&self.not_namespaces, &ns_hit)
            && any_of(&self.principals, principal_hit)
            && none_of(&self.not_principals, principal_hit)
            && any_of(&self.service_accounts, &sa_hit)
            && none_of(&self.not_service_accounts, &sa_hit)
            && any_of(&self.source_ips, ip_in(conn.src_ip))
            && none_of(&self.not_source_ips, ip_in(conn.src_ip))
            && any_of(&self.destination_ips, ip_in(conn.dst_ip))
            && none_of(&self.not_destination_ips, ip_in(conn.dst_ip))
            && any_of(&self.destination_ports, port_hit)
            && none_of(&self.not_destination_ports, port_hit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{PolicyScope, StateStore, StateUpdate};

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    /// mTLS from `spiffe://cluster.local/ns/client-ns/sa/client` at 10.1.2.3 to 10.9.0.1:8080.
    fn mtls() -> ConnectionAttributes {
        ConnectionAttributes {
            src_identity: Some(id("spiffe://cluster.local/ns/client-ns/sa/client")),
            src_ip: "10.1.2.3".parse().unwrap(),
            dst_ip: "10.9.0.1".parse().unwrap(),
            dst_port: 8080,
        }
    }

    fn plaintext() -> ConnectionAttributes {
        ConnectionAttributes {
            src_identity: None,
            ..mtls()
        }
    }

    fn exact(s: &str) -> StringMatch {
        StringMatch::Exact(s.into())
    }

    fn sa(ns: &str, sa: &str) -> ServiceAccountMatch {
        ServiceAccountMatch {
            namespace: ns.into(),
            service_account: sa.into(),
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn policy(name: &str, action: PolicyAction, dry_run: bool, rules: Vec<Rule>) -> Arc<Policy> {
        Arc::new(Policy {
            name: name.into(),
            namespace: "ns".into(),
            scope: PolicyScope::Namespace,
            action,
            dry_run,
            rules,
        })
    }

    /// A rule with one clause holding these matches.
    fn rule(matches: Vec<Match>) -> Rule {
        Rule {
            clauses: vec![Clause { matches }],
        }
    }

    fn port(p: u16) -> Match {
        Match {
            destination_ports: vec![p],
            ..Match::default()
        }
    }

    #[test]
    fn string_match() {
        let cases = [
            (exact("abc"), "abc", true),
            (exact("abc"), "abcd", false),
            (exact(""), "", true),
            (
                StringMatch::Prefix("cluster.local/ns/".into()),
                "cluster.local/ns/a/sa/b",
                true,
            ),
            (
                StringMatch::Prefix("other/".into()),
                "cluster.local/ns/a/sa/b",
                false,
            ),
            (
                StringMatch::Suffix("/sa/b".into()),
                "cluster.local/ns/a/sa/b",
                true,
            ),
            (
                StringMatch::Suffix("/sa/c".into()),
                "cluster.local/ns/a/sa/b",
                false,
            ),
            (StringMatch::Presence, "anything", true),
            (StringMatch::Presence, "", false),
        ];
        for (m, s, want) in cases {
            assert_eq!(m.matches(s), want, "{m:?} on {s:?}");
        }
    }

    /// Every field and its `not_` form, against an mTLS and a plaintext connection.
    #[test]
    fn match_fields() {
        let m = Match::default;
        // (what, match, matches mTLS conn, matches plaintext conn)
        let cases: Vec<(&str, Match, bool, bool)> = vec![
            ("empty match never matches", m(), false, false),
            (
                "principal exact",
                Match {
                    principals: vec![exact("cluster.local/ns/client-ns/sa/client")],
                    ..m()
                },
                true,
                false,
            ),
            (
                "principal with spiffe:// never matches",
                Match {
                    principals: vec![exact("spiffe://cluster.local/ns/client-ns/sa/client")],
                    ..m()
                },
                false,
                false,
            ),
            (
                "principal other",
                Match {
                    principals: vec![exact("cluster.local/ns/x/sa/y")],
                    ..m()
                },
                false,
                false,
            ),
            (
                "principal any of",
                Match {
                    principals: vec![exact("x"), StringMatch::Suffix("/sa/client".into())],
                    ..m()
                },
                true,
                false,
            ),
            (
                "principal presence",
                Match {
                    principals: vec![StringMatch::Presence],
                    ..m()
                },
                true,
                false,
            ),
            (
                "not principal presence",
                Match {
                    not_principals: vec![StringMatch::Presence],
                    ..m()
                },
                false,
                true,
            ),
            (
                "not principal other",
                Match {
                    not_principals: vec![exact("cluster.local/ns/x/sa/y")],
                    ..m()
                },
                true,
                true,
            ),
            (
                "not principal self",
                Match {
                    not_principals: vec![exact("x"), StringMatch::Prefix("cluster.local/".into())],
                    ..m()
                },
                false,
                true,
            ),
            (
                "namespace",
                Match {
                    namespaces: vec![exact("client-ns")],
                    ..m()
                },
                true,
                false,
            ),
            (
                "namespace prefix",
                Match {
                    namespaces: vec![StringMatch::Prefix("client-".into())],
                    ..m()
                },
                true,
                false,
            ),
            (
                "namespace other",
                Match {
                    namespaces: vec![exact("other")],
                    ..m()
                },
                false,
                false,
            ),
            (
                "not namespace self",
                Match {
                    not_namespaces: vec![exact("client-ns")],
                    ..m()
                },
                false,
                true,
            ),
            (
                "not namespace other",
                Match {
                    not_namespaces: vec![exact("other")],
                    ..m()
                },
                true,
                true,
            ),
            (
                "service account",
                Match {
                    service_accounts: vec![sa("client-ns", "client")],
                    ..m()
                },
                true,
                false,
            ),
            (
                "service account wrong ns",
                Match {
                    service_accounts: vec![sa("other", "client")],
                    ..m()
                },
                false,
                false,
            ),
            (
                "service account wrong sa",
                Match {
                    service_accounts: vec![sa("client-ns", "other")],
                    ..m()
                },
                false,
                false,
            ),
            (
                "not service account self",
                Match {
                    not_service_accounts: vec![sa("client-ns", "client")],
                    ..m()
                },
                false,
                true,
            ),
            (
                "not service account other",
                Match {
                    not_service_accounts: vec![sa("client-ns", "other")],
                    ..m()
                },
                true,
                true,
            ),
            (
                "source ip cidr",
                Match {
                    source_ips: vec![net("10.1.0.0/16")],
                    ..m()
                },
                true,
                true,
            ),
            (
                "source ip /32",
                Match {
                    source_ips: vec![net("10.1.2.3/32")],
                    ..m()
                },
                true,
                true,
            ),
            (
                "source ip other",
                Match {
                    source_ips: vec![net("10.2.0.0/16"), net("fd00::/8")],
                    ..m()
                },
                false,
                false,
            ),
            (
                "not source ip self",
                Match {
                    not_source_ips: vec![net("10.0.0.0/8")],
                    ..m()
                },
                false,
                false,
            ),
            (
                "not source ip other",
                Match {
                    not_source_ips: vec![net("192.168.0.0/16")],
                    ..m()
                },
                true,
                true,
            ),
            (
                "destination ip",
                Match {
                    destination_ips: vec![net("10.9.0.1/32")],
                    ..m()
                },
                true,
                true,
            ),
            (
                "destination ip other",
                Match {
                    destination_ips: vec![net("10.9.0.2/32")],
                    ..m()
                },
                false,
                false,
            ),
            (
                "not destination ip self",
                Match {
                    not_destination_ips: vec![net("10.9.0.0/24")],
                    ..m()
                },
                false,
                false,
            ),
            (
                "not destination ip other",
                Match {
                    not_destination_ips: vec![net("10.8.0.0/24")],
                    ..m()
                },
                true,
                true,
            ),
            (
                "destination port",
                Match {
                    destination_ports: vec![80, 8080],
                    ..m()
                },
                true,
                true,
            ),
            (
                "destination port other",
                Match {
                    destination_ports: vec![80],
                    ..m()
                },
                false,
                false,
            ),
            (
                "not destination port self",
                Match {
                    not_destination_ports: vec![8080],
                    ..m()
                },
                false,
                false,
            ),
            (
                "not destination port other",
                Match {
                    not_destination_ports: vec![9999],
                    ..m()
                },
                true,
                true,
            ),
            (
                "all fields must match",
                Match {
                    destination_ports: vec![8080],
                    source_ips: vec![net("10.2.0.0/16")],
                    ..m()
                },
                false,
                false,
            ),
            (
                "all fields match",
                Match {
                    destination_ports: vec![8080],
                    namespaces: vec![exact("client-ns")],
                    source_ips: vec![net("10.0.0.0/8")],
                    ..m()
                },
                true,
                false,
            ),
        ];
        for (what, m, want_mtls, want_plain) in cases {
            assert_eq!(m.matches(&mtls()), want_mtls, "{what}: mTLS");
            assert_eq!(m.matches(&plaintext()), want_plain, "{what}: plaintext");
        }
    }

    #[test]
    fn ipv4_mapped_addresses_match_ipv4_cidrs() {
        let conn = ConnectionAttributes {
            src_ip: "::ffff:10.1.2.3".parse().unwrap(),
            ..mtls()
        };
        let m = Match {
            source_ips: vec![net("10.1.0.0/16")],
            ..Match::default()
        };
        assert!(m.matches(&conn));
    }

    #[test]
    fn rule_and_clause_logic() {
        let cases: Vec<(&str, Rule, bool)> = vec![
            ("no clauses matches", Rule::default(), true),
            (
                "clause without matches never matches",
                Rule {
                    clauses: vec![Clause::default()],
                },
                false,
            ),
            ("matches are OR", rule(vec![port(1), port(8080)]), true),
            (
                "empty match skipped, other matches",
                rule(vec![Match::default(), port(8080)]),
                true,
            ),
            ("only empty match", rule(vec![Match::default()]), false),
            (
                "clauses are AND (all match)",
                Rule {
                    clauses: vec![
                        Clause {
                            matches: vec![port(8080)],
                        },
                        Clause {
                            matches: vec![Match {
                                source_ips: vec![net("10.0.0.0/8")],
                                ..Match::default()
                            }],
                        },
                    ],
                },
                true,
            ),
            (
                "clauses are AND (one fails)",
                Rule {
                    clauses: vec![
                        Clause {
                            matches: vec![port(8080)],
                        },
                        Clause {
                            matches: vec![port(1)],
                        },
                    ],
                },
                false,
            ),
        ];
        for (what, r, want) in cases {
            assert_eq!(r.matches(&mtls()), want, "{what}");
        }
        // Policy: any rule.
        let p = policy(
            "p",
            PolicyAction::Allow,
            false,
            vec![rule(vec![port(1)]), rule(vec![port(8080)])],
        );
        assert!(p.matches(&mtls()));
        let p = policy("p", PolicyAction::Allow, false, vec![]);
        assert!(!p.matches(&mtls()), "no rules matches nothing");
    }

    #[test]
    fn evaluation_order() {
        use PolicyAction::{Allow, Deny};
        let hit = || vec![rule(vec![port(8080)])];
        let miss = || vec![rule(vec![port(1)])];
        let deny = |p: &str| Decision::Deny {
            policy: format!("ns/{p}"),
        };
        let not_allowed = Decision::Deny {
            policy: NO_ALLOW_MATCHED.into(),
        };
        let cases: Vec<(&str, Vec<Arc<Policy>>, Decision)> = vec![
            ("no policies: allow", vec![], Decision::Allow),
            (
                "dry-run DENY only logs",
                vec![policy("d", Deny, true, hit())],
                Decision::Allow,
            ),
            (
                "matching DENY denies",
                vec![policy("d", Deny, false, hit())],
                deny("d"),
            ),
            (
                "non-matching DENY, no ALLOW: allow",
                vec![policy("d", Deny, false, miss())],
                Decision::Allow,
            ),
            (
                "DENY beats ALLOW",
                vec![
                    policy("a", Allow, false, hit()),
                    policy("d", Deny, false, hit()),
                ],
                deny("d"),
            ),
            (
                "matching ALLOW allows",
                vec![policy("a", Allow, false, hit())],
                Decision::Allow,
            ),
            (
                "ALLOW present, none matching: deny",
                vec![policy("a", Allow, false, miss())],
                not_allowed.clone(),
            ),
            (
                "ALLOW without rules allows nothing",
                vec![policy("a", Allow, false, vec![])],
                not_allowed.clone(),
            ),
            (
                "any matching ALLOW allows",
                vec![
                    policy("a1", Allow, false, miss()),
                    policy("a2", Allow, false, hit()),
                ],
                Decision::Allow,
            ),
            (
                "dry-run ALLOW does not count as ALLOW",
                vec![policy("a", Allow, true, miss())],
                Decision::Allow,
            ),
            (
                "dry-run ALLOW does not allow",
                vec![
                    policy("a", Allow, true, hit()),
                    policy("b", Allow, false, miss()),
                ],
                not_allowed.clone(),
            ),
            (
                "dry-run DENY does not stop a real DENY",
                vec![
                    policy("d1", Deny, true, hit()),
                    policy("d2", Deny, false, hit()),
                ],
                deny("d2"),
            ),
            (
                "DENY with only empty matches has no effect",
                vec![policy("d", Deny, false, vec![rule(vec![Match::default()])])],
                Decision::Allow,
            ),
        ];
        for (what, policies, want) in cases {
            assert_eq!(evaluate(&policies, &mtls()), want, "{what}");
        }
    }

    #[test]
    fn strict_mtls_denies_plaintext_allows_mtls() {
        let strict = Arc::new(Policy::strict_mtls("strict", "ns", PolicyScope::Namespace));
        assert_eq!(
            evaluate(std::slice::from_ref(&strict), &mtls()),
            Decision::Allow
        );
        assert_eq!(
            evaluate(&[strict], &plaintext()),
            Decision::Deny {
                policy: "ns/strict".into()
            }
        );
    }

    #[test]
    fn proxy_state_authorize_uses_applicable_policies() {
        let store = StateStore::new();
        let dst = Workload {
            uid: "dst".into(),
            name: "dst".into(),
            namespace: "app".into(),
            service_account: "dst".into(),
            addresses: vec!["10.9.0.1".parse().unwrap()],
            ..Workload::default()
        };
        store.apply(StateUpdate {
            upsert_workloads: vec![dst.clone()],
            upsert_policies: vec![
                Policy::strict_mtls("strict", "app", PolicyScope::Namespace),
                // Another namespace's DENY-all must not apply.
                Policy {
                    name: "deny-all".into(),
                    namespace: "other".into(),
                    scope: PolicyScope::Namespace,
                    action: PolicyAction::Deny,
                    dry_run: false,
                    rules: vec![Rule::default()],
                },
            ],
            ..Default::default()
        });
        let st = store.read();
        assert_eq!(st.authorize(&dst, &mtls()), Decision::Allow);
        assert_eq!(
            st.authorize(&dst, &plaintext()),
            Decision::Deny {
                policy: "app/strict".into()
            }
        );
    }
}
