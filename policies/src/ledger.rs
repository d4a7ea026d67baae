//! What does a store do with one key's quota counters? The admission contract, written once
//! as a pure state machine: the embedded store runs it as it is, the Redis scripts mirror it
//! operation by operation, and a model-based test (`gateway/tests/quota_model.rs`) drives
//! random sequences through all three and asserts identical decisions and state.
//!
//! Operations, each atomic in a store:
//! - [`KeyLedger::admit`]: decide ([`quota::decide`]) and, if admitted, count the
//!   reservation: `requests` requests and `tokens` tokens in the current second's bucket and
//!   the day, `cost_nano` in the month, and `requests` concurrency slots named
//!   `{reservation_id}:1` .. `{reservation_id}:{requests}`, each expiring `slot_ttl_secs`
//!   later. A lease of k requests is one admission with `requests = k`.
//! - [`KeyLedger::settle`]: free the reservation's slots and replace what it counted with
//!   what it used (a lease gives back what it did not use).
//! - [`KeyLedger::refresh`]: push the slots of a reservation still running out to a new
//!   expiry, so a long stream keeps its slot.
//! - [`KeyLedger::charge`]: count usage that was never admitted through the store (admitted
//!   while the store was unreachable), once per charge id however often it is sent.
//! - [`KeyLedger::counters`]: read, without changing anything.
//!
//! A request counts against several ledgers at once (its key's and its tenant's, see
//! [`Scope`]): [`admit_together`] decides on each and counts in all of them or none, and
//! the other operations are applied to each ledger the reservation was counted in.
//!
//! Expired slots and minute buckets are dropped by the operations that add to them; reads
//! filter them out. Days and months are calendar windows in UTC, named by their day number
//! and `YYYY-MM` label; a store keeps only the current one of each observable.

use crate::limits::Limits;
use crate::quota::{self, Bucket, Counters, Decision, Reservation, WINDOW_SECS};
use std::collections::HashMap;

/// How long a charge id is remembered: longer than any month, so a charge replayed late in
/// the month it belongs to is still counted once.
pub const CHARGE_MEMORY_SECS: i64 = 40 * 86_400;

/// One ledger an admission counts against, and the limits it is checked against there.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// The ledger's id: a key id, or a tenant's ledger (`tenant:{id}`).
    pub ledger: &'a str,
    pub limits: &'a Limits,
}

/// An admission request, into every ledger of `scopes` together.
#[derive(Debug, Clone, Copy)]
pub struct Admit<'a> {
    pub scopes: &'a [Scope<'a>],
    pub reservation: &'a Reservation,
    pub reservation_id: &'a str,
    pub now_sec: i64,
    /// `YYYY-MM` of `now_sec`, and the seconds left in that month.
    pub month: &'a str,
    pub secs_to_month_end: u64,
    /// How long a slot is held unless refreshed or settled.
    pub slot_ttl_secs: i64,
}

/// A settlement: what a request (or lease) admitted at `admitted_sec` reserved, and what it
/// used.
#[derive(Debug, Clone, Copy)]
pub struct Settle<'a> {
    pub reservation_id: &'a str,
    pub admitted_sec: i64,
    pub month: &'a str,
    pub reserved: Reservation,
    pub actual: Reservation,
}

/// Renewing the slots of a reservation that is still running.
#[derive(Debug, Clone, Copy)]
pub struct Refresh<'a> {
    pub reservation_id: &'a str,
    /// Its slot count (`reservation.requests`).
    pub slots: u64,
    pub now_sec: i64,
    pub slot_ttl_secs: i64,
}

/// Usage counted after the fact: a request admitted while the store was unreachable.
#[derive(Debug, Clone, Copy)]
pub struct Charge<'a> {
    /// Unique per charge: a second delivery of the same id changes nothing.
    pub id: &'a str,
    /// When the request was admitted, and the month it belongs to.
    pub at_sec: i64,
    pub month: &'a str,
    pub amount: Reservation,
    pub now_sec: i64,
}

/// One key's quota counters.
#[derive(Debug, Clone, Default)]
pub struct KeyLedger {
    minute: Vec<Bucket>,
    /// (UTC day number, requests, tokens)
    day: (i64, u64, u64),
    /// (month label, spend in nano-units)
    month: (String, i64),
    /// reservation id -> the expiry (unix seconds) of each of its slots, the `i`-th at
    /// `i - 1`; a freed slot's is [`FREED`]. Kept per reservation rather than per slot name
    /// (what the Redis scripts keep): a lease of 256 requests is one entry, not 256 names
    /// formatted and hashed at its admission and again at its settlement.
    slots: HashMap<String, Vec<i64>>,
    /// charge id -> when it was charged for (unix seconds)
    charged: HashMap<String, i64>,
}

/// The ledger of `ledger`'s limits for one model alone (a key's or a tenant's).
pub fn model_ledger(ledger: &str, model: &str) -> String {
    format!("{ledger}/model:{model}")
}

/// The expiry of a slot that was freed: never live.
const FREED: i64 = i64::MIN;

/// The outcome of an admission into several ledgers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The scope (its place in `Admit::scopes`) whose limit refused, if one did: the first,
    /// in order, that would be passed.
    pub refused_by: Option<usize>,
    /// The refusing scope's decision; when admitted, the headers of the scope with the
    /// least room left (see [`tightest`]).
    pub decision: Decision,
}

/// Admits into every ledger of `a.scopes` (`ledgers[i]` is scope i's) as one: each decides
/// against its own limits, and the reservation is counted in all of them or in none.
pub fn admit_together(ledgers: &mut [&mut KeyLedger], a: &Admit) -> Verdict {
    assert_eq!(ledgers.len(), a.scopes.len(), "one ledger per scope");
    let decisions: Vec<Decision> = ledgers
        .iter_mut()
        .zip(a.scopes)
        .map(|(ledger, scope)| ledger.decide(scope.limits, a))
        .collect();
    let verdict = verdict(decisions);
    if verdict.refused_by.is_none() {
        for ledger in ledgers.iter_mut() {
            ledger.count(a);
        }
    }
    verdict
}

/// Each scope's decision, taken at one instant, as one verdict.
pub fn verdict(decisions: Vec<Decision>) -> Verdict {
    match decisions.iter().position(|d| d.refused.is_some()) {
        Some(i) => Verdict {
            refused_by: Some(i),
            decision: decisions.into_iter().nth(i).expect("found"),
        },
        None => Verdict {
            refused_by: None,
            decision: Decision {
                refused: None,
                headers: tightest(decisions.iter().map(|d| &d.headers)),
            },
        },
    }
}

/// What OpenAI's `x-ratelimit-*` headers report for several scopes at once: for requests
/// and for tokens apart, the limit with the least room left after this request (a client
/// pacing itself by them then passes none).
pub fn tightest<'a>(all: impl Iterator<Item = &'a quota::RateHeaders>) -> quota::RateHeaders {
    let mut out = quota::RateHeaders::default();
    for h in all {
        if h.remaining_requests.is_some()
            && (out.remaining_requests.is_none() || h.remaining_requests < out.remaining_requests)
        {
            out.limit_requests = h.limit_requests;
            out.remaining_requests = h.remaining_requests;
            out.reset_requests_secs = h.reset_requests_secs;
        }
        if h.remaining_tokens.is_some()
            && (out.remaining_tokens.is_none() || h.remaining_tokens < out.remaining_tokens)
        {
            out.limit_tokens = h.limit_tokens;
            out.remaining_tokens = h.remaining_tokens;
            out.reset_tokens_secs = h.reset_tokens_secs;
        }
    }
    out
}

fn day_of(sec: i64) -> i64 {
    sec.div_euclid(86_400)
}

fn adjust(value: u64, actual: u64, reserved: u64) -> u64 {
    (value as i128 + actual as i128 - reserved as i128).max(0) as u64
}

impl KeyLedger {
    /// The counters at `now_sec`, for the month labelled `month`.
    pub fn counters(&self, now_sec: i64, month: &str) -> Counters {
        let live_slots = self
            .slots
            .values()
            .flatten()
            .filter(|&&expiry| expiry > now_sec);
        let today = self.day.0 == day_of(now_sec);
        Counters {
            minute: self
                .minute
                .iter()
                .filter(|b| b.second > now_sec - WINDOW_SECS)
                .copied()
                .collect(),
            day_requests: if today { self.day.1 } else { 0 },
            day_tokens: if today { self.day.2 } else { 0 },
            in_flight: live_slots.clone().count() as u64,
            next_slot_expiry: live_slots.copied().min(),
            month_spend_nano: if self.month.0 == month {
                self.month.1
            } else {
                0
            },
        }
    }

    /// Admits into this ledger alone, checked against `limits`.
    pub fn admit(&mut self, limits: &Limits, a: &Admit) -> Decision {
        let decision = self.decide(limits, a);
        if decision.refused.is_none() {
            self.count(a);
        }
        decision
    }

    /// Drops what has expired, then decides at `a.now_sec` without counting. A day or month
    /// starts only when something counts in it (as the store's keys for it come to exist
    /// only then): a settlement of a reservation made before a reset finds nothing of its
    /// day or month to change until a new admission or charge has counted there.
    fn decide(&mut self, limits: &Limits, a: &Admit) -> Decision {
        self.minute.retain(|b| b.second > a.now_sec - WINDOW_SECS);
        self.drop_expired_slots(a.now_sec);
        let counters = self.counters(a.now_sec, a.month);
        quota::decide(
            limits,
            &counters,
            a.reservation,
            a.now_sec,
            a.secs_to_month_end,
        )
    }

    fn count(&mut self, a: &Admit) {
        self.roll_day(day_of(a.now_sec));
        self.roll_month(a.month);
        let r = a.reservation;
        let bucket = self.bucket(a.now_sec);
        bucket.requests += r.requests;
        bucket.tokens += r.tokens;
        self.day.1 += r.requests;
        self.day.2 += r.tokens;
        self.month.1 = self.month.1.saturating_add(r.cost_nano);
        if r.requests > 0 {
            let expiries = match self.slots.get_mut(a.reservation_id) {
                Some(expiries) => expiries,
                None => self.slots.entry(a.reservation_id.to_owned()).or_default(),
            };
            let n = r.requests as usize;
            if expiries.len() < n {
                expiries.resize(n, FREED);
            }
            expiries[..n].fill(a.now_sec + a.slot_ttl_secs);
        }
    }

    pub fn settle(&mut self, s: &Settle) {
        if let Some(expiries) = self.slots.get_mut(s.reservation_id) {
            let n = (s.reserved.requests as usize).min(expiries.len());
            expiries[..n].fill(FREED);
            if expiries.iter().all(|&expiry| expiry == FREED) {
                self.slots.remove(s.reservation_id);
            }
        }
        let (a, r) = (s.actual, s.reserved);
        if let Some(b) = self.minute.iter_mut().find(|b| b.second == s.admitted_sec) {
            b.requests = adjust(b.requests, a.requests, r.requests);
            b.tokens = adjust(b.tokens, a.tokens, r.tokens);
        }
        if self.day.0 == day_of(s.admitted_sec) {
            self.day.1 = adjust(self.day.1, a.requests, r.requests);
            self.day.2 = adjust(self.day.2, a.tokens, r.tokens);
        }
        if self.month.0 == s.month {
            self.month.1 = (self.month.1 + a.cost_nano - r.cost_nano).max(0);
        }
    }

    pub fn refresh(&mut self, f: &Refresh) {
        self.drop_expired_slots(f.now_sec);
        if let Some(expiries) = self.slots.get_mut(f.reservation_id) {
            let n = (f.slots as usize).min(expiries.len());
            for expiry in expiries[..n].iter_mut().filter(|e| **e > f.now_sec) {
                *expiry = f.now_sec + f.slot_ttl_secs;
            }
        }
    }

    /// Returns whether the charge was new (and so counted).
    pub fn charge(&mut self, c: &Charge) -> bool {
        self.charged
            .retain(|_, at| *at > c.now_sec - CHARGE_MEMORY_SECS);
        if self.charged.contains_key(c.id) {
            return false;
        }
        self.charged.insert(c.id.to_owned(), c.at_sec);
        let amount = c.amount;
        if c.at_sec > c.now_sec - WINDOW_SECS {
            let bucket = self.bucket(c.at_sec);
            bucket.requests += amount.requests;
            bucket.tokens += amount.tokens;
        }
        let day = day_of(c.at_sec);
        if day >= self.day.0 {
            self.roll_day(day);
            self.day.1 += amount.requests;
            self.day.2 += amount.tokens;
        }
        if c.month >= self.month.0.as_str() {
            self.roll_month(c.month);
            self.month.1 = self.month.1.saturating_add(amount.cost_nano);
        }
        true
    }

    /// Forgets the key's windows, slots and spend (an operator's reset). Charges already
    /// counted stay remembered, so a late duplicate is still not counted.
    pub fn reset(&mut self) {
        *self = KeyLedger {
            charged: std::mem::take(&mut self.charged),
            ..KeyLedger::default()
        };
    }

    /// Adds spend already recorded elsewhere (usage events at start-up).
    pub fn add_month_spend(&mut self, month: &str, nano: i64) {
        self.roll_month(month);
        self.month.1 = self.month.1.saturating_add(nano);
    }

    /// Frees the slots that expired by `now_sec`, and forgets reservations left with none.
    fn drop_expired_slots(&mut self, now_sec: i64) {
        self.slots.retain(|_, expiries| {
            let mut live = false;
            for expiry in expiries.iter_mut() {
                if *expiry > now_sec {
                    live = true;
                } else {
                    *expiry = FREED;
                }
            }
            live
        });
    }

    fn roll_day(&mut self, day: i64) {
        if self.day.0 != day {
            self.day = (day, 0, 0);
        }
    }

    fn roll_month(&mut self, month: &str) {
        if self.month.0 != month {
            self.month = (month.to_owned(), 0);
        }
    }

    fn bucket(&mut self, second: i64) -> &mut Bucket {
        match self.minute.iter().position(|b| b.second == second) {
            Some(i) => &mut self.minute[i],
            None => {
                self.minute.push(Bucket {
                    second,
                    requests: 0,
                    tokens: 0,
                });
                self.minute.last_mut().expect("just pushed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::LimitKind;

    fn admit<'a>(r: &'a Reservation, id: &'a str, now: i64) -> Admit<'a> {
        Admit {
            scopes: &[],
            reservation: r,
            reservation_id: id,
            now_sec: now,
            month: "2026-12",
            secs_to_month_end: 1000,
            slot_ttl_secs: 60,
        }
    }

    fn one() -> Reservation {
        Reservation {
            requests: 1,
            tokens: 10,
            cost_nano: 5,
        }
    }

    #[test]
    fn a_settled_request_frees_its_slot() {
        let limits = Limits {
            max_concurrent: Some(1),
            ..Limits::default()
        };
        let mut ledger = KeyLedger::default();
        for n in 0..10 {
            let id = format!("r{n}");
            let r = one();
            let d = ledger.admit(&limits, &admit(&r, &id, 100 + n));
            assert_eq!(d.refused, None, "request {n}");
            ledger.settle(&Settle {
                reservation_id: &id,
                admitted_sec: 100 + n,
                month: "2026-12",
                reserved: r,
                actual: r,
            });
        }
        assert_eq!(ledger.counters(200, "2026-12").in_flight, 0);
    }

    #[test]
    fn a_lease_counts_as_its_size() {
        let limits = Limits {
            requests_per_day: Some(20),
            max_concurrent: Some(20),
            ..Limits::default()
        };
        let mut ledger = KeyLedger::default();
        let lease = Reservation {
            requests: 16,
            tokens: 160,
            cost_nano: 80,
        };
        assert_eq!(
            ledger.admit(&limits, &admit(&lease, "L", 100)).refused,
            None
        );
        let c = ledger.counters(100, "2026-12");
        assert_eq!((c.day_requests, c.in_flight), (16, 16));
        let five = Reservation {
            requests: 5,
            ..lease
        };
        assert_eq!(
            ledger
                .admit(&limits, &admit(&five, "M", 100))
                .refused
                .map(|r| r.0),
            Some(LimitKind::Concurrent)
        );
        // The lease served 3 requests: it gives back 13 requests and their slots.
        ledger.settle(&Settle {
            reservation_id: "L",
            admitted_sec: 100,
            month: "2026-12",
            reserved: lease,
            actual: Reservation {
                requests: 3,
                tokens: 12,
                cost_nano: 9,
            },
        });
        let c = ledger.counters(101, "2026-12");
        assert_eq!((c.day_requests, c.day_tokens, c.in_flight), (3, 12, 0));
        assert_eq!(c.month_spend_nano, 9);
    }

    #[test]
    fn a_concurrency_refusal_says_when_the_soonest_slot_runs_out() {
        let limits = Limits {
            max_concurrent: Some(1),
            ..Limits::default()
        };
        let mut ledger = KeyLedger::default();
        let r = one();
        ledger.admit(&limits, &admit(&r, "a", 100));
        let d = ledger.admit(&limits, &admit(&r, "b", 130));
        assert_eq!(d.refused, Some((LimitKind::Concurrent, 30)));
        // Refreshed, it runs out later; expired, it no longer counts.
        ledger.refresh(&Refresh {
            reservation_id: "a",
            slots: 1,
            now_sec: 140,
            slot_ttl_secs: 60,
        });
        let d = ledger.admit(&limits, &admit(&r, "b", 150));
        assert_eq!(d.refused, Some((LimitKind::Concurrent, 50)));
        assert_eq!(ledger.admit(&limits, &admit(&r, "b", 200)).refused, None);
    }

    #[test]
    fn scopes_admit_together_or_not_at_all() {
        let key_limits = Limits {
            requests_per_minute: Some(10),
            ..Limits::default()
        };
        let tenant_limits = Limits {
            requests_per_minute: Some(3),
            ..Limits::default()
        };
        let (mut a, mut b, mut tenant) = (
            KeyLedger::default(),
            KeyLedger::default(),
            KeyLedger::default(),
        );
        let r = one();
        let mut admitted = Vec::new();
        for (n, key) in ["a", "b", "a", "b", "a"].into_iter().enumerate() {
            let (key_ledger, ledger_id): (&mut KeyLedger, _) = match key {
                "a" => (&mut a, "key-a"),
                _ => (&mut b, "key-b"),
            };
            let scopes = [
                Scope {
                    ledger: ledger_id,
                    limits: &key_limits,
                },
                Scope {
                    ledger: "tenant:t",
                    limits: &tenant_limits,
                },
            ];
            let id = format!("r{n}");
            let args = Admit {
                scopes: &scopes,
                ..admit(&r, &id, 100)
            };
            let verdict = admit_together(&mut [key_ledger, &mut tenant], &args);
            admitted.push(verdict.refused_by);
            if n == 1 {
                // The tenant's minute is the tighter: its room is what the headers say.
                assert_eq!(verdict.decision.headers.remaining_requests, Some(1));
                assert_eq!(verdict.decision.headers.limit_requests, Some(3));
            }
            if n == 3 {
                let (kind, retry) = verdict.decision.refused.unwrap();
                assert_eq!((kind, retry), (LimitKind::RequestsPerMinute, 60));
            }
        }
        assert_eq!(admitted, [None, None, None, Some(1), Some(1)]);
        // Refused by the tenant, counted in neither.
        let requests = |l: &KeyLedger| l.counters(100, "2026-12").day_requests;
        assert_eq!((requests(&a), requests(&b), requests(&tenant)), (2, 1, 3));
    }

    #[test]
    fn a_charge_counts_once() {
        let mut ledger = KeyLedger::default();
        let c = Charge {
            id: "e1",
            at_sec: 100,
            month: "2026-12",
            amount: one(),
            now_sec: 110,
        };
        assert!(ledger.charge(&c));
        assert!(!ledger.charge(&Charge { now_sec: 120, ..c }));
        let counters = ledger.counters(120, "2026-12");
        assert_eq!(counters.day_tokens, 10);
        assert_eq!(counters.month_spend_nano, 5);
        assert_eq!(counters.minute.iter().map(|b| b.requests).sum::<u64>(), 1);
        ledger.reset();
        assert!(!ledger.charge(&c), "a reset does not forget charges");
    }
}
