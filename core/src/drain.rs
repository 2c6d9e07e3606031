//! Graceful shutdown: stop accepting, let live connections finish for a grace period, then
//! cut what is left.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shared by every listener and connection task of one proxy.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    /// Cancelled when listeners must stop accepting (SIGTERM, /quitquitquit).
    stop_accepting: CancellationToken,
    /// Cancelled when the grace period is over: connections still open are closed.
    force_close: CancellationToken,
    tracker: TaskTracker,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Listeners select on this to stop accepting.
    pub fn stopping(&self) -> CancellationToken {
        self.stop_accepting.clone()
    }

    /// Connections select on this to close when the grace period is over.
    pub fn force_close(&self) -> CancellationToken {
        self.force_close.clone()
    }

    /// Run a connection task, tracked so shutdown can wait for it.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// Number of tracked tasks still running.
    pub fn active(&self) -> usize {
        self.tracker.len()
    }

    /// Begin shutdown and wait up to `grace` for tracked tasks; returns how many were cut.
    pub async fn shutdown(&self, grace: Duration) -> usize {
        self.stop_accepting.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.tracker.len();
        tracing::warn!(
            connections = left,
            "drain grace period of {grace:?} is over; closing remaining connections"
        );
        self.force_close.cancel();
        // Cut connections end promptly once cancelled; don't hang shutdown on a stuck one.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_then_forces() {
        let d = Drain::new();
        let fc = d.force_close();
        d.spawn(async move { fc.cancelled().await });
        let quick = d.clone();
        d.spawn(async move {
            quick.stopping().cancelled().await;
        });
        let cut = d.shutdown(Duration::from_millis(100)).await;
        assert_eq!(cut, 1);
        assert_eq!(d.active(), 0);
    }
}
