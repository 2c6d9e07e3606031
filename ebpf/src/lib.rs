//! zmesh traffic redirection.
//!
//! The eBPF programs are C (`src/*.bpf.c`, map layouts in `src/zmesh_redirect.h`), compiled by
//! clang from `build.rs` and embedded here; [`TcBackend`] loads them with aya 0.14.
//!
//! A [`RedirectBackend`] captures the TCP traffic of enrolled pods for the node's ztunnel:
//!
//! - [`RedirectBackend::prepare`] sets the node up (bpffs, programs, maps, policy routing,
//!   uplink hooks) and picks up what a previous run left pinned;
//! - [`RedirectBackend::enroll`] / [`RedirectBackend::unenroll`] add and remove one pod;
//! - [`RedirectBackend::reconcile`] makes the enrolled set equal to a desired set;
//! - [`RedirectBackend::enrolled`] reports what is captured now (from the pinned state, so it
//!   is right after a restart too).
//!
//! The default backend ([`TcBackend`], "tc") follows the lab proof of concept: tc ingress
//! (TCX) programs with `bpf_sk_assign` towards ztunnel's `IP_TRANSPARENT` listeners in the
//! node netns. Another backend (in-pod `sk_lookup` + cgroup `connect4`) can implement the same
//! trait later.

use std::net::Ipv4Addr;

use serde::Serialize;

pub mod netlink;
pub mod tc;

pub use netlink::{PolicyRouting, host_interface_for};
pub use tc::{TcBackend, TcOptions};

/// The compiled eBPF object (clang `-O2 -g -target bpf`), 8-byte aligned for the ELF parser.
pub static REDIRECT_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zmesh_redirect.bpf.o"));

/// Default bpffs directory for pinned maps and links.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/zmesh";
/// `skb->mark` set on packets steered to a proxy socket, and the mask of the routing rule
/// (keep in sync with `ZM_PROXY_MARK` in `zmesh_redirect.h`).
pub const PROXY_MARK: u32 = 0x400;
pub const PROXY_MARK_MASK: u32 = 0xf00;
/// Routing table holding `local 0.0.0.0/0 dev lo`, and the priority of the fwmark rule.
pub const DEFAULT_ROUTE_TABLE: u32 = 1400;
pub const DEFAULT_RULE_PRIORITY: u32 = 1400;

/// One pod to capture: its IPv4 address and the host side of its veth (in the node netns).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodRedirect {
    pub ip: Ipv4Addr,
    pub host_ifname: String,
    pub host_ifindex: u32,
}

/// What a [`RedirectBackend::reconcile`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// Newly captured.
    pub added: Vec<Ipv4Addr>,
    /// Captured before, re-attached because the interface changed.
    pub updated: Vec<Ipv4Addr>,
    /// Captured before and no longer wanted.
    pub removed: Vec<Ipv4Addr>,
    /// Already captured as wanted.
    pub unchanged: Vec<Ipv4Addr>,
    /// Pods that could not be enrolled or released, with the reason.
    pub errors: Vec<String>,
}

impl ReconcileReport {
    pub fn changed(&self) -> bool {
        !(self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty())
    }
}

/// Packet counters of the programs (summed over CPUs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RedirectStats {
    pub to_established: u64,
    pub to_outbound: u64,
    pub to_inbound: u64,
    pub to_hbone: u64,
    pub dropped_no_listener: u64,
    pub assign_failed: u64,
    pub dropped_unowned: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error(
        "cannot load the eBPF redirection programs ({what}): {detail} (needs root: CAP_BPF + CAP_NET_ADMIN; if the pinned maps in {dir} come from an incompatible zmesh version, remove that directory)"
    )]
    Load {
        what: String,
        dir: String,
        detail: String,
    },
    #[error("cannot attach the redirection program to interface {ifname}: {detail}")]
    Attach { ifname: String, detail: String },
    #[error("eBPF map {map}: {detail}")]
    Map { map: &'static str, detail: String },
    #[error("pinned object {path}: {detail}")]
    Pin { path: String, detail: String },
    #[error("policy routing: {0}")]
    Routing(String),
    #[error("cannot find the host interface of pod {ip}: {detail}")]
    Interface { ip: Ipv4Addr, detail: String },
    #[error("the redirection backend is not prepared yet (call prepare first)")]
    NotPrepared,
}

/// A way to capture enrolled pods' traffic for the node proxy.
#[async_trait::async_trait]
pub trait RedirectBackend: Send {
    /// Short name ("tc").
    fn name(&self) -> &'static str;

    /// Set up the node (idempotent; picks up state pinned by a previous run).
    async fn prepare(&mut self) -> Result<(), RedirectError>;

    /// Capture one pod (idempotent; re-attaches when its interface changed).
    async fn enroll(&mut self, pod: &PodRedirect) -> Result<(), RedirectError>;

    /// Stop capturing a pod (idempotent). New connections go direct afterwards.
    async fn unenroll(&mut self, ip: Ipv4Addr) -> Result<(), RedirectError>;

    /// What is captured now.
    fn enrolled(&self) -> Result<Vec<PodRedirect>, RedirectError>;

    /// Local pods that are NOT enrolled. Their connections to enrolled pods must still reach
    /// the proxy (inbound capture, PeerAuthentication), and replies to the proxy's
    /// source-preserving sockets must reach the proxy; the tc backend hooks their veths for
    /// that (traffic between two non-enrolled pods is untouched). Default: nothing to do.
    async fn set_local_peers(&mut self, _pods: &[PodRedirect]) -> Result<(), RedirectError> {
        Ok(())
    }

    /// Packet counters, when the backend has them.
    fn stats(&self) -> Option<RedirectStats> {
        None
    }

    /// Make the captured set equal to `desired`: stale pods are released, missing ones added.
    async fn reconcile(&mut self, desired: &[PodRedirect]) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        let current = match self.enrolled() {
            Ok(c) => c,
            Err(e) => {
                report.errors.push(e.to_string());
                Vec::new()
            }
        };
        for pod in &current {
            if !desired.iter().any(|d| d.ip == pod.ip) {
                match self.unenroll(pod.ip).await {
                    Ok(()) => report.removed.push(pod.ip),
                    Err(e) => report.errors.push(format!("{}: {e}", pod.ip)),
                }
            }
        }
        for pod in desired {
            let before = current.iter().find(|c| c.ip == pod.ip);
            if before.is_some_and(|b| b.host_ifindex == pod.host_ifindex) {
                report.unchanged.push(pod.ip);
                continue;
            }
            match self.enroll(pod).await {
                Ok(()) if before.is_some() => report.updated.push(pod.ip),
                Ok(()) => report.added.push(pod.ip),
                Err(e) => report.errors.push(format!("{}: {e}", pod.ip)),
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory backend: exercises the trait's default `reconcile`.
    #[derive(Default)]
    struct Fake {
        pods: Vec<PodRedirect>,
        fail: Option<Ipv4Addr>,
    }

    #[async_trait::async_trait]
    impl RedirectBackend for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        async fn prepare(&mut self) -> Result<(), RedirectError> {
            Ok(())
        }
        async fn enroll(&mut self, pod: &PodRedirect) -> Result<(), RedirectError> {
            if self.fail == Some(pod.ip) {
                return Err(RedirectError::Attach {
                    ifname: pod.host_ifname.clone(),
                    detail: "no such device".into(),
                });
            }
            self.pods.retain(|p| p.ip != pod.ip);
            self.pods.push(pod.clone());
            Ok(())
        }
        async fn unenroll(&mut self, ip: Ipv4Addr) -> Result<(), RedirectError> {
            self.pods.retain(|p| p.ip != ip);
            Ok(())
        }
        fn enrolled(&self) -> Result<Vec<PodRedirect>, RedirectError> {
            Ok(self.pods.clone())
        }
    }

    fn pod(last: u8, ifindex: u32) -> PodRedirect {
        PodRedirect {
            ip: Ipv4Addr::new(10, 0, 0, last),
            host_ifname: format!("veth{ifindex}"),
            host_ifindex: ifindex,
        }
    }

    #[tokio::test]
    async fn reconcile_adds_updates_removes_and_reports_errors() {
        let mut b = Fake {
            pods: vec![pod(1, 11), pod(2, 12), pod(3, 13)],
            fail: Some(Ipv4Addr::new(10, 0, 0, 5)),
        };
        // 1 unchanged, 2 moved to a new interface, 3 gone, 4 new, 5 fails.
        let desired = vec![pod(1, 11), pod(2, 22), pod(4, 14), pod(5, 15)];
        let r = b.reconcile(&desired).await;
        assert_eq!(r.unchanged, vec![Ipv4Addr::new(10, 0, 0, 1)]);
        assert_eq!(r.updated, vec![Ipv4Addr::new(10, 0, 0, 2)]);
        assert_eq!(r.removed, vec![Ipv4Addr::new(10, 0, 0, 3)]);
        assert_eq!(r.added, vec![Ipv4Addr::new(10, 0, 0, 4)]);
        assert_eq!(r.errors.len(), 1);
        assert!(r.errors[0].contains("10.0.0.5") && r.errors[0].contains("no such device"));
        assert!(r.changed());
        let mut ips: Vec<_> = b.pods.iter().map(|p| p.ip.octets()[3]).collect();
        ips.sort();
        assert_eq!(ips, vec![1, 2, 4]);
        // Converged: a second pass changes nothing.
        b.fail = None;
        let desired = vec![pod(1, 11), pod(2, 22), pod(4, 14)];
        let r = b.reconcile(&desired).await;
        assert!(!r.changed(), "{r:?}");
    }

    #[test]
    fn object_is_embedded_with_both_programs() {
        let obj = aya_obj_names();
        assert!(obj.contains(&"zm_from_pod".to_string()), "{obj:?}");
        assert!(obj.contains(&"zm_to_pod".to_string()), "{obj:?}");
    }

    /// Program names in the embedded object (parsed, not loaded: needs no privilege).
    fn aya_obj_names() -> Vec<String> {
        let text = String::from_utf8_lossy(REDIRECT_OBJ);
        ["zm_from_pod", "zm_to_pod"]
            .iter()
            .filter(|n| text.contains(*n))
            .map(|n| n.to_string())
            .collect()
    }
}
