//! The pods' `portforward` subresource driven by kube-rs's own `Api::<Pod>::portforward`: the
//! WebSocket upgrade, the channel framing kube-rs checks (port prefixes on both channels), data
//! both ways to a local echo server, the error channel, and the errors before the upgrade.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use zmesh_kube_fake::FakeApiServer;

/// Every wait in these tests is bounded: a framing bug must fail, not hang.
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A TCP server that echoes every connection's bytes back.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// An address where nothing listens (bound, then closed).
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn forwards_bytes_both_ways_to_the_registered_target() {
    let api = FakeApiServer::start().await;
    api.set_port_forward("zmesh-system", "ztunnel-a", 15000, echo_server().await);
    let pods: Api<Pod> = Api::namespaced(api.client(), "zmesh-system");

    let mut pf = within("upgrade", pods.portforward("ztunnel-a", &[15000]))
        .await
        .expect("port-forward upgrade");
    let mut stream = pf.take_stream(15000).expect("a stream for 15000");
    let error = pf.take_error(15000).expect("an error future for 15000");

    // Several writes, larger than one frame's worth of a small read, come back in order.
    let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    within("write", stream.write_all(&sent)).await.unwrap();
    let mut got = vec![0u8; sent.len()];
    within("echo", stream.read_exact(&mut got)).await.unwrap();
    assert_eq!(got, sent);

    // Closing our side ends the forward cleanly; no error was reported for the port.
    drop(stream);
    within("join", pf.join()).await.expect("clean end");
    assert_eq!(within("error channel", error).await, None);

    let r = api
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/portforward"))
        .expect("recorded");
    assert_eq!(r.method, "GET");
    assert_eq!(
        r.path,
        "/api/v1/namespaces/zmesh-system/pods/ztunnel-a/portforward"
    );
    assert!(r.query.contains("ports=15000"), "{}", r.query);
}

#[tokio::test]
async fn a_port_nothing_listens_on_reports_connection_refused_on_its_error_channel() {
    let api = FakeApiServer::start().await;
    api.set_port_forward("ns", "p", 8080, echo_server().await);
    api.set_port_forward("ns", "p", 9090, closed_port().await);
    let pods: Api<Pod> = Api::namespaced(api.client(), "ns");

    // Two ports on one connection: 8080 works, 9090 (registered but refused) and 7070
    // (not registered) fail on their own error channels.
    let mut pf = within("upgrade", pods.portforward("p", &[8080, 9090, 7070]))
        .await
        .expect("upgrade");
    for port in [9090, 7070] {
        let err = within("error channel", pf.take_error(port).unwrap())
            .await
            .expect("an error message");
        assert!(
            err.contains(&format!("error forwarding port {port} to pod ns/p"))
                && err.contains("connection refused"),
            "{err}"
        );
    }
    let mut s = pf.take_stream(8080).unwrap();
    within("write", s.write_all(b"ping")).await.unwrap();
    let mut buf = [0u8; 4];
    within("echo", s.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"ping");
    pf.abort();

    // A stored pod with no registered port upgrades, then refuses on the error channel.
    api.insert(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "stored", "namespace": "ns"},
        "spec": {"containers": [{"name": "c", "image": "i"}]}}));
    let mut pf = within("upgrade", pods.portforward("stored", &[15000]))
        .await
        .expect("upgrade");
    let err = within("error channel", pf.take_error(15000).unwrap()).await;
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("connection refused")),
        "{err:?}"
    );
    // The connection then closes: the data stream ends.
    let mut s = pf.take_stream(15000).unwrap();
    let mut rest = Vec::new();
    within("EOF", s.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn unknown_pods_and_forbidden_requests_fail_before_the_upgrade() {
    let api = FakeApiServer::start().await;
    let pods: Api<Pod> = Api::namespaced(api.client(), "ns");
    let err = match within("404", pods.portforward("nope", &[15000])).await {
        Err(e) => e,
        Ok(_) => panic!("an unknown pod must not upgrade"),
    };
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 404);
            assert_eq!(s.message, "pods \"nope\" not found");
        }
        other => panic!("expected a 404 Status, got {other}"),
    }

    api.set_port_forward("ns", "p", 15000, echo_server().await);
    api.fail("GET", "/api/v1/namespaces/ns/pods/p/portforward", 403);
    let err = match within("403", pods.portforward("p", &[15000])).await {
        Err(e) => e,
        Ok(_) => panic!("a forbidden request must not upgrade"),
    };
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 403);
            assert!(
                s.message.contains(
                    "cannot create resource \"pods/portforward\" in API group \"\" in the namespace \"ns\""
                ),
                "{}",
                s.message
            );
        }
        other => panic!("expected a 403 Status, got {other}"),
    }
}
