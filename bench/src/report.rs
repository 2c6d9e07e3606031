//! The `l4-loopback` result: JSON keys and the summary table.

use serde::Serialize;

/// Targets from DESIGN.md §8 and Istio's published figures (notes/anchors-performance-ecosystem.md §1).
pub const TARGET_RATIO: f64 = 0.6;
pub const TARGET_P99_ADDED_MS: f64 = 0.1;
pub const TARGET_RSS_10K_MB: f64 = 30.0;
pub const ISTIO_RATIO: f64 = 0.3;
pub const ISTIO_P99_ADDED_MS: f64 = 0.15;
pub const ISTIO_IDLE_MB: f64 = 14.0;
/// Istio 1.24: 0.06 vCPU at 1000 rps, i.e. 0.06 CPU-seconds per 1000 requests, per ztunnel.
pub const ISTIO_CPU_S_PER_1K: f64 = 0.06;

/// Every figure is `null` when its phase was skipped or failed to produce a number.
#[derive(Debug, Default, Serialize)]
pub struct L4Report {
    // Single stream.
    pub throughput_direct_gbps: Option<f64>,
    pub throughput_hbone_gbps: Option<f64>,
    /// hbone / direct.
    pub throughput_ratio: Option<f64>,
    // `streams` concurrent streams (8 by default).
    pub throughput_direct_gbps_8_streams: Option<f64>,
    pub throughput_hbone_gbps_8_streams: Option<f64>,
    pub throughput_ratio_8_streams: Option<f64>,
    /// ztunnel CPU seconds per GB carried in the single-stream HBONE measurement.
    pub throughput_cpu_s_per_gb_a: Option<f64>,
    pub throughput_cpu_s_per_gb_b: Option<f64>,

    // Fixed-rate request/response; added = hbone − direct at the same percentile.
    pub rr_p50_added_ms: Option<f64>,
    pub rr_p99_added_ms: Option<f64>,
    pub rr_direct_p50_ms: Option<f64>,
    pub rr_direct_p90_ms: Option<f64>,
    pub rr_direct_p99_ms: Option<f64>,
    pub rr_direct_p999_ms: Option<f64>,
    pub rr_direct_max_ms: Option<f64>,
    pub rr_direct_mean_ms: Option<f64>,
    pub rr_hbone_p50_ms: Option<f64>,
    pub rr_hbone_p90_ms: Option<f64>,
    pub rr_hbone_p99_ms: Option<f64>,
    pub rr_hbone_p999_ms: Option<f64>,
    pub rr_hbone_max_ms: Option<f64>,
    pub rr_hbone_mean_ms: Option<f64>,
    pub rr_direct_requests: Option<usize>,
    pub rr_hbone_requests: Option<usize>,
    pub rr_direct_behind_schedule: Option<usize>,
    pub rr_hbone_behind_schedule: Option<usize>,
    pub rr_hbone_achieved_rate_per_s: Option<f64>,

    /// ztunnel CPU (utime+stime) per 1000 requests during the HBONE request/response phase:
    /// the mean of A and B.
    pub cpu_s_per_1k_req: Option<f64>,
    pub cpu_s_per_1k_req_a: Option<f64>,
    pub cpu_s_per_1k_req_b: Option<f64>,

    /// New connections per second through ztunnel A's SOCKS5 listener (pooled HBONE).
    pub connect_rate_per_s: Option<f64>,
    pub connect_rate_direct_per_s: Option<f64>,
    pub connect_errors: Option<u64>,
    pub connect_direct_errors: Option<u64>,
    pub connect_first_error: Option<String>,
    pub connect_direct_first_error: Option<String>,
    /// ztunnel CPU per proxied connection during the connect-rate phase.
    pub connect_cpu_ms_per_conn_a: Option<f64>,
    pub connect_cpu_ms_per_conn_b: Option<f64>,
    pub connect_hbone_p50_ms: Option<f64>,
    pub connect_hbone_p99_ms: Option<f64>,
    pub connect_direct_p50_ms: Option<f64>,
    pub connect_direct_p99_ms: Option<f64>,

    /// RSS of the larger of the two ztunnels with `idle_conns` idle proxied connections.
    pub rss_mb_10k_idle: Option<f64>,
    pub rss_mb_10k_idle_a: Option<f64>,
    pub rss_mb_10k_idle_b: Option<f64>,
    /// RSS right after startup (no connection yet).
    pub rss_mb_start_a: Option<f64>,
    pub rss_mb_start_b: Option<f64>,
    /// RSS a moment after the idle connections were closed.
    pub rss_mb_after_close_a: Option<f64>,
    pub rss_mb_after_close_b: Option<f64>,
    /// Idle connections actually opened, and the error that stopped opening more.
    pub idle_opened: Option<usize>,
    pub idle_error: Option<String>,
    /// RSS when fewer than `idle_conns` could be opened.
    pub rss_mb_partial_idle_a: Option<f64>,
    pub rss_mb_partial_idle_b: Option<f64>,
    pub idle_open_secs: Option<f64>,
    pub idle_fds_a: Option<usize>,
    pub idle_fds_b: Option<usize>,

    pub meta: Meta,
}

#[derive(Debug, Default, Serialize)]
pub struct Meta {
    pub benchmark: &'static str,
    #[serde(flatten)]
    pub machine: crate::sys::Machine,
    pub fd_limit: Option<u64>,
    pub ztunnel_binary: String,
    pub ztunnel_log_level: String,
    pub ztunnel_env: Vec<String>,
    /// CPU used by processes other than the bench, its ztunnels and sink during the run, as a
    /// share of the machine: above a few percent, expect noisy numbers.
    pub bench_profile: &'static str,
    pub throughput_secs: f64,
    pub streams: usize,
    pub throughput_bytes: Option<ThroughputBytes>,
    pub rr_secs: f64,
    pub rr_warmup_secs: f64,
    pub rr_rate_per_s: f64,
    pub rr_size_bytes: usize,
    pub connect_secs: f64,
    pub connect_concurrency: usize,
    pub idle_conns: usize,
    pub phases: Vec<String>,
    pub phase_secs: Vec<(String, f64)>,
    pub total_secs: f64,
    pub perf_data: Option<Vec<String>>,
}

#[derive(Debug, Default, Serialize)]
pub struct ThroughputBytes {
    pub direct_1: u64,
    pub hbone_1: u64,
    pub direct_n: u64,
    pub hbone_n: u64,
    /// Span from first to last byte at the sink, seconds.
    pub direct_1_secs: f64,
    pub hbone_1_secs: f64,
    pub direct_n_secs: f64,
    pub hbone_n_secs: f64,
}

use crate::output::fmt_opt as f;

fn verdict(v: Option<f64>, ok: impl Fn(f64) -> bool) -> &'static str {
    match v {
        Some(x) if ok(x) => "met",
        Some(_) => "MISSED",
        None => "-",
    }
}

impl L4Report {
    /// Human-readable summary with targets and Istio's reference figures.
    pub fn table(&self) -> String {
        let m = &self.meta;
        let mut out = String::new();
        let mut row = |a: &str, b: String, c: String, d: String, e: &str, t: &str, i: &str| {
            out.push_str(&format!(
                "{a:<34} {b:>10} {c:>10} {d:>12}  {e:<7} {t:<10} {i}\n"
            ));
        };
        row(
            "metric",
            "direct".into(),
            "hbone".into(),
            "result".into(),
            "target",
            "",
            "Istio ref",
        );
        row(
            "throughput, 1 stream (Gbps)",
            f(self.throughput_direct_gbps, 2),
            f(self.throughput_hbone_gbps, 2),
            format!("ratio {}", f(self.throughput_ratio, 2)),
            verdict(self.throughput_ratio, |x| x >= TARGET_RATIO),
            &format!(">= {TARGET_RATIO}"),
            &format!("~{ISTIO_RATIO}"),
        );
        row(
            &format!("throughput, {} streams (Gbps)", m.streams),
            f(self.throughput_direct_gbps_8_streams, 2),
            f(self.throughput_hbone_gbps_8_streams, 2),
            format!("ratio {}", f(self.throughput_ratio_8_streams, 2)),
            "",
            "",
            "",
        );
        row(
            "ztunnel CPU s / GB, 1 stream (A, B)",
            f(self.throughput_cpu_s_per_gb_a, 3),
            f(self.throughput_cpu_s_per_gb_b, 3),
            String::new(),
            "",
            "",
            "",
        );
        row(
            &format!("rr p50 @{}/s, {} B (ms)", m.rr_rate_per_s, m.rr_size_bytes),
            f(self.rr_direct_p50_ms, 3),
            f(self.rr_hbone_p50_ms, 3),
            format!("+{}", f(self.rr_p50_added_ms, 3)),
            "",
            "",
            "",
        );
        row(
            &format!("rr p99 @{}/s, {} B (ms)", m.rr_rate_per_s, m.rr_size_bytes),
            f(self.rr_direct_p99_ms, 3),
            f(self.rr_hbone_p99_ms, 3),
            format!("+{}", f(self.rr_p99_added_ms, 3)),
            verdict(self.rr_p99_added_ms, |x| x <= TARGET_P99_ADDED_MS),
            &format!("<= +{TARGET_P99_ADDED_MS}"),
            &format!("+{ISTIO_P99_ADDED_MS} (2 ztunnels)"),
        );
        row(
            "ztunnel CPU s / 1000 req (A, B)",
            f(self.cpu_s_per_1k_req_a, 3),
            f(self.cpu_s_per_1k_req_b, 3),
            format!("mean {}", f(self.cpu_s_per_1k_req, 3)),
            "",
            "",
            &format!("{ISTIO_CPU_S_PER_1K} per ztunnel"),
        );
        row(
            &format!("new connections/s (c={})", m.connect_concurrency),
            f(self.connect_rate_direct_per_s, 0),
            f(self.connect_rate_per_s, 0),
            format!(
                "errors {}/{}",
                self.connect_direct_errors.unwrap_or(0),
                self.connect_errors.unwrap_or(0)
            ),
            "",
            "",
            "",
        );
        row(
            &format!("RSS, {} idle conns (MB) (A, B)", m.idle_conns),
            f(self.rss_mb_10k_idle_a, 1),
            f(self.rss_mb_10k_idle_b, 1),
            format!("max {}", f(self.rss_mb_10k_idle, 1)),
            verdict(self.rss_mb_10k_idle, |x| x <= TARGET_RSS_10K_MB),
            &format!("<= {TARGET_RSS_10K_MB}"),
            &format!("{ISTIO_IDLE_MB} idle; 38 @10k"),
        );
        row(
            "RSS at start (MB) (A, B)",
            f(self.rss_mb_start_a, 1),
            f(self.rss_mb_start_b, 1),
            String::new(),
            "",
            "",
            "",
        );
        row(
            "ztunnel CPU ms / new conn (A, B)",
            f(self.connect_cpu_ms_per_conn_a, 3),
            f(self.connect_cpu_ms_per_conn_b, 3),
            String::new(),
            "",
            "",
            "",
        );
        out.push_str(&format!(
            "\n{}, commit {}{}, {:.0} s total\n",
            m.machine.summary(),
            m.machine
                .git_commit
                .as_deref()
                .map(|c| &c[..c.len().min(10)])
                .unwrap_or("?"),
            if m.machine.git_dirty == Some(true) {
                " (dirty)"
            } else {
                ""
            },
            m.total_secs,
        ));
        if let Some(e) = &self.idle_error {
            out.push_str(&format!(
                "idle phase stopped after {} connections: {e}\n",
                self.idle_opened.unwrap_or(0)
            ));
        }
        if let Some(e) = &self.connect_first_error {
            out.push_str(&format!("first HBONE connect error: {e}\n"));
        }
        if let Some(e) = &self.connect_direct_first_error {
            // Usually EADDRNOTAVAIL: >28k connections in a few seconds exhaust the ephemeral
            // ports of one (source, destination) pair; the direct rate is then a lower bound.
            out.push_str(&format!("first direct connect error: {e}\n"));
        }
        out
    }
}
