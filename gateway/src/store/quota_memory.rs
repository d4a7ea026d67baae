//! The embedded store's quota counters: in process, behind one lock, each ledger (a key's or
//! a tenant's) a [`KeyLedger`], the pure contract the Redis scripts mirror.
//!
//! They live in memory: a restart starts the minute and day windows afresh and forgets
//! reservations in flight. Month spend is rebuilt by the gateway from the usage events.

use parking_lot::Mutex;
use sluice_policies::ledger::{self, Admit, Charge, KeyLedger, Refresh, Settle, Verdict};
use sluice_policies::quota::Counters;
use std::collections::HashMap;

#[derive(Default)]
pub struct MemoryQuotas {
    ledgers: Mutex<HashMap<String, KeyLedger>>,
}

impl MemoryQuotas {
    fn with<T>(&self, ledger: &str, f: impl FnOnce(&mut KeyLedger) -> T) -> T {
        let mut ledgers = self.ledgers.lock();
        match ledgers.get_mut(ledger) {
            Some(l) => f(l),
            None => f(ledgers.entry(ledger.to_owned()).or_default()),
        }
    }

    /// Admits into every scope's ledger under the one lock: atomic, as the Redis script is.
    pub fn admit(&self, a: &Admit) -> Verdict {
        let mut ledgers = self.ledgers.lock();
        // Taken out for the decision (so that several can be borrowed at once) and put back.
        let mut taken: Vec<(String, KeyLedger)> = a
            .scopes
            .iter()
            .map(|s| {
                ledgers
                    .remove_entry(s.ledger)
                    .unwrap_or_else(|| (s.ledger.to_owned(), KeyLedger::default()))
            })
            .collect();
        let verdict = {
            let mut borrowed: Vec<&mut KeyLedger> = taken.iter_mut().map(|(_, l)| l).collect();
            ledger::admit_together(&mut borrowed, a)
        };
        ledgers.extend(taken);
        verdict
    }

    pub fn settle(&self, ledgers: &[String], s: &Settle) {
        for ledger in ledgers {
            self.with(ledger, |l| l.settle(s));
        }
    }

    pub fn refresh(&self, ledgers: &[String], f: &Refresh) {
        for ledger in ledgers {
            self.with(ledger, |l| l.refresh(f));
        }
    }

    /// Whether the charge counted in the first ledger (each remembers its charge ids).
    pub fn charge(&self, ledgers: &[String], c: &Charge) -> bool {
        let mut counted = Vec::with_capacity(ledgers.len());
        for ledger in ledgers {
            counted.push(self.with(ledger, |l| l.charge(c)));
        }
        counted.first().copied().unwrap_or(false)
    }

    pub fn counters(&self, ledger: &str, now_sec: i64, month: &str) -> Counters {
        let ledgers = self.ledgers.lock();
        ledgers
            .get(ledger)
            .map(|l| l.counters(now_sec, month))
            .unwrap_or_default()
    }

    pub fn reset(&self, ledger: &str) {
        if let Some(l) = self.ledgers.lock().get_mut(ledger) {
            l.reset();
        }
    }

    /// Adds spend already recorded elsewhere (usage events at start-up).
    pub fn add_month_spend(&self, ledger: &str, month: &str, nano: i64) {
        self.with(ledger, |l| l.add_month_spend(month, nano));
    }
}
