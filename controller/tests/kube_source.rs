//! The Kubernetes source end to end, against an in-test API server that speaks real list and
//! watch JSON over plain HTTP/1.1 (chunked watch streams, one event per line).
//!
//! The objects are the golden scenarios' YAML. The server makes the source go through every
//! path: a list that is stale, a watch that ends and is resumed, a `410 Gone` ERROR event and a
//! `410` HTTP status on a watch (both force a relist, which must drop stale objects), ADDED /
//! MODIFIED / DELETED events, a kind served only at an older version (v1beta1), and CRDs that
//! are not installed (404). At the end, translation of what the Kubernetes source stored must
//! equal translation of what the file source read from the same YAML.

mod common;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use zmesh_controller::k8s::{KINDS, KindInfo};
use zmesh_controller::sources::kube::{KubeSource, Timing};
use zmesh_controller::store::ObjectStore;
use zmesh_controller::translate::{TranslateOptions, translate};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What the server does on one watch request.
enum Watch {
    /// Send these events; then end the response, or keep it open.
    Events { events: Vec<Value>, end: bool },
    /// Answer the watch request itself with HTTP 410 Gone.
    HttpGone,
}

#[derive(Default)]
struct Resource {
    /// Successive list responses; the last one repeats.
    lists: Mutex<VecDeque<Vec<Value>>>,
    watches: Mutex<VecDeque<Watch>>,
    list_requests: AtomicUsize,
    watch_requests: AtomicUsize,
}

#[derive(Default)]
struct FakeApi {
    /// URL path (`/api/v1/pods`) → resource.
    resources: HashMap<String, Arc<Resource>>,
    not_found: Mutex<HashMap<String, usize>>,
    resource_version: AtomicU64,
}

fn path(info: &KindInfo, version: &str) -> String {
    if info.group.is_empty() {
        format!("/api/{version}/{}", info.plural)
    } else {
        format!("/apis/{}/{version}/{}", info.group, info.plural)
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed_unsync())
        .unwrap()
}

impl FakeApi {
    fn next_rv(&self) -> String {
        (self.resource_version.fetch_add(1, Ordering::SeqCst) + 1).to_string()
    }

    /// A served object: with a fresh resourceVersion.
    fn stamp(&self, mut obj: Value) -> Value {
        obj["metadata"]["resourceVersion"] = json!(self.next_rv());
        obj
    }

    fn handle(&self, req: &Request<hyper::body::Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("");
        let Some(res) = self.resources.get(&path) else {
            *self.not_found.lock().unwrap().entry(path).or_default() += 1;
            return json_response(
                StatusCode::NOT_FOUND,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        };
        if query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1")
        {
            res.watch_requests.fetch_add(1, Ordering::SeqCst);
            let next = res.watches.lock().unwrap().pop_front();
            let (events, end) = match next {
                Some(Watch::HttpGone) => {
                    return json_response(
                        StatusCode::GONE,
                        &status(410, "Expired", "too old resource version"),
                    );
                }
                Some(Watch::Events { events, end }) => (events, end),
                None => (Vec::new(), false),
            };
            let lines: Vec<Result<Frame<Bytes>, Infallible>> = events
                .into_iter()
                .map(|e| Ok(Frame::data(Bytes::from(format!("{e}\n")))))
                .collect();
            let stream = futures::stream::iter(lines);
            let body = if end {
                BodyExt::boxed_unsync(StreamBody::new(stream.boxed()))
            } else {
                BodyExt::boxed_unsync(StreamBody::new(
                    stream.chain(futures::stream::pending()).boxed(),
                ))
            };
            return Response::builder()
                .header("content-type", "application/json")
                .body(body)
                .unwrap();
        }
        res.list_requests.fetch_add(1, Ordering::SeqCst);
        let items = {
            let mut lists = res.lists.lock().unwrap();
            if lists.len() > 1 {
                lists.pop_front().unwrap()
            } else {
                lists.front().cloned().unwrap_or_default()
            }
        };
        // Like a real API server: list items carry no kind/apiVersion.
        let items: Vec<Value> = items
            .into_iter()
            .map(|mut o| {
                let m = o.as_object_mut().unwrap();
                m.remove("kind");
                m.remove("apiVersion");
                o
            })
            .collect();
        json_response(
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "List",
                    "metadata": {"resourceVersion": self.next_rv()}, "items": items}),
        )
    }
}

async fn serve(api: Arc<FakeApi>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let api = api.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let resp = api.handle(&req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

fn event(kind: &str, obj: &Value) -> Value {
    json!({"type": kind, "object": obj})
}

fn named<'a>(objs: &'a [Value], prefix: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["metadata"]["name"].as_str().unwrap().starts_with(prefix))
        .unwrap_or_else(|| panic!("no object named {prefix}*"))
}

fn without(objs: &[Value], names: &[&Value]) -> Vec<Value> {
    objs.iter()
        .filter(|o| !names.iter().any(|n| n["metadata"] == o["metadata"]))
        .cloned()
        .collect()
}

/// The golden scenarios' YAML, combined into one directory (no duplicates).
fn combined_yaml_dir() -> std::path::PathBuf {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kube-source-objects");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (scenario, file) in [
        ("bookinfo", "namespaces.yaml"),
        ("bookinfo", "pods.yaml"),
        ("bookinfo", "services.yaml"),
        ("bookinfo", "others.yaml"),
        ("waypoints", "input.yaml"),
        ("endpoints", "input.yaml"),
        ("peerauth-overrides", "input.yaml"),
        ("authz", "policies.yaml"),
    ] {
        std::fs::copy(
            golden.join(scenario).join(file),
            dir.join(format!("{scenario}-{file}")),
        )
        .unwrap();
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_source_matches_file_source() {
    // What the file source makes of the YAML.
    let dir = combined_yaml_dir();
    let (file_store, file_errors) = common::load_dir(&dir);
    assert!(file_errors.is_empty(), "{file_errors:?}");
    let opts = TranslateOptions::default();
    let expected = common::render(&translate(&file_store.snapshot(), &opts));
    assert!(expected["addresses"].as_object().unwrap().len() > 30);

    // The same objects on a fake API server.
    let snap = file_store.snapshot();
    let mut api = FakeApi::default();
    let mut by_kind: HashMap<&str, Vec<Value>> = HashMap::new();
    for info in KINDS {
        let objs: Vec<Value> = snap
            .of_kind(info.kind)
            .map(|(_, v)| api.stamp((*v).clone()))
            .collect();
        by_kind.insert(info.kind, objs);
    }
    let mut resources: HashMap<&str, Arc<Resource>> = HashMap::new();
    for info in KINDS {
        let objs = &by_kind[info.kind];
        let version = match info.kind {
            // CRDs not installed: 404 on every version.
            "VirtualService" | "DestinationRule" | "HTTPRoute" | "TCPRoute" => {
                assert!(objs.is_empty(), "{} objects would be lost", info.kind);
                continue;
            }
            // Only the older version is served: the source must fall back to it.
            "AuthorizationPolicy" => "v1beta1",
            _ => info.versions[0],
        };
        let res = Arc::new(Resource::default());
        res.lists.lock().unwrap().push_back(objs.clone());
        api.resources.insert(path(info, version), res.clone());
        resources.insert(info.kind, res);
    }

    // Pods: a stale first list (with a ghost, without two pods); a watch that sends a bookmark
    // and an ADDED, then ends; a watch that ends with a 410 ERROR event; a relist that still
    // lacks one pod; a watch that delivers it, along with a pod added and deleted again.
    let pods = &by_kind["Pod"];
    let late = named(pods, "reviews-v2");
    let later = named(pods, "reviews-v3");
    let ghost = |name: &str, ip: &str| {
        api.stamp(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "productpage"}},
            "status": {"podIP": ip}}))
    };
    let (ghost1, ghost2, temp) = (
        ghost("ghost", "10.244.1.98"),
        ghost("ghost2", "10.244.1.99"),
        ghost("temp", "10.244.1.97"),
    );
    {
        let r = &resources["Pod"];
        let mut lists = r.lists.lock().unwrap();
        lists.clear();
        let mut first = without(pods, &[late, later]);
        first.push(ghost1.clone());
        lists.push_back(first);
        lists.push_back(without(pods, &[later]));
        let bookmark = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"resourceVersion": api.next_rv()}});
        let mut w = r.watches.lock().unwrap();
        w.push_back(Watch::Events {
            events: vec![event("BOOKMARK", &bookmark), event("ADDED", &ghost2)],
            end: true,
        });
        w.push_back(Watch::Events {
            events: vec![event(
                "ERROR",
                &status(410, "Expired", "too old resource version"),
            )],
            end: true,
        });
        let later_again = api.stamp(later.clone());
        let temp_deleted = api.stamp(temp.clone());
        w.push_back(Watch::Events {
            events: vec![
                event("ADDED", &temp),
                event("ADDED", &later_again),
                event("DELETED", &temp_deleted),
            ],
            end: false,
        });
    }
    // Services: the first list lacks `ratings`; the watch is refused with HTTP 410.
    {
        let services = &by_kind["Service"];
        let r = &resources["Service"];
        let mut lists = r.lists.lock().unwrap();
        lists.clear();
        lists.push_back(without(services, &[named(services, "ratings")]));
        lists.push_back(services.clone());
        r.watches.lock().unwrap().push_back(Watch::HttpGone);
    }
    // AuthorizationPolicies: one arrives by watch; another is MODIFIED to its final content.
    {
        let policies = &by_kind["AuthorizationPolicy"];
        let r = &resources["AuthorizationPolicy"];
        let deny_ns1 = named(policies, "deny-ns1");
        let mut stale = named(policies, "allow-nothing").clone();
        stale["spec"] = json!({"action": "DENY", "rules": [{}]});
        let mut first = without(policies, &[deny_ns1, named(policies, "allow-nothing")]);
        first.push(stale);
        let mut lists = r.lists.lock().unwrap();
        lists.clear();
        lists.push_back(first);
        let modified = api.stamp(named(policies, "allow-nothing").clone());
        r.watches.lock().unwrap().push_back(Watch::Events {
            events: vec![
                event("ADDED", &api.stamp(deny_ns1.clone())),
                event("MODIFIED", &modified),
            ],
            end: false,
        });
    }

    let api = Arc::new(api);
    let addr = serve(api.clone()).await;
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();

    let store = ObjectStore::new();
    let cancel = CancellationToken::new();
    let source = KubeSource::new(client).with_timing(Timing {
        absent_retry: Duration::from_millis(100),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
    });
    let task = tokio::spawn(source.run(store.clone(), cancel.clone()));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut got;
    loop {
        got = common::render(&translate(&store.snapshot(), &opts));
        if got == expected || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        serde_json::to_string_pretty(&got).unwrap(),
        serde_json::to_string_pretty(&expected).unwrap(),
        "Kubernetes source output differs from the file source's"
    );

    // The paths above were really taken.
    let pods = &resources["Pod"];
    assert_eq!(
        pods.list_requests.load(Ordering::SeqCst),
        2,
        "pods: list + relist after 410"
    );
    assert!(
        pods.watch_requests.load(Ordering::SeqCst) >= 3,
        "pods: resumed after the watch ended"
    );
    assert_eq!(
        resources["Service"].list_requests.load(Ordering::SeqCst),
        2,
        "services: relist after HTTP 410"
    );
    // Not-installed kinds are looked for again, slowly.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let not_found = api.not_found.lock().unwrap().clone();
    assert!(not_found["/apis/security.istio.io/v1/authorizationpolicies"] >= 1);
    for absent in [
        "/apis/gateway.networking.k8s.io/v1alpha2/tcproutes",
        "/apis/networking.istio.io/v1alpha3/virtualservices",
    ] {
        assert!(not_found[absent] >= 2, "{absent}: {not_found:?}");
    }
    // Stored objects carry kind and apiVersion even though list items had none.
    let stored = store.snapshot();
    let ap = stored
        .of_kind("AuthorizationPolicy")
        .next()
        .expect("policies stored")
        .1;
    assert_eq!(ap["apiVersion"], "security.istio.io/v1beta1");

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("source stops on cancel")
        .unwrap();
}
