//! How does the Redis store keep quotas? Each `sluice_policies::ledger` operation as one
//! script call on the API key's own keys, all under one hash tag (one Redis Cluster slot).

use super::conn::Conn;
use super::scripts::{ADMIT, CHARGE, REFRESH, SETTLE};
use super::RedisStore;
use crate::store::StoreError;
use sluice_policies::ledger::{self, Admit, Charge, Refresh, Settle};
use sluice_policies::quota::{self, Counters, Decision};

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

/// The reply of the counters read: minute requests and tokens, the day, the month's spend,
/// the slots in flight and the soonest one.
type CountersReply = (
    Vec<String>,
    Vec<String>,
    std::collections::HashMap<String, u64>,
    Option<i64>,
    u64,
    Vec<(String, i64)>,
);

impl RedisStore {
    pub(super) async fn quota_admit(
        &self,
        key_id: &str,
        a: &Admit<'_>,
    ) -> Result<Decision, StoreError> {
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

    pub(super) async fn quota_settle(
        &self,
        key_id: &str,
        s: &Settle<'_>,
    ) -> Result<(), StoreError> {
        let keys = QuotaKeys::new(&self.prefix, key_id);
        let mut conn = self.conn.clone();
        let _: i64 = settle_invocation(&keys, s).invoke_async(&mut conn).await?;
        Ok(())
    }

    /// Many settlements in one round trip: the script loaded (a no-op when Redis has it) and
    /// invoked once per settlement, pipelined. A cluster's keys live on many nodes, so there
    /// each is its own call.
    pub(super) async fn quota_settle_all(
        &self,
        settlements: &[(&str, Settle<'_>)],
    ) -> Result<(), StoreError> {
        if matches!(self.conn, Conn::Cluster(_)) || settlements.len() == 1 {
            for (key_id, s) in settlements {
                self.quota_settle(key_id, s).await?;
            }
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.load_script(&SETTLE).ignore();
        for (key_id, s) in settlements {
            let keys = QuotaKeys::new(&self.prefix, key_id);
            pipe.invoke_script(&settle_invocation(&keys, s)).ignore();
        }
        let mut conn = self.conn.clone();
        let () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    pub(super) async fn quota_refresh(
        &self,
        key_id: &str,
        f: &Refresh<'_>,
    ) -> Result<(), StoreError> {
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

    pub(super) async fn quota_charge(
        &self,
        key_id: &str,
        c: &Charge<'_>,
    ) -> Result<bool, StoreError> {
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

    pub(super) async fn quota_read(
        &self,
        key_id: &str,
        now_sec: i64,
        month: &str,
    ) -> Result<Counters, StoreError> {
        let keys = QuotaKeys::new(&self.prefix, key_id);
        let mut conn = self.conn.clone();
        let (mr, mt, day, spend, in_flight, soonest): CountersReply = redis::pipe()
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

    pub(super) async fn quota_reset(
        &self,
        key_id: &str,
        now_sec: i64,
        month: &str,
    ) -> Result<(), StoreError> {
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
}

/// `SETTLE`'s keys and arguments for one settlement.
fn settle_invocation<'a>(keys: &QuotaKeys, s: &Settle<'_>) -> redis::ScriptInvocation<'a> {
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
    invocation
}
