//! Services: the validated, internal form of `istio.workload.Service`.
//!
//! Endpoints are not part of a service: workloads name the services they back (see
//! [`super::Workload::services`]) and [`super::ProxyState`] joins the two.

use std::net::IpAddr;

use serde::Serialize;
use zmesh_proto::workload as pb;

use super::workload::{GatewayAddress, PortMapping, ip_from_bytes, ip_to_bytes};
use super::{FieldError, StateError};

/// A service (Kubernetes Service or ServiceEntry host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// e.g. `echo.default.svc.cluster.local`.
    pub hostname: String,
    /// Virtual IPs as `(network, ip)`.
    pub vips: Vec<(String, IpAddr)>,
    pub ports: Vec<PortMapping>,
    /// Identities the endpoints may present (in addition to their own workload identity).
    pub subject_alt_names: Vec<String>,
    pub waypoint: Option<GatewayAddress>,
}

impl Service {
    /// The service's key: `namespace/hostname` (also its xDS resource name).
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    /// The port mapping for a service port, if the service declares it.
    pub fn port(&self, service_port: u16) -> Option<&PortMapping> {
        self.ports.iter().find(|p| p.service_port == service_port)
    }

    /// Checks the invariants every stored service must hold.
    pub fn validate(&self) -> Result<(), StateError> {
        self.validate_fields()
            .map_err(|e| e.into_state("service", self.key()))
    }

    pub(crate) fn validate_fields(&self) -> Result<(), FieldError> {
        if self.namespace.is_empty() {
            return Err(FieldError::new(
                "namespace",
                "must not be empty (it is part of the service's key)",
            ));
        }
        if self.hostname.is_empty() {
            return Err(FieldError::new(
                "hostname",
                "must not be empty (it is part of the service's key)",
            ));
        }
        if let Some(i) = self.ports.iter().position(|p| p.service_port == 0) {
            return Err(FieldError::new(
                format!("ports[{i}].service_port"),
                "must not be 0",
            ));
        }
        Ok(())
    }
}

fn convert_service(s: pb::Service) -> Result<Service, FieldError> {
    let mut vips = Vec::with_capacity(s.addresses.len());
    for (i, a) in s.addresses.iter().enumerate() {
        let ip = ip_from_bytes(&a.address, &format!("addresses[{i}].address"))?;
        let full = if ip.is_ipv4() { 32 } else { 128 };
        match a.length {
            None => {}
            Some(len) if len == full => {}
            Some(len) => {
                // CIDR VIPs (ServiceEntry address ranges) are not routed by us yet; ignoring the
                // range keeps the rest of the service usable.
                tracing::warn!(
                    service = %format!("{}/{}", s.namespace, s.hostname),
                    vip = %format!("{ip}/{len}"),
                    "CIDR service addresses are not supported, ignoring this address"
                );
                continue;
            }
        }
        vips.push((a.network.clone(), ip));
    }
    let ports = s
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| PortMapping::from_wire(p, &format!("ports[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Service {
        vips,
        ports,
        waypoint: s
            .waypoint
            .as_ref()
            .map(|g| GatewayAddress::from_wire(g, "waypoint"))
            .transpose()?,
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        subject_alt_names: s.subject_alt_names,
    })
}

impl TryFrom<pb::Service> for Service {
    type Error = StateError;

    fn try_from(s: pb::Service) -> Result<Self, StateError> {
        let key = format!("{}/{}", s.namespace, s.hostname);
        let out = convert_service(s).map_err(|e| e.into_state("service", key))?;
        out.validate()?;
        Ok(out)
    }
}

impl From<&Service> for pb::Service {
    fn from(s: &Service) -> Self {
        pb::Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s.hostname.clone(),
            addresses: s
                .vips
                .iter()
                .map(|(network, ip)| pb::NetworkAddress {
                    network: network.clone(),
                    address: ip_to_bytes(*ip),
                    length: None,
                })
                .collect(),
            ports: s.ports.iter().map(|p| p.to_wire()).collect(),
            subject_alt_names: s.subject_alt_names.clone(),
            waypoint: s.waypoint.as_ref().map(GatewayAddress::to_wire),
            ..Default::default()
        }
    }
}

impl From<&Service> for pb::Address {
    fn from(s: &Service) -> Self {
        pb::Address {
            r#type: Some(pb::address::Type::Service(s.into())),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::workload::{AppProtocol, GatewayDestination};

    pub(crate) fn full_service() -> Service {
        Service {
            name: "echo".into(),
            namespace: "default".into(),
            hostname: "echo.default.svc.cluster.local".into(),
            vips: vec![
                (String::new(), "10.96.0.10".parse().unwrap()),
                ("net1".into(), "fd00:96::10".parse().unwrap()),
            ],
            ports: vec![
                PortMapping::new(80, 8080),
                PortMapping {
                    service_port: 443,
                    target_port: 0,
                    app_protocol: AppProtocol::Tls,
                },
            ],
            subject_alt_names: vec!["spiffe://cluster.local/ns/default/sa/echo".into()],
            waypoint: Some(GatewayAddress {
                destination: GatewayDestination::Address {
                    network: String::new(),
                    ip: "10.0.9.9".parse().unwrap(),
                },
                hbone_mtls_port: 15008,
            }),
        }
    }

    #[test]
    fn round_trip_through_proto() {
        let s = full_service();
        let back = Service::try_from(pb::Service::from(&s)).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.key(), "default/echo.default.svc.cluster.local");
    }

    #[test]
    fn cidr_vip_is_skipped_not_fatal() {
        let mut wire = pb::Service::from(&full_service());
        wire.addresses[0].length = Some(24);
        let s = Service::try_from(wire).unwrap();
        assert_eq!(
            s.vips,
            vec![("net1".to_string(), "fd00:96::10".parse().unwrap())]
        );
    }

    #[test]
    fn conversion_errors_name_the_field() {
        type Mutate = fn(&mut pb::Service);
        let cases: &[(&str, Mutate, &str)] = &[
            (
                "bad vip",
                |s| s.addresses[1].address = vec![1; 15],
                "addresses[1].address",
            ),
            ("empty hostname", |s| s.hostname.clear(), "hostname"),
            ("empty namespace", |s| s.namespace.clear(), "namespace"),
            (
                "port 0",
                |s| s.ports[1].service_port = 0,
                "ports[1].service_port",
            ),
            (
                "port too big",
                |s| s.ports[0].target_port = 65536,
                "ports[0].target_port",
            ),
            (
                "waypoint port too big",
                |s| s.waypoint.as_mut().unwrap().hbone_mtls_port = 1 << 20,
                "waypoint.hbone_mtls_port",
            ),
        ];
        for (what, mutate, field) in cases {
            let mut wire = pb::Service::from(&full_service());
            mutate(&mut wire);
            let err = Service::try_from(wire).expect_err(what).to_string();
            assert!(err.contains(field), "{what}: {err:?} should name {field}");
            assert!(err.starts_with("service "), "{what}: {err:?}");
        }
    }
}
