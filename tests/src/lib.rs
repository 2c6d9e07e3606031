//! The network-namespace cluster: real ztunnel processes, real sockets, real TLS, real eBPF,
//! no Kubernetes (DESIGN.md §7).
//!
//! ```text
//!  <p>fab: bridge br0 (10.254.0.0/24)
//!     ├── f0 ──veth── up0 (10.254.0.1)  <p>n0: node 0, ztunnel --redirect --uplink up0
//!     │                  ├── vp0 ──veth── eth0 10.20.0.2/32   <p>p0 (pod)
//!     │                  └── vp1 ──veth── eth0 10.20.0.3/32   <p>p1 (pod)
//!     └── f1 ──veth── up0 (10.254.0.2)  <p>n1: node 1 ...      10.20.1.x
//! ```
//!
//! - Pods have a /32 address and a default route via 169.254.1.1, an address every host-side
//!   pod veth carries; the node routes `<pod>/32 dev vp<j>` and `10.20.<k>.0/24 via <node k>`.
//! - Everything is named with a unique prefix `zmt<pid>x<n>` and removed on drop; a new cluster
//!   first removes what crashed runs left behind ([`cleanup_stale`]).
//! - Processes and client sockets are created inside a netns with `setns` (in `pre_exec` or on
//!   a helper thread), never with `ip netns exec`, which remounts /sys and hides /sys/fs/bpf.
//! - ztunnel's config comes from a [`MeshConfigSource`]: [`LocalFileSource`] writes the local
//!   YAML file every ztunnel reads (`--local-config`, in-process CA); [`ControllerSource`]
//!   (`Cluster::builder().controller()`) runs `zmesh-controller` on a directory of Kubernetes
//!   YAML in the fabric netns (10.254.0.254, on the bridge) and each ztunnel gets its config
//!   over Delta ADS and its certificates from the controller's CA (TLS, port 15012).
//! - Binaries (`ztunnel`, `zmesh-controller`, the sample apps) are looked up in the target
//!   directory next to the running executable (`target/<profile>/<bin>`) and built with
//!   `$CARGO build -p <package> --bin <bin>` first when missing ([`package_bin`]).

mod controller_source;
mod http1;
mod waypoint;
pub use controller_source::ControllerSource;
pub use http1::{HttpResponse, http1_request, read_response};
pub use waypoint::{GATEWAY_NAME_LABEL, USE_WAYPOINT, WaypointSpec, http_get_in};

use std::collections::BTreeMap;

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const PREFIX_ROOT: &str = "zmt";
pub const TRUST_DOMAIN: &str = "cluster.local";
static COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// Do we have what the netns tests need (root)? With `CI=true` a missing privilege is a
/// failure (panics); otherwise returns false after printing why the test is skipped.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["ip", "tcpdump"]
        .iter()
        .all(|t| Command::new(t).arg("-V").output().is_ok() || which(t));
    if root && tools {
        return true;
    }
    let why = if !root {
        "needs root (network namespaces, eBPF, IP_TRANSPARENT)"
    } else {
        "needs `ip` and `tcpdump` (apt-get install -y iproute2 tcpdump)"
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {why}, and CI=true makes that a failure");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

fn which(t: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(t).exists())
}

/// Run a command, failing with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(|e| HarnessError::Command {
        cmd: format!("{cmd:?}"),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            cmd: format!("{cmd:?}"),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Remove what earlier runs left: netns and bpffs dirs named `<root><pid>x<n>...` whose pid is
/// not alive (their processes are killed first, by pid).
pub fn cleanup_stale(root: &str) {
    let alive = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(root) else {
            return true;
        };
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        match pid.parse::<u32>() {
            Ok(pid) => Path::new(&format!("/proc/{pid}")).exists(),
            Err(_) => true,
        }
    };
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(root) && !alive(&name) {
                remove_netns(&name);
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(root) && !alive(&name) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn remove_netns(name: &str) {
    if let Ok(pids) = ip(&["netns", "pids", name]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill has no memory-safety preconditions; these are processes living in a
            // netns this harness created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = ip(&["netns", "del", name]);
}

/// Enter the netns `name` on the current thread.
fn enter_netns(name: &str) -> io::Result<()> {
    let f = File::open(format!("/run/netns/{name}"))?;
    // SAFETY: f is an open netns fd; setns only affects the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Run `f` on a helper thread inside the netns `name`.
pub fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let name = name.to_string();
    std::thread::spawn(move || {
        enter_netns(&name)?;
        f()
    })
    .join()
    .map_err(|_| io::Error::other("netns helper thread panicked"))?
}

/// A command that will run inside the netns `name` (setns in the child before exec).
pub fn command_in(name: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
    let f = File::open(format!("/run/netns/{name}"))?;
    let mut cmd = Command::new(program);
    // SAFETY: the closure only calls setns (async-signal-safe) on an fd opened before fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// One HTTP/1.1 request (`request` = `"GET /path"`) from inside netns `ns` (a pod's, see
/// [`Cluster::pod_ns`]; usable from any thread) to `dst` on a fresh connection (`connection:
/// close`); connect, send and every read are bounded by `timeout`.
pub fn http_in(
    ns: &str,
    dst: SocketAddr,
    request: &str,
    host: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> io::Result<HttpResponse> {
    let (method, path) = request.split_once(' ').unwrap_or(("GET", request));
    let mut s = connect_in(ns, dst, timeout)?;
    let mut h = headers.to_vec();
    h.push(("connection", "close"));
    http1_request(&mut s, method, path, host, &h)
}

/// A TCP connection from inside netns `ns` to `dst` (connect, read and write bounded by
/// `timeout`); the socket stays in that netns whatever thread uses it.
pub fn connect_in(ns: &str, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    in_netns(ns, move || {
        let s = TcpStream::connect_timeout(&dst, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(s)
    })
}

/// Path of a binary built in this target dir (`target/<profile>/<name>`).
pub fn target_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| HarnessError::Other("test executable has no directory".into()))?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir.join(name))
}

/// `target/<profile>/ztunnel`, built first when missing.
pub fn ztunnel_bin() -> Result<PathBuf> {
    package_bin("ztunnel", "ztunnel")
}

/// `target/<profile>/<bin>` of workspace package `package`, built first (`$CARGO build -p
/// <package> --bin <bin>`) when missing.
pub fn package_bin(package: &str, bin: &str) -> Result<PathBuf> {
    let p = target_bin(bin)?;
    if !p.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", package, "--bin", bin]);
        if !p.to_string_lossy().contains("/debug/") {
            cmd.arg("--release");
        }
        run(&mut cmd).map_err(|e| {
            HarnessError::Other(format!(
                "{} is missing and building it failed ({e}); build it with `cargo build -p {package} --bin {bin}`",
                p.display()
            ))
        })?;
    }
    Ok(p)
}

/// One pod of the cluster description.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: usize,
    /// In the mesh (`protocol: HBONE`): captured by its node's ztunnel.
    pub enrolled: bool,
    pub version: String,
    /// Extra labels (controller source), e.g. a waypoint pod's `gateway-name`.
    pub labels: Vec<(String, String)>,
    /// Filled in by the builder.
    pub ip: Ipv4Addr,
}

impl PodSpec {
    pub fn new(name: &str, namespace: &str, node: usize, enrolled: bool) -> Self {
        PodSpec {
            name: name.into(),
            namespace: namespace.into(),
            service_account: name.into(),
            node,
            enrolled,
            version: "v1".into(),
            labels: Vec::new(),
            ip: Ipv4Addr::UNSPECIFIED,
        }
    }
    pub fn version(mut self, v: &str) -> Self {
        self.version = v.into();
        self
    }
    pub fn identity(&self) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// A service: VIP, port mapping, selected pods by name.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub pods: Vec<String>,
}

/// Everything the mesh configuration is generated from.
#[derive(Debug, Clone, Default)]
pub struct MeshDesc {
    pub nodes: usize,
    pub pods: Vec<PodSpec>,
    pub services: Vec<ServiceSpec>,
    /// Raw YAML items for the `policies:` section (local config format).
    pub policies: Vec<String>,
    /// `STRICT` / `PERMISSIVE` mesh-wide PeerAuthentication (None: default PERMISSIVE).
    pub mtls_mode: Option<String>,
    /// Kubernetes YAML documents (AuthorizationPolicy, ...) for the [`ControllerSource`]'s
    /// directory; the local-file source does not read them (it has [`MeshDesc::policies`]).
    pub k8s_objects: Vec<String>,
    /// Waypoints (controller source only): Gateway + Service in the controller's directory,
    /// their pods in [`MeshDesc::pods`] (see [`WaypointSpec`]).
    pub waypoints: Vec<WaypointSpec>,
    /// Extra labels of Namespaces (e.g. `istio.io/use-waypoint`), by namespace name.
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Extra labels of Services, by `namespace/name`.
    pub service_labels: BTreeMap<String, BTreeMap<String, String>>,
}

impl MeshDesc {
    pub fn node_name(i: usize) -> String {
        format!("node{i}")
    }

    /// Enroll (or release) every pod of `namespace`. With the [`ControllerSource`] this is a
    /// change of the Namespace's `istio.io/dataplane-mode` label only.
    pub fn set_namespace_enrolled(&mut self, namespace: &str, enrolled: bool) {
        for p in self.pods.iter_mut().filter(|p| p.namespace == namespace) {
            p.enrolled = enrolled;
        }
    }

    /// The local-config YAML (one file for every node; each ztunnel picks its own workloads).
    pub fn to_local_yaml(&self) -> String {
        let mut y = String::from("workloads:\n");
        for p in &self.pods {
            let services: Vec<String> = self
                .services
                .iter()
                .filter(|s| s.pods.contains(&p.name))
                .map(|s| {
                    format!(
                        "\"{}/{}.{}.svc.cluster.local\": {{{}: {}}}",
                        s.namespace, s.name, s.namespace, s.port, s.target_port
                    )
                })
                .collect();
            y.push_str(&format!(
                "- name: {}\n  namespace: {}\n  serviceAccount: {}\n  workloadIps: [\"{}\"]\n  protocol: {}\n  node: {}\n  canonicalRevision: {}\n  services: {{{}}}\n",
                p.name,
                p.namespace,
                p.service_account,
                p.ip,
                if p.enrolled { "HBONE" } else { "TCP" },
                Self::node_name(p.node),
                p.version,
                services.join(", ")
            ));
        }
        y.push_str("services:\n");
        for s in &self.services {
            y.push_str(&format!(
                "- name: {}\n  namespace: {}\n  vips: [\"{}\"]\n  ports: {{{}: {}}}\n",
                s.name, s.namespace, s.vip, s.port, s.target_port
            ));
        }
        y.push_str("policies:\n");
        for p in &self.policies {
            y.push_str(p);
            if !p.ends_with('\n') {
                y.push('\n');
            }
        }
        y.push_str("peerAuthentications:\n");
        if let Some(m) = &self.mtls_mode {
            y.push_str(&format!(
                "- {{name: default, namespace: istio-system, mode: {m}}}\n"
            ));
        }
        y
    }
}

/// What a source may need from the cluster when it starts (after the network exists, after
/// the first [`MeshConfigSource::publish`], before any ztunnel starts).
pub struct SourceEnv<'a> {
    /// The fabric netns (bridge `br0`, no address of its own unless a source adds one).
    pub fabric_ns: &'a str,
    /// The cluster's scratch directory.
    pub dir: &'a Path,
    pub nodes: usize,
}

/// Where ztunnels get their configuration (and certificates) from: [`LocalFileSource`] or
/// [`ControllerSource`].
pub trait MeshConfigSource: Send {
    /// Publish (or re-publish) the configuration.
    fn publish(&mut self, mesh: &MeshDesc) -> Result<()>;
    /// ztunnel arguments that make it read this source.
    fn ztunnel_args(&self, node: usize) -> Vec<String>;
    /// Start whatever serves the configuration (a controller process).
    fn start(&mut self, _env: &SourceEnv<'_>) -> Result<()> {
        Ok(())
    }
    /// Stop what [`MeshConfigSource::start`] started (called before the netns are removed).
    fn stop(&mut self) {}
    /// The serving process's log, if any.
    fn log(&self) -> String {
        String::new()
    }
    /// Downcasting, for scenario code that needs the concrete source.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Which [`MeshConfigSource`] a cluster is built with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SourceKind {
    /// [`LocalFileSource`].
    #[default]
    LocalFile,
    /// [`ControllerSource`].
    Controller,
}

/// `--local-config <dir>/mesh.yaml` + an in-process CA from PEM files.
pub struct LocalFileSource {
    pub path: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
}

impl LocalFileSource {
    pub fn new(dir: &Path) -> Result<Self> {
        let ca = zmesh_core::ca::CertificateAuthority::generate(TRUST_DOMAIN)
            .map_err(|e| HarnessError::Other(format!("CA: {e}")))?;
        let s = LocalFileSource {
            path: dir.join("mesh.yaml"),
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
        };
        std::fs::write(&s.ca_cert, ca.root_pem())?;
        std::fs::write(&s.ca_key, ca.key_pem())?;
        Ok(s)
    }
}

impl MeshConfigSource for LocalFileSource {
    fn publish(&mut self, mesh: &MeshDesc) -> Result<()> {
        // Write then rename, so a reader never sees half a file.
        let tmp = self.path.with_extension("yaml.tmp");
        std::fs::write(&tmp, mesh.to_local_yaml())?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn ztunnel_args(&self, _node: usize) -> Vec<String> {
        vec![
            "--local-config".into(),
            self.path.display().to_string(),
            "--ca-cert".into(),
            self.ca_cert.display().to_string(),
            "--ca-key".into(),
            self.ca_key.display().to_string(),
        ]
    }
}

pub struct ClusterBuilder {
    mesh: MeshDesc,
    source: SourceKind,
    ztunnel: Option<PathBuf>,
    waypoint: Option<PathBuf>,
}

impl ClusterBuilder {
    pub fn nodes(mut self, n: usize) -> Self {
        self.mesh.nodes = n;
        self
    }
    pub fn pod(mut self, p: PodSpec) -> Self {
        self.mesh.pods.push(p);
        self
    }
    pub fn service(mut self, s: ServiceSpec) -> Self {
        self.mesh.services.push(s);
        self
    }
    pub fn policy(mut self, yaml: &str) -> Self {
        self.mesh.policies.push(yaml.into());
        self
    }
    /// A Kubernetes YAML document for the controller's directory (see [`MeshDesc::k8s_objects`]).
    pub fn k8s_object(mut self, yaml: &str) -> Self {
        self.mesh.k8s_objects.push(yaml.into());
        self
    }
    /// A waypoint `name` for `namespace` whose pod runs on `node` (controller source; the
    /// process is started with the cluster, see [`WaypointSpec`]). Namespaces and services
    /// use it once labelled `istio.io/use-waypoint` ([`ClusterBuilder::namespace_label`]).
    pub fn waypoint(mut self, name: &str, namespace: &str, node: usize) -> Self {
        let wp = WaypointSpec::new(name, namespace, node);
        self.mesh.pods.push(wp.pod());
        self.mesh.waypoints.push(wp);
        self
    }
    /// A label on Namespace `namespace` (controller source).
    pub fn namespace_label(mut self, namespace: &str, key: &str, value: &str) -> Self {
        self.mesh
            .namespace_labels
            .entry(namespace.into())
            .or_default()
            .insert(key.into(), value.into());
        self
    }
    /// Feed the ztunnels from `zmesh-controller` (Delta ADS + CA) instead of a local file.
    pub fn controller(mut self) -> Self {
        self.source = SourceKind::Controller;
        self
    }
    /// Run this ztunnel binary instead of `target/<profile>/ztunnel` (benchmarks run the
    /// `release-ztunnel` build).
    pub fn ztunnel_binary(mut self, path: PathBuf) -> Self {
        self.ztunnel = Some(path);
        self
    }
    /// Run this waypoint binary instead of `target/<profile>/waypoint` (benchmark A/B runs).
    pub fn waypoint_binary(mut self, path: PathBuf) -> Self {
        self.waypoint = Some(path);
        self
    }
    pub fn build(self) -> Result<Cluster> {
        Cluster::create(self.mesh, self.source, self.ztunnel, self.waypoint)
    }
}

/// A running process inside a netns, killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Cluster {
    pub prefix: String,
    pub dir: PathBuf,
    pub mesh: MeshDesc,
    pub source: Box<dyn MeshConfigSource>,
    netns: Vec<String>,
    /// `None`: [`ztunnel_bin`].
    ztunnel_binary: Option<PathBuf>,
    /// `None`: `target/<profile>/waypoint`.
    pub(crate) waypoint_binary: Option<PathBuf>,
    ztunnels: Vec<Option<Proc>>,
    apps: Vec<Proc>,
    restarts: u32,
    /// Running waypoints by name ([`Cluster::start_waypoint`]).
    waypoints: Vec<(String, Proc)>,
    waypoint_starts: u32,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            mesh: MeshDesc {
                nodes: 2,
                ..MeshDesc::default()
            },
            source: SourceKind::LocalFile,
            ztunnel: None,
            waypoint: None,
        }
    }

    pub fn fabric_ns(&self) -> String {
        format!("{}fab", self.prefix)
    }
    pub fn node_ns(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }
    pub fn pod_ns(&self, name: &str) -> String {
        let idx = self.mesh.pods.iter().position(|p| p.name == name);
        format!("{}p{}", self.prefix, idx.unwrap_or(usize::MAX))
    }
    pub fn node_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 254, 0, 1 + i as u8)
    }
    pub fn bpffs_dir(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}n{i}", self.prefix))
    }
    pub fn pod(&self, name: &str) -> &PodSpec {
        self.mesh
            .pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the cluster"))
    }

    fn create(
        mut mesh: MeshDesc,
        kind: SourceKind,
        ztunnel_binary: Option<PathBuf>,
        waypoint_binary: Option<PathBuf>,
    ) -> Result<Cluster> {
        if !mesh.waypoints.is_empty() && kind != SourceKind::Controller {
            return Err(HarnessError::Other(
                "waypoints get their identity and config from the controller: use \
                 Cluster::builder().controller()"
                    .into(),
            ));
        }
        cleanup_stale(PREFIX_ROOT);
        let prefix = format!(
            "{PREFIX_ROOT}{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir)?;
        // Addresses: pods of node k are 10.20.k.2, .3, ...
        let mut per_node = vec![2u8; mesh.nodes];
        for p in &mut mesh.pods {
            p.ip = Ipv4Addr::new(10, 20, p.node as u8, per_node[p.node]);
            per_node[p.node] += 1;
        }
        let source: Box<dyn MeshConfigSource> = match kind {
            SourceKind::LocalFile => Box::new(LocalFileSource::new(&dir)?),
            SourceKind::Controller => Box::new(ControllerSource::new(&dir, mesh.nodes)?),
        };
        let mut c = Cluster {
            prefix,
            dir,
            mesh,
            source,
            netns: Vec::new(),
            ztunnel_binary,
            waypoint_binary,
            ztunnels: Vec::new(),
            apps: Vec::new(),
            restarts: 0,
            waypoints: Vec::new(),
            waypoint_starts: 0,
        };
        c.create_network()?;
        let mesh = c.mesh.clone();
        c.source.publish(&mesh)?;
        let fabric = c.fabric_ns();
        c.source.start(&SourceEnv {
            fabric_ns: &fabric,
            dir: &c.dir,
            nodes: c.mesh.nodes,
        })?;
        for i in 0..c.mesh.nodes {
            let p = c.spawn_ztunnel(i)?;
            c.ztunnels.push(Some(p));
        }
        for i in 0..c.mesh.nodes {
            c.wait_ztunnel_ready(i, Duration::from_secs(30))?;
        }
        let names: Vec<String> = c.mesh.waypoints.iter().map(|w| w.name.clone()).collect();
        for name in names {
            c.start_waypoint(&name)?;
        }
        Ok(c)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.netns.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn sysctl(ns: &str, key: &str, val: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let val = val.to_string();
        in_netns(ns, move || std::fs::write(&path, val))?;
        Ok(())
    }

    fn create_network(&mut self) -> Result<()> {
        let fab = self.fabric_ns();
        self.add_ns(&fab)?;
        // The fabric stands for the physical network between nodes: frames crossing it must
        // not run through the host's iptables (br_netfilter defaults to on in every new netns
        // and would charge a netfilter pass per packet to whichever process sent it).
        for k in [
            "net.bridge.bridge-nf-call-iptables",
            "net.bridge.bridge-nf-call-ip6tables",
            "net.bridge.bridge-nf-call-arptables",
        ] {
            let path = format!("/proc/sys/{}", k.replace('.', "/"));
            if std::path::Path::new(&path).exists() {
                Self::sysctl(&fab, k, "0")?;
            }
        }
        ip(&["-n", &fab, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &fab, "link", "set", "br0", "up"])?;
        for i in 0..self.mesh.nodes {
            let node = self.node_ns(i);
            self.add_ns(&node)?;
            for k in [
                "net.ipv4.conf.all.rp_filter",
                "net.ipv4.conf.default.rp_filter",
            ] {
                Self::sysctl(&node, k, "0")?;
            }
            Self::sysctl(&node, "net.ipv4.ip_forward", "1")?;
            let f = format!("f{i}");
            ip(&[
                "-n", &fab, "link", "add", &f, "type", "veth", "peer", "name", "up0", "netns",
                &node,
            ])?;
            ip(&["-n", &fab, "link", "set", &f, "master", "br0", "up"])?;
            let nip = format!("{}/24", Self::node_ip(i));
            ip(&["-n", &node, "addr", "add", &nip, "dev", "up0"])?;
            ip(&["-n", &node, "link", "set", "up0", "up"])?;
            for k in 0..self.mesh.nodes {
                if k != i {
                    let net = format!("10.20.{k}.0/24");
                    let via = Self::node_ip(k).to_string();
                    ip(&["-n", &node, "route", "add", &net, "via", &via, "dev", "up0"])?;
                }
            }
        }
        let pods = self.mesh.pods.clone();
        for (j, p) in pods.iter().enumerate() {
            let node = self.node_ns(p.node);
            let pns = self.pod_ns(&p.name);
            self.add_ns(&pns)?;
            let hv = format!("vp{j}");
            ip(&[
                "-n", &node, "link", "add", &hv, "type", "veth", "peer", "name", "eth0", "netns",
                &pns,
            ])?;
            ip(&["-n", &node, "addr", "add", "169.254.1.1/32", "dev", &hv])?;
            ip(&["-n", &node, "link", "set", &hv, "up"])?;
            let pip = format!("{}/32", p.ip);
            ip(&["-n", &node, "route", "add", &pip, "dev", &hv])?;
            ip(&["-n", &pns, "addr", "add", &pip, "dev", "eth0"])?;
            ip(&["-n", &pns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &pns,
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ])?;
            ip(&[
                "-n",
                &pns,
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ])?;
        }
        Ok(())
    }

    fn spawn_ztunnel(&mut self, i: usize) -> Result<Proc> {
        let bin = match &self.ztunnel_binary {
            Some(p) => p.clone(),
            None => ztunnel_bin()?,
        };
        let log = self.dir.join(format!("ztunnel-n{i}.{}.log", self.restarts));
        self.restarts += 1;
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let mut cmd = command_in(&self.node_ns(i), bin)?;
        cmd.args(self.source.ztunnel_args(i))
            .args(["--node", &MeshDesc::node_name(i)])
            .args(["--redirect", "--keep-source-address"])
            .args(["--uplink", "up0"])
            .args(["--node-ip", &Self::node_ip(i).to_string()])
            .arg("--bpffs-dir")
            .arg(self.bpffs_dir(i))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd.spawn()?;
        Ok(Proc { child, log })
    }

    /// PID of node `i`'s ztunnel while it runs (benchmarks read its CPU and RSS in /proc).
    pub fn ztunnel_pid(&self, i: usize) -> Option<u32> {
        self.ztunnels.get(i)?.as_ref().map(|p| p.child.id())
    }

    /// Kill node `i`'s ztunnel (SIGKILL: no cleanup, like a crash).
    pub fn kill_ztunnel(&mut self, i: usize) {
        if let Some(mut p) = self.ztunnels[i].take() {
            p.kill();
        }
    }

    /// Start node `i`'s ztunnel again and wait until it has reconciled.
    pub fn restart_ztunnel(&mut self, i: usize) -> Result<()> {
        self.kill_ztunnel(i);
        let p = self.spawn_ztunnel(i)?;
        self.ztunnels[i] = Some(p);
        self.wait_ztunnel_ready(i, Duration::from_secs(30))
    }

    /// All of node `i`'s ztunnel logs so far (every restart), as written (no terminal colours:
    /// the proxies log plain text).
    pub fn ztunnel_log(&self, i: usize) -> String {
        let mut s = String::new();
        for r in 0..self.restarts {
            if let Ok(t) = std::fs::read_to_string(self.dir.join(format!("ztunnel-n{i}.{r}.log"))) {
                s.push_str(&t);
            }
        }
        s
    }

    /// Wait until a line of node `i`'s ztunnel log satisfies `pred` (access logs are written
    /// when a connection ends, a moment after the client saw its reply).
    pub fn wait_log_line(&self, i: usize, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ztunnel_log(i).lines().any(&pred) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET path` on node `i`'s admin port (127.0.0.1:15000 inside the node netns).
    pub fn admin_get(&self, i: usize, path: &str) -> io::Result<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 15000));
        Ok(http_get_in(&self.node_ns(i), addr, path)?.body)
    }

    /// ztunnel's `/config_dump` as JSON.
    pub fn config_dump(&self, i: usize) -> Result<serde_json::Value> {
        let body = self.admin_get(i, "/config_dump")?;
        serde_json::from_str(&body)
            .map_err(|e| HarnessError::Other(format!("config_dump is not JSON ({e}): {body}")))
    }

    /// IPs the redirection manager of node `i` reports as captured.
    pub fn enrolled_ips(&self, i: usize) -> Result<Vec<String>> {
        let d = self.config_dump(i)?;
        Ok(d["redirect"]["enrolled"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["ip"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Pods of node `i` that the mesh description enrolls.
    pub fn expected_enrolled(&self, i: usize) -> Vec<String> {
        let mut v: Vec<String> = self
            .mesh
            .pods
            .iter()
            .filter(|p| p.node == i && p.enrolled)
            .map(|p| p.ip.to_string())
            .collect();
        v.sort();
        v
    }

    /// Wait until node `i`'s redirect view equals the mesh description.
    pub fn wait_enrolled(&self, i: usize, timeout: Duration) -> Result<()> {
        let want = self.expected_enrolled(i);
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.config_dump(i) {
                Ok(d) if d["redirect"]["reconciled"] == true => {
                    let mut got = self.enrolled_ips(i)?;
                    got.sort();
                    if got == want {
                        return Ok(());
                    }
                    last = format!("enrolled {got:?}, want {want:?}: {}", d["redirect"]);
                }
                Ok(d) => last = format!("not reconciled yet: {}", d["redirect"]),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(HarnessError::Other(format!(
            "node {i}: redirection did not converge in {timeout:?}: {last}\n--- log ---\n{}",
            self.ztunnel_log(i)
        )))
    }

    fn wait_ztunnel_ready(&self, i: usize, timeout: Duration) -> Result<()> {
        self.wait_enrolled(i, timeout)
    }

    /// The controller's log ([`ControllerSource`]; empty for the local-file source).
    pub fn source_log(&self) -> String {
        self.source.log()
    }

    /// The [`ControllerSource`], when the cluster was built with one.
    pub fn controller_source(&self) -> Option<&ControllerSource> {
        self.source.as_any().downcast_ref::<ControllerSource>()
    }

    /// Enroll or release every pod of `namespace` and publish (controller source: the
    /// Namespace label flips, nothing restarts).
    pub fn set_namespace_enrolled(&mut self, namespace: &str, enrolled: bool) -> Result<()> {
        self.update_mesh(|m| m.set_namespace_enrolled(namespace, enrolled))
    }

    /// Change the mesh description and publish it; ztunnels pick it up (file watch).
    pub fn update_mesh(&mut self, f: impl FnOnce(&mut MeshDesc)) -> Result<()> {
        f(&mut self.mesh);
        let mesh = self.mesh.clone();
        self.source.publish(&mesh)
    }

    /// Start one of this package's sample apps in pod `name`.
    pub fn start_app(&mut self, pod: &str, bin: &str, args: &[&str]) -> Result<()> {
        let path = package_bin("zmesh-tests", bin)?;
        let log = self.dir.join(format!("{pod}-{bin}.log"));
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let mut cmd = command_in(&self.pod_ns(pod), path)?;
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn()?;
        self.apps.push(Proc { child, log });
        Ok(())
    }

    /// The log (stdout + stderr) of sample app `bin` in pod `pod`.
    pub fn app_log(&self, pod: &str, bin: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{pod}-{bin}.log"))).unwrap_or_default()
    }

    /// One HTTP/1.1 request from pod `from`: see [`http_in`].
    pub fn http(
        &self,
        from: &str,
        dst: SocketAddr,
        request: &str,
        host: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> io::Result<HttpResponse> {
        http_in(&self.pod_ns(from), dst, request, host, headers, timeout)
    }

    /// Start the TCP echo (`<version> <line>`) in pod `name` on `port`, and wait for it.
    pub fn start_tcp_echo(&mut self, pod: &str, port: u16) -> Result<()> {
        let version = self.pod(pod).version.clone();
        let port_s = port.to_string();
        self.start_app(
            pod,
            "zmesh-sample-tcp-echo",
            &["--port", &port_s, "--version", &version],
        )?;
        self.wait_listening(pod, port)
    }

    /// Start the HTTP sample in pod `name` on `port`, and wait for it.
    pub fn start_http(&mut self, pod: &str, service: &str, port: u16) -> Result<()> {
        let version = self.pod(pod).version.clone();
        let port_s = port.to_string();
        self.start_app(
            pod,
            "zmesh-sample-http",
            &[
                "--port",
                &port_s,
                "--service",
                service,
                "--version",
                &version,
            ],
        )?;
        self.wait_listening(pod, port)
    }

    fn wait_listening(&self, pod: &str, port: u16) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let ok = in_netns(&self.pod_ns(pod), move || {
                TcpStream::connect_timeout(
                    &SocketAddr::from(([127, 0, 0, 1], port)),
                    Duration::from_millis(200),
                )
            });
            if ok.is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(HarnessError::Other(format!(
            "app in pod {pod} did not listen on {port}"
        )))
    }

    /// Connect from pod `from` to `dst` (the socket is created inside the pod netns).
    pub fn connect(&self, from: &str, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        connect_in(&self.pod_ns(from), dst, timeout)
    }

    /// Send one line from pod `from` to a TCP echo at `dst`, return the reply line.
    pub fn echo(
        &self,
        from: &str,
        dst: SocketAddr,
        line: &str,
        timeout: Duration,
    ) -> io::Result<String> {
        let mut s = self.connect(from, dst, timeout)?;
        s.write_all(format!("{line}\n").as_bytes())?;
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match s.read(&mut byte)? {
                0 => break,
                _ if byte[0] == b'\n' => break,
                _ => buf.push(byte[0]),
            }
        }
        if buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed without a reply",
            ));
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Retry [`Cluster::echo`] until it succeeds or `timeout` passes.
    pub fn echo_eventually(
        &self,
        from: &str,
        dst: SocketAddr,
        line: &str,
        timeout: Duration,
    ) -> io::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.echo(from, dst, line, Duration::from_secs(2)) {
                Ok(r) => return Ok(r),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Start a packet capture on the fabric bridge.
    pub fn capture(&self, name: &str) -> Result<Capture> {
        let file = self.dir.join(format!("{name}.pcap"));
        let log = self.dir.join(format!("{name}.tcpdump.log"));
        let mut cmd = command_in(&self.fabric_ns(), "tcpdump")?;
        cmd.args([
            "-i",
            "br0",
            "-U",
            "--immediate-mode",
            "-Z",
            "root",
            "-n",
            "-s",
            "0",
            "-w",
        ])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log)?);
        let child = cmd.spawn()?;
        // tcpdump says "listening on" once the capture is live.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if std::fs::read_to_string(&log).is_ok_and(|l| l.contains("listening on")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Capture {
            proc: Proc { child, log },
            file,
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.apps.clear();
        self.waypoints.clear();
        for z in &mut self.ztunnels {
            if let Some(mut p) = z.take() {
                p.kill();
            }
        }
        self.source.stop();
        for ns in self.netns.iter().rev() {
            remove_netns(ns);
        }
        for i in 0..self.mesh.nodes {
            let _ = std::fs::remove_dir_all(self.bpffs_dir(i));
        }
        if std::env::var_os("ZMESH_KEEP_TEST_DIR").is_none() && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("cluster files kept in {}", self.dir.display());
        }
    }
}

/// A running tcpdump on the fabric bridge.
pub struct Capture {
    proc: Proc,
    pub file: PathBuf,
}

impl Capture {
    /// Stop the capture (SIGTERM, so tcpdump flushes) and return the pcap bytes.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.proc.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.proc.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.proc.kill();
        Ok(std::fs::read(&self.file)?)
    }
}

/// Sum of the samples of `metric` whose labels include all of `labels` (0 when none does).
pub fn metric_value(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    zmesh_core::metrics::sample_sum(text, metric, labels).unwrap_or(0.0)
}

/// Does `haystack` contain `needle`?
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Count TCP packets in a pcap (Ethernet/IPv4) with source or destination port `port`.
pub fn pcap_tcp_port_packets(pcap: &[u8], port: u16) -> usize {
    let mut n = 0;
    let mut off = 24; // global header
    while off + 16 <= pcap.len() {
        let incl =
            u32::from_le_bytes([pcap[off + 8], pcap[off + 9], pcap[off + 10], pcap[off + 11]])
                as usize;
        let pkt_start = off + 16;
        let Some(pkt) = pcap.get(pkt_start..pkt_start + incl) else {
            break;
        };
        if pkt.len() >= 14 + 20 + 4 && pkt[12] == 0x08 && pkt[13] == 0x00 && pkt[14 + 9] == 6 {
            let ihl = ((pkt[14] & 0x0f) as usize) * 4;
            if let Some(t) = pkt.get(14 + ihl..14 + ihl + 4) {
                let sp = u16::from_be_bytes([t[0], t[1]]);
                let dp = u16::from_be_bytes([t[2], t[3]]);
                if sp == port || dp == port {
                    n += 1;
                }
            }
        }
        off = pkt_start + incl;
    }
    n
}
