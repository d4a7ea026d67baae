//! The admission contract, checked against its model: random sequences of admissions,
//! settlements, lease takes and returns, slot renewals, late charges (repeats included),
//! operator resets and clock jumps (past slot expiry, across midnight and month ends) are
//! driven through the pure ledger (`sluice_policies::ledger`, the model), the embedded
//! store and a real Redis. Every request counts in its key's ledger and in the one tenant's
//! ledger that all the keys share, as the gateway's do. After every step the decisions
//! (verdict, refusing scope and limit, Retry-After, rate headers) and every ledger's quota
//! state (what `GET /admin/v1/keys/{id}/quota` and `/admin/v1/tenants/{id}/quota` report)
//! must be identical.
//!
//! Each run takes a fresh seed and prints it; `SLUICE_QUOTA_SEED=N` replays a run step for
//! step, `SLUICE_QUOTA_STEPS=N` sets its length (default 3000).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice_gateway::clock::month_of;
use sluice_gateway::store::{EmbeddedStore, RedisStore, Store};
use sluice_policies::ledger::{self, Admit, Charge, KeyLedger, Refresh, Scope, Settle, Verdict};
use sluice_policies::quota::{QuotaState, Reservation};
use sluice_policies::{Limits, Money};

mod common;
use common::redis_url;

const KEYS: usize = 3;
/// The tenant's ledger's place, after the keys'.
const TENANT: usize = KEYS;
const SLOT_TTL: i64 = 30;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Small random limits, so that every limit refuses often; sometimes unlimited.
fn limits(rng: &mut StdRng) -> Limits {
    let mut maybe = |lo: u64, hi: u64| rng.random_bool(0.7).then(|| rng.random_range(lo..=hi));
    let budget = maybe(2_000, 20_000).map(|nano| {
        format!("0.{nano:09}")
            .parse::<Money>()
            .expect("a budget in nano-units")
    });
    Limits {
        requests_per_minute: maybe(2, 12),
        requests_per_day: maybe(5, 40),
        tokens_per_minute: maybe(100, 600),
        tokens_per_day: maybe(300, 2_000),
        max_concurrent: maybe(1, 6),
        monthly_budget: budget,
        soft_monthly_budget: None,
    }
}

/// A reservation admitted and not yet settled.
#[derive(Debug, Clone)]
struct Open {
    key: usize,
    id: String,
    admitted_sec: i64,
    month: String,
    reserved: Reservation,
}

struct Run {
    rng: StdRng,
    now: i64,
    /// The keys' ledgers, then the tenant's (at [`TENANT`]); likewise their limits.
    ledger_ids: Vec<String>,
    limits: Vec<Limits>,
    model: Vec<KeyLedger>,
    stores: Vec<(&'static str, Box<dyn Store>)>,
    open: Vec<Open>,
    charges: Vec<(usize, String, i64, String, Reservation)>,
    next_id: u64,
    log: Vec<String>,
}

impl Run {
    fn fresh_id(&mut self, kind: &str) -> String {
        self.next_id += 1;
        format!("{kind}{}", self.next_id)
    }

    fn reservation(&mut self, requests: u64) -> Reservation {
        Reservation {
            requests,
            tokens: requests * self.rng.random_range(1..=80),
            cost_nano: requests as i64 * self.rng.random_range(0..=900),
        }
    }

    async fn admit(&mut self, requests: u64) {
        let key = self.rng.random_range(0..KEYS);
        let r = self.reservation(requests);
        let id = self.fresh_id(if requests > 1 { "lease" } else { "req" });
        let (month, secs_to_month_end) = month_of(self.now);
        let month = month.to_string();
        let scopes = [
            Scope {
                ledger: &self.ledger_ids[key],
                limits: &self.limits[key],
            },
            Scope {
                ledger: &self.ledger_ids[TENANT],
                limits: &self.limits[TENANT],
            },
        ];
        let args = Admit {
            scopes: &scopes,
            reservation: &r,
            reservation_id: &id,
            now_sec: self.now,
            month: &month,
            secs_to_month_end,
            slot_ttl_secs: SLOT_TTL,
        };
        let (keys, tenant) = self.model.split_at_mut(TENANT);
        let expected = ledger::admit_together(&mut [&mut keys[key], &mut tenant[0]], &args);
        self.log.push(format!(
            "t={} admit key{key} {r:?} as {id}: {:?} by {:?}",
            self.now, expected.decision.refused, expected.refused_by
        ));
        for (name, store) in &self.stores {
            let got: Verdict = store.admit(&args).await.unwrap();
            assert_eq!(got, expected, "{name}: admission verdict");
        }
        if expected.refused_by.is_none() {
            self.open.push(Open {
                key,
                id,
                admitted_sec: self.now,
                month,
                reserved: r,
            });
        }
    }

    async fn settle(&mut self) {
        if self.open.is_empty() {
            return;
        }
        let o = self
            .open
            .swap_remove(self.rng.random_range(0..self.open.len()));
        // What it used: a request counts once; a lease counts the requests it served. Usage
        // may run past an estimate (tokens, cost) now and then.
        let requests = if o.reserved.requests > 1 {
            self.rng.random_range(0..=o.reserved.requests)
        } else {
            1
        };
        let actual = Reservation {
            requests,
            tokens: self
                .rng
                .random_range(0..=o.reserved.tokens + o.reserved.tokens / 4),
            cost_nano: self.rng.random_range(0..=o.reserved.cost_nano + 50),
        };
        let args = Settle {
            reservation_id: &o.id,
            admitted_sec: o.admitted_sec,
            month: &o.month,
            reserved: o.reserved,
            actual,
        };
        self.log
            .push(format!("t={} settle {} with {actual:?}", self.now, o.id));
        self.model[o.key].settle(&args);
        self.model[TENANT].settle(&args);
        let ledgers = self.ledgers_of(o.key);
        for (_, store) in &self.stores {
            store.settle(&ledgers, &args).await.unwrap();
        }
    }

    async fn refresh(&mut self) {
        if self.open.is_empty() {
            return;
        }
        let o = self.open[self.rng.random_range(0..self.open.len())].clone();
        let args = Refresh {
            reservation_id: &o.id,
            slots: o.reserved.requests,
            now_sec: self.now,
            slot_ttl_secs: SLOT_TTL,
        };
        self.log.push(format!("t={} refresh {}", self.now, o.id));
        self.model[o.key].refresh(&args);
        self.model[TENANT].refresh(&args);
        let ledgers = self.ledgers_of(o.key);
        for (_, store) in &self.stores {
            store.refresh(&ledgers, &args).await.unwrap();
        }
    }

    async fn charge(&mut self) {
        let repeat = !self.charges.is_empty() && self.rng.random_bool(0.3);
        let (key, id, at_sec, month, amount) = if repeat {
            self.charges[self.rng.random_range(0..self.charges.len())].clone()
        } else {
            let key = self.rng.random_range(0..KEYS);
            let at_sec = self.now - self.rng.random_range(0..120);
            let charge = (
                key,
                self.fresh_id("charge"),
                at_sec,
                month_of(at_sec).0.to_string(),
                self.reservation(1),
            );
            self.charges.push(charge.clone());
            charge
        };
        let args = Charge {
            id: &id,
            at_sec,
            month: &month,
            amount,
            now_sec: self.now,
        };
        let expected = self.model[key].charge(&args);
        self.model[TENANT].charge(&args);
        self.log.push(format!(
            "t={} charge key{key} {id} at {at_sec} {amount:?}: counted {expected}",
            self.now
        ));
        for (name, store) in &self.stores {
            let got = store.charge(&self.ledgers_of(key), &args).await.unwrap();
            assert_eq!(got, expected, "{name}: whether charge {id} counted");
        }
    }

    /// An operator's reset of one key's quota, or now and then of the tenant's.
    async fn reset(&mut self) {
        let ledger = self.rng.random_range(0..=KEYS);
        let (month, _) = month_of(self.now);
        self.log
            .push(format!("t={} reset ledger{ledger}", self.now));
        self.model[ledger].reset();
        for (_, store) in &self.stores {
            store
                .reset_quota(&self.ledger_ids[ledger], self.now, &month)
                .await
                .unwrap();
        }
        self.open.retain(|o| ledger == TENANT || o.key != ledger);
    }

    /// The ledgers a key's requests count in: its own, then the tenant's.
    fn ledgers_of(&self, key: usize) -> [String; 2] {
        [
            self.ledger_ids[key].clone(),
            self.ledger_ids[TENANT].clone(),
        ]
    }

    fn advance(&mut self) {
        let step = match self.rng.random_range(0..100) {
            0..50 => self.rng.random_range(0..4),
            50..75 => self.rng.random_range(20..70),
            75..88 => SLOT_TTL + 1,
            // To a second or two before midnight, or the end of the month.
            88..95 => 86_400 - self.now.rem_euclid(86_400) - self.rng.random_range(1..3),
            _ => month_of(self.now).1 as i64 - self.rng.random_range(1..3),
        };
        self.now += step.max(0);
        self.log.push(format!("t={} (+{step}s)", self.now));
    }

    async fn check_state(&self) {
        let (month, _) = month_of(self.now);
        for ledger in 0..=KEYS {
            let expected = QuotaState::of(
                &self.limits[ledger],
                &self.model[ledger].counters(self.now, &month),
                self.now,
            );
            for (name, store) in &self.stores {
                let counters = store
                    .quota_counters(&self.ledger_ids[ledger], self.now, &month)
                    .await
                    .unwrap();
                let got = QuotaState::of(&self.limits[ledger], &counters, self.now);
                assert_eq!(got, expected, "{name}: quota state of ledger{ledger}");
            }
        }
    }
}

#[tokio::test]
async fn both_stores_follow_the_quota_model() {
    let seed = env_u64("SLUICE_QUOTA_SEED").unwrap_or_else(rand::random);
    let steps = env_u64("SLUICE_QUOTA_STEPS").unwrap_or(3000);
    println!("quota model: seed {seed} (SLUICE_QUOTA_SEED={seed} replays it), {steps} steps");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("sluice-model-{}", uuid::Uuid::new_v4().simple());
    let redis = RedisStore::connect(&redis_url(), &prefix)
        .await
        .expect("a Redis for the model test (start one, or set SLUICE_TEST_REDIS_URL)");
    let stores: Vec<(&'static str, Box<dyn Store>)> = vec![
        (
            "embedded",
            Box::new(EmbeddedStore::open(dir.path()).unwrap()),
        ),
        ("redis", Box::new(redis)),
    ];
    // Somewhere in 2020-2035, so days, months and years roll over at different points.
    let now = rng.random_range(1_577_836_800..2_082_758_400);
    // The tenant's limits are drawn like a key's: as often the tighter as the looser.
    let limits = (0..=KEYS).map(|_| limits(&mut rng)).collect();
    let mut run = Run {
        rng,
        now,
        ledger_ids: (0..KEYS)
            .map(|k| format!("model-key-{k}"))
            .chain([sluice_policies::tenants::ledger_of("model-tenant")])
            .collect(),
        limits,
        model: vec![KeyLedger::default(); KEYS + 1],
        stores,
        open: Vec::new(),
        charges: Vec::new(),
        next_id: 0,
        log: Vec::new(),
    };
    run.log.push(format!("t={now} limits {:?}", run.limits));
    for step in 0..steps {
        let op = run.rng.random_range(0..100);
        let outcome = std::panic::AssertUnwindSafe(async {
            match op {
                0..32 => run.admit(1).await,
                32..42 => {
                    let size = run.rng.random_range(2..=6);
                    run.admit(size).await
                }
                42..66 => run.settle().await,
                66..74 => run.refresh().await,
                74..84 => run.charge().await,
                84 => run.reset().await,
                _ => run.advance(),
            }
            run.check_state().await;
        });
        if let Err(panic) = futures::FutureExt::catch_unwind(outcome).await {
            let start = run.log.len().saturating_sub(40);
            eprintln!(
                "quota model diverged at step {step} (seed {seed}; replay with SLUICE_QUOTA_SEED={seed}). Last steps:\n{}",
                run.log[start..].join("\n")
            );
            std::panic::resume_unwind(panic);
        }
    }
    // Charge ids are otherwise kept for weeks.
    common::drop_keys(&[format!("{{{prefix}:*")]).await;
}
