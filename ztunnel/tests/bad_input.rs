//! Bad input on the HBONE and SOCKS5 ports gets its error (or a closed connection) and never
//! disturbs a concurrent good connection.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A mutual-TLS connection to B's HBONE port at the echo address, as the client workload.
async fn tls_to_b(mesh: &Mesh) -> tokio_rustls::client::TlsStream<TcpStream> {
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let cert = mesh
        .ca
        .issue(&CLIENT_ID.parse().unwrap(), now - hour, now + hour)
        .unwrap();
    let cfg = cert.client_config(&[ECHO_ID.parse().unwrap()]).unwrap();
    let hbone = SocketAddr::new(ip(ECHO_IP), mesh.b.addrs.hbone.unwrap().port());
    let tcp = TcpStream::connect(hbone).await.unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(zmesh_core::tls::server_name(), tcp)
        .await
        .unwrap()
}

/// An authenticated HTTP/2 connection to B's HBONE port at the echo address.
async fn h2_to_b(mesh: &Mesh) -> h2::client::SendRequest<bytes::Bytes> {
    let (send, conn) = h2::client::handshake(tls_to_b(mesh).await).await.unwrap();
    tokio::spawn(conn);
    send
}

/// Status of a request, or None when the stream/connection was reset instead.
async fn status(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    req: http::Request<()>,
) -> Option<u16> {
    let fut = async {
        let mut ready = send.clone().ready().await.ok()?;
        let (resp, _) = ready.send_request(req, true).ok()?;
        Some(resp.await.ok()?.status().as_u16())
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .ok()
        .flatten()
}

fn connect_req(authority: &str) -> http::Request<()> {
    http::Request::builder()
        .method("CONNECT")
        .uri(authority)
        .body(())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_request_validation() {
    let mesh = Mesh::start("").await;
    let socks = mesh.a.addrs.socks5.unwrap();
    let mut good = socks_connect(socks, ip(CLIENT_IP), mesh.echo)
        .await
        .unwrap();
    roundtrip(&mut good, b"before").await.unwrap();

    let mut send = h2_to_b(&mesh).await;
    // Control: a well-formed CONNECT is accepted.
    assert_eq!(
        status(&mut send, connect_req(&mesh.echo.to_string())).await,
        Some(200)
    );
    // Not CONNECT.
    let get = http::Request::builder()
        .method("GET")
        .uri(format!("https://{}/", mesh.echo))
        .body(())
        .unwrap();
    assert_eq!(status(&mut send, get).await, Some(400));
    // Unparsable authority (port out of range): 400 or a refused stream.
    let bad = status(&mut send, connect_req("127.0.0.20:99999")).await;
    assert!(matches!(bad, Some(400) | None), "got {bad:?}");
    // Self-targeting: the proxy's own ports.
    let b_port = mesh.b.addrs.hbone.unwrap().port();
    for port in [15001, 15006, 15008, 15080, b_port] {
        assert_eq!(
            status(&mut send, connect_req(&format!("{ECHO_IP}:{port}"))).await,
            Some(400),
            "CONNECT to own port {port}"
        );
    }
    // A destination that is not a workload on B's node.
    assert_eq!(
        status(&mut send, connect_req("127.0.0.77:80")).await,
        Some(503)
    );

    roundtrip(&mut good, b"after").await.unwrap();
}

/// HPACK integer with an N-bit prefix (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix_bits: u8, mut v: usize) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_header_block_is_refused_without_harm() {
    let mesh = Mesh::start("").await;
    let socks = mesh.a.addrs.socks5.unwrap();
    let mut good = socks_connect(socks, ip(CLIENT_IP), mesh.echo)
        .await
        .unwrap();

    // Hand-built HTTP/2: the h2 client would refuse to send this itself.
    let mut tls = tls_to_b(&mesh).await;
    let mut block = Vec::new();
    // :method CONNECT (literal, indexed name 2), :authority (indexed name 1)
    hpack_int(&mut block, 0x00, 4, 2);
    hpack_int(&mut block, 0, 7, 7);
    block.extend_from_slice(b"CONNECT");
    hpack_int(&mut block, 0x00, 4, 1);
    let auth = mesh.echo.to_string();
    hpack_int(&mut block, 0, 7, auth.len());
    block.extend_from_slice(auth.as_bytes());
    // x-big: 1 MiB
    block.push(0x00);
    hpack_int(&mut block, 0, 7, 5);
    block.extend_from_slice(b"x-big");
    hpack_int(&mut block, 0, 7, 1 << 20);
    block.extend(std::iter::repeat_n(b'a', 1 << 20));
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]); // SETTINGS
    // Large frames (we advertise 1 MiB frames): the header-list limit, not the
    // CONTINUATION-flood guard, is what must refuse this.
    let chunks: Vec<&[u8]> = block.chunks(1_000_000).collect();
    for (i, c) in chunks.iter().enumerate() {
        let last = i == chunks.len() - 1;
        let (kind, flags) = if i == 0 { (0x1, 0) } else { (0x9, 0) };
        frame(&mut out, kind, flags | if last { 0x4 } else { 0 }, 1, c);
    }
    // The server may cut us off mid-write; either way it must not accept the stream.
    let _ = tls.write_all(&out).await;
    let _ = tls.flush().await;
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut resp)).await;
    // No 200 HEADERS: `:status 200` is HPACK index 8 (0x88).
    let mut i = 0;
    let mut accepted = false;
    while i + 9 <= resp.len() {
        let len = (resp[i] as usize) << 16 | (resp[i + 1] as usize) << 8 | resp[i + 2] as usize;
        if resp[i + 3] == 0x1 && resp.get(i + 9) == Some(&0x88) {
            accepted = true;
        }
        i += 9 + len;
    }
    assert!(!accepted, "a 1 MiB header block must not open a tunnel");

    roundtrip(&mut good, b"still fine").await.unwrap();
    let mut fresh = socks_connect(socks, ip(CLIENT_IP), mesh.echo)
        .await
        .unwrap();
    roundtrip(&mut fresh, b"new ones too").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_on_hbone_and_socks5_are_dropped() {
    let mesh = Mesh::start("").await;
    let socks = mesh.a.addrs.socks5.unwrap();
    let mut good = socks_connect(socks, ip(CLIENT_IP), mesh.echo)
        .await
        .unwrap();
    let hbone = SocketAddr::new(ip(ECHO_IP), mesh.b.addrs.hbone.unwrap().port());
    let mut seed = 0x9e37_79b9u32;
    let mut garbage = vec![0u8; 64 * 1024];
    for b in garbage.iter_mut() {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        *b = seed as u8;
    }
    for target in [hbone, socks] {
        for _ in 0..5 {
            let mut s = TcpStream::connect(target).await.unwrap();
            let _ = s.write_all(&garbage).await;
            let mut buf = vec![0u8; 1024];
            let r = tokio::time::timeout(Duration::from_secs(12), async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => continue,
                    }
                }
            })
            .await;
            assert!(
                r.is_ok(),
                "{target} must close a connection that sends garbage"
            );
        }
    }
    // SOCKS5 with a bad command / address type gets an error reply.
    let mut s = TcpStream::connect(socks).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut r = [0u8; 2];
    s.read_exact(&mut r).await.unwrap();
    s.write_all(&[5, 2, 0, 1, 127, 0, 0, 1, 0, 80])
        .await
        .unwrap(); // BIND
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await.unwrap();
    assert_eq!(rep[1], 0x07, "command not supported");

    roundtrip(&mut good, b"unaffected").await.unwrap();
}
