//! A mesh configured only by a controller: an in-process `Controller` on a temporary config
//! directory of Kubernetes YAML (ambient namespace `default` using waypoint `waypoint`,
//! reviews v1/v2 on node-b, productpage on node-a, the waypoint pod on node-w), two ztunnels
//! and a waypoint, all fed by xDS over TLS and issued certificates by the controller's CA with
//! per-node bootstrap tokens. Each test uses its own `127.0.<net>.0/24` so tests of one binary
//! can run in parallel.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use waypoint::app::{App, AppConfig};
use waypoint::store::L7Store;
use zmesh_controller::ca::{TOKENS_DIR, write_bootstrap_token};
use zmesh_controller::controller::{Controller, ControllerConfig};
use zmesh_core::xds::{
    CaClient, CaClientConfig, ControlPlaneEndpoint, ControlPlaneTls, TokenSource, XdsClient,
    XdsConfig, XdsStatus,
};
use ztunnel::{Config, Ztunnel};

pub const WAIT: Duration = Duration::from_secs(20);
pub const CONTROLLER_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/zmesh-controller";

pub fn free_port(ip: &str) -> u16 {
    let ip = ip.parse().expect("an IP address");
    zmesh_core::socket::unused_ports(ip, 1).expect("a free port")[0]
}

/// Addresses of one test's mesh.
#[derive(Clone, Copy, Debug)]
pub struct Net(pub u8);

impl Net {
    pub fn ip(&self, host: u8) -> IpAddr {
        IpAddr::from([127, 0, self.0, host])
    }
    pub fn client(&self) -> IpAddr {
        self.ip(10)
    }
    pub fn v1(&self) -> IpAddr {
        self.ip(21)
    }
    pub fn v2(&self) -> IpAddr {
        self.ip(22)
    }
    pub fn waypoint(&self) -> IpAddr {
        self.ip(30)
    }
    pub fn reviews_vip(&self) -> SocketAddr {
        SocketAddr::new(self.ip(121), 9080)
    }
}

/// Sample server on `addr` (HTTP/1.1 and HTTP/2 prior knowledge): answers `reviews-<v>` with
/// `x-seen-version` (the HTTP version it received) and `x-seen-traceparent` (the
/// `traceparent` it received, if any); honours `x-sleep-ms`.
pub async fn reviews_server(addr: SocketAddr, version: &'static str) {
    let l = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let sleep = req
                            .headers()
                            .get("x-sleep-ms")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok());
                        if let Some(ms) = sleep {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        let seen = format!("{:?}", req.version());
                        let mut r = hyper::Response::new(Full::new(Bytes::from(format!(
                            "reviews-{version}"
                        ))));
                        r.headers_mut()
                            .insert("x-seen-version", seen.parse().unwrap());
                        if let Some(tp) = req.headers().get("traceparent") {
                            r.headers_mut().insert("x-seen-traceparent", tp.clone());
                        }
                        Ok::<_, Infallible>(r)
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
}

pub fn base_yaml(net: Net) -> String {
    let (c, v1, v2, wp, vip) = (
        net.client(),
        net.v1(),
        net.v2(),
        net.waypoint(),
        net.reviews_vip().ip(),
    );
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: default}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
# No clusterIP: ztunnels address the waypoint by hostname (its pods' IPs, port 15008).
apiVersion: v1
kind: Service
metadata:
  name: waypoint
  namespace: default
  labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}
spec:
  selector: {{gateway.networking.k8s.io/gateway-name: waypoint}}
  ports: [{{name: mesh, port: 15008}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-0
  namespace: default
  labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {{nodeName: node-w, serviceAccountName: waypoint}}
status: {{podIP: {wp}}}
---
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: default}}
spec:
  clusterIP: {vip}
  selector: {{app: reviews}}
  ports: [{{name: web, port: 9080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-v1, namespace: default, labels: {{app: reviews, version: v1}}}}
spec: {{nodeName: node-b, serviceAccountName: reviews}}
status: {{podIP: {v1}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-v2, namespace: default, labels: {{app: reviews, version: v2}}}}
spec: {{nodeName: node-b, serviceAccountName: reviews}}
status: {{podIP: {v2}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: productpage, namespace: default, labels: {{app: productpage}}}}
spec: {{nodeName: node-a, serviceAccountName: productpage}}
status: {{podIP: {c}}}
"#
    )
}

/// DestinationRule v1/v2 and a VirtualService sending everything to `subset`.
pub fn routing_yaml(subset: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews, subset: {subset}}}
"#
    )
}

/// Replace a file atomically (the file source never reads half of it).
pub fn write_atomic(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

pub struct XdsMesh {
    pub net: Net,
    pub dir: PathBuf,
    pub controller: Controller,
    pub a: Ztunnel,
    pub b: Ztunnel,
    /// ztunnel HBONE ports, by node.
    pub pa: u16,
    pub pb: u16,
}

impl XdsMesh {
    pub async fn start(net: Net, name: &str) -> XdsMesh {
        Self::start_with(net, name, |_| {}).await
    }

    /// As [`XdsMesh::start`], with the controller's config adjusted by `adjust` first.
    pub async fn start_with(
        net: Net,
        name: &str,
        adjust: impl FnOnce(&mut ControllerConfig),
    ) -> XdsMesh {
        zmesh_core::tls::install_default_provider();
        let _ = zmesh_core::socket::raise_fd_limit();
        let dir = std::env::temp_dir().join(format!(
            "zmesh-wp-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let tokens = dir.join(TOKENS_DIR);
        for n in ["node-a", "node-b", "node-w"] {
            write_bootstrap_token(&tokens, n).unwrap();
        }
        std::fs::write(dir.join("mesh.yaml"), base_yaml(net)).unwrap();
        write_atomic(&dir.join("routing.yaml"), &routing_yaml("v1"));
        reviews_server(SocketAddr::new(net.v1(), 9080), "v1").await;
        reviews_server(SocketAddr::new(net.v2(), 9080), "v2").await;

        let mut ccfg = ControllerConfig {
            debounce: Duration::from_millis(50),
            ..ControllerConfig::loopback(&dir)
        };
        adjust(&mut ccfg);
        let controller = Controller::start(ccfg).await.expect("controller starts");

        let (pa, pb) = (free_port("0.0.0.0"), free_port("0.0.0.0"));
        let mut zts = Vec::new();
        for (node, port) in [("node-a", pa), ("node-b", pb)] {
            let mut cfg = Config::loopback(node);
            cfg.hbone_addr = SocketAddr::new("0.0.0.0".parse().unwrap(), port);
            cfg.peer_hbone_ports.insert("node-a".into(), pa);
            cfg.peer_hbone_ports.insert("node-b".into(), pb);
            cfg.drain_grace = Duration::from_millis(200);
            let (endpoint, token) = (mesh_endpoint(&controller, &dir), node_token(&dir, node));
            let mut xcfg = XdsConfig::ztunnel(
                endpoint.clone(),
                node,
                &format!("ztunnel-{node}"),
                "istio-system",
                None,
            );
            xcfg.token = token.clone();
            let ca = CaClient::new(CaClientConfig::new(endpoint, token)).unwrap();
            let zt = Ztunnel::start(cfg, Box::new(XdsClient::new(xcfg)), Arc::new(ca), None)
                .await
                .expect("ztunnel starts");
            zts.push(zt);
        }
        tokio::time::timeout(WAIT, async {
            for zt in &zts {
                zt.wait_ready().await;
            }
        })
        .await
        .expect("ztunnels become ready");
        let b = zts.pop().unwrap();
        let a = zts.pop().unwrap();
        XdsMesh {
            net,
            dir,
            controller,
            a,
            b,
            pa,
            pb,
        }
    }

    pub fn xds_url(&self) -> String {
        format!("https://{}", self.controller.addrs.xds_tls.unwrap())
    }

    pub fn root_cert(&self) -> PathBuf {
        self.dir.join("ca/root-cert.pem")
    }

    pub fn token_file(&self, node: &str) -> PathBuf {
        self.dir.join(TOKENS_DIR).join(format!("{node}.token"))
    }

    /// An in-process waypoint fed by the controller (xDS + CA with node-w's token).
    pub async fn start_waypoint(&self) -> (App, Arc<XdsStatus>) {
        self.start_waypoint_with(|_| {}).await
    }

    /// As [`XdsMesh::start_waypoint`], with the waypoint's config adjusted by `adjust` first.
    pub async fn start_waypoint_with(
        &self,
        adjust: impl FnOnce(&mut waypoint::Config),
    ) -> (App, Arc<XdsStatus>) {
        let endpoint = mesh_endpoint(&self.controller, &self.dir);
        let token = node_token(&self.dir, "node-w");
        let mut xcfg = XdsConfig::waypoint(
            endpoint.clone(),
            "waypoint-0",
            "default",
            Some(self.net.waypoint()),
        );
        xcfg.token = token.clone();
        let l7 = L7Store::new();
        let client = l7.subscribe(XdsClient::new(xcfg));
        let status = client.status();
        let ca = CaClient::new(CaClientConfig::new(endpoint, token)).unwrap();
        let mut wcfg = waypoint::Config::new(
            "spiffe://cluster.local/ns/default/sa/waypoint"
                .parse()
                .unwrap(),
            SocketAddr::new(self.net.waypoint(), 15008),
        );
        wcfg.peer_hbone_ports.insert("node-a".into(), self.pa);
        wcfg.peer_hbone_ports.insert("node-b".into(), self.pb);
        adjust(&mut wcfg);
        let lo = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        let cfg = AppConfig {
            admin_addr: lo,
            metrics_addr: lo,
            readiness_addr: lo,
            drain_grace: Duration::from_millis(500),
            ..AppConfig::new(wcfg)
        };
        let app = App::start(
            cfg,
            Box::new(client),
            l7,
            Arc::new(ca),
            Some(status.clone()),
            None,
        )
        .await
        .expect("waypoint starts");
        (app, status)
    }

    /// A SOCKS5 connection from the client pod through ztunnel A to the reviews VIP.
    pub async fn connect(&self) -> Result<TcpStream, String> {
        socks_connect(
            self.a.addrs.socks5.unwrap(),
            self.net.client(),
            self.net.reviews_vip(),
        )
        .await
    }

    /// One HTTP/1.1 GET on a fresh connection: `Ok((status, body))`, `Err` when the
    /// connection or request failed (never hangs: bounded by [`WAIT`]).
    pub async fn get(&self, headers: &[(&str, &str)]) -> Result<(u16, String), String> {
        self.get_full(headers).await.map(|(s, _, b)| (s, b))
    }

    /// [`XdsMesh::get`], with the response headers.
    pub async fn get_full(
        &self,
        headers: &[(&str, &str)],
    ) -> Result<(u16, http::HeaderMap, String), String> {
        tokio::time::timeout(WAIT, async {
            let s = self.connect().await?;
            let mut c = H1::handshake(s).await?;
            c.get_full(headers).await
        })
        .await
        .map_err(|_| "timed out".to_string())?
    }

    pub async fn shutdown(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
        self.controller.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn mesh_endpoint(controller: &Controller, dir: &Path) -> ControlPlaneEndpoint {
    let roots = ControlPlaneTls::load_roots(&dir.join("ca/root-cert.pem")).unwrap();
    ControlPlaneEndpoint::new(
        format!("https://{}", controller.addrs.xds_tls.unwrap()),
        Some(ControlPlaneTls {
            roots,
            identities: vec![CONTROLLER_ID.into()],
            dns_name: None,
        }),
    )
}

fn node_token(dir: &Path, node: &str) -> TokenSource {
    TokenSource::File(dir.join(TOKENS_DIR).join(format!("{node}.token")))
}

/// SOCKS5 CONNECT (no auth, IPv4) from `src` through `socks` to `dst`.
pub async fn socks_connect(
    socks: SocketAddr,
    src: IpAddr,
    dst: SocketAddr,
) -> Result<TcpStream, String> {
    let sock = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    zmesh_core::socket::bind_address_no_port(&sock).map_err(|e| e.to_string())?;
    sock.bind(SocketAddr::new(src, 0))
        .map_err(|e| e.to_string())?;
    let mut s = sock.connect(socks).await.map_err(|e| e.to_string())?;
    s.write_all(&[5, 1, 0]).await.map_err(|e| e.to_string())?;
    let mut r = [0u8; 2];
    s.read_exact(&mut r).await.map_err(|e| e.to_string())?;
    let IpAddr::V4(v4) = dst.ip() else {
        return Err("IPv4 only".into());
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.octets());
    req.extend_from_slice(&dst.port().to_be_bytes());
    s.write_all(&req).await.map_err(|e| e.to_string())?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep)
        .await
        .map_err(|e| format!("SOCKS reply: {e}"))?;
    if rep[1] != 0 {
        return Err(format!("SOCKS5 CONNECT refused with code {}", rep[1]));
    }
    Ok(s)
}

/// A keep-alive HTTP/1.1 client connection.
pub struct H1 {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl H1 {
    pub async fn handshake(s: TcpStream) -> Result<H1, String> {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(H1 { send })
    }

    pub async fn get(&mut self, headers: &[(&str, &str)]) -> Result<(u16, String), String> {
        self.get_full(headers).await.map(|(s, _, b)| (s, b))
    }

    pub async fn get_full(
        &mut self,
        headers: &[(&str, &str)],
    ) -> Result<(u16, http::HeaderMap, String), String> {
        let mut b = hyper::Request::get("/reviews/0").header("host", "reviews:9080");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::new())).unwrap();
        self.send.ready().await.map_err(|e| e.to_string())?;
        let r = self
            .send
            .send_request(req)
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, headers, String::from_utf8_lossy(&body).into()))
    }
}

/// Plain `GET path` against a local admin/readiness port: `(status, body)`.
pub async fn local_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text
            .get(9..12)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    })
    .await
    .map_err(|_| "timed out".to_string())?
}

/// Poll `cond` every 50 ms until true, for at most [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}
