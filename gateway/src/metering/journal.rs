//! How does a usage event reach the store? One per metered request, with a unique id.
//!
//! The proxy hands each event to a [`UsageSink`] (a channel; never blocks, never drops). One
//! writer drains it in small batches into the store. When the store cannot be reached the
//! batch goes to an on-disk journal (fsynced), which the writer replays once the store
//! answers again. The store counts an event once by its id, so a replayed event (or one
//! written twice because an answer was lost) is never counted twice. Each event is written
//! (or journaled) within `BATCH_WINDOW` (50 ms) of its request's end, in one store call per
//! window.

use crate::store::Store;
use crate::usage::UsageEvent;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Where the proxy puts events; cheap to clone, never blocks.
#[derive(Clone)]
pub struct UsageSink {
    tx: mpsc::UnboundedSender<Message>,
    journal_path: Arc<PathBuf>,
}

impl UsageSink {
    pub fn record(&self, event: UsageEvent) {
        if let Err(lost) = self.tx.send(Message::Event(event)) {
            // Only after the writer has shut down: keep the event in the log rather than lose it.
            tracing::error!(event = ?lost.0, "usage event after shutdown");
        }
    }

    /// Resolves once every event recorded before this call is in the store (or, with the
    /// store unreachable, in the journal): what a shutdown waits for.
    pub async fn flush(&self) {
        let (done, flushed) = tokio::sync::oneshot::channel();
        if self.tx.send(Message::Flush(done)).is_ok() {
            let _ = flushed.await;
        }
    }

    /// How many bytes of events wait in the journal for the store to come back (0: none).
    pub fn journal_bytes(&self) -> u64 {
        std::fs::metadata(self.journal_path.as_path()).map_or(0, |m| m.len())
    }
}

/// What the writer is sent: events, in order, and requests to confirm that those before have
/// been written.
#[derive(Debug)]
// Events are nearly every message; boxing them would allocate once per request.
#[allow(clippy::large_enum_variant)]
enum Message {
    Event(UsageEvent),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Events written per store call at most.
const BATCH: usize = 512;
/// How long the writer gathers events after the first of a batch arrives: a busy replica
/// writes one batch per window instead of waking (and calling the store) per request. It is
/// also the most an event waits in memory before it is written or journaled.
const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// How often the journal is retried while the store is unreachable.
const REPLAY_EVERY: Duration = Duration::from_secs(1);

pub struct UsageWriter {
    rx: mpsc::UnboundedReceiver<Message>,
    store: Arc<dyn Store>,
    journal: Journal,
}

pub fn usage_channel(store: Arc<dyn Store>, journal_path: PathBuf) -> (UsageSink, UsageWriter) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        UsageSink {
            tx,
            journal_path: Arc::new(journal_path.clone()),
        },
        UsageWriter {
            rx,
            store,
            journal: Journal { path: journal_path },
        },
    )
}

impl UsageWriter {
    /// Writes events until every sink is dropped.
    pub async fn run(mut self) {
        let mut replay = tokio::time::interval(REPLAY_EVERY);
        replay.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut received = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                n = self.rx.recv_many(&mut received, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    self.gather(&mut received).await;
                    let mut batch = Vec::with_capacity(n);
                    for message in received.drain(..) {
                        match message {
                            Message::Event(event) => batch.push(event),
                            Message::Flush(done) => {
                                // Everything sent before the flush is in `batch` or written.
                                if !batch.is_empty() {
                                    self.write(std::mem::take(&mut batch)).await;
                                }
                                let _ = done.send(());
                            }
                        }
                    }
                    if !batch.is_empty() {
                        self.write(batch).await;
                    }
                }
                _ = replay.tick() => self.replay_journal().await,
            }
        }
        self.replay_journal().await;
    }

    /// Waits out the batch window (unless a flush is asked for or the batch is full), then
    /// takes what arrived meanwhile. Sleeping rather than waiting on the channel means the
    /// requests that send meanwhile wake nothing.
    async fn gather(&mut self, received: &mut Vec<Message>) {
        let flush_asked = |m: &Message| matches!(m, Message::Flush(_));
        if received.len() >= BATCH || received.iter().any(flush_asked) {
            return;
        }
        tokio::time::sleep(BATCH_WINDOW).await;
        while received.len() < BATCH {
            match self.rx.try_recv() {
                Ok(message) => received.push(message),
                Err(_) => break,
            }
        }
    }

    async fn write(&mut self, batch: Vec<UsageEvent>) {
        // While a journal is pending, new events queue behind it so the store sees them in order.
        if !self.journal.is_empty() {
            self.replay_journal().await;
        }
        if self.journal.is_empty() {
            match self.store.append_usage(&batch).await {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, events = batch.len(), "store unreachable; journaling usage events")
                }
            }
        }
        if let Err(e) = self.journal.append(&batch) {
            // Nowhere left to put them: the log is the last record.
            tracing::error!(error = %e, events = ?batch, "cannot journal usage events");
        }
    }

    async fn replay_journal(&mut self) {
        if self.journal.is_empty() {
            return;
        }
        let events = match self.journal.read() {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the usage journal");
                return;
            }
        };
        for chunk in events.chunks(BATCH) {
            if let Err(e) = self.store.append_usage(chunk).await {
                tracing::debug!(error = %e, "usage journal replay deferred");
                return;
            }
        }
        match self.journal.clear() {
            Ok(()) => tracing::info!(events = events.len(), "usage journal replayed"),
            Err(e) => tracing::error!(error = %e, "cannot clear the replayed usage journal"),
        }
    }
}

/// Events the store has not taken yet, one JSON object per line.
struct Journal {
    path: PathBuf,
}

impl Journal {
    fn is_empty(&self) -> bool {
        std::fs::metadata(&self.path).map_or(true, |m| m.len() == 0)
    }

    fn append(&self, events: &[UsageEvent]) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let mut text = Vec::new();
        for event in events {
            serde_json::to_writer(&mut text, event)?;
            text.push(b'\n');
        }
        file.write_all(&text)?;
        file.sync_data()
    }

    /// Every complete line; a torn last line (a crash mid-write) is skipped.
    fn read(&self) -> std::io::Result<Vec<UsageEvent>> {
        let file = std::fs::File::open(&self.path)?;
        let mut events = Vec::new();
        for line in std::io::BufReader::new(file).lines() {
            match serde_json::from_str(&line?) {
                Ok(event) => events.push(event),
                Err(e) => tracing::warn!(error = %e, "skipping a torn usage journal line"),
            }
        }
        Ok(events)
    }

    fn clear(&self) -> std::io::Result<()> {
        std::fs::File::create(&self.path)?.sync_all()
    }
}
