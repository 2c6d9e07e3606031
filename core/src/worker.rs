//! Worker threads, Envoy's model, used by both proxies.
//!
//! A proxy runs `N` data-path workers. Each is an OS thread with its own single-threaded tokio
//! runtime, its own listeners on the data-path ports — `SO_REUSEPORT` sockets sharing the
//! address, so the kernel spreads new connections over the workers by flow hash (eBPF
//! `bpf_sk_assign` to a listener does the same group selection on Linux ≥ 6.5) — and its own
//! upstream HBONE connection pool. A connection, the pooled HBONE connection it tunnels
//! through and every task of both are therefore driven by one thread: no work stealing, no
//! cross-thread wake-up per request. With one shared multi-threaded runtime the tasks of a
//! request could hop between threads (a futex wake-up and a context switch per hop): a quarter
//! of the waypoint's CPU at 1000 requests/s; for ztunnel's single tunnelled connection of
//! `zmesh-bench l4-netns`, about one wake-up in ten ran on the other thread.
//!
//! Everything else — the config source (xDS), certificate fetches and renewals, admin,
//! metrics, readiness — runs on a separate small control runtime, so a large config push or a
//! CA call never holds up a data thread, and stays up whatever happens to a worker. What the
//! workers share (state, certificates, metrics, drain) is shared through `Arc`s; a
//! certificate fetch started on a worker runs on the control runtime
//! ([`crate::certs::CertificateManager`]).
//!
//! - [`reuseport_listeners`]: one listener per worker on one address (port 0: the first picks
//!   the port, the others bind it).
//! - [`spawn`]: start a worker thread; [`WorkerThread::join`] waits for it to end.
//! - [`index`]: which worker the calling thread is.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;

use crate::socket::{self, ListenOptions, SocketError};
use socket2::{Domain, Protocol, Socket, Type};

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Index of the worker running on this thread; `usize::MAX` off the worker threads.
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// The number of workers to run by default: one per available core, as Envoy does.
pub fn default_concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `n` listeners on `addr` sharing it through `SO_REUSEPORT`, one per worker, not yet tied to
/// a runtime (each worker adopts its own). When `addr`'s port is 0 the first socket picks the
/// port and the others bind the port it got. `transparent`: `IP_TRANSPARENT` on each.
///
/// A port someone already listens on is refused ([`SocketError::InUse`]): `SO_REUSEPORT` would
/// let a second proxy of the same user join the group and take half the new connections.
pub fn reuseport_listeners(
    addr: SocketAddr,
    n: usize,
    transparent: bool,
) -> Result<Vec<std::net::TcpListener>, SocketError> {
    if addr.port() != 0 {
        ensure_unused(addr, transparent)?;
    }
    let opts = ListenOptions {
        transparent,
        reuse_port: true,
    };
    let mut bound = addr;
    let mut listeners = Vec::with_capacity(n);
    for _ in 0..n {
        let l = socket::bind_listener(bound, opts)?;
        bound = l
            .local_addr()
            .map_err(|source| SocketError::Listen { addr, source })?;
        listeners.push(l);
    }
    Ok(listeners)
}

/// Bind (without listening or `SO_REUSEPORT`) a throw-away socket to `addr`: it fails if any
/// socket listens there. A tiny window remains between this check and the real bind.
fn ensure_unused(addr: SocketAddr, transparent: bool) -> Result<(), SocketError> {
    let probe = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(|source| SocketError::Listen { addr, source })?;
    // As the listeners: SO_REUSEADDR ignores TIME_WAIT leftovers, never a listening socket.
    probe
        .set_reuse_address(true)
        .map_err(|source| SocketError::Listen { addr, source })?;
    if transparent {
        socket::set_transparent(&probe, addr.is_ipv6())
            .map_err(|source| SocketError::Transparent { addr, source })?;
    }
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(SocketError::InUse { addr }),
        Err(source) => Err(SocketError::Listen { addr, source }),
    }
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start worker {index}: {source}")]
    Start {
        index: usize,
        #[source]
        source: io::Error,
    },
}

/// A running worker's OS thread.
#[derive(Debug)]
pub struct WorkerThread {
    index: usize,
    thread: std::thread::JoinHandle<()>,
}

/// Start worker `index` on an OS thread named `{name}-w{index}` with its own current-thread
/// runtime. `setup` runs on that thread inside the runtime — so the listeners it adopts, the
/// tasks it spawns (a pool's reaper, accept loops) and everything those spawn belong to the
/// worker — and returns a value for the caller and the future the worker runs. When that
/// future completes the thread drops its runtime, with whatever tasks are still on it, and
/// ends. Returns once `setup` has run.
pub async fn spawn<S, T, F>(
    name: &str,
    index: usize,
    setup: S,
) -> Result<(WorkerThread, T), WorkerError>
where
    S: FnOnce() -> io::Result<(T, F)> + Send + 'static,
    T: Send + 'static,
    F: Future<Output = ()> + 'static,
{
    let err = |source| WorkerError::Start { index, source };
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name(format!("{name}-w{index}"))
        .spawn(move || {
            // Built and dropped on this thread: a runtime must not be dropped in async
            // context, and a current-thread runtime runs only where it is blocked on.
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            INDEX.with(|c| c.set(index));
            let run = {
                let _entered = rt.enter();
                match setup() {
                    Ok((value, run)) => {
                        let _ = started_tx.send(Ok(value));
                        run
                    }
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                }
            };
            rt.block_on(run);
        })
        .map_err(err)?;
    match started_rx.await {
        Ok(Ok(value)) => Ok((WorkerThread { index, thread }, value)),
        Ok(Err(e)) => Err(err(e)),
        Err(_) => Err(err(io::Error::other(
            "the worker thread exited while starting",
        ))),
    }
}

impl WorkerThread {
    pub fn index(&self) -> usize {
        self.index
    }

    /// Wait for the thread to end (its future has completed or is about to). Blocking join
    /// on a blocking-pool thread, so the caller's runtime keeps running meanwhile.
    pub async fn join(self) {
        let index = self.index;
        match tokio::task::spawn_blocking(move || self.thread.join()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => tracing::error!(worker = index, "worker thread panicked"),
            Err(e) => tracing::error!(worker = index, "cannot join worker thread: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuseport_listeners_share_an_ephemeral_port() {
        let ls = reuseport_listeners("127.0.0.1:0".parse().unwrap(), 3, false).unwrap();
        let addrs: Vec<_> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        assert_ne!(addrs[0].port(), 0);
        assert!(addrs.iter().all(|a| *a == addrs[0]), "{addrs:?}");
    }

    #[test]
    fn a_port_another_listener_holds_is_refused() {
        let first = reuseport_listeners("127.0.0.1:0".parse().unwrap(), 2, false).unwrap();
        let addr = first[0].local_addr().unwrap();
        let err = reuseport_listeners(addr, 2, false).unwrap_err();
        assert!(matches!(err, SocketError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("already in use"), "{err}");
        // A plain listener (not in a reuseport group) is refused too.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = reuseport_listeners(plain.local_addr().unwrap(), 1, false).unwrap_err();
        assert!(matches!(err, SocketError::InUse { .. }), "{err}");
        // Once the holder is gone the port is free again.
        drop(first);
        let again = reuseport_listeners(addr, 2, false).unwrap();
        assert_eq!(again.len(), 2);
    }

    #[tokio::test]
    async fn worker_runs_on_its_own_thread_until_its_future_ends() {
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
        let (w, idx) = spawn("test", 3, move || {
            // Spawned here: runs on the worker's runtime.
            let on_worker = tokio::spawn(async { index() });
            let run = async move {
                let _ = seen_tx.send(on_worker.await.ok());
                s.cancelled().await;
            };
            Ok((index(), run))
        })
        .await
        .unwrap();
        assert_eq!(idx, 3);
        assert_eq!(seen_rx.await.unwrap(), Some(3));
        assert_eq!(index(), usize::MAX);
        stop.cancel();
        w.join().await;
    }

    #[tokio::test]
    async fn setup_failure_is_reported() {
        let r = spawn("test", 0, || {
            Err::<((), std::future::Ready<()>), _>(io::Error::other("nope"))
        })
        .await;
        assert!(r.unwrap_err().to_string().contains("worker 0: nope"));
    }
}
