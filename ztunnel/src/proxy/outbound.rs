//! Outbound: a local pod's connection (captured on 15001, or asked for over SOCKS5) to its
//! original destination.
//!
//! - destination is a mesh workload → HBONE to that workload's node;
//! - destination is a service VIP → pick a healthy endpoint, map service port → target port,
//!   then as above;
//! - destination is a workload outside the mesh, or unknown → plain TCP passthrough.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderValue};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info_span, warn};
use zmesh_core::copy::{BytesStream, CopyStats, copy_bidirectional};
use zmesh_core::hbone::H2Stream;
use zmesh_core::hbone::pool::{ConnectRequest, Pool, WorkloadKey};
use zmesh_core::hbone::{HboneError, next_connection_id};
use zmesh_core::identity::Identity;
use zmesh_core::metrics::{ConnectionRecorder, Reporter, ResponseFlags, SecurityPolicy, TcpLabels};
use zmesh_core::socket::{self, ConnectOptions, SocketError};
use zmesh_core::state::{GatewayAddress, GatewayDestination, Service, TunnelProtocol, Workload};
use zmesh_core::telemetry::{AccessLog, InstrumentVerbose};

use super::{ProxyInputs, traffic_labels};

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(
        "connection from {0} is not from a known workload on this node; refusing to proxy it (is the pod's workload known to the control plane?)"
    )]
    UnknownSource(IpAddr),
    #[error("service {service} has no port {port}")]
    NoServicePort { service: String, port: u16 },
    #[error("service {service} has no healthy endpoint for port {port}")]
    NoHealthyEndpoint { service: String, port: u16 },
    #[error("destination {0} is one of this proxy's own ports; refusing (it would loop)")]
    SelfCall(SocketAddr),
    #[error(transparent)]
    Hbone(#[from] HboneError),
    #[error("passthrough connection to {dst} failed: {source}")]
    Passthrough {
        dst: SocketAddr,
        #[source]
        source: SocketError,
    },
}

impl OutboundError {
    pub fn response_flags(&self) -> ResponseFlags {
        match self {
            OutboundError::Hbone(e) => match e.response_flag() {
                "TLS_FAILURE" => ResponseFlags::TlsFailure,
                "H2_HANDSHAKE_FAILURE" => ResponseFlags::H2HandshakeFailure,
                "DENY" => ResponseFlags::Deny,
                _ => ResponseFlags::Connect,
            },
            OutboundError::UnknownSource(_) => ResponseFlags::IdentityError,
            _ => ResponseFlags::Connect,
        }
    }

    /// Was the connection refused by policy at the destination?
    pub fn is_denied(&self) -> bool {
        matches!(self, OutboundError::Hbone(HboneError::Status { status, .. }) if status.as_u16() == 401)
    }
}

/// The upstream side of an outbound connection.
pub enum Upstream {
    Hbone(H2Stream),
    Tcp(TcpStream),
}

/// An upstream that is open, with what we know about it for telemetry.
pub struct Established {
    pub id: u64,
    pub upstream: Upstream,
    pub labels: TcpLabels,
    pub src_addr: SocketAddr,
    pub src: Arc<Workload>,
    pub dst: Option<Arc<Workload>>,
    pub service: Option<Arc<Service>>,
    /// Final destination address (after service → endpoint resolution).
    pub dst_addr: SocketAddr,
    pub hbone_addr: Option<SocketAddr>,
}

enum Plan {
    Hbone {
        dst: Arc<Workload>,
        dst_addr: SocketAddr,
        hbone_addr: SocketAddr,
        expected: Vec<Identity>,
    },
    Direct {
        dst: Option<Arc<Workload>>,
        dst_addr: SocketAddr,
    },
}

/// The waypoint workload and its HBONE address for a `GatewayAddress`.
pub(crate) fn resolve_waypoint(
    state: &zmesh_core::state::ProxyState,
    gw: &GatewayAddress,
) -> Option<(Arc<Workload>, SocketAddr)> {
    match &gw.destination {
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => {
            let svc = state
                .service_by_host(&format!("{namespace}/{hostname}"))
                .or_else(|| state.service_by_host(hostname))?;
            waypoint_endpoint(state, &svc, gw.hbone_mtls_port)
        }
        // The controller names a waypoint by its Service VIP when it has one, else by the pod.
        GatewayDestination::Address { ip, .. } => match state.service_by_vip(*ip) {
            Some(svc) => waypoint_endpoint(state, &svc, gw.hbone_mtls_port),
            None => {
                let w = state.workload_by_ip(*ip)?;
                Some((w, SocketAddr::new(*ip, gw.hbone_mtls_port)))
            }
        },
    }
}

/// A waypoint pod behind the waypoint's Service, and its HBONE address.
fn waypoint_endpoint(
    state: &zmesh_core::state::ProxyState,
    svc: &Service,
    hbone_port: u16,
) -> Option<(Arc<Workload>, SocketAddr)> {
    let port = svc
        .ports
        .first()
        .map(|p| p.service_port)
        .unwrap_or(hbone_port);
    let (w, _) = state.endpoints(svc, port).into_iter().next()?;
    let ip = *w.addresses.first()?;
    Some((w, SocketAddr::new(ip, hbone_port)))
}

fn plan(
    pi: &ProxyInputs,
    src_ip: IpAddr,
    orig_dst: SocketAddr,
) -> Result<(Plan, Option<Arc<Service>>), OutboundError> {
    let state = pi.state.read();
    // A destination that uses a waypoint is tunneled to the waypoint, with the original
    // destination as the CONNECT authority (Istio ambient). The waypoint's own traffic never is.
    let svc_for_wp = state.service_by_vip(orig_dst.ip());
    let wp = svc_for_wp
        .as_ref()
        .and_then(|s| s.waypoint.clone())
        .or_else(|| {
            state
                .workload_by_ip(orig_dst.ip())
                .and_then(|w| w.waypoint.clone())
        });
    if let Some(gw) = wp
        && let Some((w, hbone_addr)) = resolve_waypoint(&state, &gw)
        && !w.addresses.contains(&src_ip)
    {
        return Ok((
            Plan::Hbone {
                expected: vec![w.identity()],
                dst: w,
                dst_addr: orig_dst,
                hbone_addr,
            },
            svc_for_wp,
        ));
    }
    let mut service = None;
    let (dst, dst_addr) = if let Some(svc) = state.service_by_vip(orig_dst.ip()) {
        let Some(port) = svc.ports.iter().find(|p| p.service_port == orig_dst.port()) else {
            return Err(OutboundError::NoServicePort {
                service: svc.hostname.clone(),
                port: orig_dst.port(),
            });
        };
        let endpoints = state.endpoints(&svc, port.service_port);
        if endpoints.is_empty() {
            return Err(OutboundError::NoHealthyEndpoint {
                service: svc.hostname.clone(),
                port: orig_dst.port(),
            });
        }
        let (w, target_port) = endpoints[rand::random::<u64>() as usize % endpoints.len()].clone();
        let Some(ip) = pick_address(&w, orig_dst.ip()) else {
            return Err(OutboundError::NoHealthyEndpoint {
                service: svc.hostname.clone(),
                port: orig_dst.port(),
            });
        };
        service = Some(svc);
        (Some(w), SocketAddr::new(ip, target_port))
    } else {
        (state.workload_by_ip(orig_dst.ip()), orig_dst)
    };
    let plan = match dst {
        Some(w) if w.protocol == TunnelProtocol::Hbone => {
            let mut expected = vec![w.identity()];
            if let Some(svc) = &service {
                expected.extend(
                    svc.subject_alt_names
                        .iter()
                        .filter_map(|s| s.parse::<Identity>().ok()),
                );
            }
            Plan::Hbone {
                hbone_addr: pi.hbone_address(&w, dst_addr.ip()),
                dst: w,
                dst_addr,
                expected,
            }
        }
        other => Plan::Direct {
            dst: other,
            dst_addr,
        },
    };
    Ok((plan, service))
}

/// An address of `w` in the same family as the original destination.
fn pick_address(w: &Workload, like: IpAddr) -> Option<IpAddr> {
    w.addresses
        .iter()
        .find(|a| a.is_ipv4() == like.is_ipv4())
        .or_else(|| w.addresses.first())
        .copied()
}

fn random_hex(bytes: usize) -> String {
    let mut s = String::with_capacity(bytes * 2);
    for _ in 0..bytes {
        s.push_str(&format!("{:02x}", rand::random::<u8>()));
    }
    s
}

fn hbone_headers(src_addr: SocketAddr, src: &Workload, service: Option<&Service>) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut forwarded = format!("for=\"{src_addr}\"");
    if let Some(svc) = service {
        forwarded.push_str(&format!(";host={}", svc.hostname));
    }
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        h.insert("forwarded", v);
    }
    let mut baggage = Vec::new();
    if !src.cluster_id.is_empty() {
        baggage.push(format!("k8s.cluster.name={}", src.cluster_id));
    }
    baggage.push(format!("k8s.namespace.name={}", src.namespace));
    if !src.workload_name.is_empty() {
        let kind = if src.workload_type.is_empty() {
            "deployment"
        } else {
            src.workload_type.as_str()
        };
        baggage.push(format!("k8s.{kind}.name={}", src.workload_name));
    }
    if !src.canonical_name.is_empty() {
        baggage.push(format!("service.name={}", src.canonical_name));
    }
    if !src.canonical_revision.is_empty() {
        baggage.push(format!("service.version={}", src.canonical_revision));
    }
    if let Ok(v) = HeaderValue::from_str(&baggage.join(",")) {
        h.insert("baggage", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("00-{}-{}-00", random_hex(16), random_hex(8))) {
        h.insert("traceparent", v);
    }
    h
}

/// Resolve and open the upstream for a connection from `src_addr` to `orig_dst`. Failures are
/// counted in `istio_tcp_connections_failed_total` here.
pub async fn connect(
    pi: &Arc<ProxyInputs>,
    pool: &Pool,
    src_addr: SocketAddr,
    orig_dst: SocketAddr,
) -> Result<Established, OutboundError> {
    let id = next_connection_id();
    let Some(src) = pi.local_workload(src_addr.ip()) else {
        let labels = traffic_labels(
            Reporter::Source,
            None,
            None,
            None,
            None,
            SecurityPolicy::Unknown,
        );
        pi.metrics
            .tcp
            .record_failure(&with_flags(labels, ResponseFlags::IdentityError));
        return Err(OutboundError::UnknownSource(src_addr.ip()));
    };
    if pi.illegal_ports.contains(&orig_dst.port()) && pi.local_workload(orig_dst.ip()).is_some() {
        return Err(OutboundError::SelfCall(orig_dst));
    }
    let (plan, service) = match plan(pi, src_addr.ip(), orig_dst) {
        Ok(p) => p,
        Err(e) => {
            let labels = traffic_labels(
                Reporter::Source,
                Some(&src),
                None,
                None,
                None,
                SecurityPolicy::Unknown,
            );
            pi.metrics
                .tcp
                .record_failure(&with_flags(labels, e.response_flags()));
            return Err(e);
        }
    };
    match plan {
        Plan::Hbone {
            dst,
            dst_addr,
            hbone_addr,
            expected,
        } => {
            let labels = traffic_labels(
                Reporter::Source,
                Some(&src),
                None,
                Some(&dst),
                service.as_deref(),
                SecurityPolicy::MutualTls,
            );
            let key = WorkloadKey {
                src_id: src.identity(),
                dst_id: expected,
                dst: hbone_addr,
                src: src_addr.ip(),
            };
            let req = ConnectRequest {
                authority: dst_addr.to_string(),
                headers: hbone_headers(src_addr, &src, service.as_deref()),
            };
            match pool.connect(&key, req).await {
                Ok(stream) => Ok(Established {
                    id,
                    upstream: Upstream::Hbone(stream),
                    labels,
                    src_addr,
                    src,
                    dst: Some(dst),
                    service,
                    dst_addr,
                    hbone_addr: Some(hbone_addr),
                }),
                Err(e) => {
                    let e = OutboundError::Hbone(e);
                    pi.metrics
                        .tcp
                        .record_failure(&with_flags(labels, e.response_flags()));
                    Err(e)
                }
            }
        }
        Plan::Direct { dst, dst_addr } => {
            let labels = traffic_labels(
                Reporter::Source,
                Some(&src),
                None,
                dst.as_deref(),
                service.as_deref(),
                SecurityPolicy::Unknown,
            );
            let opts = ConnectOptions {
                source: pi.cfg.keep_source_address.then_some(src_addr.ip()),
                mark: Some(socket::PROXY_MARK),
                timeout: Some(pi.cfg.h2.handshake_timeout),
            };
            match socket::connect(dst_addr, &opts).await {
                Ok(tcp) => Ok(Established {
                    id,
                    upstream: Upstream::Tcp(tcp),
                    labels,
                    src_addr,
                    src,
                    dst,
                    service,
                    dst_addr,
                    hbone_addr: None,
                }),
                Err(source) => {
                    pi.metrics
                        .tcp
                        .record_failure(&with_flags(labels, ResponseFlags::Connect));
                    Err(OutboundError::Passthrough {
                        dst: dst_addr,
                        source,
                    })
                }
            }
        }
    }
}

pub(crate) fn with_flags(mut labels: TcpLabels, flags: ResponseFlags) -> TcpLabels {
    labels.response_flags = flags;
    labels
}

/// Copy between the client and an established upstream until both sides are done; then
/// report bytes and return the access log to write.
pub async fn relay(
    pi: Arc<ProxyInputs>,
    client: TcpStream,
    est: Established,
    started: Instant,
) -> AccessLog {
    let Established {
        id,
        upstream,
        labels,
        src_addr,
        src,
        dst,
        service,
        dst_addr,
        hbone_addr,
    } = est;
    let recorder = ConnectionRecorder::new(pi.metrics.clone(), labels);
    let stats = CopyStats::new();
    let force = pi.drain.force_close();
    let mut client = client;
    let result = match upstream {
        Upstream::Hbone(mut s) => copy_until(&mut client, &mut s, &stats, &force).await,
        Upstream::Tcp(mut s) => copy_until(&mut client, &mut s, &stats, &force).await,
    };
    recorder.add_sent(stats.a_to_b());
    recorder.add_received(stats.b_to_a());
    let error = match result {
        Ok(()) => None,
        Err(e) => {
            recorder.fail(ResponseFlags::Connect);
            Some(e.to_string())
        }
    };
    drop(recorder);
    let log = AccessLog {
        src_addr: Some(src_addr),
        src_workload: Some(src.name.clone()),
        src_namespace: Some(src.namespace.clone()),
        src_identity: Some(src.identity().to_string()),
        dst_addr: Some(dst_addr),
        dst_hbone_addr: hbone_addr,
        dst_service: service.as_ref().map(|s| s.hostname.clone()),
        dst_workload: dst.as_ref().map(|w| w.name.clone()),
        dst_namespace: dst.as_ref().map(|w| w.namespace.clone()),
        dst_identity: dst
            .as_ref()
            .filter(|_| hbone_addr.is_some())
            .map(|w| w.identity().to_string()),
        direction: "outbound",
        bytes_sent: stats.a_to_b(),
        bytes_recv: stats.b_to_a(),
        duration: started.elapsed(),
        error,
    };
    debug!(conn = id, "outbound connection finished");
    log
}

async fn copy_until<A: BytesStream, B: BytesStream>(
    a: &mut A,
    b: &mut B,
    stats: &CopyStats,
    cancel: &tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    tokio::select! {
        r = copy_bidirectional(a, b, stats) => r,
        _ = cancel.cancelled() => Err(std::io::Error::other("closed by proxy shutdown")),
    }
}

/// Handle one captured connection whose original destination is `orig_dst`, tunnelling
/// through `pool` (the pool of the worker running this).
pub async fn handle(
    pi: Arc<ProxyInputs>,
    pool: Pool,
    client: TcpStream,
    peer: SocketAddr,
    orig_dst: SocketAddr,
) {
    let started = Instant::now();
    let span = info_span!("outbound", src = %peer, dst = %orig_dst);
    // Boxed: connection setup (TLS and HTTP/2 handshakes) has a large state that would
    // otherwise stay in the task's allocation for the connection's whole life.
    let connected = Box::pin(connect(&pi, &pool, peer, orig_dst))
        .instrument(span.clone())
        .await;
    match connected {
        Ok(est) => {
            // The copy is polled for every chunk: its span is entered only when debug logging
            // is on; the access log at the end is written inside it.
            let log = relay(pi, client, est, started)
                .instrument_verbose(span.clone())
                .await;
            span.in_scope(|| log.emit());
        }
        Err(e) => span.in_scope(|| {
            warn!("outbound connection failed: {e}");
            AccessLog {
                src_addr: Some(peer),
                dst_addr: Some(orig_dst),
                direction: "outbound",
                duration: started.elapsed(),
                error: Some(e.to_string()),
                ..AccessLog::default()
            }
            .emit();
        }),
    }
}

/// The 15001 listener: the accepted socket's local address is the original destination
/// (eBPF steered the connection here with `bpf_sk_assign`; the listener is transparent).
pub async fn serve(pi: Arc<ProxyInputs>, pool: Pool, listener: tokio::net::TcpListener) {
    let drain = pi.drain.clone();
    super::accept_loop(listener, "outbound", drain, move |stream, peer| {
        let (pi, pool) = (pi.clone(), pool.clone());
        async move {
            let orig_dst = match stream.local_addr() {
                Ok(a) => a,
                Err(e) => {
                    debug!("connection gone before handling: {e}");
                    return;
                }
            };
            handle(pi, pool, stream, peer, orig_dst).await
        }
    })
    .await
}
