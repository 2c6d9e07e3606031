//! The pods' `portforward` subresource over WebSocket, framed as the kubelet frames it for the
//! `v4.channel.k8s.io` subprotocol (what kube-rs's `Api::<Pod>::portforward` negotiates):
//!
//! - port number `i` of `?ports=` gets two channels, data `2*i` and error `2*i+1`;
//! - every binary message starts with its channel byte;
//! - the first message on each channel, data and error alike, is the port as 2 bytes
//!   little-endian (kube-rs rejects any other first frame);
//! - a port that cannot be connected gets one text message on its error channel;
//! - the connection closes once every port's forwarding has ended.
//!
//! The kubelet dials `localhost:PORT` in the pod's network namespace right after the upgrade;
//! here the port's registered target address is dialled instead.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::Response;
use hyper::header::{
    CONNECTION, HeaderMap, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, UPGRADE,
};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;

use crate::server::Body;
use crate::store::ApiError;

/// Binary channel subprotocols the kubelet serves for port-forward, in no particular order
/// (the client's order decides). `v5.channel.k8s.io` is exec/attach only, so a client
/// offering v5 first still gets v4, as from a real cluster.
const PROTOCOLS: &[&str] = &["v4.channel.k8s.io", "channel.k8s.io"];

/// A target that neither accepts nor refuses (a dropped SYN) must not hang the test.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the client gets to answer our Close before the connection is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A test's answer from the pod side is small; reading in chunks keeps frames bounded.
const READ_CHUNK: usize = 32 * 1024;

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(400, "BadRequest", message)
}

/// The ports of `?ports=80,8080` (already percent-decoded), validated as the kubelet does.
fn parse_ports(query: &HashMap<String, String>) -> Result<Vec<u16>, ApiError> {
    let raw = query
        .get("ports")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| bad_request("query parameter \"ports\" is required"))?;
    raw.split(',')
        .map(|p| {
            let p = p.trim();
            match p.parse::<u16>() {
                Ok(0) => Err(bad_request(format!("port \"{p}\" must be > 0"))),
                Ok(n) => Ok(n),
                Err(e) => Err(bad_request(format!(
                    "unable to parse \"{p}\" as a port: {e}"
                ))),
            }
        })
        .collect()
}

/// The first subprotocol in the client's list that is served.
fn choose_protocol(headers: &HeaderMap) -> Result<&'static str, ApiError> {
    let offered: Vec<String> = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    offered
        .iter()
        .find_map(|o| PROTOCOLS.iter().find(|p| **p == o).copied())
        .ok_or_else(|| {
            bad_request(format!(
                "requested protocol(s) are not supported: {offered:?}; supported protocols are {PROTOCOLS:?}"
            ))
        })
}

/// Answer the upgrade request and start forwarding once the connection is switched.
/// `targets` are the registered addresses of this pod's ports.
pub(crate) fn upgrade(
    parts: &mut hyper::http::request::Parts,
    query: &HashMap<String, String>,
    pod: String,
    targets: HashMap<u16, SocketAddr>,
    stop: CancellationToken,
) -> Result<Response<Body>, ApiError> {
    let is_websocket = parts
        .headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !is_websocket {
        // SPDY (`Upgrade: SPDY/3.1`) is what kubectl may send; this fake serves WebSocket only.
        return Err(bad_request("Upgrade request required (WebSocket)"));
    }
    let key = parts
        .headers
        .get(SEC_WEBSOCKET_KEY)
        .ok_or_else(|| bad_request("missing Sec-WebSocket-Key"))?
        .as_bytes()
        .to_vec();
    let protocol = choose_protocol(&parts.headers)?;
    let ports = parse_ports(query)?;
    let on_upgrade = parts
        .extensions
        .remove::<OnUpgrade>()
        .ok_or_else(|| ApiError::new(500, "InternalError", "connection cannot be upgraded"))?;
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = forward(on_upgrade, pod, ports, targets) => {}
        }
    });
    Response::builder()
        .status(101)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "Upgrade")
        .header(SEC_WEBSOCKET_ACCEPT, derive_accept_key(&key))
        .header(SEC_WEBSOCKET_PROTOCOL, protocol)
        .body(Empty::new().boxed_unsync())
        .map_err(|e| ApiError::new(500, "InternalError", e.to_string()))
}

fn frame(channel: usize, payload: &[u8]) -> Message {
    let mut bin = Vec::with_capacity(payload.len() + 1);
    // Channels are 2*i and 2*i+1 for at most a handful of ports in tests.
    bin.push(u8::try_from(channel).unwrap_or(u8::MAX));
    bin.extend_from_slice(payload);
    Message::binary(bin)
}

/// Connect a port's target, or say why not (the kubelet's wording for a refused dial).
async fn dial(pod: &str, port: u16, target: Option<&SocketAddr>) -> Result<TcpStream, String> {
    let refused = |why: String| {
        format!(
            "error forwarding port {port} to pod {pod}: failed to connect to localhost:{port} \
             inside namespace of pod {pod}: dial tcp4 127.0.0.1:{port}: connect: {why}"
        )
    };
    let Some(addr) = target else {
        return Err(refused("connection refused".into()));
    };
    match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => Ok(tcp),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err(refused("connection refused".into()))
        }
        Ok(Err(e)) => Err(refused(e.to_string())),
        Err(_) => Err(refused("i/o timeout".into())),
    }
}

/// What a port's reader task reports: bytes from the target, or its end of stream.
type FromTarget = (usize, Option<Bytes>);

async fn read_target(
    index: usize,
    mut read: tokio::net::tcp::OwnedReadHalf,
    tx: mpsc::Sender<FromTarget>,
) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send((index, Some(Bytes::copy_from_slice(&buf[..n]))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    let _ = tx.send((index, None)).await;
}

async fn forward(
    on_upgrade: OnUpgrade,
    pod: String,
    ports: Vec<u16>,
    targets: HashMap<u16, SocketAddr>,
) {
    let Ok(upgraded) = on_upgrade.await else {
        return;
    };
    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    let (mut sink, mut stream) = ws.split();

    // Both channels of every port announce the port first, before anything is dialled.
    for (i, port) in ports.iter().enumerate() {
        for ch in [2 * i, 2 * i + 1] {
            if sink.send(frame(ch, &port.to_le_bytes())).await.is_err() {
                return;
            }
        }
    }

    let (tx, mut rx) = mpsc::channel::<FromTarget>(16);
    let mut writers: Vec<Option<OwnedWriteHalf>> = Vec::with_capacity(ports.len());
    let mut open = 0usize;
    for (i, port) in ports.iter().enumerate() {
        match dial(&pod, *port, targets.get(port)).await {
            Ok(tcp) => {
                let (read, write) = tcp.into_split();
                writers.push(Some(write));
                tokio::spawn(read_target(i, read, tx.clone()));
                open += 1;
            }
            Err(message) => {
                writers.push(None);
                if sink
                    .send(frame(2 * i + 1, message.as_bytes()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    drop(tx);

    while open > 0 {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) if b.len() > 1 => {
                    let ch = usize::from(b[0]);
                    // Data for a port; the client never writes on error channels.
                    if ch % 2 == 0
                        && let Some(slot) = writers.get_mut(ch / 2)
                        && let Some(w) = slot
                        && w.write_all(&b[1..]).await.is_err()
                    {
                        *slot = None;
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            from_target = rx.recv() => match from_target {
                Some((i, Some(bytes))) => {
                    if sink.send(frame(2 * i, &bytes)).await.is_err() {
                        break;
                    }
                }
                // The pod side closed: that port's forwarding is over.
                Some((i, None)) => {
                    if let Some(slot) = writers.get_mut(i) {
                        *slot = None;
                    }
                    open -= 1;
                }
                None => break,
            },
        }
    }
    // The close handshake: send our Close (or flush the reply tungstenite queued to the
    // client's), then read until the client's side ends. Dropping the connection without it
    // makes kube-rs report "reset without closing handshake".
    let _ = sink.close().await;
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_protocols() {
        let q = |v: &str| HashMap::from([("ports".to_string(), v.to_string())]);
        assert_eq!(parse_ports(&q("15000,80")).unwrap(), vec![15000, 80]);
        assert!(parse_ports(&q("0")).is_err());
        assert!(parse_ports(&q("x")).is_err());
        assert!(parse_ports(&HashMap::new()).is_err());

        let mut h = HeaderMap::new();
        h.insert(
            SEC_WEBSOCKET_PROTOCOL,
            "v5.channel.k8s.io, v4.channel.k8s.io".parse().unwrap(),
        );
        assert_eq!(choose_protocol(&h).unwrap(), "v4.channel.k8s.io");
        h.insert(SEC_WEBSOCKET_PROTOCOL, "v5.channel.k8s.io".parse().unwrap());
        assert!(choose_protocol(&h).is_err());
    }
}
