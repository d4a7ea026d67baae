//! How many client connections may this replica hold open? A cap on the proxy listener's
//! connections, so a flood of them (idle or slow) cannot take the replica's file descriptors
//! and memory; past it a new connection is closed at once, as Envoy's
//! `global_downstream_max_connections` does, and the client retries (another replica, or
//! this one when a connection closes).
//!
//! Pingora gives a listener no such cap, so [`Capped`] wraps the proxy app: it takes a slot
//! when a connection arrives and serves every request on it (what pingora's accept loop
//! would otherwise do, one `process_new` per request) before giving the slot back. What
//! bounds how long a connection can hold its slot doing nothing is `[server]
//! header_timeout_secs` (a request header, idle keep-alive wait included, must arrive within
//! it) and `body_read_timeout_secs`.

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A server app whose open connections are capped.
pub struct Capped<A> {
    inner: Arc<A>,
    max: usize,
    open: Arc<AtomicUsize>,
}

/// One connection's slot, counted in the metrics while it is open; given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        crate::metrics::get().connection_closed();
    }
}

impl<A> Capped<A> {
    pub fn new(inner: A, max: usize) -> Self {
        Capped {
            inner: Arc::new(inner),
            max,
            open: Arc::default(),
        }
    }

    fn slot(&self) -> Option<Slot> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        crate::metrics::get().connection_opened();
        Some(Slot(self.open.clone()))
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Capped<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(_slot) = self.slot() else {
            crate::metrics::get().record_connection_refused();
            tracing::debug!(
                max = self.max,
                "connection refused: at server.max_connections"
            );
            return None;
        };
        let mut next = self.inner.process_new(stream, shutdown).await;
        while let Some(stream) = next {
            next = self.inner.process_new(stream, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}
