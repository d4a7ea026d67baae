//! The Redis store, shared by every replica. Keys live under one configurable prefix:
//!
//! - `{prefix}:key:{id}`        JSON `KeyRecord`
//! - `{prefix}:keyhash:{hash}`  key id, only for live keys
//! - `{prefix}:keys`            sorted set of key ids by creation time
//! - `{prefix}:keys:epoch`      counter bumped on every key change
//!
//! The prefix is written as a hash tag (`{sluice}`), so these few admin keys share one Redis
//! Cluster slot and every write can be one MULTI/EXEC: a replica never sees a record without
//! its index or the other way round.

use super::{Store, StoreError};
use crate::keys::{KeyHash, KeyRecord};
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

    fn kind(&self) -> &'static str {
        "redis"
    }
}
