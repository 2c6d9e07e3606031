//! The waypoint configured only over xDS: a controller on a directory of Kubernetes YAML, two
//! ztunnels and the waypoint (in-process [`waypoint::app::App`] or the real `waypoint`
//! binary), certificates from the controller's CA. See `xds_mesh` for the topology.

mod xds_mesh;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xds_mesh::*;
use zmesh_core::metrics::sample_sum;

/// What the waypoint subscribes to: the state store's types and the L7 ones.
const XDS_TYPES: [&str; 5] = [
    zmesh_proto::ADDRESS_TYPE_URL,
    zmesh_proto::AUTHORIZATION_TYPE_URL,
    zmesh_proto::L7_SERVICE_TYPE_URL,
    zmesh_proto::L7_AUTHZ_TYPE_URL,
    zmesh_proto::L7_TELEMETRY_TYPE_URL,
];

async fn count(mesh: &XdsMesh, n: usize) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for _ in 0..n {
        let (status, body) = mesh.get(&[]).await.expect("request through the waypoint");
        assert_eq!(status, 200, "{body}");
        *m.entry(body).or_insert(0) += 1;
    }
    m
}

/// (a) VirtualService all → v1 reaches only v1; rewriting the file to v2 is pushed over xDS
/// to the running waypoint (same stream, no restart) and traffic moves to v2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_service_change_is_pushed_to_the_waypoint_over_xds() {
    let mesh = XdsMesh::start(Net(40), "vs").await;
    let (wp, status) = mesh.start_waypoint().await;
    tokio::time::timeout(WAIT, wp.wait_ready())
        .await
        .expect("waypoint becomes ready after the first sync of all four types");
    assert!(status.synced.load(Ordering::Relaxed));
    let ready = wp.addrs.readiness.unwrap();
    assert_eq!(local_get(ready, "/healthz/ready").await.unwrap().0, 200);

    // /metrics (15020) counts the xDS responses of the sync for each of the four types.
    let metrics = wp.addrs.metrics.unwrap();
    let (code, text) = local_get(metrics, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    let xds_messages = |text: &str, t: &str| {
        sample_sum(text, "istio_xds_message_total", &[("url", t)]).unwrap_or(0.0)
    };
    for t in XDS_TYPES {
        assert!(xds_messages(&text, t) >= 1.0, "{t}: {text}");
        assert!(
            sample_sum(&text, "istio_xds_message_bytes_total", &[("url", t)]).unwrap_or(0.0) > 0.0,
            "{t}: {text}"
        );
    }
    let series = text
        .lines()
        .filter(|l| l.starts_with("istio_xds_message_total{"))
        .count();
    assert_eq!(series, XDS_TYPES.len(), "{text}");
    let l7_before = xds_messages(&text, zmesh_proto::L7_SERVICE_TYPE_URL);

    // The L7 config it holds is visible in /config_dump.
    let admin = wp.addrs.admin.unwrap();
    let (code, dump) = local_get(admin, "/config_dump").await.unwrap();
    let dump: String = dump.split_whitespace().collect();
    assert_eq!(code, 200);
    assert!(
        dump.contains("default/reviews.default.svc.cluster.local"),
        "{dump}"
    );
    assert!(dump.contains("\"subset\":\"v1\""), "{dump}");
    assert!(dump.contains("\"synced\":true"), "{dump}");

    let m = count(&mesh, 20).await;
    assert_eq!(m.get("reviews-v1"), Some(&20), "all to v1: {m:?}");

    // Change the VirtualService file; the controller picks it up and pushes it.
    write_atomic(&mesh.dir.join("routing.yaml"), &routing_yaml("v2"));
    eventually("the new route reaches the waypoint", || async {
        matches!(mesh.get(&[]).await, Ok((200, b)) if b == "reviews-v2")
    })
    .await;
    let m = count(&mesh, 20).await;
    assert_eq!(m.get("reviews-v2"), Some(&20), "all to v2: {m:?}");
    assert_eq!(
        status.connects.load(Ordering::Relaxed),
        1,
        "pushed on the same stream"
    );
    assert_eq!(status.nacks_sent.load(Ordering::Relaxed), 0);
    // The route change came as one more ServiceConfig response, on the same stream.
    let (_, text) = local_get(metrics, "/metrics").await.unwrap();
    assert!(
        xds_messages(&text, zmesh_proto::L7_SERVICE_TYPE_URL) > l7_before,
        "{text}"
    );
    assert_eq!(
        sample_sum(&text, "istio_xds_connection_terminations_total", &[]),
        None,
        "{text}"
    );
    let (_, dump) = local_get(admin, "/config_dump").await.unwrap();
    let dump: String = dump.split_whitespace().collect();
    assert!(dump.contains("\"subset\":\"v2\""), "{dump}");

    wp.shutdown().await;
    mesh.shutdown().await;
}

/// Start the real `waypoint` binary against the mesh's controller; returns it once
/// `/healthz/ready` answers 200.
async fn spawn_waypoint_binary(mesh: &XdsMesh, log: &std::path::Path) -> tokio::process::Child {
    let ready_port = free_port("127.0.0.1");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let wp = mesh.net.waypoint();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_waypoint"))
        .args(["--xds-address", &mesh.xds_url()])
        .arg("--xds-root-cert")
        .arg(mesh.root_cert())
        .arg("--token-file")
        .arg(mesh.token_file("node-w"))
        .args(["--node", "node-w", "--pod-name", "waypoint-0"])
        .args(["--namespace", "default", "--service-account", "waypoint"])
        .args(["--instance-ip", &wp.to_string()])
        .args(["--hbone", &format!("{wp}:15008")])
        .args(["--admin", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .args(["--readiness", &format!("127.0.0.1:{ready_port}")])
        .args(["--peer-hbone-port", &format!("node-a={}", mesh.pa)])
        .args(["--peer-hbone-port", &format!("node-b={}", mesh.pb)])
        .args(["--drain-grace-secs", "1"])
        .env_remove("POD_NAMESPACE")
        .env_remove("SERVICE_ACCOUNT")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("waypoint binary starts");
    let ready = SocketAddr::from(([127, 0, 0, 1], ready_port));
    eventually("the waypoint binary becomes ready", || async {
        matches!(local_get(ready, "/healthz/ready").await, Ok((200, _)))
    })
    .await;
    child
}

/// (b) The waypoint binary killed (SIGKILL) mid-traffic: the in-flight request and every new
/// one fail — ztunnel never bypasses the waypoint — and once restarted it serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_waypoint_fails_closed_and_serves_again_after_restart() {
    let mesh = XdsMesh::start(Net(41), "kill").await;
    let log = mesh.dir.join("waypoint.log");
    let mut child = spawn_waypoint_binary(&mesh, &log).await;
    let m = count(&mesh, 5).await;
    assert_eq!(m.get("reviews-v1"), Some(&5), "{m:?}");

    // A request in flight (the upstream takes 2 s) when the process is killed.
    let s = mesh.connect().await.unwrap();
    let mut c = H1::handshake(s).await.unwrap();
    let inflight =
        tokio::spawn(
            async move { tokio::time::timeout(WAIT, c.get(&[("x-sleep-ms", "2000")])).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.start_kill().unwrap();
    let _ = child.wait().await;
    match inflight.await.unwrap() {
        Ok(Ok((200, body))) => panic!("in-flight request completed after SIGKILL: {body}"),
        Ok(_) => {}
        Err(_) => panic!("in-flight request hung after the waypoint died"),
    }
    for _ in 0..5 {
        let r = mesh.get(&[]).await;
        assert!(
            !matches!(r, Ok((200, _))),
            "no bypass while the waypoint is down: {r:?}"
        );
    }

    // Restarted (same address): it syncs again and serves.
    let mut child = spawn_waypoint_binary(&mesh, &log).await;
    eventually("traffic flows through the restarted waypoint", || async {
        matches!(mesh.get(&[]).await, Ok((200, _)))
    })
    .await;
    let m = count(&mesh, 10).await;
    assert_eq!(m.get("reviews-v1"), Some(&10), "{m:?}");

    // SIGTERM drains and exits cleanly.
    let pid = child.id().expect("running");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let st = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(st.success(), "exit status after SIGTERM: {st:?}");
    mesh.shutdown().await;
}

/// (c) HTTP/2 (prior knowledge) through the waypoint: concurrent streams on one connection
/// reach v1 over HTTP/2 upstream; a client sending an HTTP/2 protocol error gets GOAWAY and
/// loses only its own connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_through_the_waypoint_and_protocol_errors_stay_per_connection() {
    let mesh = XdsMesh::start(Net(42), "h2").await;
    let (wp, _) = mesh.start_waypoint().await;
    tokio::time::timeout(WAIT, wp.wait_ready())
        .await
        .expect("ready");

    let s = mesh.connect().await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .expect("HTTP/2 handshake through the waypoint");
    tokio::spawn(conn);
    let h2_get = |mut send: hyper::client::conn::http2::SendRequest<Full<Bytes>>| async move {
        let req = hyper::Request::get("http://reviews:9080/reviews/0")
            .body(Full::new(Bytes::new()))
            .unwrap();
        send.ready().await.map_err(|e| e.to_string())?;
        let r = tokio::time::timeout(WAIT, send.send_request(req))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        let version = r
            .headers()
            .get("x-seen-version")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = r.into_body().collect().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((status, version, body.to_bytes()))
    };
    let streams: Vec<_> = (0..4).map(|_| tokio::spawn(h2_get(send.clone()))).collect();
    for t in streams {
        let (status, version, body) = t.await.unwrap().expect("HTTP/2 request");
        assert_eq!(status, 200);
        assert_eq!(&body[..], b"reviews-v1");
        assert_eq!(version, "HTTP/2.0", "upstream leg is HTTP/2 too");
    }

    // A second client: preface, SETTINGS, then HEADERS on stream 0 (a connection error).
    let mut bad = mesh.connect().await.unwrap();
    bad.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    bad.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]).await.unwrap();
    bad.write_all(&[0, 0, 1, 0x1, 0x5, 0, 0, 0, 0, 0x82])
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), bad.read_to_end(&mut buf))
        .await
        .expect("the waypoint closes the offending connection")
        .ok();
    let goaway = frames(&buf).into_iter().find(|(t, _)| *t == 0x7);
    let (_, payload) = goaway.unwrap_or_else(|| panic!("no GOAWAY in {buf:?}"));
    let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
    assert_eq!(code, 0x1, "GOAWAY PROTOCOL_ERROR");

    // The well-behaved connection is unaffected.
    let (status, _, body) = h2_get(send.clone())
        .await
        .expect("first connection still works");
    assert_eq!((status, &body[..]), (200, &b"reviews-v1"[..]));

    wp.shutdown().await;
    mesh.shutdown().await;
}

/// HTTP/2 frames in `buf`: `(type, payload)`; a truncated tail is ignored.
fn frames(buf: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 9 <= buf.len() {
        let len =
            (usize::from(buf[i]) << 16) | (usize::from(buf[i + 1]) << 8) | usize::from(buf[i + 2]);
        let t = buf[i + 3];
        if i + 9 + len > buf.len() {
            break;
        }
        out.push((t, buf[i + 9..i + 9 + len].to_vec()));
        i += 9 + len;
    }
    out
}
