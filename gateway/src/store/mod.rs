//! Where state that outlives a request lives. One trait, two homes: `embedded` (in-process,
//! on local disk; the default, so `sluice` runs with nothing else installed) and `redis` (the
//! production one, shared by every replica). Both keep the same semantics and pass the same
//! tests (`tests/store_contract.rs`).

mod cache_memory;
mod embedded;
mod quota_memory;
mod redis;

pub use embedded::EmbeddedStore;
pub use redis::{PemError, RedisStore, RedisTls};

use crate::backend_spec::BackendSpec;
use crate::keys::{KeyHash, KeyRecord};
use crate::usage::UsageEvent;
use async_trait::async_trait;
use sluice_policies::ledger::{Admit, Charge, Refresh, Settle, Verdict};
use sluice_policies::quota::Counters;
use sluice_policies::{Tenant, Tier};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("embedded store: {0}")]
    Embedded(String),
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("stored record is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("'{0}' is not an id of this store")]
    BadId(String),
}

/// Usage events read from the buffer (see [`Store::buffer_usage`]), with what the store
/// needs to let go of exactly these once the ledger has them.
#[derive(Debug, Default)]
pub struct BufferedUsage {
    pub events: Vec<UsageEvent>,
    /// The store's own handles on them (Redis: each shard's key and member), unparseable
    /// members included so that one bad member cannot stop the buffer draining.
    pub(crate) handles: Vec<(String, String)>,
}

/// Every event's JSON, one after another in one buffer, and where each one is in it: a batch
/// of events costs two allocations to encode, not a string per event (a busy replica writes
/// thousands a second).
fn events_json(
    events: &[UsageEvent],
) -> Result<(Vec<u8>, Vec<std::ops::Range<usize>>), StoreError> {
    let mut json = Vec::with_capacity(events.len() * 512);
    let mut spans = Vec::with_capacity(events.len());
    for event in events {
        let start = json.len();
        serde_json::to_writer(&mut json, event)?;
        spans.push(start..json.len());
    }
    Ok((json, spans))
}

/// Usage events read per store call when reading a range page by page.
pub const USAGE_PAGE: usize = 1000;

/// Where a page of usage events ended, in the store's own terms (see
/// [`Store::usage_events_page`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventCursor {
    /// The last event's time.
    pub time_ms: i64,
    /// The last event's place among those of its time (the embedded store's row key; the
    /// Redis member).
    pub position: String,
    /// How many events of that time have been read (Redis pages by offset within a time).
    pub at_time: usize,
}

/// What the distillation dataset keeps (see [`Store::append_captures`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Entries appended before this time (unix ms) are forgotten.
    pub oldest_ms: i64,
    /// At most this many entries are kept; the oldest go first.
    pub max_records: usize,
}

/// How long a recorded spend alert is kept (and so not delivered again): past any month.
pub const ALERT_RETENTION_MS: i64 = 400 * 86_400_000;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Writes a key record and its hash index in one atomic step. `replaced_hash` is the hash
    /// the record had before (a rotation), whose index entry is removed in the same step. A
    /// revoked record keeps no index entry, so its secret stops resolving.
    async fn put_key(
        &self,
        record: &KeyRecord,
        replaced_hash: Option<&KeyHash>,
    ) -> Result<(), StoreError>;

    async fn key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError>;

    /// The live (not revoked) key whose secret has this hash.
    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError>;

    /// Every key, revoked ones included, ordered by creation time.
    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError>;

    /// A number that changes whenever any key changes, so each replica can drop its local key
    /// cache within one poll of a change made anywhere.
    async fn keys_epoch(&self) -> Result<u64, StoreError>;

    /// Creates or replaces a tier, and moves the key epoch (identities embed tier limits).
    async fn put_tier(&self, tier: &Tier) -> Result<(), StoreError>;

    /// Tiers written through the admin API; they override the configuration's.
    async fn stored_tiers(&self) -> Result<Vec<Tier>, StoreError>;

    /// Creates or replaces a tenant's limits, and moves the key epoch (every replica reloads
    /// them, as it does tiers).
    async fn put_tenant(&self, tenant: &Tenant) -> Result<(), StoreError>;

    /// Every tenant whose limits were set.
    async fn tenants(&self) -> Result<Vec<Tenant>, StoreError>;

    /// Marks a backend (by name) draining or not, and moves the key epoch so every replica
    /// applies it.
    async fn set_draining(&self, backend: &str, draining: bool) -> Result<(), StoreError>;

    /// The backends marked draining.
    async fn draining_backends(&self) -> Result<Vec<String>, StoreError>;

    /// Adds a backend to the pool (`Some`) or takes one out (`None`, configured ones
    /// included) through the admin API, and moves the key epoch so every replica applies it.
    async fn set_backend(
        &self,
        name: &str,
        backend: Option<&BackendSpec>,
    ) -> Result<(), StoreError>;

    /// The pool changes made through the admin API: each name with the backend it now is,
    /// or `None` where it was taken out.
    async fn backend_changes(&self) -> Result<Vec<(String, Option<BackendSpec>)>, StoreError>;

    /// Adds usage events, each counted once by its id however often it is written; returns
    /// how many were new. Atomic per call: all of a batch is taken or none of it.
    async fn append_usage(&self, events: &[UsageEvent]) -> Result<usize, StoreError>;

    /// Keeps usage events that the ledger could not take, for whichever replica drains the
    /// buffer next to move them there. Only a store that every replica shares buffers; the
    /// embedded store answers `Unsupported` (the journal keeps them instead).
    async fn buffer_usage(&self, events: &[UsageEvent]) -> Result<(), StoreError> {
        let _ = events;
        Err(StoreError::Unsupported(
            "this store does not buffer usage for a ledger",
        ))
    }

    /// Up to about `limit` buffered usage events, oldest first within each shard.
    async fn buffered_usage(&self, limit: usize) -> Result<BufferedUsage, StoreError> {
        let _ = limit;
        Ok(BufferedUsage::default())
    }

    /// Forgets buffered events (read by `buffered_usage`) once the ledger has them.
    async fn unbuffer_usage(&self, taken: &BufferedUsage) -> Result<(), StoreError> {
        let _ = taken;
        Ok(())
    }

    /// Deletes every stored usage event of a tenant (a data-deletion request); returns how
    /// many went. Their ids stay counted, so a replay of one cannot bring it back.
    async fn purge_usage(&self, tenant: &str) -> Result<u64, StoreError>;

    /// Up to `limit` (at least 1) of the usage events that finished in `[from_ms, to_ms)`,
    /// in time order, from where `after` (the cursor the previous page returned; `None`
    /// for the first) left off, and the cursor for the next page (`None` at the end). Paging
    /// is what lets an export of any size run in constant memory.
    async fn usage_events_page(
        &self,
        from_ms: i64,
        to_ms: i64,
        after: Option<EventCursor>,
        limit: usize,
    ) -> Result<(Vec<UsageEvent>, Option<EventCursor>), StoreError>;

    /// All the usage events that finished in `[from_ms, to_ms)`, in time order (for small
    /// ranges: they are all held in memory).
    async fn usage_events(&self, from_ms: i64, to_ms: i64) -> Result<Vec<UsageEvent>, StoreError> {
        let mut all = Vec::new();
        let mut cursor = None;
        loop {
            let (page, next) = self
                .usage_events_page(from_ms, to_ms, cursor, USAGE_PAGE)
                .await?;
            all.extend(page);
            match next {
                Some(next) => cursor = Some(next),
                None => return Ok(all),
            }
        }
    }

    /// Decides, in one atomic step, whether a request reserving `args.reservation` may start
    /// in every ledger of `args.scopes` (its key's and its tenant's), and reserves it in all
    /// of them if so. The quota operations follow `sluice_policies::ledger`, the contract
    /// both stores implement.
    async fn admit(&self, args: &Admit<'_>) -> Result<Verdict, StoreError>;

    /// Replaces a reservation with what the request really used, and frees its slots, in
    /// each ledger it was admitted into.
    async fn settle(&self, ledgers: &[String], args: &Settle<'_>) -> Result<(), StoreError>;

    /// Settles many reservations (of any keys), in as few round trips as the store allows;
    /// each is applied as `settle` would, not all of them atomically together.
    async fn settle_all(&self, settlements: &[(&[String], Settle<'_>)]) -> Result<(), StoreError> {
        for (ledgers, args) in settlements {
            self.settle(ledgers, args).await?;
        }
        Ok(())
    }

    /// Renews the concurrency slots of a reservation still running, in each of its ledgers.
    async fn refresh(&self, ledgers: &[String], args: &Refresh<'_>) -> Result<(), StoreError>;

    /// Counts usage admitted without the store (while it was unreachable) in each ledger,
    /// once per charge id; returns whether this delivery was the one that counted (in the
    /// first ledger, the key's).
    async fn charge(&self, ledgers: &[String], args: &Charge<'_>) -> Result<bool, StoreError>;

    /// Records a spend alert under its id unless one is recorded there already: true for
    /// the one caller, of all replicas, that recorded it (and so delivers it). Alerts older
    /// than [`ALERT_RETENTION_MS`] are forgotten as new ones come.
    async fn record_alert_once(
        &self,
        id: &str,
        at_ms: i64,
        alert: &[u8],
    ) -> Result<bool, StoreError>;

    /// The alerts recorded, newest first, at most `limit`.
    async fn recent_alerts(&self, limit: usize) -> Result<Vec<Vec<u8>>, StoreError>;

    /// Appends an entry to the audit trail; returns its id. Ids order entries by when they
    /// were appended, and nothing in the store changes or removes an entry.
    async fn append_audit(&self, entry: &[u8]) -> Result<String, StoreError>;

    /// Audit entries older than the one with id `before` (all, without), newest first, at
    /// most `limit`, with their ids.
    async fn audit_page(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Appends captured conversations (JSON) to the distillation dataset, then forgets what
    /// `keep` no longer keeps. Ids are `<ms>-<seq>`: the time each was appended, in order.
    async fn append_captures(
        &self,
        entries: &[Vec<u8>],
        keep: &Retention,
    ) -> Result<(), StoreError>;

    /// Up to `limit` captured conversations after the one with id `after` (from the oldest
    /// without), oldest first, with their ids.
    async fn captures_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Deletes the captured conversations with these ids; returns how many were there.
    async fn delete_captures(&self, ids: &[String]) -> Result<u64, StoreError>;

    /// A ledger's live quota counters (a key's, or a tenant's).
    async fn quota_counters(
        &self,
        ledger: &str,
        now_sec: i64,
        month: &str,
    ) -> Result<Counters, StoreError>;

    /// The month's spend counted so far in each of `ledgers`, in nano-units and in their
    /// order: every budget's use at once, for the money view.
    async fn month_spends(
        &self,
        ledgers: &[String],
        now_sec: i64,
        month: &str,
    ) -> Result<Vec<i64>, StoreError>;

    /// Forgets a ledger's quota counters (windows, slots and spend) at `now_sec`.
    async fn reset_quota(&self, ledger: &str, now_sec: i64, month: &str) -> Result<(), StoreError>;

    /// Keeps a cache entry's body for `ttl_ms`, then appends `event` to the cache log that
    /// every replica follows. The log forgets events older than `log_horizon_ms`.
    async fn cache_put(
        &self,
        id: &str,
        body: &[u8],
        ttl_ms: u64,
        event: &[u8],
        log_horizon_ms: u64,
    ) -> Result<(), StoreError>;

    /// A cache entry's body, unless it expired or was deleted.
    async fn cache_get(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Deletes cache entries' bodies and appends `event` (what was purged) to the cache log.
    async fn cache_purge(&self, ids: &[String], event: &[u8]) -> Result<(), StoreError>;

    /// Lets go of bodies this replica's index evicted to keep within its byte budget. A store
    /// that every replica shares keeps them (another replica may still hold the entry; they
    /// expire by their TTL); the embedded store, whose one replica evicted them, drops them.
    async fn cache_evict(&self, ids: &[String]) -> Result<(), StoreError> {
        let _ = ids;
        Ok(())
    }

    /// Up to `limit` cache log events after `cursor` (`"0"`: from the start), with the
    /// cursor of each.
    async fn cache_log(
        &self,
        cursor: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Adds one replica's live traffic counts (field -> count, as the `traffic` module counts them) to the
    /// bucket that starts at `bucket_sec`, field by field; the bucket is forgotten
    /// `keep_secs` later.
    async fn add_traffic(
        &self,
        bucket_sec: i64,
        counts: &BTreeMap<String, u64>,
        keep_secs: i64,
    ) -> Result<(), StoreError>;

    /// The traffic buckets that start every `step_secs` from `from_sec` up to `to_sec`
    /// (exclusive) and hold anything, with what every replica added to each.
    async fn traffic(
        &self,
        from_sec: i64,
        to_sec: i64,
        step_secs: i64,
    ) -> Result<Vec<(i64, BTreeMap<String, u64>)>, StoreError>;

    /// Whether every replica shares this store (and so its traffic buckets).
    fn shared(&self) -> bool;

    /// A short name for logs and health output.
    fn kind(&self) -> &'static str;
}
