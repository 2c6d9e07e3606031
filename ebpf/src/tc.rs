//! The "tc" backend: TCX ingress programs + `bpf_sk_assign` (see `zmesh_redirect.bpf.c`).
//!
//! Pinned under [`TcOptions::bpffs_dir`] (default `/sys/fs/bpf/zmesh`):
//!
//! | pin | what |
//! |---|---|
//! | `zm_cfg`, `zm_pods`, `zm_stats` | the maps (pinned by name, reused by the next run) |
//! | `link_pod_<a_b_c_d>` | `zm_from_pod` on the host side of that pod's veth |
//! | `link_uplink_<ifname>` | `zm_to_pod` on an uplink |
//! | `link_peer_<a_b_c_d>_<ifindex>` | `zm_to_pod` on a non-enrolled local pod's veth |
//!
//! Everything stays attached when ztunnel exits, so enrolled pods stay captured — and, with
//! no listener, their new connections are dropped (fail closed) — until the next run
//! reconciles. Removing the directory releases everything.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use tracing::{debug, info, warn};

use crate::netlink::{PolicyRouting, ifname_of};
use crate::{
    DEFAULT_BPFFS_DIR, DEFAULT_ROUTE_TABLE, DEFAULT_RULE_PRIORITY, PROXY_MARK, PROXY_MARK_MASK,
    PodRedirect, REDIRECT_OBJ, RedirectBackend, RedirectError, RedirectStats,
};

const BPFFS_MAGIC: i64 = 0xcafe4a11;
const FROM_POD: &str = "zm_from_pod";
const TO_POD: &str = "zm_to_pod";

/// `struct zm_config` in `zmesh_redirect.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ZmConfig {
    outbound_port: u16,
    inbound_port: u16,
    hbone_port: u16,
    _pad: u16,
    mark: u32,
    flags: u32,
}
// SAFETY: repr(C), only integer fields, no padding bytes beyond the explicit `_pad`.
unsafe impl aya::Pod for ZmConfig {}

/// `struct zm_pod` in `zmesh_redirect.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ZmPod {
    ifindex: u32,
    flags: u32,
}
// SAFETY: repr(C), two u32 fields, no padding.
unsafe impl aya::Pod for ZmPod {}

const ZM_POD_ENROLLED: u32 = 1;

#[derive(Debug, Clone)]
pub struct TcOptions {
    /// Where maps and links are pinned (on a bpffs).
    pub bpffs_dir: PathBuf,
    /// Interfaces where traffic from other nodes arrives (get `zm_to_pod`).
    pub uplinks: Vec<String>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub hbone_port: u16,
    pub route_table: u32,
    pub rule_priority: u32,
}

impl Default for TcOptions {
    fn default() -> Self {
        TcOptions {
            bpffs_dir: PathBuf::from(DEFAULT_BPFFS_DIR),
            uplinks: Vec::new(),
            outbound_port: 15001,
            inbound_port: 15006,
            hbone_port: 15008,
            route_table: DEFAULT_ROUTE_TABLE,
            rule_priority: DEFAULT_RULE_PRIORITY,
        }
    }
}

pub struct TcBackend {
    opts: TcOptions,
    ebpf: Option<Ebpf>,
}

impl TcOptions {
    fn routing(&self) -> PolicyRouting {
        PolicyRouting {
            mark: PROXY_MARK,
            mask: PROXY_MARK_MASK,
            table: self.route_table,
            priority: self.rule_priority,
        }
    }
}

/// An error with its sources (aya's Display leaves out the errno).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn load_err(dir: &Path, what: &str, e: impl std::fmt::Display) -> RedirectError {
    RedirectError::Load {
        what: what.to_string(),
        dir: dir.display().to_string(),
        detail: e.to_string(),
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> RedirectError {
    move |e| RedirectError::Map {
        map,
        detail: chain(&e),
    }
}

fn statfs_magic(path: &Path) -> std::io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs is plain old data; zeroed is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated and st is valid for writes.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// Make sure `dir` is on a bpffs: mounts one on `/sys/fs/bpf` when that is where `dir` lives
/// and nothing is mounted there; then creates `dir`.
pub fn ensure_bpffs(dir: &Path) -> Result<(), RedirectError> {
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    let magic = statfs_magic(&probe)
        .map_err(|e| RedirectError::Bpffs(format!("statfs {}: {e}", probe.display())))?;
    if magic != BPFFS_MAGIC {
        let root = Path::new("/sys/fs/bpf");
        if !dir.starts_with(root) {
            return Err(RedirectError::Bpffs(format!(
                "{} is not on a bpf filesystem (mount one: mount -t bpf bpf <dir>)",
                dir.display()
            )));
        }
        std::fs::create_dir_all(root)
            .map_err(|e| RedirectError::Bpffs(format!("mkdir {}: {e}", root.display())))?;
        info!("mounting bpffs on /sys/fs/bpf");
        // SAFETY: all arguments are NUL-terminated literals; data is null as allowed.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(RedirectError::Bpffs(format!(
                "cannot mount bpffs on /sys/fs/bpf (needs CAP_SYS_ADMIN): {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| RedirectError::Bpffs(format!("mkdir {}: {e}", dir.display())))
}

fn ip_key(ip: Ipv4Addr) -> u32 {
    // network order, as the program reads ip->saddr/daddr
    u32::from_ne_bytes(ip.octets())
}

impl TcBackend {
    pub fn new(opts: TcOptions) -> Self {
        TcBackend { opts, ebpf: None }
    }

    pub fn options(&self) -> &TcOptions {
        &self.opts
    }

    fn pod_link_path(&self, ip: Ipv4Addr) -> PathBuf {
        // bpffs refuses '.' in names
        let ip = ip.to_string().replace('.', "_");
        self.opts.bpffs_dir.join(format!("link_pod_{ip}"))
    }

    fn uplink_link_path(&self, ifname: &str) -> PathBuf {
        self.opts.bpffs_dir.join(format!("link_uplink_{ifname}"))
    }

    fn ebpf(&mut self) -> Result<&mut Ebpf, RedirectError> {
        self.ebpf.as_mut().ok_or(RedirectError::NotPrepared)
    }

    fn pods(&mut self) -> Result<HashMap<&mut MapData, u32, ZmPod>, RedirectError> {
        let m = self.ebpf()?.map_mut("zm_pods").ok_or(RedirectError::Map {
            map: "zm_pods",
            detail: "missing from the object".into(),
        })?;
        HashMap::try_from(m).map_err(map_err("zm_pods"))
    }

    /// Attach `prog` to `ifname` ingress and pin the link at `pin` (replacing a stale pin).
    fn attach_pinned(&mut self, prog: &str, ifname: &str, pin: &Path) -> Result<(), RedirectError> {
        let attach_err = |detail: String| RedirectError::Attach {
            ifname: ifname.to_string(),
            detail,
        };
        if pin.exists() {
            std::fs::remove_file(pin).map_err(|e| RedirectError::Pin {
                path: pin.display().to_string(),
                detail: format!("cannot remove the old link: {e}"),
            })?;
        }
        let p: &mut SchedClassifier = self
            .ebpf()?
            .program_mut(prog)
            .ok_or_else(|| attach_err(format!("program {prog} missing from the object")))?
            .try_into()
            .map_err(|e| attach_err(format!("{prog}: {}", chain(&e))))?;
        let id = p
            .attach(ifname, TcAttachType::Ingress)
            .map_err(|e| attach_err(format!("{prog}: {}", chain(&e))))?;
        let link = p
            .take_link(id)
            .map_err(|e| attach_err(format!("{prog}: {}", chain(&e))))?;
        let fd: FdLink = link.try_into().map_err(|e| {
            attach_err(format!(
                "{prog}: not a TCX link ({e}); kernel >= 6.6 needed"
            ))
        })?;
        let _pinned: PinnedLink = fd.pin(pin).map_err(|e| RedirectError::Pin {
            path: pin.display().to_string(),
            detail: chain(&e),
        })?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl RedirectBackend for TcBackend {
    fn name(&self) -> &'static str {
        "tc"
    }

    async fn prepare(&mut self) -> Result<(), RedirectError> {
        let dir = self.opts.bpffs_dir.clone();
        ensure_bpffs(&dir)?;
        self.opts.routing().install().await?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .load(REDIRECT_OBJ)
            .map_err(|e| load_err(&dir, "object", chain(&e)))?;
        // The loader parsed the kernel's BTF (several MB of heap) and has dropped it; hand those
        // pages back now, or the proxy starts ~15 MB larger than it needs (glibc keeps free
        // heap up to its trim threshold, which the proxies raise).
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim is thread-safe and only releases pages of free chunks.
        unsafe {
            libc::malloc_trim(0);
        }
        for name in [FROM_POD, TO_POD] {
            let p: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| load_err(&dir, name, "missing from the object"))?
                .try_into()
                .map_err(|e| load_err(&dir, name, e))?;
            p.load().map_err(|e| load_err(&dir, name, chain(&e)))?;
        }
        {
            let m = ebpf
                .map_mut("zm_cfg")
                .ok_or_else(|| load_err(&dir, "zm_cfg", "missing from the object"))?;
            let mut cfg: Array<_, ZmConfig> = Array::try_from(m).map_err(map_err("zm_cfg"))?;
            cfg.set(
                0,
                ZmConfig {
                    outbound_port: self.opts.outbound_port,
                    inbound_port: self.opts.inbound_port,
                    hbone_port: self.opts.hbone_port,
                    _pad: 0,
                    mark: PROXY_MARK,
                    flags: 0,
                },
                0,
            )
            .map_err(map_err("zm_cfg"))?;
        }
        self.ebpf = Some(ebpf);
        // Uplinks: keep live pinned links, attach missing ones, drop those no longer wanted.
        let uplinks = self.opts.uplinks.clone();
        for ifname in &uplinks {
            let pin = self.uplink_link_path(ifname);
            if pin.exists() && link_alive(&pin) {
                debug!(%ifname, "uplink hook already attached (pinned)");
                continue;
            }
            self.attach_pinned(TO_POD, ifname, &pin)?;
            info!(%ifname, "uplink hook attached");
        }
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(ifname) = name.strip_prefix("link_uplink_")
                    && !uplinks.iter().any(|u| u == ifname)
                {
                    info!(%ifname, "releasing the hook of an uplink no longer configured");
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    async fn enroll(&mut self, pod: &PodRedirect) -> Result<(), RedirectError> {
        let pin = self.pod_link_path(pod.ip);
        let current = self.pods()?.get(&ip_key(pod.ip), 0).ok();
        let attached = current.is_some_and(|c| c.ifindex == pod.host_ifindex)
            && pin.exists()
            && link_alive(&pin);
        if !attached {
            self.attach_pinned(FROM_POD, &pod.host_ifname, &pin)?;
        }
        self.opts
            .routing()
            .set_local_hbone_rules(pod.ip, self.opts.hbone_port, true)
            .await?;
        // The map entry is what switches capture on, in both directions at once.
        self.pods()?
            .insert(
                ip_key(pod.ip),
                ZmPod {
                    ifindex: pod.host_ifindex,
                    flags: ZM_POD_ENROLLED,
                },
                0,
            )
            .map_err(map_err("zm_pods"))?;
        info!(ip = %pod.ip, ifname = %pod.host_ifname, "pod captured");
        Ok(())
    }

    async fn unenroll(&mut self, ip: Ipv4Addr) -> Result<(), RedirectError> {
        // Map entry first: capture stops at once; then the link goes.
        match self.pods()?.remove(&ip_key(ip)) {
            Ok(()) => {}
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err("zm_pods")(e)),
        }
        let pin = self.pod_link_path(ip);
        if pin.exists()
            && let Err(e) = std::fs::remove_file(&pin)
        {
            warn!(%ip, "cannot remove {}: {e}", pin.display());
        }
        if let Err(e) = self
            .opts
            .routing()
            .set_local_hbone_rules(ip, self.opts.hbone_port, false)
            .await
        {
            warn!(%ip, "{e}");
        }
        info!(%ip, "pod released");
        Ok(())
    }

    fn enrolled(&self) -> Result<Vec<PodRedirect>, RedirectError> {
        let ebpf = self.ebpf.as_ref().ok_or(RedirectError::NotPrepared)?;
        let m = ebpf.map("zm_pods").ok_or(RedirectError::Map {
            map: "zm_pods",
            detail: "missing from the object".into(),
        })?;
        let pods: HashMap<&MapData, u32, ZmPod> =
            HashMap::try_from(m).map_err(map_err("zm_pods"))?;
        let mut out = Vec::new();
        for entry in pods.iter() {
            let (k, v) = entry.map_err(map_err("zm_pods"))?;
            let ip = Ipv4Addr::from(k.to_ne_bytes());
            // A pod whose link pin is gone is not really captured: report it with no
            // interface so reconcile attaches it again.
            let linked = self.pod_link_path(ip).exists();
            out.push(PodRedirect {
                ip,
                host_ifname: ifname_of(v.ifindex).unwrap_or_default(),
                host_ifindex: if linked { v.ifindex } else { 0 },
            });
        }
        out.sort_by_key(|p| p.ip);
        Ok(out)
    }

    async fn set_local_peers(&mut self, pods: &[PodRedirect]) -> Result<(), RedirectError> {
        let dir = self.opts.bpffs_dir.clone();
        let name = |p: &PodRedirect| {
            format!(
                "link_peer_{}_{}",
                p.ip.to_string().replace('.', "_"),
                p.host_ifindex
            )
        };
        let wanted: Vec<String> = pods.iter().map(name).collect();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("link_peer_") && !wanted.contains(&n) {
                    debug!(pin = %n, "releasing the hook of a pod no longer a local peer");
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let mut first_err = None;
        for p in pods {
            let pin = dir.join(name(p));
            if pin.exists() && link_alive(&pin) {
                continue;
            }
            match self.attach_pinned(TO_POD, &p.host_ifname, &pin) {
                Ok(()) => {
                    info!(ip = %p.ip, ifname = %p.host_ifname, "local non-enrolled pod hooked")
                }
                Err(e) => {
                    warn!(ip = %p.ip, "{e}");
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn stats(&self) -> Option<RedirectStats> {
        let m = self.ebpf.as_ref()?.map("zm_stats")?;
        let a: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(m).ok()?;
        let get = |i: u32| -> u64 { a.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0) };
        Some(RedirectStats {
            to_established: get(0),
            to_outbound: get(1),
            to_inbound: get(2),
            to_hbone: get(3),
            dropped_no_listener: get(4),
            assign_failed: get(5),
            dropped_unowned: get(6),
        })
    }
}

/// Is the pinned link still attached to a live interface? (A TCX link whose device was
/// deleted stays pinned but defunct.)
fn link_alive(pin: &Path) -> bool {
    let Ok(l) = PinnedLink::from_pin(pin) else {
        return false;
    };
    let fd: FdLink = l.into();
    // A TCX link whose device is gone stays readable; aya 0.14's LinkInfo does not expose
    // its ifindex, so "info readable" counts as alive and reconcile compares ifindexes.
    fd.info().is_ok()
}
