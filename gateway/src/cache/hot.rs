//! Which cache entries does this replica keep at hand? The bodies of recently served entries,
//! so that a repeated question is answered without a store round trip (on Redis, a hit that
//! fetched its entry every time cost more CPU than forwarding the request).
//!
//! Safe to keep because an entry's body never changes under its id (ids are not reused):
//! what decides whether an entry may be served, its expiry, a purge, its tenant, is the
//! index, which every lookup consults first. Bounded by bytes, least recently used first out.

use lru::LruCache;
use parking_lot::Mutex;

pub struct HotEntries<T> {
    max_bytes: usize,
    kept: Mutex<Kept<T>>,
}

/// The entries, each with its size, and their total size.
struct Kept<T> {
    entries: LruCache<String, (T, usize)>,
    bytes: usize,
}

impl<T: Clone> HotEntries<T> {
    /// Keeps entries of `max_bytes` in all at most (0: keeps none).
    pub fn new(max_bytes: usize) -> Self {
        HotEntries {
            max_bytes,
            kept: Mutex::new(Kept {
                entries: LruCache::unbounded(),
                bytes: 0,
            }),
        }
    }

    pub fn get(&self, id: &str) -> Option<T> {
        let mut kept = self.kept.lock();
        kept.entries.get(id).map(|(entry, _)| entry.clone())
    }

    /// Keeps `entry` (about `bytes` big), making room by dropping the least recently used.
    pub fn insert(&self, id: &str, entry: T, bytes: usize) {
        if bytes > self.max_bytes / 4 {
            return;
        }
        let mut kept = self.kept.lock();
        if let Some((_, old)) = kept.entries.put(id.to_owned(), (entry, bytes)) {
            kept.bytes -= old;
        }
        kept.bytes += bytes;
        while kept.bytes > self.max_bytes {
            match kept.entries.pop_lru() {
                Some((_, (_, dropped))) => kept.bytes -= dropped,
                None => break,
            }
        }
    }

    pub fn remove(&self, id: &str) {
        let mut kept = self.kept.lock();
        if let Some((_, bytes)) = kept.entries.pop(id) {
            kept.bytes -= bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_to_its_byte_budget_dropping_the_least_recently_used() {
        let hot = HotEntries::new(100);
        hot.insert("a", 1, 20);
        hot.insert("b", 2, 20);
        hot.insert("c", 3, 20);
        assert_eq!(hot.get("a"), Some(1), "a is now the most recently used");
        hot.insert("d", 4, 25);
        hot.insert("e", 5, 25);
        // 115 bytes: b, the least recently used, goes.
        assert_eq!(hot.get("b"), None);
        assert_eq!(
            [hot.get("a"), hot.get("c"), hot.get("d"), hot.get("e")],
            [Some(1), Some(3), Some(4), Some(5)]
        );
        hot.insert("big", 6, 26);
        assert_eq!(
            hot.get("big"),
            None,
            "over a quarter of the budget: not kept"
        );
        hot.remove("a");
        assert_eq!(hot.get("a"), None);
    }
}
