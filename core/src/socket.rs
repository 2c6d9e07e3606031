//! Socket setup shared by the proxies: listeners (optionally transparent), upstream connects
//! (optionally keeping the client's source address), marks and the file-descriptor limit.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Mark put on the proxy's own upstream sockets so redirection never captures them again
/// (Istio's ztunnel uses the same value).
pub const PROXY_MARK: u32 = 0x539;

/// How long an upstream connect may take before we give up.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "{addr} is already in use by another listener (a second ztunnel or waypoint on this node?); \
         refusing to share it through SO_REUSEPORT, which would split new connections between us"
    )]
    InUse { addr: SocketAddr },
    #[error(
        "cannot make the listener on {addr} transparent (IP_TRANSPARENT needs CAP_NET_ADMIN): {source}"
    )]
    Transparent {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {dst} failed: {source}")]
    Connect {
        dst: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {dst} timed out after {timeout:?}")]
    ConnectTimeout { dst: SocketAddr, timeout: Duration },
    #[error(
        "cannot bind the upstream socket to source {src} (to keep the client's address): {source}"
    )]
    BindSource {
        src: IpAddr,
        #[source]
        source: io::Error,
    },
}

impl SocketError {
    /// The underlying I/O error kind, for callers that map failures to protocol replies.
    pub fn io_kind(&self) -> io::ErrorKind {
        match self {
            SocketError::Listen { source, .. }
            | SocketError::Transparent { source, .. }
            | SocketError::Connect { source, .. }
            | SocketError::BindSource { source, .. } => source.kind(),
            SocketError::ConnectTimeout { .. } => io::ErrorKind::TimedOut,
            SocketError::InUse { .. } => io::ErrorKind::AddrInUse,
        }
    }
}

/// How [`bind_listener`] sets up a listening socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListenOptions {
    /// `IP_TRANSPARENT`: accept connections steered to the listener by eBPF
    /// (`bpf_sk_assign`) whatever their destination address; the accepted socket's local
    /// address is then the original destination.
    pub transparent: bool,
    /// `SO_REUSEPORT`: several sockets (one per worker thread) share the address and the
    /// kernel spreads new connections over them (see [`crate::worker`]).
    pub reuse_port: bool,
}

/// Backlog of every listener (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// Bind a TCP listener on the current runtime. `transparent`: see
/// [`ListenOptions::transparent`].
pub fn listen(addr: SocketAddr, transparent: bool) -> Result<TcpListener, SocketError> {
    let l = bind_listener(
        addr,
        ListenOptions {
            transparent,
            reuse_port: false,
        },
    )?;
    TcpListener::from_std(l).map_err(|source| SocketError::Listen { addr, source })
}

/// Bind a non-blocking TCP listener not yet tied to a runtime, so that the runtime of the
/// thread that will accept on it (a worker's) can adopt it with `TcpListener::from_std`.
pub fn bind_listener(
    addr: SocketAddr,
    opts: ListenOptions,
) -> Result<std::net::TcpListener, SocketError> {
    let domain = Domain::for_address(addr);
    let sock = Socket::new(
        domain,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(|source| SocketError::Listen { addr, source })?;
    sock.set_reuse_address(true)
        .map_err(|source| SocketError::Listen { addr, source })?;
    if opts.reuse_port {
        sock.set_reuse_port(true)
            .map_err(|source| SocketError::Listen { addr, source })?;
    }
    if opts.transparent {
        set_transparent(&sock, addr.is_ipv6())
            .map_err(|source| SocketError::Transparent { addr, source })?;
    }
    sock.bind(&addr.into())
        .map_err(|source| SocketError::Listen { addr, source })?;
    sock.listen(BACKLOG)
        .map_err(|source| SocketError::Listen { addr, source })?;
    Ok(sock.into())
}

pub(crate) fn set_transparent(sock: &Socket, v6: bool) -> io::Result<()> {
    if v6 {
        sock.set_ip_transparent_v6(true)
    } else {
        sock.set_ip_transparent_v4(true)
    }
}

/// Options for an upstream connection.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Source address to bind (the original client's IP, so the destination sees who really
    /// called). Non-local addresses need `IP_TRANSPARENT` (CAP_NET_ADMIN).
    pub source: Option<IpAddr>,
    /// `SO_MARK` for the socket (needs CAP_NET_ADMIN; skipped when not permitted).
    pub mark: Option<u32>,
    pub timeout: Option<Duration>,
}

/// Connect to `dst` with the given options; `TCP_NODELAY` is always set because proxies
/// forward whatever they get at once.
pub async fn connect(dst: SocketAddr, opts: &ConnectOptions) -> Result<TcpStream, SocketError> {
    let sock = if dst.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|source| SocketError::Connect { dst, source })?;
    if let Some(mark) = opts.mark {
        // Marks need CAP_NET_ADMIN; without it we still connect (tests, non-root dev runs).
        if let Err(e) = SockRef::from(&sock).set_mark(mark) {
            tracing::trace!(%dst, "SO_MARK not set: {e}");
        }
    }
    if let Some(src) = opts.source
        && src.is_ipv4() == dst.is_ipv4()
    {
        let s = SockRef::from(&sock);
        let _ = bind_address_no_port(&sock);
        // Best effort: local addresses (e.g. 127.0.0.0/8) bind without it.
        let _ = if src.is_ipv6() {
            s.set_ip_transparent_v6(true)
        } else {
            s.set_ip_transparent_v4(true)
        };
        sock.bind(SocketAddr::new(src, 0))
            .map_err(|source| SocketError::BindSource { src, source })?;
    }
    let timeout = opts.timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let stream = match tokio::time::timeout(timeout, sock.connect(dst)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(SocketError::Connect { dst, source }),
        Err(_) => return Err(SocketError::ConnectTimeout { dst, timeout }),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Defer the choice of the local port of a socket bound to `(ip, 0)` to `connect()`, which
/// picks one that is free for the whole 4-tuple. Without it, `bind` picks a port blind to the
/// destination and `connect` can fail with EADDRINUSE against a TIME_WAIT socket once many
/// connections have come from the same source address (which is normal for a proxy that keeps
/// client addresses).
pub fn bind_address_no_port(sock: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `sock` is a live socket descriptor and we pass a pointer to a c_int with its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lowest port [`unused_ports`] hands out: above the mesh's own well-known ports (15000–15090).
const RESERVED_PORTS_FLOOR: u16 = 16000;

/// `n` distinct ports that are free on `ip` right now, for listeners whose numbers must be known
/// before they are bound (peers are told in advance: test meshes, the benchmark). They come from
/// below the kernel's ephemeral range (`ip_local_port_range`), so no outgoing connection's
/// automatically chosen source port can take one between this call and the bind — the race
/// that `bind(port 0)`, read, close has. Calls in one process never return the same port twice
/// until the range wraps.
pub fn unused_ports(ip: IpAddr, n: usize) -> io::Result<Vec<u16>> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CURSOR: AtomicU32 = AtomicU32::new(u32::MAX);

    let ceiling = ephemeral_range_start().max(RESERVED_PORTS_FLOOR + 1000);
    let span = u32::from(ceiling - RESERVED_PORTS_FLOOR);
    // Start each process somewhere else in the range so that concurrent test processes rarely
    // probe the same ports.
    let _ = CURSOR.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let mut out = Vec::with_capacity(n);
    for _ in 0..span {
        if out.len() == n {
            return Ok(out);
        }
        let offset = CURSOR.fetch_add(1, Ordering::Relaxed) % span;
        let port = RESERVED_PORTS_FLOOR + offset as u16;
        // Free for a listener on `ip` and for one on the wildcard address.
        let free = [ip, IpAddr::from([0u8; 4])]
            .iter()
            .all(|a| std::net::TcpListener::bind(SocketAddr::new(*a, port)).is_ok());
        if free {
            out.push(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no {n} free ports between {RESERVED_PORTS_FLOOR} and {ceiling} on {ip}"),
    ))
}

/// First port of the kernel's ephemeral range (Linux default 32768).
fn ephemeral_range_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// Raise the soft open-file limit to the hard limit: a node proxy holds several descriptors
/// per proxied connection.
pub fn raise_fd_limit() -> io::Result<u64> {
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
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unused_ports_are_distinct_free_and_below_the_ephemeral_range() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut ports = unused_ports(ip, 4).unwrap();
        ports.extend(unused_ports(ip, 4).unwrap());
        let start = ephemeral_range_start();
        for p in &ports {
            assert!((RESERVED_PORTS_FLOOR..start).contains(p), "{p}");
            std::net::TcpListener::bind((ip, *p)).unwrap();
        }
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 8);
    }

    #[tokio::test]
    async fn connect_binds_loopback_source() {
        let l = listen("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = l.local_addr().unwrap();
        let opts = ConnectOptions {
            source: Some("127.0.0.7".parse().unwrap()),
            mark: Some(PROXY_MARK),
            timeout: Some(Duration::from_secs(2)),
        };
        let (c, a) = tokio::join!(connect(addr, &opts), l.accept());
        let c = c.unwrap();
        let (_s, peer) = a.unwrap();
        assert_eq!(peer.ip(), "127.0.0.7".parse::<IpAddr>().unwrap());
        assert_eq!(c.peer_addr().unwrap(), addr);
    }

    #[tokio::test]
    async fn connect_refused_is_reported() {
        let l = listen("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let err = connect(addr, &ConnectOptions::default()).await.unwrap_err();
        assert_eq!(err.io_kind(), io::ErrorKind::ConnectionRefused);
        assert!(err.to_string().contains(&addr.to_string()));
    }
}
