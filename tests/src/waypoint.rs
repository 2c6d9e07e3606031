//! Waypoints in the netns cluster, deployed the way `zmesh waypoint apply` deploys them in
//! Kubernetes, but by hand:
//!
//! - the [`ControllerSource`](crate::ControllerSource) directory gets a `Gateway` of class
//!   `istio-waypoint` and a headless `Service` selecting the waypoint pod by
//!   `gateway.networking.k8s.io/gateway-name` (`25-waypoints.yaml`); the controller translates
//!   `istio.io/use-waypoint` on a Namespace or Service into the waypoint's address, as in
//!   `controller/src/translate/workloads.rs`;
//! - the waypoint pod is a pod netns like any other (`<name>-0`, service account `<name>`,
//!   label `gateway-name`, never enrolled: its own traffic is not captured);
//! - the real `waypoint` binary runs in it with the node's bootstrap token, so it gets its
//!   identity `spiffe://cluster.local/ns/<ns>/sa/<name>` from the controller's CA and its
//!   configuration over Delta ADS (TLS, 15012), exactly as it would in a cluster. HBONE on
//!   `<pod ip>:15008`, admin on 127.0.0.1:15000, metrics 15020, readiness 15021 (pod netns).

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::http1::{HttpResponse, http1_request};
use crate::{Cluster, HarnessError, MeshDesc, PodSpec, Proc, Result, command_in, in_netns};

/// Label that marks a waypoint's pods and Service (Gateway API).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Label that makes a Namespace, Service or Pod use a waypoint.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";

/// A waypoint of the cluster description.
#[derive(Debug, Clone)]
pub struct WaypointSpec {
    /// Gateway name, also the service account (Istio names waypoint deployments so).
    pub name: String,
    pub namespace: String,
    pub node: usize,
}

impl WaypointSpec {
    pub fn new(name: &str, namespace: &str, node: usize) -> Self {
        WaypointSpec {
            name: name.into(),
            namespace: namespace.into(),
            node,
        }
    }

    /// The waypoint pod's name (waypoint names must be unique in a test cluster).
    pub fn pod_name(&self) -> String {
        format!("{}-0", self.name)
    }

    /// The pod that runs it.
    pub fn pod(&self) -> PodSpec {
        let mut p = PodSpec::new(&self.pod_name(), &self.namespace, self.node, false);
        p.service_account = self.name.clone();
        p.labels
            .push((GATEWAY_NAME_LABEL.to_string(), self.name.clone()));
        p
    }

    /// The Gateway and its (headless) Service, as Kubernetes YAML documents.
    pub fn k8s_yaml(&self) -> Vec<String> {
        let (name, ns) = (&self.name, &self.namespace);
        vec![
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\n  \
                 namespace: {ns}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - name: mesh\n    \
                 port: 15008\n    protocol: HBONE\n"
            ),
            // No clusterIP: ztunnels then address the waypoint by hostname (its pods, 15008).
            format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    \
                 {GATEWAY_NAME_LABEL}: {name}\nspec:\n  selector:\n    {GATEWAY_NAME_LABEL}: {name}\n  \
                 ports:\n  - name: mesh\n    port: 15008\n"
            ),
        ]
    }
}

/// Is `p` a waypoint's pod (it never counts towards its namespace's enrolment)?
pub(crate) fn is_waypoint_pod(p: &PodSpec) -> bool {
    p.labels.iter().any(|(k, _)| k == GATEWAY_NAME_LABEL)
}

/// `GET path` on `addr` from inside the netns `ns` (a fresh connection, closed after).
pub fn http_get_in(ns: &str, addr: SocketAddr, path: &str) -> io::Result<HttpResponse> {
    let path = path.to_string();
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        http1_request(&mut s, "GET", &path, "admin", &[("connection", "close")])
    })
}

impl Cluster {
    fn waypoint_spec(&self, name: &str) -> Result<WaypointSpec> {
        self.mesh
            .waypoints
            .iter()
            .find(|w| w.name == name)
            .cloned()
            .ok_or_else(|| HarnessError::Other(format!("no waypoint {name} in the cluster")))
    }

    /// Start (or restart) waypoint `name` in its pod and wait until it is ready (synced).
    pub fn start_waypoint(&mut self, name: &str) -> Result<()> {
        let wp = self.waypoint_spec(name)?;
        self.kill_waypoint(name);
        let source = self.controller_source().ok_or_else(|| {
            HarnessError::Other(
                "waypoints need the controller source (builder.controller())".into(),
            )
        })?;
        let (root, token) = (source.root_cert(), source.token_file(wp.node));
        let pod = self.pod(&wp.pod_name()).clone();
        let bin = match &self.waypoint_binary {
            Some(p) => p.clone(),
            None => crate::package_bin("waypoint", "waypoint")?,
        };
        let n = self.waypoint_starts;
        self.waypoint_starts += 1;
        let log = self.dir.join(format!("waypoint-{name}.{n}.log"));
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let pns = self.pod_ns(&pod.name);
        let mut cmd = command_in(&pns, bin)?;
        cmd.args(["--xds-address", &crate::ControllerSource::xds_url()])
            .arg("--xds-root-cert")
            .arg(root)
            .arg("--token-file")
            .arg(token)
            .args(["--node", &MeshDesc::node_name(wp.node)])
            .args(["--pod-name", &pod.name])
            .args(["--namespace", &wp.namespace, "--service-account", &wp.name])
            .args(["--instance-ip", &pod.ip.to_string()])
            .args(["--hbone", &format!("{}:15008", pod.ip)])
            .args(["--admin", "127.0.0.1:15000"])
            .args(["--metrics", "0.0.0.0:15020", "--readiness", "0.0.0.0:15021"])
            .args(["--drain-grace-secs", "1"])
            .env("RUST_LOG", "info")
            .env_remove("POD_NAMESPACE")
            .env_remove("SERVICE_ACCOUNT")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd.spawn()?;
        self.waypoints.push((name.to_string(), Proc { child, log }));
        let deadline = Instant::now() + Duration::from_secs(30);
        let ready = SocketAddr::from(([127, 0, 0, 1], 15021));
        loop {
            if http_get_in(&pns, ready, "/healthz/ready").is_ok_and(|r| r.status == 200) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Other(format!(
                    "waypoint {name} not ready within 30 s\n--- waypoint log ---\n{}\n--- controller log ---\n{}",
                    self.waypoint_log(name),
                    self.source_log()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kill waypoint `name` (SIGKILL: no drain, like a crash).
    pub fn kill_waypoint(&mut self, name: &str) {
        self.waypoints.retain(|(n, _)| n != name);
    }

    /// PID of waypoint `name` while it runs (benchmarks read its CPU and RSS in /proc).
    pub fn waypoint_pid(&self, name: &str) -> Option<u32> {
        self.waypoints
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.child.id())
    }

    /// Every log of waypoint `name` so far (all starts).
    pub fn waypoint_log(&self, name: &str) -> String {
        let mut s = String::new();
        for n in 0..self.waypoint_starts {
            let f = self.dir.join(format!("waypoint-{name}.{n}.log"));
            if let Ok(t) = std::fs::read_to_string(f) {
                s.push_str(&t);
            }
        }
        s
    }

    /// `GET path` on port `port` of waypoint `name` (15000 admin, 15020 metrics), from its pod.
    pub fn waypoint_get(&self, name: &str, port: u16, path: &str) -> Result<HttpResponse> {
        let wp = self.waypoint_spec(name)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Ok(http_get_in(&self.pod_ns(&wp.pod_name()), addr, path)?)
    }

    /// The waypoint's `/config_dump` as JSON.
    pub fn waypoint_config_dump(&self, name: &str) -> Result<serde_json::Value> {
        let r = self.waypoint_get(name, 15000, "/config_dump")?;
        serde_json::from_str(&r.body).map_err(|e| {
            HarnessError::Other(format!(
                "waypoint config_dump is not JSON ({e}): {}",
                r.body
            ))
        })
    }

    /// Set (Some) or remove (None) a label of Namespace `namespace` and publish it (controller
    /// source: only the Namespaces file changes, nothing restarts).
    pub fn set_namespace_label(
        &mut self,
        namespace: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<()> {
        self.update_mesh(|m| {
            set_label(
                m.namespace_labels.entry(namespace.into()).or_default(),
                key,
                value,
            )
        })
    }

    /// Set or remove a label of Service `namespace/name` and publish it.
    pub fn set_service_label(
        &mut self,
        namespace: &str,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<()> {
        self.update_mesh(|m| {
            set_label(
                m.service_labels
                    .entry(format!("{namespace}/{name}"))
                    .or_default(),
                key,
                value,
            )
        })
    }

    /// Write a user's YAML file (VirtualService, DestinationRule, AuthorizationPolicy, ...)
    /// into the controller's directory, as a user would (write + rename, so the controller
    /// never reads half of it). `file` must not be one of the harness's own `NN-*.yaml`
    /// names (00, 10, 20, 25, 30).
    pub fn apply_yaml(&self, file: &str, yaml: &str) -> Result<()> {
        let dir = self.config_dir()?;
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, dir.join(file))?;
        Ok(())
    }

    /// [`Cluster::apply_yaml`], then wait until waypoint `waypoint` holds a different L7
    /// configuration or policy set than before (the controller polls its directory every
    /// second), so the next request sees the new config. Fails after 20 s: a change that
    /// does not alter the waypoint's config (or that the controller rejected) never lands.
    pub fn apply_yaml_to_waypoint(&self, waypoint: &str, file: &str, yaml: &str) -> Result<()> {
        let held = |c: &Cluster| -> Result<String> {
            let d = c.waypoint_config_dump(waypoint)?;
            Ok(format!("{}{}", d["l7"], d["state"]["policies"]))
        };
        let before = held(self)?;
        self.apply_yaml(file, yaml)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if held(self)? != before {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(HarnessError::Other(format!(
            "waypoint {waypoint} did not receive {file} within 20 s\n--- controller log ---\n{}",
            self.source_log()
        )))
    }

    /// Remove a file written with [`Cluster::apply_yaml`].
    pub fn delete_yaml(&self, file: &str) -> Result<()> {
        let p = self.config_dir()?.join(file);
        match std::fs::remove_file(p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    fn config_dir(&self) -> Result<std::path::PathBuf> {
        self.controller_source()
            .map(|s| s.config_dir.clone())
            .ok_or_else(|| HarnessError::Other("user YAML needs the controller source".into()))
    }
}

fn set_label(labels: &mut std::collections::BTreeMap<String, String>, k: &str, v: Option<&str>) {
    match v {
        Some(v) => labels.insert(k.to_string(), v.to_string()),
        None => labels.remove(k),
    };
}
