//! A two-node mesh on loopback for integration tests: ztunnel A (node-a) serves the client
//! workloads, ztunnel B (node-b) serves the echo workload. Workload addresses are 127.0.0.x so
//! a connection to `<workload ip>:<B's HBONE port>` reaches B with the pod address as its local
//! address, exactly as eBPF-steered traffic would.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use zmesh_core::ca::CertificateAuthority;
use zmesh_core::certs::InProcessCa;
use zmesh_core::state::{ConfigSource, LocalConfig, StateError, StateStore, StateUpdate};
use ztunnel::{Config, Ztunnel};

pub const CLIENT_IP: &str = "127.0.0.10";
pub const OTHER_IP: &str = "127.0.0.11";
pub const ECHO_IP: &str = "127.0.0.20";
pub const ECHO_VIP: &str = "127.0.1.20";
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/client-ns/sa/client";
pub const OTHER_ID: &str = "spiffe://cluster.local/ns/other-ns/sa/other";
pub const ECHO_ID: &str = "spiffe://cluster.local/ns/server-ns/sa/echo";

/// Applies one snapshot and reports synced.
pub struct StaticSource(pub StateUpdate);

#[async_trait::async_trait]
impl ConfigSource for StaticSource {
    async fn run(self: Box<Self>, store: Arc<StateStore>) -> Result<(), StateError> {
        store.apply(self.0);
        store.mark_synced();
        Ok(())
    }
    fn name(&self) -> &str {
        "static"
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Echo server: writes back everything, half-closes when the client does.
pub async fn echo_server(ip: IpAddr) -> SocketAddr {
    let l = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

pub fn mesh_yaml(echo_port: u16, policies: &str) -> String {
    format!(
        r#"
workloads:
- uid: cluster1//v1/Pod/client-ns/client
  name: client
  namespace: client-ns
  serviceAccount: client
  workloadIps: ["{CLIENT_IP}"]
  protocol: HBONE
  node: node-a
  canonicalName: client
  canonicalRevision: v1
  workloadName: client
- uid: cluster1//v1/Pod/other-ns/other
  name: other
  namespace: other-ns
  serviceAccount: other
  workloadIps: ["{OTHER_IP}"]
  protocol: HBONE
  node: node-a
  workloadName: other
- uid: cluster1//v1/Pod/server-ns/echo
  name: echo
  namespace: server-ns
  serviceAccount: echo
  workloadIps: ["{ECHO_IP}"]
  protocol: HBONE
  node: node-b
  canonicalName: echo
  canonicalRevision: v1
  workloadName: echo
  services:
    "server-ns/echo.server-ns.svc.cluster.local":
      80: {echo_port}
services:
- name: echo
  namespace: server-ns
  hostname: echo.server-ns.svc.cluster.local
  vips: ["{ECHO_VIP}"]
  ports:
    80: {echo_port}
{policies}
"#
    )
}

pub struct Mesh {
    pub ca: Arc<CertificateAuthority>,
    pub a: Ztunnel,
    pub b: Ztunnel,
    pub echo: SocketAddr,
}

impl Mesh {
    pub async fn start(policies: &str) -> Mesh {
        Self::start_with(policies, |_| {}).await
    }

    /// `tweak` adjusts both configs (e.g. certificate lifetime).
    pub async fn start_with(policies: &str, tweak: impl Fn(&mut Config)) -> Mesh {
        zmesh_core::tls::install_default_provider();
        let _ = zmesh_core::socket::raise_fd_limit();
        let ca = Arc::new(CertificateAuthority::generate("cluster.local").unwrap());
        let echo = echo_server(ip(ECHO_IP)).await;
        let yaml = mesh_yaml(echo.port(), policies);
        // B first, on an OS-assigned port; A is then told where B's HBONE listener is. (Picking
        // free ports up front races with other tests' ephemeral ports.) The tests only send
        // A -> B, so B needs no entry for A.
        let start = |node: &str, peer_b: Option<u16>| {
            let mut cfg = Config::loopback(node);
            if let Some(pb) = peer_b {
                cfg.peer_hbone_ports.insert("node-b".into(), pb);
            }
            cfg.drain_grace = Duration::from_millis(200);
            tweak(&mut cfg);
            let update = LocalConfig::from_str(&yaml).expect("test YAML is valid");
            let ca = ca.clone();
            async move {
                Ztunnel::start(
                    cfg,
                    Box::new(StaticSource(update)),
                    Arc::new(InProcessCa(ca)),
                    None,
                )
                .await
                .expect("ztunnel starts")
            }
        };
        let b = start("node-b", None).await;
        let pb = b.addrs.hbone.expect("B has an HBONE listener").port();
        let a = start("node-a", Some(pb)).await;
        tokio::time::timeout(Duration::from_secs(10), async {
            a.wait_ready().await;
            b.wait_ready().await;
        })
        .await
        .expect("ztunnels become ready");
        Mesh { ca, a, b, echo }
    }

    /// Apply a config change to both ztunnels (as a control plane push would).
    pub fn apply_both(&self, yaml: &str) {
        for zt in [&self.a, &self.b] {
            let mut update = LocalConfig::from_str(yaml).expect("valid YAML");
            // A partial update, not a snapshot: keep the workloads.
            update.replace_all = false;
            zt.state().apply(update);
        }
    }
}

/// SOCKS5 CONNECT through `socks` from source address `src`; returns the stream or the
/// server's reply code.
pub async fn socks_connect(
    socks: SocketAddr,
    src: IpAddr,
    dst: SocketAddr,
) -> Result<TcpStream, u8> {
    let sock = TcpSocket::new_v4().unwrap();
    zmesh_core::socket::bind_address_no_port(&sock).unwrap();
    sock.bind(SocketAddr::new(src, 0)).unwrap();
    let mut s = sock.connect(socks).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut r = [0u8; 2];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(r, [5, 0], "no-auth accepted");
    let mut req = vec![5, 1, 0];
    match dst.ip() {
        IpAddr::V4(v4) => {
            req.push(1);
            req.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            req.push(4);
            req.extend_from_slice(&v6.octets());
        }
    }
    req.extend_from_slice(&dst.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut rep = [0u8; 10];
    match tokio::time::timeout(Duration::from_secs(15), s.read_exact(&mut rep)).await {
        Ok(Ok(_)) => {}
        _ => return Err(0xff),
    }
    if rep[1] != 0 {
        return Err(rep[1]);
    }
    Ok(s)
}

/// Send `msg` and expect it echoed back.
pub async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await?;
    assert_eq!(back, msg);
    Ok(())
}

/// Sum of the samples of `metric` whose labels include all of `labels`.
pub fn metric_value(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    zmesh_core::metrics::sample_sum(text, metric, labels)
}

/// Poll until `f` is true (connections close asynchronously).
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}
