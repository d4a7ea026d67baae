//! The embedded store's quota counters: in process, behind one lock, decided with the same
//! pure function (`sluice_policies::quota::decide`) the Redis script mirrors.
//!
//! They live in memory: a restart starts the minute and day windows afresh and forgets
//! reservations in flight. Month spend is rebuilt by the gateway from the usage events.

use sluice_policies::quota::{self, Bucket, Counters, Decision, Reservation, WINDOW_SECS};
use sluice_policies::Limits;
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
struct KeyQuota {
    minute: Vec<Bucket>,
    /// (UTC day number, requests, tokens)
    day: (i64, u64, u64),
    /// (month label, spend in nano-units)
    month: (String, i64),
    /// reservation id -> expiry (unix seconds)
    in_flight: HashMap<String, i64>,
}

impl KeyQuota {
    fn counters(&mut self, now_sec: i64, month: &str) -> Counters {
        self.minute.retain(|b| b.second > now_sec - WINDOW_SECS);
        self.in_flight.retain(|_, expiry| *expiry > now_sec);
        let today = now_sec.div_euclid(86_400);
        if self.day.0 != today {
            self.day = (today, 0, 0);
        }
        if self.month.0 != month {
            self.month = (month.to_owned(), 0);
        }
        Counters {
            minute: self.minute.clone(),
            day_requests: self.day.1,
            day_tokens: self.day.2,
            in_flight: self.in_flight.len() as u64,
            month_spend_nano: self.month.1,
        }
    }

    fn bucket(&mut self, second: i64) -> &mut Bucket {
        if let Some(i) = self.minute.iter().position(|b| b.second == second) {
            return &mut self.minute[i];
        }
        self.minute.push(Bucket {
            second,
            requests: 0,
            tokens: 0,
        });
        self.minute.last_mut().expect("just pushed")
    }
}

/// Where a quota decision happens, for the store that owns the counters.
pub struct AdmitArgs<'a> {
    pub key_id: &'a str,
    pub limits: &'a Limits,
    pub reservation: &'a Reservation,
    pub reservation_id: &'a str,
    pub now_sec: i64,
    /// `YYYY-MM` of `now_sec`, and the seconds left in that month.
    pub month: &'a str,
    pub secs_to_month_end: u64,
    /// How long an unsettled reservation holds its concurrency slot.
    pub in_flight_ttl_secs: i64,
}

/// What a settled request (or lease) really used, against what it reserved at
/// `admitted_sec`. Its concurrency slots are `reservation_id:1` to `reservation_id:N`, N being
/// `reserved.requests`.
pub struct SettleArgs<'a> {
    pub key_id: &'a str,
    pub reservation_id: &'a str,
    pub admitted_sec: i64,
    pub month: &'a str,
    pub reserved: Reservation,
    pub actual: Reservation,
}

#[derive(Default)]
pub struct MemoryQuotas {
    keys: Mutex<HashMap<String, KeyQuota>>,
}

impl MemoryQuotas {
    pub fn admit(&self, a: &AdmitArgs) -> Decision {
        let mut keys = self.keys.lock().expect("quota lock");
        let q = keys.entry(a.key_id.to_owned()).or_default();
        let counters = q.counters(a.now_sec, a.month);
        let decision = quota::decide(
            a.limits,
            &counters,
            a.reservation,
            a.now_sec,
            a.secs_to_month_end,
        );
        if decision.refused.is_none() {
            let b = q.bucket(a.now_sec);
            b.requests += 1;
            b.tokens += a.reservation.tokens;
            q.day.1 += 1;
            q.day.2 += a.reservation.tokens;
            q.month.1 = q.month.1.saturating_add(a.reservation.cost_nano);
            q.in_flight.insert(
                a.reservation_id.to_owned(),
                a.now_sec + a.in_flight_ttl_secs,
            );
        }
        decision
    }

    pub fn settle(&self, s: &SettleArgs) {
        let mut keys = self.keys.lock().expect("quota lock");
        let q = keys.entry(s.key_id.to_owned()).or_default();
        for slot in 1..=s.reserved.requests {
            q.in_flight.remove(&format!("{}:{slot}", s.reservation_id));
        }
        let adjust = |v: u64, actual: u64, reserved: u64| {
            (v as i128 + actual as i128 - reserved as i128).max(0) as u64
        };
        let (a, r) = (s.actual, s.reserved);
        if let Some(b) = q.minute.iter_mut().find(|b| b.second == s.admitted_sec) {
            b.tokens = adjust(b.tokens, a.tokens, r.tokens);
            b.requests = adjust(b.requests, a.requests, r.requests);
        }
        if q.day.0 == s.admitted_sec.div_euclid(86_400) {
            q.day.1 = adjust(q.day.1, a.requests, r.requests);
            q.day.2 = adjust(q.day.2, a.tokens, r.tokens);
        }
        if q.month.0 == s.month {
            q.month.1 = (q.month.1 + s.actual.cost_nano - s.reserved.cost_nano).max(0);
        }
    }

    pub fn counters(&self, key_id: &str, now_sec: i64, month: &str) -> Counters {
        let mut keys = self.keys.lock().expect("quota lock");
        keys.entry(key_id.to_owned())
            .or_default()
            .counters(now_sec, month)
    }

    pub fn reset(&self, key_id: &str) {
        self.keys.lock().expect("quota lock").remove(key_id);
    }

    /// Adds spend already recorded elsewhere (usage events at start-up).
    pub fn add_month_spend(&self, key_id: &str, month: &str, nano: i64) {
        let mut keys = self.keys.lock().expect("quota lock");
        let q = keys.entry(key_id.to_owned()).or_default();
        if q.month.0 != month {
            q.month = (month.to_owned(), 0);
        }
        q.month.1 = q.month.1.saturating_add(nano);
    }
}
