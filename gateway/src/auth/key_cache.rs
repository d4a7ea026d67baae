//! The local cache of API key lookups, so an authenticated request costs no store round trip.
//!
//! Entries stay until the store's key epoch moves; every replica polls that epoch a few times
//! a second, so a revocation made on any replica is honoured everywhere within one poll
//! interval. Keys the store knows and secrets it does not are kept apart, each bounded and
//! evicting its oldest entries: a flood of made-up keys (during a store outage, say, when
//! every miss would otherwise be a failed lookup) only ever evicts other made-up keys, never
//! a valid key's identity. Entries hold resolved identities (tier limits applied), so
//! anything that changes what a key resolves to, tiers included, must move the epoch.

use super::Identity;
use crate::keys::KeyHash;
use lru::LruCache;
use parking_lot::RwLock;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often each replica asks the store whether any key changed.
pub const EPOCH_POLL: Duration = Duration::from_millis(200);

pub struct KeyCache {
    entries: RwLock<Entries>,
    /// The store epoch the entries were read under.
    epoch: AtomicU64,
}

struct Entries {
    /// Keys the store knows, with their resolved identity.
    known: LruCache<KeyHash, Arc<Identity>>,
    /// Secrets the store does not know.
    unknown: LruCache<KeyHash, ()>,
}

impl Entries {
    fn clear(&mut self) {
        self.known.clear();
        self.unknown.clear();
    }
}

impl KeyCache {
    /// A cache of at most `known` valid keys and `unknown` made-up ones (each at least 1).
    pub fn new(known: usize, unknown: usize) -> Self {
        let bound = |n: usize| NonZeroUsize::new(n.max(1)).expect("at least 1");
        KeyCache {
            entries: RwLock::new(Entries {
                known: LruCache::new(bound(known)),
                unknown: LruCache::new(bound(unknown)),
            }),
            epoch: AtomicU64::new(u64::MAX),
        }
    }

    /// `Some(found)` when the lookup is cached (`found` is `None` for an unknown key).
    /// Reads do not reorder entries (so they share the lock): eviction is oldest-cached
    /// first, and an evicted valid key costs one store lookup.
    pub fn get(&self, hash: &KeyHash) -> Option<Option<Arc<Identity>>> {
        let entries = self.entries.read();
        if let Some(identity) = entries.known.peek(hash) {
            return Some(Some(identity.clone()));
        }
        entries.unknown.peek(hash).map(|()| None)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Caches a lookup made under `epoch`; dropped if the epoch moved meanwhile, so a lookup
    /// that raced a revocation is never kept.
    pub fn insert(&self, hash: KeyHash, found: Option<Arc<Identity>>, epoch: u64) {
        let mut entries = self.entries.write();
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        match found {
            Some(identity) => {
                entries.unknown.pop(&hash);
                entries.known.push(hash, identity);
            }
            None => {
                entries.known.pop(&hash);
                entries.unknown.push(hash, ());
            }
        }
    }

    /// Forgets everything if `epoch` differs from the one the entries were read under.
    pub fn observe_epoch(&self, epoch: u64) {
        if self.epoch.load(Ordering::Acquire) == epoch {
            return;
        }
        let mut entries = self.entries.write();
        entries.clear();
        self.epoch.store(epoch, Ordering::Release);
    }

    /// Forgets everything now; for writes made by this replica, which need not wait a poll.
    pub fn invalidate(&self) {
        let mut entries = self.entries.write();
        entries.clear();
        self.epoch.store(u64::MAX, Ordering::Release);
    }

    /// How many valid keys and unknown secrets are cached.
    pub fn len(&self) -> (usize, usize) {
        let entries = self.entries.read();
        (entries.known.len(), entries.unknown.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(s: &str) -> KeyHash {
        KeyHash::of_secret(s)
    }

    fn identity(key_id: &str) -> Arc<Identity> {
        Arc::new(Identity {
            key_id: key_id.into(),
            tenant: "t".into(),
            tier: "free".into(),
            limits: Default::default(),
            cache: true,
            models: Default::default(),
            tenant_limits: Default::default(),
            ledgers: crate::auth::quota_ledgers(key_id, "t"),
            model_limits: Default::default(),
            tenant_model_limits: Default::default(),
            distillation: None,
        })
    }

    #[test]
    fn a_moved_epoch_forgets_everything() {
        let cache = KeyCache::new(10, 10);
        cache.observe_epoch(1);
        cache.insert(hash("a"), None, 1);
        cache.insert(hash("b"), Some(identity("b")), 1);
        assert_eq!(cache.get(&hash("a")), Some(None));
        cache.observe_epoch(1);
        assert!(cache.get(&hash("a")).is_some());
        cache.observe_epoch(2);
        assert!(cache.get(&hash("a")).is_none());
        assert!(cache.get(&hash("b")).is_none());
    }

    #[test]
    fn a_lookup_that_raced_a_change_is_not_kept() {
        let cache = KeyCache::new(10, 10);
        cache.observe_epoch(1);
        let epoch_at_lookup = cache.epoch();
        cache.observe_epoch(2);
        cache.insert(hash("a"), None, epoch_at_lookup);
        assert!(cache.get(&hash("a")).is_none());
    }

    #[test]
    fn both_sides_are_bounded() {
        let cache = KeyCache::new(3, 5);
        cache.observe_epoch(0);
        for i in 0..10 {
            cache.insert(hash(&format!("u{i}")), None, 0);
            cache.insert(hash(&format!("k{i}")), Some(identity(&i.to_string())), 0);
        }
        assert_eq!(cache.len(), (3, 5));
        // The newest stay.
        assert!(cache.get(&hash("k9")).is_some_and(|f| f.is_some()));
        assert_eq!(cache.get(&hash("u9")), Some(None));
    }

    #[test]
    fn a_flood_of_unknown_keys_never_evicts_a_valid_one() {
        let cache = KeyCache::new(100, 1_000);
        cache.observe_epoch(0);
        cache.insert(hash("valid"), Some(identity("k1")), 0);
        for i in 0..50_000 {
            cache.insert(hash(&format!("made-up-{i}")), None, 0);
        }
        let found = cache.get(&hash("valid")).expect("still cached");
        assert_eq!(found.expect("known").key_id, "k1");
        assert_eq!(cache.len(), (1, 1_000));
    }
}
