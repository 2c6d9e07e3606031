//! PeerAuthentication and TLS failures: STRICT refuses plaintext on 15006, PERMISSIVE accepts
//! it; wrong trust domain, expired certificates and unexpected server identities fail the
//! handshake and are counted in `istio_tcp_connections_failed_total`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket};
use zmesh_core::identity::Identity;
use ztunnel::proxy::inbound_passthrough;

/// A plaintext connection from a non-mesh client to the echo workload, handed to B's inbound
/// passthrough as if eBPF had steered it (original destination = the echo address).
async fn plaintext_to_echo(mesh: &Mesh) -> tokio::net::TcpStream {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sock = TcpSocket::new_v4().unwrap();
    zmesh_core::socket::bind_address_no_port(&sock).unwrap();
    sock.bind("127.0.0.40:0".parse().unwrap()).unwrap();
    let (client, accepted) = tokio::join!(sock.connect(l.local_addr().unwrap()), l.accept());
    let (server_side, peer) = accepted.unwrap();
    let pi = mesh.b.inputs.clone();
    let echo = mesh.echo;
    tokio::spawn(inbound_passthrough::handle(pi, server_side, peer, echo));
    client.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_accepts_plaintext() {
    let mesh = Mesh::start("").await;
    let mut c = plaintext_to_echo(&mesh).await;
    roundtrip(&mut c, b"plaintext is fine under PERMISSIVE")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_refuses_plaintext_but_not_mtls() {
    let mesh =
        Mesh::start("peerAuthentications:\n- {name: strict, namespace: server-ns, mode: STRICT}\n")
            .await;
    let mut c = plaintext_to_echo(&mesh).await;
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "plaintext must be closed under STRICT, got {r:?}"
    );
    let text = mesh.b.metrics().encode();
    assert_eq!(
        metric_value(
            &text,
            "istio_tcp_connections_failed_total",
            &[("reporter", "destination"), ("response_flags", "DENY")]
        ),
        Some(1.0),
        "{text}"
    );
    // HBONE (mTLS) still works.
    let mut s = socks_connect(mesh.a.addrs.socks5.unwrap(), ip(CLIENT_IP), mesh.echo)
        .await
        .unwrap();
    roundtrip(&mut s, b"mtls ok").await.unwrap();
}

/// Handshake with B's HBONE listener at the echo address using `cert`; returns whether a
/// CONNECT got a 200.
async fn raw_hbone(
    mesh: &Mesh,
    cert: zmesh_core::certs::WorkloadCertificate,
    expect: &str,
) -> bool {
    let hbone = SocketAddr::new(ip(ECHO_IP), mesh.b.addrs.hbone.unwrap().port());
    let cfg = cert.client_config(&[expect.parse().unwrap()]).unwrap();
    let tcp = tokio::net::TcpStream::connect(hbone).await.unwrap();
    let attempt = async {
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(zmesh_core::tls::server_name(), tcp)
            .await
            .ok()?;
        let (mut send, conn) = h2::client::handshake(tls).await.ok()?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method("CONNECT")
            .uri(mesh.echo.to_string())
            .body(())
            .ok()?;
        let (resp, _s) = send.send_request(req, false).ok()?;
        Some(resp.await.ok()?.status() == 200)
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap()
        .unwrap_or(false)
}

fn tls_failures(mesh: &Mesh) -> f64 {
    metric_value(
        &mesh.b.metrics().encode(),
        "istio_tcp_connections_failed_total",
        &[
            ("reporter", "destination"),
            ("response_flags", "TLS_FAILURE"),
        ],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_trust_domain_and_expired_client_certs_are_refused() {
    let mesh = Mesh::start("").await;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);

    // Control: a good certificate from our CA works.
    let good = mesh
        .ca
        .issue(&CLIENT_ID.parse().unwrap(), now - hour, now + hour)
        .unwrap();
    assert!(
        raw_hbone(&mesh, good, ECHO_ID).await,
        "a valid client certificate is accepted"
    );

    // Same CA, but an identity in another trust domain.
    let foreign = Identity::new("evil.example", "client-ns", "client").unwrap();
    let cert = mesh.ca.issue(&foreign, now - hour, now + hour).unwrap();
    assert!(!raw_hbone(&mesh, cert, ECHO_ID).await);
    // The client may see the refusal (TLS 1.3 alert) before B has counted it.
    eventually("B counts the foreign trust domain", || {
        tls_failures(&mesh) == 1.0
    })
    .await;

    // Expired client certificate.
    let expired = mesh
        .ca
        .issue(&CLIENT_ID.parse().unwrap(), now - 2 * hour, now - hour)
        .unwrap();
    assert!(!raw_hbone(&mesh, expired, ECHO_ID).await);
    eventually("B counts the expired certificate", || {
        tls_failures(&mesh) == 2.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unexpected_server_identity_fails_at_the_source() {
    let mesh = Mesh::start("").await;
    // A believes the echo workload runs as another service account than the one B presents.
    let yaml =
        mesh_yaml(mesh.echo.port(), "").replace("serviceAccount: echo", "serviceAccount: impostor");
    let update = zmesh_core::state::LocalConfig::from_str(&yaml).unwrap();
    mesh.a.state().apply(update);
    let r = socks_connect(mesh.a.addrs.socks5.unwrap(), ip(CLIENT_IP), mesh.echo).await;
    assert!(r.is_err(), "the handshake must fail");
    let text = mesh.a.metrics().encode();
    assert_eq!(
        metric_value(
            &text,
            "istio_tcp_connections_failed_total",
            &[("reporter", "source"), ("response_flags", "TLS_FAILURE")]
        ),
        Some(1.0),
        "{text}"
    );
    let _ = Arc::clone(&mesh.ca);
}
