//! Workloads: the validated, internal form of `istio.workload.Workload`, plus the small value
//! types shared with services (port mappings, gateway addresses).
//!
//! Conversion from the wire is strict about anything that feeds routing or identity (address
//! byte lengths, port ranges, enum values, SPIFFE identity parts) so that a malformed resource
//! is rejected with a message naming it and the field, instead of half-working later.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;
use zmesh_proto::workload as pb;

use super::{FieldError, StateError};
use crate::identity::{DEFAULT_TRUST_DOMAIN, Identity, IdentityError};

/// How traffic to a workload is tunnelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TunnelProtocol {
    /// Plain TCP to the workload (not in the mesh, or mesh without HBONE).
    #[default]
    None,
    /// HBONE (HTTP/2 CONNECT over mTLS) to the workload's node proxy on 15008.
    Hbone,
}

/// Application protocol hint of a port (`istio.workload.AppProtocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AppProtocol {
    #[default]
    Unknown,
    Http11,
    Http2,
    Grpc,
    Tcp,
    Tls,
}

impl AppProtocol {
    /// Unknown wire values map to `Unknown`: the value is only a hint, never worth rejecting a
    /// whole workload or service over.
    pub fn from_wire(v: i32) -> Self {
        match pb::AppProtocol::try_from(v) {
            Ok(pb::AppProtocol::Http11) => Self::Http11,
            Ok(pb::AppProtocol::Http2) => Self::Http2,
            Ok(pb::AppProtocol::Grpc) => Self::Grpc,
            Ok(pb::AppProtocol::Tcp) => Self::Tcp,
            Ok(pb::AppProtocol::Tls) => Self::Tls,
            Ok(pb::AppProtocol::Unknown) | Err(_) => Self::Unknown,
        }
    }

    pub fn to_wire(self) -> i32 {
        (match self {
            Self::Unknown => pb::AppProtocol::Unknown,
            Self::Http11 => pb::AppProtocol::Http11,
            Self::Http2 => pb::AppProtocol::Http2,
            Self::Grpc => pb::AppProtocol::Grpc,
            Self::Tcp => pb::AppProtocol::Tcp,
            Self::Tls => pb::AppProtocol::Tls,
        }) as i32
    }
}

/// One service port and the workload (target) port it maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub service_port: u16,
    /// 0 means "not specified here" (the other side of the service/workload pair decides).
    pub target_port: u16,
    pub app_protocol: AppProtocol,
}

impl PortMapping {
    pub fn new(service_port: u16, target_port: u16) -> Self {
        PortMapping {
            service_port,
            target_port,
            app_protocol: AppProtocol::Unknown,
        }
    }

    pub(crate) fn from_wire(p: &pb::Port, field: &str) -> Result<Self, FieldError> {
        Ok(PortMapping {
            service_port: port_u16(p.service_port, &format!("{field}.service_port"))?,
            target_port: port_u16(p.target_port, &format!("{field}.target_port"))?,
            app_protocol: AppProtocol::from_wire(p.app_protocol),
        })
    }

    pub(crate) fn to_wire(self) -> pb::Port {
        pb::Port {
            service_port: u32::from(self.service_port),
            target_port: u32::from(self.target_port),
            app_protocol: self.app_protocol.to_wire(),
        }
    }
}

/// Where a waypoint or network gateway is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum GatewayDestination {
    /// A service, to be resolved through the state (`namespace/hostname`).
    Hostname { namespace: String, hostname: String },
    /// A fixed address.
    Address { network: String, ip: IpAddr },
}

/// Mirror of `istio.workload.GatewayAddress`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    /// The HBONE port of the gateway (15008 in practice).
    pub hbone_mtls_port: u16,
}

impl GatewayAddress {
    pub(crate) fn from_wire(g: &pb::GatewayAddress, field: &str) -> Result<Self, FieldError> {
        let destination = match &g.destination {
            None => {
                return Err(FieldError::new(
                    field,
                    "has neither a hostname nor an address",
                ));
            }
            Some(pb::gateway_address::Destination::Hostname(h)) => {
                if h.hostname.is_empty() {
                    return Err(FieldError::new(
                        format!("{field}.hostname.hostname"),
                        "must not be empty",
                    ));
                }
                GatewayDestination::Hostname {
                    namespace: h.namespace.clone(),
                    hostname: h.hostname.clone(),
                }
            }
            Some(pb::gateway_address::Destination::Address(a)) => GatewayDestination::Address {
                network: a.network.clone(),
                ip: ip_from_bytes(&a.address, &format!("{field}.address.address"))?,
            },
        };
        Ok(GatewayAddress {
            destination,
            hbone_mtls_port: port_u16(g.hbone_mtls_port, &format!("{field}.hbone_mtls_port"))?,
        })
    }

    pub(crate) fn to_wire(&self) -> pb::GatewayAddress {
        let destination = match &self.destination {
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
                namespace: namespace.clone(),
                hostname: hostname.clone(),
            }),
            GatewayDestination::Address { network, ip } => {
                pb::gateway_address::Destination::Address(pb::NetworkAddress {
                    network: network.clone(),
                    address: ip_to_bytes(*ip),
                    length: None,
                })
            }
        };
        pb::GatewayAddress {
            hbone_mtls_port: u32::from(self.hbone_mtls_port),
            destination: Some(destination),
        }
    }
}

/// Protocol the node proxy uses to hand traffic to a workload that terminates tunnels itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ApplicationTunnelProtocol {
    #[default]
    None,
    /// PROXY protocol v2 header in front of the plaintext stream.
    Proxy,
}

/// Mirror of `istio.workload.ApplicationTunnel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationTunnel {
    pub protocol: ApplicationTunnelProtocol,
    /// `None` = the default port (15088 in Istio's convention).
    pub port: Option<u16>,
}

/// The workload types Istio distinguishes (`istio.workload.WorkloadType`), as lowercase names.
pub const WORKLOAD_TYPES: [&str; 4] = ["deployment", "cronjob", "pod", "job"];

/// A workload (pod, VM, ...) as the proxies need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Unique key, e.g. `cluster1//v1/Pod/default/sleep-abc`.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    pub network: String,
    pub node: String,
    pub protocol: TunnelProtocol,
    /// Empty means [`DEFAULT_TRUST_DOMAIN`].
    pub trust_domain: String,
    pub service_account: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_name: String,
    /// One of [`WORKLOAD_TYPES`]; empty is treated as "deployment".
    pub workload_type: String,
    pub cluster_id: String,
    /// Services this workload backs: `"ns/hostname"` -> port mappings.
    pub services: BTreeMap<String, Vec<PortMapping>>,
    /// Selector-scoped policies bound to this workload (`"ns/name"`).
    pub authorization_policies: Vec<String>,
    pub healthy: bool,
    pub waypoint: Option<GatewayAddress>,
    pub network_gateway: Option<GatewayAddress>,
    pub application_tunnel: Option<ApplicationTunnel>,
}

impl Default for Workload {
    /// An empty (not yet valid: no uid) workload, handy with struct-update syntax.
    fn default() -> Self {
        Workload {
            uid: String::new(),
            name: String::new(),
            namespace: String::new(),
            addresses: Vec::new(),
            network: String::new(),
            node: String::new(),
            protocol: TunnelProtocol::None,
            trust_domain: String::new(),
            service_account: String::new(),
            canonical_name: String::new(),
            canonical_revision: String::new(),
            workload_name: String::new(),
            workload_type: String::new(),
            cluster_id: String::new(),
            services: BTreeMap::new(),
            authorization_policies: Vec::new(),
            // Healthy unless told otherwise, like the proto default (HEALTHY = 0).
            healthy: true,
            waypoint: None,
            network_gateway: None,
            application_tunnel: None,
        }
    }
}

impl Workload {
    /// The name used in error messages: the uid, or `namespace/name` when there is none.
    pub fn display_name(&self) -> String {
        display_name(&self.uid, &self.namespace, &self.name)
    }

    fn effective_trust_domain(&self) -> &str {
        if self.trust_domain.is_empty() {
            DEFAULT_TRUST_DOMAIN
        } else {
            &self.trust_domain
        }
    }

    /// The workload's SPIFFE identity, or why its parts do not form one.
    pub fn try_identity(&self) -> Result<Identity, IdentityError> {
        Identity::new(
            self.effective_trust_domain(),
            self.namespace.clone(),
            self.service_account.clone(),
        )
    }

    /// The workload's SPIFFE identity (trust domain defaults to `cluster.local`).
    ///
    /// Workloads in a [`super::ProxyState`] are validated on entry, so this always succeeds for
    /// them. For a hand-built invalid workload it logs an error and returns an identity in the
    /// reserved `invalid` trust domain, which no policy or certificate will match.
    pub fn identity(&self) -> Identity {
        self.try_identity().unwrap_or_else(|e| {
            tracing::error!(workload = %self.display_name(), error = %e, "workload has no valid identity");
            Identity::new("invalid", "invalid", "invalid")
                .expect("constant identity parts are valid")
        })
    }

    /// Checks the invariants every stored workload must hold.
    pub fn validate(&self) -> Result<(), StateError> {
        self.validate_fields()
            .map_err(|e| e.into_state("workload", self.display_name()))
    }

    pub(crate) fn validate_fields(&self) -> Result<(), FieldError> {
        if self.uid.is_empty() {
            return Err(FieldError::new(
                "uid",
                "must not be empty (it is the workload's key)",
            ));
        }
        if let Err(e) = self.try_identity() {
            let field = match &e {
                IdentityError::BadSegment(_, "trust domain") => "trust_domain",
                IdentityError::BadSegment(_, "namespace") => "namespace",
                _ => "service_account",
            };
            return Err(FieldError::new(
                field,
                format!("does not form a valid SPIFFE identity: {e}"),
            ));
        }
        if !self.workload_type.is_empty() && !WORKLOAD_TYPES.contains(&self.workload_type.as_str())
        {
            return Err(FieldError::new(
                "workload_type",
                format!(
                    "{:?} is not one of {}",
                    self.workload_type,
                    WORKLOAD_TYPES.join(", ")
                ),
            ));
        }
        for key in self.services.keys() {
            if split_key(key).is_none() {
                return Err(FieldError::new(
                    format!("services[{key:?}]"),
                    "key must be \"namespace/hostname\"",
                ));
            }
        }
        Ok(())
    }
}

/// `uid`, or `namespace/name` when there is no uid (for messages only).
pub(crate) fn display_name(uid: &str, namespace: &str, name: &str) -> String {
    if uid.is_empty() {
        format!("{namespace}/{name}")
    } else {
        uid.to_string()
    }
}

/// Splits `"ns/rest"` into its two non-empty parts.
pub(crate) fn split_key(key: &str) -> Option<(&str, &str)> {
    let (ns, rest) = key.split_once('/')?;
    (!ns.is_empty() && !rest.is_empty()).then_some((ns, rest))
}

/// Raw address bytes (4 = IPv4, 16 = IPv6) to an address.
pub(crate) fn ip_from_bytes(b: &[u8], field: &str) -> Result<IpAddr, FieldError> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        return Ok(IpAddr::from(v4));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(b) {
        return Ok(IpAddr::from(v6));
    }
    Err(FieldError::new(
        field,
        format!(
            "address is {} bytes long, expected 4 (IPv4) or 16 (IPv6)",
            b.len()
        ),
    ))
}

pub(crate) fn ip_to_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

pub(crate) fn port_u16(p: u32, field: &str) -> Result<u16, FieldError> {
    u16::try_from(p).map_err(|_| FieldError::new(field, format!("port {p} is above 65535")))
}

fn workload_type_from_wire(v: i32) -> Result<&'static str, FieldError> {
    match pb::WorkloadType::try_from(v) {
        Ok(pb::WorkloadType::Deployment) => Ok("deployment"),
        Ok(pb::WorkloadType::Cronjob) => Ok("cronjob"),
        Ok(pb::WorkloadType::Pod) => Ok("pod"),
        Ok(pb::WorkloadType::Job) => Ok("job"),
        Err(_) => Err(FieldError::new(
            "workload_type",
            format!("unknown enum value {v}"),
        )),
    }
}

fn workload_type_to_wire(s: &str) -> i32 {
    (match s {
        "cronjob" => pb::WorkloadType::Cronjob,
        "pod" => pb::WorkloadType::Pod,
        "job" => pb::WorkloadType::Job,
        _ => pb::WorkloadType::Deployment,
    }) as i32
}

fn convert_workload(w: pb::Workload) -> Result<Workload, FieldError> {
    let addresses = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| ip_from_bytes(a, &format!("addresses[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(pb::TunnelProtocol::None) => TunnelProtocol::None,
        Ok(pb::TunnelProtocol::Hbone) => TunnelProtocol::Hbone,
        Ok(pb::TunnelProtocol::LegacyIstioMtls) => {
            // We do not speak Istio's sidecar mTLS; plain TCP at least reaches the workload
            // (its sidecar accepts plaintext in PERMISSIVE mode).
            tracing::warn!(
                workload = %display_name(&w.uid, &w.namespace, &w.name),
                "tunnel_protocol LEGACY_ISTIO_MTLS is not supported, treating it as NONE"
            );
            TunnelProtocol::None
        }
        Err(_) => {
            return Err(FieldError::new(
                "tunnel_protocol",
                format!("unknown enum value {}", w.tunnel_protocol),
            ));
        }
    };
    let healthy = match pb::WorkloadStatus::try_from(w.status) {
        Ok(pb::WorkloadStatus::Healthy) => true,
        Ok(pb::WorkloadStatus::Unhealthy) => false,
        Err(_) => {
            return Err(FieldError::new(
                "status",
                format!("unknown enum value {}", w.status),
            ));
        }
    };
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        let ports = list
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| PortMapping::from_wire(p, &format!("services[{key:?}].ports[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        services.insert(key.clone(), ports);
    }
    let application_tunnel = match &w.application_tunnel {
        None => None,
        Some(t) => Some(ApplicationTunnel {
            protocol: match pb::application_tunnel::Protocol::try_from(t.protocol) {
                Ok(pb::application_tunnel::Protocol::None) => ApplicationTunnelProtocol::None,
                Ok(pb::application_tunnel::Protocol::Proxy) => ApplicationTunnelProtocol::Proxy,
                Err(_) => {
                    return Err(FieldError::new(
                        "application_tunnel.protocol",
                        format!("unknown enum value {}", t.protocol),
                    ));
                }
            },
            port: match port_u16(t.port, "application_tunnel.port")? {
                0 => None,
                p => Some(p),
            },
        }),
    };
    Ok(Workload {
        addresses,
        protocol,
        healthy,
        services,
        application_tunnel,
        workload_type: workload_type_from_wire(w.workload_type)?.to_string(),
        waypoint: w
            .waypoint
            .as_ref()
            .map(|g| GatewayAddress::from_wire(g, "waypoint"))
            .transpose()?,
        network_gateway: w
            .network_gateway
            .as_ref()
            .map(|g| GatewayAddress::from_wire(g, "network_gateway"))
            .transpose()?,
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        network: w.network,
        node: w.node,
        trust_domain: w.trust_domain,
        service_account: w.service_account,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        workload_name: w.workload_name,
        cluster_id: w.cluster_id,
        authorization_policies: w.authorization_policies,
    })
}

impl TryFrom<pb::Workload> for Workload {
    type Error = StateError;

    fn try_from(w: pb::Workload) -> Result<Self, StateError> {
        let name = display_name(&w.uid, &w.namespace, &w.name);
        let out = convert_workload(w).map_err(|e| e.into_state("workload", name))?;
        out.validate()?;
        Ok(out)
    }
}

impl From<&Workload> for pb::Workload {
    fn from(w: &Workload) -> Self {
        pb::Workload {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            addresses: w.addresses.iter().map(|ip| ip_to_bytes(*ip)).collect(),
            network: w.network.clone(),
            tunnel_protocol: (match w.protocol {
                TunnelProtocol::None => pb::TunnelProtocol::None,
                TunnelProtocol::Hbone => pb::TunnelProtocol::Hbone,
            }) as i32,
            trust_domain: w.trust_domain.clone(),
            service_account: w.service_account.clone(),
            waypoint: w.waypoint.as_ref().map(GatewayAddress::to_wire),
            network_gateway: w.network_gateway.as_ref().map(GatewayAddress::to_wire),
            node: w.node.clone(),
            canonical_name: w.canonical_name.clone(),
            canonical_revision: w.canonical_revision.clone(),
            workload_type: workload_type_to_wire(&w.workload_type),
            workload_name: w.workload_name.clone(),
            application_tunnel: w.application_tunnel.map(|t| pb::ApplicationTunnel {
                protocol: (match t.protocol {
                    ApplicationTunnelProtocol::None => pb::application_tunnel::Protocol::None,
                    ApplicationTunnelProtocol::Proxy => pb::application_tunnel::Protocol::Proxy,
                }) as i32,
                port: t.port.map_or(0, u32::from),
            }),
            services: w
                .services
                .iter()
                .map(|(k, ports)| {
                    (
                        k.clone(),
                        pb::PortList {
                            ports: ports.iter().map(|p| p.to_wire()).collect(),
                        },
                    )
                })
                .collect(),
            authorization_policies: w.authorization_policies.clone(),
            status: (if w.healthy {
                pb::WorkloadStatus::Healthy
            } else {
                pb::WorkloadStatus::Unhealthy
            }) as i32,
            cluster_id: w.cluster_id.clone(),
            ..Default::default()
        }
    }
}

impl From<&Workload> for pb::Address {
    fn from(w: &Workload) -> Self {
        pb::Address {
            r#type: Some(pb::address::Type::Workload(w.into())),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid workload with every field set, for round trips and state tests.
    pub(crate) fn full_workload() -> Workload {
        Workload {
            uid: "cluster1//v1/Pod/default/sleep-1".into(),
            name: "sleep-1".into(),
            namespace: "default".into(),
            addresses: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            network: "net1".into(),
            node: "node1".into(),
            protocol: TunnelProtocol::Hbone,
            trust_domain: "example.org".into(),
            service_account: "sleep".into(),
            canonical_name: "sleep".into(),
            canonical_revision: "v1".into(),
            workload_name: "sleep".into(),
            workload_type: "pod".into(),
            cluster_id: "cluster1".into(),
            services: BTreeMap::from([(
                "default/sleep.default.svc.cluster.local".into(),
                vec![PortMapping {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: AppProtocol::Http11,
                }],
            )]),
            authorization_policies: vec!["default/allow-sleep".into()],
            healthy: false,
            waypoint: Some(GatewayAddress {
                destination: GatewayDestination::Hostname {
                    namespace: "default".into(),
                    hostname: "waypoint.default.svc.cluster.local".into(),
                },
                hbone_mtls_port: 15008,
            }),
            network_gateway: Some(GatewayAddress {
                destination: GatewayDestination::Address {
                    network: "net2".into(),
                    ip: "192.168.1.1".parse().unwrap(),
                },
                hbone_mtls_port: 15008,
            }),
            application_tunnel: Some(ApplicationTunnel {
                protocol: ApplicationTunnelProtocol::Proxy,
                port: Some(15088),
            }),
        }
    }

    #[test]
    fn round_trip_through_proto() {
        let w = full_workload();
        let wire = pb::Workload::from(&w);
        let back = Workload::try_from(wire).unwrap();
        assert_eq!(back, w);
    }

    #[test]
    fn identity_defaults_trust_domain() {
        let w = Workload {
            trust_domain: String::new(),
            ..full_workload()
        };
        assert_eq!(
            w.identity().to_string(),
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert_eq!(
            full_workload().identity().to_string(),
            "spiffe://example.org/ns/default/sa/sleep"
        );
    }

    #[test]
    fn legacy_mtls_is_treated_as_none() {
        let mut wire = pb::Workload::from(&full_workload());
        wire.tunnel_protocol = pb::TunnelProtocol::LegacyIstioMtls as i32;
        assert_eq!(
            Workload::try_from(wire).unwrap().protocol,
            TunnelProtocol::None
        );
    }

    #[test]
    fn conversion_errors_name_the_field() {
        type Mutate = fn(&mut pb::Workload);
        let cases: &[(&str, Mutate, &str)] = &[
            (
                "bad ip length",
                |w| w.addresses[1] = vec![1, 2, 3, 4, 5],
                "addresses[1]",
            ),
            ("empty uid", |w| w.uid.clear(), "uid"),
            ("empty namespace", |w| w.namespace.clear(), "namespace"),
            (
                "bad service account",
                |w| w.service_account = "a/b".into(),
                "service_account",
            ),
            (
                "empty service account",
                |w| w.service_account.clear(),
                "service_account",
            ),
            (
                "bad trust domain",
                |w| w.trust_domain = "bad domain".into(),
                "trust_domain",
            ),
            (
                "unknown tunnel protocol",
                |w| w.tunnel_protocol = 9,
                "tunnel_protocol",
            ),
            ("unknown status", |w| w.status = 7, "status"),
            (
                "unknown workload type",
                |w| w.workload_type = 42,
                "workload_type",
            ),
            (
                "port above 65535",
                |w| {
                    w.services
                        .values_mut()
                        .for_each(|l| l.ports[0].target_port = 70000)
                },
                "target_port",
            ),
            (
                "bad service key",
                |w| {
                    w.services.insert("nohost".into(), pb::PortList::default());
                },
                "services[\"nohost\"]",
            ),
            (
                "waypoint without destination",
                |w| w.waypoint.as_mut().unwrap().destination = None,
                "waypoint",
            ),
            (
                "gateway with bad ip",
                |w| {
                    w.network_gateway = Some(pb::GatewayAddress {
                        hbone_mtls_port: 15008,
                        destination: Some(pb::gateway_address::Destination::Address(
                            pb::NetworkAddress {
                                network: String::new(),
                                address: vec![1],
                                length: None,
                            },
                        )),
                    })
                },
                "network_gateway.address.address",
            ),
        ];
        for (what, mutate, field) in cases {
            let mut wire = pb::Workload::from(&full_workload());
            mutate(&mut wire);
            let err = Workload::try_from(wire).expect_err(what).to_string();
            assert!(err.contains(field), "{what}: {err:?} should name {field}");
            assert!(err.starts_with("workload "), "{what}: {err:?}");
        }
    }

    #[test]
    fn error_names_the_workload() {
        let mut wire = pb::Workload::from(&full_workload());
        wire.addresses = vec![vec![0; 3]];
        let err = Workload::try_from(wire).unwrap_err().to_string();
        assert!(err.contains("cluster1//v1/Pod/default/sleep-1"), "{err}");
        assert!(err.contains("3 bytes"), "{err}");
    }
}
