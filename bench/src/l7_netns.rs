//! `l7-netns`: HTTP request/response on the network-namespace cluster of `zmesh-tests`
//! (2 nodes, eBPF redirection, `zmesh-controller` feeding two ztunnels and a waypoint), the
//! same client and server measured twice in one run:
//!
//! - **L4**: namespace `bench` enrolled, no waypoint in use: client pod → ztunnel node 0
//!   ═HBONE═▶ ztunnel node 1 → server pod;
//! - **L7**: the namespace labelled `istio.io/use-waypoint: waypoint` (nothing restarts):
//!   client pod → ztunnel node 0 ═HBONE═▶ waypoint pod (node 1) ═HBONE═▶ ztunnel node 1 →
//!   server pod.
//!
//! Each path runs 1 KB POSTs answered by 1 KB (the `http-sink` echo) at a fixed rate on one
//! keep-alive connection, over HTTP/1.1 and over HTTP/2 (prior knowledge). Through the
//! waypoint a closed-loop phase then finds the maximum rate. Figures:
//!
//! - `rr_p99_added_ms_vs_l4`: L7 p99 − L4 p99 at the fixed rate (worse of HTTP/1.1, HTTP/2);
//! - `cpu_s_per_1k_req`: waypoint CPU seconds per 1000 requests at the fixed rate (worse of
//!   the two);
//! - `rss_mb`: the waypoint's peak VmRSS while serving the fixed rate (1000 rps by default);
//! - `rps_max_per_core`: requests the waypoint completes per CPU second of its own when
//!   driven flat out (closed loop, `--max-concurrency` in flight) — its ceiling per core
//!   (lower of the two protocols).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use zmesh_tests::{Cluster, PodSpec, ServiceSpec, USE_WAYPOINT, command_in, in_netns};

use crate::l4_netns::round;
use crate::mesh::{ChildGuard, spawn};
use crate::phases::{self, RequestResponse};
use crate::sys;

pub const TARGET_CPU_S_PER_1K: f64 = 0.12;
pub const TARGET_RSS_MB: f64 = 25.0;
pub const TARGET_P99_ADDED_MS: f64 = 0.5;
/// Istio's Envoy waypoint (DESIGN.md §8): 0.25 vCPU and 60 MB per 1000 rps.
pub const ENVOY_CPU_S_PER_1K: f64 = 0.25;
pub const ENVOY_RSS_MB: f64 = 60.0;

const NS: &str = "bench";
const WAYPOINT: &str = "waypoint";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 8080;
/// Response header of `http-sink`: did the request carry the `x-request-id` a waypoint adds?
const VIA_HEADER: &str = "x-via-waypoint";

#[derive(Args, Debug)]
pub struct L7Args {
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seconds of recorded fixed-rate request/response, per path and protocol.
    #[arg(long, default_value_t = 10.0)]
    rr_secs: f64,
    /// Unrecorded warm-up before each fixed-rate measurement.
    #[arg(long, default_value_t = 1.0)]
    rr_warmup_secs: f64,
    /// Requests per second of the fixed-rate phases.
    #[arg(long, default_value_t = 1000.0)]
    rr_rate: f64,
    /// Request and response body size, bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Seconds of the closed-loop maximum-rate phase, per protocol.
    #[arg(long, default_value_t = 5.0)]
    max_secs: f64,
    /// Requests in flight in the maximum-rate phase (HTTP/1.1: connections; HTTP/2: streams
    /// on one connection).
    #[arg(long, default_value_t = 16)]
    max_concurrency: usize,
    /// ztunnel binary to run (default: `target/release-ztunnel/ztunnel` for a release bench).
    #[arg(long)]
    ztunnel: Option<PathBuf>,
    /// waypoint binary to run (default: the one next to this binary).
    #[arg(long)]
    waypoint: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http1,
    Http2,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Http1 => "HTTP/1.1",
            Proto::Http2 => "HTTP/2",
        }
    }
}

/// One protocol's figures.
#[derive(Debug, Default, Serialize)]
pub struct ProtoReport {
    pub l4_p50_ms: Option<f64>,
    pub l4_p99_ms: Option<f64>,
    pub l7_p50_ms: Option<f64>,
    pub l7_p99_ms: Option<f64>,
    pub l7_p999_ms: Option<f64>,
    pub rr_p50_added_ms_vs_l4: Option<f64>,
    pub rr_p99_added_ms_vs_l4: Option<f64>,
    pub l4_behind_schedule: Option<usize>,
    pub l7_behind_schedule: Option<usize>,
    pub l7_achieved_rate_per_s: Option<f64>,
    /// Waypoint CPU seconds per 1000 requests at the fixed rate.
    pub cpu_s_per_1k_req: Option<f64>,
    /// Mean of the two ztunnels' CPU per 1000 requests, on each path.
    pub ztunnel_cpu_s_per_1k_req_l4: Option<f64>,
    pub ztunnel_cpu_s_per_1k_req_l7: Option<f64>,
    /// Waypoint peak VmRSS during the fixed-rate L7 phase.
    pub rss_mb: Option<f64>,
    /// Closed loop through the waypoint: requests per second achieved, and per CPU second
    /// of the waypoint.
    pub rps_max: Option<f64>,
    pub rps_max_per_core: Option<f64>,
    pub rps_max_waypoint_cpu_pct: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Targets {
    pub cpu_s_per_1k_req: f64,
    pub rss_mb: f64,
    pub rr_p99_added_ms_vs_l4: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Pass {
    pub cpu_s_per_1k_req: Option<bool>,
    pub rss_mb: Option<bool>,
    pub rr_p99_added_ms_vs_l4: Option<bool>,
}

#[derive(Debug, Default, Serialize)]
pub struct L7Report {
    /// Lower of HTTP/1.1 and HTTP/2.
    pub rps_max_per_core: Option<f64>,
    /// Higher of HTTP/1.1 and HTTP/2.
    pub rr_p99_added_ms_vs_l4: Option<f64>,
    /// Higher of HTTP/1.1 and HTTP/2.
    pub cpu_s_per_1k_req: Option<f64>,
    /// Waypoint peak RSS at the fixed rate (higher of the two protocols).
    pub rss_mb: Option<f64>,
    pub targets: Targets,
    pub pass: Pass,
    pub http1: ProtoReport,
    pub http2: ProtoReport,
    /// Waypoint VmRSS once synced, before any traffic.
    pub rss_mb_waypoint_start: Option<f64>,
    pub meta: L7Meta,
}

#[derive(Debug, Default, Serialize)]
pub struct L7Meta {
    pub benchmark: &'static str,
    #[serde(flatten)]
    pub machine: sys::Machine,
    pub bench_profile: &'static str,
    pub ztunnel_binary: String,
    pub waypoint_binary: String,
    pub rr_secs: f64,
    pub rr_rate_per_s: f64,
    pub size_bytes: usize,
    pub max_secs: f64,
    pub max_concurrency: usize,
    /// Seconds from labelling the namespace to the first request through the waypoint.
    pub switch_to_waypoint_secs: Option<f64>,
    pub total_secs: f64,
}

/// A blocking HTTP client on one connection (its own current-thread runtime, so it lives in
/// the netns of the thread that created it).
struct Client {
    rt: tokio::runtime::Runtime,
    send: Sender,
    body: Bytes,
    uri: String,
    /// `x-via-waypoint` of the last response.
    via: bool,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn request(&mut self, uri: &str, body: Bytes) -> io::Result<(usize, bool)> {
        let req = hyper::Request::post(uri)
            .header("host", format!("echo.{NS}:{PORT}"))
            .body(Full::new(body))
            .map_err(io::Error::other)?;
        let resp = match self {
            Sender::H1(s) => {
                s.ready().await.map_err(io::Error::other)?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await.map_err(io::Error::other)?;
                s.send_request(req).await
            }
        }
        .map_err(io::Error::other)?;
        if resp.status() != 200 {
            return Err(io::Error::other(format!("status {}", resp.status())));
        }
        let via = resp.headers().contains_key(VIA_HEADER);
        let body = resp.into_body().collect().await.map_err(io::Error::other)?;
        Ok((body.to_bytes().len(), via))
    }
}

async fn connect(proto: Proto, dst: SocketAddr) -> io::Result<Sender> {
    let s = tokio::net::TcpStream::connect(dst).await?;
    s.set_nodelay(true)?;
    let io = TokioIo::new(s);
    Ok(match proto {
        Proto::Http1 => {
            let (send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(io::Error::other)?;
            tokio::spawn(conn);
            Sender::H1(send)
        }
        Proto::Http2 => {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(io::Error::other)?;
            tokio::spawn(conn);
            Sender::H2(send)
        }
    })
}

impl Client {
    fn connect(proto: Proto, dst: SocketAddr, size: usize) -> io::Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let send = rt.block_on(connect(proto, dst))?;
        Ok(Client {
            rt,
            send,
            body: Bytes::from(vec![0x5a; size]),
            uri: format!("http://{dst}/echo"),
            via: false,
        })
    }

    fn round_trip(&mut self) -> io::Result<()> {
        let (n, via) = self
            .rt
            .block_on(self.send.request(&self.uri, self.body.clone()))?;
        if n != self.body.len() {
            return Err(io::Error::other(format!(
                "response of {n} bytes, expected {}",
                self.body.len()
            )));
        }
        self.via = via;
        Ok(())
    }
}

/// Fixed-rate request/response from the client pod; `pids` (waypoint first) get their CPU
/// snapshotted when the recorded part starts and ends, and their RSS sampled meanwhile.
struct Measured {
    rr: RequestResponse,
    cpu: Vec<f64>,
    rss_peak: Vec<f64>,
}

fn cpu_of(pids: &[u32]) -> Vec<f64> {
    pids.iter()
        .map(|p| sys::cpu_seconds(*p).unwrap_or(0.0))
        .collect()
}

fn fixed_rate(
    client_ns: &str,
    proto: Proto,
    via_waypoint: bool,
    pids: Vec<u32>,
    args: &L7Args,
) -> Result<Measured> {
    let (rate, dur, warm, size) = (
        args.rr_rate,
        Duration::from_secs_f64(args.rr_secs),
        Duration::from_secs_f64(args.rr_warmup_secs),
        args.size,
    );
    let dst = SocketAddr::from((VIP, PORT));
    let what = format!(
        "{} {}",
        if via_waypoint { "L7" } else { "L4" },
        proto.name()
    );
    in_netns(client_ns, move || {
        let run = || -> Result<Measured> {
            let mut c = Client::connect(proto, dst, size)
                .with_context(|| format!("connecting the {what} client"))?;
            let mut c0 = Vec::new();
            let mut sampler = None;
            let rr = phases::request_response_with(
                &what,
                rate,
                dur,
                warm,
                &mut || {
                    c0 = cpu_of(&pids);
                    sampler = Some(sys::RssSampler::start(pids.clone()));
                },
                &mut || c.round_trip(),
            )?;
            let c1 = cpu_of(&pids);
            if c.via != via_waypoint {
                bail!(
                    "{what}: the server saw the request {} the waypoint",
                    if c.via { "through" } else { "bypass" }
                );
            }
            Ok(Measured {
                rr,
                cpu: c1.iter().zip(&c0).map(|(a, b)| a - b).collect(),
                rss_peak: sampler.map(sys::RssSampler::finish).unwrap_or_default(),
            })
        };
        Ok(run())
    })
    .context("running the client in the pod netns")?
}

/// Closed loop through the waypoint for `secs`: `(requests completed, seconds)`.
fn max_rate(client_ns: &str, proto: Proto, args: &L7Args) -> Result<(u64, f64)> {
    let (secs, conc, size) = (args.max_secs, args.max_concurrency, args.size);
    let dst = SocketAddr::from((VIP, PORT));
    in_netns(client_ns, move || {
        let run = || -> Result<(u64, f64)> {
            // Two client threads' worth of work on a multi-threaded runtime: the client must
            // not be what limits the rate (it shares the machine with the proxies).
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let h2 = match proto {
                    Proto::Http2 => Some(connect(proto, dst).await?),
                    Proto::Http1 => None,
                };
                let body = Bytes::from(vec![0x5a; size]);
                let uri = format!("http://{dst}/echo");
                let started = Instant::now();
                let deadline = started + Duration::from_secs_f64(secs);
                let mut tasks = Vec::new();
                for _ in 0..conc {
                    let mut send = match &h2 {
                        Some(Sender::H2(s)) => Sender::H2(s.clone()),
                        _ => connect(proto, dst).await?,
                    };
                    let (body, uri) = (body.clone(), uri.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut n = 0u64;
                        while Instant::now() < deadline {
                            send.request(&uri, body.clone()).await?;
                            n += 1;
                        }
                        Ok::<_, io::Error>(n)
                    }));
                }
                let mut total = 0;
                for t in tasks {
                    total += t.await.map_err(io::Error::other)??;
                }
                Ok((total, started.elapsed().as_secs_f64()))
            })
        };
        Ok(run())
    })
    .context("running the client in the pod netns")?
}

/// Start `http-sink` (this binary) in the server pod.
fn start_server(cluster: &Cluster, ip: IpAddr) -> Result<ChildGuard> {
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let mut cmd = command_in(&cluster.pod_ns("server"), exe)?;
    cmd.args(["http-sink", "--ip", &ip.to_string()])
        .args(["--port", &PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let guard = ChildGuard::new("http-sink", spawn(cmd, "http-sink")?);
    let addr = SocketAddr::new(ip, PORT);
    let deadline = Instant::now() + Duration::from_secs(10);
    let ns = cluster.pod_ns("server");
    loop {
        let up = in_netns(&ns, move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
        });
        if up.is_ok() {
            return Ok(guard);
        }
        if Instant::now() >= deadline {
            bail!("http-sink did not listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run(args: L7Args) -> Result<()> {
    let started = Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("l7-netns needs root (network namespaces, eBPF)");
    }
    // Under `cargo run`, builds ztunnel's shipping profile first; the waypoint and the
    // controller are the ones next to this binary.
    let zt_bin = crate::l4::ztunnel_binary_for(args.ztunnel.as_ref(), false)?;
    let waypoint = match &args.waypoint {
        Some(w) if !w.is_file() => bail!("--waypoint {}: no such file", w.display()),
        Some(w) => {
            Some(std::fs::canonicalize(w).with_context(|| format!("--waypoint {}", w.display()))?)
        }
        None => None,
    };
    let mut r = L7Report {
        targets: Targets {
            cpu_s_per_1k_req: TARGET_CPU_S_PER_1K,
            rss_mb: TARGET_RSS_MB,
            rr_p99_added_ms_vs_l4: TARGET_P99_ADDED_MS,
        },
        meta: L7Meta {
            benchmark: "l7-netns",
            machine: sys::Machine::capture(),
            bench_profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            rr_secs: args.rr_secs,
            rr_rate_per_s: args.rr_rate,
            size_bytes: args.size,
            max_secs: args.max_secs,
            max_concurrency: args.max_concurrency,
            ztunnel_binary: zt_bin.display().to_string(),
            waypoint_binary: match &waypoint {
                Some(w) => w.display().to_string(),
                None => zmesh_tests::target_bin("waypoint")?.display().to_string(),
            },
            ..L7Meta::default()
        },
        ..L7Report::default()
    };
    eprintln!("creating the netns cluster (2 nodes, controller, waypoint not in use yet)...");
    let mut builder = Cluster::builder().ztunnel_binary(zt_bin);
    if let Some(w) = waypoint {
        builder = builder.waypoint_binary(w);
    }
    let mut cluster = builder
        .controller()
        .nodes(2)
        .pod(PodSpec::new("client", NS, 0, true))
        .pod(PodSpec::new("server", NS, 1, true))
        .service(ServiceSpec {
            name: "echo".into(),
            namespace: NS.into(),
            vip: VIP,
            port: PORT,
            target_port: PORT,
            pods: vec!["server".into()],
        })
        .waypoint(WAYPOINT, NS, 1)
        .build()
        .context("creating the netns cluster")?;
    let pid = |p: Option<u32>, what: &str| p.ok_or_else(|| anyhow!("no {what} running"));
    let wp = pid(cluster.waypoint_pid(WAYPOINT), "waypoint")?;
    let zt = [
        pid(cluster.ztunnel_pid(0), "ztunnel on node 0")?,
        pid(cluster.ztunnel_pid(1), "ztunnel on node 1")?,
    ];
    r.rss_mb_waypoint_start = sys::rss_mb(wp).ok().map(|v| round(v, 1));
    let server = start_server(&cluster, IpAddr::V4(cluster.pod("server").ip))?;
    let client_ns = cluster.pod_ns("client");
    let pids = vec![wp, zt[0], zt[1]];
    let busy0 = sys::machine_busy_seconds();
    let ours = |pids: &[u32]| {
        sys::self_cpu_seconds()
            + cpu_of(pids).iter().sum::<f64>()
            + sys::cpu_seconds(server.pid()).unwrap_or(0.0)
    };
    let ours0 = ours(&pids);

    let mut l4 = Vec::new();
    for proto in [Proto::Http1, Proto::Http2] {
        eprintln!("L4 path, {}...", proto.name());
        l4.push(fixed_rate(&client_ns, proto, false, pids.clone(), &args)?);
    }

    eprintln!("labelling namespace {NS} {USE_WAYPOINT}={WAYPOINT}...");
    let t = Instant::now();
    cluster.set_namespace_label(NS, USE_WAYPOINT, Some(WAYPOINT))?;
    loop {
        let ns = client_ns.clone();
        let via = in_netns(&ns, move || {
            let mut c = Client::connect(Proto::Http1, SocketAddr::from((VIP, PORT)), 16)?;
            c.round_trip()?;
            Ok(c.via)
        });
        if via.is_ok_and(|v| v) {
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!(
                "traffic did not go through the waypoint 30 s after labelling the namespace\n{}",
                cluster.waypoint_log(WAYPOINT)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    r.meta.switch_to_waypoint_secs = Some(round(t.elapsed().as_secs_f64(), 2));

    for (i, proto) in [Proto::Http1, Proto::Http2].into_iter().enumerate() {
        eprintln!("L7 path (through the waypoint), {}...", proto.name());
        let l7 = fixed_rate(&client_ns, proto, true, pids.clone(), &args)?;
        eprintln!("L7 path, {}, closed loop...", proto.name());
        let c0 = sys::cpu_seconds(wp).unwrap_or(0.0);
        let (n, secs) = max_rate(&client_ns, proto, &args)?;
        let wp_cpu = sys::cpu_seconds(wp).unwrap_or(0.0) - c0;
        let pr = if i == 0 { &mut r.http1 } else { &mut r.http2 };
        let (a, b) = (&l4[i].rr.latency, &l7.rr.latency);
        pr.l4_p50_ms = Some(round(a.p50_ms, 3));
        pr.l4_p99_ms = Some(round(a.p99_ms, 3));
        pr.l7_p50_ms = Some(round(b.p50_ms, 3));
        pr.l7_p99_ms = Some(round(b.p99_ms, 3));
        pr.l7_p999_ms = Some(round(b.p999_ms, 3));
        pr.rr_p50_added_ms_vs_l4 = Some(round(b.p50_ms - a.p50_ms, 3));
        pr.rr_p99_added_ms_vs_l4 = Some(round(b.p99_ms - a.p99_ms, 3));
        pr.l4_behind_schedule = Some(l4[i].rr.behind_schedule);
        pr.l7_behind_schedule = Some(l7.rr.behind_schedule);
        pr.l7_achieved_rate_per_s = Some(round(l7.rr.achieved_rate, 1));
        let per_1k = |cpu: f64, n: usize| round(cpu * 1000.0 / n as f64, 4);
        pr.cpu_s_per_1k_req = Some(per_1k(l7.cpu[0], b.n));
        pr.ztunnel_cpu_s_per_1k_req_l4 = Some(per_1k((l4[i].cpu[1] + l4[i].cpu[2]) / 2.0, a.n));
        pr.ztunnel_cpu_s_per_1k_req_l7 = Some(per_1k((l7.cpu[1] + l7.cpu[2]) / 2.0, b.n));
        pr.rss_mb = l7.rss_peak.first().map(|v| round(*v, 1));
        pr.rps_max = Some(round(n as f64 / secs, 0));
        if wp_cpu > 0.0 {
            pr.rps_max_per_core = Some(round(n as f64 / wp_cpu, 0));
            pr.rps_max_waypoint_cpu_pct = Some(round(100.0 * wp_cpu / secs, 0));
        }
    }

    let both = |f: fn(&ProtoReport) -> Option<f64>, pick: fn(f64, f64) -> f64| match (
        f(&r.http1),
        f(&r.http2),
    ) {
        (Some(a), Some(b)) => Some(pick(a, b)),
        (a, b) => a.or(b),
    };
    r.rps_max_per_core = both(|p| p.rps_max_per_core, f64::min);
    r.rr_p99_added_ms_vs_l4 = both(|p| p.rr_p99_added_ms_vs_l4, f64::max);
    r.cpu_s_per_1k_req = both(|p| p.cpu_s_per_1k_req, f64::max);
    r.rss_mb = both(|p| p.rss_mb, f64::max);
    r.pass = Pass {
        cpu_s_per_1k_req: r.cpu_s_per_1k_req.map(|v| v <= TARGET_CPU_S_PER_1K),
        rss_mb: r.rss_mb.map(|v| v <= TARGET_RSS_MB),
        rr_p99_added_ms_vs_l4: r.rr_p99_added_ms_vs_l4.map(|v| v <= TARGET_P99_ADDED_MS),
    };

    r.meta.machine.load_average_end = sys::load_average();
    if let (Some(b0), Some(b1)) = (busy0, sys::machine_busy_seconds()) {
        let window = started.elapsed().as_secs_f64();
        let other = (b1 - b0 - (ours(&pids) - ours0)).max(0.0);
        r.meta.machine.other_processes_cpu_pct =
            Some(round(100.0 * other / (window * sys::cores() as f64), 0));
    }
    r.meta.total_secs = round(started.elapsed().as_secs_f64(), 1);
    drop(server);
    drop(cluster);

    crate::output::emit(&r.table(), &r, args.json.as_deref())
}

use crate::output::fmt_opt as f;

fn verdict(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "-",
    }
}

impl L7Report {
    pub fn table(&self) -> String {
        let m = &self.meta;
        let (a, b) = (&self.http1, &self.http2);
        let mut s = format!(
            "{:<44}{:>12}{:>12}  {:<22}{}\n",
            "metric", "HTTP/1.1", "HTTP/2", "target", "Envoy ref"
        );
        let mut row = |name: String, x: String, y: String, target: String, envoy: String| {
            s.push_str(&format!("{name:<44}{x:>12}{y:>12}  {target:<22}{envoy}\n"));
        };
        let rate = format!("@{}/s, {} B", m.rr_rate_per_s, m.size_bytes);
        row(
            format!("L4 p50 / p99 {rate} (ms)"),
            format!("{}/{}", f(a.l4_p50_ms, 2), f(a.l4_p99_ms, 2)),
            format!("{}/{}", f(b.l4_p50_ms, 2), f(b.l4_p99_ms, 2)),
            String::new(),
            String::new(),
        );
        row(
            format!("L7 p50 / p99 {rate} (ms)"),
            format!("{}/{}", f(a.l7_p50_ms, 2), f(a.l7_p99_ms, 2)),
            format!("{}/{}", f(b.l7_p50_ms, 2), f(b.l7_p99_ms, 2)),
            String::new(),
            String::new(),
        );
        row(
            "p99 added by the waypoint (ms)".into(),
            f(a.rr_p99_added_ms_vs_l4, 3),
            f(b.rr_p99_added_ms_vs_l4, 3),
            format!(
                "{} <= {TARGET_P99_ADDED_MS}",
                verdict(self.pass.rr_p99_added_ms_vs_l4)
            ),
            String::new(),
        );
        row(
            "waypoint CPU s / 1000 req".into(),
            f(a.cpu_s_per_1k_req, 3),
            f(b.cpu_s_per_1k_req, 3),
            format!(
                "{} <= {TARGET_CPU_S_PER_1K}",
                verdict(self.pass.cpu_s_per_1k_req)
            ),
            ENVOY_CPU_S_PER_1K.to_string(),
        );
        row(
            "ztunnel CPU s / 1000 req, L4 / L7 path".into(),
            format!(
                "{}/{}",
                f(a.ztunnel_cpu_s_per_1k_req_l4, 3),
                f(a.ztunnel_cpu_s_per_1k_req_l7, 3)
            ),
            format!(
                "{}/{}",
                f(b.ztunnel_cpu_s_per_1k_req_l4, 3),
                f(b.ztunnel_cpu_s_per_1k_req_l7, 3)
            ),
            String::new(),
            String::new(),
        );
        row(
            format!("waypoint RSS @{}/s (MB)", m.rr_rate_per_s),
            f(a.rss_mb, 1),
            f(b.rss_mb, 1),
            format!("{} <= {TARGET_RSS_MB}", verdict(self.pass.rss_mb)),
            ENVOY_RSS_MB.to_string(),
        );
        row(
            format!("max rate, {} in flight (req/s)", m.max_concurrency),
            f(a.rps_max, 0),
            f(b.rps_max, 0),
            String::new(),
            String::new(),
        );
        row(
            "max req / waypoint CPU second (per core)".into(),
            f(a.rps_max_per_core, 0),
            f(b.rps_max_per_core, 0),
            String::new(),
            String::new(),
        );
        s.push_str(&format!(
            "\nwaypoint RSS at start {} MB; switch to the waypoint {} s; {}, {} s total\n",
            f(self.rss_mb_waypoint_start, 1),
            f(m.switch_to_waypoint_secs, 2),
            m.machine.summary(),
            m.total_secs
        ));
        s
    }
}

/// `zmesh-bench http-sink`: HTTP/1.1 and HTTP/2 (prior knowledge) server answering every
/// request with its own body; `x-via-waypoint: 1` when it carried an `x-request-id` (added by
/// the waypoint, never by ztunnel or the bench client).
pub fn run_http_sink(ip: IpAddr, port: u16) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the http-sink runtime")?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(SocketAddr::new(ip, port))
            .await
            .with_context(|| format!("binding {ip}:{port}"))?;
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let via = req.headers().contains_key("x-request-id");
                        let body = req.into_body().collect().await?.to_bytes();
                        let mut resp = hyper::Response::new(Full::new(body));
                        if via {
                            resp.headers_mut()
                                .insert(VIA_HEADER, http::HeaderValue::from_static("1"));
                        }
                        Ok::<_, hyper::Error>(resp)
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    })
}
