//! Inbound HBONE (15008): a tunnel from another ztunnel (or a waypoint) to a local workload.
//!
//! Order of checks, as Istio does it: the TLS handshake presents the certificate of the
//! workload the connection was addressed to; the CONNECT target must be a workload on this
//! node (503 otherwise) and, unless the connection arrived on the node's own address, the
//! address the connection was steered to (400 otherwise); then L4 authorization with the peer's
//! certificate identity (401 on deny); then the upstream connection (503 when it fails).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info, warn};
use zmesh_core::authz::{ConnectionAttributes, Decision};
use zmesh_core::certs::WorkloadCertificate;
use zmesh_core::hbone::H2Stream;
use zmesh_core::hbone::server::{ConnectHandler, InboundRequest, Responder, ServerConn, Target};
use zmesh_core::metrics::{Reporter, ResponseFlags, SecurityPolicy};
use zmesh_core::socket::{self, ConnectOptions};
use zmesh_core::state::{Service, Workload};
use zmesh_core::telemetry::{AccessLog, InstrumentVerbose};

use super::outbound::with_flags;
use super::{InboundRelay, ProxyInputs, relay_inbound, traffic_labels};

pub struct Inbound {
    pub pi: Arc<ProxyInputs>,
}

/// The service named in the `forwarded` header's `host=` (Istio uses it for metrics only).
#[doc(hidden)] // pub for the fuzz targets and tests/parsers_never_panic.rs
pub fn forwarded_host(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("forwarded")?.to_str().ok()?;
    v.split([';', ','])
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.trim_matches('"').to_string())
}

fn response_baggage(w: &Workload) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut parts = vec![format!("k8s.namespace.name={}", w.namespace)];
    if !w.workload_name.is_empty() {
        parts.push(format!("k8s.deployment.name={}", w.workload_name));
    }
    if !w.canonical_name.is_empty() {
        parts.push(format!("service.name={}", w.canonical_name));
    }
    if !w.canonical_revision.is_empty() {
        parts.push(format!("service.version={}", w.canonical_revision));
    }
    if let Ok(v) = HeaderValue::from_str(&parts.join(",")) {
        h.insert("baggage", v);
    }
    h
}

impl Inbound {
    /// Resolve a `hostname:port` target to a local endpoint of that service.
    fn resolve_host(
        &self,
        host: &str,
        port: u16,
    ) -> Option<(Arc<Workload>, SocketAddr, Arc<Service>)> {
        let state = self.pi.state.read();
        let svc = state.service_by_host(host)?;
        let (w, target_port) = state
            .endpoints(&svc, port)
            .into_iter()
            .find(|(w, _)| self.pi.is_local(w))?;
        let ip = *w.addresses.first()?;
        Some((w, SocketAddr::new(ip, target_port), svc))
    }

    /// Validate, authorize and connect one CONNECT request; `None` when it was refused
    /// (answered, counted and logged here).
    async fn open(
        &self,
        conn: Arc<ServerConn>,
        req: InboundRequest,
        responder: Responder,
    ) -> Option<(H2Stream, TcpStream, InboundRelay)> {
        let started = Instant::now();
        let pi = &self.pi;
        let (dst, target, service) = match &req.target {
            Target::Addr(a) => {
                let Some(w) = pi.local_workload(a.ip()) else {
                    debug!(target = %a, "no such workload on this node");
                    pi.metrics.tcp.record_failure(&with_flags(
                        traffic_labels(
                            Reporter::Destination,
                            None,
                            conn.peer_identity.as_ref(),
                            None,
                            None,
                            SecurityPolicy::MutualTls,
                        ),
                        ResponseFlags::Connect,
                    ));
                    responder.reject(StatusCode::SERVICE_UNAVAILABLE);
                    return None;
                };
                let svc =
                    forwarded_host(&req.headers).and_then(|h| pi.state.read().service_by_host(&h));
                (w, *a, svc)
            }
            Target::Host(h, p) => match self.resolve_host(h, *p) {
                Some((w, addr, svc)) => (w, addr, Some(svc)),
                None => {
                    debug!(target = %req.target, "no local endpoint for service");
                    responder.reject(StatusCode::SERVICE_UNAVAILABLE);
                    return None;
                }
            },
        };
        // A connection steered to a pod address may only reach that pod.
        let local_ip = conn.local.ip();
        if matches!(req.target, Target::Addr(_))
            && local_ip != target.ip()
            && !pi.cfg.node_ips.contains(&local_ip)
        {
            warn!(target = %target, local = %local_ip, "CONNECT target does not match the address the connection was sent to");
            responder.reject(StatusCode::BAD_REQUEST);
            return None;
        }
        // The request's headers are not needed past this point; don't keep them for the
        // connection's lifetime.
        drop(req);
        // A destination behind a waypoint only accepts traffic from that waypoint (Istio
        // refuses waypoint bypass). Service-addressed traffic is checked against the service's
        // waypoint, all traffic against the workload's.
        let waypoints: Vec<_> = [
            dst.waypoint.clone(),
            service.as_ref().and_then(|s| s.waypoint.clone()),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !waypoints.is_empty() {
            let st = pi.state.read();
            let from_waypoint = waypoints.iter().any(|gw| {
                super::outbound::resolve_waypoint(&st, gw)
                    .is_some_and(|(w, _)| Some(w.identity()) == conn.peer_identity)
            });
            if !from_waypoint {
                info!(
                    src = ?conn.peer_identity.as_ref().map(|i| i.to_string()),
                    dst = %target,
                    "connection refused: the destination uses a waypoint and the peer is not it"
                );
                responder.reject(StatusCode::UNAUTHORIZED);
                return None;
            }
        }
        let src = self.source_workload(conn.peer.ip(), &conn);
        let mut labels = traffic_labels(
            Reporter::Destination,
            src.as_deref(),
            conn.peer_identity.as_ref(),
            Some(&dst),
            service.as_deref(),
            SecurityPolicy::MutualTls,
        );
        let attrs = ConnectionAttributes {
            src_identity: conn.peer_identity.clone(),
            src_ip: conn.peer.ip(),
            dst_ip: target.ip(),
            dst_port: target.port(),
        };
        let decision = pi.state.read().authorize(&dst, &attrs);
        if let Decision::Deny { policy } = decision {
            info!(
                src = ?conn.peer_identity.as_ref().map(|i| i.to_string()),
                dst = %target,
                "connection denied by authorization policy: {policy}"
            );
            labels.response_flags = ResponseFlags::Deny;
            pi.metrics.tcp.record_failure(&labels);
            AccessLog {
                src_addr: Some(conn.peer),
                src_identity: conn.peer_identity.as_ref().map(|i| i.to_string()),
                src_workload: src.as_ref().map(|w| w.name.clone()),
                src_namespace: src.as_ref().map(|w| w.namespace.clone()),
                dst_addr: Some(target),
                dst_workload: Some(dst.name.clone()),
                dst_namespace: Some(dst.namespace.clone()),
                dst_identity: Some(dst.identity().to_string()),
                direction: "inbound",
                duration: started.elapsed(),
                error: Some(format!("policy rejection: {policy}")),
                ..AccessLog::default()
            }
            .emit();
            responder.reject(StatusCode::UNAUTHORIZED);
            return None;
        }
        let opts = ConnectOptions {
            source: pi.cfg.keep_source_address.then_some(conn.peer.ip()),
            mark: Some(socket::PROXY_MARK),
            timeout: Some(pi.cfg.h2.handshake_timeout),
        };
        let upstream = match socket::connect(target, &opts).await {
            Ok(s) => s,
            Err(e) => {
                warn!("upstream connection to the local workload failed: {e}");
                labels.response_flags = ResponseFlags::Connect;
                pi.metrics.tcp.record_failure(&labels);
                responder.reject(StatusCode::SERVICE_UNAVAILABLE);
                return None;
            }
        };
        let tunnel = match responder.accept(response_baggage(&dst)) {
            Ok(t) => t,
            Err(e) => {
                debug!("peer went away before the tunnel opened: {e}");
                return None;
            }
        };
        let log = AccessLog {
            src_addr: Some(conn.peer),
            src_workload: src.as_ref().map(|w| w.name.clone()),
            src_namespace: src.as_ref().map(|w| w.namespace.clone()),
            src_identity: conn.peer_identity.as_ref().map(|i| i.to_string()),
            dst_addr: Some(target),
            dst_hbone_addr: Some(conn.local),
            dst_service: service.as_ref().map(|s| s.hostname.clone()),
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
        Some((tunnel, upstream, relay))
    }

    fn source_workload(&self, ip: IpAddr, conn: &ServerConn) -> Option<Arc<Workload>> {
        // The connection comes from the source pod's address (ztunnel keeps it); believe the
        // lookup only when the certificate says the same identity.
        let w = self.pi.state.read().workload_by_ip(ip)?;
        (Some(w.identity()) == conn.peer_identity).then_some(w)
    }
}

#[async_trait::async_trait]
impl ConnectHandler for Inbound {
    async fn certificate(&self, local: SocketAddr) -> Result<Arc<WorkloadCertificate>, String> {
        let Some(w) = self.pi.local_workload(local.ip()) else {
            return Err(format!(
                "no workload on node {} has address {}; cannot choose a certificate",
                self.pi.cfg.node,
                local.ip()
            ));
        };
        self.pi
            .certs
            .fetch(&w.identity())
            .await
            .map_err(|e| e.to_string())
    }

    async fn handle(&self, conn: Arc<ServerConn>, req: InboundRequest, responder: Responder) {
        let span = req.span.clone();
        let Some((tunnel, upstream, relay)) = self
            .open(conn, req, responder)
            .instrument(span.clone())
            .await
        else {
            return;
        };
        // The copy is polled for every chunk: the span is entered only when debug logging is
        // on; the access log at the end is written inside it.
        let log = relay_inbound(&self.pi, tunnel, upstream, relay)
            .instrument_verbose(span.clone())
            .await;
        span.in_scope(|| log.emit());
    }

    fn enters_span_itself(&self) -> bool {
        true
    }

    fn handshake_failed(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        flag: &'static str,
        reason: &str,
    ) {
        debug!(%peer, %local, "HBONE handshake failed: {reason}");
        let dst = self.pi.local_workload(local.ip());
        let flags = match flag {
            "H2_HANDSHAKE_FAILURE" => ResponseFlags::H2HandshakeFailure,
            _ => ResponseFlags::TlsFailure,
        };
        let labels = traffic_labels(
            Reporter::Destination,
            None,
            None,
            dst.as_deref(),
            None,
            SecurityPolicy::MutualTls,
        );
        self.pi
            .metrics
            .tcp
            .record_failure(&with_flags(labels, flags));
    }

    fn is_illegal_port(&self, port: u16) -> bool {
        self.pi.illegal_ports.contains(&port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_host_parsing() {
        let mut h = HeaderMap::new();
        h.insert(
            "forwarded",
            HeaderValue::from_static("for=\"10.0.0.1:3456\";host=echo.default.svc.cluster.local"),
        );
        assert_eq!(
            forwarded_host(&h).as_deref(),
            Some("echo.default.svc.cluster.local")
        );
        h.insert(
            "forwarded",
            HeaderValue::from_static("for=\"10.0.0.1:3456\""),
        );
        assert_eq!(forwarded_host(&h), None);
    }
}
