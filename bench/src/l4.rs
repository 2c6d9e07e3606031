//! `l4-loopback`: direct loopback TCP vs the HBONE path through two ztunnel processes, side by
//! side in one run. Phases (each runs direct, then HBONE, against the same sink):
//! 1. throughput, 1 stream; 2. throughput, N streams; 3. fixed-rate request/response with
//!    ztunnel CPU; 4. RSS with 10k idle proxied connections; 5. new-connection rate (HBONE
//!    first, then direct).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::client::Path;
use crate::mesh::{self, CLIENT_IP, Mesh, MeshOptions, Sink, WorkDir};
use crate::phases;
use crate::report::{L4Report, Meta, ThroughputBytes};
use crate::sys;

const ALL_PHASES: &[&str] = &["throughput", "rr", "connect", "idle"];

#[derive(Args, Debug)]
pub struct L4Args {
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seconds per throughput measurement (4 of them: direct/HBONE × 1/N streams).
    #[arg(long, default_value_t = 5.0)]
    throughput_secs: f64,
    /// Concurrent streams for the multi-stream throughput measurement.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Seconds of recorded fixed-rate request/response, per path.
    #[arg(long, default_value_t = 10.0)]
    rr_secs: f64,
    /// Unrecorded warm-up before each request/response measurement.
    #[arg(long, default_value_t = 1.0)]
    rr_warmup_secs: f64,
    /// Requests per second of the request/response phase.
    #[arg(long, default_value_t = 1000.0)]
    rr_rate: f64,
    /// Request and response size in bytes.
    #[arg(long, default_value_t = 1024)]
    rr_size: usize,
    /// Seconds of the new-connection-rate measurement, per path.
    #[arg(long, default_value_t = 3.0)]
    connect_secs: f64,
    /// Concurrent clients opening connections.
    #[arg(long, default_value_t = 16)]
    connect_concurrency: usize,
    /// Idle proxied connections for the RSS measurement.
    #[arg(long, default_value_t = 10_000)]
    idle_conns: usize,
    /// Seconds to let the idle connections settle before reading RSS.
    #[arg(long, default_value_t = 2.0)]
    idle_settle_secs: f64,
    /// Phases to run, comma-separated: throughput, rr, connect, idle.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "throughput,rr,connect,idle"
    )]
    phases: Vec<String>,
    /// ztunnel binary [default: `ztunnel` next to this binary, built first when run by cargo].
    #[arg(long)]
    ztunnel: Option<PathBuf>,
    /// Do not run `cargo build -p ztunnel` before starting.
    #[arg(long)]
    no_build: bool,
    /// `RUST_LOG` for the ztunnels (access logs are on at `info`, as in Istio).
    #[arg(long, default_value = "info")]
    ztunnel_log: String,
    /// Record `perf record -g` profiles of both ztunnels during the HBONE single-stream
    /// throughput measurement into this directory (results of that run are perturbed).
    #[arg(long)]
    perf_dir: Option<PathBuf>,
    /// Extra environment variable for both ztunnels, KEY=VALUE (repeatable), e.g.
    /// `GLIBC_TUNABLES=glibc.malloc.trim_threshold=67108864`.
    #[arg(long = "ztunnel-env", value_parser = parse_env)]
    ztunnel_env: Vec<(String, String)>,
    /// Keep the work directory (CA, config, ztunnel logs) after the run.
    #[arg(long)]
    keep_logs: bool,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// Cargo profile of ztunnel's shipping build (Cargo.toml, Dockerfile).
pub const ZTUNNEL_PROFILE: &str = "release-ztunnel";

/// The directory this binary runs from and the cargo profile that built it.
fn own_profile() -> Result<(PathBuf, String)> {
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let dir = exe
        .parent()
        .context("the bench binary has no parent directory")?
        .to_path_buf();
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(p) => p.to_string(),
        None => "release".to_string(),
    };
    Ok((dir, profile))
}

/// The ztunnel binary to run; built with the bench's own profile when run through cargo.
fn ztunnel_binary(args: &L4Args) -> Result<PathBuf> {
    ztunnel_binary_for(args.ztunnel.as_ref(), args.no_build)
}

/// `explicit`, else `target/<profile>/ztunnel`, built first under `cargo run` unless
/// `no_build`. The profile is the bench's own, except that a `release` bench measures
/// ztunnel's shipping build, the `release-ztunnel` profile (size-optimized, see Cargo.toml).
pub fn ztunnel_binary_for(explicit: Option<&PathBuf>, no_build: bool) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("--ztunnel {}: no such file", p.display());
        }
        // Absolute: the binary is started from other working directories (netns helpers).
        return std::fs::canonicalize(p).with_context(|| format!("--ztunnel {}", p.display()));
    }
    let (own_dir, own) = own_profile()?;
    let (dir, profile) = if own == "release" {
        let target = own_dir
            .parent()
            .context("the bench binary's target directory has no parent")?;
        (target.join(ZTUNNEL_PROFILE), ZTUNNEL_PROFILE.to_string())
    } else {
        (own_dir, own)
    };
    let bin = dir.join("ztunnel");
    if !no_build && let Ok(cargo) = std::env::var("CARGO") {
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
        eprintln!("building ztunnel ({profile}) ...");
        let status = Command::new(cargo)
            .args(["build", "-p", "ztunnel", "--profile", &profile])
            .arg("--manifest-path")
            .arg(manifest)
            .status()
            .context("running cargo build -p ztunnel")?;
        if !status.success() {
            bail!("cargo build -p ztunnel --profile {profile} failed ({status})");
        }
    }
    if !bin.is_file() {
        bail!(
            "{} not found: build it with `cargo build --profile {profile} -p ztunnel`, run the bench \
             through `cargo run`, or pass --ztunnel PATH",
            bin.display()
        );
    }
    if profile == "dev" {
        eprintln!("warning: the bench and ztunnel are debug builds; numbers are meaningless");
    }
    Ok(bin)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(h), Some(d)) if d > 0.0 => Some(h / d),
        _ => None,
    }
}

fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? - b?)
}

/// Pause between measurements so the previous one's tail (closing sockets, freed buffers)
/// does not overlap the next.
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

pub fn run(args: L4Args) -> Result<()> {
    let started = Instant::now();
    for p in &args.phases {
        if !ALL_PHASES.contains(&p.as_str()) {
            bail!("unknown phase {p:?}; known: {}", ALL_PHASES.join(", "));
        }
    }
    if args.streams == 0 || args.connect_concurrency == 0 || args.rr_rate <= 0.0 {
        bail!("--streams, --connect-concurrency and --rr-rate must be positive");
    }
    let phase = |name: &str| args.phases.iter().any(|p| p == name);
    let fd_limit = sys::raise_fd_limit().ok();
    let mut idle_conns = args.idle_conns;
    if let Some(limit) = fd_limit {
        // The bench holds one descriptor per idle connection, plus a few.
        let max = (limit as usize).saturating_sub(256);
        if phase("idle") && idle_conns > max {
            eprintln!(
                "warning: fd limit {limit}: opening {max} idle connections instead of {idle_conns}"
            );
            idle_conns = max;
        }
    }
    let zt_bin = ztunnel_binary(&args)?;
    let mut r = L4Report {
        meta: Meta {
            benchmark: "l4-loopback",
            machine: sys::Machine::capture(),
            fd_limit,
            ztunnel_binary: zt_bin.display().to_string(),
            ztunnel_log_level: args.ztunnel_log.clone(),
            ztunnel_env: args
                .ztunnel_env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            bench_profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            throughput_secs: args.throughput_secs,
            streams: args.streams,
            rr_secs: args.rr_secs,
            rr_warmup_secs: args.rr_warmup_secs,
            rr_rate_per_s: args.rr_rate,
            rr_size_bytes: args.rr_size,
            connect_secs: args.connect_secs,
            connect_concurrency: args.connect_concurrency,
            idle_conns,
            phases: args.phases.clone(),
            ..Meta::default()
        },
        ..L4Report::default()
    };

    wait_for_time_wait();
    let dir = WorkDir::create(args.keep_logs)?;
    let sink = mesh::start_sink()?;
    let mesh = Mesh::start(&MeshOptions {
        ztunnel: &zt_bin,
        dir: &dir.path,
        log_level: &args.ztunnel_log,
        env: &args.ztunnel_env,
    })?;
    let busy_start = sys::machine_busy_seconds();
    let ours_start = ours_cpu(&mesh, &sink);
    eprintln!(
        "ztunnel A pid {}, ztunnel B pid {}, sink pid {}; work dir {}",
        mesh.a.pid(),
        mesh.b.pid(),
        sink.proc.pid(),
        dir.path.display()
    );
    let result = measure(&args, idle_conns, &sink, &mesh, &mut r);
    if let Err(e) = result {
        // Keep the logs that explain the failure.
        let mut dir = dir;
        dir.keep = true;
        return Err(e.context(format!(
            "ztunnel logs: {} and {}",
            mesh.a.log.display(),
            mesh.b.log.display()
        )));
    }
    r.meta.machine.load_average_end = sys::load_average();
    // CPU the rest of the machine (other users' builds...) used while we measured: a noisy
    // neighbour explains outliers better than any statistic.
    if let (Some(b0), Some(b1)) = (busy_start, sys::machine_busy_seconds()) {
        let ours = ours_cpu(&mesh, &sink) - ours_start;
        let wall = started.elapsed().as_secs_f64();
        r.meta.machine.other_processes_cpu_pct = Some(
            ((b1 - b0 - ours) / (wall * r.meta.machine.cores as f64) * 100.0).clamp(0.0, 100.0),
        );
    }
    r.meta.total_secs = started.elapsed().as_secs_f64();
    drop(mesh);
    drop(sink);

    crate::output::emit(&r.table(), &r, args.json.as_deref())
}

fn measure(
    args: &L4Args,
    idle_conns: usize,
    sink: &Sink,
    mesh: &Mesh,
    r: &mut L4Report,
) -> Result<()> {
    let hbone = Path::Hbone {
        socks: mesh.a.socks5,
    };
    let (pa, pb) = (mesh.a.pid(), mesh.b.pid());
    let phase = |name: &str| args.phases.iter().any(|p| p == name);
    let timed = |r: &mut L4Report, name: &str, t: Instant| {
        r.meta
            .phase_secs
            .push((name.to_string(), t.elapsed().as_secs_f64()))
    };
    // The very first HBONE connection pays for certificates and the TLS/HTTP/2 handshake;
    // every measurement below runs over the pooled connection, as steady-state traffic does.
    let rss_start = (sys::rss_mb(pa)?, sys::rss_mb(pb)?);
    let t = Instant::now();
    phases::connect_rate(hbone, sink.echo, 1, Duration::from_millis(200))
        .and_then(|c| match c.first_error {
            Some(e) if c.ok == 0 => bail!("{e}"),
            _ => Ok(()),
        })
        .context("warm-up connection through the mesh")?;
    timed(r, "warmup", t);
    let mut perf_data = None;

    if phase("throughput") {
        let t = Instant::now();
        let dur = Duration::from_secs_f64(args.throughput_secs);
        let d1 = phases::throughput(Path::Direct, sink.discard, 1, dur)?;
        settle();
        let perf = match &args.perf_dir {
            Some(d) => Some(start_perf(d, &[("a", pa), ("b", pb)], dur)?),
            None => None,
        };
        let cpu0 = (sys::cpu_seconds(pa)?, sys::cpu_seconds(pb)?);
        let h1 = phases::throughput(hbone, sink.discard, 1, dur);
        let cpu1 = (sys::cpu_seconds(pa)?, sys::cpu_seconds(pb)?);
        if let Some((children, files)) = perf {
            for mut c in children {
                let _ = c.wait();
            }
            perf_data = Some(files);
        }
        let h1 = h1?;
        // CPU per byte is what the proxy costs; unlike Gbps it barely moves when other
        // processes compete for the cores.
        let gb = h1.bytes as f64 / 1e9;
        r.throughput_cpu_s_per_gb_a = Some((cpu1.0 - cpu0.0) / gb);
        r.throughput_cpu_s_per_gb_b = Some((cpu1.1 - cpu0.1) / gb);
        settle();
        let dn = phases::throughput(Path::Direct, sink.discard, args.streams, dur)?;
        settle();
        let hn = phases::throughput(hbone, sink.discard, args.streams, dur)?;
        r.throughput_direct_gbps = Some(d1.gbps);
        r.throughput_hbone_gbps = Some(h1.gbps);
        r.throughput_ratio = ratio(Some(h1.gbps), Some(d1.gbps));
        r.throughput_direct_gbps_8_streams = Some(dn.gbps);
        r.throughput_hbone_gbps_8_streams = Some(hn.gbps);
        r.throughput_ratio_8_streams = ratio(Some(hn.gbps), Some(dn.gbps));
        r.meta.throughput_bytes = Some(ThroughputBytes {
            direct_1: d1.bytes,
            hbone_1: h1.bytes,
            direct_n: dn.bytes,
            hbone_n: hn.bytes,
            direct_1_secs: d1.secs,
            hbone_1_secs: h1.secs,
            direct_n_secs: dn.secs,
            hbone_n_secs: hn.secs,
        });
        eprintln!(
            "throughput: direct {:.2} / hbone {:.2} Gbps (1 stream), {:.2} / {:.2} Gbps ({} streams)",
            d1.gbps, h1.gbps, dn.gbps, hn.gbps, args.streams
        );
        timed(r, "throughput", t);
        settle();
    }

    if phase("rr") {
        let t = Instant::now();
        let (dur, warm) = (
            Duration::from_secs_f64(args.rr_secs),
            Duration::from_secs_f64(args.rr_warmup_secs),
        );
        let d = phases::request_response(
            Path::Direct,
            sink.echo,
            args.rr_rate,
            dur,
            warm,
            args.rr_size,
            &mut || {},
        )?;
        settle();
        let mut cpu_before = None;
        let h = phases::request_response(
            hbone,
            sink.echo,
            args.rr_rate,
            dur,
            warm,
            args.rr_size,
            &mut || cpu_before = Some((sys::cpu_seconds(pa), sys::cpu_seconds(pb))),
        )?;
        let cpu_after = (sys::cpu_seconds(pa)?, sys::cpu_seconds(pb)?);
        let kreq = h.latency.n as f64 / 1000.0;
        if let Some((Ok(a0), Ok(b0))) = cpu_before {
            let (a, b) = ((cpu_after.0 - a0) / kreq, (cpu_after.1 - b0) / kreq);
            r.cpu_s_per_1k_req_a = Some(a);
            r.cpu_s_per_1k_req_b = Some(b);
            r.cpu_s_per_1k_req = Some((a + b) / 2.0);
        }
        let (dl, hl) = (d.latency, h.latency);
        r.rr_direct_p50_ms = Some(dl.p50_ms);
        r.rr_direct_p90_ms = Some(dl.p90_ms);
        r.rr_direct_p99_ms = Some(dl.p99_ms);
        r.rr_direct_p999_ms = Some(dl.p999_ms);
        r.rr_direct_max_ms = Some(dl.max_ms);
        r.rr_direct_mean_ms = Some(dl.mean_ms);
        r.rr_hbone_p50_ms = Some(hl.p50_ms);
        r.rr_hbone_p90_ms = Some(hl.p90_ms);
        r.rr_hbone_p99_ms = Some(hl.p99_ms);
        r.rr_hbone_p999_ms = Some(hl.p999_ms);
        r.rr_hbone_max_ms = Some(hl.max_ms);
        r.rr_hbone_mean_ms = Some(hl.mean_ms);
        r.rr_p50_added_ms = diff(r.rr_hbone_p50_ms, r.rr_direct_p50_ms);
        r.rr_p99_added_ms = diff(r.rr_hbone_p99_ms, r.rr_direct_p99_ms);
        r.rr_direct_requests = Some(dl.n);
        r.rr_hbone_requests = Some(hl.n);
        r.rr_direct_behind_schedule = Some(d.behind_schedule);
        r.rr_hbone_behind_schedule = Some(h.behind_schedule);
        r.rr_hbone_achieved_rate_per_s = Some(h.achieved_rate);
        eprintln!(
            "request/response: p50 {:.3} / {:.3} ms, p99 {:.3} / {:.3} ms (direct / hbone)",
            dl.p50_ms, hl.p50_ms, dl.p99_ms, hl.p99_ms
        );
        timed(r, "rr", t);
        settle();
    }

    r.rss_mb_start_a = Some(rss_start.0);
    r.rss_mb_start_b = Some(rss_start.1);
    if phase("idle") {
        let t = Instant::now();
        let idle = phases::open_idle(hbone, sink.echo, idle_conns, args.connect_concurrency)?;
        std::thread::sleep(Duration::from_secs_f64(args.idle_settle_secs));
        let (a, b) = (sys::rss_mb(pa)?, sys::rss_mb(pb)?);
        r.idle_opened = Some(idle.conns.len());
        if idle.conns.len() == idle_conns {
            r.rss_mb_10k_idle_a = Some(a);
            r.rss_mb_10k_idle_b = Some(b);
            r.rss_mb_10k_idle = Some(a.max(b));
        } else {
            eprintln!(
                "warning: only {} of {idle_conns} idle connections opened: {}",
                idle.conns.len(),
                idle.error.as_deref().unwrap_or("?")
            );
            r.rss_mb_partial_idle_a = Some(a);
            r.rss_mb_partial_idle_b = Some(b);
        }
        r.idle_error = idle.error;
        r.idle_open_secs = Some(idle.secs);
        r.idle_fds_a = sys::fd_count(pa);
        r.idle_fds_b = sys::fd_count(pb);
        eprintln!(
            "{} idle connections opened in {:.1} s: RSS A {a:.1} MB, B {b:.1} MB",
            idle.conns.len(),
            idle.secs
        );
        drop(idle.conns);
        std::thread::sleep(Duration::from_secs(1));
        r.rss_mb_after_close_a = sys::rss_mb(pa).ok();
        r.rss_mb_after_close_b = sys::rss_mb(pb).ok();
        timed(r, "idle", t);
        settle();
    }

    if phase("connect") {
        let t = Instant::now();
        let dur = Duration::from_secs_f64(args.connect_secs);
        let cpu0 = (sys::cpu_seconds(pa)?, sys::cpu_seconds(pb)?);
        let h = phases::connect_rate(hbone, sink.echo, args.connect_concurrency, dur)?;
        let cpu1 = (sys::cpu_seconds(pa)?, sys::cpu_seconds(pb)?);
        settle();
        // Direct last: its TIME_WAIT sockets on the client address must not eat the port
        // space ztunnel B binds from (see the README on keep-source-address).
        let d = phases::connect_rate(Path::Direct, sink.echo, args.connect_concurrency, dur)?;
        if h.ok > 0 {
            let per = |a: f64, b: f64| (b - a) * 1000.0 / h.ok as f64;
            r.connect_cpu_ms_per_conn_a = Some(per(cpu0.0, cpu1.0));
            r.connect_cpu_ms_per_conn_b = Some(per(cpu0.1, cpu1.1));
        }
        r.connect_rate_direct_per_s = Some(d.per_s);
        r.connect_rate_per_s = Some(h.per_s);
        r.connect_errors = Some(h.errors);
        r.connect_direct_errors = Some(d.errors);
        r.connect_first_error = h.first_error;
        r.connect_direct_first_error = d.first_error;
        r.connect_hbone_p50_ms = h.latency.map(|l| l.p50_ms);
        r.connect_hbone_p99_ms = h.latency.map(|l| l.p99_ms);
        r.connect_direct_p50_ms = d.latency.map(|l| l.p50_ms);
        r.connect_direct_p99_ms = d.latency.map(|l| l.p99_ms);
        eprintln!(
            "connect rate: direct {:.0}/s, hbone {:.0}/s ({} errors)",
            d.per_s, h.per_s, h.errors
        );
        timed(r, "connect", t);
        settle();
    }

    r.meta.perf_data = perf_data;
    Ok(())
}

/// A previous run leaves tens of thousands of TIME_WAIT sockets on the client address for
/// 60 s; ztunnel binds upstream sockets to that address, so they would skew (or break) the
/// connection phases. Wait for them to expire.
fn wait_for_time_wait() {
    let ip = match CLIENT_IP {
        std::net::IpAddr::V4(v4) => v4,
        std::net::IpAddr::V6(_) => return,
    };
    let deadline = Instant::now() + Duration::from_secs(65);
    let mut said = false;
    loop {
        let n = phases::time_wait_from(ip);
        if n < 1000 || Instant::now() > deadline {
            return;
        }
        if !said {
            eprintln!("waiting for {n} TIME_WAIT sockets from {ip} (a previous run) to expire ...");
            said = true;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// CPU seconds used so far by the bench, both ztunnels and the sink.
fn ours_cpu(mesh: &Mesh, sink: &Sink) -> f64 {
    sys::self_cpu_seconds()
        + [mesh.a.pid(), mesh.b.pid(), sink.proc.pid()]
            .iter()
            .filter_map(|p| sys::cpu_seconds(*p).ok())
            .sum::<f64>()
}

/// `perf record -g` on each pid for `dur` (plus a little, to cover the drain).
fn start_perf(
    dir: &std::path::Path,
    pids: &[(&str, u32)],
    dur: Duration,
) -> Result<(Vec<std::process::Child>, Vec<String>)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut children = Vec::new();
    let mut files = Vec::new();
    for (name, pid) in pids {
        let out = dir.join(format!("ztunnel-{name}.perf.data"));
        let child = Command::new("perf")
            .args(["record", "-g", "-F", "999", "-o"])
            .arg(&out)
            .args(["-p", &pid.to_string(), "--", "sleep"])
            .arg(format!("{:.1}", dur.as_secs_f64()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting perf (install linux-perf)")?;
        children.push(child);
        files.push(out.display().to_string());
    }
    // perf needs a moment to attach.
    std::thread::sleep(Duration::from_millis(300));
    Ok((children, files))
}
