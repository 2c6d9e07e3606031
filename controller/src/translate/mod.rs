//! Translation: Kubernetes objects (Istio and Gateway API resources, unchanged) → xDS resources.
//!
//! - [`workloads`]: Namespace/Pod/Service/EndpointSlice/ServiceEntry → `istio.workload.Address`
//! - [`authz`]: AuthorizationPolicy/PeerAuthentication → `istio.security.Authorization`
//! - [`l7`]: VirtualService/DestinationRule/HTTPRoute/TCPRoute (+ L7 AuthorizationPolicy) →
//!   zmesh waypoint L7 configuration
//! - [`telemetry`]: Telemetry + the mesh config → each waypoint's tracing
//!
//! Invalid objects are reported as [`TranslateError`]s (naming the object and the field) and
//! skipped; everything else still translates.

pub mod authz;
pub mod incremental;
pub mod l7;
pub mod telemetry;
pub mod workloads;

use std::collections::BTreeMap;

use crate::mesh::MeshConfig;
use crate::store::{ObjectKey, Snapshot};

/// An object that could not be translated (whole or in part).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: field `{field}`: {reason}")]
pub struct TranslateError {
    pub object: ObjectKey,
    pub field: String,
    pub reason: String,
}

/// Cluster-wide settings translation needs.
#[derive(Clone, Debug, PartialEq)]
pub struct TranslateOptions {
    pub cluster_id: String,
    pub trust_domain: String,
    /// Policies here apply mesh-wide (Istio's `istio-system`).
    pub root_namespace: String,
    pub network: String,
    /// Istio's mesh config (extension providers and tracing defaults).
    pub mesh: MeshConfig,
}

impl Default for TranslateOptions {
    fn default() -> Self {
        TranslateOptions {
            cluster_id: "Kubernetes".into(),
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            network: String::new(),
            mesh: MeshConfig::default(),
        }
    }
}

/// The output: for each type URL, resource name → encoded resource.
#[derive(Clone, Debug, Default)]
pub struct Translated {
    pub resources: BTreeMap<String, BTreeMap<String, prost_types::Any>>,
    pub errors: Vec<TranslateError>,
}

impl Translated {
    /// Add one resource of `type_url` under `name`.
    pub fn add<M: prost::Message>(&mut self, type_url: &str, name: impl Into<String>, msg: &M) {
        self.resources
            .entry(type_url.to_string())
            .or_default()
            .insert(
                name.into(),
                prost_types::Any {
                    type_url: type_url.to_string(),
                    value: msg.encode_to_vec(),
                },
            );
    }

    pub fn error(
        &mut self,
        object: &ObjectKey,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) {
        self.errors.push(TranslateError {
            object: object.clone(),
            field: field.into(),
            reason: reason.into(),
        });
    }
}

/// Translate everything in `snap`.
pub fn translate(snap: &Snapshot, opts: &TranslateOptions) -> Translated {
    translate_with_context(snap, opts).0
}

/// What a full translation worked out about pods, kept by [`incremental`] to re-translate
/// single pods later.
#[derive(Debug, Default)]
pub struct PodContext {
    pub backs: workloads::Backs,
    pub bindings: authz::Bindings,
}

/// [`translate`], also returning the pod context.
pub fn translate_with_context(
    snap: &Snapshot,
    opts: &TranslateOptions,
) -> (Translated, PodContext) {
    let mut out = Translated::default();
    // Compiled once: workloads need the policy bindings, authz emits the policies.
    let mut compiled = authz::compile(snap, opts);
    let backs = workloads::translate(snap, opts, &compiled.bindings, &mut out);
    let bindings = std::mem::take(&mut compiled.bindings);
    authz::emit(compiled, &mut out);
    l7::translate(snap, opts, &mut out);
    telemetry::translate(snap, opts, &mut out);
    (out, PodContext { backs, bindings })
}
