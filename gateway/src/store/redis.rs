//! The Redis store, shared by every replica. Keys live under one configurable prefix:
//!
//! - `{prefix}:key:{id}`        JSON `KeyRecord`
//! - `{prefix}:keyhash:{hash}`  key id, only for live keys
//! - `{prefix}:keys`            sorted set of key ids by creation time
//! - `{prefix}:keys:epoch`      counter bumped on every key change
//! - `{prefix}:usage:ids`       hash: usage event id -> time (what makes an event count once)
//! - `{prefix}:usage:events`    sorted set of usage event JSON, scored by time in ms
//!
//! Usage events are kept in a sorted set rather than a stream so that a replayed (older)
//! event lands at its own time and a range read is a time range.
//!
//! The prefix is written as a hash tag (`{sluice}`), so these few admin keys share one Redis
//! Cluster slot and every write can be one MULTI/EXEC: a replica never sees a record without
//! its index or the other way round.

use super::{Store, StoreError};
use crate::keys::{KeyHash, KeyRecord};
use crate::metering::events::UsageEvent;
use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;

pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`). `prefix` namespaces every key, so several
    /// deployments (or test runs) can share one Redis.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
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

    fn usage_ids_key(&self) -> String {
        format!("{{{}}}:usage:ids", self.prefix)
    }

    fn usage_events_key(&self) -> String {
        format!("{{{}}}:usage:events", self.prefix)
    }
}

/// Adds each (id, time, json) triple unless its id was seen. Versioned by name, so a rolling
/// upgrade never runs two meanings of the script under one name.
const APPEND_USAGE_V1: &str = r"
-- sluice_append_usage_v1
local added = 0
for i = 1, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i + 2])
    added = added + 1
  end
end
return added
";

static APPEND_USAGE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(APPEND_USAGE_V1));

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
        let mut invocation = APPEND_USAGE.prepare_invoke();
        invocation
            .key(self.usage_ids_key())
            .key(self.usage_events_key());
        for event in events {
            invocation
                .arg(&event.id)
                .arg(event.time_ms)
                .arg(serde_json::to_string(event)?);
        }
        let mut conn = self.conn.clone();
        let added: usize = invocation.invoke_async(&mut conn).await?;
        Ok(added)
    }

    async fn usage_events(&self, from_ms: i64, to_ms: i64) -> Result<Vec<UsageEvent>, StoreError> {
        let mut conn = self.conn.clone();
        // `(` makes the upper bound exclusive.
        let jsons: Vec<String> = conn
            .zrangebyscore(self.usage_events_key(), from_ms, format!("({to_ms}"))
            .await?;
        let mut events = jsons
            .iter()
            .map(|j| serde_json::from_str::<UsageEvent>(j))
            .collect::<Result<Vec<_>, _>>()?;
        events.sort_by(|a, b| (a.time_ms, &a.id).cmp(&(b.time_ms, &b.id)));
        Ok(events)
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}
