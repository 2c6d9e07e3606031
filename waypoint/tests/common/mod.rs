//! Loopback mesh for waypoint tests: ztunnel A (node-a) with the client, ztunnel B (node-b)
//! with the sample servers (reviews v1/v2/v3, tcp-echo v1/v2), and an in-process waypoint at
//! 127.0.0.30 serving both services. The client talks HTTP through A's SOCKS5 to the service
//! VIP; A tunnels to the waypoint, which tunnels to B.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use waypoint::store::L7Store;
use waypoint::{Config as WpConfig, Waypoint};
use zmesh_core::ca::CertificateAuthority;
use zmesh_core::certs::{CertificateManager, InProcessCa};
use zmesh_core::metrics::Metrics;
use zmesh_core::state::{ConfigSource, LocalConfig, StateError, StateStore, StateUpdate};
use ztunnel::{Config, Ztunnel};

pub const CLIENT_IP: &str = "127.0.0.10";
pub const WP_IP: &str = "127.0.0.30";
pub const REVIEWS_VIP: &str = "127.0.1.21";
pub const TCP_ECHO_VIP: &str = "127.0.1.24";
pub const REVIEWS: [(&str, &str); 3] = [
    ("v1", "127.0.0.21"),
    ("v2", "127.0.0.22"),
    ("v3", "127.0.0.23"),
];
pub const TCP_ECHO: [(&str, &str, &str); 2] =
    [("v1", "127.0.0.24", "one"), ("v2", "127.0.0.25", "two")];

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

/// What a sample HTTP server saw: Host headers of the requests it received.
pub type Seen = Arc<Mutex<Vec<String>>>;

/// Sample HTTP server answering `reviews-<version>`; honours `x-sleep-ms`. `/ws`: a
/// WebSocket-like endpoint (see [`ws_upgrade`]).
pub async fn http_server(addr: SocketAddr, version: &'static str, seen: Seen) {
    let l = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |mut req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let host = req
                                .headers()
                                .get("host")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            seen.lock().unwrap().push(host.clone());
                            // `/upload`: read the whole body, answer its size. `/echo`: stream
                            // the body back as it arrives (full duplex).
                            if req.uri().path() == "/upload" {
                                let n = match req.into_body().collect().await {
                                    Ok(b) => b.to_bytes().len(),
                                    Err(_) => 0,
                                };
                                return Ok::<_, Infallible>(hyper::Response::new(
                                    Full::new(Bytes::from(format!("received {n}")))
                                        .map_err(|e| match e {})
                                        .boxed(),
                                ));
                            }
                            if req.uri().path() == "/echo" {
                                return Ok(hyper::Response::new(req.into_body().boxed()));
                            }
                            if req.uri().path() == "/ws" {
                                return Ok(ws_upgrade(&mut req, version));
                            }
                            let sleep = req
                                .headers()
                                .get("x-sleep-ms")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse::<u64>().ok());
                            let rid = req.headers().get("x-request-id").cloned();
                            let trace = seen_trace_headers(req.headers());
                            let path = req.uri().path().to_string();
                            if let Some(ms) = sleep {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            // `x-fail-version: v2`: that version answers 503 (outlier tests).
                            if req
                                .headers()
                                .get("x-fail-version")
                                .is_some_and(|v| v == version)
                            {
                                let mut r = hyper::Response::new(
                                    Full::new(Bytes::from("failing"))
                                        .map_err(|e| match e {})
                                        .boxed(),
                                );
                                *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                                return Ok(r);
                            }
                            let mut r = hyper::Response::new(
                                Full::new(Bytes::from(format!("reviews-{version}")))
                                    .map_err(|e| match e {})
                                    .boxed(),
                            );
                            r.headers_mut().insert("x-seen-host", host.parse().unwrap());
                            if let Ok(p) = path.parse() {
                                r.headers_mut().insert("x-seen-path", p);
                            }
                            if let Some(id) = rid {
                                r.headers_mut().insert("x-seen-request-id", id);
                            }
                            for (name, v) in trace {
                                r.headers_mut().insert(name, v);
                            }
                            Ok(r)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
}

/// Trace headers as the app received them, echoed as `x-seen-<name>` (tracing tests).
pub const TRACE_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
];

fn seen_trace_headers(h: &http::HeaderMap) -> Vec<(http::HeaderName, http::HeaderValue)> {
    TRACE_HEADERS
        .iter()
        .filter_map(|n| {
            let v = h.get(*n)?.clone();
            let name = http::HeaderName::try_from(format!("x-seen-{n}")).ok()?;
            Some((name, v))
        })
        .collect()
}

fn has_token(h: &http::HeaderMap, name: &str, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// `/ws`: with `Connection: upgrade` + `Upgrade: websocket` (and no `x-refuse-upgrade`),
/// answers 101 (headers `x-seen-path`, `x-seen-via` from the request) and then echoes each
/// line as `reviews-<version> <line>`; at EOF it writes `reviews-<version> bye` and closes.
/// Otherwise it answers 200 `reviews-<version> refused the upgrade`.
fn ws_upgrade(
    req: &mut hyper::Request<hyper::body::Incoming>,
    version: &'static str,
) -> hyper::Response<http_body_util::combinators::BoxBody<Bytes, hyper::Error>> {
    let body = |s: String| Full::new(Bytes::from(s)).map_err(|e| match e {}).boxed();
    let h = req.headers();
    if !has_token(h, "connection", "upgrade")
        || !has_token(h, "upgrade", "websocket")
        || h.contains_key("x-refuse-upgrade")
    {
        return hyper::Response::new(body(format!("reviews-{version} refused the upgrade")));
    }
    let mut r = hyper::Response::new(body(String::new()));
    *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let rh = r.headers_mut();
    rh.insert("connection", "upgrade".parse().unwrap());
    rh.insert("upgrade", "websocket".parse().unwrap());
    if let Ok(p) = req.uri().path().parse() {
        rh.insert("x-seen-path", p);
    }
    if let Some(v) = req.headers().get("x-via") {
        rh.insert("x-seen-via", v.clone());
    }
    let on = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(io) = on.await else { return };
        let (r, mut w) = tokio::io::split(TokioIo::new(io));
        let mut lines = tokio::io::BufReader::new(r);
        let mut line = String::new();
        loop {
            line.clear();
            match tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let out = format!("reviews-{version} {}\n", line.trim_end());
                    if w.write_all(out.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = w
            .write_all(format!("reviews-{version} bye\n").as_bytes())
            .await;
        let _ = w.shutdown().await;
    });
    r
}

/// tcp-echo: prefixes each echoed read with `<prefix> `.
pub async fn tcp_echo(addr: SocketAddr, prefix: &'static str) {
    let l = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut out = format!("{prefix} ").into_bytes();
                    out.extend_from_slice(&buf[..n]);
                    if s.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

fn mesh_yaml(wp_port: u16, with_waypoint: bool) -> String {
    let wp = if with_waypoint {
        format!(
            "  waypoint: {{hostname: \"default/waypoint.default.svc.cluster.local\", hbonePort: {wp_port}}}\n"
        )
    } else {
        String::new()
    };
    let mut y = format!(
        r#"
workloads:
- uid: Kubernetes//v1/Pod/default/productpage
  name: productpage
  namespace: default
  serviceAccount: productpage
  workloadIps: ["{CLIENT_IP}"]
  protocol: HBONE
  node: node-a
  workloadName: productpage
- uid: Kubernetes//v1/Pod/default/waypoint
  name: waypoint
  namespace: default
  serviceAccount: waypoint
  workloadIps: ["{WP_IP}"]
  protocol: HBONE
  node: node-w
  workloadName: waypoint
  services:
    "default/waypoint.default.svc.cluster.local":
      15008: {wp_port}
"#
    );
    for (v, a) in REVIEWS {
        y.push_str(&format!(
            r#"- uid: Kubernetes//v1/Pod/default/reviews-{v}
  name: reviews-{v}
  namespace: default
  serviceAccount: reviews
  workloadIps: ["{a}"]
  protocol: HBONE
  node: node-b
  canonicalName: reviews
  canonicalRevision: {v}
  workloadName: reviews-{v}
  services:
    "default/reviews.default.svc.cluster.local":
      9080: 9080
"#
        ));
    }
    for (v, a, _) in TCP_ECHO {
        y.push_str(&format!(
            r#"- uid: Kubernetes//v1/Pod/default/tcp-echo-{v}
  name: tcp-echo-{v}
  namespace: default
  serviceAccount: tcp-echo
  workloadIps: ["{a}"]
  protocol: HBONE
  node: node-b
  workloadName: tcp-echo-{v}
  services:
    "default/tcp-echo.default.svc.cluster.local":
      9000: 9000
"#
        ));
    }
    y.push_str(&format!(
        r#"services:
- name: waypoint
  namespace: default
  vips: ["127.0.1.30"]
  ports: {{15008: {wp_port}}}
- name: reviews
  namespace: default
  vips: ["{REVIEWS_VIP}"]
  ports: {{9080: 9080}}
{wp}- name: tcp-echo
  namespace: default
  vips: ["{TCP_ECHO_VIP}"]
  ports: {{9000: 9000}}
{wp}"#
    ));
    y
}

/// Kubernetes objects backing the translation (Services + Pods with labels).
pub const K8S_BASE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: tcp-echo, namespace: default}
spec: {selector: {app: tcp-echo}, ports: [{name: tcp, port: 9000}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: default, labels: {app: reviews, version: v1}}
status: {phase: Running, podIP: 127.0.0.21}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: default, labels: {app: reviews, version: v2}}
status: {phase: Running, podIP: 127.0.0.22}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v3, namespace: default, labels: {app: reviews, version: v3}}
status: {phase: Running, podIP: 127.0.0.23}
---
apiVersion: v1
kind: Pod
metadata: {name: tcp-echo-v1, namespace: default, labels: {app: tcp-echo, version: v1}}
status: {phase: Running, podIP: 127.0.0.24}
---
apiVersion: v1
kind: Pod
metadata: {name: tcp-echo-v2, namespace: default, labels: {app: tcp-echo, version: v2}}
status: {phase: Running, podIP: 127.0.0.25}
"#;

pub struct Mesh {
    pub a: Ztunnel,
    pub b: Ztunnel,
    pub wp: Waypoint,
    pub wp_metrics: Arc<Metrics>,
    pub l7: Arc<L7Store>,
    pub wp_state: Arc<StateStore>,
    pub seen: HashMap<&'static str, Seen>,
    pub wp_port: u16,
}

impl Mesh {
    pub async fn start() -> Mesh {
        Self::start_with(|_| {}).await
    }

    /// As [`Mesh::start`], with the waypoint's config adjusted by `adjust` first.
    pub async fn start_with(adjust: impl FnOnce(&mut WpConfig)) -> Mesh {
        zmesh_core::tls::install_default_provider();
        let _ = zmesh_core::socket::raise_fd_limit();
        let ca = Arc::new(CertificateAuthority::generate("cluster.local").unwrap());
        let mut seen = HashMap::new();
        for (v, a) in REVIEWS {
            let s: Seen = Arc::default();
            seen.insert(v, s.clone());
            http_server(SocketAddr::new(ip(a), 9080), v, s).await;
        }
        for (_, a, p) in TCP_ECHO {
            tcp_echo(SocketAddr::new(ip(a), 9000), p).await;
        }
        // The waypoint binds first: the mesh config names its port.
        let wp_state = StateStore::new();
        let l7 = L7Store::new();
        let certs =
            CertificateManager::new(Arc::new(InProcessCa(ca.clone())), Duration::from_secs(3600));
        let wp_metrics = Metrics::new("waypoint");
        let mut wcfg = WpConfig::new(
            "spiffe://cluster.local/ns/default/sa/waypoint"
                .parse()
                .unwrap(),
            SocketAddr::new(ip(WP_IP), 0),
        );
        // Filled in once B is up (the waypoint reaches B's HBONE port).
        let b_port_slot = wcfg.peer_hbone_ports.clone();
        let _ = b_port_slot;
        let start_zt = |node: &str, peer_b: Option<u16>, yaml: String| {
            let mut cfg = Config::loopback(node);
            if let Some(pb) = peer_b {
                cfg.peer_hbone_ports.insert("node-b".into(), pb);
            }
            cfg.drain_grace = Duration::from_millis(200);
            let ca = ca.clone();
            async move {
                let update = LocalConfig::from_str(&yaml).expect("test YAML is valid");
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
        // The waypoint's port goes into the mesh config before the waypoint binds it.
        let wp_port = zmesh_core::socket::unused_ports(ip(WP_IP), 1).expect("a free port")[0];
        let yaml = mesh_yaml(wp_port, true);
        let b = start_zt("node-b", None, yaml.clone()).await;
        let pb = b.addrs.hbone.unwrap().port();
        let a = start_zt("node-a", Some(pb), yaml.clone()).await;
        wcfg.peer_hbone_ports.insert("node-b".into(), pb);
        wcfg.hbone_addr = SocketAddr::new(ip(WP_IP), wp_port);
        adjust(&mut wcfg);
        wp_state.apply(LocalConfig::from_str(&yaml).unwrap());
        wp_state.mark_synced();
        let wp = Waypoint::start(
            wcfg,
            wp_state.clone(),
            l7.clone(),
            certs,
            wp_metrics.clone(),
        )
        .await
        .expect("waypoint starts");
        tokio::time::timeout(Duration::from_secs(10), async {
            a.wait_ready().await;
            b.wait_ready().await;
        })
        .await
        .expect("ztunnels ready");
        Mesh {
            a,
            b,
            wp,
            wp_metrics,
            l7,
            wp_state,
            seen,
            wp_port,
        }
    }

    /// Translate Istio YAML (plus the base objects) and load the L7 resources.
    pub fn apply_l7(&self, yaml: &str) {
        let all = format!("{K8S_BASE}\n---\n{yaml}");
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&all).expect("valid YAML");
        let snap = zmesh_controller::store::Snapshot::from_objects(
            docs.into_iter().filter(|d| !d.is_null()),
        );
        let t = zmesh_controller::translate::translate(&snap, &Default::default());
        assert!(t.errors.is_empty(), "translation errors: {:?}", t.errors);
        let mut res: HashMap<String, Vec<(String, Vec<u8>)>> = HashMap::new();
        for (ty, m) in &t.resources {
            res.insert(
                ty.clone(),
                m.iter()
                    .map(|(n, a)| (n.clone(), a.value.clone()))
                    .collect(),
            );
        }
        let errs = self.l7.replace(&res);
        assert!(errs.is_empty(), "{errs:?}");
    }

    /// Push mesh config (e.g. without the waypoint label) to all three proxies.
    pub fn set_waypoint(&self, on: bool) {
        let yaml = mesh_yaml(self.wp_port, on);
        for st in [self.a.state(), self.b.state(), &self.wp_state] {
            st.apply(LocalConfig::from_str(&yaml).unwrap());
        }
    }

    pub fn socks(&self) -> SocketAddr {
        self.a.addrs.socks5.unwrap()
    }
}

/// SOCKS5 CONNECT through `socks` from `src`.
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
    let mut req = vec![5, 1, 0, 1];
    let IpAddr::V4(v4) = dst.ip() else {
        panic!("v4 only")
    };
    req.extend_from_slice(&v4.octets());
    req.extend_from_slice(&dst.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut rep = [0u8; 10];
    match tokio::time::timeout(Duration::from_secs(15), s.read_exact(&mut rep)).await {
        Ok(Ok(_)) if rep[1] == 0 => Ok(s),
        Ok(Ok(_)) => Err(rep[1]),
        _ => Err(0xff),
    }
}

/// A keep-alive HTTP/1.1 client connection to the reviews VIP through ztunnel A.
pub struct Client {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub body: String,
    pub headers: http::HeaderMap,
}

impl Client {
    pub async fn connect(mesh: &Mesh) -> Client {
        let s = socks_connect(
            mesh.socks(),
            ip(CLIENT_IP),
            SocketAddr::new(ip(REVIEWS_VIP), 9080),
        )
        .await
        .expect("SOCKS connect");
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client { send }
    }

    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Resp, String> {
        self.request(http::Method::GET, path, headers).await
    }

    pub async fn request(
        &mut self,
        method: http::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Resp, String> {
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "reviews:9080");
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
        Ok(Resp {
            status,
            body: String::from_utf8_lossy(&body).into(),
            headers,
        })
    }
}

/// One request on a fresh connection.
pub async fn get(mesh: &Mesh, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut c = Client::connect(mesh).await;
    tokio::time::timeout(Duration::from_secs(20), c.get(path, headers))
        .await
        .expect("request completes")
        .expect("request succeeds")
}

/// A raw HTTP/1.1 connection to the reviews VIP through ztunnel A: sends `GET <path>` with
/// `Connection: Upgrade`, `Upgrade: websocket` and `headers`, returns the response head and
/// the connection, positioned just after the head.
pub async fn ws_connect(mesh: &Mesh, path: &str, headers: &[(&str, &str)]) -> (String, TcpStream) {
    let mut s = socks_connect(
        mesh.socks(),
        ip(CLIENT_IP),
        SocketAddr::new(ip(REVIEWS_VIP), 9080),
    )
    .await
    .expect("SOCKS connect");
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nhost: reviews:9080\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    // Byte by byte: nothing after the head may be consumed here.
    let mut head = Vec::new();
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            let b = s.read_u8().await.expect("response head");
            head.push(b);
            assert!(head.len() < 16 << 10, "response head too large");
        }
    };
    tokio::time::timeout(Duration::from_secs(15), read)
        .await
        .expect("response head in time");
    (String::from_utf8_lossy(&head).into_owned(), s)
}

/// Sum of the samples of `metric` whose labels include all of `labels` (0 when none does).
pub fn metric_value(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    zmesh_core::metrics::sample_sum(text, metric, labels).unwrap_or(0.0)
}
