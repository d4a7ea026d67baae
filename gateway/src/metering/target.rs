//! Where does a batch of usage events go? Without a ledger, into the store (today's small
//! deployments: the store is the record). With the PostgreSQL ledger, into the ledger; when
//! it cannot take a batch, into the store's buffer (Redis, shared by every replica), which
//! every replica drains into the ledger once it answers again. A batch that neither takes is
//! journaled by the writer. Each place counts an event once by its id, so a batch that
//! reaches two of them (or one twice) is still billed once.

use crate::ledger::Ledger;
use crate::store::Store;
use crate::usage::UsageEvent;
use std::sync::Arc;

/// Buffered events moved into the ledger per store call.
const DRAIN_PAGE: usize = 512;
/// Pages a replica drains per tick at most, so that draining never starves the writer.
const DRAIN_PAGES: usize = 20;

#[derive(Clone)]
pub struct UsageTarget {
    store: Arc<dyn Store>,
    ledger: Option<Arc<Ledger>>,
    feed: Option<Arc<super::Feed>>,
}

impl UsageTarget {
    pub fn new(store: Arc<dyn Store>, ledger: Option<Arc<Ledger>>) -> UsageTarget {
        UsageTarget {
            store,
            ledger,
            feed: None,
        }
    }

    /// Also hands every batch, once recorded, to the NATS feed's outbox.
    pub fn with_feed(mut self, feed: Option<Arc<super::Feed>>) -> UsageTarget {
        self.feed = feed;
        self
    }

    /// Puts a batch where it will be billed from (and, once there, in the feed's outbox);
    /// an error means it is nowhere yet (the writer journals it).
    pub async fn deliver(&self, events: &[UsageEvent]) -> Result<(), String> {
        self.record(events).await?;
        if let Some(feed) = &self.feed {
            feed.enqueue(events);
        }
        Ok(())
    }

    async fn record(&self, events: &[UsageEvent]) -> Result<(), String> {
        let Some(ledger) = &self.ledger else {
            return match self.store.append_usage(events).await {
                Ok(_) => Ok(()),
                Err(e) => Err(format!("store: {e}")),
            };
        };
        let refused = match ledger.insert(events).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        match self.store.buffer_usage(events).await {
            Ok(()) => {
                crate::metrics::get().record_usage_buffered(events.len());
                tracing::warn!(error = %refused, events = events.len(), "usage ledger unreachable; events buffered in the store");
                Ok(())
            }
            Err(e) => Err(format!("ledger: {refused}; store buffer: {e}")),
        }
    }

    /// Moves what the store buffers into the ledger, a page at a time, until the buffer is
    /// empty, the ledger fails, or this tick's share is done. Returns the events moved.
    pub async fn drain_buffer(&self) -> usize {
        let Some(ledger) = &self.ledger else {
            return 0;
        };
        let mut moved = 0;
        for _ in 0..DRAIN_PAGES {
            let taken = match self.store.buffered_usage(DRAIN_PAGE).await {
                Ok(taken) if taken.handles.is_empty() => break,
                Ok(taken) => taken,
                Err(e) => {
                    tracing::debug!(error = %e, "usage buffer unreadable; drained later");
                    break;
                }
            };
            if let Err(e) = ledger.insert(&taken.events).await {
                tracing::debug!(error = %e, "usage ledger still unreachable; buffer drained later");
                break;
            }
            // Only now: an event leaves the buffer once the ledger has it. Another replica
            // draining the same page meanwhile inserts nothing twice.
            if let Err(e) = self.store.unbuffer_usage(&taken).await {
                tracing::debug!(error = %e, "usage buffer not trimmed; retried next tick");
                break;
            }
            moved += taken.events.len();
            if taken.handles.len() < DRAIN_PAGE {
                break;
            }
        }
        if moved > 0 {
            tracing::info!(events = moved, "buffered usage moved into the ledger");
        }
        moved
    }
}
