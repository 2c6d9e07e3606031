//! The measurements. Each takes a [`Path`] so direct and HBONE run the same code.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::client::{self, Path};
use crate::mesh::CLIENT_IP;
use crate::sink::REPORT_LEN;

/// Join a harness thread, turning a panic into an error.
fn join<T>(h: thread::JoinHandle<T>) -> Result<T> {
    h.join().map_err(|_| anyhow!("a client thread panicked"))
}

#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub gbps: f64,
    pub bytes: u64,
    pub secs: f64,
}

/// `streams` connections each write 256 KiB chunks for `dur`, then half-close; the sink's
/// reports give bytes and first/last arrival, so the rate is what arrived, over the span it
/// took to arrive (proxy buffers included, connection setup excluded).
pub fn throughput(
    path: Path,
    dst: SocketAddr,
    streams: usize,
    dur: Duration,
) -> Result<Throughput> {
    let conns = (0..streams)
        .map(|_| client::connect(path, CLIENT_IP, dst))
        .collect::<io::Result<Vec<_>>>()
        .with_context(|| format!("opening {streams} {} connection(s)", path.name()))?;
    let barrier = Arc::new(Barrier::new(streams));
    let handles: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            let barrier = barrier.clone();
            thread::spawn(move || -> io::Result<(u64, [u8; REPORT_LEN])> {
                let buf = vec![0xa5u8; 256 * 1024];
                barrier.wait();
                let deadline = Instant::now() + dur;
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    s.write_all(&buf)?;
                    sent += buf.len() as u64;
                }
                s.shutdown(Shutdown::Write)?;
                let mut report = [0u8; REPORT_LEN];
                s.read_exact(&mut report)?;
                Ok((sent, report))
            })
        })
        .collect();
    let (mut total, mut first, mut last) = (0u64, u64::MAX, 0u64);
    for h in handles {
        let (sent, r) = join(h)?.with_context(|| format!("{} throughput stream", path.name()))?;
        let field = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&r[i * 8..i * 8 + 8]);
            u64::from_be_bytes(b)
        };
        let (got, f, l) = (field(0), field(1), field(2));
        if got != sent {
            bail!(
                "{} stream lost data: sent {sent} bytes, the server received {got}",
                path.name()
            );
        }
        total += got;
        first = first.min(f);
        last = last.max(l);
    }
    let secs = last.saturating_sub(first) as f64 / 1e9;
    if secs <= 0.0 {
        bail!("{} throughput: no data arrived", path.name());
    }
    Ok(Throughput {
        gbps: total as f64 * 8.0 / secs / 1e9,
        bytes: total,
        secs,
    })
}

#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub n: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    fn from_ns(mut v: Vec<u64>) -> Option<Latency> {
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        // Nearest-rank percentile.
        let pct = |p: f64| {
            let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
            v[rank - 1] as f64 / 1e6
        };
        Some(Latency {
            n: v.len(),
            p50_ms: pct(0.50),
            p90_ms: pct(0.90),
            p99_ms: pct(0.99),
            p999_ms: pct(0.999),
            max_ms: v[v.len() - 1] as f64 / 1e6,
            mean_ms: v.iter().sum::<u64>() as f64 / v.len() as f64 / 1e6,
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RequestResponse {
    pub latency: Latency,
    /// Requests that could not leave on schedule because the previous response was late.
    pub behind_schedule: usize,
    pub achieved_rate: f64,
}

/// Fixed-rate request/response on one persistent connection: `size` bytes out, `size` bytes
/// back (echo), one request every `1/rate` s. `warmup` runs first, unrecorded; `measuring`
/// is called when the recorded part starts (to snapshot CPU counters).
///
/// Coordinated omission: when a response comes back after the next request's scheduled
/// send time, that request's latency counts from its *scheduled* time, so a stall is charged
/// to every request it delayed. When the client is on time, latency counts from the actual
/// send, so the client's own timer overshoot (a few µs) is not charged to the path.
pub fn request_response(
    path: Path,
    dst: SocketAddr,
    rate: f64,
    dur: Duration,
    warmup: Duration,
    size: usize,
    measuring: &mut dyn FnMut(),
) -> Result<RequestResponse> {
    let mut s = client::connect(path, CLIENT_IP, dst)
        .with_context(|| format!("opening the {} request/response connection", path.name()))?;
    let req = vec![0x5au8; size];
    let mut resp = vec![0u8; size];
    request_response_with(path.name(), rate, dur, warmup, measuring, &mut || {
        client::round_trip(&mut s, &req, &mut resp)
    })
}

/// [`request_response`] with any round trip (an HTTP request, ...): `round_trip` is called at
/// the fixed rate and must return once the response is complete.
pub fn request_response_with(
    what: &str,
    rate: f64,
    dur: Duration,
    warmup: Duration,
    measuring: &mut dyn FnMut(),
    round_trip: &mut dyn FnMut() -> io::Result<()>,
) -> Result<RequestResponse> {
    crate::sys::set_timer_slack_ns(1_000);
    let period = Duration::from_secs_f64(1.0 / rate);
    let warm_n = (warmup.as_secs_f64() * rate) as usize;
    paced(period, warm_n, None, round_trip)
        .with_context(|| format!("{what} request/response warm-up"))?;
    let n = ((dur.as_secs_f64() * rate) as usize).max(1);
    let mut lat = Vec::with_capacity(n);
    measuring();
    let started = Instant::now();
    let behind = paced(period, n, Some(&mut lat), round_trip)
        .with_context(|| format!("{what} request/response"))?;
    let elapsed = started.elapsed().as_secs_f64();
    let latency = Latency::from_ns(lat).ok_or_else(|| anyhow!("no requests recorded"))?;
    Ok(RequestResponse {
        latency,
        behind_schedule: behind,
        achieved_rate: n as f64 / elapsed,
    })
}

/// `n` round trips, the i-th due at `start + i * period`; returns how many were behind.
fn paced(
    period: Duration,
    n: usize,
    mut record: Option<&mut Vec<u64>>,
    round_trip: &mut dyn FnMut() -> io::Result<()>,
) -> io::Result<usize> {
    let start = Instant::now();
    let mut prev_done = start;
    let mut behind = 0;
    for i in 0..n {
        let scheduled = start + period.mul_f64(i as f64);
        let t0 = if prev_done > scheduled {
            behind += 1;
            scheduled
        } else {
            let now = Instant::now();
            if scheduled > now {
                thread::sleep(scheduled - now);
            }
            Instant::now()
        };
        round_trip()?;
        prev_done = Instant::now();
        if let Some(r) = record.as_deref_mut() {
            r.push(prev_done.duration_since(t0).as_nanos() as u64);
        }
    }
    Ok(behind)
}

#[derive(Debug, Clone)]
pub struct ConnectRate {
    pub per_s: f64,
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub latency: Option<Latency>,
}

/// `concurrency` threads loop for `dur`: open a connection, one 64-byte round trip,
/// half-close, wait for the server's EOF, close. Counts completed connections per second.
pub fn connect_rate(
    path: Path,
    dst: SocketAddr,
    concurrency: usize,
    dur: Duration,
) -> Result<ConnectRate> {
    let barrier = Arc::new(Barrier::new(concurrency));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let handles: Vec<_> = (0..concurrency)
        .map(|_| {
            let barrier = barrier.clone();
            let first_error = first_error.clone();
            thread::spawn(move || {
                let msg = [0x42u8; 64];
                let mut back = [0u8; 64];
                let (mut lat, mut errors) = (Vec::new(), 0u64);
                let one = |back: &mut [u8]| -> io::Result<()> {
                    let mut s = client::connect(path, CLIENT_IP, dst)?;
                    client::round_trip(&mut s, &msg, back)?;
                    s.shutdown(Shutdown::Write)?;
                    let mut rest = [0u8; 1];
                    match s.read(&mut rest)? {
                        0 => Ok(()),
                        _ => Err(io::Error::other("unexpected data after the echo")),
                    }
                };
                barrier.wait();
                let deadline = Instant::now() + dur;
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    match one(&mut back) {
                        Ok(()) => lat.push(t0.elapsed().as_nanos() as u64),
                        Err(e) => {
                            errors += 1;
                            if let Ok(mut f) = first_error.lock() {
                                f.get_or_insert_with(|| e.to_string());
                            }
                            // Don't spin on a persistent failure (e.g. ports exhausted).
                            thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let started = Instant::now();
    let (mut all, mut errors) = (Vec::new(), 0);
    for h in handles {
        let (lat, e) = join(h)?;
        all.extend(lat);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ok = all.len() as u64;
    let first_error = first_error.lock().ok().and_then(|f| f.clone());
    Ok(ConnectRate {
        per_s: ok as f64 / elapsed,
        ok,
        errors,
        first_error,
        latency: Latency::from_ns(all),
    })
}

/// Idle connections that were opened, and why opening stopped early (if it did).
pub struct Idle {
    pub conns: Vec<TcpStream>,
    pub secs: f64,
    pub error: Option<String>,
}

/// Open `n` connections with one 16-byte round trip each (so they are fully proxied) and
/// return them open. A refused connection is a result, not a harness failure: opening stops
/// and the error is reported next to what was opened.
pub fn open_idle(path: Path, dst: SocketAddr, n: usize, concurrency: usize) -> Result<Idle> {
    let started = Instant::now();
    let per = n.div_ceil(concurrency);
    let handles: Vec<_> = (0..concurrency)
        .map(|i| {
            let count = per.min(n.saturating_sub(i * per));
            thread::spawn(move || -> (Vec<TcpStream>, Option<io::Error>) {
                let msg = [0x17u8; 16];
                let mut back = [0u8; 16];
                let mut conns = Vec::with_capacity(count);
                for _ in 0..count {
                    let one = client::connect(path, CLIENT_IP, dst).and_then(|mut s| {
                        client::round_trip(&mut s, &msg, &mut back)?;
                        Ok(s)
                    });
                    match one {
                        Ok(s) => conns.push(s),
                        Err(e) => return (conns, Some(e)),
                    }
                }
                (conns, None)
            })
        })
        .collect();
    let mut conns = Vec::with_capacity(n);
    let mut error = None;
    for h in handles {
        let (c, e) = join(h)?;
        conns.extend(c);
        if let Some(e) = e {
            error.get_or_insert_with(|| e.to_string());
        }
    }
    Ok(Idle {
        conns,
        secs: started.elapsed().as_secs_f64(),
        error,
    })
}

/// Sockets in TIME_WAIT whose local address is `ip` (IPv4), from `/proc/net/tcp`.
pub fn time_wait_from(ip: std::net::Ipv4Addr) -> usize {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return 0;
    };
    // The kernel prints the address as the in-memory u32 in hex: little-endian on x86/arm.
    let want = format!("{:08X}", u32::from_ne_bytes(ip.octets()));
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let mut f = l.split_whitespace();
            let local = f.nth(1).unwrap_or("");
            let state = f.nth(1).unwrap_or("");
            state == "06" && local.starts_with(&want)
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let l = Latency::from_ns((1..=1000).map(|i| i * 1_000_000).collect()).unwrap();
        assert_eq!(l.p50_ms, 500.0);
        assert_eq!(l.p99_ms, 990.0);
        assert_eq!(l.p999_ms, 999.0);
        assert_eq!(l.max_ms, 1000.0);
        assert_eq!(l.n, 1000);
        assert!(Latency::from_ns(Vec::new()).is_none());
    }
}
