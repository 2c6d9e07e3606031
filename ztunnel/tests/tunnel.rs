//! End-to-end L4 path on loopback: client → SOCKS5 of ztunnel A → HBONE (mTLS, HTTP/2
//! CONNECT) → ztunnel B → echo server.

mod common;

use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_to_hbone_64mib_intact_with_identity_in_metrics_and_logs() {
    let logs = zmesh_core::telemetry::capture_access_logs();
    let mesh = Mesh::start("").await;
    let socks = mesh.a.addrs.socks5.unwrap();
    let s = socks_connect(socks, ip(CLIENT_IP), mesh.echo)
        .await
        .expect("tunnel opens");
    let (mut r, mut w) = s.into_split();

    const TOTAL: usize = 64 * 1024 * 1024;
    let writer = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut chunk = vec![0u8; 256 * 1024];
        let mut seed = 0x1234_5678u32;
        let mut sent = 0;
        while sent < TOTAL {
            for b in chunk.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                *b = seed as u8;
            }
            h.update(&chunk);
            w.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        w.shutdown().await.unwrap();
        h.finalize()
    });
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n;
    }
    let sent_hash = writer.await.unwrap();
    assert_eq!(got, TOTAL, "all bytes came back");
    assert_eq!(h.finalize(), sent_hash, "checksum over 64 MiB matches");

    // B (the destination) saw A's client identity as the source principal.
    let text = mesh.b.metrics().encode();
    eventually("B counts the closed connection", || {
        metric_value(
            &mesh.b.metrics().encode(),
            "istio_tcp_connections_closed_total",
            &[("reporter", "destination"), ("source_principal", CLIENT_ID)],
        ) == Some(1.0)
    })
    .await;
    let opened = metric_value(
        &text,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", CLIENT_ID),
            ("destination_principal", ECHO_ID),
            ("connection_security_policy", "mutual_tls"),
            ("source_workload", "client"),
            ("destination_workload", "echo"),
        ],
    );
    assert_eq!(opened, Some(1.0), "metrics:\n{text}");
    let text = mesh.b.metrics().encode();
    let received = metric_value(
        &text,
        "istio_tcp_received_bytes_total",
        &[("reporter", "destination"), ("source_principal", CLIENT_ID)],
    )
    .unwrap();
    assert_eq!(received as usize, TOTAL);
    let a_text = mesh.a.metrics().encode();
    assert_eq!(
        metric_value(
            &a_text,
            "istio_tcp_connections_opened_total",
            &[("reporter", "source"), ("destination_principal", ECHO_ID)]
        ),
        Some(1.0)
    );

    // B's access log line carries the source identity.
    eventually("B's access log", || {
        logs.lines().iter().any(|l| {
            l["direction"] == "inbound"
                && l["src.identity"] == CLIENT_ID
                && l["dst.addr"] == mesh.echo.to_string()
        })
    })
    .await;
}

/// Open `n` concurrent tunnels from the client to the echo server through A's SOCKS5, each
/// checked with a 1 KiB round trip, and return them all open (truly concurrent).
async fn open_concurrent(mesh: &Mesh, n: u32) -> Vec<tokio::net::TcpStream> {
    let socks = mesh.a.addrs.socks5.unwrap();
    let echo = mesh.echo;
    let mut tasks = Vec::new();
    for i in 0..n {
        tasks.push(tokio::spawn(async move {
            let mut s = socks_connect(socks, ip(CLIENT_IP), echo)
                .await
                .unwrap_or_else(|code| panic!("connection {i} refused with {code}"));
            let msg: Vec<u8> = (0..1024u32)
                .map(|j| (i.wrapping_mul(31) ^ j) as u8)
                .collect();
            roundtrip(&mut s, &msg).await.unwrap();
            s
        }));
    }
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(t.await.unwrap());
    }
    streams
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_connections_share_at_most_ten_h2_connections() {
    let mesh = Mesh::start("").await;
    let mut streams = open_concurrent(&mesh, 1000).await;
    assert_eq!(streams.len(), 1000);
    let opened = mesh.a.pool_opened_total();
    assert!(
        (1..=10).contains(&opened),
        "1000 concurrent tunnels used {opened} HTTP/2 connections"
    );
    // Every stream still works while all are open.
    for (i, s) in streams.iter_mut().enumerate().step_by(97) {
        roundtrip(s, format!("still alive {i}").as_bytes())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_propagates_through_the_tunnel() {
    let mesh = Mesh::start("").await;
    let mut s = socks_connect(mesh.a.addrs.socks5.unwrap(), ip(CLIENT_IP), mesh.echo)
        .await
        .unwrap();
    s.write_all(b"last words").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back))
        .await
        .expect("EOF arrives after the echo")
        .unwrap();
    assert_eq!(back, b"last words");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_vip_is_resolved_to_an_endpoint() {
    let mesh = Mesh::start("").await;
    let vip = std::net::SocketAddr::new(ip(ECHO_VIP), 80);
    let mut s = socks_connect(mesh.a.addrs.socks5.unwrap(), ip(CLIENT_IP), vip)
        .await
        .expect("VIP connection opens");
    roundtrip(&mut s, b"via the service").await.unwrap();
    let text = mesh.a.metrics().encode();
    assert_eq!(
        metric_value(
            &text,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                ("destination_service", "echo.server-ns.svc.cluster.local"),
            ]
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_destination_is_passed_through_in_plaintext() {
    let mesh = Mesh::start("").await;
    // Not a mesh workload: a plain server on an address nobody declared.
    let outside = echo_server(ip("127.0.0.30")).await;
    let mut s = socks_connect(mesh.a.addrs.socks5.unwrap(), ip(CLIENT_IP), outside)
        .await
        .expect("passthrough opens");
    roundtrip(&mut s, b"plain").await.unwrap();
    assert_eq!(
        mesh.a.pool_opened_total(),
        0,
        "no HBONE for a non-mesh destination"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_source_is_refused() {
    let mesh = Mesh::start("").await;
    let r = socks_connect(mesh.a.addrs.socks5.unwrap(), ip("127.0.0.99"), mesh.echo).await;
    assert_eq!(
        r.err(),
        Some(0x02),
        "a source that is not a local workload is not proxied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_are_released() {
    let mesh = Mesh::start_with("", |c| c.h2.idle_timeout = Duration::from_millis(300)).await;
    let socks = mesh.a.addrs.socks5.unwrap();
    let mut s = socks_connect(socks, ip(CLIENT_IP), mesh.echo)
        .await
        .unwrap();
    roundtrip(&mut s, b"one").await.unwrap();
    // In use: the pooled connection stays however long it takes.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(mesh.a.pool_connections(), 1);
    roundtrip(&mut s, b"still pooled").await.unwrap();
    drop(s);
    // Idle past the timeout: released.
    eventually("idle HBONE connection released", || {
        mesh.a.pool_connections() == 0
    })
    .await;
    // A new connection opens a fresh one.
    let mut s = socks_connect(socks, ip(CLIENT_IP), mesh.echo)
        .await
        .unwrap();
    roundtrip(&mut s, b"two").await.unwrap();
    assert_eq!(mesh.a.pool_opened_total(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_both_serve_and_both_drain_on_shutdown() {
    let mesh = Mesh::start_with("", |c| c.workers = 2).await;
    let socks = mesh.a.addrs.socks5.unwrap();
    // Distinct source ports: SO_REUSEPORT hashes the connections over both workers' SOCKS5
    // listeners (64 on one worker alone: 2^-63).
    let mut streams = open_concurrent(&mesh, 64).await;
    // Each worker tunnelled through its own pool: one HTTP/2 connection each for the burst.
    let opened: Vec<u64> = mesh.a.pools().map(|p| p.opened_total()).collect();
    assert_eq!(opened, [1, 1], "HBONE connections opened per worker");

    // Shutdown with connections open on both workers: they are cut after the grace period,
    // the worker threads end and their listeners close.
    let Mesh { a, b, .. } = mesh;
    tokio::time::timeout(Duration::from_secs(10), a.shutdown())
        .await
        .expect("shutdown completes");
    for (i, s) in streams.iter_mut().enumerate() {
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("connection {i} still open after shutdown"));
        assert!(matches!(r, Ok(0) | Err(_)), "connection {i}: {r:?}");
    }
    assert!(
        tokio::net::TcpStream::connect(socks).await.is_err(),
        "the SOCKS5 listeners are closed"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_finishing_within_the_drain_grace_completes() {
    let mesh = Mesh::start_with("", |c| c.drain_grace = Duration::from_secs(10)).await;
    let socks = mesh.a.addrs.socks5.unwrap();
    let mut s = socks_connect(socks, ip(CLIENT_IP), mesh.echo)
        .await
        .unwrap();
    roundtrip(&mut s, b"before").await.unwrap();
    let Mesh { a, b, .. } = mesh;
    let started = std::time::Instant::now();
    let shutdown = tokio::spawn(async move { a.shutdown().await });
    // Draining: no new connections...
    eventually("the SOCKS5 listener closes when the drain starts", || {
        std::net::TcpStream::connect(socks).is_err()
    })
    .await;
    // ...but the live one still carries traffic, and when it ends the shutdown is done,
    // well before the 10 s grace.
    roundtrip(&mut s, b"during the drain").await.unwrap();
    drop(s);
    tokio::time::timeout(Duration::from_secs(8), shutdown)
        .await
        .expect("shutdown finishes once the last connection is done")
        .expect("join");
    assert!(started.elapsed() < Duration::from_secs(8));
    b.shutdown().await;
}
