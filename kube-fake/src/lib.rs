//! An in-memory Kubernetes API server for tests of the CLI and the controller.
//!
//! Real clients (kube-rs, anything speaking the REST API) talk to it over plain HTTP/1.1 on
//! loopback: discovery (`/api`, `/apis`, `/apis/G/V`, `/version`), get/list/watch with label and
//! field selectors, create, replace, delete, patches (server-side apply as create-or-merge, JSON
//! merge, strategic merge treated as merge, JSON patch), `status` subresources, dry runs, the
//! pods' `proxy` subresource with canned answers, and the pods' `portforward` subresource over
//! WebSocket (the kubelet's `v4.channel.k8s.io` framing) to TCP addresses the test registers. A CustomResourceDefinition created through it
//! makes its kind served and Established. Every request is recorded, and failures can be
//! injected by method and path prefix. It does not emulate the garbage collector, admission or
//! field ownership: tests see exactly what their client did.

mod kinds;
mod patch;
mod portforward;
mod selector;
mod server;
mod store;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub use store::RecordedRequest;
use store::{AccessRule, Event, Failure, State, Write};

/// Shared between the handle and the connection tasks.
pub(crate) struct Inner {
    pub(crate) state: Mutex<State>,
    pub(crate) events: broadcast::Sender<Event>,
    /// Cancelled when the server is dropped; upgraded (port-forward) connections end with it.
    pub(crate) stop: CancellationToken,
}

/// A running fake API server; stops when dropped.
pub struct FakeApiServer {
    inner: Arc<Inner>,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FakeApiServer {
    /// Binds 127.0.0.1 on an OS-assigned port and serves until dropped.
    pub async fn start() -> FakeApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port for the fake API server");
        let addr = listener
            .local_addr()
            .expect("local address of a bound socket");
        let stop = CancellationToken::new();
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            events: broadcast::channel(4096).0,
            stop: stop.clone(),
        });
        let (srv, token) = (inner.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = token.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                };
                let (srv, token) = (srv.clone(), token.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let srv = srv.clone();
                        async move { Ok::<_, std::convert::Infallible>(server::handle(srv, req).await) }
                    });
                    // Upgrades: the portforward subresource switches to WebSocket.
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .with_upgrades();
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = conn => {}
                    }
                });
            }
        });
        FakeApiServer { inner, addr, stop }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube-rs client configuration for this server (default namespace `default`).
    pub fn kube_config(&self) -> kube::Config {
        let mut c = kube::Config::new(self.url().parse().expect("a valid URL"));
        c.default_namespace = "default".into();
        c
    }

    /// A kube-rs client for this server.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.kube_config()).expect("a client for a plain-HTTP URL")
    }

    /// Writes a kubeconfig whose context `context` points at this server (token auth).
    pub fn write_kubeconfig(&self, path: &Path, context: &str, namespace: Option<&str>) {
        let ns = namespace
            .map(|n| format!("\n    namespace: {n}"))
            .unwrap_or_default();
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
             users:\n- name: fake\n  user:\n    token: fake-token\n\
             contexts:\n- name: {context}\n  context:\n    cluster: fake\n    user: fake{ns}\n\
             current-context: {context}\n",
            url = self.url()
        );
        std::fs::write(path, text).expect("write the kubeconfig");
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().expect("state lock")
    }

    fn publish(&self, events: impl IntoIterator<Item = Event>) {
        for e in events {
            let _ = self.inner.events.send(e);
        }
    }

    /// Stores an object as given (status included; no namespace check), creating or
    /// overwriting it; watchers see the change. Panics on an unknown kind (a test bug).
    pub fn insert(&self, obj: Value) {
        let api_version = obj["apiVersion"].as_str().unwrap_or("").to_string();
        let kind_name = obj["kind"].as_str().unwrap_or("").to_string();
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        let mut st = self.state();
        let kind = st
            .kind_of(&api_version, &kind_name)
            .unwrap_or_else(|| panic!("fake API server: unknown kind {api_version} {kind_name}"));
        let (_, ev) = st
            .write(&kind, &ns, obj, Write::Force, false)
            .unwrap_or_else(|e| panic!("fake API server: insert failed: {}", e.message));
        drop(st);
        self.publish(ev);
    }

    /// Same as [`insert`](Self::insert): overwrite an object, status included (e.g. to mark a
    /// Deployment available or give a Service its ClusterIP).
    pub fn replace(&self, obj: Value) {
        self.insert(obj);
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        let mut st = self.state();
        let Some(k) = st.kind_of(api_version, kind) else {
            return false;
        };
        match st.delete(&k, namespace.unwrap_or(""), name, false) {
            Ok((_, events)) => {
                drop(st);
                self.publish(events);
                true
            }
            Err(_) => false,
        }
    }

    /// An object as stored (its `apiVersion` is the one it was last written with).
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let st = self.state();
        let k = st.kind_of(api_version, kind)?;
        st.objects
            .get(&store::key(&k, namespace.unwrap_or(""), name))
            .cloned()
    }

    /// Objects of a kind, in one namespace or all.
    pub fn list(&self, api_version: &str, kind: &str, namespace: Option<&str>) -> Vec<Value> {
        let st = self.state();
        match st.kind_of(api_version, kind) {
            Some(k) => st.list(&k, namespace),
            None => Vec::new(),
        }
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state().requests.clone()
    }

    /// Requests other than reads (`GET`): what a client changed.
    pub fn writes(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.method != "GET")
            .collect()
    }

    /// From now on, requests with `method` (`"*"` = any) whose path starts with `path_prefix`
    /// fail with `status` (a realistic `Status` body: Forbidden names verb, resource, namespace).
    /// kube-rs clients retry 429, 503 and 504 with backoff for minutes by default
    /// (`Config::default_retry`): inject those only with retries turned off.
    pub fn fail(&self, method: &str, path_prefix: &str, status: u16) {
        self.state().failures.push(Failure {
            method: method.to_string(),
            path_prefix: path_prefix.to_string(),
            status,
        });
    }

    /// Removes every injected failure.
    pub fn clear_failures(&self) {
        self.state().failures.clear();
    }

    /// SelfSubjectAccessReview (`kubectl auth can-i`) answers `allowed: false` for `verb` on
    /// `resource` (`"pods/portforward"` for a subresource) in `namespace` (None: everywhere).
    /// Everything not denied is allowed. Requests themselves are not checked against this:
    /// use [`FakeApiServer::fail`] for a Forbidden answer.
    pub fn deny_access(&self, verb: &str, resource: &str, namespace: Option<&str>) {
        self.state().denied.push(AccessRule {
            verb: verb.to_string(),
            resource: resource.to_string(),
            namespace: namespace.map(str::to_string),
        });
    }

    /// What `GET /api/v1/namespaces/NS/pods/POD[:PORT]/proxy/PATH` answers (unset: 502, as
    /// when the API server cannot reach the pod) (`pod` as it
    /// appears in the URL, e.g. `ztunnel-abc:15000`; `path` without a leading slash).
    pub fn set_pod_proxy(&self, namespace: &str, pod: &str, path: &str, status: u16, body: &str) {
        let path = path.trim_start_matches('/');
        self.state().proxies.insert(
            format!("{namespace}/{pod}/{path}"),
            (status, body.to_string()),
        );
    }

    /// Makes `GET /api/v1/namespaces/NS/pods/POD/portforward?ports=PORT` (a WebSocket upgrade,
    /// as kube-rs's `Api::<Pod>::portforward` sends it; SPDY is not served) connect PORT to
    /// `target`, as the kubelet connects to `localhost:PORT` inside the pod.
    ///
    /// A pod with no registered port and no stored Pod object is answered 404 before the
    /// upgrade; a registered or stored pod upgrades, and a requested port with no target gets
    /// "connection refused" on its error channel (nothing listens there), as does a target
    /// that refuses the connection.
    pub fn set_port_forward(&self, namespace: &str, pod: &str, port: u16, target: SocketAddr) {
        self.state()
            .port_forwards
            .entry(format!("{namespace}/{pod}"))
            .or_default()
            .insert(port, target);
    }
}
