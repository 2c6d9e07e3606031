//! Certificate rotation during a long transfer does not interrupt it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_during_a_30_second_transfer() {
    // 4 s certificates: renewed about every 2 s on both sides during the transfer.
    let mesh = Mesh::start_with("", |c| c.cert_lifetime = Duration::from_secs(4)).await;
    let s = socks_connect(mesh.a.addrs.socks5.unwrap(), ip(CLIENT_IP), mesh.echo)
        .await
        .unwrap();
    let rot_a = mesh.a.certs().rotations();
    let rot_b = mesh.b.certs().rotations();
    let (mut r, mut w) = s.into_split();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let mut sent = 0u64;
        let mut i = 0u8;
        while started.elapsed() < Duration::from_secs(30) {
            let chunk = vec![i; 64 * 1024];
            w.write_all(&chunk).await.expect("write during rotation");
            sent += chunk.len() as u64;
            i = i.wrapping_add(1);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        w.shutdown().await.unwrap();
        sent
    });
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut expect_byte = 0u8;
    let mut in_chunk = 0usize;
    loop {
        let n = r.read(&mut buf).await.expect("read during rotation");
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            assert_eq!(b, expect_byte, "byte {got} corrupted");
            in_chunk += 1;
            if in_chunk == 64 * 1024 {
                in_chunk = 0;
                expect_byte = expect_byte.wrapping_add(1);
            }
        }
        got += n as u64;
    }
    let sent = writer.await.unwrap();
    assert_eq!(got, sent);
    assert!(started.elapsed() >= Duration::from_secs(30));
    let (ra, rb) = (
        mesh.a.certs().rotations() - rot_a,
        mesh.b.certs().rotations() - rot_b,
    );
    assert!(
        ra >= 5 && rb >= 5,
        "certificates rotated during the transfer (A {ra}, B {rb})"
    );
    // New connections use the new certificates and work too.
    let mut fresh = socks_connect(mesh.a.addrs.socks5.unwrap(), ip(CLIENT_IP), mesh.echo)
        .await
        .unwrap();
    roundtrip(&mut fresh, b"after rotation").await.unwrap();
}
