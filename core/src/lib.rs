//! zmesh-core: everything both proxies (ztunnel and waypoint) need, written once.
//!
//! | module | what it owns |
//! |---|---|
//! | [`identity`] | SPIFFE identities |
//! | [`ca`], [`certs`], [`tls`] | certificate authority, per-workload certificates with rotation, rustls configs with Istio's verification rules |
//! | [`hbone`] | HTTP/2 CONNECT tunnels over mTLS: pooled client, validating server |
//! | [`copy`] | bidirectional byte copying with adaptive buffers and half-close |
//! | [`state`], [`authz`] | workloads, services and policies indexed for lookup; Istio's L4 authorization |
//! | [`metrics`], [`admin`], [`telemetry`] | Prometheus metrics with Istio names, admin/metrics/readiness servers, logging |
//! | [`logwriter`] | log output: each line at once, or gathered and flushed on an interval |
//! | [`socket`], [`drain`], [`process`] | socket options (transparent, marks), graceful shutdown, allocator tuning |
//! | [`worker`] | data-path worker threads (Envoy's model): per-worker runtime, `SO_REUSEPORT` listeners |
#![deny(unsafe_op_in_unsafe_fn)]

pub mod admin;
pub mod authz;
pub mod ca;
pub mod certs;
pub mod copy;
pub mod drain;
pub mod hbone;
pub mod identity;
pub mod logwriter;
pub mod metrics;
pub mod process;
pub mod socket;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod worker;
pub mod xds;
