//! Has this replica alone already seen a key's request rate? A sliding minute per key, kept
//! in memory and decided by the same pure function as the stores' window
//! (`sluice_policies::quota::decide`).
//!
//! It runs ahead of the store: what it refuses, the fleet-wide window would refuse too (the
//! fleet's window holds at least this replica's requests), so a flood is turned away without
//! a store call, and the retry time it gives is the window's own (exact on one replica, the
//! earliest possible on a fleet). When the store cannot be reached it is the only limit
//! left, if the key's tier fails open.

use parking_lot::Mutex;
use sluice_policies::quota::{self, Bucket, Counters, Reservation, WINDOW_SECS};
use sluice_policies::Limits;
use std::collections::HashMap;

#[derive(Default)]
pub struct LocalLimiter {
    keys: Mutex<HashMap<String, Vec<Bucket>>>,
}

const ONE: Reservation = Reservation {
    requests: 1,
    tokens: 0,
    cost_nano: 0,
};

impl LocalLimiter {
    /// Counts one request of the key at `now_sec`, or says in how many seconds the replica's
    /// window has room. Always admits a key with no request rate.
    pub fn check(
        &self,
        key_id: &str,
        requests_per_minute: Option<u64>,
        now_sec: i64,
    ) -> Result<(), u64> {
        let Some(rpm) = requests_per_minute else {
            return Ok(());
        };
        let mut keys = self.keys.lock();
        let minute = match keys.get_mut(key_id) {
            Some(minute) => minute,
            None => keys.entry(key_id.to_owned()).or_default(),
        };
        minute.retain(|b| b.second > now_sec - WINDOW_SECS);
        let limits = Limits {
            requests_per_minute: Some(rpm),
            ..Limits::default()
        };
        let counters = Counters {
            minute: std::mem::take(minute),
            ..Counters::default()
        };
        let decision = quota::decide(&limits, &counters, &ONE, now_sec, 0);
        *minute = counters.minute;
        if let Some((_, retry)) = decision.refused {
            return Err(retry);
        }
        match minute.iter_mut().find(|b| b.second == now_sec) {
            Some(b) => b.requests += 1,
            None => minute.push(Bucket {
                second: now_sec,
                requests: 1,
                tokens: 0,
            }),
        }
        Ok(())
    }

    /// Takes back a request counted at `now_sec` that the store then refused, so that
    /// refusals never fill this replica's window.
    pub fn uncount(&self, key_id: &str, now_sec: i64) {
        let mut keys = self.keys.lock();
        if let Some(b) = keys
            .get_mut(key_id)
            .and_then(|minute| minute.iter_mut().find(|b| b.second == now_sec))
        {
            b.requests = b.requests.saturating_sub(1);
        }
    }

    /// Starts a key afresh on this replica (after an operator's quota reset).
    pub fn forget(&self, key_id: &str) {
        self.keys.lock().remove(key_id);
    }

    /// Forgets keys with no request in the window at `now_sec`: what a key that stopped
    /// calling leaves behind would otherwise stay for the life of the process.
    pub fn prune(&self, now_sec: i64) {
        self.keys
            .lock()
            .retain(|_, minute| minute.iter().any(|b| b.second > now_sec - WINDOW_SECS));
    }

    /// Keys with state on this replica.
    pub fn keys(&self) -> usize {
        self.keys.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_rate_and_says_when_the_window_has_room() {
        let limiter = LocalLimiter::default();
        for i in 0..5 {
            assert_eq!(limiter.check("k", Some(5), 100 + i), Ok(()));
        }
        // The first request (second 100) leaves the window at 160.
        assert_eq!(limiter.check("k", Some(5), 110), Err(50));
        assert_eq!(limiter.check("k", Some(5), 160), Ok(()));
        assert_eq!(limiter.check("other", Some(5), 110), Ok(()));
        assert_eq!(limiter.check("k", None, 110), Ok(()));
    }

    #[test]
    fn idle_keys_are_pruned_and_busy_ones_kept() {
        let limiter = LocalLimiter::default();
        for i in 0..1000 {
            assert_eq!(limiter.check(&format!("k{i}"), Some(5), 100), Ok(()));
        }
        assert_eq!(limiter.check("busy", Some(5), 150), Ok(()));
        limiter.prune(159);
        assert_eq!(limiter.keys(), 1001, "all still in their window");
        limiter.prune(160);
        assert_eq!(limiter.keys(), 1, "only the key seen within the minute");
        assert_eq!(
            limiter.check("busy", Some(1), 160),
            Err(50),
            "its count survived"
        );
    }

    #[test]
    fn an_uncounted_request_frees_its_place() {
        let limiter = LocalLimiter::default();
        assert_eq!(limiter.check("k", Some(1), 100), Ok(()));
        limiter.uncount("k", 100);
        assert_eq!(limiter.check("k", Some(1), 101), Ok(()));
    }
}
