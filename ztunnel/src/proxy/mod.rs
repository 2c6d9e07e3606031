//! The data path: listeners and what they do with each connection.
//!
//! | listener | module | what |
//! |---|---|---|
//! | 15001 | [`outbound`] | captured pod connections → HBONE to the destination's node (or passthrough) |
//! | 15006 | [`inbound_passthrough`] | plaintext to a local pod → policy → the pod |
//! | 15008 | [`inbound`] | HBONE → validation, policy → the pod |
//! | 15080 | [`socks5`] | SOCKS5 CONNECT → the same outbound logic |
//!
//! Each data-path worker ([`crate::app`], [`zmesh_core::worker`]) runs its own copy of every
//! listener (`SO_REUSEPORT`) and its own HBONE pool; [`connection_manager`] (on the control
//! runtime) re-checks live inbound connections of all workers when policy changes.

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
use zmesh_core::authz::ConnectionAttributes;
use zmesh_core::certs::CertificateManager;
use zmesh_core::copy::{BytesStream, CopyStats, copy_bidirectional};
use zmesh_core::drain::Drain;
use zmesh_core::hbone::next_connection_id;
use zmesh_core::metrics::{ConnectionRecorder, Metrics, ResponseFlags, TcpLabels};
use zmesh_core::state::{StateStore, Workload};
use zmesh_core::telemetry::AccessLog;

use crate::config::Config;
use connection_manager::ConnectionManager;
pub use zmesh_core::metrics::traffic_labels;

/// What every listener and connection handler shares, on every worker thread. The one
/// per-worker input, the HBONE connection pool, is passed to the outbound path beside it.
pub struct ProxyInputs {
    pub cfg: Config,
    pub state: Arc<StateStore>,
    pub certs: Arc<CertificateManager>,
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

/// An authorized inbound connection (HBONE or plaintext) to a local workload, ready to relay.
pub(crate) struct InboundRelay {
    /// What it was authorized with; re-checked when policy changes.
    pub attrs: ConnectionAttributes,
    pub dst: Arc<Workload>,
    pub labels: TcpLabels,
    /// Access-log fields known up front; bytes, duration and error are filled in at the end.
    pub log: AccessLog,
    pub started: std::time::Instant,
}

/// Copy between the downstream side (a tunnel or a plaintext client) and the local workload
/// until both are done, the connection is no longer authorized, or shutdown cuts it; then
/// report metrics and return the access log to write.
pub(crate) async fn relay_inbound<D: BytesStream>(
    pi: &ProxyInputs,
    mut downstream: D,
    mut upstream: TcpStream,
    r: InboundRelay,
) -> AccessLog {
    let tracked = pi
        .connections
        .track(next_connection_id(), r.attrs, r.dst.uid.clone());
    let revoked = tracked.revoked();
    let force = pi.drain.force_close();
    let recorder = ConnectionRecorder::new(pi.metrics.clone(), r.labels);
    let stats = CopyStats::new();
    let result = tokio::select! {
        r = copy_bidirectional(&mut downstream, &mut upstream, &stats) => r,
        _ = revoked.cancelled() => Err(std::io::Error::other("closed: no longer allowed by authorization policy")),
        _ = force.cancelled() => Err(std::io::Error::other("closed by proxy shutdown")),
    };
    drop(tracked);
    // Counted from the destination's point of view: received from the source, sent back to it.
    recorder.add_received(stats.a_to_b());
    recorder.add_sent(stats.b_to_a());
    let error = result.err().map(|e| e.to_string());
    if error.is_some() {
        recorder.fail(ResponseFlags::Connect);
    }
    drop(recorder);
    AccessLog {
        bytes_sent: stats.b_to_a(),
        bytes_recv: stats.a_to_b(),
        duration: r.started.elapsed(),
        error,
        ..r.log
    }
}
