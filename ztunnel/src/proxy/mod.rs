//! The data path: listeners and what they do with each connection.
//!
//! | listener | module | what |
//! |---|---|---|
//! | 15001 | [`outbound`] | captured pod connections → HBONE to the destination's node (or passthrough) |
//! | 15006 | [`inbound_passthrough`] | plaintext to a local pod → policy → the pod |
//! | 15008 | [`inbound`] | HBONE → validation, policy → the pod |
//! | 15080 | [`socks5`] | SOCKS5 CONNECT → the same outbound logic |
//!
//! [`connection_manager`] re-checks live inbound connections when policy changes.

pub mod connection_manager;
pub mod inbound;
pub mod inbound_passthrough;
pub mod outbound;
pub mod socks5;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;
use zmesh_core::certs::CertificateManager;
use zmesh_core::drain::Drain;
use zmesh_core::hbone::pool::Pool;
use zmesh_core::identity::Identity;
use zmesh_core::metrics::{Metrics, Reporter, ResponseFlags, SecurityPolicy, TcpLabels};
use zmesh_core::state::{Service, StateStore, Workload};

use crate::config::Config;
use connection_manager::ConnectionManager;

/// Everything a connection handler needs, shared by all listeners.
pub struct ProxyInputs {
    pub cfg: Config,
    pub state: Arc<StateStore>,
    pub certs: Arc<CertificateManager>,
    pub pool: Pool,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    pub connections: Arc<ConnectionManager>,
    /// Ports of our own listeners: never a valid destination (would loop).
    pub illegal_ports: Vec<u16>,
}

impl ProxyInputs {
    /// Is this workload served by this ztunnel?
    pub fn is_local(&self, w: &Workload) -> bool {
        w.node == self.cfg.node
    }

    /// A local workload by IP.
    pub fn local_workload(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        let state = self.state.read();
        state.workload_by_ip(ip).filter(|w| self.is_local(w))
    }

    /// Where to send HBONE for a workload: `<workload ip>:15008` (steered to its node's
    /// ztunnel), unless the node is configured with its own port or address.
    pub fn hbone_address(&self, w: &Workload, ip: IpAddr) -> SocketAddr {
        if let Some(addr) = self.cfg.peer_hbone_addrs.get(&w.node) {
            return *addr;
        }
        let port = self
            .cfg
            .peer_hbone_ports
            .get(&w.node)
            .copied()
            .unwrap_or(self.cfg.peer_hbone_port);
        SocketAddr::new(ip, port)
    }
}

/// Accept loop shared by the plain-TCP listeners: spawns `handle(stream, peer)` per connection
/// on the drain tracker until shutdown.
pub async fn accept_loop<F, Fut>(listener: TcpListener, name: &'static str, drain: Drain, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let stop = drain.stopping();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                drain.spawn(handle(stream, peer));
            }
            Err(e) => {
                // Out of descriptors or similar: back off rather than spin.
                warn!(listener = name, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        "unknown".to_string()
    } else {
        s.to_string()
    }
}

/// Istio's TCP metric labels for one connection.
pub fn traffic_labels(
    reporter: Reporter,
    src: Option<&Workload>,
    src_identity: Option<&Identity>,
    dst: Option<&Workload>,
    service: Option<&Service>,
    security: SecurityPolicy,
) -> TcpLabels {
    let canonical = |w: Option<&Workload>| {
        w.map(|w| {
            if w.canonical_name.is_empty() {
                w.workload_name.clone()
            } else {
                w.canonical_name.clone()
            }
        })
        .unwrap_or_default()
    };
    let src_principal = src_identity
        .map(|i| i.to_string())
        .or_else(|| src.map(|w| w.identity().to_string()))
        .unwrap_or_default();
    TcpLabels {
        reporter,
        source_workload: or_unknown(&src.map(|w| w.workload_name.clone()).unwrap_or_default()),
        source_canonical_service: or_unknown(&canonical(src)),
        source_canonical_revision: or_unknown(
            &src.map(|w| w.canonical_revision.clone())
                .unwrap_or_default(),
        ),
        source_workload_namespace: or_unknown(
            &src.map(|w| w.namespace.clone()).unwrap_or_default(),
        ),
        source_principal: or_unknown(&src_principal),
        source_app: or_unknown(&canonical(src)),
        source_version: or_unknown(
            &src.map(|w| w.canonical_revision.clone())
                .unwrap_or_default(),
        ),
        source_cluster: or_unknown(&src.map(|w| w.cluster_id.clone()).unwrap_or_default()),
        destination_service: or_unknown(&service.map(|s| s.hostname.clone()).unwrap_or_default()),
        destination_service_namespace: or_unknown(
            &service.map(|s| s.namespace.clone()).unwrap_or_default(),
        ),
        destination_service_name: or_unknown(&service.map(|s| s.name.clone()).unwrap_or_default()),
        destination_workload: or_unknown(&dst.map(|w| w.workload_name.clone()).unwrap_or_default()),
        destination_canonical_service: or_unknown(&canonical(dst)),
        destination_canonical_revision: or_unknown(
            &dst.map(|w| w.canonical_revision.clone())
                .unwrap_or_default(),
        ),
        destination_workload_namespace: or_unknown(
            &dst.map(|w| w.namespace.clone()).unwrap_or_default(),
        ),
        destination_principal: or_unknown(
            &dst.map(|w| w.identity().to_string()).unwrap_or_default(),
        ),
        destination_app: or_unknown(&canonical(dst)),
        destination_version: or_unknown(
            &dst.map(|w| w.canonical_revision.clone())
                .unwrap_or_default(),
        ),
        destination_cluster: or_unknown(&dst.map(|w| w.cluster_id.clone()).unwrap_or_default()),
        request_protocol: "tcp".to_string(),
        response_flags: ResponseFlags::None,
        connection_security_policy: security,
    }
}
