//! The Redis store, shared by every replica. Keys live under one configurable prefix:
//!
//! - `{prefix}:key:{id}`        JSON `KeyRecord`
//! - `{prefix}:keyhash:{hash}`  key id, only for live keys
//! - `{prefix}:keys`            sorted set of key ids by creation time
//! - `{prefix}:keys:epoch`      counter bumped on every key or tier change
//! - `{prefix}:tiers`           hash: tier name -> JSON `Tier` (changed through the admin API)
//! - `{prefix}:backends:draining` set of backend names taking no new requests
//! - `{prefix}:backends:pool`   hash: backend name -> JSON `BackendRecord`, or `null` for
//!   one taken out (pool changes made through the admin API)
//! - `{prefix}:usage:ids`       hash: usage event id -> time (what makes an event count once)
//! - `{prefix}:usage:events`    sorted set of usage event JSON, scored by time in ms
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

use super::{BackendRecord, Store, StoreError};
use crate::keys::{KeyHash, KeyRecord};
use crate::usage::UsageEvent;
use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use sluice_policies::ledger::{self, Admit, Charge, Refresh, Settle};
use sluice_policies::quota::{self, Counters, Decision};
use sluice_policies::Tier;

pub struct RedisStore {
    conn: Conn,
    prefix: String,
}

/// One Redis, or a Redis Cluster: every key this store touches in one call shares a hash tag,
/// so the same commands and scripts run on either.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        let call = match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        };
        Box::pin(timed(command_name(cmd), call))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        let call = match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        };
        Box::pin(timed("PIPELINE", call))
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Every round trip, timed into the metrics (`sluice_redis_call_duration_seconds`).
async fn timed<T>(
    command: &'static str,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    let started = std::time::Instant::now();
    let result = call.await;
    crate::metrics::get().record_redis(command, started.elapsed(), result.is_ok());
    result
}

/// The commands this store sends, as metric labels; anything else is OTHER, so the label
/// stays bounded.
fn command_name(cmd: &redis::Cmd) -> &'static str {
    const KNOWN: &[&str] = &[
        "EVALSHA",
        "EVAL",
        "SCRIPT",
        "GET",
        "SET",
        "DEL",
        "INCR",
        "HGET",
        "HSET",
        "HGETALL",
        "HVALS",
        "SADD",
        "SREM",
        "SMEMBERS",
        "ZADD",
        "ZRANGEBYSCORE",
        "XADD",
        "XREAD",
        "MULTI",
        "EXEC",
        "PING",
    ];
    let Some(redis::Arg::Simple(name)) = cmd.args_iter().next() else {
        return "OTHER";
    };
    KNOWN
        .iter()
        .find(|k| k.as_bytes().eq_ignore_ascii_case(name))
        .copied()
        .unwrap_or("OTHER")
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`), or to a Redis Cluster when `url` lists
    /// several nodes separated by commas. `prefix` namespaces every key, so several
    /// deployments (or test runs) can share one Redis.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
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
        let conn = if nodes.len() > 1 {
            let client = redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(connect_timeout)
                .response_timeout(response_timeout)
                .retries(1)
                .build()?;
            Conn::Cluster(client.get_async_connection().await?)
        } else {
            let client = redis::Client::open(url)?;
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

/// One admission, atomically: `sluice_policies::ledger::KeyLedger::admit`, line for line.
/// All keys are one API key's, under one hash tag.
/// KEYS: minute requests, minute tokens, day, month spend, in-flight.
/// ARGV: now, rpm, rpd, tpm, tpd, concurrent, budget (-1 = unlimited), tokens, cost,
/// reservation id, slot expiry, requests (1, or a lease's size; its concurrency slots are
/// members `id:1` .. `id:n`).
/// Returns {admitted, minute requests (second, count, ...), minute tokens, day requests,
/// day tokens, in flight, month spend, soonest slot expiry or -1}, counted before this
/// request.
const ADMIT_V3: &str = r"
-- sluice_admit_v3
local now = tonumber(ARGV[1])
local function window(key)
  local all = redis.call('HGETALL', key)
  local sum, live = 0, {}
  for i = 1, #all, 2 do
    if tonumber(all[i]) > now - 60 then
      sum = sum + tonumber(all[i + 1])
      live[#live + 1] = all[i]
      live[#live + 1] = all[i + 1]
    else
      redis.call('HDEL', key, all[i])
    end
  end
  return sum, live
end
local rpm_used, mr = window(KEYS[1])
local tpm_used, mt = window(KEYS[2])
local day_r = tonumber(redis.call('HGET', KEYS[3], 'r') or '0')
local day_t = tonumber(redis.call('HGET', KEYS[3], 't') or '0')
local spend = tonumber(redis.call('GET', KEYS[4]) or '0')
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
local in_flight = redis.call('ZCARD', KEYS[5])
local soonest = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
local next_expiry = -1
if #soonest == 2 then next_expiry = tonumber(soonest[2]) end
local tokens, cost, n = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[12])
local function over(limit, used, need)
  local l = tonumber(limit)
  return l >= 0 and used + need > l
end
local admitted = 1
if over(ARGV[6], in_flight, n) or over(ARGV[2], rpm_used, n) or over(ARGV[4], tpm_used, tokens)
  or over(ARGV[3], day_r, n) or over(ARGV[5], day_t, tokens) or over(ARGV[7], spend, cost) then
  admitted = 0
end
if admitted == 1 then
  redis.call('HINCRBY', KEYS[1], now, n)
  redis.call('EXPIRE', KEYS[1], 120)
  redis.call('HINCRBY', KEYS[2], now, tokens)
  redis.call('EXPIRE', KEYS[2], 120)
  redis.call('HINCRBY', KEYS[3], 'r', n)
  redis.call('HINCRBY', KEYS[3], 't', tokens)
  redis.call('EXPIRE', KEYS[3], 172800)
  redis.call('INCRBY', KEYS[4], cost)
  redis.call('EXPIRE', KEYS[4], 3456000)
  for i = 1, n do
    redis.call('ZADD', KEYS[5], ARGV[11], ARGV[10] .. ':' .. i)
  end
  redis.call('EXPIRE', KEYS[5], 86400)
end
return {admitted, mr, mt, day_r, day_t, in_flight, spend, next_expiry}
";

/// Settles a reservation (or a lease): `KeyLedger::settle`. Frees its slots and moves its
/// counters from reserved to actual.
/// KEYS: minute tokens, day, month spend, in-flight, minute requests.
/// ARGV: admitted second, token delta, cost delta, reservation id, slots, request delta.
const SETTLE_V3: &str = r"
-- sluice_settle_v3
for i = 1, tonumber(ARGV[5]) do
  redis.call('ZREM', KEYS[4], ARGV[4] .. ':' .. i)
end
local function adjust(key, field, delta)
  if delta ~= 0 and redis.call('HEXISTS', key, field) == 1 then
    if redis.call('HINCRBY', key, field, delta) < 0 then
      redis.call('HSET', key, field, 0)
    end
  end
end
local d = tonumber(ARGV[2])
adjust(KEYS[1], ARGV[1], d)
adjust(KEYS[2], 't', d)
local r = tonumber(ARGV[6])
adjust(KEYS[5], ARGV[1], r)
adjust(KEYS[2], 'r', r)
local c = tonumber(ARGV[3])
if c ~= 0 and redis.call('EXISTS', KEYS[3]) == 1 then
  if redis.call('INCRBY', KEYS[3], c) < 0 then
    redis.call('SET', KEYS[3], 0, 'KEEPTTL')
  end
end
return 1
";

/// Renews a running reservation's slots: `KeyLedger::refresh`.
/// KEYS: in-flight. ARGV: now, new expiry, reservation id, slots.
const REFRESH_V1: &str = r"
-- sluice_refresh_v1
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for i = 1, tonumber(ARGV[4]) do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[3] .. ':' .. i)
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('EXPIRE', KEYS[1], 86400)
end
return 1
";

/// Counts usage admitted without the store, once per id: `KeyLedger::charge`.
/// KEYS: charge ids, minute requests, minute tokens, day (of the charge), month spend.
/// ARGV: id, admitted second, now, requests, tokens, cost, how long ids are remembered.
/// Returns 1 when this charge counted, 0 for a repeat.
const CHARGE_V1: &str = r"
-- sluice_charge_v1
local now, at, memory = tonumber(ARGV[3]), tonumber(ARGV[2]), tonumber(ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - memory)
if redis.call('ZADD', KEYS[1], 'NX', at, ARGV[1]) == 0 then
  return 0
end
redis.call('EXPIRE', KEYS[1], memory)
if at > now - 60 then
  redis.call('HINCRBY', KEYS[2], at, ARGV[4])
  redis.call('EXPIRE', KEYS[2], 120)
  redis.call('HINCRBY', KEYS[3], at, ARGV[5])
  redis.call('EXPIRE', KEYS[3], 120)
end
redis.call('HINCRBY', KEYS[4], 'r', ARGV[4])
redis.call('HINCRBY', KEYS[4], 't', ARGV[5])
redis.call('EXPIRE', KEYS[4], 172800)
redis.call('INCRBY', KEYS[5], ARGV[6])
redis.call('EXPIRE', KEYS[5], 3456000)
return 1
";

static ADMIT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(ADMIT_V3));
static SETTLE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(SETTLE_V3));
static REFRESH: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(REFRESH_V1));
static CHARGE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(CHARGE_V1));

/// The Redis keys of one API key's quota state, all under one hash tag so that a script
/// touching them runs on one Redis Cluster slot.
struct QuotaKeys {
    tag: String,
}

impl QuotaKeys {
    fn new(prefix: &str, key_id: &str) -> Self {
        QuotaKeys {
            tag: format!("{{{prefix}:{key_id}}}"),
        }
    }
    fn minute_requests(&self) -> String {
        format!("{}:q:mr", self.tag)
    }
    fn minute_tokens(&self) -> String {
        format!("{}:q:mt", self.tag)
    }
    fn day(&self, sec: i64) -> String {
        format!("{}:q:d:{}", self.tag, sec.div_euclid(86_400))
    }
    fn month(&self, month: &str) -> String {
        format!("{}:q:m:{month}", self.tag)
    }
    fn in_flight(&self) -> String {
        format!("{}:q:f", self.tag)
    }
    fn charges(&self) -> String {
        format!("{}:q:c", self.tag)
    }
}

fn limit_arg(limit: Option<u64>) -> i64 {
    limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX))
}

fn buckets(requests: &[String], tokens: &[String]) -> Vec<sluice_policies::quota::Bucket> {
    use sluice_policies::quota::Bucket;
    let mut out: Vec<Bucket> = requests
        .chunks(2)
        .filter_map(|p| {
            Some(Bucket {
                second: p.first()?.parse().ok()?,
                requests: p.get(1)?.parse().ok()?,
                tokens: 0,
            })
        })
        .collect();
    for p in tokens.chunks(2) {
        let (Some(Ok(second)), Some(Ok(n))) = (
            p.first().map(|s| s.parse::<i64>()),
            p.get(1).map(|s| s.parse::<u64>()),
        ) else {
            continue;
        };
        match out.iter_mut().find(|b| b.second == second) {
            Some(b) => b.tokens = n,
            None => out.push(Bucket {
                second,
                requests: 0,
                tokens: n,
            }),
        }
    }
    out
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

    async fn put_tier(&self, tier: &Tier) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .hset(self.tiers_key(), &tier.name, serde_json::to_string(tier)?)
            .ignore()
            .incr(self.epoch_key(), 1)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
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
        backend: Option<&BackendRecord>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .hset(self.pool_key(), name, serde_json::to_string(&backend)?)
            .ignore()
            .incr(self.epoch_key(), 1)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    async fn backend_changes(&self) -> Result<Vec<(String, Option<BackendRecord>)>, StoreError> {
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
        let mut conn = self.conn.clone();
        let jsons: Vec<String> = conn.hvals(self.tiers_key()).await?;
        Ok(jsons
            .iter()
            .map(|j| serde_json::from_str(j))
            .collect::<Result<_, _>>()?)
    }

    async fn admit(&self, key_id: &str, a: &Admit<'_>) -> Result<Decision, StoreError> {
        let keys = QuotaKeys::new(&self.prefix, key_id);
        let l = a.limits;
        let mut invocation = ADMIT.prepare_invoke();
        invocation
            .key(keys.minute_requests())
            .key(keys.minute_tokens())
            .key(keys.day(a.now_sec))
            .key(keys.month(a.month))
            .key(keys.in_flight())
            .arg(a.now_sec)
            .arg(limit_arg(l.requests_per_minute))
            .arg(limit_arg(l.requests_per_day))
            .arg(limit_arg(l.tokens_per_minute))
            .arg(limit_arg(l.tokens_per_day))
            .arg(limit_arg(l.max_concurrent))
            .arg(quota::budget_nano(l).unwrap_or(-1))
            .arg(a.reservation.tokens)
            .arg(a.reservation.cost_nano)
            .arg(a.reservation_id)
            .arg(a.now_sec + a.slot_ttl_secs)
            .arg(a.reservation.requests);
        let mut conn = self.conn.clone();
        type Reply = (i64, Vec<String>, Vec<String>, u64, u64, u64, i64, i64);
        let (admitted, mr, mt, day_requests, day_tokens, in_flight, spend, next_expiry): Reply =
            invocation.invoke_async(&mut conn).await?;
        let counters = Counters {
            minute: buckets(&mr, &mt),
            day_requests,
            day_tokens,
            in_flight,
            next_slot_expiry: (next_expiry >= 0).then_some(next_expiry),
            month_spend_nano: spend,
        };
        let mut decision =
            quota::decide(l, &counters, a.reservation, a.now_sec, a.secs_to_month_end);
        // The script's verdict is the one that counted; the pure function explains it. They
        // agree (tests/quota_model.rs); if they ever did not, the script wins.
        if (admitted == 1) != decision.refused.is_none() {
            tracing::error!(
                key_id,
                admitted,
                ?decision,
                "admission script and model disagree"
            );
            decision.refused = (admitted == 0).then_some((quota::LimitKind::Concurrent, 1));
        }
        Ok(decision)
    }

    async fn settle(&self, key_id: &str, s: &Settle<'_>) -> Result<(), StoreError> {
        let keys = QuotaKeys::new(&self.prefix, key_id);
        let token_delta = s.actual.tokens as i64 - s.reserved.tokens as i64;
        let cost_delta = s.actual.cost_nano - s.reserved.cost_nano;
        let mut invocation = SETTLE.prepare_invoke();
        invocation
            .key(keys.minute_tokens())
            .key(keys.day(s.admitted_sec))
            .key(keys.month(s.month))
            .key(keys.in_flight())
            .key(keys.minute_requests())
            .arg(s.admitted_sec)
            .arg(token_delta)
            .arg(cost_delta)
            .arg(s.reservation_id)
            .arg(s.reserved.requests)
            .arg(s.actual.requests as i64 - s.reserved.requests as i64);
        let mut conn = self.conn.clone();
        let _: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }

    async fn refresh(&self, key_id: &str, f: &Refresh<'_>) -> Result<(), StoreError> {
        let keys = QuotaKeys::new(&self.prefix, key_id);
        let mut invocation = REFRESH.prepare_invoke();
        invocation
            .key(keys.in_flight())
            .arg(f.now_sec)
            .arg(f.now_sec + f.slot_ttl_secs)
            .arg(f.reservation_id)
            .arg(f.slots);
        let mut conn = self.conn.clone();
        let _: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }

    async fn charge(&self, key_id: &str, c: &Charge<'_>) -> Result<bool, StoreError> {
        let keys = QuotaKeys::new(&self.prefix, key_id);
        let mut invocation = CHARGE.prepare_invoke();
        invocation
            .key(keys.charges())
            .key(keys.minute_requests())
            .key(keys.minute_tokens())
            .key(keys.day(c.at_sec))
            .key(keys.month(c.month))
            .arg(c.id)
            .arg(c.at_sec)
            .arg(c.now_sec)
            .arg(c.amount.requests)
            .arg(c.amount.tokens)
            .arg(c.amount.cost_nano)
            .arg(ledger::CHARGE_MEMORY_SECS);
        let mut conn = self.conn.clone();
        let counted: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(counted == 1)
    }

    async fn quota_counters(
        &self,
        key_id: &str,
        now_sec: i64,
        month: &str,
    ) -> Result<Counters, StoreError> {
        let keys = QuotaKeys::new(&self.prefix, key_id);
        let mut conn = self.conn.clone();
        let (mr, mt, day, spend, in_flight, soonest): (
            Vec<String>,
            Vec<String>,
            std::collections::HashMap<String, u64>,
            Option<i64>,
            u64,
            Vec<(String, i64)>,
        ) = redis::pipe()
            .cmd("HGETALL")
            .arg(keys.minute_requests())
            .cmd("HGETALL")
            .arg(keys.minute_tokens())
            .cmd("HGETALL")
            .arg(keys.day(now_sec))
            .get(keys.month(month))
            .zcount(keys.in_flight(), now_sec + 1, "+inf")
            .zrangebyscore_limit_withscores(keys.in_flight(), now_sec + 1, "+inf", 0, 1)
            .query_async(&mut conn)
            .await?;
        let mut minute = buckets(&mr, &mt);
        minute.retain(|b| b.second > now_sec - quota::WINDOW_SECS);
        Ok(Counters {
            minute,
            day_requests: day.get("r").copied().unwrap_or(0),
            day_tokens: day.get("t").copied().unwrap_or(0),
            in_flight,
            next_slot_expiry: soonest.first().map(|(_, expiry)| *expiry),
            month_spend_nano: spend.unwrap_or(0),
        })
    }

    async fn reset_quota(&self, key_id: &str, now_sec: i64, month: &str) -> Result<(), StoreError> {
        let keys = QuotaKeys::new(&self.prefix, key_id);
        let mut conn = self.conn.clone();
        let _: () = redis::cmd("DEL")
            .arg(keys.minute_requests())
            .arg(keys.minute_tokens())
            .arg(keys.day(now_sec))
            .arg(keys.month(month))
            .arg(keys.in_flight())
            .query_async(&mut conn)
            .await?;
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
        let mut conn = self.conn.clone();
        // The body first: a replica that reads the event can fetch it.
        let () = redis::cmd("SET")
            .arg(self.cache_entry_key(id))
            .arg(body)
            .arg("PX")
            .arg(ttl_ms.max(1))
            .query_async(&mut conn)
            .await?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
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
        let _: String = redis::cmd("XADD")
            .arg(self.cache_log_key())
            .arg("*")
            .arg("e")
            .arg(event)
            .query_async(&mut conn)
            .await?;
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

    fn kind(&self) -> &'static str {
        "redis"
    }
}
