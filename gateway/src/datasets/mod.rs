//! What did the models answer those who opted in? Capture for distillation: the chat
//! conversations of tenants and keys that opted in (`distillation` on a tenant or key,
//! `sluice_policies::distillation`), kept in the store as a dataset that exports as an
//! OpenAI fine-tuning file (`export`).
//!
//! Capture never slows the request it watches: the answer's chunks are kept as they pass
//! (shared buffers, not copies), and reading them into conversations and writing them to
//! the store happen on the support runtime after the answer ended. What cannot keep up is
//! dropped and counted (`sluice_dataset_captures_total{outcome="dropped_*"}`), never waited
//! for.

pub mod exchange;
pub mod export;

use crate::auth::Identity;
use crate::request::Route;
use crate::store::{Retention, Store};
use bytes::Bytes;
use exchange::Asker;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// `[datasets]`: how much the dataset keeps, and how much capture may hold on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetsConfig {
    /// Conversations older than this are forgotten.
    pub retention: Duration,
    /// At most about this many conversations are kept (the oldest go first).
    pub max_records: usize,
    /// An answer longer than this is not captured (its request still is answered).
    pub max_answer_bytes: usize,
    /// Request and answer bytes waiting to be written, across all requests; past it, new
    /// captures are dropped rather than held.
    pub queue_bytes: usize,
}

impl Default for DatasetsConfig {
    fn default() -> Self {
        DatasetsConfig {
            retention: Duration::from_secs(30 * 86_400),
            max_records: 100_000,
            max_answer_bytes: 1 << 20,
            queue_bytes: 64 << 20,
        }
    }
}

/// An answer's chunks as they pass, while it is worth keeping.
#[derive(Debug, Default)]
pub struct Capture {
    chunks: Vec<Bytes>,
    bytes: usize,
    /// The answer's last byte passed.
    ended: bool,
}

impl Capture {
    /// Keeps a chunk (a shared buffer, not a copy); false once the answer grew past
    /// `max_bytes` (then drop the capture).
    pub fn add(&mut self, chunk: Option<&Bytes>, end_of_stream: bool, max_bytes: usize) -> bool {
        if let Some(chunk) = chunk.filter(|c| !c.is_empty()) {
            self.bytes += chunk.len();
            if self.bytes > max_bytes {
                crate::metrics::get().record_dataset_captures("too_large", 1);
                return false;
            }
            self.chunks.push(chunk.clone());
        }
        self.ended |= end_of_stream;
        true
    }
}

/// A finished exchange on its way to the store.
struct Exchange {
    asker: Asker,
    request: Bytes,
    answer: Vec<Bytes>,
    bytes: usize,
}

/// Conversations written to the store per call, at most.
const BATCH: usize = 64;

pub struct Datasets {
    pub config: DatasetsConfig,
    store: Arc<dyn Store>,
    tx: mpsc::Sender<Exchange>,
    rx: Mutex<Option<mpsc::Receiver<Exchange>>>,
    queued_bytes: Arc<AtomicUsize>,
}

impl Datasets {
    pub fn new(config: DatasetsConfig, store: Arc<dyn Store>) -> Datasets {
        // The byte bound is what limits memory; the count only keeps the channel finite.
        let (tx, rx) = mpsc::channel(4096);
        Datasets {
            config,
            store,
            tx,
            rx: Mutex::new(Some(rx)),
            queued_bytes: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Whether this answer is to be captured: a chat completion, of a model its caller
    /// opted in for.
    pub fn wants(identity: &Identity, route: Option<Route>, model: Option<&str>) -> bool {
        route == Some(Route::ChatCompletions)
            && identity
                .distillation
                .as_ref()
                .zip(model)
                .is_some_and(|(opt_in, model)| opt_in.captures(model))
    }

    /// Hands a finished exchange to the writer; drops it (counted) when the writer is that
    /// far behind. Never waits.
    pub fn offer(
        &self,
        identity: &Identity,
        request_id: &str,
        model: &str,
        request: Bytes,
        answer: Capture,
    ) {
        // An answer cut off on the way is not a training example.
        if !answer.ended {
            return;
        }
        let bytes = request.len() + answer.bytes;
        if self.queued_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes > self.config.queue_bytes {
            self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            crate::metrics::get().record_dataset_captures("dropped_queue", 1);
            return;
        }
        let exchange = Exchange {
            asker: Asker {
                time_ms: crate::clock::now_ms(),
                request_id: request_id.to_owned(),
                tenant: identity.tenant.clone(),
                key_id: identity.key_id.clone(),
                model: model.to_owned(),
            },
            request,
            answer: answer.chunks,
            bytes,
        };
        if self.tx.try_send(exchange).is_err() {
            self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            crate::metrics::get().record_dataset_captures("dropped_queue", 1);
        }
    }

    /// Reads exchanges into conversations and writes them to the store, a batch at a time,
    /// until the gateway stops.
    pub async fn run(self: Arc<Self>) {
        let Some(mut rx) = self.rx.lock().expect("datasets receiver").take() else {
            return;
        };
        let mut exchanges = Vec::with_capacity(BATCH);
        while rx.recv_many(&mut exchanges, BATCH).await > 0 {
            let mut entries = Vec::with_capacity(exchanges.len());
            for e in exchanges.drain(..) {
                self.queued_bytes.fetch_sub(e.bytes, Ordering::Relaxed);
                let conversations = exchange::conversations(&e.asker, &e.request, &e.answer);
                if conversations.is_empty() {
                    crate::metrics::get().record_dataset_captures("unreadable", 1);
                }
                for c in conversations {
                    entries.push(serde_json::to_vec(&c).expect("a conversation serialises"));
                }
            }
            if entries.is_empty() {
                continue;
            }
            let keep = Retention {
                oldest_ms: crate::clock::now_ms() - self.config.retention.as_millis() as i64,
                max_records: self.config.max_records,
            };
            let outcome = match self.store.append_captures(&entries, &keep).await {
                Ok(()) => "kept",
                Err(e) => {
                    tracing::warn!(error = %e, conversations = entries.len(), "captured conversations not kept: the store failed");
                    "dropped_store"
                }
            };
            crate::metrics::get().record_dataset_captures(outcome, entries.len() as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EmbeddedStore;

    fn opted_in() -> Identity {
        Identity {
            key_id: "key_1".into(),
            tenant: "acme".into(),
            tier: "free".into(),
            limits: Default::default(),
            cache: true,
            models: Default::default(),
            tenant_limits: Default::default(),
            ledgers: crate::auth::quota_ledgers("key_1", "acme"),
            model_limits: Default::default(),
            tenant_model_limits: Default::default(),
            distillation: Some(Arc::new(sluice_policies::Distillation {
                models: vec!["big-*".into()],
            })),
        }
    }

    fn answer(ended: bool) -> Capture {
        let mut capture = Capture::default();
        let body = Bytes::from_static(
            br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}]}"#,
        );
        assert!(capture.add(Some(&body), ended, 1 << 20));
        capture
    }

    #[test]
    fn only_chat_answers_of_opted_in_models_are_wanted() {
        let identity = opted_in();
        assert!(Datasets::wants(
            &identity,
            Some(Route::ChatCompletions),
            Some("big-70b")
        ));
        assert!(!Datasets::wants(
            &identity,
            Some(Route::ChatCompletions),
            Some("small")
        ));
        assert!(!Datasets::wants(
            &identity,
            Some(Route::Completions),
            Some("big-70b")
        ));
        let mut not_opted = opted_in();
        not_opted.distillation = None;
        assert!(!Datasets::wants(
            &not_opted,
            Some(Route::ChatCompletions),
            Some("big-70b")
        ));
    }

    #[test]
    fn an_answer_past_its_bound_stops_being_kept() {
        let mut capture = Capture::default();
        let chunk = Bytes::from(vec![b'x'; 600]);
        assert!(capture.add(Some(&chunk), false, 1000));
        assert!(!capture.add(Some(&chunk), true, 1000));
    }

    #[tokio::test]
    async fn the_queue_is_bounded_by_bytes_and_unfinished_answers_are_not_queued() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let request = Bytes::from_static(br#"{"messages":[{"role":"user","content":"Hello"}]}"#);
        let one = request.len() + answer(true).bytes;
        let config = DatasetsConfig {
            queue_bytes: one * 2,
            ..DatasetsConfig::default()
        };
        let datasets = Arc::new(Datasets::new(config, store.clone()));
        let identity = opted_in();
        datasets.offer(&identity, "r0", "big-70b", request.clone(), answer(false));
        assert_eq!(
            datasets.queued_bytes.load(Ordering::Relaxed),
            0,
            "cut off: not queued"
        );
        for i in 0..3 {
            let id = format!("r{}", i + 1);
            datasets.offer(&identity, &id, "big-70b", request.clone(), answer(true));
        }
        assert_eq!(
            datasets.queued_bytes.load(Ordering::Relaxed),
            one * 2,
            "the third is dropped, not held"
        );

        // The writer keeps the two that were queued, and gives their bytes back.
        tokio::spawn(datasets.clone().run());
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let kept = store.captures_page(None, 10).await.unwrap();
            if kept.len() == 2 {
                let first: exchange::Conversation = serde_json::from_slice(&kept[0].1).unwrap();
                assert_eq!(
                    (first.request_id.as_str(), first.tenant.as_str()),
                    ("r1", "acme")
                );
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{kept:?}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(datasets.queued_bytes.load(Ordering::Relaxed), 0);
    }
}
