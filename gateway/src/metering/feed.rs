//! Who else hears of usage? A billing system listening on NATS JetStream (`[billing]
//! nats_url`): each recorded usage event is published as a CloudEvent in OpenMeter's ingest
//! shape (`billing::cloud_event`), with its id as `Nats-Msg-Id`, so that JetStream drops a
//! copy published again within the stream's duplicate window and a consumer can drop any
//! other copy by the CloudEvent id.
//!
//! At least once: an event enters the feed's outbox (an fsynced journal of its own in the
//! data dir) once the ledger or the store has it, and leaves it only when JetStream has
//! acknowledged it. Publishing runs on its own task, so a NATS outage never slows metering:
//! the outbox grows on disk (`sluice_usage_feed_pending_bytes`) and is published from where
//! it stopped when NATS is back.

use super::spool::Journal;
use crate::usage::UsageEvent;
use async_nats::jetstream;
use parking_lot::Mutex;
use std::path::PathBuf;
use std::time::Duration;

/// Events published per round at most (what one acknowledgement wait covers).
const BATCH: usize = 512;
/// How often the outbox is looked at when it was empty, and retried after a failure.
const IDLE: Duration = Duration::from_millis(200);
const RETRY: Duration = Duration::from_secs(1);

/// `[billing] nats_*`: where the feed goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedConfig {
    /// `nats://host:4222`.
    pub url: String,
    /// The subject events are published on.
    pub subject: String,
    /// The JetStream stream that keeps them (created on first use if missing).
    pub stream: String,
    /// How long JetStream remembers a message id to drop a copy.
    pub duplicate_window: Duration,
}

pub struct Feed {
    config: FeedConfig,
    outbox: Mutex<Journal>,
    context: tokio::sync::Mutex<Option<jetstream::Context>>,
}

impl Feed {
    /// A feed whose outbox is `outbox` (kept across restarts: what was not acknowledged is
    /// published again).
    pub fn new(config: FeedConfig, outbox: PathBuf) -> Feed {
        Feed {
            config,
            outbox: Mutex::new(Journal::new(outbox)),
            context: tokio::sync::Mutex::new(None),
        }
    }

    /// Puts recorded events in the outbox, to be published.
    pub fn enqueue(&self, events: &[UsageEvent]) {
        if let Err(e) = self.outbox.lock().append(events) {
            // Billing has them (the ledger or the store); only the feed misses them.
            tracing::error!(error = %e, events = ?events, "cannot write the usage feed's outbox; these events are not published");
        }
    }

    /// Bytes of events waiting in the outbox (0: the feed is caught up).
    pub fn pending_bytes(&self) -> u64 {
        self.outbox.lock().pending_bytes()
    }

    /// Publishes the outbox as it fills, until the process ends.
    pub async fn run(self: std::sync::Arc<Self>) {
        loop {
            match self.publish_outbox().await {
                Ok(()) => tokio::time::sleep(IDLE).await,
                Err(e) => {
                    tracing::warn!(error = %e, pending_bytes = self.pending_bytes(), "usage feed: NATS unreachable; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// Publishes what the outbox holds, a batch at a time, each once JetStream acknowledged
    /// the one before.
    async fn publish_outbox(&self) -> Result<(), String> {
        loop {
            let next = self.outbox.lock().next_batch(BATCH);
            let (events, end) = match next {
                Ok(Some(batch)) => batch,
                Ok(None) => break,
                Err(e) => return Err(format!("cannot read the outbox: {e}")),
            };
            if !events.is_empty() {
                self.publish(&events).await?;
            }
            self.outbox.lock().advance(end);
        }
        let mut outbox = self.outbox.lock();
        if !outbox.is_empty() {
            return Ok(());
        }
        outbox
            .clear()
            .map_err(|e| format!("cannot clear the outbox: {e}"))
    }

    async fn publish(&self, events: &[UsageEvent]) -> Result<(), String> {
        let js = self.context().await?;
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let body = serde_json::to_vec(&crate::billing::cloud_event(event, None))
                .map_err(|e| e.to_string())?;
            let message = jetstream::message::PublishMessage::build()
                .message_id(&event.id)
                .payload(body.into());
            match js.send_publish(self.config.subject.clone(), message).await {
                Ok(ack) => acks.push(ack),
                Err(e) => return Err(format!("publish: {e}")),
            }
        }
        for ack in acks {
            ack.await.map_err(|e| format!("acknowledgement: {e}"))?;
        }
        Ok(())
    }

    /// The JetStream context, connecting (and making sure the stream exists) on first use.
    async fn context(&self) -> Result<jetstream::Context, String> {
        let mut context = self.context.lock().await;
        if let Some(js) = context.as_ref() {
            return Ok(js.clone());
        }
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(self.config.url.as_str())
            .await
            .map_err(|e| format!("connect to {}: {e}", self.config.url))?;
        let js = jetstream::new(client);
        js.get_or_create_stream(jetstream::stream::Config {
            name: self.config.stream.clone(),
            subjects: vec![self.config.subject.clone()],
            duplicate_window: self.config.duplicate_window,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("stream {}: {e}", self.config.stream))?;
        tracing::info!(url = %self.config.url, stream = %self.config.stream, subject = %self.config.subject, "usage feed connected");
        *context = Some(js.clone());
        Ok(js)
    }
}
