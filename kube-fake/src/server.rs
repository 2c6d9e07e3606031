//! The HTTP side: URL routing, verbs, watch streams.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::Inner;
use crate::kinds::{self, Kind};
use crate::selector::Selectors;
use crate::store::{ApiError, Event, RecordedRequest, State, Write};

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Request bodies larger than this are refused (manifests are far smaller).
const MAX_BODY: usize = 16 << 20;

enum Route {
    Version,
    CoreVersions,
    Groups,
    Resources {
        group: String,
        version: String,
    },
    Collection {
        kind: Kind,
        version: String,
        ns: Option<String>,
    },
    Object {
        kind: Kind,
        version: String,
        ns: String,
        name: String,
        sub: Option<String>,
    },
    PodProxy {
        ns: String,
        pod: String,
        rest: String,
    },
    PortForward {
        ns: String,
        pod: String,
    },
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed_unsync())
        .expect("static response parts")
}

fn error(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

fn not_served() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn parse_body(bytes: &[u8]) -> Option<Value> {
    if bytes.is_empty() {
        return None;
    }
    serde_json::from_slice(bytes).ok().or_else(|| {
        let text = std::str::from_utf8(bytes).ok()?;
        serde_saphyr::from_str::<Value>(text).ok()
    })
}

fn route(state: &State, path: &str) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Ok(Route::Version),
        ["api"] => return Ok(Route::CoreVersions),
        ["apis"] => return Ok(Route::Groups),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(not_served()),
    };
    let kind = |plural: &str| state.kind_at(group, version, plural).ok_or_else(not_served);
    let obj = |kind: Kind, ns: &str, name: &str, sub: Option<&str>| Route::Object {
        kind,
        version: version.to_string(),
        ns: ns.to_string(),
        name: name.to_string(),
        sub: sub.map(str::to_string),
    };
    Ok(match rest {
        [] => Route::Resources {
            group: group.to_string(),
            version: version.to_string(),
        },
        ["namespaces", ns, "pods", pod, "proxy", tail @ ..] if group.is_empty() => {
            Route::PodProxy {
                ns: ns.to_string(),
                pod: pod.to_string(),
                rest: tail.join("/"),
            }
        }
        ["namespaces", ns, "pods", pod, "portforward"] if group.is_empty() => Route::PortForward {
            ns: ns.to_string(),
            pod: pod.to_string(),
        },
        ["namespaces", ns, plural, tail @ ..] if !matches!(*plural, "status" | "finalize") => {
            let k = kind(plural)?;
            if !k.namespaced {
                return Err(not_served());
            }
            match tail {
                [] => Route::Collection {
                    kind: k,
                    version: version.to_string(),
                    ns: Some(ns.to_string()),
                },
                [name] => obj(k, ns, name, None),
                [name, sub] => obj(k, ns, name, Some(sub)),
                _ => return Err(not_served()),
            }
        }
        [plural, tail @ ..] => {
            let k = kind(plural)?;
            match tail {
                [] => Route::Collection {
                    kind: k,
                    version: version.to_string(),
                    ns: None,
                },
                [name] if !k.namespaced => obj(k, "", name, None),
                [name, sub] if !k.namespaced => obj(k, "", name, Some(sub)),
                _ => return Err(not_served()),
            }
        }
    })
}

/// `create`, `patch`…: the verb RBAC would check, for Forbidden messages.
fn verb(method: &Method, is_collection: bool, watch: bool) -> &'static str {
    match *method {
        Method::GET if watch => "watch",
        Method::GET if is_collection => "list",
        Method::GET => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "unknown",
    }
}

fn injected(code: u16, route: Option<&Route>, method: &Method, watch: bool) -> ApiError {
    let (reason, what) = match code {
        401 => ("Unauthorized", "Unauthorized".to_string()),
        403 => {
            // (resource for "X is forbidden", RBAC resource, group, namespace, name, verb)
            let (res, rbac_res, group, ns, name, v) = match route {
                Some(Route::Collection { kind, ns, .. }) => {
                    (kind.plural.clone(), kind.plural.clone(), kind.group.as_str(), ns.clone().unwrap_or_default(), "", verb(method, true, watch))
                }
                Some(Route::Object { kind, ns, name, .. }) => {
                    (kind.plural.clone(), kind.plural.clone(), kind.group.as_str(), ns.clone(), name.as_str(), verb(method, false, watch))
                }
                // A WebSocket GET on a connect subresource needs `create` (as for SPDY's POST),
                // and RBAC names the subresource.
                Some(Route::PortForward { ns, pod }) => {
                    ("pods".into(), "pods/portforward".into(), "", ns.clone(), pod.as_str(), "create")
                }
                Some(Route::PodProxy { ns, pod, .. }) => {
                    ("pods".into(), "pods/proxy".into(), "", ns.clone(), pod.as_str(), verb(method, false, watch))
                }
                _ => (String::new(), String::new(), "", String::new(), "", verb(method, false, watch)),
            };
            let mut m = String::new();
            if !name.is_empty() {
                m.push_str(&format!("{res} \"{name}\" is forbidden: "));
            } else {
                m.push_str(&format!("{res} is forbidden: "));
            }
            m.push_str(&format!(
                "User \"system:serviceaccount:test:fake\" cannot {v} resource \"{rbac_res}\" in API group \"{group}\""
            ));
            if !ns.is_empty() {
                m.push_str(&format!(" in the namespace \"{ns}\""));
            } else {
                m.push_str(" at the cluster scope");
            }
            ("Forbidden", m)
        }
        404 => ("NotFound", "the server could not find the requested resource".into()),
        409 => ("Conflict", "the object has been modified; please apply your changes to the latest version and try again".into()),
        422 => ("Invalid", "the object is invalid".into()),
        429 => ("TooManyRequests", "too many requests".into()),
        _ => ("InternalError", format!("an error on the server (\"injected failure {code}\") has prevented the request from succeeding")),
    };
    ApiError::new(code, reason, what)
}

pub async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return error(&ApiError::new(
                413,
                "RequestEntityTooLarge",
                format!("request body: {e}"),
            ));
        }
    };
    let path = parts.uri.path().to_string();
    let query_str = parts.uri.query().unwrap_or("").to_string();
    let query: HashMap<String, String> = query_str
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect();
    let content_type = parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = parse_body(&bytes);
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let dry_run = query.get("dryRun").is_some_and(|v| v == "All");
    let method = parts.method.clone();

    let mut st = inner.state.lock().expect("state lock");
    st.requests.push(RecordedRequest {
        method: method.to_string(),
        path: path.clone(),
        query: query_str.clone(),
        content_type: content_type.clone(),
        body: body.clone(),
    });
    let routed = route(&st, &path);
    if let Some(code) = st.failure_for(method.as_str(), &path) {
        return error(&injected(code, routed.as_ref().ok(), &method, watch));
    }
    let route = match routed {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    let result: Result<(Value, Vec<Event>), ApiError> = match (&method, route) {
        (&Method::GET, Route::Version) => Ok((
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-zmesh-fake",
                   "platform": "linux/amd64"}),
            vec![],
        )),
        (&Method::GET, Route::CoreVersions) => Ok((kinds::core_versions(), vec![])),
        (&Method::GET, Route::Groups) => Ok((kinds::group_list(&st.kinds), vec![])),
        (&Method::GET, Route::Resources { group, version }) => {
            kinds::resource_list(&st.kinds, &group, &version)
                .map(|v| (v, vec![]))
                .ok_or_else(not_served)
        }
        (&Method::GET, Route::PodProxy { ns, pod, rest }) => {
            let key = format!("{ns}/{pod}/{rest}");
            // 502, not the 503 a real server may send: kube-rs retries 503 for minutes.
            let (code, text) = st.proxies.get(&key).cloned().unwrap_or((
                502,
                format!("error trying to reach service: dial tcp: pod {ns}/{pod} ({key}) is not reachable"),
            ));
            return Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(text)).boxed_unsync())
                .expect("static response parts");
        }
        (&Method::GET, Route::PortForward { ns, pod }) => {
            // The pod exists if the test registered ports for it or stored it.
            let pods = st.kind_at("", "v1", "pods");
            let stored = pods
                .as_ref()
                .is_some_and(|k| st.objects.contains_key(&crate::store::key(k, &ns, &pod)));
            let targets = match st.port_forwards.get(&format!("{ns}/{pod}")) {
                Some(t) => t.clone(),
                None if stored => HashMap::new(),
                None => {
                    return error(
                        &pods
                            .map(|k| ApiError::not_found(&k, &pod))
                            .unwrap_or_else(not_served),
                    );
                }
            };
            drop(st);
            return match crate::portforward::upgrade(
                &mut parts,
                &query,
                format!("{ns}/{pod}"),
                targets,
                inner.stop.clone(),
            ) {
                Ok(r) => r,
                Err(e) => error(&e),
            };
        }
        (&Method::GET, Route::Collection { kind, version, ns }) if watch => {
            let sel = Selectors::from_query(&query);
            let timeout = query
                .get("timeoutSeconds")
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(300);
            let since = query
                .get("resourceVersion")
                .and_then(|rv| rv.parse::<u64>().ok())
                .unwrap_or(0);
            let rx = inner.events.subscribe();
            let (group, plural) = (kind.group.clone(), kind.plural.clone());
            let filter = move |e: &Event| {
                e.group == group
                    && e.plural == plural
                    && ns.as_ref().is_none_or(|n| *n == e.namespace)
                    && sel.matches(&e.object)
            };
            // Since 0 (or none): the current objects as ADDED, then changes (API semantics
            // of "any" resource version); otherwise replay the history after `since`.
            let mut replay: VecDeque<Value> = VecDeque::new();
            if since == 0 {
                for o in st.list(&kind, None) {
                    let e = Event {
                        rv: 0,
                        group: kind.group.clone(),
                        plural: kind.plural.clone(),
                        namespace: o["metadata"]["namespace"].as_str().unwrap_or("").into(),
                        kind: "ADDED",
                        object: o,
                    };
                    if filter(&e) {
                        replay.push_back(watch_line(&kind, &version, &e));
                    }
                }
            } else {
                for e in st.history.iter().filter(|e| e.rv > since && filter(e)) {
                    replay.push_back(watch_line(&kind, &version, e));
                }
            }
            let last = st.rv;
            drop(st);
            return watch_response(replay, rx, last, Duration::from_secs(timeout), move |e| {
                filter(e).then(|| watch_line(&kind, &version, e))
            });
        }
        (&Method::GET, Route::Collection { kind, version, ns }) => {
            let sel = Selectors::from_query(&query);
            let items: Vec<Value> = st
                .list(&kind, ns.as_deref())
                .into_iter()
                .filter(|o| sel.matches(o))
                .map(|o| State::view(&kind, &version, &o))
                .collect();
            Ok((
                json!({"apiVersion": kind.api_version(&version), "kind": format!("{}List", kind.kind),
                       "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
                vec![],
            ))
        }
        (&Method::POST, Route::Collection { kind, version, .. })
            if kind.plural == "selfsubjectaccessreviews" =>
        {
            match body {
                Some(b) => st.access_review(&kind, &version, b).map(|o| (o, vec![])),
                None => Err(ApiError::new(400, "BadRequest", "the request has no body")),
            }
        }
        (&Method::POST, Route::Collection { kind, version, ns }) => match body {
            Some(b) => st
                .write(
                    &kind,
                    ns.as_deref().unwrap_or(""),
                    b,
                    Write::Create,
                    dry_run,
                )
                .map(|(o, e)| (State::view(&kind, &version, &o), e.into_iter().collect())),
            None => Err(ApiError::new(400, "BadRequest", "the request has no body")),
        },
        (
            &Method::GET,
            Route::Object {
                kind,
                version,
                ns,
                name,
                ..
            },
        ) => st
            .objects
            .get(&crate::store::key(&kind, &ns, &name))
            .map(|o| (State::view(&kind, &version, o), vec![]))
            .ok_or_else(|| ApiError::not_found(&kind, &name)),
        (
            &Method::PUT,
            Route::Object {
                kind,
                version,
                ns,
                name,
                sub,
            },
        ) => match body {
            Some(b) if sub.as_deref() == Some("status") => st
                .write_status(&kind, &ns, &name, b.get("status").cloned(), dry_run)
                .map(|(o, e)| (State::view(&kind, &version, &o), e.into_iter().collect())),
            Some(b) if b.pointer("/metadata/name").and_then(Value::as_str) == Some(&name) => st
                .write(&kind, &ns, b, Write::Replace, dry_run)
                .map(|(o, e)| (State::view(&kind, &version, &o), e.into_iter().collect())),
            Some(_) => Err(ApiError::new(
                400,
                "BadRequest",
                "the name of the object does not match the name on the URL",
            )),
            None => Err(ApiError::new(400, "BadRequest", "the request has no body")),
        },
        (
            &Method::PATCH,
            Route::Object {
                kind,
                version,
                ns,
                name,
                sub,
            },
        ) => {
            let ct = content_type
                .as_deref()
                .unwrap_or("application/merge-patch+json");
            match body {
                Some(b) => st
                    .patch(
                        &kind,
                        &ns,
                        &name,
                        ct,
                        &b,
                        sub.as_deref() == Some("status"),
                        dry_run,
                    )
                    .map(|(o, e)| (State::view(&kind, &version, &o), e.into_iter().collect())),
                None => Err(ApiError::new(400, "BadRequest", "the request has no body")),
            }
        }
        (
            &Method::DELETE,
            Route::Object {
                kind,
                version,
                ns,
                name,
                ..
            },
        ) => st
            .delete(&kind, &ns, &name, dry_run)
            .map(|(o, e)| (State::view(&kind, &version, &o), e)),
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported here"),
        )),
    };
    match result {
        Ok((v, events)) => {
            let code = if method == Method::POST { 201 } else { 200 };
            for e in events {
                let _ = inner.events.send(e);
            }
            json_response(code, &v)
        }
        Err(e) => error(&e),
    }
}

fn watch_line(kind: &Kind, version: &str, e: &Event) -> Value {
    json!({"type": e.kind, "object": State::view(kind, version, &e.object)})
}

/// A chunked watch response: the replayed lines, then live events after `last` until the
/// timeout or a lagging receiver (the client then relists, as after any watch end).
fn watch_response(
    replay: VecDeque<Value>,
    rx: tokio::sync::broadcast::Receiver<Event>,
    last: u64,
    timeout: Duration,
    render: impl Fn(&Event) -> Option<Value> + Send + 'static,
) -> Response<Body> {
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = futures::stream::unfold(
        (replay, rx, render),
        move |(mut replay, mut rx, render)| async move {
            if let Some(line) = replay.pop_front() {
                return Some((frame(&line), (replay, rx, render)));
            }
            loop {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Ok(e)) if e.rv > last => {
                        if let Some(line) = render(&e) {
                            return Some((frame(&line), (replay, rx, render)));
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(RecvError::Lagged(_) | RecvError::Closed)) | Err(_) => return None,
                }
            }
        },
    );
    Response::builder()
        .header("content-type", "application/json")
        .body(BodyExt::boxed_unsync(StreamBody::new(stream.boxed())))
        .expect("static response parts")
}

fn frame(v: &Value) -> Result<Frame<Bytes>, Infallible> {
    Ok(Frame::data(Bytes::from(format!("{v}\n"))))
}

/// Percent-decoding of query components (`labelSelector=app%3Dx`).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
