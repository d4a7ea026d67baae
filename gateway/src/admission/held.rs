//! What does this replica still owe the store? The reservations it holds open (whose
//! concurrency slots it renews while their requests run, so a stream longer than a slot's
//! lifetime keeps its slot) and the usage it admitted while the store was unreachable
//! (charged once the store answers again, each exactly once by its reservation id).
//!
//! Owed charges live in memory: a replica restarted during an outage forgets them (its usage
//! events, journaled on disk, still reach billing; only the quota counters miss them).

use crate::clock::Clock;
use crate::store::Store;
use parking_lot::Mutex;
use sluice_policies::ledger::{Charge, Refresh};
use sluice_policies::quota::Reservation;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Usage admitted without the store, waiting to be counted.
#[derive(Debug, Clone)]
pub struct OwedCharge {
    pub key_id: String,
    pub id: String,
    pub at_sec: i64,
    pub month: String,
    pub amount: Reservation,
}

/// Owed charges kept at most; past this the oldest are dropped (and logged), so an outage
/// of days cannot exhaust memory.
const MAX_OWED: usize = 1_000_000;

#[derive(Default)]
pub struct Held {
    /// reservation id -> (key id, slots)
    running: Mutex<HashMap<String, (Arc<str>, u64)>>,
    owed: Mutex<VecDeque<OwedCharge>>,
}

impl Held {
    /// A reservation with `slots` concurrency slots is running.
    pub fn hold(&self, key_id: &str, reservation_id: &str, slots: u64) {
        self.running
            .lock()
            .insert(reservation_id.to_owned(), (Arc::from(key_id), slots));
    }

    /// It ended (settled, or its lease given back).
    pub fn release(&self, reservation_id: &str) {
        self.running.lock().remove(reservation_id);
    }

    pub fn owe(&self, charge: OwedCharge) {
        let mut owed = self.owed.lock();
        if owed.len() >= MAX_OWED {
            let dropped = owed.pop_front();
            tracing::error!(charge = ?dropped, "too many quota charges owed; dropping the oldest");
        }
        owed.push_back(charge);
    }

    /// How many charges wait for the store.
    pub fn owed(&self) -> usize {
        self.owed.lock().len()
    }

    /// Renews every running reservation's slots at `now_sec`.
    pub async fn refresh_all(&self, store: &dyn Store, now_sec: i64, slot_ttl_secs: i64) {
        let running: Vec<(String, Arc<str>, u64)> = self
            .running
            .lock()
            .iter()
            .map(|(id, (key, slots))| (id.clone(), key.clone(), *slots))
            .collect();
        for (reservation_id, key_id, slots) in running {
            let refresh = Refresh {
                reservation_id: &reservation_id,
                slots,
                now_sec,
                slot_ttl_secs,
            };
            if let Err(e) = store.refresh(&key_id, &refresh).await {
                tracing::warn!(error = %e, "cannot renew concurrency slots");
                return;
            }
        }
    }

    /// Charges what is owed, in order, until the store fails; the rest waits.
    pub async fn charge_owed(&self, store: &dyn Store, now_sec: i64) {
        loop {
            let Some(next) = self.owed.lock().front().cloned() else {
                return;
            };
            let charge = Charge {
                id: &next.id,
                at_sec: next.at_sec,
                month: &next.month,
                amount: next.amount,
                now_sec,
            };
            match store.charge(&next.key_id, &charge).await {
                Ok(_) => {
                    let mut owed = self.owed.lock();
                    if owed.front().is_some_and(|c| c.id == next.id) {
                        owed.pop_front();
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "owed quota charges deferred");
                    return;
                }
            }
        }
    }

    /// Renews slots every quarter of their lifetime and charges what is owed every second,
    /// until the process ends.
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>, clock: Clock, slot_ttl_secs: u64) {
        let renew_every = Duration::from_secs(slot_ttl_secs).div_f64(4.0);
        let mut tick = tokio::time::interval(Duration::from_secs(1).min(renew_every));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewed = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            let now = clock.now_sec();
            if renewed.elapsed() >= renew_every {
                renewed = tokio::time::Instant::now();
                self.refresh_all(store.as_ref(), now, slot_ttl_secs as i64)
                    .await;
            }
            self.charge_owed(store.as_ref(), now).await;
        }
    }
}
