//! The embedded store: a redb file on local disk. redb is crash-safe (copy-on-write B-trees,
//! fsync on commit), so a key answered as created survives a crash or restart.

use super::cache_memory::MemoryCache;
use super::quota_memory::MemoryQuotas;
use super::{EventCursor, Store, StoreError};
use crate::backend_spec::BackendSpec;
use crate::keys::{KeyHash, KeyRecord};
use crate::usage::UsageEvent;
use async_trait::async_trait;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};
use sluice_policies::ledger::{Admit, Charge, Refresh, Settle, Verdict};
use sluice_policies::quota::Counters;
use sluice_policies::{tenants, Tenant, Tier};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// key id -> JSON `KeyRecord`
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
/// hex SHA-256 of the secret -> key id, only for live keys
const KEY_HASHES: TableDefinition<&str, &str> = TableDefinition::new("key_hashes");
/// tier name -> JSON `Tier`, for tiers changed through the admin API
const TIERS: TableDefinition<&str, &[u8]> = TableDefinition::new("tiers");
/// tenant id -> JSON `Tenant` (its limits)
const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
/// backend name -> () for backends marked draining
const DRAINING: TableDefinition<&str, ()> = TableDefinition::new("draining_backends");
/// backend name -> JSON `Option<BackendSpec>`: pool changes made through the admin API
const POOL: TableDefinition<&str, &[u8]> = TableDefinition::new("backend_pool");
/// `{time_ms:020}/{event id}` -> JSON `UsageEvent`, so a range scan is a time range
const USAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("usage_events");
/// USAGE keys of events a tenant purge deleted: a replay of one (from a journal) must not
/// bring it back. An event's key is its time and id, so the key counts it once.
const USAGE_PURGED: TableDefinition<&str, ()> = TableDefinition::new("usage_purged");
/// Before 2026-12: event id -> its USAGE key, a second index that made an event count once.
/// Its random ids made every event dirty a page of its own at the batch's commit; a store
/// that still has it is moved to USAGE_PURGED when opened (`forget_event_ids`).
const LEGACY_USAGE_IDS: TableDefinition<&str, &str> = TableDefinition::new("usage_event_ids");

/// alert id -> the alert's JSON
const ALERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("alerts");
/// sequence number -> JSON audit entry, appended only
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// (time appended in ms, sequence within that ms) -> JSON captured conversation: the
/// distillation dataset, in the order it was captured
const CAPTURES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("captures");
/// `{time_ms:020}/{alert id}` -> (): the alerts in the order they were recorded
const ALERT_TIMES: TableDefinition<&str, ()> = TableDefinition::new("alert_times");

/// Moves a store from the id index to purge tombstones: the ids whose events are gone (a
/// tenant purge deleted them) become tombstones of their keys; the index is dropped.
fn forget_event_ids(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let legacy = txn
        .list_tables()
        .map_err(embedded_err)?
        .any(|table| table.name() == LEGACY_USAGE_IDS.name());
    if !legacy {
        return Ok(());
    }
    {
        let ids = txn.open_table(LEGACY_USAGE_IDS).map_err(embedded_err)?;
        let usage = txn.open_table(USAGE).map_err(embedded_err)?;
        let mut purged = txn.open_table(USAGE_PURGED).map_err(embedded_err)?;
        for row in ids.iter().map_err(embedded_err)? {
            let (_, key) = row.map_err(embedded_err)?;
            if usage.get(key.value()).map_err(embedded_err)?.is_none() {
                purged.insert(key.value(), ()).map_err(embedded_err)?;
            }
        }
    }
    txn.delete_table(LEGACY_USAGE_IDS).map_err(embedded_err)?;
    Ok(())
}

fn usage_key(time_ms: i64, id: &str) -> String {
    let mut key = String::with_capacity(21 + id.len());
    write_usage_key(&mut key, time_ms, id);
    key
}

fn write_usage_key(out: &mut String, time_ms: i64, id: &str) {
    use std::fmt::Write;
    // Times before 1970 do not occur; clamp so the key order stays the time order.
    write!(out, "{:020}/{id}", time_ms.max(0)).expect("a String takes any text");
}

/// A captured conversation's id, `<ms>-<seq>`, as its table key.
fn capture_id(id: &str) -> Result<(u64, u64), StoreError> {
    id.split_once('-')
        .and_then(|(ms, seq)| Some((ms.parse().ok()?, seq.parse().ok()?)))
        .ok_or_else(|| StoreError::BadId(id.to_owned()))
}

pub struct EmbeddedStore {
    db: Arc<Database>,
    quotas: MemoryQuotas,
    cache: MemoryCache,
    /// One process owns the file, so a counter in memory is the whole truth of "changed".
    epoch: AtomicU64,
    /// Live traffic buckets (start -> field -> count): one replica's, for the last hour, so
    /// kept in memory (a restart starts them afresh).
    traffic: parking_lot::Mutex<BTreeMap<i64, BTreeMap<String, u64>>>,
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Embedded(e.to_string())
    }
}

fn embedded_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::from(e.into())
}

/// The most of the file redb keeps in memory. Its default, 1 GiB, is a ceiling a busy gateway
/// reaches: usage events are appended, every page written stays cached, and the process grew
/// by about 14 MB a second at 17,000 requests a second (docs/benchmarks.md, "Eighth
/// profile"). What is read again is small: keys, tiers, tenants and the usage table's last
/// pages; an export reads the file in order, once.
const CACHE_BYTES: usize = 64 << 20;

impl EmbeddedStore {
    /// Opens (or creates) `dir/sluice.redb`, creating `dir` if needed.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Embedded(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        let path = dir.join("sluice.redb");
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| StoreError::Embedded(format!("cannot open {}: {e}", path.display())))?;
        // Create the tables up front so readers never meet a missing table.
        let txn = db.begin_write().map_err(embedded_err)?;
        txn.open_table(KEYS).map_err(embedded_err)?;
        txn.open_table(KEY_HASHES).map_err(embedded_err)?;
        txn.open_table(USAGE).map_err(embedded_err)?;
        txn.open_table(TIERS).map_err(embedded_err)?;
        txn.open_table(TENANTS).map_err(embedded_err)?;
        txn.open_table(DRAINING).map_err(embedded_err)?;
        txn.open_table(POOL).map_err(embedded_err)?;
        txn.open_table(USAGE_PURGED).map_err(embedded_err)?;
        txn.open_table(ALERTS).map_err(embedded_err)?;
        txn.open_table(AUDIT).map_err(embedded_err)?;
        txn.open_table(ALERT_TIMES).map_err(embedded_err)?;
        txn.open_table(CAPTURES).map_err(embedded_err)?;
        forget_event_ids(&txn)?;
        txn.commit().map_err(embedded_err)?;
        Ok(EmbeddedStore {
            db: Arc::new(db),
            quotas: MemoryQuotas::default(),
            cache: MemoryCache::default(),
            epoch: AtomicU64::new(0),
            traffic: Default::default(),
        })
    }

    /// Runs blocking disk work off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || work(&db))
            .await
            .map_err(|e| StoreError::Embedded(format!("store task failed: {e}")))?
    }
}

/// An operator's record (a tier, a tenant, a pool change) kept as JSON under its name.
type Records = TableDefinition<'static, &'static str, &'static [u8]>;

impl EmbeddedStore {
    /// Writes an operator's record under `name` and moves the key epoch, so that every
    /// identity resolved with the old one is dropped.
    async fn put_record<T: serde::Serialize>(
        &self,
        table: Records,
        name: &str,
        record: &T,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_vec(record)?;
        let name = name.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(embedded_err)?;
            txn.open_table(table)
                .map_err(embedded_err)?
                .insert(name.as_str(), json.as_slice())
                .map_err(embedded_err)?;
            txn.commit().map_err(embedded_err)?;
            Ok(())
        })
        .await?;
        self.epoch.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Every record of `table`.
    async fn records<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        table: Records,
    ) -> Result<Vec<T>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(embedded_err)?;
            let table = txn.open_table(table).map_err(embedded_err)?;
            let mut out = Vec::new();
            for row in table.iter().map_err(embedded_err)? {
                let (_, json) = row.map_err(embedded_err)?;
                out.push(serde_json::from_slice(json.value())?);
            }
            Ok(out)
        })
        .await
    }

    /// Adds to a ledger's spend in a month (a key's or a tenant's, restored from the usage
    /// ledger's rollups).
    pub fn add_month_spend(&self, ledger: &str, month: &str, nano: i64) {
        self.quotas.add_month_spend(ledger, month, nano);
    }

    /// Rebuilds this month's budget use from the stored usage events, so a restart does not
    /// hand every key (or tenant) its budget again. (Minute and day windows start afresh.)
    pub async fn restore_month_spend(
        &self,
        month_start_ms: i64,
        month: &str,
        cost_nano: impl Fn(&UsageEvent) -> i64,
    ) -> Result<(), StoreError> {
        let events = self.usage_events(month_start_ms, i64::MAX).await?;
        for event in &events {
            let cost = cost_nano(event);
            self.quotas.add_month_spend(&event.key_id, month, cost);
            self.quotas
                .add_month_spend(&tenants::ledger_of(&event.tenant), month, cost);
        }
        Ok(())
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn put_key(
        &self,
        record: &KeyRecord,
        replaced_hash: Option<&KeyHash>,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_vec(record)?;
        let record = record.clone();
        let replaced_hash = replaced_hash.cloned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(embedded_err)?;
            {
                let mut keys = txn.open_table(KEYS).map_err(embedded_err)?;
                keys.insert(record.id.as_str(), json.as_slice())
                    .map_err(embedded_err)?;
                let mut hashes = txn.open_table(KEY_HASHES).map_err(embedded_err)?;
                if let Some(old) = &replaced_hash {
                    hashes.remove(old.as_str()).map_err(embedded_err)?;
                }
                if record.is_revoked() {
                    hashes.remove(record.hash.as_str()).map_err(embedded_err)?;
                } else {
                    hashes
                        .insert(record.hash.as_str(), record.id.as_str())
                        .map_err(embedded_err)?;
                }
            }
            txn.commit().map_err(embedded_err)?;
            Ok(())
        })
        .await?;
        self.epoch.fetch_add(1, Ordering::Release);
        Ok(())
    }

    async fn key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(embedded_err)?;
            let keys = txn.open_table(KEYS).map_err(embedded_err)?;
            match keys.get(id.as_str()).map_err(embedded_err)? {
                Some(json) => Ok(Some(serde_json::from_slice(json.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        let hash = hash.clone();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(embedded_err)?;
            let hashes = txn.open_table(KEY_HASHES).map_err(embedded_err)?;
            let Some(id) = hashes.get(hash.as_str()).map_err(embedded_err)? else {
                return Ok(None);
            };
            let keys = txn.open_table(KEYS).map_err(embedded_err)?;
            match keys.get(id.value()).map_err(embedded_err)? {
                Some(json) => {
                    let record: KeyRecord = serde_json::from_slice(json.value())?;
                    Ok((!record.is_revoked()).then_some(record))
                }
                None => Ok(None),
            }
        })
        .await
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let mut records = self
            .blocking(|db| {
                let txn = db.begin_read().map_err(embedded_err)?;
                let keys = txn.open_table(KEYS).map_err(embedded_err)?;
                let mut out = Vec::new();
                for entry in keys.iter().map_err(embedded_err)? {
                    let (_, json) = entry.map_err(embedded_err)?;
                    out.push(serde_json::from_slice::<KeyRecord>(json.value())?);
                }
                Ok(out)
            })
            .await?;
        records.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(records)
    }

    async fn keys_epoch(&self) -> Result<u64, StoreError> {
        Ok(self.epoch.load(Ordering::Acquire))
    }

    async fn append_usage(&self, events: &[UsageEvent]) -> Result<usize, StoreError> {
        let (json, spans) = super::events_json(events)?;
        // The keys likewise, one buffer for the batch.
        let mut keys = String::with_capacity(events.len() * 64);
        let mut rows = Vec::with_capacity(events.len());
        for (event, span) in events.iter().zip(spans) {
            let start = keys.len();
            write_usage_key(&mut keys, event.time_ms, &event.id);
            rows.push((start..keys.len(), span));
        }
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(embedded_err)?;
            let mut added = 0;
            {
                // Keys are in time order, so a batch's inserts land on the table's last pages.
                let mut usage = txn.open_table(USAGE).map_err(embedded_err)?;
                let purged = txn.open_table(USAGE_PURGED).map_err(embedded_err)?;
                // Nearly always empty: a purge is an operator's rare data-deletion request.
                let any_purged = !purged.is_empty().map_err(embedded_err)?;
                for (key, value) in rows {
                    let key = &keys[key];
                    if any_purged && purged.get(key).map_err(embedded_err)?.is_some() {
                        continue;
                    }
                    // An event already stored (a replay) has the same key and the same JSON:
                    // writing it again changes nothing, and the old value says not to count it.
                    let replaced = usage
                        .insert(key, &json[value])
                        .map_err(embedded_err)?
                        .is_some();
                    if !replaced {
                        added += 1;
                    }
                }
            }
            txn.commit().map_err(embedded_err)?;
            Ok(added)
        })
        .await
    }

    async fn usage_events_page(
        &self,
        from_ms: i64,
        to_ms: i64,
        after: Option<EventCursor>,
        limit: usize,
    ) -> Result<(Vec<UsageEvent>, Option<EventCursor>), StoreError> {
        let limit = limit.max(1);
        let (from, to) = (usage_key(from_ms, ""), usage_key(to_ms, ""));
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(embedded_err)?;
            let usage = txn.open_table(USAGE).map_err(embedded_err)?;
            let rows = match &after {
                Some(c) => usage.range::<&str>((
                    std::ops::Bound::Excluded(c.position.as_str()),
                    std::ops::Bound::Excluded(to.as_str()),
                )),
                None => usage.range(from.as_str()..to.as_str()),
            }
            .map_err(embedded_err)?;
            let mut events: Vec<UsageEvent> = Vec::new();
            let mut last_key = String::new();
            for row in rows.take(limit) {
                let (key, json) = row.map_err(embedded_err)?;
                last_key = key.value().to_owned();
                events.push(serde_json::from_slice(json.value())?);
            }
            let next = (events.len() == limit).then(|| EventCursor {
                time_ms: events.last().map_or(0, |e| e.time_ms),
                position: last_key,
                at_time: 0,
            });
            Ok((events, next))
        })
        .await
    }

    async fn purge_usage(&self, tenant: &str) -> Result<u64, StoreError> {
        let tenant = tenant.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(embedded_err)?;
            let purged = {
                let mut usage = txn.open_table(USAGE).map_err(embedded_err)?;
                let mut doomed = Vec::new();
                usage
                    .retain(|key, json| {
                        let of_tenant = serde_json::from_slice::<UsageEvent>(json)
                            .is_ok_and(|e| e.tenant == tenant);
                        if of_tenant {
                            doomed.push(key.to_owned());
                        }
                        !of_tenant
                    })
                    .map_err(embedded_err)?;
                let mut tombstones = txn.open_table(USAGE_PURGED).map_err(embedded_err)?;
                for key in &doomed {
                    tombstones.insert(key.as_str(), ()).map_err(embedded_err)?;
                }
                doomed.len() as u64
            };
            txn.commit().map_err(embedded_err)?;
            Ok(purged)
        })
        .await
    }

    async fn admit(&self, args: &Admit<'_>) -> Result<Verdict, StoreError> {
        Ok(self.quotas.admit(args))
    }

    async fn put_tenant(&self, tenant: &Tenant) -> Result<(), StoreError> {
        self.put_record(TENANTS, &tenant.id, tenant).await
    }

    async fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        self.records(TENANTS).await
    }

    async fn put_tier(&self, tier: &Tier) -> Result<(), StoreError> {
        self.put_record(TIERS, &tier.name, tier).await
    }

    async fn record_alert_once(
        &self,
        id: &str,
        at_ms: i64,
        alert: &[u8],
    ) -> Result<bool, StoreError> {
        let (id, alert) = (id.to_owned(), alert.to_vec());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(embedded_err)?;
            let recorded = {
                let mut alerts = txn.open_table(ALERTS).map_err(embedded_err)?;
                let mut times = txn.open_table(ALERT_TIMES).map_err(embedded_err)?;
                if alerts.get(id.as_str()).map_err(embedded_err)?.is_some() {
                    false
                } else {
                    alerts
                        .insert(id.as_str(), alert.as_slice())
                        .map_err(embedded_err)?;
                    times
                        .insert(usage_key(at_ms, &id).as_str(), ())
                        .map_err(embedded_err)?;
                    let cutoff = usage_key(at_ms - super::ALERT_RETENTION_MS, "");
                    let expired: Vec<String> = times
                        .range(..cutoff.as_str())
                        .map_err(embedded_err)?
                        .map(|entry| entry.map(|(k, _)| k.value().to_owned()))
                        .collect::<Result<_, _>>()
                        .map_err(embedded_err)?;
                    for key in expired {
                        times.remove(key.as_str()).map_err(embedded_err)?;
                        if let Some((_, old_id)) = key.split_once('/') {
                            alerts.remove(old_id).map_err(embedded_err)?;
                        }
                    }
                    true
                }
            };
            txn.commit().map_err(embedded_err)?;
            Ok(recorded)
        })
        .await
    }

    async fn recent_alerts(&self, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(embedded_err)?;
            let alerts = txn.open_table(ALERTS).map_err(embedded_err)?;
            let times = txn.open_table(ALERT_TIMES).map_err(embedded_err)?;
            let mut out = Vec::new();
            for entry in times.iter().map_err(embedded_err)?.rev().take(limit) {
                let (key, _) = entry.map_err(embedded_err)?;
                let key = key.value();
                let id = key.split_once('/').map_or(key, |(_, id)| id);
                if let Some(alert) = alerts.get(id).map_err(embedded_err)? {
                    out.push(alert.value().to_vec());
                }
            }
            Ok(out)
        })
        .await
    }

    async fn append_audit(&self, entry: &[u8]) -> Result<String, StoreError> {
        let entry = entry.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(embedded_err)?;
            let seq = {
                let mut audit = txn.open_table(AUDIT).map_err(embedded_err)?;
                let last = audit
                    .last()
                    .map_err(embedded_err)?
                    .map_or(0, |(k, _)| k.value());
                audit
                    .insert(last + 1, entry.as_slice())
                    .map_err(embedded_err)?;
                last + 1
            };
            txn.commit().map_err(embedded_err)?;
            Ok(seq.to_string())
        })
        .await
    }

    async fn audit_page(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        // An id that is not one of ours pages from the newest entry.
        let before = before
            .and_then(|b| b.parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(embedded_err)?;
            let audit = txn.open_table(AUDIT).map_err(embedded_err)?;
            let mut out = Vec::new();
            for row in audit
                .range(..before)
                .map_err(embedded_err)?
                .rev()
                .take(limit)
            {
                let (seq, entry) = row.map_err(embedded_err)?;
                out.push((seq.value().to_string(), entry.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn append_captures(
        &self,
        entries: &[Vec<u8>],
        keep: &super::Retention,
    ) -> Result<(), StoreError> {
        let entries = entries.to_vec();
        let keep = *keep;
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(embedded_err)?;
            {
                let mut captures = txn.open_table(CAPTURES).map_err(embedded_err)?;
                // Ids keep their order even if the clock steps back.
                let last = captures
                    .last()
                    .map_err(embedded_err)?
                    .map(|(k, _)| k.value());
                let now = crate::clock::now_ms().max(0) as u64;
                let (mut ms, mut seq) = match last {
                    Some((ms, seq)) if ms >= now => (ms, seq + 1),
                    _ => (now, 0),
                };
                for entry in &entries {
                    captures
                        .insert((ms, seq), entry.as_slice())
                        .map_err(embedded_err)?;
                    (ms, seq) = (ms, seq + 1);
                }
                let oldest = keep.oldest_ms.max(0) as u64;
                captures
                    .retain_in(..(oldest, 0), |_, _| false)
                    .map_err(embedded_err)?;
                let len = captures.len().map_err(embedded_err)? as usize;
                for _ in keep.max_records..len {
                    captures.pop_first().map_err(embedded_err)?;
                }
            }
            txn.commit().map_err(embedded_err)?;
            Ok(())
        })
        .await
    }

    async fn captures_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let after = after.map(capture_id).transpose()?;
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(embedded_err)?;
            let captures = txn.open_table(CAPTURES).map_err(embedded_err)?;
            let range = match after {
                Some(id) => {
                    captures.range((std::ops::Bound::Excluded(id), std::ops::Bound::Unbounded))
                }
                None => captures.range::<(u64, u64)>(..),
            }
            .map_err(embedded_err)?;
            let mut out = Vec::new();
            for row in range.take(limit) {
                let (id, entry) = row.map_err(embedded_err)?;
                let (ms, seq) = id.value();
                out.push((format!("{ms}-{seq}"), entry.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn delete_captures(&self, ids: &[String]) -> Result<u64, StoreError> {
        let ids: Vec<(u64, u64)> = ids
            .iter()
            .map(|id| capture_id(id))
            .collect::<Result<_, _>>()?;
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(embedded_err)?;
            let mut deleted = 0;
            {
                let mut captures = txn.open_table(CAPTURES).map_err(embedded_err)?;
                for id in ids {
                    if captures.remove(id).map_err(embedded_err)?.is_some() {
                        deleted += 1;
                    }
                }
            }
            txn.commit().map_err(embedded_err)?;
            Ok(deleted)
        })
        .await
    }

    async fn set_draining(&self, backend: &str, draining: bool) -> Result<(), StoreError> {
        let name = backend.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(embedded_err)?;
            {
                let mut table = txn.open_table(DRAINING).map_err(embedded_err)?;
                if draining {
                    table.insert(name.as_str(), ()).map_err(embedded_err)?;
                } else {
                    table.remove(name.as_str()).map_err(embedded_err)?;
                }
            }
            txn.commit().map_err(embedded_err)?;
            Ok(())
        })
        .await?;
        self.epoch.fetch_add(1, Ordering::Release);
        Ok(())
    }

    async fn set_backend(
        &self,
        name: &str,
        backend: Option<&BackendSpec>,
    ) -> Result<(), StoreError> {
        self.put_record(POOL, name, &backend).await
    }

    async fn backend_changes(&self) -> Result<Vec<(String, Option<BackendSpec>)>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(embedded_err)?;
            let table = txn.open_table(POOL).map_err(embedded_err)?;
            let mut out = Vec::new();
            for row in table.iter().map_err(embedded_err)? {
                let (name, json) = row.map_err(embedded_err)?;
                out.push((
                    name.value().to_owned(),
                    serde_json::from_slice(json.value())?,
                ));
            }
            Ok(out)
        })
        .await
    }

    async fn draining_backends(&self) -> Result<Vec<String>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(embedded_err)?;
            let table = txn.open_table(DRAINING).map_err(embedded_err)?;
            let mut out = Vec::new();
            for row in table.iter().map_err(embedded_err)? {
                out.push(row.map_err(embedded_err)?.0.value().to_owned());
            }
            Ok(out)
        })
        .await
    }

    async fn stored_tiers(&self) -> Result<Vec<Tier>, StoreError> {
        self.records(TIERS).await
    }

    async fn refresh(&self, ledgers: &[String], args: &Refresh<'_>) -> Result<(), StoreError> {
        self.quotas.refresh(ledgers, args);
        Ok(())
    }

    async fn charge(&self, ledgers: &[String], args: &Charge<'_>) -> Result<bool, StoreError> {
        Ok(self.quotas.charge(ledgers, args))
    }

    async fn settle(&self, ledgers: &[String], args: &Settle<'_>) -> Result<(), StoreError> {
        self.quotas.settle(ledgers, args);
        Ok(())
    }

    async fn quota_counters(
        &self,
        ledger: &str,
        now_sec: i64,
        month: &str,
    ) -> Result<Counters, StoreError> {
        Ok(self.quotas.counters(ledger, now_sec, month))
    }

    async fn month_spends(
        &self,
        ledgers: &[String],
        now_sec: i64,
        month: &str,
    ) -> Result<Vec<i64>, StoreError> {
        Ok(ledgers
            .iter()
            .map(|l| self.quotas.counters(l, now_sec, month).month_spend_nano)
            .collect())
    }

    async fn reset_quota(
        &self,
        ledger: &str,
        _now_sec: i64,
        _month: &str,
    ) -> Result<(), StoreError> {
        self.quotas.reset(ledger);
        Ok(())
    }

    async fn cache_put(
        &self,
        id: &str,
        body: &[u8],
        ttl_ms: u64,
        event: &[u8],
        log_horizon_ms: u64,
    ) -> Result<(), StoreError> {
        use std::time::Duration;
        self.cache.put(
            id,
            body,
            Duration::from_millis(ttl_ms),
            event,
            Duration::from_millis(log_horizon_ms),
        );
        Ok(())
    }

    async fn cache_get(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.cache.get(id))
    }

    async fn cache_purge(&self, ids: &[String], event: &[u8]) -> Result<(), StoreError> {
        self.cache.purge(ids, event);
        Ok(())
    }

    async fn cache_evict(&self, ids: &[String]) -> Result<(), StoreError> {
        self.cache.evict(ids);
        Ok(())
    }

    async fn cache_log(
        &self,
        cursor: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self.cache.log(cursor, limit))
    }

    async fn add_traffic(
        &self,
        bucket_sec: i64,
        counts: &BTreeMap<String, u64>,
        keep_secs: i64,
    ) -> Result<(), StoreError> {
        let mut traffic = self.traffic.lock();
        let bucket = traffic.entry(bucket_sec).or_default();
        for (field, n) in counts {
            *bucket.entry(field.clone()).or_default() += n;
        }
        let kept = traffic.split_off(&(bucket_sec - keep_secs));
        *traffic = kept;
        Ok(())
    }

    async fn traffic(
        &self,
        from_sec: i64,
        to_sec: i64,
        _step_secs: i64,
    ) -> Result<Vec<(i64, BTreeMap<String, u64>)>, StoreError> {
        Ok(self
            .traffic
            .lock()
            .range(from_sec..to_sec)
            .map(|(at, counts)| (*at, counts.clone()))
            .collect())
    }

    fn shared(&self) -> bool {
        false
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}
