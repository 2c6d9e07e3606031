//! Live inbound connections and their authorization attributes, so that a policy change can
//! close connections that are now denied (Istio's "late rejection").

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tracing::info;
use zmesh_core::authz::{ConnectionAttributes, Decision};
use zmesh_core::state::StateStore;

struct Tracked {
    attrs: ConnectionAttributes,
    /// uid of the destination workload the connection was authorized against.
    dst_uid: String,
    cancel: CancellationToken,
}

#[derive(Default)]
pub struct ConnectionManager {
    conns: Mutex<HashMap<u64, Tracked>>,
}

/// Removes the connection from the manager when the connection ends.
pub struct TrackedConnection {
    id: u64,
    manager: Arc<ConnectionManager>,
    cancel: CancellationToken,
}

impl TrackedConnection {
    /// Cancelled when policy no longer allows the connection.
    pub fn revoked(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

impl Drop for TrackedConnection {
    fn drop(&mut self) {
        if let Ok(mut c) = self.manager.conns.lock() {
            c.remove(&self.id);
        }
    }
}

impl ConnectionManager {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn track(
        self: &Arc<Self>,
        id: u64,
        attrs: ConnectionAttributes,
        dst_uid: String,
    ) -> TrackedConnection {
        let cancel = CancellationToken::new();
        if let Ok(mut c) = self.conns.lock() {
            c.insert(
                id,
                Tracked {
                    attrs,
                    dst_uid,
                    cancel: cancel.clone(),
                },
            );
        }
        TrackedConnection {
            id,
            manager: self.clone(),
            cancel,
        }
    }

    pub fn len(&self) -> usize {
        self.conns.lock().map(|c| c.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-evaluate every live connection against the current state; close the denied ones.
    /// Returns how many were closed.
    pub fn recheck(&self, state: &StateStore) -> usize {
        let Ok(conns) = self.conns.lock() else {
            return 0;
        };
        let st = state.read();
        let mut closed = 0;
        for (id, t) in conns.iter() {
            if t.cancel.is_cancelled() {
                continue;
            }
            // A destination that disappeared is no longer authorized by anything.
            let decision = match st.workload_by_uid(&t.dst_uid) {
                Some(w) => st.authorize(&w, &t.attrs),
                None => Decision::Deny {
                    policy: "destination workload removed".into(),
                },
            };
            if let Decision::Deny { policy } = decision {
                info!(
                    conn = id,
                    src = ?t.attrs.src_identity.as_ref().map(|i| i.to_string()),
                    dst = %t.attrs.dst_ip,
                    "closing live connection: no longer authorized ({policy})"
                );
                t.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// Watch policy changes for as long as `stop` is not cancelled.
    pub async fn watch(self: Arc<Self>, state: Arc<StateStore>, stop: CancellationToken) {
        let mut rx = state.policy_generation();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
            self.recheck(&state);
        }
    }
}
