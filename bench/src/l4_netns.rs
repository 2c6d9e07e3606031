//! `l4-netns`: the same pod pair on the network-namespace cluster of `zmesh-tests` (2 nodes,
//! real veths and routes, one ztunnel per node with eBPF redirection), measured twice in one
//! run: first with both pods out of the mesh (plain routed TCP), then enrolled (the harness
//! rewrites its local config; each ztunnel reloads it and the eBPF redirection captures the
//! pods), so the client's connections go client pod → ztunnel node 0 ═HBONE═▶ ztunnel node 1
//! → server pod. Client and server run inside the pod netns; the application code does not
//! change between the two measurements.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde::Serialize;
use zmesh_tests::{Cluster, PodSpec, command_in, in_netns};

use crate::client::Path;
use crate::mesh::{self, Sink};
use crate::phases;
use crate::sys;

pub const TARGET_RATIO: f64 = 0.55;
pub const TARGET_P99_ADDED_MS: f64 = 0.08;
pub const TARGET_CPU_S_PER_1K: f64 = 0.04;
pub const TARGET_RSS_MB: f64 = 12.0;
pub const ISTIO_RATIO: f64 = 0.42;
pub const ISTIO_P99_ADDED_MS: f64 = 0.1;
pub const ISTIO_CPU_S_PER_1K: f64 = 0.06;
pub const ISTIO_RSS_MB: f64 = 12.0;

#[derive(Args, Debug)]
pub struct NetnsArgs {
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seconds of the single-stream throughput measurement, per path.
    #[arg(long, default_value_t = 5.0)]
    throughput_secs: f64,
    /// Seconds of recorded fixed-rate request/response, per path.
    #[arg(long, default_value_t = 10.0)]
    rr_secs: f64,
    /// Unrecorded warm-up before each request/response measurement.
    #[arg(long, default_value_t = 1.0)]
    rr_warmup_secs: f64,
    /// Requests per second.
    #[arg(long, default_value_t = 1000.0)]
    rr_rate: f64,
    /// Request and response size, bytes.
    #[arg(long, default_value_t = 64)]
    rr_size: usize,
    /// Do not run `cargo build -p ztunnel` first.
    #[arg(long)]
    no_build: bool,
    /// ztunnel binary to run (default: `target/release-ztunnel/ztunnel` for a release bench),
    /// e.g. for an interleaved A/B of two builds.
    #[arg(long)]
    ztunnel: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize)]
pub struct NetnsReport {
    pub throughput_direct_gbps: Option<f64>,
    pub throughput_mesh_gbps: Option<f64>,
    /// mesh / direct, single stream.
    pub throughput_ratio: Option<f64>,
    /// ztunnel CPU seconds per GB during the single-stream mesh measurement.
    pub throughput_cpu_s_per_gb_node0: Option<f64>,
    pub throughput_cpu_s_per_gb_node1: Option<f64>,
    pub rr_p50_added_ms: Option<f64>,
    pub rr_p99_added_ms: Option<f64>,
    pub rr_direct_p50_ms: Option<f64>,
    pub rr_direct_p90_ms: Option<f64>,
    pub rr_direct_p99_ms: Option<f64>,
    pub rr_direct_p999_ms: Option<f64>,
    pub rr_direct_max_ms: Option<f64>,
    pub rr_mesh_p50_ms: Option<f64>,
    pub rr_mesh_p90_ms: Option<f64>,
    pub rr_mesh_p99_ms: Option<f64>,
    pub rr_mesh_p999_ms: Option<f64>,
    pub rr_mesh_max_ms: Option<f64>,
    pub rr_direct_behind_schedule: Option<usize>,
    pub rr_mesh_behind_schedule: Option<usize>,
    pub rr_mesh_achieved_rate_per_s: Option<f64>,
    /// Mean of the two ztunnels' CPU per 1000 requests during the recorded mesh rr phase.
    pub cpu_s_per_1k_req: Option<f64>,
    pub cpu_s_per_1k_req_node0: Option<f64>,
    pub cpu_s_per_1k_req_node1: Option<f64>,
    /// The same ztunnels while the pods were not enrolled (should be ~0).
    pub cpu_s_per_1k_req_direct_node0: Option<f64>,
    pub cpu_s_per_1k_req_direct_node1: Option<f64>,
    /// The echo server's CPU per 1000 requests (direct, mesh): one wake-up, one read and one
    /// write per request — the floor of any process on this machine; a ztunnel wakes twice.
    pub echo_server_cpu_s_per_1k_req_direct: Option<f64>,
    pub echo_server_cpu_s_per_1k_req_mesh: Option<f64>,
    /// Larger of the two ztunnels' peak VmRSS sampled during the mesh rr phase (1000 rps).
    pub rss_mb: Option<f64>,
    pub rss_mb_node0: Option<f64>,
    pub rss_mb_node1: Option<f64>,
    /// VmRSS right after the cluster came up (before any traffic).
    pub rss_mb_start_node0: Option<f64>,
    pub rss_mb_start_node1: Option<f64>,
    /// Seconds from publishing the enrolled config to both nodes reporting the pods captured.
    pub enroll_secs: Option<f64>,
    pub meta: NetnsMeta,
}

#[derive(Debug, Default, Serialize)]
pub struct NetnsMeta {
    pub benchmark: &'static str,
    #[serde(flatten)]
    pub machine: sys::Machine,
    pub bench_profile: &'static str,
    pub ztunnel_binary: String,
    pub client_ip: String,
    pub server_ip: String,
    pub throughput_secs: f64,
    pub throughput_bytes_direct: Option<u64>,
    pub throughput_bytes_mesh: Option<u64>,
    pub rr_secs: f64,
    pub rr_rate_per_s: f64,
    pub rr_size_bytes: usize,
    pub total_secs: f64,
}

pub(crate) fn round(v: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (v * m).round() / m
}

/// What one path's measurements give.
struct PathResult {
    tput: phases::Throughput,
    tput_cpu: [f64; 2],
    rr: phases::RequestResponse,
    rr_cpu: [f64; 2],
    /// The echo server's CPU seconds during the recorded rr phase.
    rr_sink_cpu: f64,
    rr_rss_peak: Vec<f64>,
}

fn cpu_pair(pids: [u32; 2]) -> [f64; 2] {
    [
        sys::cpu_seconds(pids[0]).unwrap_or(0.0),
        sys::cpu_seconds(pids[1]).unwrap_or(0.0),
    ]
}

/// Run the phases from a thread inside the client pod's netns (threads it spawns inherit it).
fn measure(
    client_ns: &str,
    path: Path,
    sink: &Sink,
    zt: [u32; 2],
    args: &NetnsArgs,
) -> Result<PathResult> {
    let (discard, echo) = (sink.discard, sink.echo);
    let sink_pid = sink.proc.pid();
    let sink_cpu = move || sys::cpu_seconds(sink_pid).unwrap_or(0.0);
    let tdur = Duration::from_secs_f64(args.throughput_secs);
    let (rate, rdur, warm, size) = (
        args.rr_rate,
        Duration::from_secs_f64(args.rr_secs),
        Duration::from_secs_f64(args.rr_warmup_secs),
        args.rr_size,
    );
    let out = in_netns(client_ns, move || {
        let run = || -> Result<PathResult> {
            let c0 = cpu_pair(zt);
            let tput = phases::throughput(path, discard, 1, tdur)?;
            let c1 = cpu_pair(zt);
            let mut rr_c0 = [0.0; 2];
            let mut rr_s0 = 0.0;
            let sampler = std::cell::RefCell::new(None);
            let rr = phases::request_response(path, echo, rate, rdur, warm, size, &mut || {
                rr_c0 = cpu_pair(zt);
                rr_s0 = sink_cpu();
                *sampler.borrow_mut() = Some(sys::RssSampler::start(zt.to_vec()));
            })?;
            let rr_c1 = cpu_pair(zt);
            let rr_sink_cpu = sink_cpu() - rr_s0;
            let rr_rss_peak = sampler
                .into_inner()
                .map(sys::RssSampler::finish)
                .unwrap_or_default();
            Ok(PathResult {
                tput,
                tput_cpu: [c1[0] - c0[0], c1[1] - c0[1]],
                rr,
                rr_cpu: [rr_c1[0] - rr_c0[0], rr_c1[1] - rr_c0[1]],
                rr_sink_cpu,
                rr_rss_peak,
            })
        };
        Ok(run())
    })
    .context("running the client in the pod netns")?;
    out.with_context(|| format!("measuring the {} path", path.name()))
}

pub fn run(args: NetnsArgs) -> Result<()> {
    let started = Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("l4-netns needs root (network namespaces, eBPF)");
    }
    // The harness runs `target/<profile>/ztunnel` next to this binary: build it first.
    let zt_bin = crate::l4::ztunnel_binary_for(args.ztunnel.as_ref(), args.no_build)?;
    let mut r = NetnsReport {
        meta: NetnsMeta {
            benchmark: "l4-netns",
            machine: sys::Machine::capture(),
            bench_profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            ztunnel_binary: zt_bin.display().to_string(),
            throughput_secs: args.throughput_secs,
            rr_secs: args.rr_secs,
            rr_rate_per_s: args.rr_rate,
            rr_size_bytes: args.rr_size,
            ..NetnsMeta::default()
        },
        ..NetnsReport::default()
    };
    eprintln!("creating the netns cluster (2 nodes, pods not enrolled)...");
    let mut cluster = Cluster::builder()
        .ztunnel_binary(zt_bin.clone())
        .nodes(2)
        .pod(PodSpec::new("client", "bench-client", 0, false))
        .pod(PodSpec::new("server", "bench-server", 1, false))
        .build()
        .context("creating the netns cluster")?;
    let zt = [
        cluster
            .ztunnel_pid(0)
            .ok_or_else(|| anyhow!("no ztunnel on node 0"))?,
        cluster
            .ztunnel_pid(1)
            .ok_or_else(|| anyhow!("no ztunnel on node 1"))?,
    ];
    let client_ip = IpAddr::V4(cluster.pod("client").ip);
    let server_ip = IpAddr::V4(cluster.pod("server").ip);
    r.meta.client_ip = client_ip.to_string();
    r.meta.server_ip = server_ip.to_string();
    r.rss_mb_start_node0 = sys::rss_mb(zt[0]).ok().map(|v| round(v, 1));
    r.rss_mb_start_node1 = sys::rss_mb(zt[1]).ok().map(|v| round(v, 1));
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let sink = mesh::start_sink_with(command_in(&cluster.pod_ns("server"), &exe)?, server_ip)
        .context("starting the server in the server pod")?;
    let client_ns = cluster.pod_ns("client");
    eprintln!(
        "ztunnel pids {} (node 0), {} (node 1); client {client_ip} -> server {} / {}",
        zt[0], zt[1], sink.discard, sink.echo
    );
    let busy0 = sys::machine_busy_seconds();
    let ours0 = sys::self_cpu_seconds()
        + zt.iter()
            .map(|p| sys::cpu_seconds(*p).unwrap_or(0.0))
            .sum::<f64>()
        + sys::cpu_seconds(sink.proc.pid()).unwrap_or(0.0);

    eprintln!("direct (not enrolled)...");
    let direct = measure(
        &client_ns,
        Path::Pod {
            src: client_ip,
            captured: false,
        },
        &sink,
        zt,
        &args,
    )?;

    eprintln!("enrolling both pods...");
    let t = Instant::now();
    cluster.update_mesh(|m| {
        for p in &mut m.pods {
            p.enrolled = true;
        }
    })?;
    cluster.wait_enrolled(0, Duration::from_secs(30))?;
    cluster.wait_enrolled(1, Duration::from_secs(30))?;
    r.enroll_secs = Some(round(t.elapsed().as_secs_f64(), 2));
    // The config reload and the eBPF maps are in place; one round trip checks the path works
    // and warms the HBONE connection pool like any first request would.
    std::thread::sleep(Duration::from_millis(300));

    eprintln!("mesh (enrolled, eBPF redirection through both ztunnels)...");
    let before = cpu_pair(zt);
    let captured = measure(
        &client_ns,
        Path::Pod {
            src: client_ip,
            captured: true,
        },
        &sink,
        zt,
        &args,
    )?;
    let used = cpu_pair(zt);
    if used[0] - before[0] < 0.05 || used[1] - before[1] < 0.05 {
        bail!(
            "the ztunnels used almost no CPU during the mesh measurement ({:.2} s, {:.2} s): \
             the traffic was not captured",
            used[0] - before[0],
            used[1] - before[1]
        );
    }

    // Figures.
    let tp = |t: &phases::Throughput| round(t.gbps, 2);
    r.throughput_direct_gbps = Some(tp(&direct.tput));
    r.throughput_mesh_gbps = Some(tp(&captured.tput));
    r.throughput_ratio = Some(round(captured.tput.gbps / direct.tput.gbps, 3));
    let gb = captured.tput.bytes as f64 / 1e9;
    r.throughput_cpu_s_per_gb_node0 = Some(round(captured.tput_cpu[0] / gb, 3));
    r.throughput_cpu_s_per_gb_node1 = Some(round(captured.tput_cpu[1] / gb, 3));
    r.meta.throughput_bytes_direct = Some(direct.tput.bytes);
    r.meta.throughput_bytes_mesh = Some(captured.tput.bytes);
    let (d, m) = (&direct.rr.latency, &captured.rr.latency);
    r.rr_direct_p50_ms = Some(round(d.p50_ms, 3));
    r.rr_direct_p90_ms = Some(round(d.p90_ms, 3));
    r.rr_direct_p99_ms = Some(round(d.p99_ms, 3));
    r.rr_direct_p999_ms = Some(round(d.p999_ms, 3));
    r.rr_direct_max_ms = Some(round(d.max_ms, 3));
    r.rr_mesh_p50_ms = Some(round(m.p50_ms, 3));
    r.rr_mesh_p90_ms = Some(round(m.p90_ms, 3));
    r.rr_mesh_p99_ms = Some(round(m.p99_ms, 3));
    r.rr_mesh_p999_ms = Some(round(m.p999_ms, 3));
    r.rr_mesh_max_ms = Some(round(m.max_ms, 3));
    r.rr_p50_added_ms = Some(round(m.p50_ms - d.p50_ms, 3));
    r.rr_p99_added_ms = Some(round(m.p99_ms - d.p99_ms, 3));
    r.rr_direct_behind_schedule = Some(direct.rr.behind_schedule);
    r.rr_mesh_behind_schedule = Some(captured.rr.behind_schedule);
    r.rr_mesh_achieved_rate_per_s = Some(round(captured.rr.achieved_rate, 1));
    let per_1k = |cpu: f64, n: usize| round(cpu * 1000.0 / n as f64, 4);
    let n = m.n;
    r.cpu_s_per_1k_req_node0 = Some(per_1k(captured.rr_cpu[0], n));
    r.cpu_s_per_1k_req_node1 = Some(per_1k(captured.rr_cpu[1], n));
    r.cpu_s_per_1k_req = Some(per_1k((captured.rr_cpu[0] + captured.rr_cpu[1]) / 2.0, n));
    r.cpu_s_per_1k_req_direct_node0 = Some(per_1k(direct.rr_cpu[0], d.n));
    r.cpu_s_per_1k_req_direct_node1 = Some(per_1k(direct.rr_cpu[1], d.n));
    r.echo_server_cpu_s_per_1k_req_direct = Some(per_1k(direct.rr_sink_cpu, d.n));
    r.echo_server_cpu_s_per_1k_req_mesh = Some(per_1k(captured.rr_sink_cpu, n));
    if let [a, b] = captured.rr_rss_peak.as_slice() {
        r.rss_mb_node0 = Some(round(*a, 1));
        r.rss_mb_node1 = Some(round(*b, 1));
        r.rss_mb = Some(round(a.max(*b), 1));
    }

    r.meta.machine.load_average_end = sys::load_average();
    let wall = started.elapsed().as_secs_f64();
    if let (Some(b0), Some(b1)) = (busy0, sys::machine_busy_seconds()) {
        let ours1 = sys::self_cpu_seconds()
            + zt.iter()
                .map(|p| sys::cpu_seconds(*p).unwrap_or(0.0))
                .sum::<f64>()
            + sys::cpu_seconds(sink.proc.pid()).unwrap_or(0.0);
        let window = started.elapsed().as_secs_f64();
        let other = (b1 - b0 - (ours1 - ours0)).max(0.0);
        r.meta.machine.other_processes_cpu_pct =
            Some(round(100.0 * other / (window * sys::cores() as f64), 0));
    }
    r.meta.total_secs = round(wall, 1);
    drop(sink);
    drop(cluster);

    crate::output::emit(&r.table(), &r, args.json.as_deref())
}

use crate::output::fmt_opt as f;

fn verdict(v: Option<f64>, ok: impl Fn(f64) -> bool) -> &'static str {
    match v {
        Some(x) if ok(x) => "met",
        Some(_) => "MISSED",
        None => "-",
    }
}

impl NetnsReport {
    pub fn table(&self) -> String {
        let m = &self.meta;
        let mut s = String::new();
        s.push_str(&format!(
            "{:<40}{:>9}{:>9}{:>13}  {:<18}{}\n",
            "metric", "direct", "mesh", "result", "target", "Istio ref"
        ));
        s.push_str(&format!(
            "{:<40}{:>9}{:>9}{:>13}  {:<18}{}\n",
            "throughput, 1 stream (Gbps)",
            f(self.throughput_direct_gbps, 2),
            f(self.throughput_mesh_gbps, 2),
            format!("ratio {}", f(self.throughput_ratio, 2)),
            format!(
                "{} >= {TARGET_RATIO}",
                verdict(self.throughput_ratio, |x| x >= TARGET_RATIO)
            ),
            ISTIO_RATIO
        ));
        s.push_str(&format!(
            "{:<40}{:>9}{:>9}\n",
            "ztunnel CPU s / GB (node0, node1)",
            f(self.throughput_cpu_s_per_gb_node0, 2),
            f(self.throughput_cpu_s_per_gb_node1, 2),
        ));
        s.push_str(&format!(
            "{:<40}{:>9}{:>9}{:>13}\n",
            format!("rr p50 @{}/s, {} B (ms)", m.rr_rate_per_s, m.rr_size_bytes),
            f(self.rr_direct_p50_ms, 3),
            f(self.rr_mesh_p50_ms, 3),
            format!("+{}", f(self.rr_p50_added_ms, 3)),
        ));
        s.push_str(&format!(
            "{:<40}{:>9}{:>9}{:>13}  {:<18}+{}\n",
            format!("rr p99 @{}/s, {} B (ms)", m.rr_rate_per_s, m.rr_size_bytes),
            f(self.rr_direct_p99_ms, 3),
            f(self.rr_mesh_p99_ms, 3),
            format!("+{}", f(self.rr_p99_added_ms, 3)),
            format!(
                "{} <= +{TARGET_P99_ADDED_MS}",
                verdict(self.rr_p99_added_ms, |x| x <= TARGET_P99_ADDED_MS)
            ),
            ISTIO_P99_ADDED_MS
        ));
        s.push_str(&format!(
            "{:<40}{:>9}{:>9}{:>13}  {:<18}{}\n",
            "ztunnel CPU s / 1000 req (node0, node1)",
            f(self.cpu_s_per_1k_req_node0, 3),
            f(self.cpu_s_per_1k_req_node1, 3),
            format!("mean {}", f(self.cpu_s_per_1k_req, 3)),
            format!(
                "{} <= {TARGET_CPU_S_PER_1K}",
                verdict(self.cpu_s_per_1k_req, |x| x <= TARGET_CPU_S_PER_1K)
            ),
            ISTIO_CPU_S_PER_1K
        ));
        s.push_str(&format!(
            "{:<40}{:>9}{:>9}   (1 wake-up per request; a ztunnel has 2)\n",
            "echo server CPU s / 1000 req",
            f(self.echo_server_cpu_s_per_1k_req_direct, 3),
            f(self.echo_server_cpu_s_per_1k_req_mesh, 3),
        ));
        s.push_str(&format!(
            "{:<40}{:>9}{:>9}{:>13}  {:<18}{}\n",
            "ztunnel RSS @1000 rps, MB (node0, node1)",
            f(self.rss_mb_node0, 1),
            f(self.rss_mb_node1, 1),
            format!("max {}", f(self.rss_mb, 1)),
            format!(
                "{} <= {TARGET_RSS_MB}",
                verdict(self.rss_mb, |x| x <= TARGET_RSS_MB)
            ),
            ISTIO_RSS_MB
        ));
        s.push_str(&format!(
            "{:<40}{:>9}{:>9}\n",
            "ztunnel RSS at start, MB (node0, node1)",
            f(self.rss_mb_start_node0, 1),
            f(self.rss_mb_start_node1, 1),
        ));
        s.push_str(&format!(
            "\n{}, enroll {} s, {} s total\n",
            m.machine.summary(),
            f(self.enroll_secs, 2),
            m.total_secs
        ));
        s
    }
}
