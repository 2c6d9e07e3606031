//! zmesh-controller: the small xDS control plane that ships with zmesh.
//!
//! Sources → [`store`] (raw Kubernetes objects) → [`translate`] (xDS resources) →
//! [`xds`] (resource cache + Delta ADS server) → ztunnels and waypoints ([`mesh`]: the Istio
//! mesh config translation reads); [`ca`] signs workload
//! certificates; [`waypoints`] turns waypoint Gateways into Deployments (Kubernetes mode);
//! [`admin`] serves `/config_dump` (15000) and `/healthz/ready` (15021).
//! [`controller`] wires it together, in-process (local use, tests, the demo) or
//! as the `zmesh-controller` binary (the Kubernetes Deployment).

pub mod admin;
pub mod ca;
pub mod controller;
pub mod k8s;
pub mod mesh;
pub mod sources;
pub mod store;
pub mod translate;
pub mod waypoints;
pub mod xds;
