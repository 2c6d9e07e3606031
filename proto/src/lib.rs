//! Protobuf types that zmesh speaks on the wire.
//!
//! The `.proto` files under `protos/` are our own definitions, written from Istio's (and, for
//! span export, OTLP's) published package names, message names and field numbers so that
//! zmesh proxies and Istio's control plane (and vice versa), and OpenTelemetry collectors,
//! understand each other. Generated at build time by protox, so no
//! system `protoc` is needed.

#![forbid(unsafe_code)]
#![allow(clippy::all, clippy::pedantic)]
// Doc comments come from the .proto files, written for protobuf readers ("<ns>/<name>", [links]).
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

pub mod istio {
    pub mod workload {
        tonic::include_proto!("istio.workload");
    }
    pub mod security {
        tonic::include_proto!("istio.security");
    }
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub mod envoy {
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
}

pub mod zmesh {
    pub mod l7 {
        pub mod v1 {
            tonic::include_proto!("zmesh.l7.v1");
        }
    }
}

/// OTLP (OpenTelemetry protocol) traces: what the waypoint exports its spans with.
pub mod opentelemetry {
    pub mod proto {
        pub mod common {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.common.v1");
            }
        }
        pub mod resource {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.resource.v1");
            }
        }
        pub mod trace {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.trace.v1");
            }
        }
        pub mod collector {
            pub mod trace {
                pub mod v1 {
                    tonic::include_proto!("opentelemetry.proto.collector.trace.v1");
                }
            }
        }
    }
}

pub mod ads_wire;
pub mod reflect;

pub use envoy::service::discovery::v3 as discovery;
pub use istio::security;
pub use istio::v1::auth as ca;
pub use istio::workload;
/// OTLP trace export (`opentelemetry.proto.collector.trace.v1.TraceService/Export`).
pub use opentelemetry::proto::collector::trace::v1 as otlp_collector;
pub use opentelemetry::proto::common::v1 as otlp_common;
pub use opentelemetry::proto::resource::v1 as otlp_resource;
pub use opentelemetry::proto::trace::v1 as otlp_trace;
pub use zmesh::l7::v1 as l7;

/// Type URL of workload/service address resources.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of L4 authorization resources.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
/// Type URL of zmesh waypoint per-service L7 configuration (`zmesh.l7.v1.ServiceConfig`,
/// resource name "<namespace>/<hostname>").
pub const L7_SERVICE_TYPE_URL: &str = "type.googleapis.com/zmesh.l7.v1.ServiceConfig";
/// Type URL of zmesh waypoint L7 authorization policies (`zmesh.l7.v1.Authorization`, resource
/// name "<namespace>/<policy name>").
pub const L7_AUTHZ_TYPE_URL: &str = "type.googleapis.com/zmesh.l7.v1.Authorization";
/// Type URL of a waypoint's resolved telemetry (`zmesh.l7.v1.WaypointTelemetry`, resource name
/// "<namespace>/<gateway name>").
pub const L7_TELEMETRY_TYPE_URL: &str = "type.googleapis.com/zmesh.l7.v1.WaypointTelemetry";
