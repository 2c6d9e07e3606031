//! The controller's admin (`/config_dump`, `/quitquitquit`) and readiness (`/healthz/ready`)
//! servers over real sockets: readiness 503 until the config source has synced (file source;
//! Kubernetes source held back by an API server that fails the Pod list), the dump's served
//! resources and connected ADS clients with their ACK/NACK, `/quitquitquit` ending the
//! `zmesh-controller` process, and a non-loopback admin address refused.

mod common_ads;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use common_ads::{NODE_ID, RawClient, WAIT, temp_dir};
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use zmesh_controller::admin::{AdminServers, CA, SOURCE_SYNC, XDS_LISTENERS};
use zmesh_controller::controller::{Controller, ControllerConfig, ControllerError};
use zmesh_controller::sources::kube::KubeSource;
use zmesh_controller::store::ObjectStore;
use zmesh_kube_fake::FakeApiServer;
use zmesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: cart
  namespace: shop
  labels: {app: cart}
spec:
  nodeName: node-a
  serviceAccountName: cart
status:
  podIP: 10.1.0.1
"#;
const CART_UID: &str = "Kubernetes//v1/Pod/shop/cart";

/// One HTTP/1 request on a fresh connection; (status, body).
async fn request(addr: SocketAddr, method: Method, path: &str) -> (StatusCode, String) {
    let go = async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = send.send_request(req).await.expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(WAIT, go)
        .await
        .expect("answer within the deadline")
}

async fn ready(addr: SocketAddr) -> (StatusCode, String) {
    request(addr, Method::GET, "/healthz/ready").await
}

async fn dump(addr: SocketAddr) -> Value {
    let (status, body) = request(addr, Method::GET, "/config_dump").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_str(&body).expect("config_dump is JSON")
}

/// Poll the dump until `f` holds (or panic with the last dump after [`WAIT`]).
async fn dump_until(addr: SocketAddr, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let d = dump(addr).await;
        if f(&d) {
            return d;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}; last dump:\n{d:#}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ready_until(addr: SocketAddr, want: StatusCode) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = ready(addr).await;
        if status == want {
            return body;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("readiness stayed {status} ({body}), expected {want}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn lo() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 0)))
}

fn client<'a>(d: &'a Value, node_id: &str) -> Option<&'a Value> {
    d["clients"]
        .as_array()?
        .iter()
        .find(|c| c["node_id"] == node_id)
}

#[tokio::test]
async fn file_source_readiness_and_config_dump_with_a_connected_client() {
    common_ads::init();
    let dir = temp_dir("admin-file");
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    let cfg = ControllerConfig {
        admin_addr: lo(),
        readiness_addr: lo(),
        debounce: Duration::from_millis(20),
        ..ControllerConfig::loopback(&dir)
    };

    // Admin first, as the binary does: nothing is loaded yet, so not ready, naming why.
    let admin = AdminServers::start(&cfg).await.unwrap();
    let (admin_addr, ready_addr) = (admin.admin.unwrap(), admin.readiness.unwrap());
    let (status, body) = ready(ready_addr).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    for blocker in [SOURCE_SYNC, CA, XDS_LISTENERS] {
        assert!(body.contains(blocker), "{blocker} missing from {body:?}");
    }
    let d = dump(admin_addr).await;
    assert_eq!(d["ready"], false);
    assert_eq!(d["source"]["synced"], false, "{d:#}");
    assert!(d["resources"].is_null(), "nothing served yet: {d:#}");

    let controller = Controller::start_with(cfg, admin).await.unwrap();
    assert_eq!(controller.addrs.admin, Some(admin_addr));
    let (status, body) = ready(ready_addr).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ready\n"));

    let d = dump(admin_addr).await;
    assert_eq!(d["ready"], true);
    assert_eq!(d["source"]["kind"], "file", "{d:#}");
    assert_eq!(d["source"]["dir"], dir.display().to_string());
    assert_eq!(d["source"]["synced"], true);
    assert_eq!(d["source"]["errors"], serde_json::json!([]));
    // The CA root generated into the config directory, and its fingerprint.
    assert_eq!(d["ca"]["source"]["kind"], "generated", "{d:#}");
    assert_eq!(d["ca"]["trust_domain"], "cluster.local");
    let fp = d["ca"]["root_sha256_fingerprint"].as_str().unwrap();
    assert_eq!(fp.len(), 32 * 3 - 1, "{fp}");
    assert!(d["ca"]["not_after"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        d["identity"],
        "spiffe://cluster.local/ns/istio-system/sa/zmesh-controller"
    );
    assert_eq!(
        d["listeners"]["xds_plaintext"],
        controller.addrs.xds_plaintext.unwrap().to_string()
    );
    // What is served: the pod's Address with the cache's version, and the (empty) type the
    // server answers anyway.
    let addresses = &d["resources"][ADDRESS_TYPE_URL];
    assert_eq!(addresses["count"], 1, "{d:#}");
    let (_, snap) = controller.cache.snapshot(ADDRESS_TYPE_URL);
    let cached = snap.get(CART_UID).expect("cart cached");
    assert_eq!(addresses["resources"][0]["name"], CART_UID);
    assert_eq!(addresses["resources"][0]["version"], &*cached.version);
    assert_eq!(
        addresses["version"],
        controller.cache.version(ADDRESS_TYPE_URL)
    );
    assert_eq!(d["resources"][AUTHORIZATION_TYPE_URL]["count"], 0);
    assert_eq!(d["clients"], serde_json::json!([]));

    // A proxy connects: ACKs Address, NACKs Authorization.
    let mut ads = RawClient::connect(controller.addrs.xds_plaintext.unwrap()).await;
    ads.subscribe(ADDRESS_TYPE_URL, &[], Default::default())
        .await;
    let r = ads.recv().await;
    assert_eq!(r.type_url, ADDRESS_TYPE_URL);
    ads.ack(&r).await;
    ads.subscribe(AUTHORIZATION_TYPE_URL, &[], Default::default())
        .await;
    let r2 = ads.recv().await;
    assert_eq!(r2.type_url, AUTHORIZATION_TYPE_URL);
    ads.nack(&r2, "policy shop/x: unknown field").await;

    let d = dump_until(admin_addr, "the client's ACK and NACK", |d| {
        client(d, NODE_ID).is_some_and(|c| {
            !c["types"][ADDRESS_TYPE_URL]["last_ack"].is_null()
                && !c["types"][AUTHORIZATION_TYPE_URL]["last_nack"].is_null()
        })
    })
    .await;
    let c = client(&d, NODE_ID).unwrap();
    assert_eq!(c["listener"], "plaintext");
    assert_eq!(c["proxy_type"], "ztunnel");
    assert_eq!(c["pod"], "istio-system/ztunnel-x");
    let addr_sub = &c["types"][ADDRESS_TYPE_URL];
    assert_eq!(addr_sub["wildcard"], true);
    assert_eq!(addr_sub["acked_resources"], 1);
    assert_eq!(addr_sub["last_ack"]["version"], r.system_version_info);
    assert_eq!(addr_sub["last_ack"]["nonce"], r.nonce);
    assert!(addr_sub["last_nack"].is_null());
    let nack = &c["types"][AUTHORIZATION_TYPE_URL]["last_nack"];
    assert_eq!(nack["error"], "policy shop/x: unknown field");
    assert_eq!(nack["version"], r2.system_version_info);
    assert_eq!(nack["code"], 3);

    // The client goes away: it leaves the list.
    drop(ads);
    dump_until(admin_addr, "the client gone", |d| {
        d["clients"] == serde_json::json!([])
    })
    .await;

    // /quitquitquit asks the embedder to stop (the binary then shuts down, see below).
    let quit = controller.quit_token();
    let (status, _) = request(admin_addr, Method::POST, "/quitquitquit").await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::timeout(WAIT, quit.cancelled())
        .await
        .expect("quit token cancelled");
    let xds = controller.addrs.xds_plaintext.unwrap();
    controller.shutdown().await;
    assert!(TcpStream::connect(xds).await.is_err(), "xDS port closed");
    assert!(
        TcpStream::connect(ready_addr).await.is_err(),
        "readiness closed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Kubernetes source: the controller is up (CA loaded, ports bound) but the API server
/// fails the Pod list, so the first sync is not done: 503 naming only the sync, and the dump
/// names the kind still pending. Once the list succeeds: 200 and the pod is served.
#[tokio::test]
async fn kubernetes_source_not_ready_until_every_kind_is_listed() {
    common_ads::init();
    let api = FakeApiServer::start().await;
    for doc in MESH.split("\n---\n") {
        let v: Value = serde_saphyr::from_str(doc).unwrap();
        api.insert(v);
    }
    api.fail("GET", "/api/v1/pods", 500);

    let store = ObjectStore::new();
    let cfg = ControllerConfig {
        config_dir: None,
        file_source: false,
        store: Some(store.clone()),
        admin_addr: lo(),
        readiness_addr: lo(),
        debounce: Duration::from_millis(20),
        ..ControllerConfig::loopback("unused")
    };
    let admin = AdminServers::start(&cfg).await.unwrap();
    let (admin_addr, ready_addr) = (admin.admin.unwrap(), admin.readiness.unwrap());
    let stop = CancellationToken::new();
    let source = KubeSource::new(api.client());
    admin
        .status
        .track_kube_sync(source.pending_kinds(), stop.clone());
    let st = store.clone();
    let source_stop = stop.clone();
    tokio::spawn(async move { source.run(st, source_stop).await });
    let controller = Controller::start_with(cfg, admin).await.unwrap();

    // Every other kind lists (or is not served); Pod keeps failing.
    let d = dump_until(admin_addr, "only Pod pending", |d| {
        d["source"]["pending_kinds"] == serde_json::json!(["Pod"])
    })
    .await;
    assert_eq!(d["source"]["kind"], "kubernetes");
    assert_eq!(d["source"]["synced"], false);
    assert_eq!(d["ca"]["source"]["kind"], "generated", "{d:#}");
    let (status, body) = ready(ready_addr).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, format!("not ready: {SOURCE_SYNC}\n"));
    assert_eq!(d["resources"][ADDRESS_TYPE_URL]["count"], 0, "{d:#}");

    api.clear_failures();
    ready_until(ready_addr, StatusCode::OK).await;
    let d = dump_until(admin_addr, "the pod served", |d| {
        d["resources"][ADDRESS_TYPE_URL]["count"] == 1
    })
    .await;
    assert_eq!(d["source"]["synced"], true);
    assert_eq!(d["source"]["pending_kinds"], serde_json::json!([]));
    assert_eq!(
        d["resources"][ADDRESS_TYPE_URL]["resources"][0]["name"],
        CART_UID
    );
    stop.cancel();
    controller.shutdown().await;
}

#[tokio::test]
async fn admin_on_a_non_loopback_address_is_refused() {
    let cfg = ControllerConfig {
        admin_addr: Some(SocketAddr::from(([0, 0, 0, 0], 0))),
        ..ControllerConfig::loopback("unused")
    };
    match AdminServers::start(&cfg).await {
        Err(e @ ControllerError::AdminNotLoopback(_)) => {
            assert!(e.to_string().contains("loopback"), "{e}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a non-loopback admin address must be refused"),
    }
}

fn free_port() -> u16 {
    zmesh_core::socket::unused_ports([127, 0, 0, 1].into(), 1).expect("a free port")[0]
}

/// The binary: flags, readiness, and `/quitquitquit` as a graceful stop (exit 0).
#[tokio::test]
async fn quitquitquit_stops_the_controller_process() {
    let dir = temp_dir("admin-bin");
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    let [admin, ready_port, xds] = [free_port(), free_port(), free_port()];
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let ready_addr = SocketAddr::from(([127, 0, 0, 1], ready_port));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_zmesh-controller"))
        .arg("--config-dir")
        .arg(&dir)
        .args(["--xds-plaintext-addr", &format!("127.0.0.1:{xds}")])
        .args(["--xds-tls-addr", "off", "--metrics-addr", "off"])
        .args(["--admin-addr", &admin_addr.to_string()])
        .args(["--readiness-addr", &ready_addr.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start zmesh-controller");

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("zmesh-controller exited early: {status}");
        }
        if TcpStream::connect(ready_addr).await.is_ok() && ready(ready_addr).await.0.is_success() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "zmesh-controller not ready in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let d = dump(admin_addr).await;
    assert_eq!(d["resources"][ADDRESS_TYPE_URL]["count"], 1, "{d:#}");
    let (status, body) = request(admin_addr, Method::GET, "/logging").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the binary hands its log handle over: {body}"
    );

    let (status, _) = request(admin_addr, Method::POST, "/quitquitquit").await;
    assert_eq!(status, StatusCode::OK);
    let exit = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("zmesh-controller exits after /quitquitquit")
        .expect("wait");
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut stderr).await;
    }
    assert!(exit.success(), "exit {exit}:\n{stderr}");
    assert!(
        stderr.contains("/quitquitquit received") && stderr.contains("controller stopped"),
        "graceful stop logged:\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
