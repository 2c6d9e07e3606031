//! Redirection manager: keeps the node's eBPF capture in line with the enrolled pods.
//!
//! Desired set = workloads on this node (`node == cfg.node`) with `protocol: HBONE` and an IPv4
//! address, each with the host side of its veth found from the node's routing table. The
//! manager prepares the backend (bpffs, programs, maps, policy routing, uplink hooks), waits
//! for the config source's first full snapshot (so a restart never releases pods just because
//! the config is not loaded yet), reconciles against the pinned state left by a previous run,
//! and reconciles again on every state change and every few seconds (pods whose interface
//! appears late). Its view is in `/config_dump` under `redirect`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use zmesh_core::admin::ReadyBlocker;
use zmesh_core::state::TunnelProtocol;
use zmesh_ebpf::{
    PodRedirect, ReconcileReport, RedirectBackend, RedirectStats, TcBackend, TcOptions,
    host_interface_for,
};

use crate::config::Config;
use crate::proxy::ProxyInputs;

/// `redirect` in [`Config`]: capture enrolled pods with eBPF.
#[derive(Debug, Clone)]
pub struct RedirectConfig {
    /// bpffs directory for pinned maps and links.
    pub bpffs_dir: PathBuf,
    /// Interfaces where other nodes' traffic arrives.
    pub uplinks: Vec<String>,
}

impl Default for RedirectConfig {
    fn default() -> Self {
        RedirectConfig {
            bpffs_dir: PathBuf::from(zmesh_ebpf::DEFAULT_BPFFS_DIR),
            uplinks: Vec::new(),
        }
    }
}

/// What the manager reports in `/config_dump`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RedirectStatus {
    pub backend: String,
    pub bpffs_dir: String,
    pub uplinks: Vec<String>,
    pub prepared: bool,
    /// Set once the first reconcile after start (against the pinned state) has run.
    pub reconciled: bool,
    pub reconciles: u64,
    pub enrolled: Vec<PodRedirect>,
    pub last_change: Option<ReconcileReport>,
    /// Pods that should be captured but cannot be (yet), with the reason.
    pub pending: BTreeMap<String, String>,
    pub stats: Option<RedirectStats>,
    pub error: Option<String>,
}

/// Shared handle on the manager's view.
pub type StatusHandle = Arc<Mutex<RedirectStatus>>;

fn port_of(a: Option<std::net::SocketAddr>, default: u16) -> u16 {
    a.map(|a| a.port()).filter(|p| *p != 0).unwrap_or(default)
}

/// Start the manager; returns the handle `/config_dump` reads.
pub fn spawn(
    pi: Arc<ProxyInputs>,
    rc: RedirectConfig,
    stop: CancellationToken,
    ready: ReadyBlocker,
) -> StatusHandle {
    let cfg: &Config = &pi.cfg;
    let opts = TcOptions {
        bpffs_dir: rc.bpffs_dir.clone(),
        uplinks: rc.uplinks.clone(),
        outbound_port: port_of(cfg.outbound_addr, crate::config::OUTBOUND_PORT),
        inbound_port: port_of(
            cfg.inbound_plaintext_addr,
            crate::config::INBOUND_PLAINTEXT_PORT,
        ),
        hbone_port: port_of(Some(cfg.hbone_addr), zmesh_core::hbone::HBONE_PORT),
        ..TcOptions::default()
    };
    let status = Arc::new(Mutex::new(RedirectStatus {
        backend: "tc".into(),
        bpffs_dir: rc.bpffs_dir.display().to_string(),
        uplinks: rc.uplinks.clone(),
        ..RedirectStatus::default()
    }));
    let backend: Box<dyn RedirectBackend> = Box::new(TcBackend::new(opts));
    tokio::spawn(run(pi, rc, backend, status.clone(), stop, ready));
    status
}

fn set<F: FnOnce(&mut RedirectStatus)>(status: &StatusHandle, f: F) {
    if let Ok(mut s) = status.lock() {
        f(&mut s)
    }
}

/// The manager loop (see the module docs).
pub async fn run(
    pi: Arc<ProxyInputs>,
    rc: RedirectConfig,
    mut backend: Box<dyn RedirectBackend>,
    status: StatusHandle,
    stop: CancellationToken,
    ready: ReadyBlocker,
) {
    // Prepare, retrying: a missing privilege or bpffs is reported and retried, not fatal to
    // the proxy (pods pinned by a previous run stay captured meanwhile).
    let mut backoff = Duration::from_millis(200);
    loop {
        match backend.prepare().await {
            Ok(()) => {
                info!(backend = backend.name(), dir = %rc.bpffs_dir.display(), uplinks = ?rc.uplinks, "redirection prepared");
                set(&status, |s| {
                    s.prepared = true;
                    s.error = None;
                });
                break;
            }
            Err(e) => {
                error!("redirection setup failed: {e}");
                set(&status, |s| s.error = Some(e.to_string()));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    let mut rx = pi.state.generation();
    // Never reconcile before the first full snapshot: an empty state would release every pod
    // a previous run captured.
    while !pi.state.is_synced() {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    let mut ready = Some(ready);
    loop {
        reconcile_once(&pi, &rc, backend.as_mut(), &status).await;
        // Ready once prepared and reconciled against the first full snapshot.
        if let Some(r) = ready.take() {
            r.ready();
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// IPv4 addresses of the workloads this node must capture (`enrolled`), or of its other
/// local workloads (`!enrolled`).
pub fn local_ips(pi: &ProxyInputs, enrolled: bool) -> Vec<Ipv4Addr> {
    let state = pi.state.read();
    let mut ips: Vec<Ipv4Addr> = state
        .workloads()
        .filter(|w| w.node == pi.cfg.node && (w.protocol == TunnelProtocol::Hbone) == enrolled)
        .flat_map(|w| w.addresses.clone())
        .filter_map(|a| match a {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

async fn reconcile_once(
    pi: &ProxyInputs,
    rc: &RedirectConfig,
    backend: &mut dyn RedirectBackend,
    status: &StatusHandle,
) {
    let current = backend.enrolled().unwrap_or_default();
    let mut desired = Vec::new();
    let mut pending = BTreeMap::new();
    for ip in local_ips(pi, true) {
        match host_interface_for(ip, &rc.uplinks).await {
            Ok((host_ifname, host_ifindex)) => desired.push(PodRedirect {
                ip,
                host_ifname,
                host_ifindex,
            }),
            Err(e) => {
                // Keep an existing capture through a transient lookup failure (fail closed).
                if let Some(c) = current.iter().find(|c| c.ip == ip) {
                    desired.push(c.clone());
                }
                pending.insert(ip.to_string(), e.to_string());
            }
        }
    }
    let report = backend.reconcile(&desired).await;
    let mut peers = Vec::new();
    for ip in local_ips(pi, false) {
        match host_interface_for(ip, &rc.uplinks).await {
            Ok((host_ifname, host_ifindex)) => peers.push(PodRedirect {
                ip,
                host_ifname,
                host_ifindex,
            }),
            Err(e) => {
                pending.insert(ip.to_string(), format!("(not enrolled) {e}"));
            }
        }
    }
    if let Err(e) = backend.set_local_peers(&peers).await {
        warn!("redirection: hooking local non-enrolled pods: {e}");
    }
    for e in &report.errors {
        warn!("redirection: {e}");
    }
    if report.changed() {
        info!(added = ?report.added, updated = ?report.updated, removed = ?report.removed, "redirection reconciled");
    }
    let enrolled = backend.enrolled();
    let stats = backend.stats();
    set(status, |s| {
        s.reconciled = true;
        s.reconciles += 1;
        s.pending = pending;
        s.stats = stats;
        match enrolled {
            Ok(e) => {
                s.enrolled = e;
                s.error = None;
            }
            Err(e) => s.error = Some(e.to_string()),
        }
        if report.changed() || !report.errors.is_empty() || s.last_change.is_none() {
            s.last_change = Some(report);
        }
    });
}
