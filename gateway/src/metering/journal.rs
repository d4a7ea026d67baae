//! How does a usage event reach the store? One per metered request, with a unique id.
//!
//! The proxy hands each event to a [`UsageSink`] (a bounded queue; never drops). One writer
//! drains it in small batches into the store (or, with a PostgreSQL ledger, into the ledger,
//! the store buffering what the ledger cannot take: `target`). When neither can be reached
//! the batch goes to an on-disk journal (fsynced), which the writer replays once the store answers again;
//! when the store is so slow that the queue fills (Redis black-holed: each batch waits out
//! its timeout), the sink writes events straight to the journal instead of queueing them in
//! memory, so a replica's memory stays bounded however long the outage. The store counts an
//! event once by its id, so a replayed event (or one written twice because an answer was
//! lost) is never counted twice. Each event is written (or journaled) within `BATCH_WINDOW`
//! (50 ms) of its request's end, in one store call per window.
//!
//! Replay resumes where it stopped: each tick sends at most one batch from the journal's
//! read position until the store takes it, so an outage costs a bounded amount of work per
//! tick, not a re-read of the whole journal. A line torn by a crash or a full disk is
//! skipped, and never swallows the event written after it.

use super::spool::Journal;
use super::target::UsageTarget;
use crate::usage::UsageEvent;
use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Events the queue holds before the sink spills to the journal.
pub const QUEUE_EVENTS: usize = 16_384;

/// Where the proxy puts events; cheap to clone, never blocks on the store.
#[derive(Clone)]
pub struct UsageSink {
    tx: mpsc::Sender<Message>,
    journal: Arc<Mutex<Journal>>,
}

impl UsageSink {
    pub fn record(&self, event: UsageEvent) {
        match self.tx.try_send(Message::Event(event)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(Message::Event(event))) => {
                crate::metrics::get().record_usage_spill();
                if let Err(e) = self.journal.lock().append(std::slice::from_ref(&event)) {
                    tracing::error!(error = %e, event = ?event, "cannot journal a usage event");
                }
            }
            Err(lost) => {
                // Only after the writer has shut down: keep the event in the log rather than
                // lose it.
                tracing::error!(event = ?lost, "usage event after shutdown");
            }
        }
    }

    /// Resolves once every event recorded before this call is in the store (or, with the
    /// store unreachable, in the journal): what a shutdown waits for.
    pub async fn flush(&self) {
        let (done, flushed) = tokio::sync::oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }

    /// How many bytes of events wait in the journal for the store to come back (0: none).
    pub fn journal_bytes(&self) -> u64 {
        self.journal.lock().pending_bytes()
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
    rx: mpsc::Receiver<Message>,
    target: UsageTarget,
    journal: Arc<Mutex<Journal>>,
}

pub fn usage_channel(target: UsageTarget, journal_path: PathBuf) -> (UsageSink, UsageWriter) {
    let (tx, rx) = mpsc::channel(QUEUE_EVENTS);
    let journal = Arc::new(Mutex::new(Journal::new(journal_path)));
    (
        UsageSink {
            tx,
            journal: journal.clone(),
        },
        UsageWriter {
            rx,
            target,
            journal,
        },
    )
}

impl UsageWriter {
    /// Writes events until every sink is dropped.
    pub async fn run(mut self) {
        let mut replay = tokio::time::interval(REPLAY_EVERY);
        replay.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Both buffers live as long as the writer: a batch is up to BATCH events (~150 KiB),
        // and allocating it afresh per batch made the allocator map (and the kernel zero)
        // new pages for every batch, a visible share of a busy replica's CPU.
        let mut received = Vec::with_capacity(BATCH);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                n = self.rx.recv_many(&mut received, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    self.gather(&mut received).await;
                    for message in received.drain(..) {
                        match message {
                            Message::Event(event) => batch.push(event),
                            Message::Flush(done) => {
                                // Everything sent before the flush is in `batch` or written.
                                if !batch.is_empty() {
                                    self.write(&batch).await;
                                    batch.clear();
                                }
                                let _ = done.send(());
                            }
                        }
                    }
                    if !batch.is_empty() {
                        self.write(&batch).await;
                        batch.clear();
                    }
                }
                _ = replay.tick() => {
                    self.replay_journal().await;
                    self.target.drain_buffer().await;
                }
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

    async fn write(&mut self, batch: &[UsageEvent]) {
        // While a journal is pending, new events queue behind it so the store sees them in order.
        if !self.journal.lock().is_empty() {
            self.replay_journal().await;
        }
        if self.journal.lock().is_empty() {
            match self.target.deliver(batch).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, events = batch.len(), "usage unwritable; journaling events")
                }
            }
        }
        if let Err(e) = self.journal.lock().append(batch) {
            // Nowhere left to put them: the log is the last record.
            tracing::error!(error = %e, events = ?batch, "cannot journal usage events");
        }
    }

    /// Sends the journal to the store from where the last replay stopped, a batch at a time,
    /// until it is all taken (then the journal is emptied) or the store fails (then the next
    /// tick goes on from there).
    async fn replay_journal(&mut self) {
        if self.journal.lock().is_empty() {
            return;
        }
        let mut replayed = 0;
        loop {
            let next = self.journal.lock().next_batch(BATCH);
            let (events, end) = match next {
                Ok(Some(batch)) => batch,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the usage journal");
                    return;
                }
            };
            if !events.is_empty() {
                if let Err(e) = self.target.deliver(&events).await {
                    tracing::debug!(error = %e, "usage journal replay deferred");
                    return;
                }
            }
            replayed += events.len();
            self.journal.lock().advance(end);
        }
        let mut journal = self.journal.lock();
        if journal.read_from() == 0 {
            return;
        }
        match journal.clear() {
            Ok(()) => tracing::info!(events = replayed, "usage journal replayed"),
            Err(e) => tracing::error!(error = %e, "cannot clear the replayed usage journal"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn event(i: u64) -> UsageEvent {
        UsageEvent::for_test("k", "m", i as i64, i, 1)
    }

    /// With the writer stalled (a store that does not answer), the queue fills and the sink
    /// spills to the journal instead of growing; once the writer runs, every event reaches
    /// the (real, embedded) store exactly once.
    #[tokio::test]
    async fn a_full_queue_spills_to_the_journal_and_nothing_is_lost_or_doubled() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::EmbeddedStore::open(&dir.path().join("store")).unwrap());
        let (sink, writer) = usage_channel(
            UsageTarget::new(store.clone(), None),
            dir.path().join("usage.journal"),
        );
        let total = QUEUE_EVENTS as u64 + 100;
        for i in 0..total {
            sink.record(event(i));
        }
        let queued_bytes = sink.journal_bytes();
        assert!(queued_bytes > 0, "the overflow went to the journal");
        let spilled = sink.journal.lock().next_batch(1_000).unwrap().unwrap().0;
        assert_eq!(
            spilled.len(),
            100,
            "exactly the events past the queue's bound"
        );
        let running = tokio::spawn(writer.run());
        sink.flush().await;
        // The journal is replayed on the writer's next tick.
        for _ in 0..50 {
            if sink.journal_bytes() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(sink.journal_bytes(), 0);
        let stored = store.usage_events(0, i64::MAX).await.unwrap();
        let mut ids: Vec<u64> = stored.iter().map(|e| e.prompt_tokens).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..total).collect::<Vec<_>>());
        drop(sink);
        running.await.unwrap();
    }
}
