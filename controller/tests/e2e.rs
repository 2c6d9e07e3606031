//! End to end on loopback: a controller, and two ztunnels configured only with its address, a
//! root bundle and a per-node bootstrap token. Each ztunnel syncs over TLS xDS, becomes ready,
//! obtains certificates for its local workloads from the controller's CA (and is refused
//! identities of the other node), and traffic flows between them over HBONE mTLS with those
//! certificates.

mod common_ads;
use common_ads as common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use zmesh_controller::ca::{TOKENS_DIR, write_bootstrap_token};
use zmesh_controller::controller::{Controller, ControllerConfig};
use zmesh_controller::store::{ObjectKey, ObjectStore};
use zmesh_core::metrics::sample_sum;
use zmesh_core::xds::{
    CaClient, CaClientConfig, ControlPlaneEndpoint, ControlPlaneTls, TokenSource, XdsClient,
    XdsConfig,
};
use zmesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use ztunnel::{Config, Ztunnel};

const CLIENT_IP: &str = "127.0.0.10";
const ECHO_IP: &str = "127.0.0.20";

fn free_port() -> u16 {
    zmesh_core::socket::unused_ports([0, 0, 0, 0].into(), 1).expect("a free port")[0]
}

async fn echo_server(ip: IpAddr) -> SocketAddr {
    let l = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// SOCKS5 CONNECT (no auth, IPv4) from `src` through `socks` to `dst`.
async fn socks_connect(socks: SocketAddr, src: IpAddr, dst: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(src, 0)).unwrap();
    let mut s = sock.connect(socks).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut r = [0u8; 2];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(r, [5, 0]);
    let IpAddr::V4(v4) = dst.ip() else {
        unreachable!()
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.octets());
    req.extend_from_slice(&dst.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await.unwrap();
    assert_eq!(rep[1], 0, "SOCKS5 CONNECT succeeded");
    s
}

/// `GET /metrics` from a ztunnel's Prometheus port: the body.
async fn get_metrics(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("metrics answer in time")
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    body.to_string()
}

#[tokio::test]
async fn ztunnels_fed_by_the_controller_become_ready_and_tunnel() {
    init();
    let _ = zmesh_core::socket::raise_fd_limit();
    let dir = temp_dir("e2e");
    let tokens = dir.join(TOKENS_DIR);
    let token_files = ["node-a", "node-b"].map(|n| {
        write_bootstrap_token(&tokens, n).unwrap();
        tokens.join(format!("{n}.token"))
    });
    let echo = echo_server(ECHO_IP.parse().unwrap()).await;

    let store = ObjectStore::new();
    for p in [
        pod("client-ns", "client", "client", CLIENT_IP, "node-a"),
        pod("server-ns", "echo", "echo", ECHO_IP, "node-b"),
    ] {
        store.upsert(ObjectKey::of(&p).unwrap(), p);
    }
    let controller = Controller::start(ControllerConfig {
        file_source: false,
        store: Some(store),
        translator: Some(Arc::new(pods_translator)),
        debounce: Duration::from_millis(50),
        ..ControllerConfig::loopback(&dir)
    })
    .await
    .unwrap();
    let url = format!("https://{}", controller.addrs.xds_tls.unwrap());
    // What an operator hands a node: the root bundle file and its token file.
    let roots = ControlPlaneTls::load_roots(&dir.join("ca/root-cert.pem")).unwrap();
    let tls = ControlPlaneTls {
        roots,
        identities: vec!["spiffe://cluster.local/ns/istio-system/sa/zmesh-controller".into()],
        dns_name: None,
    };

    let (pa, pb) = (free_port(), free_port());
    let mut zts = Vec::new();
    for (node, port, token) in [
        ("node-a", pa, &token_files[0]),
        ("node-b", pb, &token_files[1]),
    ] {
        let mut cfg = Config::loopback(node);
        cfg.hbone_addr = SocketAddr::new("0.0.0.0".parse().unwrap(), port);
        cfg.peer_hbone_ports.insert("node-a".into(), pa);
        cfg.peer_hbone_ports.insert("node-b".into(), pb);
        cfg.drain_grace = Duration::from_millis(200);
        let endpoint = ControlPlaneEndpoint::new(url.clone(), Some(tls.clone()));
        let mut xcfg = XdsConfig::ztunnel(
            endpoint.clone(),
            node,
            &format!("ztunnel-{node}"),
            "istio-system",
            None,
        );
        xcfg.token = TokenSource::File(token.clone());
        let ca = CaClient::new(CaClientConfig::new(
            endpoint,
            TokenSource::File(token.clone()),
        ))
        .unwrap();
        let zt = Ztunnel::start(cfg, Box::new(XdsClient::new(xcfg)), Arc::new(ca), None)
            .await
            .unwrap();
        zts.push(zt);
    }
    tokio::time::timeout(WAIT, async {
        for zt in &zts {
            zt.wait_ready().await;
        }
    })
    .await
    .expect("ztunnels become ready after the first xDS sync");
    for zt in &zts {
        let st = zt.state().read();
        assert_eq!(st.workloads().count(), 2);
        assert!(st.workload_by_ip(ECHO_IP.parse().unwrap()).is_some());
    }
    // Each ztunnel's /metrics (15020) counts the xDS responses of its sync, per type URL,
    // and only for the types it subscribed to.
    for zt in &zts {
        let text = get_metrics(zt.addrs.metrics.unwrap()).await;
        for t in [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL] {
            let url = [("url", t)];
            assert!(
                sample_sum(&text, "istio_xds_message_total", &url).unwrap_or(0.0) >= 1.0,
                "{t}: {text}"
            );
            assert!(
                sample_sum(&text, "istio_xds_message_bytes_total", &url).unwrap_or(0.0) > 0.0,
                "{t}: {text}"
            );
        }
        let urls: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_xds_message_total{"))
            .collect();
        assert_eq!(urls.len(), 2, "{text}");
    }

    // Certificates for local workloads come from the controller; another node's are refused.
    let client_id = "spiffe://cluster.local/ns/client-ns/sa/client"
        .parse()
        .unwrap();
    let echo_id = "spiffe://cluster.local/ns/server-ns/sa/echo"
        .parse()
        .unwrap();
    let cert = zts[0].certs().fetch(&client_id).await.unwrap();
    assert_eq!(cert.roots, vec![controller.ca.root_der()]);
    let err = zts[0].certs().fetch(&echo_id).await.unwrap_err();
    assert!(err.to_string().contains("PermissionDenied"), "{err}");
    zts[1].certs().fetch(&echo_id).await.unwrap();

    // Traffic: client (node-a) → ztunnel A → HBONE mTLS → ztunnel B → echo (node-b).
    let socks = zts[0].addrs.socks5.unwrap();
    let mut s = tokio::time::timeout(WAIT, socks_connect(socks, CLIENT_IP.parse().unwrap(), echo))
        .await
        .expect("connect in time");
    s.write_all(b"hello through the mesh").await.unwrap();
    let mut buf = [0u8; 22];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"hello through the mesh");
    drop(s);

    // A pod removed at the controller disappears from both ztunnels.
    controller
        .store
        .remove(&ObjectKey::new("Pod", "client-ns", "client"));
    for zt in &zts {
        let state = zt.state().clone();
        eventually("pod removal reaches the ztunnel", move || {
            state
                .read()
                .workload_by_ip(CLIENT_IP.parse().unwrap())
                .is_none()
        })
        .await;
    }
    for zt in zts {
        zt.shutdown().await;
    }
    controller.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn plaintext_xds_refuses_a_non_loopback_address() {
    init();
    let dir = temp_dir("plaintext-remote");
    let mut cfg = ControllerConfig::loopback(&dir);
    cfg.xds_plaintext_addr = Some(SocketAddr::from(([0, 0, 0, 0], 0)));
    let err = match Controller::start(cfg).await {
        Ok(_) => panic!("plaintext xDS on 0.0.0.0 must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("loopback") && err.contains("0.0.0.0:0") && err.contains("15012"),
        "{err}"
    );
    let mut cfg = ControllerConfig::loopback(&dir);
    cfg.xds_plaintext_addr = Some(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0)));
    let ok = Controller::start(cfg).await;
    // [::1] is loopback too (binding may fail only where IPv6 is disabled).
    if let Err(e) = &ok {
        assert!(!e.to_string().contains("must listen on a loopback"), "{e}");
    }
}
