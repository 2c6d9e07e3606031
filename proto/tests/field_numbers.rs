//! Wire-compatibility guard: every field is encoded alone and its tag is checked against the
//! field number Istio/Envoy use (from the wire-facts notes), or, for span export, the OTLP
//! specification's. A renumbered field fails here.

use prost::Message;
use zmesh_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use zmesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource};
use zmesh_proto::security::{self, Authorization, Clause, Match, Rule, StringMatch};
use zmesh_proto::workload::{
    self, Address, GatewayAddress, NetworkAddress, Port, Service, Workload,
};

/// Decode the first key of an encoded message: (field number, wire type).
fn first_key(buf: &[u8]) -> (u32, u8) {
    let mut v: u64 = 0;
    for (i, b) in buf.iter().enumerate() {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
    }
    ((v >> 3) as u32, (v & 7) as u8)
}

fn check<M: Message>(name: &str, m: M, field: u32, wire: u8) {
    let buf = m.encode_to_vec();
    assert!(!buf.is_empty(), "{name}: encoded nothing");
    assert_eq!(
        first_key(&buf),
        (field, wire),
        "{name}: wrong field number or wire type"
    );
}

const LEN: u8 = 2;
const VARINT: u8 = 0;
const I64: u8 = 1;
const I32: u8 = 5;

#[test]
fn workload_fields() {
    let s = || "x".to_string();
    check(
        "Workload.uid",
        Workload {
            uid: s(),
            ..Default::default()
        },
        20,
        LEN,
    );
    check(
        "Workload.name",
        Workload {
            name: s(),
            ..Default::default()
        },
        1,
        LEN,
    );
    check(
        "Workload.namespace",
        Workload {
            namespace: s(),
            ..Default::default()
        },
        2,
        LEN,
    );
    check(
        "Workload.addresses",
        Workload {
            addresses: vec![vec![10, 0, 0, 1]],
            ..Default::default()
        },
        3,
        LEN,
    );
    check(
        "Workload.hostname",
        Workload {
            hostname: s(),
            ..Default::default()
        },
        21,
        LEN,
    );
    check(
        "Workload.network",
        Workload {
            network: s(),
            ..Default::default()
        },
        4,
        LEN,
    );
    check(
        "Workload.tunnel_protocol",
        Workload {
            tunnel_protocol: workload::TunnelProtocol::Hbone as i32,
            ..Default::default()
        },
        5,
        VARINT,
    );
    check(
        "Workload.trust_domain",
        Workload {
            trust_domain: s(),
            ..Default::default()
        },
        6,
        LEN,
    );
    check(
        "Workload.service_account",
        Workload {
            service_account: s(),
            ..Default::default()
        },
        7,
        LEN,
    );
    check(
        "Workload.waypoint",
        Workload {
            waypoint: Some(GatewayAddress {
                hbone_mtls_port: 15008,
                ..Default::default()
            }),
            ..Default::default()
        },
        8,
        LEN,
    );
    check(
        "Workload.network_gateway",
        Workload {
            network_gateway: Some(GatewayAddress {
                hbone_mtls_port: 15008,
                ..Default::default()
            }),
            ..Default::default()
        },
        19,
        LEN,
    );
    check(
        "Workload.node",
        Workload {
            node: s(),
            ..Default::default()
        },
        9,
        LEN,
    );
    check(
        "Workload.canonical_name",
        Workload {
            canonical_name: s(),
            ..Default::default()
        },
        10,
        LEN,
    );
    check(
        "Workload.canonical_revision",
        Workload {
            canonical_revision: s(),
            ..Default::default()
        },
        11,
        LEN,
    );
    check(
        "Workload.workload_type",
        Workload {
            workload_type: workload::WorkloadType::Pod as i32,
            ..Default::default()
        },
        12,
        VARINT,
    );
    check(
        "Workload.workload_name",
        Workload {
            workload_name: s(),
            ..Default::default()
        },
        13,
        LEN,
    );
    check(
        "Workload.native_tunnel",
        Workload {
            native_tunnel: true,
            ..Default::default()
        },
        14,
        VARINT,
    );
    check(
        "Workload.application_tunnel",
        Workload {
            application_tunnel: Some(workload::ApplicationTunnel {
                protocol: 1,
                port: 15088,
            }),
            ..Default::default()
        },
        23,
        LEN,
    );
    check(
        "Workload.services",
        Workload {
            services: [("ns/h".to_string(), workload::PortList::default())].into(),
            ..Default::default()
        },
        22,
        LEN,
    );
    check(
        "Workload.authorization_policies",
        Workload {
            authorization_policies: vec![s()],
            ..Default::default()
        },
        16,
        LEN,
    );
    check(
        "Workload.status",
        Workload {
            status: workload::WorkloadStatus::Unhealthy as i32,
            ..Default::default()
        },
        17,
        VARINT,
    );
    check(
        "Workload.cluster_id",
        Workload {
            cluster_id: s(),
            ..Default::default()
        },
        18,
        LEN,
    );
    check(
        "Workload.locality",
        Workload {
            locality: Some(workload::Locality {
                region: s(),
                ..Default::default()
            }),
            ..Default::default()
        },
        24,
        LEN,
    );
    check(
        "Workload.network_mode",
        Workload {
            network_mode: workload::NetworkMode::HostNetwork as i32,
            ..Default::default()
        },
        25,
        VARINT,
    );
    check(
        "Workload.capacity",
        Workload {
            capacity: Some(3),
            ..Default::default()
        },
        27,
        LEN,
    );
}

#[test]
fn service_and_address_fields() {
    let s = || "x".to_string();
    check(
        "Service.name",
        Service {
            name: s(),
            ..Default::default()
        },
        1,
        LEN,
    );
    check(
        "Service.namespace",
        Service {
            namespace: s(),
            ..Default::default()
        },
        2,
        LEN,
    );
    check(
        "Service.hostname",
        Service {
            hostname: s(),
            ..Default::default()
        },
        3,
        LEN,
    );
    check(
        "Service.addresses",
        Service {
            addresses: vec![NetworkAddress::default()],
            ..Default::default()
        },
        4,
        LEN,
    );
    check(
        "Service.ports",
        Service {
            ports: vec![Port::default()],
            ..Default::default()
        },
        5,
        LEN,
    );
    check(
        "Service.subject_alt_names",
        Service {
            subject_alt_names: vec![s()],
            ..Default::default()
        },
        6,
        LEN,
    );
    check(
        "Service.waypoint",
        Service {
            waypoint: Some(GatewayAddress::default()),
            ..Default::default()
        },
        7,
        LEN,
    );
    check(
        "Service.load_balancing",
        Service {
            load_balancing: Some(workload::LoadBalancing::default()),
            ..Default::default()
        },
        8,
        LEN,
    );
    check(
        "Service.ip_families",
        Service {
            ip_families: workload::IpFamilies::Dual as i32,
            ..Default::default()
        },
        9,
        VARINT,
    );
    check(
        "Service.canonical",
        Service {
            canonical: true,
            ..Default::default()
        },
        11,
        VARINT,
    );
    check(
        "Service.ingress_use_waypoint",
        Service {
            ingress_use_waypoint: true,
            ..Default::default()
        },
        12,
        VARINT,
    );
    check(
        "Service.weighted_waypoints",
        Service {
            weighted_waypoints: vec![workload::WeightedWaypoint::default()],
            ..Default::default()
        },
        13,
        LEN,
    );
    check(
        "Service.visibility",
        Service {
            visibility: 1,
            ..Default::default()
        },
        14,
        VARINT,
    );
    check(
        "Address.workload",
        Address {
            r#type: Some(workload::address::Type::Workload(Workload::default())),
        },
        1,
        LEN,
    );
    check(
        "Address.service",
        Address {
            r#type: Some(workload::address::Type::Service(Service::default())),
        },
        2,
        LEN,
    );
    check(
        "Port.service_port",
        Port {
            service_port: 80,
            ..Default::default()
        },
        1,
        VARINT,
    );
    check(
        "Port.target_port",
        Port {
            target_port: 80,
            ..Default::default()
        },
        2,
        VARINT,
    );
    check(
        "Port.app_protocol",
        Port {
            app_protocol: workload::AppProtocol::Http11 as i32,
            ..Default::default()
        },
        3,
        VARINT,
    );
    check(
        "NetworkAddress.network",
        NetworkAddress {
            network: s(),
            ..Default::default()
        },
        1,
        LEN,
    );
    check(
        "NetworkAddress.address",
        NetworkAddress {
            address: vec![1, 2, 3, 4],
            ..Default::default()
        },
        2,
        LEN,
    );
    check(
        "NetworkAddress.length",
        NetworkAddress {
            length: Some(24),
            ..Default::default()
        },
        3,
        VARINT,
    );
    check(
        "GatewayAddress.hostname",
        GatewayAddress {
            destination: Some(workload::gateway_address::Destination::Hostname(
                workload::NamespacedHostname {
                    namespace: s(),
                    hostname: s(),
                },
            )),
            ..Default::default()
        },
        1,
        LEN,
    );
    check(
        "GatewayAddress.address",
        GatewayAddress {
            destination: Some(workload::gateway_address::Destination::Address(
                NetworkAddress::default(),
            )),
            ..Default::default()
        },
        2,
        LEN,
    );
    check(
        "GatewayAddress.hbone_mtls_port",
        GatewayAddress {
            hbone_mtls_port: 15008,
            ..Default::default()
        },
        3,
        VARINT,
    );
    // Enum values are part of the wire format too.
    assert_eq!(workload::TunnelProtocol::Hbone as i32, 1);
    assert_eq!(workload::WorkloadStatus::Unhealthy as i32, 1);
    assert_eq!(workload::AppProtocol::Grpc as i32, 3);
}

#[test]
fn authorization_fields() {
    let s = || "x".to_string();
    let sm = || StringMatch {
        match_type: Some(security::string_match::MatchType::Exact(s())),
    };
    let addr = || security::Address {
        address: vec![10, 0, 0, 0],
        length: 8,
    };
    check(
        "Authorization.name",
        Authorization {
            name: s(),
            ..Default::default()
        },
        1,
        LEN,
    );
    check(
        "Authorization.namespace",
        Authorization {
            namespace: s(),
            ..Default::default()
        },
        2,
        LEN,
    );
    check(
        "Authorization.scope",
        Authorization {
            scope: security::Scope::WorkloadSelector as i32,
            ..Default::default()
        },
        3,
        VARINT,
    );
    check(
        "Authorization.action",
        Authorization {
            action: security::Action::Deny as i32,
            ..Default::default()
        },
        4,
        VARINT,
    );
    check(
        "Authorization.rules",
        Authorization {
            rules: vec![Rule::default()],
            ..Default::default()
        },
        5,
        LEN,
    );
    check(
        "Authorization.dry_run",
        Authorization {
            dry_run: true,
            ..Default::default()
        },
        6,
        VARINT,
    );
    check(
        "Rule.clauses",
        Rule {
            clauses: vec![Clause::default()],
        },
        1,
        LEN,
    );
    check(
        "Clause.matches",
        Clause {
            matches: vec![Match::default()],
        },
        2,
        LEN,
    );
    check(
        "Match.namespaces",
        Match {
            namespaces: vec![sm()],
            ..Default::default()
        },
        1,
        LEN,
    );
    check(
        "Match.not_namespaces",
        Match {
            not_namespaces: vec![sm()],
            ..Default::default()
        },
        2,
        LEN,
    );
    check(
        "Match.principals",
        Match {
            principals: vec![sm()],
            ..Default::default()
        },
        3,
        LEN,
    );
    check(
        "Match.not_principals",
        Match {
            not_principals: vec![sm()],
            ..Default::default()
        },
        4,
        LEN,
    );
    check(
        "Match.source_ips",
        Match {
            source_ips: vec![addr()],
            ..Default::default()
        },
        5,
        LEN,
    );
    check(
        "Match.not_source_ips",
        Match {
            not_source_ips: vec![addr()],
            ..Default::default()
        },
        6,
        LEN,
    );
    check(
        "Match.destination_ips",
        Match {
            destination_ips: vec![addr()],
            ..Default::default()
        },
        7,
        LEN,
    );
    check(
        "Match.not_destination_ips",
        Match {
            not_destination_ips: vec![addr()],
            ..Default::default()
        },
        8,
        LEN,
    );
    check(
        "Match.destination_ports",
        Match {
            destination_ports: vec![80],
            ..Default::default()
        },
        9,
        LEN,
    );
    check(
        "Match.not_destination_ports",
        Match {
            not_destination_ports: vec![80],
            ..Default::default()
        },
        10,
        LEN,
    );
    check(
        "Match.service_accounts",
        Match {
            service_accounts: vec![security::ServiceAccountMatch {
                namespace: s(),
                service_account: s(),
            }],
            ..Default::default()
        },
        11,
        LEN,
    );
    check(
        "Match.not_service_accounts",
        Match {
            not_service_accounts: vec![security::ServiceAccountMatch::default()],
            ..Default::default()
        },
        12,
        LEN,
    );
    check("StringMatch.exact", sm(), 1, LEN);
    check(
        "StringMatch.prefix",
        StringMatch {
            match_type: Some(security::string_match::MatchType::Prefix(s())),
        },
        2,
        LEN,
    );
    check(
        "StringMatch.suffix",
        StringMatch {
            match_type: Some(security::string_match::MatchType::Suffix(s())),
        },
        3,
        LEN,
    );
    check(
        "StringMatch.presence",
        StringMatch {
            match_type: Some(security::string_match::MatchType::Presence(())),
        },
        4,
        LEN,
    );
    check("Address.address", addr(), 1, LEN);
    check(
        "Address.length",
        security::Address {
            address: vec![],
            length: 8,
        },
        2,
        VARINT,
    );
    assert_eq!(security::Action::Deny as i32, 1);
    assert_eq!(security::Scope::WorkloadSelector as i32, 2);
}

#[test]
fn discovery_and_ca_fields() {
    let s = || "x".to_string();
    check(
        "DeltaDiscoveryRequest.node",
        DeltaDiscoveryRequest {
            node: Some(Node {
                id: s(),
                ..Default::default()
            }),
            ..Default::default()
        },
        1,
        LEN,
    );
    check(
        "DeltaDiscoveryRequest.type_url",
        DeltaDiscoveryRequest {
            type_url: s(),
            ..Default::default()
        },
        2,
        LEN,
    );
    check(
        "DeltaDiscoveryRequest.resource_names_subscribe",
        DeltaDiscoveryRequest {
            resource_names_subscribe: vec![s()],
            ..Default::default()
        },
        3,
        LEN,
    );
    check(
        "DeltaDiscoveryRequest.resource_names_unsubscribe",
        DeltaDiscoveryRequest {
            resource_names_unsubscribe: vec![s()],
            ..Default::default()
        },
        4,
        LEN,
    );
    check(
        "DeltaDiscoveryRequest.initial_resource_versions",
        DeltaDiscoveryRequest {
            initial_resource_versions: [(s(), s())].into(),
            ..Default::default()
        },
        5,
        LEN,
    );
    check(
        "DeltaDiscoveryRequest.response_nonce",
        DeltaDiscoveryRequest {
            response_nonce: s(),
            ..Default::default()
        },
        6,
        LEN,
    );
    check(
        "DeltaDiscoveryRequest.error_detail",
        DeltaDiscoveryRequest {
            error_detail: Some(zmesh_proto::google::rpc::Status {
                code: 3,
                ..Default::default()
            }),
            ..Default::default()
        },
        7,
        LEN,
    );
    check(
        "DeltaDiscoveryResponse.system_version_info",
        DeltaDiscoveryResponse {
            system_version_info: s(),
            ..Default::default()
        },
        1,
        LEN,
    );
    check(
        "DeltaDiscoveryResponse.resources",
        DeltaDiscoveryResponse {
            resources: vec![Resource::default()],
            ..Default::default()
        },
        2,
        LEN,
    );
    check(
        "DeltaDiscoveryResponse.type_url",
        DeltaDiscoveryResponse {
            type_url: s(),
            ..Default::default()
        },
        4,
        LEN,
    );
    check(
        "DeltaDiscoveryResponse.nonce",
        DeltaDiscoveryResponse {
            nonce: s(),
            ..Default::default()
        },
        5,
        LEN,
    );
    check(
        "DeltaDiscoveryResponse.removed_resources",
        DeltaDiscoveryResponse {
            removed_resources: vec![s()],
            ..Default::default()
        },
        6,
        LEN,
    );
    check(
        "Resource.version",
        Resource {
            version: s(),
            ..Default::default()
        },
        1,
        LEN,
    );
    check(
        "Resource.resource",
        Resource {
            resource: Some(prost_types::Any::default()),
            ..Default::default()
        },
        2,
        LEN,
    );
    check(
        "Resource.name",
        Resource {
            name: s(),
            ..Default::default()
        },
        3,
        LEN,
    );
    check(
        "Resource.aliases",
        Resource {
            aliases: vec![s()],
            ..Default::default()
        },
        4,
        LEN,
    );
    check(
        "Resource.ttl",
        Resource {
            ttl: Some(prost_types::Duration::default()),
            ..Default::default()
        },
        6,
        LEN,
    );
    check(
        "Node.id",
        Node {
            id: s(),
            ..Default::default()
        },
        1,
        LEN,
    );
    check(
        "Node.cluster",
        Node {
            cluster: s(),
            ..Default::default()
        },
        2,
        LEN,
    );
    check(
        "Node.metadata",
        Node {
            metadata: Some(prost_types::Struct::default()),
            ..Default::default()
        },
        3,
        LEN,
    );
    check(
        "IstioCertificateRequest.csr",
        IstioCertificateRequest {
            csr: s(),
            ..Default::default()
        },
        1,
        LEN,
    );
    check(
        "IstioCertificateRequest.validity_duration",
        IstioCertificateRequest {
            validity_duration: 60,
            ..Default::default()
        },
        3,
        VARINT,
    );
    check(
        "IstioCertificateRequest.metadata",
        IstioCertificateRequest {
            metadata: Some(prost_types::Struct::default()),
            ..Default::default()
        },
        4,
        LEN,
    );
    check(
        "IstioCertificateResponse.cert_chain",
        IstioCertificateResponse {
            cert_chain: vec![s()],
        },
        1,
        LEN,
    );
}

#[test]
fn full_message_bytes() {
    // A complete small Workload, byte for byte, as istiod would send it.
    let w = Workload {
        uid: "u".into(),
        name: "n".into(),
        addresses: vec![vec![10, 0, 0, 1]],
        tunnel_protocol: workload::TunnelProtocol::Hbone as i32,
        ..Default::default()
    };
    let got = w.encode_to_vec();
    let want: Vec<u8> = vec![
        0x0a, 1, b'n', // name = 1
        0x1a, 4, 10, 0, 0, 1, // addresses = 3
        0x28, 1, // tunnel_protocol = 5
        0xa2, 0x01, 1, b'u', // uid = 20
    ];
    assert_eq!(got, want);
}

#[test]
fn service_paths() {
    // The gRPC method paths are the compatibility contract for clients.
    let p = zmesh_proto::discovery::aggregated_discovery_service_server::SERVICE_NAME;
    assert_eq!(p, "envoy.service.discovery.v3.AggregatedDiscoveryService");
    let c = zmesh_proto::ca::istio_certificate_service_server::SERVICE_NAME;
    assert_eq!(c, "istio.v1.auth.IstioCertificateService");
}

#[test]
fn otlp_trace_fields() {
    use zmesh_proto::otlp_collector::{
        ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use zmesh_proto::otlp_common::{AnyValue, InstrumentationScope, KeyValue, any_value};
    use zmesh_proto::otlp_resource::Resource;
    use zmesh_proto::otlp_trace::{ResourceSpans, ScopeSpans, Span, Status, span, status};

    let s = || "x".to_string();
    let b = || vec![1u8];
    check(
        "ExportTraceServiceRequest.resource_spans",
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans::default()],
        },
        1,
        LEN,
    );
    check(
        "ExportTraceServiceResponse.partial_success",
        ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess::default()),
        },
        1,
        LEN,
    );
    check(
        "ExportTracePartialSuccess.rejected_spans",
        ExportTracePartialSuccess {
            rejected_spans: 1,
            ..Default::default()
        },
        1,
        VARINT,
    );
    check(
        "ExportTracePartialSuccess.error_message",
        ExportTracePartialSuccess {
            error_message: s(),
            ..Default::default()
        },
        2,
        LEN,
    );
    check(
        "ResourceSpans.resource",
        ResourceSpans {
            resource: Some(Resource::default()),
            ..Default::default()
        },
        1,
        LEN,
    );
    check(
        "ResourceSpans.scope_spans",
        ResourceSpans {
            scope_spans: vec![ScopeSpans::default()],
            ..Default::default()
        },
        2,
        LEN,
    );
    check(
        "ResourceSpans.schema_url",
        ResourceSpans {
            schema_url: s(),
            ..Default::default()
        },
        3,
        LEN,
    );
    check(
        "ScopeSpans.scope",
        ScopeSpans {
            scope: Some(InstrumentationScope::default()),
            ..Default::default()
        },
        1,
        LEN,
    );
    check(
        "ScopeSpans.spans",
        ScopeSpans {
            spans: vec![Span::default()],
            ..Default::default()
        },
        2,
        LEN,
    );
    check(
        "Resource.attributes",
        Resource {
            attributes: vec![KeyValue::default()],
            ..Default::default()
        },
        1,
        LEN,
    );
    check(
        "InstrumentationScope.name",
        InstrumentationScope {
            name: s(),
            ..Default::default()
        },
        1,
        LEN,
    );
    check(
        "InstrumentationScope.version",
        InstrumentationScope {
            version: s(),
            ..Default::default()
        },
        2,
        LEN,
    );
    check(
        "KeyValue.key",
        KeyValue {
            key: s(),
            ..Default::default()
        },
        1,
        LEN,
    );
    check(
        "KeyValue.value",
        KeyValue {
            value: Some(AnyValue::default()),
            ..Default::default()
        },
        2,
        LEN,
    );
    let any = |v| AnyValue { value: Some(v) };
    check(
        "AnyValue.string_value",
        any(any_value::Value::StringValue(s())),
        1,
        LEN,
    );
    check(
        "AnyValue.bool_value",
        any(any_value::Value::BoolValue(true)),
        2,
        VARINT,
    );
    check(
        "AnyValue.int_value",
        any(any_value::Value::IntValue(1)),
        3,
        VARINT,
    );
    check(
        "AnyValue.double_value",
        any(any_value::Value::DoubleValue(1.0)),
        4,
        I64,
    );
    check(
        "AnyValue.bytes_value",
        any(any_value::Value::BytesValue(b())),
        7,
        LEN,
    );
    let sp = |f: fn(&mut Span)| {
        let mut x = Span::default();
        f(&mut x);
        x
    };
    check("Span.trace_id", sp(|x| x.trace_id = vec![1]), 1, LEN);
    check("Span.span_id", sp(|x| x.span_id = vec![1]), 2, LEN);
    check(
        "Span.trace_state",
        sp(|x| x.trace_state = "x".into()),
        3,
        LEN,
    );
    check(
        "Span.parent_span_id",
        sp(|x| x.parent_span_id = vec![1]),
        4,
        LEN,
    );
    check("Span.name", sp(|x| x.name = "x".into()), 5, LEN);
    check(
        "Span.kind",
        sp(|x| x.kind = span::SpanKind::Server as i32),
        6,
        VARINT,
    );
    // Timestamps are fixed64 on the wire (not varints): a collector rejects anything else.
    check(
        "Span.start_time_unix_nano",
        sp(|x| x.start_time_unix_nano = 1),
        7,
        I64,
    );
    check(
        "Span.end_time_unix_nano",
        sp(|x| x.end_time_unix_nano = 1),
        8,
        I64,
    );
    check(
        "Span.attributes",
        sp(|x| x.attributes = vec![KeyValue::default()]),
        9,
        LEN,
    );
    check(
        "Span.status",
        sp(|x| x.status = Some(Status::default())),
        15,
        LEN,
    );
    check("Span.flags", sp(|x| x.flags = 1), 16, I32);
    check(
        "Status.message",
        Status {
            message: s(),
            ..Default::default()
        },
        2,
        LEN,
    );
    check(
        "Status.code",
        Status {
            code: status::StatusCode::Error as i32,
            ..Default::default()
        },
        3,
        VARINT,
    );
    // Enum values are part of the wire contract too.
    assert_eq!(span::SpanKind::Server as i32, 2);
    assert_eq!(span::SpanKind::Client as i32, 3);
    assert_eq!(status::StatusCode::Ok as i32, 1);
    assert_eq!(status::StatusCode::Error as i32, 2);
}

#[test]
fn otlp_service_path() {
    // What collectors route on: `/opentelemetry.proto.collector.trace.v1.TraceService/Export`.
    let p = zmesh_proto::otlp_collector::trace_service_server::SERVICE_NAME;
    assert_eq!(p, "opentelemetry.proto.collector.trace.v1.TraceService");
}
