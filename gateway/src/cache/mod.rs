//! Do we already know the answer? The response cache: exact hits by a key of everything that
//! changes the output, semantic hits by the nearest stored question in the same namespace.
//!
//! Entries (the answer and the question it answered) live in the store with a TTL. Each
//! replica keeps an index of them in memory ([`index`]), filled from the store's cache log
//! at start-up and kept in step by following that log, so a miss costs no store round trip
//! and an entry written through one replica is found through every other within a poll.
//!
//! It must never serve one tenant's answer to another: the tenant is the first thing hashed
//! into both keys, and is checked again against the stored entry before anything is served.

pub mod answer;
mod hot;
mod stats;

use stats::{rate, LookupCounts, Lookups};
pub use stats::{CacheStats, TenantCacheStats};
pub mod embed;
mod endpoint;
pub mod index;
pub mod key;
pub mod verify;

use crate::config::CacheConfig;
use crate::request::Route;
use crate::store::Store;
use answer::{CachedAnswer, Shape};
use base64::Engine as _;
use embed::Embedder;
use index::{CacheIndex, IndexEntry};
use key::{CacheKeys, CacheRequest, Digest};
use serde::{Deserialize, Serialize};
use sluice_policies::cache::{eligible, CacheControl, CacheRules};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often each replica reads the cache log: an entry written anywhere is found everywhere
/// within about this long.
const LOG_POLL: Duration = Duration::from_millis(100);
/// Events read per store call.
const LOG_BATCH: usize = 1000;
/// How often expired entries leave the index, and shrunken namespaces are regrouped.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// How a request was answered, as `x-sluice-cache` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Semantic,
    Miss,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Semantic => "semantic",
            CacheStatus::Miss => "miss",
        }
    }
}

/// One request's business with the cache, from lookup to storing its answer.
pub struct Plan {
    pub route: Route,
    pub tenant: String,
    pub model: String,
    pub keys: CacheKeys,
    pub rules: CacheRules,
    pub control: CacheControl,
    pub shape: Shape,
    /// The question's embedding, once computed (lookup computes it; storing reuses it).
    pub embedding: Option<Vec<f32>>,
}

/// An answer found in the cache.
pub struct Hit {
    pub status: CacheStatus,
    /// The shape the client asked for.
    pub shape: Shape,
    pub similarity: Option<f32>,
    pub answer: CachedAnswer,
}

/// What the store keeps per entry.
#[derive(Clone, Serialize, Deserialize)]
struct StoredEntry {
    tenant: String,
    question: Option<String>,
    answer: CachedAnswer,
}

/// One event of the cache log.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LogEvent {
    Put {
        id: String,
        tenant: String,
        model: String,
        namespace: String,
        exact: String,
        expires_ms: i64,
        /// Little-endian f32s, base64.
        embedding: String,
        /// The stored answer's size (0 from replicas that did not say).
        #[serde(default)]
        bytes: u64,
    },
    Purge {
        tenant: Option<String>,
        model: Option<String>,
    },
}

#[derive(Default)]
struct Stats {
    lookups: Lookups,
    stored: AtomicU64,
    embedding_failures: AtomicU64,
    store_failures: AtomicU64,
}

pub struct ResponseCache {
    config: CacheConfig,
    store: Arc<dyn Store>,
    /// Shared with blocking tasks: an insert may regroup a large namespace.
    index: Arc<CacheIndex>,
    embedder: Option<Embedder>,
    verifier: verify::Verifier,
    stats: Stats,
    /// Bodies of recently served entries.
    hot: hot::HotEntries<StoredEntry>,
}

/// How many bytes of entry bodies a replica keeps at hand (see [`hot`]).
const HOT_BYTES: usize = 32 << 20;

impl ResponseCache {
    pub fn new(config: CacheConfig, store: Arc<dyn Store>) -> ResponseCache {
        let embedder = config.embedding_url.clone().map(|url| {
            Embedder::new(
                url,
                config.embedding_model.clone(),
                config.embedding_api_key.clone(),
                config.embedding_timeout,
            )
        });
        let budget = index::Budget {
            max_bytes: config.max_bytes,
            tenant_max_bytes: (u128::from(config.max_bytes) * u128::from(config.tenant_max_percent)
                / 100) as u64,
        };
        ResponseCache {
            verifier: verify::Verifier::new(config.verification.clone()),
            config,
            store,
            index: Arc::new(CacheIndex::new(budget)),
            embedder,
            stats: Stats::default(),
            hot: hot::HotEntries::new(HOT_BYTES),
        }
    }

    /// The cache's plan for a request, or `None` when the cache stays out of it (another
    /// route, the policy says no, the body is not one it understands).
    pub fn plan(
        &self,
        route: Route,
        identity: &crate::auth::Identity,
        view: &crate::request::RequestView,
        body: &[u8],
        cache_control: Option<&str>,
        include_usage: bool,
    ) -> Option<Plan> {
        if !matches!(route, Route::ChatCompletions | Route::Completions) || !identity.cache {
            return None;
        }
        let (tenant, tier) = (identity.tenant.as_str(), identity.tier.as_str());
        let rules = self.config.policy.rules(tier, view.model());
        // What the view already read decides most requests (sampled ones, several choices)
        // before the body is parsed again for the keys.
        let seen = sluice_policies::cache::RequestFacts {
            temperature: view.temperature,
            n: view.n,
            uses_tools: false,
            wants_logprobs: false,
        };
        eligible(&rules, &seen).ok()?;
        let request = CacheRequest::parse(body)?;
        let model = request.model().to_owned();
        eligible(&rules, &request.facts()).ok()?;
        let control = CacheControl::parse(cache_control);
        if control.skip_lookup && control.skip_store {
            return None;
        }
        let shape = if request.is_stream() {
            Shape::Stream { include_usage }
        } else {
            Shape::Json
        };
        Some(Plan {
            route,
            tenant: tenant.to_owned(),
            keys: request.keys(tenant, route),
            model,
            rules,
            control,
            shape,
            embedding: None,
        })
    }

    /// Looks the plan's request up: exactly, then by meaning. Never fails: anything that
    /// goes wrong is a miss.
    pub async fn lookup(&self, plan: &mut Plan) -> Option<Hit> {
        if plan.control.skip_lookup {
            return None;
        }
        let now = crate::clock::now_ms();
        if let Some((id, tenant)) = self.index.exact(&plan.keys.exact, now) {
            if tenant == plan.tenant {
                if let Some(entry) = self.fetch(&id, &plan.tenant).await {
                    self.index.touch(&id);
                    self.count(&plan.tenant, CacheStatus::Hit);
                    return Some(Hit {
                        status: CacheStatus::Hit,
                        shape: plan.shape,
                        similarity: None,
                        answer: entry.answer,
                    });
                }
            }
        }
        if let Some(hit) = self.semantic(plan, now).await {
            self.count(&plan.tenant, CacheStatus::Semantic);
            return Some(hit);
        }
        self.count(&plan.tenant, CacheStatus::Miss);
        None
    }

    /// Stage one finds up to `top_k` stored questions at or above the retrieval threshold;
    /// stage two serves the nearest that the verifier judges to ask the same thing.
    async fn semantic(&self, plan: &mut Plan, now: i64) -> Option<Hit> {
        let question = plan.keys.question.as_deref()?;
        let embedding = self.embed(question).await?;
        let strict = plan.rules.similarity_threshold;
        let nearest = self.index.nearest(
            &plan.keys.namespace,
            &embedding,
            self.verifier.floor(strict),
            self.verifier.top_k(),
            now,
        );
        plan.embedding = Some(embedding);
        for candidate in nearest {
            if candidate.tenant != plan.tenant {
                continue;
            }
            let Some(entry) = self.fetch(&candidate.id, &plan.tenant).await else {
                continue;
            };
            let stored_question = entry.question.as_deref().unwrap_or_default();
            let verdict = self
                .verifier
                .judge(stored_question, question, candidate.similarity, strict)
                .await;
            if verdict.is_err() {
                continue;
            }
            self.index.touch(&candidate.id);
            return Some(Hit {
                status: CacheStatus::Semantic,
                shape: plan.shape,
                similarity: Some(candidate.similarity),
                answer: entry.answer,
            });
        }
        None
    }

    async fn embed(&self, text: &str) -> Option<Vec<f32>> {
        let embedder = self.embedder.as_ref()?;
        match embedder.embed(text).await {
            Ok(v) => Some(v),
            Err(e) => {
                self.stats
                    .embedding_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot embed a question; semantic cache skipped");
                None
            }
        }
    }

    /// An entry's body, checked to belong to `tenant`; a body that is gone leaves the index.
    /// The entry the index found, from this replica's recent ones or the store.
    async fn fetch(&self, id: &str, tenant: &str) -> Option<StoredEntry> {
        if let Some(entry) = self.hot.get(id) {
            return (entry.tenant == tenant).then_some(entry);
        }
        match self.store.cache_get(id).await {
            Ok(Some(bytes)) => {
                let entry: StoredEntry = serde_json::from_slice(&bytes).ok()?;
                self.hot.insert(id, entry.clone(), bytes.len());
                (entry.tenant == tenant).then_some(entry)
            }
            Ok(None) => {
                self.index.remove(id);
                self.hot.remove(id);
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a cache entry");
                None
            }
        }
    }

    /// Whether an answer to this plan should be read for storing.
    pub fn wants(&self, plan: &Plan) -> bool {
        !plan.control.skip_store && self.index.len() < self.config.max_entries
    }

    pub fn max_entry_bytes(&self) -> usize {
        self.config.max_entry_bytes
    }

    /// Keeps an answer: its body in the store, its place in this replica's index at once,
    /// and in every other replica's once they read the log. Runs on its own task.
    pub fn keep(self: &Arc<Self>, plan: Plan, answer: CachedAnswer) {
        let cache = self.clone();
        tokio::spawn(async move {
            if let Err(e) = cache.put(plan, answer).await {
                cache.stats.store_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot store a cache entry");
            }
        });
    }

    /// Keeps an answer and waits until it is kept ([`ResponseCache::keep`] without the task).
    pub async fn put(
        &self,
        mut plan: Plan,
        answer: CachedAnswer,
    ) -> Result<(), crate::store::StoreError> {
        if plan.embedding.is_none() {
            if let Some(question) = plan.keys.question.as_deref() {
                plan.embedding = self.embed(question).await;
            }
        }
        let id = crate::request::time_ordered_id();
        let ttl_ms = plan.rules.ttl_secs.saturating_mul(1000);
        let expires_ms = crate::clock::now_ms().saturating_add(ttl_ms as i64);
        let embedding = plan.embedding.unwrap_or_default();
        let body = serde_json::to_vec(&StoredEntry {
            tenant: plan.tenant.clone(),
            question: plan.keys.question.clone(),
            answer,
        })?;
        let event = LogEvent::Put {
            id: id.clone(),
            tenant: plan.tenant.clone(),
            model: plan.model.clone(),
            namespace: hex::encode(plan.keys.namespace),
            exact: hex::encode(plan.keys.exact),
            expires_ms,
            embedding: encode_vector(&embedding),
            bytes: body.len() as u64,
        };
        let horizon_ms = self.config.policy.max_ttl_secs().saturating_mul(1000);
        self.store
            .cache_put(&id, &body, ttl_ms, &serde_json::to_vec(&event)?, horizon_ms)
            .await?;
        let entry = IndexEntry {
            id,
            tenant: plan.tenant,
            model: plan.model,
            namespace: plan.keys.namespace,
            exact: plan.keys.exact,
            expires_ms,
            embedding,
            body_bytes: body.len() as u64,
        };
        let index = self.index.clone();
        // Found by this replica at once, not only after its next read of the log.
        let evicted = tokio::task::spawn_blocking(move || index.insert(entry))
            .await
            .unwrap_or_default();
        // Counted once it can be found: a client that waits for the count finds the entry.
        self.stats.stored.fetch_add(1, Ordering::Relaxed);
        self.store.cache_evict(&evicted).await?;
        Ok(())
    }

    /// Deletes the entries of `tenant` and/or `model` (neither: all), on every replica.
    pub async fn purge(
        &self,
        tenant: Option<&str>,
        model: Option<&str>,
    ) -> Result<usize, crate::store::StoreError> {
        let ids = self.index.purge(tenant, model);
        let event = LogEvent::Purge {
            tenant: tenant.map(str::to_owned),
            model: model.map(str::to_owned),
        };
        self.store
            .cache_purge(&ids, &serde_json::to_vec(&event)?)
            .await?;
        Ok(ids.len())
    }

    /// Follows the store's cache log into this replica's index, until the process ends.
    pub async fn follow(self: Arc<Self>) {
        let mut cursor = "0".to_owned();
        let mut tick = tokio::time::interval(LOG_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sweep = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            loop {
                match self.store.cache_log(&cursor, LOG_BATCH).await {
                    Ok(events) => {
                        let full = events.len() == LOG_BATCH;
                        if let Some((at, _)) = events.last() {
                            cursor = at.clone();
                        }
                        let cache = self.clone();
                        let evicted = tokio::task::spawn_blocking(move || {
                            let mut evicted = Vec::new();
                            for (_, event) in events {
                                evicted.extend(cache.apply(&event));
                            }
                            evicted
                        })
                        .await
                        .unwrap_or_default();
                        if let Err(e) = self.store.cache_evict(&evicted).await {
                            tracing::warn!(error = %e, "cannot drop evicted cache entries");
                        }
                        if !full {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the cache log");
                        break;
                    }
                }
            }
            if last_sweep.elapsed() >= SWEEP_EVERY {
                last_sweep = tokio::time::Instant::now();
                let cache = self.clone();
                // Regrouping a large namespace takes a while: off the async workers.
                let _ = tokio::task::spawn_blocking(move || {
                    cache.index.sweep(crate::clock::now_ms());
                    cache.index.compact();
                })
                .await;
            }
        }
    }

    /// Applies one cache log event to the index; returns the ids it evicted.
    fn apply(&self, event: &[u8]) -> Vec<String> {
        match serde_json::from_slice::<LogEvent>(event) {
            Ok(LogEvent::Put {
                id,
                tenant,
                model,
                namespace,
                exact,
                expires_ms,
                embedding,
                bytes,
            }) => {
                let (Some(namespace), Some(exact)) = (digest(&namespace), digest(&exact)) else {
                    return Vec::new();
                };
                if expires_ms <= crate::clock::now_ms()
                    || self.index.len() >= self.config.max_entries
                {
                    return Vec::new();
                }
                self.index.insert(IndexEntry {
                    id,
                    tenant,
                    model,
                    namespace,
                    exact,
                    expires_ms,
                    embedding: decode_vector(&embedding),
                    body_bytes: bytes,
                })
            }
            Ok(LogEvent::Purge { tenant, model }) => {
                self.index.purge(tenant.as_deref(), model.as_deref());
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(error = %e, "unreadable cache log event");
                Vec::new()
            }
        }
    }

    fn count(&self, tenant: &str, status: CacheStatus) {
        self.stats.lookups.count(tenant, status);
    }

    /// `GET /admin/v1/cache/stats`: entries (shared by every replica) and this replica's
    /// lookups since it started.
    /// Copies a cacheable answer aside as it passes (`copy`, set when the answer may be kept)
    /// and keeps it once it is complete; drops the copy when it grows past the entry bound.
    pub fn capture(
        self: &Arc<Self>,
        copy: &mut Option<bytes::BytesMut>,
        plan: &mut Option<Plan>,
        stream: bool,
        chunk: Option<&bytes::Bytes>,
        end_of_stream: bool,
    ) {
        let Some(bytes) = copy.as_mut() else {
            return;
        };
        if let Some(chunk) = chunk {
            if bytes.len() + chunk.len() > self.max_entry_bytes() {
                *copy = None;
                return;
            }
            bytes.extend_from_slice(chunk);
        }
        if !end_of_stream {
            return;
        }
        let (Some(bytes), Some(plan)) = (copy.take(), plan.take()) else {
            return;
        };
        let answer = if stream {
            CachedAnswer::from_stream(plan.route, &bytes)
        } else {
            CachedAnswer::from_json(plan.route, &bytes)
        };
        if let Some(answer) = answer {
            self.keep(plan, answer);
        }
    }

    pub fn stats(&self) -> CacheStats {
        let LookupCounts {
            hits,
            semantic_hits,
            misses,
        } = self.stats.lookups.total();
        let lookups = hits + semantic_hits + misses;
        let entries = self.index.entries_by_tenant();
        let by_tenant = self.stats.lookups.by_tenant();
        let mut tenants: Vec<&String> = entries.keys().chain(by_tenant.keys()).collect();
        tenants.sort();
        tenants.dedup();
        let by_tenant = tenants
            .into_iter()
            .map(|tenant| {
                let counts = by_tenant.get(tenant).copied().unwrap_or_default();
                let stats = TenantCacheStats {
                    entries: entries.get(tenant).copied().unwrap_or(0),
                    hits: counts.hits,
                    semantic_hits: counts.semantic_hits,
                    misses: counts.misses,
                    hit_rate: counts.hit_rate(),
                };
                (tenant.clone(), stats)
            })
            .collect();
        CacheStats {
            entries: self.index.len(),
            bytes: self.index.bytes(),
            max_bytes: self.config.max_bytes,
            evicted: self.index.evicted(),
            namespaces: self.index.namespaces(),
            semantic: self.embedder.is_some(),
            lookups,
            hits,
            semantic_hits,
            misses,
            hit_rate: rate(hits, lookups),
            semantic_hit_rate: rate(semantic_hits, lookups),
            verification: self.verifier.stats(),
            stored: self.stats.stored.load(Ordering::Relaxed),
            embedding_failures: self.stats.embedding_failures.load(Ordering::Relaxed),
            store_failures: self.stats.store_failures.load(Ordering::Relaxed),
            by_tenant,
        }
    }
}

fn digest(hex_text: &str) -> Option<Digest> {
    hex::decode(hex_text).ok()?.try_into().ok()
}

fn encode_vector(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn decode_vector(text: &str) -> Vec<f32> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map(|bytes| {
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        })
        .unwrap_or_default()
}
