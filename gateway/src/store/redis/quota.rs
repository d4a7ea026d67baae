//! How does the Redis store keep quotas? Each `sluice_policies::ledger` operation as one
//! script call. A ledger's keys (an API key's, or a tenant's) share one hash tag, so each
//! ledger lives in one Redis Cluster slot.
//!
//! An admission counts in two ledgers, the key's and its tenant's. On a standalone (or
//! Sentinel) Redis that is one script call over both: atomic. A cluster cannot run one
//! script over two slots, so there the store admits into the tenant's ledger, then the
//! key's, each atomically, and gives the tenant's reservation back if the key's is refused:
//! never more than either's limit is admitted, and a request the key refused holds room in
//! the tenant's ledger for that one round trip at most.

use super::conn::Conn;
use super::scripts::{ADMIT, CHARGE, REFRESH, SETTLE};
use super::RedisStore;
use crate::store::StoreError;
use sluice_policies::ledger::{self, Admit, Charge, Refresh, Settle, Verdict};
use sluice_policies::quota::{self, Counters, Reservation};

/// The Redis keys of one ledger's quota state, all under one hash tag so that a script
/// touching them runs on one Redis Cluster slot. (A key's ledger is named by its key id, as
/// it was before tenants had ledgers, so upgrading keeps every key's counters.)
struct QuotaKeys {
    tag: String,
}

impl QuotaKeys {
    fn new(prefix: &str, ledger: &str) -> Self {
        QuotaKeys {
            tag: format!("{{{prefix}:{ledger}}}"),
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
    pub(super) async fn quota_admit(&self, a: &Admit<'_>) -> Result<Verdict, StoreError> {
        if a.scopes.len() > 1 && matches!(self.conn, Conn::Cluster(_)) {
            self.quota_admit_each(a).await
        } else {
            self.admit_script(a).await
        }
    }

    /// One `ADMIT` call over every ledger of `a.scopes`.
    async fn admit_script(&self, a: &Admit<'_>) -> Result<Verdict, StoreError> {
        let mut invocation = ADMIT.prepare_invoke();
        for scope in a.scopes {
            let keys = QuotaKeys::new(&self.prefix, scope.ledger);
            invocation
                .key(keys.minute_requests())
                .key(keys.minute_tokens())
                .key(keys.day(a.now_sec))
                .key(keys.month(a.month))
                .key(keys.in_flight());
        }
        invocation
            .arg(a.now_sec)
            .arg(a.reservation.tokens)
            .arg(a.reservation.cost_nano)
            .arg(a.reservation_id)
            .arg(a.now_sec + a.slot_ttl_secs)
            .arg(a.reservation.requests);
        for scope in a.scopes {
            let l = scope.limits;
            invocation
                .arg(limit_arg(l.requests_per_minute))
                .arg(limit_arg(l.requests_per_day))
                .arg(limit_arg(l.tokens_per_minute))
                .arg(limit_arg(l.tokens_per_day))
                .arg(limit_arg(l.max_concurrent))
                .arg(quota::budget_nano(l).unwrap_or(-1));
        }
        let mut conn = self.conn.clone();
        type State = (Vec<String>, Vec<String>, u64, u64, u64, i64, i64);
        let (admitted, states): (i64, Vec<State>) = invocation.invoke_async(&mut conn).await?;
        let decisions = a
            .scopes
            .iter()
            .zip(states)
            .map(|(scope, state)| {
                let (mr, mt, day_requests, day_tokens, in_flight, spend, next_expiry) = state;
                let counters = Counters {
                    minute: buckets(&mr, &mt),
                    day_requests,
                    day_tokens,
                    in_flight,
                    next_slot_expiry: (next_expiry >= 0).then_some(next_expiry),
                    month_spend_nano: spend,
                };
                quota::decide(
                    scope.limits,
                    &counters,
                    a.reservation,
                    a.now_sec,
                    a.secs_to_month_end,
                )
            })
            .collect();
        let mut verdict = ledger::verdict(decisions);
        // The script's verdict is the one that counted; the pure function explains it. They
        // agree (tests/quota_model.rs); if they ever did not, the script wins.
        if (admitted == 1) != verdict.refused_by.is_none() {
            tracing::error!(admitted, ?verdict, "admission script and model disagree");
            verdict.refused_by = (admitted == 0).then_some(0);
            verdict.decision.refused = (admitted == 0).then_some((quota::LimitKind::Concurrent, 1));
        }
        Ok(verdict)
    }

    /// A cluster's admission into several ledgers (see the module's note): one ledger at a
    /// time, the tenant's first, each reservation given back if a later ledger refuses.
    async fn quota_admit_each(&self, a: &Admit<'_>) -> Result<Verdict, StoreError> {
        let mut decisions = Vec::with_capacity(a.scopes.len());
        let order: Vec<usize> = (0..a.scopes.len()).rev().collect();
        for (done, &i) in order.iter().enumerate() {
            let one = Admit {
                scopes: std::slice::from_ref(&a.scopes[i]),
                ..*a
            };
            let verdict = self.admit_script(&one).await?;
            if verdict.refused_by.is_some() {
                let give_back = Settle {
                    reservation_id: a.reservation_id,
                    admitted_sec: a.now_sec,
                    month: a.month,
                    reserved: *a.reservation,
                    actual: Reservation::default(),
                };
                for &j in &order[..done] {
                    self.quota_settle(a.scopes[j].ledger, &give_back).await?;
                }
                return Ok(Verdict {
                    refused_by: Some(i),
                    decision: verdict.decision,
                });
            }
            decisions.push(verdict.decision);
        }
        decisions.reverse();
        Ok(ledger::verdict(decisions))
    }

    async fn quota_settle(&self, ledger: &str, s: &Settle<'_>) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let ledgers = [ledger];
        let _: i64 = settle_invocation(&self.prefix, &ledgers, s)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Many settlements in one round trip: the script loaded (a no-op when Redis has it) and
    /// invoked once per settlement, pipelined. A cluster's keys live on many nodes, so there
    /// each is its own call.
    pub(super) async fn quota_settle_all(
        &self,
        settlements: &[(&[String], Settle<'_>)],
    ) -> Result<(), StoreError> {
        // A cluster's ledgers live in different slots: one call per ledger. Elsewhere a
        // settlement is one call over all its ledgers, and many are pipelined.
        if matches!(self.conn, Conn::Cluster(_)) {
            for (ledgers, s) in settlements {
                for ledger in ledgers.iter() {
                    self.quota_settle(ledger, s).await?;
                }
            }
            return Ok(());
        }
        let invocations: Vec<redis::ScriptInvocation> = settlements
            .iter()
            .map(|(ledgers, s)| {
                let ledgers: Vec<&str> = ledgers.iter().map(String::as_str).collect();
                settle_invocation(&self.prefix, &ledgers, s)
            })
            .collect();
        let mut conn = self.conn.clone();
        if let [one] = invocations.as_slice() {
            let _: i64 = one.invoke_async(&mut conn).await?;
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.load_script(&SETTLE).ignore();
        for invocation in &invocations {
            pipe.invoke_script(invocation).ignore();
        }
        let () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    pub(super) async fn quota_refresh(
        &self,
        ledger: &str,
        f: &Refresh<'_>,
    ) -> Result<(), StoreError> {
        let keys = QuotaKeys::new(&self.prefix, ledger);
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
        ledger: &str,
        c: &Charge<'_>,
    ) -> Result<bool, StoreError> {
        let keys = QuotaKeys::new(&self.prefix, ledger);
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
        ledger: &str,
        now_sec: i64,
        month: &str,
    ) -> Result<Counters, StoreError> {
        let keys = QuotaKeys::new(&self.prefix, ledger);
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

    /// One `GET` per ledger, many in flight at once on the multiplexed connection (each
    /// ledger's keys are in a Cluster slot of their own, so no one pipeline holds them all).
    pub(super) async fn quota_month_spends(
        &self,
        ledgers: &[String],
        month: &str,
    ) -> Result<Vec<i64>, StoreError> {
        use futures::StreamExt;
        let keys: Vec<String> = ledgers
            .iter()
            .map(|ledger| QuotaKeys::new(&self.prefix, ledger).month(month))
            .collect();
        let conn = self.conn.clone();
        let reads = keys.into_iter().map(move |key| {
            let mut conn = conn.clone();
            async move {
                let spend: Option<i64> = redis::cmd("GET").arg(key).query_async(&mut conn).await?;
                Ok::<i64, StoreError>(spend.unwrap_or(0))
            }
        });
        futures::stream::iter(reads)
            .buffered(64)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    pub(super) async fn quota_reset(
        &self,
        ledger: &str,
        now_sec: i64,
        month: &str,
    ) -> Result<(), StoreError> {
        let keys = QuotaKeys::new(&self.prefix, ledger);
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

/// `SETTLE`'s keys and arguments for one settlement in `ledgers`.
fn settle_invocation<'a>(
    prefix: &str,
    ledgers: &[&str],
    s: &Settle<'_>,
) -> redis::ScriptInvocation<'a> {
    let token_delta = s.actual.tokens as i64 - s.reserved.tokens as i64;
    let cost_delta = s.actual.cost_nano - s.reserved.cost_nano;
    let mut invocation = SETTLE.prepare_invoke();
    for ledger in ledgers {
        let keys = QuotaKeys::new(prefix, ledger);
        invocation
            .key(keys.minute_tokens())
            .key(keys.day(s.admitted_sec))
            .key(keys.month(s.month))
            .key(keys.in_flight())
            .key(keys.minute_requests());
    }
    invocation
        .arg(s.admitted_sec)
        .arg(token_delta)
        .arg(cost_delta)
        .arg(s.reservation_id)
        .arg(s.reserved.requests)
        .arg(s.actual.requests as i64 - s.reserved.requests as i64);
    invocation
}
