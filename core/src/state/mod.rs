//! The proxy's view of the mesh: workloads, services and authorization policies, indexed for
//! the lookups the data path makes on every connection.
//!
//! - [`Workload`], [`Service`], [`Policy`]: validated internal forms of Istio's xDS resources,
//!   with `TryFrom` the wire types (errors name the resource and the field) and `From` back.
//! - [`ProxyState`]: the indexes (workload by uid / IP, service by key / hostname / VIP,
//!   endpoints per service, policies by scope).
//! - [`StateStore`]: the shared, lock-protected state; config sources [`StateStore::apply`]
//!   atomic [`StateUpdate`]s and readers watch generation counters.
//! - [`ConfigSource`]: where configuration comes from; [`LocalConfig`] reads a YAML file.

mod local;
mod policy;
mod service;
mod store;
mod workload;

use std::sync::Arc;

use crate::metrics::Metrics;

pub use local::{LocalConfig, LocalLoad, Reloader};
pub use policy::{
    Clause, Match, PEER_AUTHENTICATION_PREFIX, Policy, PolicyAction, PolicyScope, Rule,
    ServiceAccountMatch, StringMatch,
};
pub use service::Service;
pub use store::{ApplyOutcome, ProxyState, ROOT_NAMESPACE, StateStore, StateUpdate};
pub use workload::{
    AppProtocol, ApplicationTunnel, ApplicationTunnelProtocol, GatewayAddress, GatewayDestination,
    PortMapping, TunnelProtocol, WORKLOAD_TYPES, Workload,
};

/// Why configuration could not be taken in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// A resource failed validation.
    #[error("{kind} {name:?}: field `{field}`: {reason}")]
    Invalid {
        /// "workload", "service" or "policy".
        kind: &'static str,
        /// The resource's key (uid, `ns/hostname`, `ns/name`).
        name: String,
        field: String,
        reason: String,
    },
    /// A config file could not be read.
    #[error("config file {path}: {reason}")]
    Io { path: String, reason: String },
    /// A config document is not valid YAML, or its top level has the wrong shape.
    #[error("config {source_name}: {message}")]
    Syntax {
        source_name: String,
        message: String,
    },
    /// One object of a config document is invalid (the others still apply).
    #[error("config {source_name}: {section}[{index}] ({name}): {message}")]
    Object {
        source_name: String,
        /// "workloads", "services", "policies" or "peerAuthentications".
        section: &'static str,
        index: usize,
        /// Best-effort name of the object (its key when it can be read).
        name: String,
        message: String,
    },
}

/// A validation failure inside a resource, before we know how to name the resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn into_state(self, kind: &'static str, name: impl Into<String>) -> StateError {
        StateError::Invalid {
            kind,
            name: name.into(),
            field: self.field,
            reason: self.reason,
        }
    }
}

/// The seam where configuration comes in: a local YAML file or xDS
/// ([`XdsClient`](crate::xds::XdsClient)).
#[async_trait::async_trait]
pub trait ConfigSource: Send + 'static {
    /// Runs until cancelled (dropped), applying updates to `store`; calls
    /// [`StateStore::mark_synced`] after the first full snapshot.
    async fn run(self: Box<Self>, store: Arc<StateStore>) -> Result<(), StateError>;

    /// A short name for logs.
    fn name(&self) -> &str;

    /// Register the source's own metrics in the proxy's registry. The proxies call this once,
    /// before [`run`](Self::run), so a source's metrics appear only when that source is in use
    /// (Istio registers `istio_xds_*` only when it runs an xDS client). Default: none.
    fn register_metrics(&mut self, _metrics: &Metrics) {}
}
