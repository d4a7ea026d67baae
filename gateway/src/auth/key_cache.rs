//! The local cache of API key lookups, so an authenticated request costs no store round trip.
//!
//! Entries (hits and misses alike) stay until the store's key epoch moves; every replica polls
//! that epoch a few times a second, so a revocation made on any replica is honoured everywhere
//! within one poll interval. The cache is bounded: past `capacity` entries it starts over,
//! so a flood of made-up keys cannot grow it without limit. Entries hold resolved identities
//! (tier limits applied), so anything that changes what a key resolves to, tiers included,
//! must move the epoch.

use super::Identity;
use crate::keys::KeyHash;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How often each replica asks the store whether any key changed.
pub const EPOCH_POLL: Duration = Duration::from_millis(200);

pub struct KeyCache {
    /// A key's resolved identity, or `None` for a secret the store does not know.
    entries: RwLock<HashMap<KeyHash, Option<Arc<Identity>>>>,
    /// The store epoch the entries were read under.
    epoch: AtomicU64,
    capacity: usize,
}

impl KeyCache {
    pub fn new(capacity: usize) -> Self {
        KeyCache {
            entries: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(u64::MAX),
            capacity,
        }
    }

    /// `Some(found)` when the lookup is cached (`found` is `None` for an unknown key).
    pub fn get(&self, hash: &KeyHash) -> Option<Option<Arc<Identity>>> {
        self.entries
            .read()
            .expect("key cache lock")
            .get(hash)
            .cloned()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Caches a lookup made under `epoch`; dropped if the epoch moved meanwhile, so a lookup
    /// that raced a revocation is never kept.
    pub fn insert(&self, hash: KeyHash, found: Option<Arc<Identity>>, epoch: u64) {
        let mut entries = self.entries.write().expect("key cache lock");
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        if entries.len() >= self.capacity {
            entries.clear();
        }
        entries.insert(hash, found);
    }

    /// Forgets everything if `epoch` differs from the one the entries were read under.
    pub fn observe_epoch(&self, epoch: u64) {
        if self.epoch.load(Ordering::Acquire) == epoch {
            return;
        }
        let mut entries = self.entries.write().expect("key cache lock");
        entries.clear();
        self.epoch.store(epoch, Ordering::Release);
    }

    /// Forgets everything now; for writes made by this replica, which need not wait a poll.
    pub fn invalidate(&self) {
        let mut entries = self.entries.write().expect("key cache lock");
        entries.clear();
        self.epoch.store(u64::MAX, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(s: &str) -> KeyHash {
        KeyHash::of_secret(s)
    }

    #[test]
    fn a_moved_epoch_forgets_everything() {
        let cache = KeyCache::new(10);
        cache.observe_epoch(1);
        cache.insert(hash("a"), None, 1);
        assert_eq!(cache.get(&hash("a")), Some(None));
        cache.observe_epoch(1);
        assert!(cache.get(&hash("a")).is_some());
        cache.observe_epoch(2);
        assert!(cache.get(&hash("a")).is_none());
    }

    #[test]
    fn a_lookup_that_raced_a_change_is_not_kept() {
        let cache = KeyCache::new(10);
        cache.observe_epoch(1);
        let epoch_at_lookup = cache.epoch();
        cache.observe_epoch(2);
        cache.insert(hash("a"), None, epoch_at_lookup);
        assert!(cache.get(&hash("a")).is_none());
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = KeyCache::new(3);
        cache.observe_epoch(0);
        for i in 0..10 {
            cache.insert(hash(&i.to_string()), None, 0);
        }
        assert!(cache.entries.read().unwrap().len() <= 3);
    }
}
