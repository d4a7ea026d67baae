//! Quota leases: a replica reserves a slice of a key's quota in one store step and admits
//! from it in memory, so a busy key costs a store round trip per slice, not per request.
//!
//! A lease is an ordinary reservation of `k` requests (with `k` times the triggering
//! request's tokens and cost, and `k` concurrency slots) taken when the key is busy on this
//! replica. Requests that fit in what is left of it are admitted without the store; their
//! settlements are kept in the lease; when the lease expires (or runs out) and its last
//! request has finished, one settlement gives back what it did not use.
//!
//! A lease is counted in every ledger the key's requests count in (the key's and its
//! tenant's), in the same store step, and given back to all of them.
//!
//! Because the store counts a lease in full when it is taken, leases never let the fleet
//! admit more than a limit. What they cost is the other way round: while a lease is held, up
//! to its unused part is unavailable to other replicas, at most `k` requests (and their
//! tokens and cost) per replica per key, for at most the lease's time plus its requests'
//! run time. `k` is kept to a quarter of every limit the lease counts against (requests,
//! tokens, concurrency, budget), so one replica never holds most of a key's quota.
//! `lease_max_requests = 0` turns leases off (every request is decided by the
//! store, exactly).

use super::held::Held;
use crate::auth::Ledgers;
use crate::store::Store;
use parking_lot::Mutex;
use sluice_policies::ledger::Settle;
use sluice_policies::quota::{RateHeaders, Reservation};
use sluice_policies::Limits;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A lease being taken or held for one key on this replica.
struct Lease {
    id: Arc<str>,
    /// The ledgers it was counted in, and is given back to.
    ledgers: Ledgers,
    admitted_sec: i64,
    month: Arc<str>,
    expires: Instant,
    granted: Reservation,
    /// Taken by requests: reservations, replaced by actual use as they settle.
    used: Reservation,
    in_flight: u64,
    headers: RateHeaders,
    /// The next lease was asked for while this one still admits (see [`REFILL_LEFT`]).
    refill_asked: bool,
}

/// A busy key's next lease is asked for in the background once its current one has this
/// share of its requests (or of its time) left, so that in steady traffic no request waits
/// for the store: without it, one request in every lease waited a store round trip, which
/// at a lease of 32 put that round trip into the p99. While the next lease is taken the
/// replica holds both: at most `1 + REFILL_LEFT` leases' worth of the key's quota.
pub const REFILL_LEFT: (u64, u64) = (1, 4);

impl Lease {
    fn fits(&self, r: &Reservation) -> bool {
        self.used.requests < self.granted.requests
            && self.in_flight < self.granted.requests
            && self.used.tokens + r.tokens <= self.granted.tokens
            && self.used.cost_nano + r.cost_nano <= self.granted.cost_nano
    }
}

#[derive(Default)]
struct KeyLeases {
    current: Option<Lease>,
    /// Expired or spent leases whose requests are still running.
    retiring: Vec<Lease>,
    /// Requests seen in the current second, to size a lease by the key's recent rate.
    second: (i64, u64),
    /// Requests seen in the second before.
    previous: u64,
    /// Set while a lease is being taken; requests meanwhile wait for it.
    taking: Option<Arc<tokio::sync::Notify>>,
}

/// A request admitted from a lease.
#[derive(Debug, Clone)]
pub struct LeasedAdmission {
    pub lease_id: Arc<str>,
    pub admitted_sec: i64,
    pub headers: RateHeaders,
    /// Take the key's next lease, of this many requests, in the background: the current
    /// one is nearly spent (the caller asks the store, then `install`s it, or `not_taken`).
    pub refill: Option<u64>,
}

pub struct Leases {
    max_requests: u64,
    ttl: Duration,
    keys: Mutex<HashMap<String, KeyLeases>>,
    /// Leases whose requests have all finished, waiting for the next give-back (see
    /// [`give_back`]).
    idle: Mutex<Vec<IdleLease>>,
    /// Told when the first lease of a give-back goes idle.
    idle_due: tokio::sync::Notify,
}

/// What to do when the current lease cannot serve a request.
#[derive(Debug)]
pub enum Miss {
    /// Take a new lease of this many requests (the caller asks the store, then `install`s).
    Take(u64),
    /// Another request is taking a lease: wait for it, then try again once.
    Wait(Arc<tokio::sync::Notify>),
    /// Decide this request alone with the store.
    Single,
}

impl Leases {
    pub fn new(max_requests: u64, ttl: Duration) -> Self {
        Leases {
            max_requests,
            ttl,
            keys: Mutex::new(HashMap::new()),
            idle: Mutex::new(Vec::new()),
            idle_due: tokio::sync::Notify::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_requests > 1
    }

    /// Admits from the key's current lease, or says how to go on. Returns leases to settle
    /// with the store (spent ones whose requests are all done).
    pub fn try_admit(
        &self,
        key_id: &str,
        limits: &[&Limits],
        r: &Reservation,
        now_sec: i64,
    ) -> Result<LeasedAdmission, Miss> {
        let mut keys = self.keys.lock();
        // Looked up before it is inserted: a busy key is nearly always there, and `entry`
        // would copy its id on every request.
        if !keys.contains_key(key_id) {
            keys.insert(key_id.to_owned(), KeyLeases::default());
        }
        let k = keys.get_mut(key_id).expect("inserted above");
        if k.second.0 == now_sec {
            k.second.1 += 1;
        } else {
            k.previous = if k.second.0 == now_sec - 1 {
                k.second.1
            } else {
                0
            };
            k.second = (now_sec, 1);
        }
        let now = Instant::now();
        if let Some(lease) = k.current.as_mut() {
            if lease.expires > now && lease.fits(r) {
                lease.used.requests += 1;
                lease.used.tokens += r.tokens;
                lease.used.cost_nano += r.cost_nano;
                lease.in_flight += 1;
                let spare = lease.granted.requests - lease.used.requests;
                let mut headers = lease.headers.clone();
                headers.remaining_requests = headers.remaining_requests.map(|v| v + spare);
                let (part, whole) = REFILL_LEFT;
                let nearly_spent = spare * whole <= lease.granted.requests * part
                    || (lease.expires - now) * whole as u32 <= self.ttl * part as u32;
                let mut admitted = LeasedAdmission {
                    lease_id: lease.id.clone(),
                    admitted_sec: lease.admitted_sec,
                    headers,
                    refill: None,
                };
                if nearly_spent && !lease.refill_asked && k.taking.is_none() {
                    lease.refill_asked = true;
                    let size = self.lease_size(k, limits, r);
                    if size > 1 {
                        k.taking = Some(Arc::new(tokio::sync::Notify::new()));
                        admitted.refill = Some(size);
                    }
                }
                return Ok(admitted);
            }
        }
        if let Some(taking) = &k.taking {
            return Err(Miss::Wait(taking.clone()));
        }
        let size = self.lease_size(k, limits, r);
        if k.second.1 + k.previous <= 1 || size <= 1 {
            return Err(Miss::Single);
        }
        k.taking = Some(Arc::new(tokio::sync::Notify::new()));
        Err(Miss::Take(size))
    }

    /// How many requests a lease for the key covers: twice the busier of this second and
    /// the last (so a lease lasts a while), and a small part of any limit it counts against,
    /// so that one replica never holds most of a key's quota.
    fn lease_size(&self, k: &KeyLeases, limits: &[&Limits], r: &Reservation) -> u64 {
        let mut size = (k.second.1.max(k.previous) * 2).min(self.max_requests);
        for limits in limits {
            size = size.min(quarter_of(limits, r));
        }
        size
    }

    /// Installs a lease the store granted, with the first request (`first`) already taken
    /// from it, or none when it was taken ahead (see [`REFILL_LEFT`]); the lease it
    /// replaces retires (its unused part is given back once its requests are done).
    #[allow(clippy::too_many_arguments)]
    pub fn install(
        &self,
        key_id: &str,
        ledgers: Ledgers,
        id: Arc<str>,
        admitted_sec: i64,
        month: Arc<str>,
        granted: Reservation,
        first: Option<Reservation>,
        headers: RateHeaders,
    ) {
        let mut keys = self.keys.lock();
        let k = keys.entry(key_id.to_owned()).or_default();
        if let Some(taking) = k.taking.take() {
            taking.notify_waiters();
        }
        let lease = Lease {
            id,
            ledgers,
            admitted_sec,
            month,
            expires: Instant::now() + self.ttl,
            granted,
            used: first.map_or(Reservation::default(), |first| Reservation {
                requests: 1,
                ..first
            }),
            in_flight: u64::from(first.is_some()),
            headers,
            refill_asked: false,
        };
        if let Some(old) = k.current.replace(lease) {
            k.retiring.push(old);
        }
        self.retire_idle(k);
    }

    /// Whether `taking` is still the lease being taken for the key (not installed or given
    /// up yet).
    pub fn is_taking(&self, key_id: &str, taking: &Arc<tokio::sync::Notify>) -> bool {
        let keys = self.keys.lock();
        keys.get(key_id)
            .and_then(|k| k.taking.as_ref())
            .is_some_and(|t| Arc::ptr_eq(t, taking))
    }

    /// The store refused a lease (or failed): let the next request try again.
    pub fn not_taken(&self, key_id: &str) {
        if let Some(k) = self.keys.lock().get_mut(key_id) {
            if let Some(taking) = k.taking.take() {
                taking.notify_waiters();
            }
        }
    }

    /// A leased request finished: its reservation is replaced by what it used. A retiring
    /// lease whose last request this was waits for the next give-back.
    pub fn settle(
        &self,
        key_id: &str,
        lease_id: &str,
        reserved: &Reservation,
        actual: &Reservation,
    ) {
        let mut keys = self.keys.lock();
        let Some(k) = keys.get_mut(key_id) else {
            return;
        };
        let lease = k
            .current
            .iter_mut()
            .chain(k.retiring.iter_mut())
            .find(|l| *l.id == *lease_id);
        if let Some(lease) = lease {
            lease.in_flight = lease.in_flight.saturating_sub(1);
            lease.used.tokens = (lease.used.tokens + actual.tokens).saturating_sub(reserved.tokens);
            lease.used.cost_nano =
                (lease.used.cost_nano + actual.cost_nano - reserved.cost_nano).max(0);
        }
        self.retire_idle(k);
    }

    /// Resolves once a lease has gone idle since the last [`Leases::sweep`] (at once if one
    /// has).
    pub async fn idle_due(&self) {
        self.idle_due.notified().await
    }

    /// Retires expired leases; returns every lease whose requests have all finished, to give
    /// back.
    pub fn sweep(&self) -> Vec<IdleLease> {
        let now = Instant::now();
        let mut keys = self.keys.lock();
        for k in keys.values_mut() {
            if k.current.as_ref().is_some_and(|l| l.expires <= now) {
                let old = k.current.take().expect("checked");
                k.retiring.push(old);
            }
            self.retire_idle(k);
        }
        keys.retain(|_, k| k.current.is_some() || !k.retiring.is_empty() || k.taking.is_some());
        drop(keys);
        std::mem::take(&mut *self.idle.lock())
    }

    /// Moves the key's retiring leases with no request running to the give-back queue.
    fn retire_idle(&self, k: &mut KeyLeases) {
        if k.retiring.iter().all(|l| l.in_flight > 0) {
            return;
        }
        let (idle, busy): (Vec<Lease>, Vec<Lease>) =
            k.retiring.drain(..).partition(|l| l.in_flight == 0);
        k.retiring = busy;
        let mut queue = self.idle.lock();
        if queue.is_empty() {
            self.idle_due.notify_one();
        }
        queue.extend(idle.into_iter().map(|l| IdleLease {
            ledgers: l.ledgers,
            id: l.id,
            admitted_sec: l.admitted_sec,
            month: l.month,
            granted: l.granted,
            used: l.used,
        }));
    }
}

/// A lease with no request running: what to give back to the store.
pub struct IdleLease {
    /// The ledgers the lease was counted in.
    pub ledgers: Ledgers,
    pub id: Arc<str>,
    pub admitted_sec: i64,
    pub month: Arc<str>,
    pub granted: Reservation,
    pub used: Reservation,
}

/// Gives idle leases back to the store (their unused requests, tokens, cost and slots), all
/// in one store call: a busy key retires a lease every few milliseconds, and giving each
/// back on its own doubled the store round trips leases cost. The admission task gives back
/// [`GIVE_BACK_GATHER`] after a lease goes idle, so a lease's slots are held that much
/// longer than its last request at most (plus the round trip).
pub const GIVE_BACK_GATHER: Duration = Duration::from_millis(10);

/// See [`GIVE_BACK_GATHER`].
pub async fn give_back(store: &dyn Store, held: &Held, idle: Vec<IdleLease>) {
    if idle.is_empty() {
        return;
    }
    let settlements: Vec<(&[String], Settle)> = idle
        .iter()
        .map(|lease| {
            (
                &*lease.ledgers,
                Settle {
                    reservation_id: &lease.id,
                    admitted_sec: lease.admitted_sec,
                    month: &lease.month,
                    reserved: lease.granted,
                    actual: lease.used,
                },
            )
        })
        .collect();
    for attempt in 0..5u32 {
        match store.settle_all(&settlements).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, attempt, leases = idle.len(), "lease give-back failed");
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
        }
    }
    for lease in &idle {
        held.release(&lease.id);
    }
}

/// The largest lease that stays a quarter of each of `limits` (requests, tokens,
/// concurrency, budget) for requests like `r`.
fn quarter_of(limits: &Limits, r: &Reservation) -> u64 {
    let mut size = u64::MAX;
    for limit in [
        limits.requests_per_minute,
        limits.requests_per_day,
        limits.max_concurrent,
    ]
    .into_iter()
    .flatten()
    {
        size = size.min(limit / 4);
    }
    for limit in [limits.tokens_per_minute, limits.tokens_per_day]
        .into_iter()
        .flatten()
    {
        size = size.min(limit / 4 / r.tokens.max(1));
    }
    if let Some(budget) = sluice_policies::quota::budget_nano(limits) {
        size = size.min((budget / 4 / r.cost_nano.max(1)) as u64);
    }
    size
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(tokens: u64) -> Reservation {
        Reservation {
            requests: 1,
            tokens,
            cost_nano: 10,
        }
    }

    #[test]
    fn a_busy_key_takes_a_lease_and_admits_from_it() {
        let leases = Leases::new(8, Duration::from_secs(60));
        let limits = Limits::default();
        assert!(matches!(
            leases.try_admit("k", &[&limits], &r(5), 100),
            Err(Miss::Single)
        ));
        let Err(Miss::Take(size)) = leases.try_admit("k", &[&limits], &r(5), 100) else {
            panic!("the second request of a second asks for a lease");
        };
        assert_eq!(size, 4);
        assert!(matches!(
            leases.try_admit("k", &[&limits], &r(5), 100),
            Err(Miss::Wait(_))
        ));
        let granted = Reservation {
            requests: 2,
            tokens: 10,
            cost_nano: 20,
        };
        leases.install(
            "k",
            crate::auth::quota_ledgers("k", "t"),
            "L".into(),
            100,
            "2026-11".into(),
            granted,
            Some(r(5)),
            RateHeaders::default(),
        );
        let taken = leases
            .try_admit("k", &[&limits], &r(5), 100)
            .expect("one more fits");
        assert_eq!(&*taken.lease_id, "L");
        assert!(
            leases.try_admit("k", &[&limits], &r(5), 100).is_err(),
            "the lease is spent"
        );
    }

    #[test]
    fn a_busy_keys_next_lease_is_asked_for_before_the_current_one_is_spent() {
        let leases = Leases::new(8, Duration::from_secs(60));
        let limits = Limits::default();
        let ledgers = crate::auth::quota_ledgers("k", "t");
        let granted = |requests: u64| Reservation {
            requests,
            tokens: 5 * requests,
            cost_nano: 10 * requests as i64,
        };
        for _ in 0..4 {
            let _ = leases.try_admit("k", &[&limits], &r(5), 100);
        }
        leases.not_taken("k");
        leases.install(
            "k",
            ledgers.clone(),
            "L1".into(),
            100,
            "2026-11".into(),
            granted(8),
            Some(r(5)),
            RateHeaders::default(),
        );
        // 8 granted, the first taken: the next four leave more than a quarter.
        for _ in 0..4 {
            let admitted = leases.try_admit("k", &[&limits], &r(5), 100).unwrap();
            assert_eq!((&*admitted.lease_id, admitted.refill), ("L1", None));
        }
        let admitted = leases.try_admit("k", &[&limits], &r(5), 100).unwrap();
        let Some(size) = admitted.refill else {
            panic!("two of eight left: the next lease is asked for");
        };
        assert_eq!(size, 8);
        for _ in 0..2 {
            let admitted = leases.try_admit("k", &[&limits], &r(5), 100).unwrap();
            assert_eq!(
                admitted.refill, None,
                "asked for once, not by every request"
            );
        }
        // The current lease is spent before the next arrives: the rest wait for it.
        assert!(matches!(
            leases.try_admit("k", &[&limits], &r(5), 100),
            Err(Miss::Wait(_))
        ));
        leases.install(
            "k",
            ledgers,
            "L2".into(),
            100,
            "2026-11".into(),
            granted(8),
            None,
            RateHeaders::default(),
        );
        for _ in 0..6 {
            let admitted = leases.try_admit("k", &[&limits], &r(5), 100).unwrap();
            assert_eq!(
                &*admitted.lease_id, "L2",
                "all eight of a lease taken ahead admit"
            );
        }
        // L1's eight requests are still running: nothing to give back yet.
        assert!(leases.sweep().is_empty());
        for _ in 0..8 {
            leases.settle("k", "L1", &r(5), &r(5));
        }
        let idle = leases.sweep();
        assert_eq!(idle.len(), 1);
        assert_eq!((&*idle[0].id, idle[0].used.requests), ("L1", 8));
    }

    #[test]
    fn a_lease_is_given_back_once_its_requests_are_done() {
        let leases = Leases::new(8, Duration::from_millis(0));
        let granted = Reservation {
            requests: 4,
            tokens: 40,
            cost_nano: 40,
        };
        leases.install(
            "k",
            crate::auth::quota_ledgers("k", "t"),
            "L".into(),
            100,
            "2026-11".into(),
            granted,
            Some(r(10)),
            RateHeaders::default(),
        );
        // Expired at once, but its first request still runs.
        assert!(leases.sweep().is_empty());
        leases.settle(
            "k",
            "L",
            &r(10),
            &Reservation {
                requests: 1,
                tokens: 3,
                cost_nano: 2,
            },
        );
        let idle = leases.sweep();
        assert_eq!(idle.len(), 1);
        assert_eq!(
            idle[0].used,
            Reservation {
                requests: 1,
                tokens: 3,
                cost_nano: 2
            }
        );
        assert_eq!(idle[0].granted, granted);
    }

    #[test]
    fn leases_stay_a_small_part_of_small_limits() {
        let leases = Leases::new(64, Duration::from_secs(1));
        let limits = Limits {
            requests_per_minute: Some(20),
            ..Limits::default()
        };
        for _ in 0..30 {
            if let Err(Miss::Take(size)) = leases.try_admit("k", &[&limits], &r(1), 5) {
                assert!(size <= 5);
                leases.not_taken("k");
            }
        }
    }
}
