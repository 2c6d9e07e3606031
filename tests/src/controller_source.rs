//! [`ControllerSource`]: the cluster fed by `zmesh-controller` on its file source, as
//! production is fed by the Kubernetes source.
//!
//! - The harness writes real Kubernetes YAML into `<cluster dir>/controller/`:
//!   `00-namespaces.yaml` (a Namespace is labelled `istio.io/dataplane-mode: ambient` when all
//!   of its pods are enrolled), `10-pods.yaml` (Pods with `spec.nodeName`,
//!   `spec.serviceAccountName`, `status.podIP`, labels `app`/`version`, a per-pod
//!   `istio.io/dataplane-mode` label only when the pod differs from its namespace),
//!   `20-services.yaml` (Services with a selector), `25-waypoints.yaml` (waypoint Gateways
//!   and their Services, see [`crate::WaypointSpec`]), `30-policies.yaml` (the mesh-wide
//!   PeerAuthentication and [`MeshDesc::k8s_objects`]). Only files whose content changed are
//!   rewritten (write + rename); the controller polls the directory every second.
//! - One bootstrap token per node in `nodes/node<i>.token`; the controller generates its CA
//!   root in `ca/` on first start.
//! - The controller runs in the fabric netns on 10.254.0.254 (an address added to the bridge,
//!   on the nodes' /24, with routes to each node's pod /24 so waypoint pods reach it), TLS xDS + CA on 15012, metrics on 15014, plaintext xDS off. Every
//!   ztunnel runs with `--xds-address https://10.254.0.254:15012 --ca-address ... --token-file
//!   nodes/node<i>.token --xds-root-cert ca/root-cert.pem`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::waypoint::is_waypoint_pod;
use crate::{
    HarnessError, MeshConfigSource, MeshDesc, Proc, Result, SourceEnv, command_in, in_netns, ip,
    package_bin,
};

/// Label that enrolls a namespace (or a pod) in ambient.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// `zmesh-controller` on a directory of Kubernetes YAML (see the module docs).
pub struct ControllerSource {
    /// The controller's `--config-dir`.
    pub config_dir: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
    /// Content of every file last written, by file name.
    written: BTreeMap<String, String>,
    /// Files the last [`MeshConfigSource::publish`] rewrote.
    pub last_changed: Vec<String>,
}

impl ControllerSource {
    /// Address of the controller (on the fabric bridge).
    pub const ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 254);
    /// TLS xDS + CA port.
    pub const XDS_TLS_PORT: u16 = 15012;
    /// Readiness (`/healthz/ready`): 200 once the source synced, the CA is loaded and xDS
    /// is served — what the harness waits for, as a kubelet would.
    pub const READINESS_PORT: u16 = 15021;
    /// Controller metrics port.
    pub const METRICS_PORT: u16 = 15014;

    /// Create `<cluster_dir>/controller` with one bootstrap token per node.
    pub fn new(cluster_dir: &Path, nodes: usize) -> Result<Self> {
        let config_dir = cluster_dir.join("controller");
        std::fs::create_dir_all(config_dir.join("nodes"))?;
        for i in 0..nodes {
            write_token(&Self::token_path(&config_dir, i))?;
        }
        Ok(ControllerSource {
            log: cluster_dir.join("controller.log"),
            config_dir,
            proc: None,
            written: BTreeMap::new(),
            last_changed: Vec::new(),
        })
    }

    /// Node `node`'s bootstrap token file (its ztunnel and the waypoints on it use it).
    pub fn token_file(&self, node: usize) -> PathBuf {
        Self::token_path(&self.config_dir, node)
    }

    fn token_path(config_dir: &Path, node: usize) -> PathBuf {
        config_dir
            .join("nodes")
            .join(format!("{}.token", MeshDesc::node_name(node)))
    }

    /// `https://10.254.0.254:15012`.
    pub fn xds_url() -> String {
        format!("https://{}:{}", Self::ADDRESS, Self::XDS_TLS_PORT)
    }

    /// The CA root the controller generated (and ztunnels trust for its TLS).
    pub fn root_cert(&self) -> PathBuf {
        self.config_dir.join("ca/root-cert.pem")
    }

    /// The Kubernetes YAML files for `mesh`, by file name.
    pub fn render(mesh: &MeshDesc) -> Result<BTreeMap<String, String>> {
        if !mesh.policies.is_empty() {
            return Err(HarnessError::Other(
                "MeshDesc.policies is the local-file format; with the controller source give \
                 AuthorizationPolicy YAML in MeshDesc.k8s_objects"
                    .into(),
            ));
        }
        // A namespace is ambient when it has pods and all of them are enrolled (its waypoints'
        // pods aside: they are never captured, as in Istio).
        let mut namespaces: BTreeMap<&str, bool> = BTreeMap::new();
        for p in &mesh.pods {
            let e = namespaces.entry(p.namespace.as_str()).or_insert(true);
            *e &= p.enrolled || is_waypoint_pod(p);
        }
        for s in &mesh.services {
            namespaces.entry(s.namespace.as_str()).or_insert(false);
        }
        for ns in mesh.namespace_labels.keys() {
            namespaces.entry(ns.as_str()).or_insert(false);
        }
        let no_labels = BTreeMap::new();
        let mut ns_yaml = Vec::new();
        for (ns, ambient) in &namespaces {
            let mut labels = Vec::new();
            if *ambient {
                labels.push((DATAPLANE_MODE.to_string(), "ambient".to_string()));
            }
            let extra = mesh.namespace_labels.get(*ns).unwrap_or(&no_labels);
            labels.extend(extra.iter().map(|(k, v)| (k.clone(), format!("{v:?}"))));
            ns_yaml.push(format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}{}\n",
                labels_yaml(&labels)
            ));
        }
        let mut pods_yaml = Vec::new();
        for p in &mesh.pods {
            let ns_ambient = namespaces.get(p.namespace.as_str()).copied() == Some(true);
            let mut labels = vec![
                ("app".to_string(), p.name.clone()),
                ("version".to_string(), p.version.clone()),
            ];
            if p.enrolled != ns_ambient {
                let mode = if p.enrolled { "ambient" } else { "none" };
                labels.push((DATAPLANE_MODE.to_string(), mode.to_string()));
            }
            for s in mesh.services.iter().filter(|s| s.pods.contains(&p.name)) {
                labels.push((service_label(&s.name), "\"true\"".into()));
            }
            labels.extend(p.labels.iter().map(|(k, v)| (k.clone(), format!("{v:?}"))));
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("    {k}: {v}"))
                .collect();
            pods_yaml.push(format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  labels:\n{}\n\
                 spec:\n  nodeName: {}\n  serviceAccountName: {}\nstatus:\n  podIP: {}\n",
                p.name,
                p.namespace,
                labels.join("\n"),
                MeshDesc::node_name(p.node),
                p.service_account,
                p.ip
            ));
        }
        let mut svc_yaml = Vec::new();
        for s in &mesh.services {
            let extra = mesh
                .service_labels
                .get(&format!("{}/{}", s.namespace, s.name))
                .unwrap_or(&no_labels);
            let labels: Vec<(String, String)> = extra
                .iter()
                .map(|(k, v)| (k.clone(), format!("{v:?}")))
                .collect();
            svc_yaml.push(format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}{}\n\
                 spec:\n  clusterIP: {}\n  selector:\n    {}: \"true\"\n  ports:\n  - name: tcp-{}\n    \
                 port: {}\n    targetPort: {}\n    protocol: TCP\n",
                s.name,
                s.namespace,
                labels_yaml(&labels),
                s.vip,
                service_label(&s.name),
                s.port,
                s.port,
                s.target_port
            ));
        }
        let mut policy_yaml = Vec::new();
        if let Some(mode) = &mesh.mtls_mode {
            policy_yaml.push(format!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  \
                 name: default\n  namespace: istio-system\nspec:\n  mtls:\n    mode: {mode}\n"
            ));
        }
        policy_yaml.extend(mesh.k8s_objects.iter().cloned());
        let join = |docs: Vec<String>| -> String {
            docs.iter()
                .map(|d| d.trim_start_matches("---\n").trim_end().to_string())
                .collect::<Vec<_>>()
                .join("\n---\n")
                + "\n"
        };
        Ok(BTreeMap::from([
            ("00-namespaces.yaml".to_string(), join(ns_yaml)),
            ("10-pods.yaml".to_string(), join(pods_yaml)),
            ("20-services.yaml".to_string(), join(svc_yaml)),
            (
                "25-waypoints.yaml".to_string(),
                join(mesh.waypoints.iter().flat_map(|w| w.k8s_yaml()).collect()),
            ),
            ("30-policies.yaml".to_string(), join(policy_yaml)),
        ]))
    }

    fn wait_serving(&mut self, fabric_ns: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let addr = SocketAddr::from((Self::ADDRESS, Self::READINESS_PORT));
        loop {
            if let Some(p) = self.proc.as_mut()
                && let Ok(Some(status)) = p.child.try_wait()
            {
                return Err(HarnessError::Other(format!(
                    "zmesh-controller exited ({status}) before serving:\n{}",
                    self.log()
                )));
            }
            let up = in_netns(fabric_ns, move || ready(addr)).is_ok_and(|r| r);
            if up && self.root_cert().exists() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Other(format!(
                    "zmesh-controller was not ready (GET {addr}/healthz/ready) within {timeout:?}:\n{}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `\n  labels:\n    k: v...` (values already YAML scalars), or nothing.
fn labels_yaml(labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let lines: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("    {k}: {v}"))
        .collect();
    format!("\n  labels:\n{}", lines.join("\n"))
}

/// Label key a Service selects its pods by.
fn service_label(service: &str) -> String {
    format!("zmesh.test/svc-{service}")
}

/// A random 64-hex-digit bootstrap token, mode 0600.
fn write_token(path: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 32];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(token.as_bytes())?;
    Ok(())
}

impl MeshConfigSource for ControllerSource {
    fn publish(&mut self, mesh: &MeshDesc) -> Result<()> {
        let files = Self::render(mesh)?;
        self.last_changed.clear();
        let old: BTreeSet<String> = self.written.keys().cloned().collect();
        for (name, content) in &files {
            if self.written.get(name) == Some(content) {
                continue;
            }
            // Dot-files are ignored by the file source: write, then rename into place.
            let tmp = self.config_dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, content)?;
            std::fs::rename(&tmp, self.config_dir.join(name))?;
            self.last_changed.push(name.clone());
        }
        for gone in old.iter().filter(|n| !files.contains_key(*n)) {
            let _ = std::fs::remove_file(self.config_dir.join(gone));
            self.last_changed.push(gone.clone());
        }
        self.written = files;
        Ok(())
    }

    fn ztunnel_args(&self, node: usize) -> Vec<String> {
        vec![
            "--xds-address".into(),
            Self::xds_url(),
            "--ca-address".into(),
            Self::xds_url(),
            "--token-file".into(),
            Self::token_path(&self.config_dir, node)
                .display()
                .to_string(),
            "--xds-root-cert".into(),
            self.root_cert().display().to_string(),
            "--pod-name".into(),
            format!("ztunnel-{}", MeshDesc::node_name(node)),
            "--instance-ip".into(),
            crate::Cluster::node_ip(node).to_string(),
        ]
    }

    fn start(&mut self, env: &SourceEnv<'_>) -> Result<()> {
        let cidr = format!("{}/24", Self::ADDRESS);
        ip(&["-n", env.fabric_ns, "addr", "add", &cidr, "dev", "br0"])?;
        // Pods reach the controller too (waypoints get their config and certificate from
        // it, as in a cluster): route replies to each node's pod range via that node.
        for k in 0..env.nodes {
            let net = format!("10.20.{k}.0/24");
            let via = crate::Cluster::node_ip(k).to_string();
            ip(&[
                "-n",
                env.fabric_ns,
                "route",
                "add",
                &net,
                "via",
                &via,
                "dev",
                "br0",
            ])?;
        }
        let bin = package_bin("zmesh-controller", "zmesh-controller")?;
        let out = File::create(&self.log)?;
        let err = out.try_clone()?;
        let mut cmd = command_in(env.fabric_ns, bin)?;
        cmd.arg("--config-dir")
            .arg(&self.config_dir)
            .args([
                "--xds-tls-addr",
                &format!("{}:{}", Self::ADDRESS, Self::XDS_TLS_PORT),
            ])
            .args(["--xds-plaintext-addr", "off"])
            .args([
                "--metrics-addr",
                &format!("{}:{}", Self::ADDRESS, Self::METRICS_PORT),
            ])
            .args([
                "--readiness-addr",
                &format!("{}:{}", Self::ADDRESS, Self::READINESS_PORT),
            ])
            .args(["--debounce-ms", "50"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd.spawn()?;
        self.proc = Some(Proc {
            child,
            log: self.log.clone(),
        });
        self.wait_serving(env.fabric_ns, Duration::from_secs(30))
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Whether `GET /healthz/ready` on `addr` answers 200 (one short HTTP/1.0 exchange).
fn ready(addr: SocketAddr) -> std::io::Result<bool> {
    use std::io::Write;
    let t = Duration::from_millis(500);
    let mut s = TcpStream::connect_timeout(&addr, t)?;
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))?;
    s.write_all(b"GET /healthz/ready HTTP/1.0\r\nHost: controller\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    Ok(head.starts_with(b"HTTP/1.") && &head[8..12] == b" 200")
}
