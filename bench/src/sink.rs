//! The server workload, run as a child process (`zmesh-bench sink`) so that neither the bench
//! nor any other process needs more than ~10k descriptors for the idle-connection phase.
//!
//! Two listeners on the server address:
//! - discard: reads until EOF, then answers 24 bytes (bytes received, first and last byte
//!   instants in ns since the sink started, big-endian) so throughput is measured where the
//!   bytes arrive, after all proxy buffers drained;
//! - echo: writes back whatever it reads, half-closes on EOF.
//!
//! It prints `READY <discard port> <echo port>` and exits when its stdin closes, so it never
//! outlives the bench.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Size of the discard report.
pub const REPORT_LEN: usize = 24;

pub fn run(ip: IpAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the sink runtime")?;
    rt.block_on(async move {
        let discard = TcpListener::bind(SocketAddr::new(ip, 0))
            .await
            .with_context(|| format!("binding the discard listener on {ip}"))?;
        let echo = TcpListener::bind(SocketAddr::new(ip, 0))
            .await
            .with_context(|| format!("binding the echo listener on {ip}"))?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "READY {} {}",
                discard.local_addr()?.port(),
                echo.local_addr()?.port()
            )?;
            out.flush()?;
        }
        let base = Instant::now();
        tokio::spawn(accept_loop(discard, move |s| discard_conn(s, base)));
        tokio::spawn(accept_loop(echo, echo_conn));
        let mut stdin = tokio::io::stdin();
        let mut b = [0u8; 64];
        while !matches!(stdin.read(&mut b).await, Ok(0) | Err(_)) {}
        Ok::<_, anyhow::Error>(())
    })?;
    // Connections may still be open; do not wait for their tasks.
    std::process::exit(0);
}

async fn accept_loop<F, Fut>(l: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(handle(s));
            }
            // EMFILE and friends: back off rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn discard_conn(mut s: TcpStream, base: Instant) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                last = Instant::now();
                first.get_or_insert(last);
                total += n as u64;
            }
            Err(_) => return,
        }
    }
    let ns = |t: Instant| t.saturating_duration_since(base).as_nanos() as u64;
    let mut report = [0u8; REPORT_LEN];
    report[..8].copy_from_slice(&total.to_be_bytes());
    report[8..16].copy_from_slice(&ns(first.unwrap_or(last)).to_be_bytes());
    report[16..].copy_from_slice(&ns(last).to_be_bytes());
    let _ = s.write_all(&report).await;
    let _ = s.shutdown().await;
}

async fn echo_conn(mut s: TcpStream) {
    loop {
        // Allocate only once readable: 10k idle connections should cost the sink little.
        if s.readable().await.is_err() {
            return;
        }
        let mut buf = vec![0u8; 16 * 1024];
        match s.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
    let _ = s.shutdown().await;
}
