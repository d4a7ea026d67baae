//! The embedded store's quota counters: in process, behind one lock, each key a
//! [`KeyLedger`], the pure contract the Redis scripts mirror.
//!
//! They live in memory: a restart starts the minute and day windows afresh and forgets
//! reservations in flight. Month spend is rebuilt by the gateway from the usage events.

use parking_lot::Mutex;
use sluice_policies::ledger::{Admit, Charge, KeyLedger, Refresh, Settle};
use sluice_policies::quota::{Counters, Decision};
use std::collections::HashMap;

#[derive(Default)]
pub struct MemoryQuotas {
    keys: Mutex<HashMap<String, KeyLedger>>,
}

impl MemoryQuotas {
    fn with<T>(&self, key_id: &str, f: impl FnOnce(&mut KeyLedger) -> T) -> T {
        let mut keys = self.keys.lock();
        match keys.get_mut(key_id) {
            Some(ledger) => f(ledger),
            None => f(keys.entry(key_id.to_owned()).or_default()),
        }
    }

    pub fn admit(&self, key_id: &str, a: &Admit) -> Decision {
        self.with(key_id, |l| l.admit(a))
    }

    pub fn settle(&self, key_id: &str, s: &Settle) {
        self.with(key_id, |l| l.settle(s));
    }

    pub fn refresh(&self, key_id: &str, f: &Refresh) {
        self.with(key_id, |l| l.refresh(f));
    }

    pub fn charge(&self, key_id: &str, c: &Charge) -> bool {
        self.with(key_id, |l| l.charge(c))
    }

    pub fn counters(&self, key_id: &str, now_sec: i64, month: &str) -> Counters {
        let keys = self.keys.lock();
        keys.get(key_id)
            .map(|l| l.counters(now_sec, month))
            .unwrap_or_default()
    }

    pub fn reset(&self, key_id: &str) {
        if let Some(ledger) = self.keys.lock().get_mut(key_id) {
            ledger.reset();
        }
    }

    /// Adds spend already recorded elsewhere (usage events at start-up).
    pub fn add_month_spend(&self, key_id: &str, month: &str, nano: i64) {
        self.with(key_id, |l| l.add_month_spend(month, nano));
    }
}
