//! A cancellation flag shared by the signal handler, the workers and tests.
//!
//! Built on `tokio::sync::watch` so that waiting for cancellation is an `await`, without
//! pulling in `tokio-util` for its `CancellationToken`.

use std::sync::Arc;

use tokio::sync::watch;

/// Cloneable handle; cancelling any clone cancels all of them. Cancellation is permanent.
#[derive(Debug, Clone)]
pub struct CancelToken(Arc<watch::Sender<bool>>);

impl Default for CancelToken {
    fn default() -> Self {
        Self::new()
    }
}

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self(Arc::new(watch::Sender::new(false)))
    }

    /// Requests cancellation: no new operations are started; cleanup still runs.
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }

    /// Whether [`cancel`](Self::cancel) has been called.
    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes once the token is cancelled.
    pub async fn cancelled(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait; an error
        // would only mean it did, and then there is nothing left to wait for.
        let _ = rx.wait_for(|cancelled| *cancelled).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cancel_wakes_waiters() {
        let token = CancelToken::new();
        assert!(!token.is_cancelled());
        let waiter = tokio::spawn({
            let t = token.clone();
            async move { t.cancelled().await }
        });
        token.clone().cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(token.is_cancelled());
        // Already cancelled: returns at once.
        token.cancelled().await;
    }
}
