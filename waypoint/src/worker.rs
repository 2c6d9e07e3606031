//! Worker threads, Envoy's model: each worker is a single-threaded tokio runtime with its own
//! `SO_REUSEPORT` HBONE listener and its own upstream HBONE pool, so a downstream connection,
//! every request on it and the upstream connections those requests use are all driven by one
//! thread. With a shared multi-threaded runtime, a request's tasks (downstream HTTP, upstream
//! HTTP, two HBONE connection drivers) hopped between workers: a futex wake-up and a context
//! switch per hop, about a quarter of the waypoint's CPU at a paced 1000 requests/s.
//! Configuration, certificates and metrics are shared (`Arc`s).

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Index of the worker running on this thread; `usize::MAX` off the worker threads.
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// Mark this thread as worker `i`.
pub(crate) fn set_index(i: usize) {
    INDEX.with(|c| c.set(i));
}

/// A listening socket that other workers can bind too (`SO_REUSEPORT`: the kernel spreads
/// new connections over them by flow hash).
pub(crate) fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// The number of workers to run by default: one per available core, as Envoy and Istio do.
pub fn default_concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
