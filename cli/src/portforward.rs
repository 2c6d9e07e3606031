//! An HTTP GET to a server inside a pod, through the API server's `pods/portforward`
//! subresource, the way istioctl reaches the proxies' admin port.
//!
//! The pod proxy subresource cannot do this: the API server dials the pod IP, and the admin
//! server listens on 127.0.0.1 only (on purpose: it can dump config and stop the proxy). With
//! port-forward the kubelet connects to `localhost:PORT` inside the pod's network namespace and
//! relays the bytes over a WebSocket (kube-rs's `Api::<Pod>::portforward`); plain HTTP/1.1
//! runs over that stream. The operator's kubeconfig needs RBAC `create` on `pods/portforward`.
//!
//! Every wait (the upgrade, the HTTP exchange) is bounded by one deadline.

use std::pin::pin;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::FusedFuture;
use http::header::HOST;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tokio::io::DuplexStream;
use tokio::time::Instant;

use crate::error::{CliError, chain, one_line};
use crate::kube::{Kube, Op, api_error};

/// How long `zmesh status` gives each pod (config-dump has `--timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// Config dumps of large meshes are big, but a runaway body must not exhaust memory.
const MAX_BODY: usize = 64 << 20;

/// After the HTTP side failed, how long to wait for the kubelet's reason on the error channel:
/// it sends the reason and then closes, so the close may be seen first.
const ERROR_GRACE: Duration = Duration::from_secs(1);

/// Which port of which pod, for messages.
struct Target<'a> {
    namespace: &'a str,
    pod: &'a str,
    port: u16,
}

impl Target<'_> {
    fn failed(&self, reason: impl Into<String>) -> CliError {
        CliError::PortForward {
            namespace: self.namespace.to_string(),
            pod: self.pod.to_string(),
            port: self.port,
            reason: reason.into(),
        }
    }

    /// The kubelet's error-channel message, e.g. "error forwarding port 15000 to pod …:
    /// failed to connect to localhost:15000 inside namespace …: connect: connection refused".
    fn in_pod(&self, message: &str) -> CliError {
        if message.contains("connection refused") {
            self.failed(format!(
                "connection refused inside the pod: nothing listens on localhost:{} \
                 (is the proxy running?)",
                self.port
            ))
        } else {
            self.failed(one_line(message))
        }
    }
}

/// `GET path` on `port` inside `namespace/pod`; the body of a 200 answer.
pub async fn get(
    kube: &Kube,
    namespace: &str,
    pod: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<Bytes, CliError> {
    let target = Target {
        namespace,
        pod,
        port,
    };
    let deadline = Instant::now() + timeout;
    let timed_out = |last: &str| CliError::Timeout {
        what: format!("GET {path} on port {port} of pod {namespace}/{pod} (port-forward)"),
        secs: timeout.as_secs(),
        last: last.to_string(),
    };

    let pods: Api<Pod> = Api::namespaced(kube.client.clone(), namespace);
    let mut forwarder =
        match tokio::time::timeout_at(deadline, pods.portforward(pod, &[port])).await {
            Err(_) => return Err(timed_out("the API server had not opened the port-forward")),
            Ok(Err(e)) => return Err(open_error(kube, &target, e)),
            Ok(Ok(f)) => f,
        };
    let (Some(stream), Some(pod_error)) = (forwarder.take_stream(port), forwarder.take_error(port))
    else {
        forwarder.abort();
        return Err(target.failed("kube-rs returned no stream for the port"));
    };

    // Either the HTTP answer arrives, or the kubelet reports on the error channel why it could
    // not connect inside the pod. `None` there only means the channel closed without a message.
    let mut pod_error = pin!(pod_error.fuse());
    let mut exchange = pin!(tokio::time::timeout_at(
        deadline,
        exchange(stream, path, port)
    ));
    let outcome = loop {
        tokio::select! {
            r = &mut exchange => break r,
            msg = &mut pod_error, if !pod_error.is_terminated() => {
                if let Some(m) = msg {
                    forwarder.abort();
                    return Err(target.in_pod(&m));
                }
            }
        }
    };
    // Done with the forward either way: aborting drops the WebSocket, and the API server and the
    // kubelet close their side of it.
    let result = match outcome {
        Err(_) => Err(timed_out("the port-forward was open; no HTTP response yet")),
        Ok(Err(reason)) => {
            if !pod_error.is_terminated()
                && let Ok(Some(m)) = tokio::time::timeout(ERROR_GRACE, &mut pod_error).await
            {
                Err(target.in_pod(&m))
            } else {
                Err(target.failed(reason))
            }
        }
        Ok(Ok((status, body))) if status == StatusCode::OK => Ok(body),
        Ok(Ok((status, body))) => Err(CliError::Failed(format!(
            "pod {namespace}/{pod}: GET {path} on port {port} answered {status}: {}",
            one_line(&String::from_utf8_lossy(&body[..body.len().min(200)]))
        ))),
    };
    forwarder.abort();
    result
}

/// The upgrade failed: the pod is missing, RBAC said no, or the API server is unreachable.
fn open_error(kube: &Kube, target: &Target, e: kube::Error) -> CliError {
    let op = Op::new(
        "create",
        "pods/portforward",
        Some(target.namespace),
        Some(target.pod),
    );
    match api_error(&kube.server, &op, e) {
        // A missing namespace is answered like a missing pod by the subresource.
        CliError::NotFound { .. } | CliError::NamespaceNotFound(_) => CliError::NotFound {
            what: format!("pod {:?} in namespace {:?}", target.pod, target.namespace),
        },
        // `what` is "create pods/portforward …": the permission the kubeconfig's user lacks.
        CliError::Request { reason, .. } => target.failed(reason),
        other => other,
    }
}

/// HTTP/1.1 over the forwarded stream; errors as one line of text.
async fn exchange(
    stream: DuplexStream,
    path: &str,
    port: u16,
) -> Result<(StatusCode, Bytes), String> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| chain(&e))?;
    // The connection task ends when the stream does; it is aborted below in case it does not.
    let conn = tokio::spawn(conn);
    let result = async {
        let req = Request::get(path)
            .header(HOST, format!("localhost:{port}"))
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| chain(&e))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the response: {}", chain(e.as_ref())))?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    conn.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_errors_become_one_line() {
        let t = Target {
            namespace: "zmesh-system",
            pod: "ztunnel-a",
            port: 15000,
        };
        let refused = "error forwarding port 15000 to pod 4f2c, uid : failed to execute portforward \
            in network namespace \"/var/run/netns/cni-1\": failed to connect to localhost:15000 \
            inside namespace \"4f2c\", IPv4: dial tcp4 127.0.0.1:15000: connect: connection refused\n";
        assert_eq!(
            t.in_pod(refused).to_string(),
            "pod zmesh-system/ztunnel-a: port-forward to port 15000: connection refused inside \
             the pod: nothing listens on localhost:15000 (is the proxy running?)"
        );
        assert_eq!(
            t.in_pod("pod not running\n  (phase Pending)").to_string(),
            "pod zmesh-system/ztunnel-a: port-forward to port 15000: pod not running (phase Pending)"
        );
    }
}
