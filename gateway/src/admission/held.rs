//! What does this replica still owe the store? The reservations it holds open (whose
//! concurrency slots it renews while their requests run, so a stream longer than a slot's
//! lifetime keeps its slot) and the usage it admitted while the store was unreachable
//! (charged once the store answers again, each exactly once by its reservation id).
//!
//! Owed charges live in memory: a replica restarted during an outage forgets them (its usage
//! events, journaled on disk, still reach billing; only the quota counters miss them).

use crate::auth::Ledgers;
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
    /// The ledgers it counts in (the key's and its tenant's).
    pub ledgers: Ledgers,
    pub id: String,
    pub at_sec: i64,
    pub month: Arc<str>,
    pub amount: Reservation,
}

/// Owed charges kept at most; past this the oldest are dropped (and logged), so an outage
/// of days cannot exhaust memory.
const MAX_OWED: usize = 1_000_000;

#[derive(Default)]
pub struct Held {
    /// reservation id -> (its ledgers, slots)
    running: Mutex<HashMap<String, (Ledgers, u64)>>,
    owed: Mutex<Owed>,
}

/// Charges owed, oldest first. A key's (its ledgers') charges of one minute (and month) are summed into one
/// (under the first one's id, which keeps it counted once), so an outage costs memory per
/// busy key and minute, not per request; minute windows see the sum at that minute's first
/// second, which is long past by the time it is charged.
#[derive(Default)]
struct Owed {
    queue: VecDeque<OwedCharge>,
    /// The sequence number of `queue`'s front; each charge's is its place after it.
    front_seq: u64,
    /// (ledgers, minute, month) -> the sequence number of the charge still taking that
    /// minute's usage.
    open: HashMap<(Ledgers, i64, Arc<str>), u64>,
    /// The charge being sent to the store: nothing more is added to it, since a send that
    /// failed after the store counted it will be retried under the same id and ignored.
    sending: Option<u64>,
}

impl Owed {
    fn push(&mut self, charge: OwedCharge) {
        let bucket = (
            charge.ledgers.clone(),
            charge.at_sec.div_euclid(60),
            charge.month.clone(),
        );
        if let Some(&seq) = self.open.get(&bucket) {
            let open = seq
                .checked_sub(self.front_seq)
                .filter(|_| self.sending != Some(seq))
                .and_then(|i| self.queue.get_mut(i as usize));
            if let Some(open) = open {
                open.amount.requests += charge.amount.requests;
                open.amount.tokens += charge.amount.tokens;
                open.amount.cost_nano = open
                    .amount
                    .cost_nano
                    .saturating_add(charge.amount.cost_nano);
                return;
            }
        }
        if self.queue.len() >= MAX_OWED {
            let dropped = self.pop_front();
            tracing::error!(charge = ?dropped, "too many quota charges owed; dropping the oldest");
        }
        self.open
            .insert(bucket, self.front_seq + self.queue.len() as u64);
        self.queue.push_back(charge);
    }

    fn pop_front(&mut self) -> Option<OwedCharge> {
        let charge = self.queue.pop_front()?;
        let seq = self.front_seq;
        self.front_seq += 1;
        let bucket = (
            charge.ledgers.clone(),
            charge.at_sec.div_euclid(60),
            charge.month.clone(),
        );
        if self.open.get(&bucket) == Some(&seq) {
            self.open.remove(&bucket);
        }
        if self.sending == Some(seq) {
            self.sending = None;
        }
        Some(charge)
    }
}

impl Held {
    /// A reservation with `slots` concurrency slots is running.
    pub fn hold(&self, ledgers: &Ledgers, reservation_id: &str, slots: u64) {
        self.running
            .lock()
            .insert(reservation_id.to_owned(), (ledgers.clone(), slots));
    }

    /// It ended (settled, or its lease given back).
    pub fn release(&self, reservation_id: &str) {
        self.running.lock().remove(reservation_id);
    }

    pub fn owe(&self, charge: OwedCharge) {
        self.owed.lock().push(charge);
    }

    /// How many charges wait for the store.
    pub fn owed(&self) -> usize {
        self.owed.lock().queue.len()
    }

    /// Renews every running reservation's slots at `now_sec`.
    pub async fn refresh_all(&self, store: &dyn Store, now_sec: i64, slot_ttl_secs: i64) {
        let running: Vec<(String, Ledgers, u64)> = self
            .running
            .lock()
            .iter()
            .map(|(id, (ledgers, slots))| (id.clone(), ledgers.clone(), *slots))
            .collect();
        for (reservation_id, ledgers, slots) in running {
            let refresh = Refresh {
                reservation_id: &reservation_id,
                slots,
                now_sec,
                slot_ttl_secs,
            };
            if let Err(e) = store.refresh(&ledgers, &refresh).await {
                tracing::warn!(error = %e, "cannot renew concurrency slots");
                return;
            }
        }
    }

    /// Charges what is owed, in order, until the store fails; the rest waits.
    pub async fn charge_owed(&self, store: &dyn Store, now_sec: i64) {
        loop {
            let (seq, next) = {
                let mut owed = self.owed.lock();
                let Some(next) = owed.queue.front().cloned() else {
                    return;
                };
                let seq = owed.front_seq;
                owed.sending = Some(seq);
                (seq, next)
            };
            let charge = Charge {
                id: &next.id,
                at_sec: next.at_sec,
                month: &next.month,
                amount: next.amount,
                now_sec,
            };
            match store.charge(&next.ledgers, &charge).await {
                Ok(_) => {
                    let mut owed = self.owed.lock();
                    if owed.front_seq == seq {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EmbeddedStore;

    fn charge(key: &str, id: &str, at_sec: i64, tokens: u64) -> OwedCharge {
        OwedCharge {
            ledgers: crate::auth::quota_ledgers(key, "t"),
            id: id.into(),
            at_sec,
            month: "2026-12".into(),
            amount: Reservation {
                requests: 1,
                tokens,
                cost_nano: 5,
            },
        }
    }

    #[tokio::test]
    async fn a_keys_charges_of_one_minute_are_owed_as_one_and_counted_whole() {
        let held = Held::default();
        // The start of a minute.
        let now = 29_400_000 * 60;
        for i in 0..10_000 {
            held.owe(charge("busy", &format!("r{i}"), now + i % 60, 3));
        }
        held.owe(charge("busy", "next-minute", now + 60, 3));
        held.owe(charge("quiet", "q", now, 3));
        assert_eq!(held.owed(), 3, "one per key and minute");

        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        held.charge_owed(&store, now + 90).await;
        assert_eq!(held.owed(), 0);
        let busy = store
            .quota_counters("busy", now + 90, "2026-12")
            .await
            .unwrap();
        assert_eq!((busy.day_requests, busy.day_tokens), (10_001, 30_003));
        assert_eq!(busy.month_spend_nano, 50_005);
        // Counted in their tenant's ledger too: both keys'.
        let tenant = store
            .quota_counters("tenant:t", now + 90, "2026-12")
            .await
            .unwrap();
        assert_eq!(tenant.day_requests, 10_002);
        // Charged again (a retry after a reply was lost): counted once.
        held.owe(charge("busy", "r0", now, 3));
        held.charge_owed(&store, now + 91).await;
        let again = store
            .quota_counters("busy", now + 91, "2026-12")
            .await
            .unwrap();
        assert_eq!(again.day_requests, 10_001);
    }

    #[test]
    fn a_charge_being_sent_takes_no_more() {
        let held = Held::default();
        held.owe(charge("k", "first", 600, 1));
        held.owed.lock().sending = Some(0);
        held.owe(charge("k", "second", 601, 1));
        held.owe(charge("k", "third", 602, 1));
        let owed = held.owed.lock();
        let amounts: Vec<u64> = owed.queue.iter().map(|c| c.amount.requests).collect();
        assert_eq!(
            amounts,
            [1, 2],
            "the one being sent is sealed; later ones sum apart"
        );
    }
}
