//! Small Linux helpers: resource limits, timer slack, `/proc` readings, run metadata.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};

/// Raise `RLIMIT_NOFILE` for this process and the children it spawns. Tries 262144 for both
/// limits (needs `CAP_SYS_RESOURCE`), else lifts the soft limit to the hard one. Returns the
/// soft limit now in force.
pub fn raise_fd_limit() -> io::Result<u64> {
    let want = libc::rlimit {
        rlim_cur: 262_144,
        rlim_max: 262_144,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
        return Ok(want.rlim_cur);
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass; it is valid for writes.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Make `thread::sleep` on the calling thread wake within a few microseconds of its deadline
/// (the default 50 µs slack would blur a fixed-rate schedule).
pub fn set_timer_slack_ns(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and touches no memory of ours.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0) };
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name is in parentheses and may contain spaces: fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of stat(5), so utime (14) and stime (15) are at 11 and 12.
    let field = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .map(|v| v as f64)
            .ok_or_else(|| anyhow!("no CPU times in /proc/{pid}/stat"))
    };
    Ok((field(11)? + field(12)?) / clk_tck())
}

/// Busy (non-idle, non-iowait) CPU seconds of the whole machine since boot, from `/proc/stat`.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice, included in user].
    let busy: u64 = v.iter().take(8).sum::<u64>() - v.get(3)? - v.get(4)?;
    Some(busy as f64 / clk_tck())
}

/// CPU seconds of this process and its reaped children.
pub fn self_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

/// Resident set size of a process, in MiB (`VmRSS`).
pub fn rss_mb(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kb / 1024.0)
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

pub fn load_average() -> Option<String> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

pub fn kernel() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
}

pub fn cpu_model() -> Option<String> {
    let s = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    s.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `(commit, dirty)` of the source tree this binary was built from, if git is available.
pub fn git_commit() -> Option<(String, bool)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dirty = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    Some((commit, dirty))
}

/// Current time as RFC 3339 UTC (`2026-11-22T10:00:00Z`), without a date-time dependency.
pub fn utc_now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

/// Where and when a benchmark ran; flattened into every report's `meta`.
#[derive(Debug, Default, serde::Serialize)]
pub struct Machine {
    pub timestamp_utc: String,
    pub git_commit: Option<String>,
    pub git_dirty: Option<bool>,
    pub kernel: Option<String>,
    pub cpu_model: Option<String>,
    pub cores: usize,
    pub load_average_start: Option<String>,
    pub load_average_end: Option<String>,
    /// CPU used by processes outside the benchmark while it ran (noise on a shared machine).
    pub other_processes_cpu_pct: Option<f64>,
}

impl Machine {
    /// Read the machine and the checkout at the start of a run.
    pub fn capture() -> Self {
        let (git_commit, git_dirty) = git_commit().unzip();
        Machine {
            timestamp_utc: utc_now_rfc3339(),
            git_commit,
            git_dirty,
            kernel: kernel(),
            cpu_model: cpu_model(),
            cores: cores(),
            load_average_start: load_average(),
            ..Machine::default()
        }
    }

    /// One line for the end of a report's table.
    pub fn summary(&self) -> String {
        format!(
            "{} cores ({}), kernel {}, load {} -> {}, other processes {}% CPU",
            self.cores,
            self.cpu_model.as_deref().unwrap_or("?"),
            self.kernel.as_deref().unwrap_or("?"),
            self.load_average_start.as_deref().unwrap_or("?"),
            self.load_average_end.as_deref().unwrap_or("?"),
            self.other_processes_cpu_pct
                .map(|x| format!("{x:.0}"))
                .unwrap_or_else(|| "-".into()),
        )
    }
}

/// Peak VmRSS of some processes, sampled every 200 ms on a thread until stopped.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<f64>>,
}

impl RssSampler {
    pub fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = vec![0.0f64; pids.len()];
            while !s.load(Ordering::Relaxed) {
                for (p, pid) in peak.iter_mut().zip(&pids) {
                    if let Ok(v) = rss_mb(*pid) {
                        *p = p.max(v);
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            peak
        });
        RssSampler { stop, handle }
    }

    pub fn finish(self) -> Vec<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}
