//! Inbound plaintext (15006): a non-HBONE connection to a local workload (from a pod outside
//! the mesh, or a PERMISSIVE peer). There is no peer identity, so identity-based ALLOW rules
//! cannot match and PeerAuthentication STRICT (a DENY on "no principal") refuses it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tracing::{Instrument, debug, info, info_span, warn};
use zmesh_core::authz::{ConnectionAttributes, Decision};
use zmesh_core::metrics::{Reporter, ResponseFlags, SecurityPolicy};
use zmesh_core::socket::{self, ConnectOptions};
use zmesh_core::telemetry::AccessLog;

use super::{InboundRelay, ProxyInputs, relay_inbound, traffic_labels};

/// Handle one plaintext connection from `peer` addressed to `orig_dst`.
pub async fn handle(
    pi: Arc<ProxyInputs>,
    client: TcpStream,
    peer: SocketAddr,
    orig_dst: SocketAddr,
) {
    let started = Instant::now();
    let span = info_span!("inbound_plaintext", src = %peer, dst = %orig_dst);
    async move {
        let Some(dst) = pi.local_workload(orig_dst.ip()) else {
            warn!("no local workload at {}; closing", orig_dst.ip());
            return;
        };
        if pi.illegal_ports.contains(&orig_dst.port()) {
            warn!("refusing plaintext connection to a proxy port {orig_dst}");
            return;
        }
        let src = pi.state.read().workload_by_ip(peer.ip());
        let mut labels = traffic_labels(
            Reporter::Destination,
            src.as_deref(),
            None,
            Some(&dst),
            None,
            SecurityPolicy::Unknown,
        );
        let attrs = ConnectionAttributes {
            src_identity: None,
            src_ip: peer.ip(),
            dst_ip: orig_dst.ip(),
            dst_port: orig_dst.port(),
        };
        if let Decision::Deny { policy } = pi.state.read().authorize(&dst, &attrs) {
            info!("plaintext connection denied by authorization policy: {policy}");
            labels.response_flags = ResponseFlags::Deny;
            pi.metrics.tcp.record_failure(&labels);
            AccessLog {
                src_addr: Some(peer),
                dst_addr: Some(orig_dst),
                dst_workload: Some(dst.name.clone()),
                dst_namespace: Some(dst.namespace.clone()),
                direction: "inbound",
                duration: started.elapsed(),
                error: Some(format!("policy rejection: {policy}")),
                ..AccessLog::default()
            }
            .emit();
            return;
        }
        let opts = ConnectOptions {
            source: pi.cfg.keep_source_address.then_some(peer.ip()),
            mark: Some(socket::PROXY_MARK),
            timeout: Some(pi.cfg.h2.handshake_timeout),
        };
        let upstream = match socket::connect(orig_dst, &opts).await {
            Ok(s) => s,
            Err(e) => {
                warn!("connection to the local workload failed: {e}");
                labels.response_flags = ResponseFlags::Connect;
                pi.metrics.tcp.record_failure(&labels);
                return;
            }
        };
        let log = AccessLog {
            src_addr: Some(peer),
            src_workload: src.as_ref().map(|w| w.name.clone()),
            src_namespace: src.as_ref().map(|w| w.namespace.clone()),
            dst_addr: Some(orig_dst),
            dst_workload: Some(dst.name.clone()),
            dst_namespace: Some(dst.namespace.clone()),
            dst_identity: Some(dst.identity().to_string()),
            direction: "inbound",
            ..AccessLog::default()
        };
        let relay = InboundRelay {
            attrs,
            dst,
            labels,
            log,
            started,
        };
        relay_inbound(&pi, client, upstream, relay).await.emit();
        debug!("plaintext connection finished");
    }
    .instrument(span)
    .await
}

/// The 15006 listener (transparent: the local address is the original destination).
pub async fn serve(pi: Arc<ProxyInputs>, listener: tokio::net::TcpListener) {
    let drain = pi.drain.clone();
    super::accept_loop(listener, "inbound_plaintext", drain, move |stream, peer| {
        let pi = pi.clone();
        async move {
            let Ok(orig_dst) = stream.local_addr() else {
                return;
            };
            handle(pi, stream, peer, orig_dst).await
        }
    })
    .await
}
