//! HBONE client with a connection pool.
//!
//! Connections are keyed like Istio's ztunnel: (source identity, destination identities,
//! destination address, source address) — the source address is part of the key because the
//! proxy may connect from the client's own IP. A key's connection carries up to
//! `max_streams_per_connection` CONNECT streams; a burst of concurrent connects to one key opens
//! one connection (a per-key lock), not one each. Idle connections are closed after
//! `idle_timeout`, and each connection sends HTTP/2 PINGs so a dead peer is noticed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use tracing::{debug, info_span, warn};

use super::{H2Config, H2Stream, HboneError, StreamSlot, next_connection_id};
use crate::certs::CertificateManager;
use crate::identity::Identity;
use crate::socket::{self, ConnectOptions};
use crate::telemetry::InstrumentVerbose;

/// What identifies a reusable HBONE connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadKey {
    /// Identity we present (the source workload's).
    pub src_id: Identity,
    /// Identities the server may present (destination workload, or its service's SANs).
    pub dst_id: Vec<Identity>,
    /// HBONE endpoint (`<pod ip>:15008`, or a peer node's address).
    pub dst: SocketAddr,
    /// Source address of the connection.
    pub src: IpAddr,
}

/// Per-connection stream accounting, shared with the streams it carries.
#[derive(Debug)]
pub(crate) struct ConnSlots {
    active: AtomicUsize,
    max: usize,
    closed: AtomicBool,
    idle_since: Mutex<Instant>,
}

impl ConnSlots {
    fn try_acquire(&self) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let mut cur = self.active.load(Ordering::Relaxed);
        loop {
            if cur >= self.max {
                return false;
            }
            match self.active.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(v) => cur = v,
            }
        }
    }

    pub(crate) fn release(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1
            && let Ok(mut t) = self.idle_since.lock()
        {
            *t = Instant::now();
        }
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.active.load(Ordering::Acquire) != 0 {
            return None;
        }
        self.idle_since.lock().ok().map(|t| t.elapsed())
    }
}

struct PooledConn {
    id: u64,
    send: SendRequest<Bytes>,
    slots: Arc<ConnSlots>,
}

#[derive(Default)]
struct KeyEntry {
    /// Held while a new connection is being opened for this key.
    connecting: tokio::sync::Mutex<()>,
    conns: Mutex<Vec<Arc<PooledConn>>>,
    /// Most recent failure to open a connection, so a burst does not retry it serially.
    last_failure: Mutex<Option<(Instant, String)>>,
}

impl KeyEntry {
    fn reserve(&self) -> Option<(Arc<PooledConn>, StreamSlot)> {
        let conns = self.conns.lock().ok()?;
        conns
            .iter()
            .find(|c| c.slots.try_acquire())
            .map(|c| (c.clone(), StreamSlot(c.slots.clone())))
    }
}

/// Options for the sockets the pool opens.
#[derive(Debug, Clone, Default)]
pub struct PoolOptions {
    /// Connect from the key's source address (`IP_TRANSPARENT` for non-local ones).
    pub keep_source_address: bool,
    /// `SO_MARK` for outgoing connections, so redirection lets them pass.
    pub mark: Option<u32>,
}

/// A request to open one tunnel.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// `ip:port` of the final destination (the HTTP/2 `:authority`).
    pub authority: String,
    /// `forwarded`, `baggage`, `traceparent`, ...
    pub headers: HeaderMap,
}

struct PoolInner {
    cfg: H2Config,
    opts: PoolOptions,
    certs: Arc<CertificateManager>,
    entries: Mutex<HashMap<WorkloadKey, Arc<KeyEntry>>>,
    opened: AtomicU64,
}

/// The HBONE client. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl Pool {
    /// Create a pool; its idle reaper runs until the last clone is dropped.
    pub fn new(cfg: H2Config, opts: PoolOptions, certs: Arc<CertificateManager>) -> Self {
        let inner = Arc::new(PoolInner {
            cfg,
            opts,
            certs,
            entries: Mutex::new(HashMap::new()),
            opened: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&inner);
        let every =
            (inner.cfg.idle_timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(30));
        tokio::spawn(reap(weak, every));
        Pool { inner }
    }

    /// Open a tunnel to `req.authority` through the pooled connection for `key`.
    pub async fn connect(
        &self,
        key: &WorkloadKey,
        req: ConnectRequest,
    ) -> Result<H2Stream, HboneError> {
        // One retry: a pooled connection may have been closed by the peer (GOAWAY) between
        // our check and our request.
        let mut tried_fresh = false;
        loop {
            let (conn, slot, fresh) = self.checkout(key).await?;
            match self.send_connect(key, &conn, slot, &req).await {
                Ok(s) => return Ok(s),
                Err(HboneError::ConnectionClosed { .. }) if !(fresh || tried_fresh) => {
                    conn.slots.closed.store(true, Ordering::Release);
                    tried_fresh = true;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Live pooled connections (all keys).
    pub fn connections(&self) -> usize {
        let Ok(entries) = self.inner.entries.lock() else {
            return 0;
        };
        entries
            .values()
            .map(|e| {
                e.conns
                    .lock()
                    .map(|c| {
                        c.iter()
                            .filter(|c| !c.slots.closed.load(Ordering::Acquire))
                            .count()
                    })
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Connections opened since the pool was created.
    pub fn opened_total(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    fn entry(&self, key: &WorkloadKey) -> Arc<KeyEntry> {
        let mut entries = match self.inner.entries.lock() {
            Ok(e) => e,
            Err(poisoned) => poisoned.into_inner(),
        };
        entries.entry(key.clone()).or_default().clone()
    }

    async fn checkout(
        &self,
        key: &WorkloadKey,
    ) -> Result<(Arc<PooledConn>, StreamSlot, bool), HboneError> {
        let entry = self.entry(key);
        if let Some((c, s)) = entry.reserve() {
            return Ok((c, s, false));
        }
        let waited_since = Instant::now();
        let _guard = entry.connecting.lock().await;
        if let Some((c, s)) = entry.reserve() {
            return Ok((c, s, false));
        }
        // Someone else just failed to connect while we waited: share their answer rather
        // than repeating a slow failure once per queued caller.
        if let Ok(last) = entry.last_failure.lock()
            && let Some((at, reason)) = last.as_ref()
            && *at >= waited_since
        {
            return Err(HboneError::ConnectionClosed {
                peer: key.dst,
                reason: reason.clone(),
            });
        }
        match self.open(key).await {
            Ok(conn) => {
                let conn = Arc::new(conn);
                let ok = conn.slots.try_acquire();
                debug_assert!(ok, "a fresh connection has free slots");
                if let Ok(mut conns) = entry.conns.lock() {
                    conns.retain(|c| !c.slots.closed.load(Ordering::Acquire));
                    conns.push(conn.clone());
                }
                let slot = StreamSlot(conn.slots.clone());
                Ok((conn, slot, true))
            }
            Err(e) => {
                if let Ok(mut last) = entry.last_failure.lock() {
                    *last = Some((Instant::now(), e.to_string()));
                }
                Err(e)
            }
        }
    }

    async fn open(&self, key: &WorkloadKey) -> Result<PooledConn, HboneError> {
        let cfg = &self.inner.cfg;
        let peer = key.dst;
        let cert =
            self.inner
                .certs
                .fetch(&key.src_id)
                .await
                .map_err(|e| HboneError::Certificate {
                    identity: key.src_id.to_string(),
                    reason: e.to_string(),
                })?;
        let tls_cfg = cert
            .client_config(&key.dst_id)
            .map_err(|e| HboneError::Certificate {
                identity: key.src_id.to_string(),
                reason: e.to_string(),
            })?;
        let opts = ConnectOptions {
            source: self.inner.opts.keep_source_address.then_some(key.src),
            mark: self.inner.opts.mark,
            timeout: Some(cfg.handshake_timeout),
        };
        let tcp = socket::connect(peer, &opts)
            .await
            .map_err(|source| HboneError::Connect { peer, source })?;
        let handshake = async {
            let tls = tokio_rustls::TlsConnector::from(tls_cfg)
                .connect(crate::tls::server_name(), tcp)
                .await
                .map_err(|e| HboneError::Tls {
                    peer,
                    reason: crate::tls::describe_handshake_error(&e),
                })?;
            h2::client::Builder::new()
                .initial_window_size(cfg.stream_window)
                .initial_connection_window_size(cfg.connection_window)
                .max_frame_size(cfg.max_frame_size)
                .max_header_list_size(cfg.client_max_header_list)
                .max_send_buffer_size(cfg.client_send_buffer)
                .enable_push(false)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|e| HboneError::H2Handshake {
                    peer,
                    reason: e.to_string(),
                })
        };
        let (send, mut conn) = tokio::time::timeout(cfg.handshake_timeout, handshake)
            .await
            .map_err(|_| HboneError::HandshakeTimeout {
                peer,
                timeout: cfg.handshake_timeout,
            })??;
        let id = next_connection_id();
        let slots = Arc::new(ConnSlots {
            active: AtomicUsize::new(0),
            max: cfg.max_streams_per_connection.max(1),
            closed: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
        });
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        let driver_slots = slots.clone();
        let (interval, timeout) = (cfg.keepalive_interval, cfg.keepalive_timeout);
        let span = info_span!("hbone_client", conn = id, %peer, src = %key.src_id);
        let warn_span = span.clone();
        // Polled for every frame: the span is entered only when debug logging is on.
        tokio::spawn(
            async move {
                debug!("connection open");
                let ping = conn.ping_pong();
                tokio::select! {
                    r = &mut conn => match r {
                        Ok(()) => debug!("connection closed"),
                        Err(e) => debug!("connection ended: {e}"),
                    },
                    reason = keepalive(ping, interval, timeout) => {
                        warn_span.in_scope(|| warn!("closing HBONE connection: {reason}"));
                    }
                }
                driver_slots.closed.store(true, Ordering::Release);
            }
            .instrument_verbose(span),
        );
        Ok(PooledConn { id, send, slots })
    }

    async fn send_connect(
        &self,
        key: &WorkloadKey,
        conn: &PooledConn,
        slot: StreamSlot,
        req: &ConnectRequest,
    ) -> Result<H2Stream, HboneError> {
        let peer = key.dst;
        let mut builder = Request::builder()
            .method(Method::CONNECT)
            .uri(req.authority.as_str())
            .version(Version::HTTP_2);
        if let Some(h) = builder.headers_mut() {
            h.extend(req.headers.clone());
        }
        let request = builder.body(()).map_err(|e| HboneError::BadRequest {
            authority: req.authority.clone(),
            reason: e.to_string(),
        })?;
        let closed = |e: h2::Error| HboneError::ConnectionClosed {
            peer,
            reason: e.to_string(),
        };
        let timeout = self.inner.cfg.handshake_timeout;
        let exchange = async {
            let mut send = conn.send.clone().ready().await.map_err(closed)?;
            let (resp, stream) = send.send_request(request, false).map_err(closed)?;
            let resp = resp.await.map_err(|e| HboneError::ConnectionClosed {
                peer,
                reason: format!("CONNECT {} got no response: {e}", req.authority),
            })?;
            Ok::<_, HboneError>((resp, stream))
        };
        let (resp, stream) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| HboneError::HandshakeTimeout { peer, timeout })??;
        if resp.status() != StatusCode::OK {
            return Err(HboneError::Status {
                peer,
                authority: req.authority.clone(),
                status: resp.status(),
            });
        }
        debug!(conn = conn.id, authority = %req.authority, "tunnel open");
        Ok(H2Stream::new(stream, resp.into_body(), Some(slot)))
    }
}

/// PING the peer every `interval`; returns why the connection should close.
async fn keepalive(ping: Option<h2::PingPong>, interval: Duration, timeout: Duration) -> String {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("keepalive PING failed: {e}"),
            Err(_) => return format!("no PONG within {timeout:?}; the peer is unresponsive"),
        }
    }
}

/// Drops idle and closed connections until the pool goes away.
async fn reap(pool: Weak<PoolInner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = pool.upgrade() else { return };
        let idle_timeout = inner.cfg.idle_timeout;
        let Ok(mut entries) = inner.entries.lock() else {
            return;
        };
        entries.retain(|_, entry| {
            let Ok(mut conns) = entry.conns.lock() else {
                return true;
            };
            conns.retain(|c| {
                let closed = c.slots.closed.load(Ordering::Acquire);
                let idle = c.slots.idle_for().is_some_and(|d| d >= idle_timeout);
                if idle && !closed {
                    debug!(conn = c.id, "closing idle HBONE connection");
                    c.slots.closed.store(true, Ordering::Release);
                }
                !(closed || idle)
            });
            !conns.is_empty() || Arc::strong_count(entry) > 1
        });
    }
}
