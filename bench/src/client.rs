//! Blocking client sockets: direct (bound to the client workload's address) or through
//! ztunnel's SOCKS5 listener. Blocking std sockets on plain threads keep the client's own
//! overhead small and its timing free of an async runtime's scheduling.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// No single read or write of the harness should block longer than this.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// How the client reaches the server.
#[derive(Debug, Clone, Copy)]
pub enum Path {
    /// Straight to the server.
    Direct,
    /// SOCKS5 CONNECT through ztunnel A (then HBONE to ztunnel B, then TCP to the server).
    Hbone { socks: SocketAddr },
    /// From a pod's own address, in the pod's netns (`l4-netns`): straight to the server when
    /// the pods are not enrolled, captured by eBPF redirection into the node's ztunnel when
    /// they are. The `src` given to [`connect`] is ignored.
    Pod { src: IpAddr, captured: bool },
}

impl Path {
    pub fn name(&self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Hbone { .. } => "hbone",
            Path::Pod {
                captured: false, ..
            } => "direct (pod)",
            Path::Pod { captured: true, .. } => "mesh (pod)",
        }
    }
}

/// TCP connection from `src` (port chosen by the kernel) to `dst`, with `TCP_NODELAY`.
pub fn bound_connect(src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    bind_address_no_port(&s)?;
    s.bind(&SocketAddr::new(src, 0).into())?;
    s.connect_timeout(&dst.into(), IO_TIMEOUT)?;
    s.set_tcp_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s.into())
}

/// `IP_BIND_ADDRESS_NO_PORT`: bind only the address and let `connect()` pick the port from
/// the full 4-tuple. Without it, `bind(ip, 0)` searches the bind table for a port free for
/// *every* destination, which costs O(ports in use) in the kernel per connection: with 10k
/// open connections the client would measure its own bind() instead of the proxy.
fn bind_address_no_port(s: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a valid c_int on our stack;
    // the descriptor is owned by `s` and open.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
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

/// Open a connection from `src` to `dst` over `path`. For SOCKS5 the greeting and the CONNECT
/// request go in one write (the server reads them in order), saving the client a round trip;
/// the call returns once ztunnel reports the tunnel established.
pub fn connect(path: Path, src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    match path {
        Path::Direct => bound_connect(src, dst),
        Path::Pod { src, .. } => bound_connect(src, dst),
        Path::Hbone { socks } => {
            let mut s = bound_connect(src, socks)?;
            let mut req = vec![5, 1, 0, 5, 1, 0];
            match dst.ip() {
                IpAddr::V4(v4) => {
                    req.push(1);
                    req.extend_from_slice(&v4.octets());
                }
                IpAddr::V6(v6) => {
                    req.push(4);
                    req.extend_from_slice(&v6.octets());
                }
            }
            req.extend_from_slice(&dst.port().to_be_bytes());
            s.write_all(&req)?;
            let mut method = [0u8; 2];
            s.read_exact(&mut method)?;
            if method != [5, 0] {
                return Err(io::Error::other(format!(
                    "SOCKS5 server refused the no-auth method: {method:?}"
                )));
            }
            // VER REP RSV ATYP(1 = IPv4) ADDR(4) PORT(2): ztunnel always answers IPv4 0.0.0.0:0.
            let mut rep = [0u8; 10];
            s.read_exact(&mut rep)?;
            if rep[1] != 0 {
                return Err(io::Error::other(format!(
                    "SOCKS5 CONNECT to {dst} failed with reply code {:#04x}",
                    rep[1]
                )));
            }
            Ok(s)
        }
    }
}

/// Send `msg` and read the same number of bytes back.
pub fn round_trip(s: &mut TcpStream, msg: &[u8], back: &mut [u8]) -> io::Result<()> {
    s.write_all(msg)?;
    s.read_exact(&mut back[..msg.len()])
}
