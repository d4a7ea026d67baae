//! The Redis store, shared by every replica. Keys live under one configurable prefix:
//!
//! - `{prefix}:key:{id}`        JSON `KeyRecord`
//! - `{prefix}:keyhash:{hash}`  key id, only for live keys
//! - `{prefix}:keys`            sorted set of key ids by creation time
//! - `{prefix}:keys:epoch`      counter bumped on every key or tier change
//! - `{prefix}:tiers`           hash: tier name -> JSON `Tier` (changed through the admin API)
//! - `{prefix}:tenants`         hash: tenant id -> JSON `Tenant` (its limits)
//! - `{prefix}:audit`           stream of audit entries (field `e`: JSON), appended only
//! - `{prefix}:traffic:{start}` hash: live traffic counts of the bucket that starts at
//!   `start` (unix seconds), field -> count summed over the replicas; kept for an hour
//! - `{prefix}:captures`        stream of conversations captured for distillation (field
//!   `e`: JSON), trimmed by age and length as entries are added
//! - `{prefix:LEDGER}:q:…`      a quota ledger's counters (see `quota`): LEDGER is a key id,
//!   or `tenant:ID` for a tenant's
//! - `{prefix}:backends:draining` set of backend names taking no new requests
//! - `{prefix}:backends:pool`   hash: backend name -> JSON `BackendSpec`, or `null` for
//!   one taken out (pool changes made through the admin API)
//! - `{prefix}:usage:ids`       hash: usage event id -> time (what makes an event count once)
//! - `{prefix}:usage:events`    sorted set of usage event JSON, scored by time in ms
//! - `{prefix:usage:N}:buffer`  with a PostgreSQL ledger, the events it could not take yet:
//!   sorted sets of event JSON scored by time, in `USAGE_BUFFER_SHARDS` shards by key id,
//!   each its own hash tag so a cluster spreads them over its nodes; emptied as the ledger
//!   takes them (see `ledger`)
//!
//! - `{prefix}:cache:log`      stream of cache events (entries added, purges) replicas follow
//! - `{prefix}:cache:entry:{{id}}` a cache entry's body, with its TTL; hash-tagged by its own
//!   id, so a cluster spreads the cache over every node
//!
//! Usage events are kept in a sorted set rather than a stream so that a replayed (older)
//! event lands at its own time and a range read is a time range.
//!
//! The prefix is written as a hash tag (`{sluice}`), so these few admin keys share one Redis
//! Cluster slot and every write can be one MULTI/EXEC: a replica never sees a record without
//! its index or the other way round.

mod conn;
mod quota;
mod scripts;
mod tls;

pub use tls::{PemError, RedisTls};

use super::{BufferedUsage, EventCursor, Store, StoreError};
use crate::backend_spec::BackendSpec;
use crate::keys::{KeyHash, KeyRecord};
use crate::usage::UsageEvent;
use async_trait::async_trait;
use conn::Conn;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use scripts::APPEND_USAGE;
use sluice_policies::ledger::{Admit, Charge, Refresh, Settle, Verdict};
use sluice_policies::quota::Counters;
use sluice_policies::{Tenant, Tier};
use std::collections::BTreeMap;

/// A range of stream entries as XRANGE answers: each id with its fields.
type StreamEntries = Vec<(String, Vec<(String, Vec<u8>)>)>;

/// Each entry's id with its `e` field (where the store keeps an entry's JSON).
fn entry_fields(entries: StreamEntries) -> Vec<(String, Vec<u8>)> {
    entries
        .into_iter()
        .filter_map(|(id, fields)| {
            let entry = fields.into_iter().find(|(f, _)| f == "e")?.1;
            Some((id, entry))
        })
        .collect()
}

/// Stream ids are `<ms>-<seq>`.
fn is_stream_id(id: &str) -> bool {
    id.split_once('-')
        .is_some_and(|(ms, seq)| ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok())
}

/// Shards of the usage buffer: enough that a cluster of a few nodes shares the load of an
/// outage of the ledger, few enough that draining reads them all each second.
const USAGE_BUFFER_SHARDS: usize = 16;

pub struct RedisStore {
    conn: Conn,
    prefix: String,
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`, or `rediss://` for TLS verified against
    /// the system's roots), or to a Redis Cluster when `url` lists several nodes separated
    /// by commas. `prefix` namespaces every key, so several deployments (or test runs) can
    /// share one Redis.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        Self::connect_with_tls(url, prefix, &RedisTls::default()).await
    }

    /// [`RedisStore::connect`] with `tls`: the CA a `rediss://` Redis (every node of a
    /// cluster) is verified against, and the client certificate shown to it.
    pub async fn connect_with_tls(
        url: &str,
        prefix: &str,
        tls: &RedisTls,
    ) -> Result<Self, StoreError> {
        // Fail fast while Redis is down: the gateway has a fallback for every call (cached
        // keys, fail-open limits, the usage journal), so waiting out long reconnect back-offs
        // would only stall requests.
        let connect_timeout = std::time::Duration::from_millis(500);
        let response_timeout = std::time::Duration::from_secs(2);
        let nodes: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        let secure = nodes.iter().filter(|n| n.starts_with("rediss://")).count();
        if secure > 0 {
            // The redis crate asks rustls for the process default provider.
            crate::tls::install_crypto_provider();
        }
        // The cluster client takes TLS or not from its first node alone, and certificates
        // would turn TLS on for plain nodes: say so rather than connect some other way than
        // the URL says.
        if (secure > 0 || tls.is_configured()) && secure != nodes.len() {
            return Err(StoreError::Redis(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "TLS options and rediss:// need every node to be a rediss:// URL",
            ))));
        }
        let conn = if nodes.len() > 1 {
            let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(connect_timeout)
                .response_timeout(response_timeout)
                .retries(1);
            if tls.is_configured() {
                // Used for every node, those the cluster names later included.
                builder = builder.certs(tls.certificates());
            }
            let client = builder.build()?;
            Conn::Cluster(client.get_async_connection().await?)
        } else {
            let client = if tls.is_configured() {
                redis::Client::build_with_tls(url, tls.certificates())?
            } else {
                redis::Client::open(url)?
            };
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_number_of_retries(1)
                .set_min_delay(std::time::Duration::from_millis(50))
                .set_max_delay(std::time::Duration::from_millis(500))
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(response_timeout));
            Conn::Single(ConnectionManager::new_with_config(client, config).await?)
        };
        Ok(RedisStore {
            conn,
            prefix: prefix.to_owned(),
        })
    }

    fn key_key(&self, id: &str) -> String {
        format!("{{{}}}:key:{id}", self.prefix)
    }

    fn hash_key(&self, hash: &KeyHash) -> String {
        format!("{{{}}}:keyhash:{}", self.prefix, hash.as_str())
    }

    fn index_key(&self) -> String {
        format!("{{{}}}:keys", self.prefix)
    }

    fn epoch_key(&self) -> String {
        format!("{{{}}}:keys:epoch", self.prefix)
    }

    fn tiers_key(&self) -> String {
        format!("{{{}}}:tiers", self.prefix)
    }

    /// Writes an operator's record (a tier, a tenant, a pool change) under `name` in the hash `hash`, and
    /// moves the key epoch in the same transaction, so every replica reloads it.
    async fn put_record<T: serde::Serialize>(
        &self,
        hash: String,
        name: &str,
        record: &T,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .hset(hash, name, serde_json::to_string(record)?)
            .ignore()
            .incr(self.epoch_key(), 1)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Appends `entry` to the stream `stream` as its field `e`; returns the entry's id.
    async fn append_to_stream(&self, stream: String, entry: &[u8]) -> Result<String, StoreError> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("e")
            .arg(entry)
            .query_async(&mut conn)
            .await?)
    }

    /// Every record of the hash `hash`.
    async fn records<T: serde::de::DeserializeOwned>(
        &self,
        hash: String,
    ) -> Result<Vec<T>, StoreError> {
        let mut conn = self.conn.clone();
        let jsons: Vec<String> = conn.hvals(hash).await?;
        Ok(jsons
            .iter()
            .map(|j| serde_json::from_str(j))
            .collect::<Result<_, _>>()?)
    }

    fn traffic_key(&self, bucket_sec: i64) -> String {
        format!("{{{}}}:traffic:{bucket_sec}", self.prefix)
    }

    fn audit_key(&self) -> String {
        format!("{{{}}}:audit", self.prefix)
    }

    fn captures_key(&self) -> String {
        format!("{{{}}}:captures", self.prefix)
    }

    fn tenants_key(&self) -> String {
        format!("{{{}}}:tenants", self.prefix)
    }

    fn draining_key(&self) -> String {
        format!("{{{}}}:backends:draining", self.prefix)
    }

    fn pool_key(&self) -> String {
        format!("{{{}}}:backends:pool", self.prefix)
    }

    fn cache_log_key(&self) -> String {
        format!("{{{}}}:cache:log", self.prefix)
    }

    fn cache_entry_key(&self, id: &str) -> String {
        format!("{}:cache:entry:{{{id}}}", self.prefix)
    }

    fn usage_ids_key(&self) -> String {
        format!("{{{}}}:usage:ids", self.prefix)
    }

    /// The buffer shard that holds a key's events.
    fn usage_buffer_key(&self, key_id: &str) -> String {
        let shard = blake3::hash(key_id.as_bytes()).as_bytes()[0] as usize % USAGE_BUFFER_SHARDS;
        self.usage_buffer_shard(shard)
    }

    fn usage_buffer_shard(&self, shard: usize) -> String {
        format!("{{{}:usage:{shard}}}:buffer", self.prefix)
    }

    /// alert id -> the alert's JSON
    fn alerts_key(&self) -> String {
        format!("{{{}}}:alerts", self.prefix)
    }

    /// alert ids by the time they were recorded
    fn alert_times_key(&self) -> String {
        format!("{{{}}}:alerts:times", self.prefix)
    }

    fn usage_events_key(&self) -> String {
        format!("{{{}}}:usage:events", self.prefix)
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn put_key(
        &self,
        record: &KeyRecord,
        replaced_hash: Option<&KeyHash>,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(record)?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .set(self.key_key(&record.id), json)
            .ignore()
            .zadd(self.index_key(), &record.id, record.created_at)
            .ignore();
        if let Some(old) = replaced_hash {
            pipe.del(self.hash_key(old)).ignore();
        }
        if record.is_revoked() {
            pipe.del(self.hash_key(&record.hash)).ignore();
        } else {
            pipe.set(self.hash_key(&record.hash), &record.id).ignore();
        }
        pipe.incr(self.epoch_key(), 1).ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    async fn key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let json: Option<String> = conn.get(self.key_key(id)).await?;
        Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
    }

    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let id: Option<String> = conn.get(self.hash_key(hash)).await?;
        let Some(id) = id else { return Ok(None) };
        let record = self.key(&id).await?;
        Ok(record.filter(|r| !r.is_revoked()))
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn.zrange(self.index_key(), 0, -1).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.key_key(id)).collect();
        let jsons: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        let mut records = jsons
            .into_iter()
            .flatten()
            .map(|j| serde_json::from_str::<KeyRecord>(&j))
            .collect::<Result<Vec<_>, _>>()?;
        records.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(records)
    }

    async fn keys_epoch(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let epoch: Option<u64> = conn.get(self.epoch_key()).await?;
        Ok(epoch.unwrap_or(0))
    }

    async fn append_usage(&self, events: &[UsageEvent]) -> Result<usize, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let (json, spans) = super::events_json(events)?;
        let mut invocation = APPEND_USAGE.prepare_invoke();
        invocation
            .key(self.usage_ids_key())
            .key(self.usage_events_key());
        for (event, span) in events.iter().zip(spans) {
            invocation
                .arg(&event.id)
                .arg(event.time_ms)
                .arg(&json[span]);
        }
        let mut conn = self.conn.clone();
        let added: usize = invocation.invoke_async(&mut conn).await?;
        Ok(added)
    }

    async fn purge_usage(&self, tenant: &str) -> Result<u64, StoreError> {
        let key = self.usage_events_key();
        let mut conn = self.conn.clone();
        let mut doomed = Vec::new();
        {
            let mut members = conn.zscan::<_, (String, f64)>(&key).await?;
            while let Some(item) = members.next_item().await {
                let (member, _score) = item?;
                let of_tenant =
                    serde_json::from_str::<UsageEvent>(&member).is_ok_and(|e| e.tenant == tenant);
                if of_tenant {
                    doomed.push(member);
                }
            }
        }
        let mut conn = self.conn.clone();
        let mut purged = 0;
        for members in doomed.chunks(500) {
            let removed: u64 = conn.zrem(&key, members).await?;
            purged += removed;
        }
        Ok(purged)
    }

    async fn buffer_usage(&self, events: &[UsageEvent]) -> Result<(), StoreError> {
        let mut shards: std::collections::BTreeMap<String, Vec<(i64, String)>> =
            std::collections::BTreeMap::new();
        for event in events {
            shards
                .entry(self.usage_buffer_key(&event.key_id))
                .or_default()
                .push((event.time_ms, serde_json::to_string(event)?));
        }
        // One ZADD per shard (each its own slot): a member added twice is the same member,
        // so a batch buffered again after a partial failure adds nothing twice.
        let writes = shards.into_iter().map(|(key, members)| {
            let mut conn = self.conn.clone();
            async move { conn.zadd_multiple::<_, _, _, ()>(key, &members).await }
        });
        for written in futures::future::join_all(writes).await {
            written?;
        }
        Ok(())
    }

    async fn buffered_usage(&self, limit: usize) -> Result<BufferedUsage, StoreError> {
        let mut taken = BufferedUsage::default();
        // Replicas draining together start at different shards.
        let first = rand::random_range(0..USAGE_BUFFER_SHARDS);
        for i in 0..USAGE_BUFFER_SHARDS {
            let left = limit.saturating_sub(taken.handles.len());
            if left == 0 {
                break;
            }
            let key = self.usage_buffer_shard((first + i) % USAGE_BUFFER_SHARDS);
            let mut conn = self.conn.clone();
            let members: Vec<String> = conn.zrange(&key, 0, left as isize - 1).await?;
            for member in members {
                match serde_json::from_str(&member) {
                    Ok(event) => taken.events.push(event),
                    Err(e) => {
                        tracing::error!(error = %e, member = %member, "unreadable buffered usage event; dropped from the buffer")
                    }
                }
                taken.handles.push((key.clone(), member));
            }
        }
        Ok(taken)
    }

    async fn unbuffer_usage(&self, taken: &BufferedUsage) -> Result<(), StoreError> {
        let mut shards: std::collections::BTreeMap<&str, Vec<&str>> =
            std::collections::BTreeMap::new();
        for (key, member) in &taken.handles {
            shards.entry(key).or_default().push(member);
        }
        let removals = shards.into_iter().map(|(key, members)| {
            let mut conn = self.conn.clone();
            async move { conn.zrem::<_, _, ()>(key, members).await }
        });
        for removed in futures::future::join_all(removals).await {
            removed?;
        }
        Ok(())
    }

    async fn usage_events_page(
        &self,
        from_ms: i64,
        to_ms: i64,
        after: Option<EventCursor>,
        limit: usize,
    ) -> Result<(Vec<UsageEvent>, Option<EventCursor>), StoreError> {
        let limit = limit.max(1);
        // Members of one score come in byte order, so a page resumes at the last one's
        // time, past the ones of that time already read.
        let (min, offset) = after
            .as_ref()
            .map_or((from_ms, 0), |c| (c.time_ms, c.at_time));
        let mut conn = self.conn.clone();
        // `(` makes the upper bound exclusive.
        let rows: Vec<(String, f64)> = conn
            .zrangebyscore_limit_withscores(
                self.usage_events_key(),
                min,
                format!("({to_ms}"),
                offset as isize,
                limit as isize,
            )
            .await?;
        let next = (rows.len() == limit).then(|| {
            let (last, score) = rows.last().expect("a full page");
            let time_ms = *score as i64;
            let of_last_time = rows.iter().filter(|(_, s)| *s as i64 == time_ms).count();
            EventCursor {
                time_ms,
                position: last.clone(),
                at_time: if time_ms == min {
                    offset + of_last_time
                } else {
                    of_last_time
                },
            }
        });
        let mut events = Vec::with_capacity(rows.len());
        for (json, score) in &rows {
            // An event written meanwhile at the resumed time, ahead of the last one read,
            // shifts the offset back over one already read.
            if let Some(c) = &after {
                if *score as i64 == c.time_ms && json.as_str() <= c.position.as_str() {
                    continue;
                }
            }
            events.push(serde_json::from_str::<UsageEvent>(json)?);
        }
        Ok((events, next))
    }

    async fn put_tier(&self, tier: &Tier) -> Result<(), StoreError> {
        self.put_record(self.tiers_key(), &tier.name, tier).await
    }

    async fn record_alert_once(
        &self,
        id: &str,
        at_ms: i64,
        alert: &[u8],
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        // HSETNX decides, once for the whole fleet; the time index only lists.
        let recorded: bool = conn.hset_nx(self.alerts_key(), id, alert).await?;
        if recorded {
            let cutoff = at_ms - super::ALERT_RETENTION_MS;
            let expired: Vec<String> = conn
                .zrangebyscore(self.alert_times_key(), "-inf", cutoff)
                .await?;
            let mut pipe = redis::pipe();
            pipe.zadd(self.alert_times_key(), id, at_ms).ignore();
            if !expired.is_empty() {
                pipe.hdel(self.alerts_key(), &expired)
                    .ignore()
                    .zrembyscore(self.alert_times_key(), "-inf", cutoff)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        Ok(recorded)
    }

    async fn append_audit(&self, entry: &[u8]) -> Result<String, StoreError> {
        self.append_to_stream(self.audit_key(), entry).await
    }

    async fn audit_page(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Anything but a stream id pages from the newest entry.
        let end = before
            .filter(|b| is_stream_id(b))
            .map_or_else(|| "+".to_owned(), |b| format!("({b}"));
        let mut conn = self.conn.clone();
        let entries: StreamEntries = redis::cmd("XREVRANGE")
            .arg(self.audit_key())
            .arg(end)
            .arg("-")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut conn)
            .await?;
        Ok(entry_fields(entries))
    }

    async fn append_captures(
        &self,
        entries: &[Vec<u8>],
        keep: &super::Retention,
    ) -> Result<(), StoreError> {
        let stream = self.captures_key();
        let mut pipe = redis::pipe();
        for entry in entries {
            // Exact trimming: each append lets go of about as many entries as it adds.
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("MAXLEN")
                .arg(keep.max_records)
                .arg("*")
                .arg("e")
                .arg(entry.as_slice())
                .ignore();
        }
        pipe.cmd("XTRIM")
            .arg(&stream)
            .arg("MINID")
            .arg(keep.oldest_ms.max(0))
            .ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    async fn captures_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let start = match after {
            Some(id) if is_stream_id(id) => format!("({id}"),
            Some(id) => return Err(StoreError::BadId(id.to_owned())),
            None => "-".to_owned(),
        };
        let mut conn = self.conn.clone();
        let entries: StreamEntries = redis::cmd("XRANGE")
            .arg(self.captures_key())
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut conn)
            .await?;
        Ok(entry_fields(entries))
    }

    async fn delete_captures(&self, ids: &[String]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        if let Some(bad) = ids.iter().find(|id| !is_stream_id(id)) {
            return Err(StoreError::BadId(bad.clone()));
        }
        let mut conn = self.conn.clone();
        Ok(redis::cmd("XDEL")
            .arg(self.captures_key())
            .arg(ids)
            .query_async(&mut conn)
            .await?)
    }

    async fn recent_alerts(&self, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn
            .zrevrange(self.alert_times_key(), 0, limit as isize - 1)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let alerts: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
            .arg(self.alerts_key())
            .arg(&ids)
            .query_async(&mut conn)
            .await?;
        Ok(alerts.into_iter().flatten().collect())
    }

    async fn set_draining(&self, backend: &str, draining: bool) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic();
        if draining {
            pipe.sadd(self.draining_key(), backend).ignore();
        } else {
            pipe.srem(self.draining_key(), backend).ignore();
        }
        pipe.incr(self.epoch_key(), 1)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    async fn set_backend(
        &self,
        name: &str,
        backend: Option<&BackendSpec>,
    ) -> Result<(), StoreError> {
        self.put_record(self.pool_key(), name, &backend).await
    }

    async fn backend_changes(&self) -> Result<Vec<(String, Option<BackendSpec>)>, StoreError> {
        let mut conn = self.conn.clone();
        let all: Vec<(String, String)> = conn.hgetall(self.pool_key()).await?;
        Ok(all
            .into_iter()
            .map(|(name, json)| Ok((name, serde_json::from_str(&json)?)))
            .collect::<Result<_, StoreError>>()?)
    }

    async fn draining_backends(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.smembers(self.draining_key()).await?)
    }

    async fn stored_tiers(&self) -> Result<Vec<Tier>, StoreError> {
        self.records(self.tiers_key()).await
    }

    async fn put_tenant(&self, tenant: &Tenant) -> Result<(), StoreError> {
        self.put_record(self.tenants_key(), &tenant.id, tenant)
            .await
    }

    async fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        self.records(self.tenants_key()).await
    }

    async fn admit(&self, a: &Admit<'_>) -> Result<Verdict, StoreError> {
        self.quota_admit(a).await
    }

    async fn settle(&self, ledgers: &[String], s: &Settle<'_>) -> Result<(), StoreError> {
        self.quota_settle_all(&[(ledgers, *s)]).await
    }

    async fn settle_all(&self, settlements: &[(&[String], Settle<'_>)]) -> Result<(), StoreError> {
        self.quota_settle_all(settlements).await
    }

    async fn refresh(&self, ledgers: &[String], f: &Refresh<'_>) -> Result<(), StoreError> {
        for ledger in ledgers {
            self.quota_refresh(ledger, f).await?;
        }
        Ok(())
    }

    async fn charge(&self, ledgers: &[String], c: &Charge<'_>) -> Result<bool, StoreError> {
        let mut counted = Vec::with_capacity(ledgers.len());
        for ledger in ledgers {
            counted.push(self.quota_charge(ledger, c).await?);
        }
        Ok(counted.first().copied().unwrap_or(false))
    }

    async fn quota_counters(
        &self,
        ledger: &str,
        now_sec: i64,
        month: &str,
    ) -> Result<Counters, StoreError> {
        self.quota_read(ledger, now_sec, month).await
    }

    async fn month_spends(
        &self,
        ledgers: &[String],
        _now_sec: i64,
        month: &str,
    ) -> Result<Vec<i64>, StoreError> {
        self.quota_month_spends(ledgers, month).await
    }

    async fn reset_quota(&self, ledger: &str, now_sec: i64, month: &str) -> Result<(), StoreError> {
        self.quota_reset(ledger, now_sec, month).await
    }

    async fn cache_put(
        &self,
        id: &str,
        body: &[u8],
        ttl_ms: u64,
        event: &[u8],
        log_horizon_ms: u64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        // The body first: a replica that reads the event can fetch it.
        let () = redis::cmd("SET")
            .arg(self.cache_entry_key(id))
            .arg(body)
            .arg("PX")
            .arg(ttl_ms.max(1))
            .query_async(&mut conn)
            .await?;
        let now_ms = crate::clock::now_ms().max(0) as u64;
        let oldest = now_ms.saturating_sub(log_horizon_ms);
        let _: String = redis::cmd("XADD")
            .arg(self.cache_log_key())
            .arg("MINID")
            .arg("~")
            .arg(oldest)
            .arg("*")
            .arg("e")
            .arg(event)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn cache_get(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.get(self.cache_entry_key(id)).await?)
    }

    async fn cache_purge(&self, ids: &[String], event: &[u8]) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        // Each body has its own hash tag: deleted one by one (pipelined), never in one DEL
        // that a cluster would refuse as cross-slot.
        for batch in ids.chunks(512) {
            let mut pipe = redis::pipe();
            for id in batch {
                pipe.del(self.cache_entry_key(id)).ignore();
            }
            let () = pipe.query_async(&mut conn).await?;
        }
        self.append_to_stream(self.cache_log_key(), event).await?;
        Ok(())
    }

    async fn cache_log(
        &self,
        cursor: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if limit == 0 {
            // XREAD takes COUNT 0 as no limit.
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        // XREAD without BLOCK: a blocking read would hold the shared connection.
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(limit)
            .arg("STREAMS")
            .arg(self.cache_log_key())
            .arg(cursor)
            .query_async(&mut conn)
            .await?;
        let mut events = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                if let Some(redis::Value::BulkString(event)) = entry.map.get("e") {
                    events.push((entry.id.clone(), event.clone()));
                }
            }
        }
        Ok(events)
    }

    async fn add_traffic(
        &self,
        bucket_sec: i64,
        counts: &BTreeMap<String, u64>,
        keep_secs: i64,
    ) -> Result<(), StoreError> {
        let key = self.traffic_key(bucket_sec);
        let mut pipe = redis::pipe();
        for (field, n) in counts {
            pipe.hincr(&key, field, *n).ignore();
        }
        pipe.expire(&key, keep_secs).ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    async fn traffic(
        &self,
        from_sec: i64,
        to_sec: i64,
        step_secs: i64,
    ) -> Result<Vec<(i64, BTreeMap<String, u64>)>, StoreError> {
        let starts: Vec<i64> = (from_sec..to_sec)
            .step_by(step_secs.max(1) as usize)
            .collect();
        if starts.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for start in &starts {
            pipe.hgetall(self.traffic_key(*start));
        }
        let mut conn = self.conn.clone();
        let buckets: Vec<BTreeMap<String, u64>> = pipe.query_async(&mut conn).await?;
        Ok(starts
            .into_iter()
            .zip(buckets)
            .filter(|(_, counts)| !counts.is_empty())
            .collect())
    }

    fn shared(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}
