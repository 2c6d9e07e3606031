//! SOCKS5 (15080, localhost): CONNECT with IPv4, IPv6 or a domain name, no authentication,
//! then the same outbound logic as captured traffic. Used by tests and by clients that are not
//! redirected.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info_span, warn};
use zmesh_core::hbone::pool::Pool;

use super::ProxyInputs;
use super::outbound::{self, OutboundError};

/// The client must finish the SOCKS handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

// Reply codes (RFC 1928 §6).
const REP_SUCCEEDED: u8 = 0x00;
const REP_GENERAL_FAILURE: u8 = 0x01;
const REP_NOT_ALLOWED: u8 = 0x02;
const REP_HOST_UNREACHABLE: u8 = 0x04;
const REP_CONNECTION_REFUSED: u8 = 0x05;
const REP_COMMAND_NOT_SUPPORTED: u8 = 0x07;
const REP_ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;

#[derive(Debug, thiserror::Error)]
pub enum Socks5Error {
    #[error("SOCKS5 client I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a SOCKS5 client (version byte {0:#04x})")]
    Version(u8),
    #[error(
        "SOCKS5 client offers no acceptable authentication method (only \"no authentication\" is supported)"
    )]
    NoAcceptableAuth,
    #[error("SOCKS5 command {0:#04x} is not supported (only CONNECT)")]
    Command(u8),
    #[error("SOCKS5 address type {0:#04x} is not supported")]
    AddressType(u8),
    #[error("SOCKS5 domain name is not valid UTF-8")]
    BadDomain,
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("SOCKS5 handshake timed out")]
    Timeout,
}

/// What a SOCKS5 client asks to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Socks5Target {
    Addr(SocketAddr),
    /// A domain name (address type 3) and port, still to resolve.
    Domain(String, u16),
}

/// Read the greeting and the CONNECT request (RFC 1928) from an untrusted client, answering
/// its method selection, or a refusal when the command or address type is not supported.
pub async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<Socks5Target, Socks5Error> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(Socks5Error::Version(head[0]));
    }
    let mut methods = vec![0u8; head[1] as usize];
    s.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        s.write_all(&[5, 0xff]).await?;
        return Err(Socks5Error::NoAcceptableAuth);
    }
    s.write_all(&[5, 0]).await?;

    let mut req = [0u8; 4];
    s.read_exact(&mut req).await?;
    if req[0] != 5 {
        return Err(Socks5Error::Version(req[0]));
    }
    if req[1] != 1 {
        reply(s, REP_COMMAND_NOT_SUPPORTED).await;
        return Err(Socks5Error::Command(req[1]));
    }
    let ip = match req[3] {
        1 => {
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await?;
            IpAddr::V4(Ipv4Addr::from(b))
        }
        4 => {
            let mut b = [0u8; 16];
            s.read_exact(&mut b).await?;
            IpAddr::V6(Ipv6Addr::from(b))
        }
        3 => {
            let len = s.read_u8().await? as usize;
            let mut b = vec![0u8; len];
            s.read_exact(&mut b).await?;
            let name = String::from_utf8(b).map_err(|_| Socks5Error::BadDomain)?;
            let port = s.read_u16().await?;
            return Ok(Socks5Target::Domain(name, port));
        }
        other => {
            reply(s, REP_ADDRESS_TYPE_NOT_SUPPORTED).await;
            return Err(Socks5Error::AddressType(other));
        }
    };
    let port = s.read_u16().await?;
    Ok(Socks5Target::Addr(SocketAddr::new(ip, port)))
}

/// Read the greeting and the request; returns the destination.
async fn handshake(pi: &ProxyInputs, s: &mut TcpStream) -> Result<SocketAddr, Socks5Error> {
    match read_request(s).await? {
        Socks5Target::Addr(a) => Ok(a),
        Socks5Target::Domain(name, port) => resolve(pi, &name, port).await,
    }
}

/// Mesh service hostnames resolve to their VIP; anything else through the system resolver.
async fn resolve(pi: &ProxyInputs, name: &str, port: u16) -> Result<SocketAddr, Socks5Error> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let vip = pi
        .state
        .read()
        .service_by_host(name)
        .and_then(|svc| svc.vips.first().map(|(_, ip)| *ip));
    if let Some(ip) = vip {
        return Ok(SocketAddr::new(ip, port));
    }
    let lookup = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host((name, port)),
    );
    match lookup.await {
        Ok(Ok(mut addrs)) => addrs
            .next()
            .ok_or_else(|| Socks5Error::Resolve(name.into())),
        _ => Err(Socks5Error::Resolve(name.into())),
    }
}

async fn reply<S: AsyncWrite + Unpin>(s: &mut S, code: u8) {
    // Bound address is not meaningful through a tunnel; report 0.0.0.0:0.
    let _ = s.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0]).await;
}

fn reply_code(e: &OutboundError) -> u8 {
    if e.is_denied() {
        return REP_NOT_ALLOWED;
    }
    match e {
        OutboundError::UnknownSource(_) | OutboundError::SelfCall(_) => REP_NOT_ALLOWED,
        OutboundError::NoHealthyEndpoint { .. } | OutboundError::NoServicePort { .. } => {
            REP_HOST_UNREACHABLE
        }
        OutboundError::Passthrough { .. } => REP_CONNECTION_REFUSED,
        OutboundError::Hbone(_) => REP_GENERAL_FAILURE,
    }
}

pub async fn handle(pi: Arc<ProxyInputs>, pool: Pool, mut client: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let span = info_span!("socks5", src = %peer);
    async move {
        let dst =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, Box::pin(handshake(&pi, &mut client)))
                .await
            {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => {
                    if let Socks5Error::Resolve(_) = e {
                        reply(&mut client, REP_HOST_UNREACHABLE).await;
                    }
                    debug!("SOCKS5 handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    debug!("{}", Socks5Error::Timeout);
                    return;
                }
            };
        // Boxed for the same reason as in outbound::handle: free the setup state once open.
        match Box::pin(outbound::connect(&pi, &pool, peer, dst)).await {
            Ok(est) => {
                reply(&mut client, REP_SUCCEEDED).await;
                outbound::relay(pi, client, est, started).await.emit();
            }
            Err(e) => {
                warn!(%dst, "SOCKS5 connection failed: {e}");
                reply(&mut client, reply_code(&e)).await;
            }
        }
    }
    .instrument(span)
    .await
}

pub async fn serve(pi: Arc<ProxyInputs>, pool: Pool, listener: tokio::net::TcpListener) {
    let drain = pi.drain.clone();
    super::accept_loop(listener, "socks5", drain, move |stream, peer| {
        handle(pi.clone(), pool.clone(), stream, peer)
    })
    .await
}
