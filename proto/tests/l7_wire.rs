//! Wire-stability guard for zmesh's own L7 resources: the field numbers the waypoint relies on
//! must not change, and every resource renders as proto3 JSON through `reflect`.

use prost::Message;
use zmesh_proto::l7::{
    Authorization, AuthzRule, CorsPolicy, FaultAbort, HttpRoute, OutlierDetection, RateLimit,
    RouteDestination, ServiceConfig, Source, TcpRoute, cors_policy, http_route,
};

/// (field number, wire type) of the first key of an encoded message.
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
    assert_eq!(first_key(&m.encode_to_vec()), (field, wire), "{name}");
}

#[test]
fn l7_field_numbers() {
    check(
        "ServiceConfig.hostname",
        ServiceConfig {
            hostname: "h".into(),
            ..Default::default()
        },
        1,
        2,
    );
    check(
        "ServiceConfig.http_routes",
        ServiceConfig {
            http_routes: vec![HttpRoute::default()],
            ..Default::default()
        },
        3,
        2,
    );
    check(
        "ServiceConfig.tcp_routes",
        ServiceConfig {
            tcp_routes: vec![TcpRoute::default()],
            ..Default::default()
        },
        4,
        2,
    );
    check(
        "HttpRoute.forward",
        HttpRoute {
            action: Some(http_route::Action::Forward(Default::default())),
            ..Default::default()
        },
        3,
        2,
    );
    check(
        "HttpRoute.timeout",
        HttpRoute {
            timeout: Some(Default::default()),
            ..Default::default()
        },
        9,
        2,
    );
    check(
        "HttpRoute.rate_limit",
        HttpRoute {
            rate_limit: Some(Default::default()),
            ..Default::default()
        },
        13,
        2,
    );
    check(
        "HttpRoute.cors",
        HttpRoute {
            cors: Some(Default::default()),
            ..Default::default()
        },
        14,
        2,
    );
    check(
        "CorsPolicy.allow_credentials",
        CorsPolicy {
            allow_credentials: true,
            ..Default::default()
        },
        6,
        0,
    );
    check(
        "CorsPolicy.unmatched_preflights",
        CorsPolicy {
            unmatched_preflights: cors_policy::UnmatchedPreflights::Ignore as i32,
            ..Default::default()
        },
        7,
        0,
    );
    check(
        "RouteDestination.weight",
        RouteDestination {
            weight: 80,
            ..Default::default()
        },
        4,
        0,
    );
    check(
        "FaultAbort.percentage",
        FaultAbort {
            percentage: 100.0,
            ..Default::default()
        },
        2,
        1,
    );
    check(
        "OutlierDetection.consecutive_5xx_errors",
        OutlierDetection {
            consecutive_5xx_errors: Some(0),
            ..Default::default()
        },
        1,
        0,
    );
    check(
        "RateLimit.max_tokens",
        RateLimit {
            max_tokens: 20,
            ..Default::default()
        },
        1,
        0,
    );
    check(
        "Authorization.action",
        Authorization {
            action: 1,
            ..Default::default()
        },
        3,
        0,
    );
    check(
        "Authorization.rules",
        Authorization {
            rules: vec![AuthzRule::default()],
            ..Default::default()
        },
        5,
        2,
    );
    check(
        "Source.ip_blocks",
        Source {
            ip_blocks: vec!["1.2.3.4/32".into()],
            ..Default::default()
        },
        5,
        2,
    );
}

#[test]
fn l7_resources_render_as_json() {
    let cfg = ServiceConfig {
        hostname: "reviews.default.svc.cluster.local".into(),
        http_routes: vec![HttpRoute {
            timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 500_000_000,
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let v = zmesh_proto::reflect::to_json(zmesh_proto::L7_SERVICE_TYPE_URL, &cfg.encode_to_vec())
        .unwrap();
    assert_eq!(v["hostname"], "reviews.default.svc.cluster.local");
    assert_eq!(v["httpRoutes"][0]["timeout"], "0.500s");
    // And back.
    let bytes = zmesh_proto::reflect::from_json(zmesh_proto::L7_SERVICE_TYPE_URL, &v).unwrap();
    assert_eq!(ServiceConfig::decode(bytes.as_slice()).unwrap(), cfg);
    assert!(
        zmesh_proto::reflect::from_json(
            zmesh_proto::L7_SERVICE_TYPE_URL,
            &serde_json::json!({"httpRoutes": [{"timeout": "-"}]})
        )
        .is_err()
    );
    let authz = Authorization {
        action: 1,
        ..Default::default()
    };
    let v = zmesh_proto::reflect::to_json(zmesh_proto::L7_AUTHZ_TYPE_URL, &authz.encode_to_vec())
        .unwrap();
    assert_eq!(v["action"], "DENY");
    // Istio's types are in the pool too.
    assert!(zmesh_proto::reflect::to_json(zmesh_proto::ADDRESS_TYPE_URL, &[]).is_ok());
    assert!(zmesh_proto::reflect::to_json("type.googleapis.com/no.Such", &[]).is_err());
}

#[test]
fn waypoint_telemetry_fields() {
    use zmesh_proto::l7::{Tracing, WaypointTelemetry};
    check(
        "WaypointTelemetry.tracing",
        WaypointTelemetry {
            tracing: Some(Tracing::default()),
        },
        1,
        2,
    );
    let t = |f: fn(&mut Tracing)| {
        let mut x = Tracing::default();
        f(&mut x);
        x
    };
    check("Tracing.provider", t(|x| x.provider = "p".into()), 1, 2);
    check(
        "Tracing.otlp_endpoint",
        t(|x| x.otlp_endpoint = "e".into()),
        2,
        2,
    );
    check(
        "Tracing.random_sampling_percentage",
        t(|x| x.random_sampling_percentage = 1.0),
        3,
        1,
    );
    let v = zmesh_proto::reflect::to_json(
        zmesh_proto::L7_TELEMETRY_TYPE_URL,
        &WaypointTelemetry {
            tracing: Some(t(|x| x.otlp_endpoint = "http://otel:4317".into())),
        }
        .encode_to_vec(),
    )
    .unwrap();
    assert_eq!(v["tracing"]["otlpEndpoint"], "http://otel:4317");
}
