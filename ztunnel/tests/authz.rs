//! L4 authorization end to end: enforced by the destination ztunnel (401 on the HBONE CONNECT,
//! seen by the SOCKS5 client as "not allowed" and a closed connection), and re-checked on live
//! connections when policy changes.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;

fn policy(name: &str, action: &str, matches: &str) -> String {
    format!(
        r#"- name: {name}
  namespace: server-ns
  scope: Namespace
  action: {action}
  rules:
  - - - {matches}
"#
    )
}

const NOT_ALLOWED: u8 = 0x02;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_by_principal_is_401_and_closes() {
    let p = policy(
        "deny-client",
        "Deny",
        &format!("principals: [{{exact: \"{}\"}}]", &CLIENT_ID[9..]),
    );
    let mesh = Mesh::start(&format!("policies:\n{p}")).await;
    let socks = mesh.a.addrs.socks5.unwrap();
    let r = socks_connect(socks, ip(CLIENT_IP), mesh.echo).await;
    assert_eq!(r.err(), Some(NOT_ALLOWED));
    let text = mesh.b.metrics().encode();
    assert_eq!(
        metric_value(
            &text,
            "istio_tcp_connections_failed_total",
            &[
                ("reporter", "destination"),
                ("response_flags", "DENY"),
                ("source_principal", CLIENT_ID)
            ]
        ),
        Some(1.0),
        "{text}"
    );
    // Another principal is unaffected.
    let mut ok = socks_connect(socks, ip(OTHER_IP), mesh.echo)
        .await
        .expect("other allowed");
    roundtrip(&mut ok, b"hello").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_by_namespace_admits_only_that_namespace() {
    let p = policy(
        "allow-client-ns",
        "Allow",
        "namespaces: [{exact: client-ns}]",
    );
    let mesh = Mesh::start(&format!("policies:\n{p}")).await;
    let socks = mesh.a.addrs.socks5.unwrap();
    let mut ok = socks_connect(socks, ip(CLIENT_IP), mesh.echo)
        .await
        .expect("client-ns allowed");
    roundtrip(&mut ok, b"in").await.unwrap();
    let r = socks_connect(socks, ip(OTHER_IP), mesh.echo).await;
    assert_eq!(r.err(), Some(NOT_ALLOWED), "other-ns has no ALLOW match");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_blocks_and_not_ports() {
    let allow = policy(
        "allow-ip",
        "Allow",
        &format!("sourceIps: [\"{CLIENT_IP}/32\"]"),
    );
    let mesh0 = Mesh::start(&format!("policies:\n{allow}")).await;
    let socks = mesh0.a.addrs.socks5.unwrap();
    assert!(
        socks_connect(socks, ip(CLIENT_IP), mesh0.echo)
            .await
            .is_ok()
    );
    assert_eq!(
        socks_connect(socks, ip(OTHER_IP), mesh0.echo).await.err(),
        Some(NOT_ALLOWED)
    );

    // DENY everything except the echo port.
    let mesh = Mesh::start("").await;
    let second = echo_server(ip(ECHO_IP)).await;
    let deny = policy(
        "deny-other-ports",
        "Deny",
        &format!("notDestinationPorts: [{}]", mesh.echo.port()),
    );
    mesh.apply_both(&format!("policies:\n{deny}"));
    let socks = mesh.a.addrs.socks5.unwrap();
    let mut ok = socks_connect(socks, ip(CLIENT_IP), mesh.echo)
        .await
        .expect("echo port allowed");
    roundtrip(&mut ok, b"port ok").await.unwrap();
    assert_eq!(
        socks_connect(socks, ip(CLIENT_IP), second).await.err(),
        Some(NOT_ALLOWED),
        "a port outside notPorts is denied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_added_while_connected_closes_the_connection() {
    let mesh = Mesh::start("").await;
    let socks = mesh.a.addrs.socks5.unwrap();
    let mut denied = socks_connect(socks, ip(CLIENT_IP), mesh.echo)
        .await
        .unwrap();
    let mut spared = socks_connect(socks, ip(OTHER_IP), mesh.echo).await.unwrap();
    roundtrip(&mut denied, b"before").await.unwrap();
    roundtrip(&mut spared, b"before").await.unwrap();

    let deny = policy("late-deny", "Deny", "namespaces: [{exact: client-ns}]");
    mesh.apply_both(&format!("policies:\n{deny}"));

    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(10), denied.read(&mut buf))
        .await
        .expect("the now-denied connection is closed");
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "expected EOF or reset, got {r:?}"
    );
    roundtrip(&mut spared, b"after").await.unwrap();
}
