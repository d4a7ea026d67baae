//! What runs inside Redis? The store's Lua scripts, each the Redis form of one
//! `sluice_policies::ledger` operation (or of appending usage events), versioned by name so a
//! rolling upgrade never runs two meanings of one script.

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

pub(super) static APPEND_USAGE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(APPEND_USAGE_V1));

/// Lua for the members `id:1` .. `id:n` of a reservation's concurrency slots, in groups of at
/// most 512 arguments for one ZADD or ZREM each (each member after `score` when one is
/// given). A lease holds as many slots as it has requests, in every ledger: a command per
/// member was 128 commands for a lease of 32 requests in two ledgers, 4 of Redis's 5 sorted-set
/// commands per request (docs/benchmarks.md, "Seventh profile"). The groups keep `unpack` far
/// below Lua's stack limit. The same members, fewer commands: no script changes meaning, so
/// none changes its versioned name.
macro_rules! slot_groups_lua {
    () => {
        r"
local function slot_groups(id, n, score)
  local groups, group = {}, {}
  for i = 1, n do
    if score then group[#group + 1] = score end
    group[#group + 1] = id .. ':' .. i
    if #group >= 512 then
      groups[#groups + 1] = group
      group = {}
    end
  end
  if #group > 0 then groups[#groups + 1] = group end
  return groups
end
"
    };
}

/// One admission into several ledgers, atomically: `sluice_policies::ledger::admit_together`,
/// line for line. Each ledger's keys share a hash tag; ledgers of one admission share a slot
/// on a standalone Redis only (on a cluster the store admits ledger by ledger, see `quota`).
/// KEYS: per ledger, its minute requests, minute tokens, day, month spend, in-flight.
/// ARGV: now, tokens, cost, reservation id, slot expiry, requests (1, or a lease's size; its
/// concurrency slots are members `id:1` .. `id:n`), then per ledger its rpm, rpd, tpm, tpd,
/// concurrent and budget (-1 = unlimited).
/// Returns {admitted, {per ledger: minute requests (second, count, ...), minute tokens, day
/// requests, day tokens, in flight, month spend, soonest slot expiry or -1}}, counted
/// before this request.
const ADMIT_V4: &str = concat!(
    r"
-- sluice_admit_v4",
    slot_groups_lua!(),
    r"local now = tonumber(ARGV[1])
local tokens, cost, n = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[6])
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
local function over(limit, used, need)
  local l = tonumber(limit)
  return l >= 0 and used + need > l
end
local admitted = 1
local states = {}
for l = 0, #KEYS / 5 - 1 do
  local k, a = l * 5, 6 + l * 6
  local rpm_used, mr = window(KEYS[k + 1])
  local tpm_used, mt = window(KEYS[k + 2])
  local day_r = tonumber(redis.call('HGET', KEYS[k + 3], 'r') or '0')
  local day_t = tonumber(redis.call('HGET', KEYS[k + 3], 't') or '0')
  local spend = tonumber(redis.call('GET', KEYS[k + 4]) or '0')
  redis.call('ZREMRANGEBYSCORE', KEYS[k + 5], '-inf', now)
  local in_flight = redis.call('ZCARD', KEYS[k + 5])
  local soonest = redis.call('ZRANGE', KEYS[k + 5], 0, 0, 'WITHSCORES')
  local next_expiry = -1
  if #soonest == 2 then next_expiry = tonumber(soonest[2]) end
  if over(ARGV[a + 5], in_flight, n) or over(ARGV[a + 1], rpm_used, n)
    or over(ARGV[a + 3], tpm_used, tokens) or over(ARGV[a + 2], day_r, n)
    or over(ARGV[a + 4], day_t, tokens) or over(ARGV[a + 6], spend, cost) then
    admitted = 0
  end
  states[#states + 1] = {mr, mt, day_r, day_t, in_flight, spend, next_expiry}
end
if admitted == 1 then
  local slots = slot_groups(ARGV[4], n, ARGV[5])
  for l = 0, #KEYS / 5 - 1 do
    local k = l * 5
    redis.call('HINCRBY', KEYS[k + 1], now, n)
    redis.call('EXPIRE', KEYS[k + 1], 120)
    redis.call('HINCRBY', KEYS[k + 2], now, tokens)
    redis.call('EXPIRE', KEYS[k + 2], 120)
    redis.call('HINCRBY', KEYS[k + 3], 'r', n)
    redis.call('HINCRBY', KEYS[k + 3], 't', tokens)
    redis.call('EXPIRE', KEYS[k + 3], 172800)
    redis.call('INCRBY', KEYS[k + 4], cost)
    redis.call('EXPIRE', KEYS[k + 4], 3456000)
    for _, group in ipairs(slots) do
      redis.call('ZADD', KEYS[k + 5], unpack(group))
    end
    redis.call('EXPIRE', KEYS[k + 5], 86400)
  end
end
return {admitted, states}
"
);

/// Settles a reservation (or a lease) in each of its ledgers: `KeyLedger::settle`, ledger
/// by ledger. Frees its slots and moves its counters from reserved to actual.
/// KEYS: per ledger, its minute tokens, day, month spend, in-flight, minute requests.
/// ARGV: admitted second, token delta, cost delta, reservation id, slots, request delta.
const SETTLE_V4: &str = concat!(
    r"
-- sluice_settle_v4",
    slot_groups_lua!(),
    r"local function adjust(key, field, delta)
  if delta ~= 0 and redis.call('HEXISTS', key, field) == 1 then
    if redis.call('HINCRBY', key, field, delta) < 0 then
      redis.call('HSET', key, field, 0)
    end
  end
end
local d, c, r = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[6])
local slots = slot_groups(ARGV[4], tonumber(ARGV[5]))
for l = 0, #KEYS / 5 - 1 do
  local k = l * 5
  for _, group in ipairs(slots) do
    redis.call('ZREM', KEYS[k + 4], unpack(group))
  end
  adjust(KEYS[k + 1], ARGV[1], d)
  adjust(KEYS[k + 2], 't', d)
  adjust(KEYS[k + 5], ARGV[1], r)
  adjust(KEYS[k + 2], 'r', r)
  if c ~= 0 and redis.call('EXISTS', KEYS[k + 3]) == 1 then
    if redis.call('INCRBY', KEYS[k + 3], c) < 0 then
      redis.call('SET', KEYS[k + 3], 0, 'KEEPTTL')
    end
  end
end
return 1
"
);

/// Renews a running reservation's slots: `KeyLedger::refresh`.
/// KEYS: in-flight. ARGV: now, new expiry, reservation id, slots.
const REFRESH_V1: &str = concat!(
    r"
-- sluice_refresh_v1",
    slot_groups_lua!(),
    r"redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, group in ipairs(slot_groups(ARGV[3], tonumber(ARGV[4]), ARGV[2])) do
  redis.call('ZADD', KEYS[1], 'XX', unpack(group))
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('EXPIRE', KEYS[1], 86400)
end
return 1
"
);

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

pub(super) static ADMIT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(ADMIT_V4));
pub(super) static SETTLE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(SETTLE_V4));
pub(super) static REFRESH: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(REFRESH_V1));
pub(super) static CHARGE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(CHARGE_V1));
