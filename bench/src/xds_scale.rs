//! `xds-scale`: the controller serving a large cluster to many ztunnels.
//!
//! Processes:
//! - **controller**: this binary re-executed as `zmesh-bench xds-controller`. It generates the
//!   cluster (Namespaces, Pods, Services, AuthorizationPolicies as Kubernetes JSON), puts it in an
//!   [`ObjectStore`], runs an in-process [`Controller`] (plaintext Delta ADS on 127.0.0.1, no
//!   file source) and applies pod IP changes it reads on stdin straight to the store. It is a
//!   process of its own so that its VmRSS is the controller's and nothing else's.
//! - **real client**: this binary as `zmesh-bench xds-client`: one `zmesh_core::xds::XdsClient`
//!   with its own `StateStore`, as in ztunnel. Its RSS is `client_rss_mb_10k_workloads`.
//! - **raw clients** (`clients − 1`, in the bench process): minimal Delta ADS clients that
//!   subscribe like ztunnel (wildcard Address + Authorization), ACK every response and, after
//!   the initial sync, decode the Address resources of each push to timestamp the change.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use prost::Message;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use zmesh_controller::controller::{Controller, ControllerConfig};
use zmesh_controller::store::{ObjectKey, ObjectStore};
use zmesh_core::state::{ConfigSource, StateStore};
use zmesh_core::xds::{ControlPlaneEndpoint, XdsClient, XdsConfig};
use zmesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use zmesh_proto::discovery::{DeltaDiscoveryRequest, Node};
use zmesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

use crate::mesh::{self, ChildGuard};
use crate::sys;

pub const TARGET_INITIAL_PUSH_S: f64 = 2.0;
pub const TARGET_UPDATE_P99_MS: f64 = 100.0;
pub const TARGET_CONTROLLER_RSS_MB: f64 = 300.0;
pub const TARGET_CLIENT_RSS_MB: f64 = 50.0;

/// The size of the generated cluster (shared by the bench and its controller child).
#[derive(Args, Debug, Clone)]
pub struct Topology {
    /// Pods (all Running and Ready, in ambient namespaces).
    #[arg(long, default_value_t = 10_000)]
    pub pods: usize,
    /// Services; pod i backs service i mod services.
    #[arg(long, default_value_t = 1_000)]
    pub services: usize,
    /// AuthorizationPolicies; policy p selects the pods of service p mod services.
    #[arg(long, default_value_t = 1_000)]
    pub policies: usize,
    /// Namespaces, all labelled istio.io/dataplane-mode=ambient.
    #[arg(long, default_value_t = 50)]
    pub namespaces: usize,
    /// Nodes the pods are spread over.
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,
}

const CLUSTER_ID: &str = "Kubernetes";
const HASH: &str = "7d9f8c6b5";

impl Topology {
    fn check(&self) -> Result<()> {
        if self.pods == 0 || self.services == 0 || self.namespaces == 0 || self.nodes == 0 {
            bail!("--pods, --services, --namespaces and --nodes must be positive");
        }
        Ok(())
    }

    fn ns(&self, svc: usize) -> String {
        format!("ns-{:03}", svc % self.namespaces)
    }

    fn svc(svc: usize) -> String {
        format!("svc-{svc:04}")
    }

    /// (namespace, name) of pod `i`.
    fn pod_name(&self, i: usize) -> (String, String) {
        let s = i % self.services;
        (
            self.ns(s),
            format!("{}-{HASH}-{:05}", Self::svc(s), i / self.services),
        )
    }

    pub fn pod_uid(&self, i: usize) -> String {
        let (ns, name) = self.pod_name(i);
        format!("{CLUSTER_ID}//v1/Pod/{ns}/{name}")
    }

    fn pod_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 16, 0, 0)) + i as u32)
    }

    pub fn pod(&self, i: usize, ip: Ipv4Addr) -> Value {
        let s = i % self.services;
        let (ns, name) = self.pod_name(i);
        let app = Self::svc(s);
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": format!("00000000-0000-4000-8000-{i:012}"),
                "labels": {"app": app, "version": "v1", "pod-template-hash": HASH},
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": format!("{app}-{HASH}"), "controller": true,
                    "uid": format!("00000000-0000-4000-9000-{s:012}"),
                }],
            },
            "spec": {
                "nodeName": format!("node-{:03}", i % self.nodes),
                "serviceAccountName": app,
                "containers": [{
                    "name": "app",
                    "image": "registry.example/app:1.0",
                    "ports": [
                        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                        {"name": "grpc", "containerPort": 9090, "protocol": "TCP"},
                    ],
                }],
            },
            "status": {
                "phase": "Running",
                "podIP": ip.to_string(),
                "podIPs": [{"ip": ip.to_string()}],
                "hostIP": format!("10.254.{}.{}", (i % self.nodes) / 250, (i % self.nodes) % 250 + 1),
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        })
    }

    fn objects(&self) -> Vec<Value> {
        let mut out = Vec::with_capacity(self.namespaces + self.pods + 2 * self.services);
        for k in 0..self.namespaces {
            out.push(json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": format!("ns-{k:03}"), "labels": {"istio.io/dataplane-mode": "ambient"}},
            }));
        }
        for s in 0..self.services {
            let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + s as u32).to_string();
            out.push(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": Self::svc(s), "namespace": self.ns(s), "labels": {"app": Self::svc(s)}},
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": vip, "clusterIPs": [vip],
                    "selector": {"app": Self::svc(s)},
                    "ports": [
                        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                        {"name": "grpc", "port": 9090, "targetPort": "grpc", "protocol": "TCP"},
                    ],
                },
            }));
        }
        for p in 0..self.policies {
            let s = p % self.services;
            let peer = (s + 1) % self.services;
            out.push(json!({
                "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": format!("allow-{}-{}", Self::svc(s), p / self.services), "namespace": self.ns(s)},
                "spec": {
                    "selector": {"matchLabels": {"app": Self::svc(s)}},
                    "action": "ALLOW",
                    "rules": [
                        {
                            "from": [{"source": {"principals": [
                                format!("cluster.local/ns/{}/sa/{}", self.ns(peer), Self::svc(peer)),
                                "cluster.local/ns/istio-system/sa/istio-ingressgateway",
                            ]}}],
                            "to": [{"operation": {"ports": ["8080"]}}],
                        },
                        {
                            "from": [{"source": {"namespaces": [self.ns(s), self.ns(s + 7)]}}],
                            "to": [{"operation": {"ports": ["9090"]}}],
                        },
                    ],
                },
            }));
        }
        for i in 0..self.pods {
            out.push(self.pod(i, Self::pod_ip(i)));
        }
        out
    }
}

#[derive(Args, Debug)]
pub struct XdsArgs {
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    topo: Topology,
    /// Connected clients: one real XdsClient (child process) + raw Delta clients.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Pod IP changes measured, one at a time.
    #[arg(long, default_value_t = 50)]
    updates: usize,
    /// Pause between two updates, milliseconds.
    #[arg(long, default_value_t = 200)]
    update_gap_ms: u64,
    /// The controller's debounce window (translation and ADS push), milliseconds. The
    /// controller's default, like Istio's PILOT_DEBOUNCE_AFTER, is 100.
    #[arg(long, default_value_t = 100)]
    debounce_ms: u64,
    /// Give up waiting for the initial sync after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Give up waiting for one update after this many seconds (counted in `update_timeouts`).
    #[arg(long, default_value_t = 30)]
    update_timeout_secs: u64,
}

/// Internal: the controller child.
#[derive(Args, Debug)]
pub struct ControllerChildArgs {
    #[command(flatten)]
    topo: Topology,
    #[arg(long)]
    debounce_ms: u64,
}

/// Internal: the real-client child.
#[derive(Args, Debug)]
pub struct ClientChildArgs {
    #[arg(long)]
    addr: SocketAddr,
}

#[derive(Debug, Default, Serialize)]
pub struct XdsReport {
    /// From starting every client to the last of them holding the full initial state.
    pub initial_push_s: Option<f64>,
    /// Median client's sync time, same origin.
    pub initial_push_p50_s: Option<f64>,
    /// The real XdsClient's sync time (decode + StateStore apply included), same origin.
    pub initial_push_real_client_s: Option<f64>,
    /// Pod IP written to the store → the last client has the new IP; percentiles over updates.
    pub update_p50_ms: Option<f64>,
    pub update_p99_ms: Option<f64>,
    pub update_max_ms: Option<f64>,
    /// Same, to the first client that has it.
    pub update_first_client_p50_ms: Option<f64>,
    pub update_samples: usize,
    pub update_timeouts: usize,
    /// Controller VmRSS with the cluster loaded and translated and every client connected and
    /// synced.
    pub controller_rss_mb: Option<f64>,
    /// Before any client connected (state loaded and translated).
    pub controller_rss_mb_loaded: Option<f64>,
    pub controller_rss_mb_after_updates: Option<f64>,
    /// VmHWM (peak RSS) over the whole run.
    pub controller_peak_rss_mb: Option<f64>,
    /// Building the store + first translation + binding (the controller process's own clock).
    pub controller_start_s: Option<f64>,
    /// Controller CPU (utime+stime) from clients starting to all synced.
    pub controller_cpu_s_initial_push: Option<f64>,
    /// Controller CPU per update (translation of the whole cluster + diff + 100 pushes).
    pub controller_cpu_ms_per_update: Option<f64>,
    /// Real client: RSS after sync − RSS before connecting.
    pub client_rss_mb_10k_workloads: Option<f64>,
    pub client_rss_mb_before_connect: Option<f64>,
    pub client_rss_mb_synced: Option<f64>,
    pub client_peak_rss_mb: Option<f64>,
    /// After `malloc_trim(0)` at the end of the run: what is live vs. kept by the allocator.
    pub client_rss_mb_after_trim: Option<f64>,
    pub client_workloads: Option<usize>,
    pub client_services: Option<usize>,
    pub client_policies: Option<usize>,
    pub address_resources: Option<usize>,
    pub authorization_resources: Option<usize>,
    pub meta: XdsMeta,
}

#[derive(Debug, Default, Serialize)]
pub struct XdsMeta {
    pub benchmark: &'static str,
    #[serde(flatten)]
    pub machine: sys::Machine,
    pub bench_profile: &'static str,
    pub pods: usize,
    pub services: usize,
    pub policies: usize,
    pub namespaces: usize,
    pub nodes: usize,
    pub clients: usize,
    pub updates: usize,
    pub update_gap_ms: u64,
    pub debounce_ms: u64,
    pub total_secs: f64,
}

// ---------------------------------------------------------------------------------------------
// Children.

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("building the tokio runtime")
}

/// Lines of stdin, on a thread, as a channel (closed at EOF: the parent went away).
fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn hwm_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
}

pub fn run_controller(args: ControllerChildArgs) -> Result<()> {
    args.topo.check()?;
    let rt = runtime(sys::cores())?;
    rt.block_on(async move {
        let t0 = Instant::now();
        let store = ObjectStore::new();
        let objects: Vec<(ObjectKey, Value)> = args
            .topo
            .objects()
            .into_iter()
            .map(|o| (ObjectKey::of(&o).expect("generated objects have keys"), o))
            .collect();
        store.replace_kinds(
            &["Namespace", "Service", "AuthorizationPolicy", "Pod"],
            objects,
        );
        let controller = Controller::start(ControllerConfig {
            config_dir: None,
            file_source: false,
            xds_plaintext_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            xds_tls_addr: None,
            metrics_addr: None,
            debounce: Duration::from_millis(args.debounce_ms),
            store: Some(store.clone()),
            ..ControllerConfig::default()
        })
        .await
        .context("starting the controller")?;
        let addr = controller
            .addrs
            .xds_plaintext
            .ok_or_else(|| anyhow!("no plaintext xDS address"))?;
        println!(
            "READY {addr} {:.3} {} {}",
            t0.elapsed().as_secs_f64(),
            controller.cache.len(ADDRESS_TYPE_URL),
            controller.cache.len(AUTHORIZATION_TYPE_URL)
        );
        let mut lines = stdin_lines();
        while let Some(line) = lines.recv().await {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let ["IP", idx, ip] = f.as_slice() {
                let (i, ip): (usize, Ipv4Addr) = (idx.parse()?, ip.parse()?);
                let pod = args.topo.pod(i, ip);
                let key = ObjectKey::of(&pod).expect("generated objects have keys");
                store.upsert(key, pod);
            }
        }
        // The parent closed our stdin: exit without the graceful shutdown.
        std::process::exit(0)
    })
}

fn malloc_trim() {
    // SAFETY: malloc_trim has no preconditions; it only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub fn run_client(args: ClientChildArgs) -> Result<()> {
    let me = std::process::id();
    // Two workers, as a ztunnel on a small node.
    let rt = runtime(2)?;
    rt.block_on(async move {
        let mut lines = stdin_lines();
        println!("RSS0 {:.3}", sys::rss_mb(me)?);
        // Wait for the start signal so that process start-up is not timed.
        while let Some(l) = lines.recv().await {
            if l == "GO" {
                break;
            }
        }
        let store = StateStore::new();
        let cfg = XdsConfig::ztunnel(
            ControlPlaneEndpoint::new(format!("http://{}", args.addr), None),
            "node-000",
            "ztunnel-bench",
            "istio-system",
            Some(IpAddr::V4(Ipv4Addr::new(10, 254, 0, 1))),
        );
        tokio::spawn(Box::new(XdsClient::new(cfg)).run(store.clone()));
        let mut generation = store.generation();
        while !store.is_synced() {
            generation
                .changed()
                .await
                .map_err(|_| anyhow!("state store closed"))?;
        }
        let (w, s, p) = {
            let st = store.read();
            (
                st.workloads().count(),
                st.services().count(),
                st.policies().count(),
            )
        };
        println!("SYNCED {:.3} {w} {s} {p}", sys::rss_mb(me)?);
        let mut watch: Option<(String, IpAddr)> = None;
        loop {
            tokio::select! {
                r = generation.changed() => if r.is_err() { break },
                l = lines.recv() => {
                    let Some(l) = l else { break };
                    let f: Vec<&str> = l.split_whitespace().collect();
                    match f.as_slice() {
                        ["WATCH", uid, ip] => watch = Some((uid.to_string(), ip.parse()?)),
                        ["RSS"] => {
                            let (rss, hwm) = (sys::rss_mb(me)?, hwm_mb(me).unwrap_or(0.0));
                            malloc_trim();
                            println!("RSS {rss:.3} {hwm:.3} {:.3}", sys::rss_mb(me)?);
                        }
                        _ => {}
                    }
                }
            }
            if let Some((uid, ip)) = &watch {
                let has = store
                    .read()
                    .workload_by_uid(uid)
                    .is_some_and(|w| w.addresses.contains(ip));
                if has {
                    println!("HAVE {uid} {ip}");
                    watch = None;
                }
            }
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// The bench.

#[derive(Debug)]
enum Event {
    Synced {
        client: usize,
        at: Instant,
    },
    Ip {
        client: usize,
        uid: String,
        ip: IpAddr,
        at: Instant,
    },
    Failed {
        client: usize,
        error: String,
    },
}

fn workload_ip(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// A minimal Delta ADS client: subscribe, ACK, report the first full state and every workload
/// pushed afterwards.
async fn raw_client(client: usize, addr: SocketAddr, events: mpsc::UnboundedSender<Event>) {
    if let Err(e) = raw_client_inner(client, addr, &events).await {
        let _ = events.send(Event::Failed {
            client,
            error: format!("{e:#}"),
        });
    }
}

async fn raw_client_inner(
    client: usize,
    addr: SocketAddr,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<()> {
    use zmesh_proto::workload::address::Type;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .context("connecting")?;
    let mut ads = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(zmesh_core::xds::MAX_RESPONSE_BYTES);
    let (tx, mut rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    let ip = format!("10.254.{}.{}", client / 250, client % 250 + 1);
    let node = Node {
        id: format!("ztunnel~{ip}~ztunnel-{client}.istio-system~istio-system.svc.cluster.local"),
        ..Default::default()
    };
    for t in [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL] {
        tx.send(DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: t.to_string(),
            ..Default::default()
        })
        .await?;
    }
    let outbound = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut inbound = ads
        .delta_aggregated_resources(outbound)
        .await
        .context("opening the stream")?
        .into_inner();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut synced = false;
    while let Some(resp) = inbound.message().await.context("receiving")? {
        let at = Instant::now();
        if synced && resp.type_url == ADDRESS_TYPE_URL {
            for r in &resp.resources {
                let Some(any) = &r.resource else { continue };
                let a = zmesh_proto::workload::Address::decode(any.value.as_slice())?;
                if let Some(Type::Workload(w)) = a.r#type
                    && let Some(ip) = w.addresses.first().and_then(|b| workload_ip(b))
                {
                    let _ = events.send(Event::Ip {
                        client,
                        uid: w.uid,
                        ip,
                        at,
                    });
                }
            }
        }
        *seen.entry(resp.type_url.clone()).or_default() += resp.resources.len();
        if !synced && seen.len() == 2 {
            synced = true;
            let _ = events.send(Event::Synced { client, at });
        }
        tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url,
            response_nonce: resp.nonce,
            ..Default::default()
        })
        .await?;
    }
    bail!("stream closed by the controller")
}

/// A child speaking lines on stdin/stdout.
struct LineChild {
    proc: ChildGuard,
    stdin: ChildStdin,
    /// Lines with their arrival time, read on a thread.
    lines: std::sync::mpsc::Receiver<(String, Instant)>,
}

impl LineChild {
    fn spawn(name: &'static str, args: &[String]) -> Result<LineChild> {
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = mesh::spawn(cmd, name)?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("{name}: no stdin"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("{name}: no stdout"))?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((line, Instant::now())).is_err() {
                    break;
                }
            }
        });
        Ok(LineChild {
            proc: ChildGuard::new(name, child),
            stdin,
            lines,
        })
    }

    fn send(&mut self, line: &str) -> Result<()> {
        writeln!(self.stdin, "{line}").with_context(|| format!("writing to {}", self.proc.name))?;
        self.stdin.flush()?;
        Ok(())
    }

    /// The next line starting with `prefix` (its other words), within `timeout`.
    fn expect(&self, prefix: &str, timeout: Duration) -> Result<(Vec<String>, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (line, at) = self.lines.recv_timeout(left).map_err(|_| {
                anyhow!(
                    "{} did not say {prefix:?} within {timeout:?}",
                    self.proc.name
                )
            })?;
            let mut words = line.split_whitespace();
            if words.next() == Some(prefix) {
                return Ok((words.map(str::to_string).collect(), at));
            }
        }
    }
}

fn word<T: std::str::FromStr>(w: &[String], i: usize) -> Result<T> {
    w.get(i)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("malformed line from a child: {w:?}"))
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn round(v: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (v * m).round() / m
}

pub fn run(args: XdsArgs) -> Result<()> {
    let started = Instant::now();
    args.topo.check()?;
    if args.clients == 0 {
        bail!("--clients must be at least 1 (the real client)");
    }
    sys::raise_fd_limit().ok();
    let t = &args.topo;
    let mut r = XdsReport {
        meta: XdsMeta {
            benchmark: "xds-scale",
            machine: sys::Machine::capture(),
            bench_profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            pods: t.pods,
            services: t.services,
            policies: t.policies,
            namespaces: t.namespaces,
            nodes: t.nodes,
            clients: args.clients,
            updates: args.updates,
            update_gap_ms: args.update_gap_ms,
            debounce_ms: args.debounce_ms,
            ..XdsMeta::default()
        },
        ..XdsReport::default()
    };
    let busy_start = sys::machine_busy_seconds();
    let timeout = Duration::from_secs(args.timeout_secs);

    let topo_args = vec![
        format!("--pods={}", t.pods),
        format!("--services={}", t.services),
        format!("--policies={}", t.policies),
        format!("--namespaces={}", t.namespaces),
        format!("--nodes={}", t.nodes),
    ];
    let mut ctl_args = vec!["xds-controller".to_string()];
    ctl_args.extend(topo_args);
    ctl_args.push(format!("--debounce-ms={}", args.debounce_ms));
    eprintln!(
        "generating {} pods, {} services, {} policies and starting the controller...",
        t.pods, t.services, t.policies
    );
    let mut ctl = LineChild::spawn("controller", &ctl_args)?;
    let (w, _) = ctl.expect("READY", timeout)?;
    let addr: SocketAddr = word(&w, 0)?;
    r.controller_start_s = Some(word(&w, 1)?);
    r.address_resources = Some(word(&w, 2)?);
    r.authorization_resources = Some(word(&w, 3)?);
    let ctl_pid = ctl.proc.pid();
    std::thread::sleep(Duration::from_millis(500));
    r.controller_rss_mb_loaded = sys::rss_mb(ctl_pid).ok();
    eprintln!(
        "controller pid {ctl_pid} on {addr}: {} addresses, {} policies, {:.2} s, {:.1} MB",
        r.address_resources.unwrap_or(0),
        r.authorization_resources.unwrap_or(0),
        r.controller_start_s.unwrap_or(0.0),
        r.controller_rss_mb_loaded.unwrap_or(0.0)
    );

    let mut real = LineChild::spawn(
        "xds client",
        &["xds-client".to_string(), format!("--addr={addr}")],
    )?;
    let (w, _) = real.expect("RSS0", timeout)?;
    r.client_rss_mb_before_connect = Some(word(&w, 0)?);

    let rt = runtime(sys::cores())?;
    let (etx, mut erx) = mpsc::unbounded_channel::<Event>();
    // The real client's lines become events too.
    let real_lines = std::mem::replace(&mut real.lines, std::sync::mpsc::channel().1);
    let (synced_tx, synced_rx) = std::sync::mpsc::channel::<Vec<String>>();
    {
        let etx = etx.clone();
        std::thread::spawn(move || {
            for (line, at) in real_lines {
                let w: Vec<String> = line.split_whitespace().map(str::to_string).collect();
                match w.first().map(String::as_str) {
                    Some("SYNCED") => {
                        let _ = etx.send(Event::Synced { client: 0, at });
                        let _ = synced_tx.send(w[1..].to_vec());
                    }
                    Some("HAVE") if w.len() == 3 => {
                        if let Ok(ip) = w[2].parse() {
                            let _ = etx.send(Event::Ip {
                                client: 0,
                                uid: w[1].clone(),
                                ip,
                                at,
                            });
                        }
                    }
                    Some("RSS") => {
                        let _ = synced_tx.send(w);
                    }
                    _ => {}
                }
            }
        });
    }

    eprintln!("connecting {} clients...", args.clients);
    let cpu0 = sys::cpu_seconds(ctl_pid)?;
    let t0 = Instant::now();
    real.send("GO")?;
    for c in 1..args.clients {
        rt.spawn(raw_client(c, addr, etx.clone()));
    }
    drop(etx);
    let mut sync_at: HashMap<usize, Instant> = HashMap::new();
    let deadline = t0 + timeout;
    let recv = |erx: &mut mpsc::UnboundedReceiver<Event>, until: Instant| -> Option<Event> {
        rt.block_on(async {
            tokio::time::timeout_at(until.into(), erx.recv())
                .await
                .ok()
                .flatten()
        })
    };
    while sync_at.len() < args.clients {
        match recv(&mut erx, deadline) {
            Some(Event::Synced { client, at }) => {
                sync_at.entry(client).or_insert(at);
            }
            Some(Event::Failed { client, error }) => bail!("client {client} failed: {error}"),
            Some(Event::Ip { .. }) => {}
            None => bail!(
                "only {} of {} clients synced within {timeout:?}",
                sync_at.len(),
                args.clients
            ),
        }
    }
    r.controller_cpu_s_initial_push = Some(round(sys::cpu_seconds(ctl_pid)? - cpu0, 3));
    let mut secs: Vec<f64> = sync_at
        .values()
        .map(|at| at.duration_since(t0).as_secs_f64())
        .collect();
    secs.sort_by(f64::total_cmp);
    r.initial_push_s = secs.last().map(|v| round(*v, 3));
    r.initial_push_p50_s = percentile(&secs, 50.0).map(|v| round(v, 3));
    r.initial_push_real_client_s = sync_at
        .get(&0)
        .map(|at| round(at.duration_since(t0).as_secs_f64(), 3));
    let w = synced_rx
        .recv_timeout(Duration::from_secs(5))
        .context("real client SYNCED line")?;
    r.client_rss_mb_synced = Some(word(&w, 0)?);
    r.client_workloads = Some(word(&w, 1)?);
    r.client_services = Some(word(&w, 2)?);
    r.client_policies = Some(word(&w, 3)?);
    r.client_rss_mb_10k_workloads = r
        .client_rss_mb_synced
        .zip(r.client_rss_mb_before_connect)
        .map(|(a, b)| round(a - b, 2));
    eprintln!(
        "all {} clients synced in {:.3} s (median {:.3} s, real client {:.3} s)",
        args.clients,
        r.initial_push_s.unwrap_or(0.0),
        r.initial_push_p50_s.unwrap_or(0.0),
        r.initial_push_real_client_s.unwrap_or(0.0)
    );
    // Let the controller settle (ACKs, freed encode buffers) before reading its RSS.
    std::thread::sleep(Duration::from_secs(2));
    r.controller_rss_mb = sys::rss_mb(ctl_pid).ok();

    // Updates: one pod's IP at a time.
    eprintln!("measuring {} pod IP updates...", args.updates);
    let cpu1 = sys::cpu_seconds(ctl_pid)?;
    let mut all_ms = Vec::new();
    let mut first_ms = Vec::new();
    for k in 0..args.updates {
        let idx = (k * 7919 + 13) % t.pods;
        let uid = t.pod_uid(idx);
        let ip = IpAddr::V4(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(10, 128, 0, 1)) + k as u32,
        ));
        real.send(&format!("WATCH {uid} {ip}"))?;
        // Drop stale events before starting the clock.
        while erx.try_recv().is_ok() {}
        let start = Instant::now();
        ctl.send(&format!("IP {idx} {ip}"))?;
        let mut got: HashMap<usize, Instant> = HashMap::new();
        let until = start + Duration::from_secs(args.update_timeout_secs);
        while got.len() < args.clients {
            match recv(&mut erx, until) {
                Some(Event::Ip {
                    client,
                    uid: u,
                    ip: i,
                    at,
                }) if u == uid && i == ip => {
                    got.entry(client).or_insert(at);
                }
                Some(Event::Failed { client, error }) => bail!("client {client} failed: {error}"),
                Some(_) => {}
                None => break,
            }
        }
        if got.len() < args.clients {
            r.update_timeouts += 1;
            eprintln!(
                "update {k}: only {} of {} clients got it within {} s",
                got.len(),
                args.clients,
                args.update_timeout_secs
            );
        } else {
            let last = got.values().max().expect("non-empty");
            let first = got.values().min().expect("non-empty");
            all_ms.push(last.duration_since(start).as_secs_f64() * 1e3);
            first_ms.push(first.duration_since(start).as_secs_f64() * 1e3);
        }
        std::thread::sleep(Duration::from_millis(args.update_gap_ms));
    }
    let done = all_ms.len() + r.update_timeouts;
    if done > 0 {
        r.controller_cpu_ms_per_update = Some(round(
            (sys::cpu_seconds(ctl_pid)? - cpu1) * 1e3 / done as f64,
            1,
        ));
    }
    r.update_samples = all_ms.len();
    all_ms.sort_by(f64::total_cmp);
    first_ms.sort_by(f64::total_cmp);
    r.update_p50_ms = percentile(&all_ms, 50.0).map(|v| round(v, 1));
    r.update_p99_ms = percentile(&all_ms, 99.0).map(|v| round(v, 1));
    r.update_max_ms = all_ms.last().map(|v| round(*v, 1));
    r.update_first_client_p50_ms = percentile(&first_ms, 50.0).map(|v| round(v, 1));
    r.controller_rss_mb_after_updates = sys::rss_mb(ctl_pid).ok();
    r.controller_peak_rss_mb = hwm_mb(ctl_pid);

    real.send("RSS")?;
    if let Ok(w) = synced_rx.recv_timeout(Duration::from_secs(5))
        && w.len() == 4
    {
        r.client_peak_rss_mb = w[2].parse().ok();
        r.client_rss_mb_after_trim = w[3].parse().ok();
    }

    for v in [
        &mut r.controller_rss_mb,
        &mut r.controller_rss_mb_loaded,
        &mut r.controller_rss_mb_after_updates,
        &mut r.controller_peak_rss_mb,
        &mut r.client_rss_mb_before_connect,
        &mut r.client_rss_mb_synced,
        &mut r.client_peak_rss_mb,
        &mut r.client_rss_mb_after_trim,
    ] {
        *v = v.map(|x| round(x, 1));
    }
    r.meta.machine.load_average_end = sys::load_average();
    let wall = started.elapsed().as_secs_f64();
    if let (Some(b0), Some(b1)) = (busy_start, sys::machine_busy_seconds()) {
        // Our share: the bench process (raw clients) and both children.
        let ours = sys::self_cpu_seconds()
            + sys::cpu_seconds(ctl_pid).unwrap_or(0.0)
            + sys::cpu_seconds(real.proc.pid()).unwrap_or(0.0);
        let other = (b1 - b0 - ours).max(0.0);
        r.meta.machine.other_processes_cpu_pct =
            Some(round(100.0 * other / (wall * sys::cores() as f64), 0));
    }
    r.meta.total_secs = round(wall, 1);
    drop(real);
    drop(ctl);
    rt.shutdown_timeout(Duration::from_millis(200));

    crate::output::emit(&r.table(), &r, args.json.as_deref())
}

use crate::output::fmt_opt as f;

fn verdict(v: Option<f64>, target: f64) -> &'static str {
    match v {
        Some(x) if x <= target => "met",
        Some(_) => "MISSED",
        None => "-",
    }
}

impl XdsReport {
    pub fn table(&self) -> String {
        let m = &self.meta;
        let mut s = String::new();
        s.push_str(&format!(
            "{} pods, {} services, {} policies, {} clients, debounce {} ms\n",
            m.pods, m.services, m.policies, m.clients, m.debounce_ms
        ));
        s.push_str(&format!(
            "{:<44}{:>10}  {:<8}{}\n",
            "metric", "value", "result", "target"
        ));
        let mut row = |name: &str, v: Option<f64>, d: usize, target: Option<f64>| {
            let (res, t) = match target {
                Some(t) => (verdict(v, t), format!("<= {t}")),
                None => ("", String::new()),
            };
            s.push_str(&format!("{name:<44}{:>10}  {res:<8}{t}\n", f(v, d)));
        };
        row(
            "initial push, all clients synced (s)",
            self.initial_push_s,
            3,
            Some(TARGET_INITIAL_PUSH_S),
        );
        row("  median client (s)", self.initial_push_p50_s, 3, None);
        row(
            "  real XdsClient (s)",
            self.initial_push_real_client_s,
            3,
            None,
        );
        row(
            "update p50, pod IP → all clients (ms)",
            self.update_p50_ms,
            1,
            None,
        );
        row(
            "update p99, pod IP → all clients (ms)",
            self.update_p99_ms,
            1,
            Some(TARGET_UPDATE_P99_MS),
        );
        row(
            "  first client p50 (ms)",
            self.update_first_client_p50_ms,
            1,
            None,
        );
        row(
            "controller CPU per update (ms)",
            self.controller_cpu_ms_per_update,
            1,
            None,
        );
        row(
            "controller RSS, all synced (MB)",
            self.controller_rss_mb,
            1,
            Some(TARGET_CONTROLLER_RSS_MB),
        );
        row(
            "  loaded, no client (MB)",
            self.controller_rss_mb_loaded,
            1,
            None,
        );
        row("  peak (MB)", self.controller_peak_rss_mb, 1, None);
        row(
            "client RSS for the state, delta (MB)",
            self.client_rss_mb_10k_workloads,
            1,
            Some(TARGET_CLIENT_RSS_MB),
        );
        row(
            "  absolute, synced (MB)",
            self.client_rss_mb_synced,
            1,
            None,
        );
        row(
            "  after malloc_trim (MB)",
            self.client_rss_mb_after_trim,
            1,
            None,
        );
        s.push_str(&format!(
            "\n{}, {} updates ({} timed out), {} s total\n",
            m.machine.summary(),
            self.update_samples,
            self.update_timeouts,
            m.total_secs
        ));
        s
    }
}
