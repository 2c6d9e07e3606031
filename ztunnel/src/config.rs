//! ztunnel's configuration: where it listens, who it is, how it reaches peers.
//!
//! Every listener address is configurable so tests can run several ztunnels in one process on
//! OS-assigned loopback ports; the defaults are Istio's ports.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use zmesh_core::hbone::{H2Config, HBONE_PORT};

/// Istio's ports.
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const SOCKS5_PORT: u16 = 15080;
pub const ADMIN_PORT: u16 = 15000;
pub const STATS_PORT: u16 = 15020;
pub const READINESS_PORT: u16 = 15021;

#[derive(Debug, Clone)]
pub struct Config {
    /// Name of the node this ztunnel serves; only workloads with this `node` are local.
    pub node: String,
    /// The node's own addresses. HBONE connections arriving on one of these (rather than on a
    /// pod address) may target any local workload.
    pub node_ips: Vec<IpAddr>,
    pub outbound_addr: Option<SocketAddr>,
    pub inbound_plaintext_addr: Option<SocketAddr>,
    pub hbone_addr: SocketAddr,
    pub socks5_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub readiness_addr: Option<SocketAddr>,
    /// Make 15001/15006/15008 `IP_TRANSPARENT` (needed when traffic is steered by eBPF).
    pub transparent: bool,
    /// Data-path workers (`ZTUNNEL_WORKER_THREADS`, at least 1): each an OS thread with its own
    /// single-threaded runtime, its own `SO_REUSEPORT` listeners on 15001/15006/15008/15080 and
    /// its own HBONE pool ([`zmesh_core::worker`]). Everything else runs on the caller's
    /// runtime (the control runtime).
    pub workers: usize,
    /// Connect upstream (and to HBONE peers) from the original client's IP.
    pub keep_source_address: bool,
    /// Port of the HBONE listener on other nodes (15008).
    pub peer_hbone_port: u16,
    /// HBONE port per node name where it is not `peer_hbone_port` (several ztunnels on one
    /// loopback in tests and the loopback demo).
    pub peer_hbone_ports: HashMap<String, u16>,
    /// Explicit HBONE address per node name, for nodes whose pod addresses are not steered to
    /// their ztunnel (reachable only by the node's own address).
    pub peer_hbone_addrs: HashMap<String, SocketAddr>,
    /// Trust domain of this mesh.
    pub trust_domain: String,
    /// Lifetime of workload certificates requested from the CA.
    pub cert_lifetime: Duration,
    pub h2: H2Config,
    /// How long live connections may finish after SIGTERM.
    pub drain_grace: Duration,
    /// YAML file with workloads/services/policies (the local config source).
    pub local_config: Option<PathBuf>,
    /// eBPF capture of enrolled pods (needs root); `None`: no redirection.
    pub redirect: Option<crate::redirect::RedirectConfig>,
}

impl Default for Config {
    fn default() -> Self {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        Config {
            node: "local".into(),
            node_ips: Vec::new(),
            outbound_addr: Some(SocketAddr::new(any, OUTBOUND_PORT)),
            inbound_plaintext_addr: Some(SocketAddr::new(any, INBOUND_PLAINTEXT_PORT)),
            hbone_addr: SocketAddr::new(any, HBONE_PORT),
            socks5_addr: Some(SocketAddr::new(lo, SOCKS5_PORT)),
            admin_addr: Some(SocketAddr::new(lo, ADMIN_PORT)),
            metrics_addr: Some(SocketAddr::new(any, STATS_PORT)),
            readiness_addr: Some(SocketAddr::new(any, READINESS_PORT)),
            transparent: false,
            workers: 2,
            keep_source_address: false,
            peer_hbone_port: HBONE_PORT,
            peer_hbone_ports: HashMap::new(),
            peer_hbone_addrs: HashMap::new(),
            trust_domain: zmesh_core::identity::DEFAULT_TRUST_DOMAIN.into(),
            cert_lifetime: Duration::from_secs(24 * 3600),
            h2: H2Config::default(),
            drain_grace: Duration::from_secs(5),
            local_config: None,
            redirect: None,
        }
    }
}

impl Config {
    /// A configuration for tests and the loopback demo: every listener on an OS-assigned port
    /// (HBONE on all IPv4 addresses so `127.0.0.x` workload addresses reach it), one worker
    /// (so pooling is deterministic: one pool sees every connection).
    pub fn loopback(node: &str) -> Self {
        let any0 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
        let lo0 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        Config {
            node: node.into(),
            outbound_addr: Some(lo0),
            inbound_plaintext_addr: Some(lo0),
            hbone_addr: any0,
            socks5_addr: Some(lo0),
            admin_addr: Some(lo0),
            metrics_addr: Some(lo0),
            readiness_addr: Some(lo0),
            keep_source_address: true,
            workers: 1,
            ..Config::default()
        }
    }
}
