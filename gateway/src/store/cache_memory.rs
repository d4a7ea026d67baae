//! The embedded store's response cache: bodies and the cache log in this process's memory.
//! A cache is a copy of answers that can be had again, so it is not written to disk; one
//! process is the only replica, so its log is the whole truth.

use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct MemoryCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    bodies: HashMap<String, (Vec<u8>, Instant)>,
    /// Bodies by expiry, soonest first, so expired ones leave without a scan of them all.
    /// An id whose body was replaced may appear twice; only the entry matching its body's
    /// expiry removes it.
    expiries: BTreeSet<(Instant, String)>,
    /// (sequence, written at, event)
    log: VecDeque<(u64, Instant, Vec<u8>)>,
    next_seq: u64,
}

impl MemoryCache {
    fn lock(&self) -> parking_lot::MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    pub fn put(&self, id: &str, body: &[u8], ttl: Duration, event: &[u8], horizon: Duration) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.expire(now);
        inner
            .bodies
            .insert(id.to_owned(), (body.to_vec(), now + ttl));
        inner.expiries.insert((now + ttl, id.to_owned()));
        while inner
            .log
            .front()
            .is_some_and(|(_, at, _)| now.duration_since(*at) > horizon)
        {
            inner.log.pop_front();
        }
        inner.append(now, event);
    }

    pub fn get(&self, id: &str) -> Option<Vec<u8>> {
        let inner = self.lock();
        let (body, expires) = inner.bodies.get(id)?;
        (*expires > Instant::now()).then(|| body.clone())
    }

    pub fn purge(&self, ids: &[String], event: &[u8]) {
        let mut inner = self.lock();
        for id in ids {
            inner.bodies.remove(id);
        }
        inner.append(Instant::now(), event);
    }

    /// Drops bodies the index let go of (no log event: the index already forgot them).
    pub fn evict(&self, ids: &[String]) {
        let mut inner = self.lock();
        for id in ids {
            inner.bodies.remove(id);
        }
    }

    /// Bodies held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().bodies.len()
    }

    pub fn log(&self, cursor: &str, limit: usize) -> Vec<(String, Vec<u8>)> {
        let after: u64 = cursor.parse().unwrap_or(0);
        let inner = self.lock();
        let start = inner.log.partition_point(|(seq, _, _)| *seq <= after);
        inner
            .log
            .range(start..)
            .take(limit)
            .map(|(seq, _, event)| (seq.to_string(), event.clone()))
            .collect()
    }
}

impl Inner {
    fn expire(&mut self, now: Instant) {
        while let Some((at, id)) = self.expiries.first().cloned() {
            if at > now {
                break;
            }
            self.expiries.pop_first();
            if self
                .bodies
                .get(&id)
                .is_some_and(|(_, expires)| *expires == at)
            {
                self.bodies.remove(&id);
            }
        }
    }

    fn append(&mut self, now: Instant, event: &[u8]) {
        // Sequences start at 1, so the cursor "0" means "from the start".
        self.next_seq += 1;
        let seq = self.next_seq;
        self.log.push_back((seq, now, event.to_vec()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_bodies_leave_and_a_replaced_body_keeps_its_new_expiry() {
        let cache = MemoryCache::default();
        let long = Duration::from_secs(3600);
        cache.put("a", b"1", Duration::ZERO, b"e", long);
        cache.put("b", b"2", long, b"e", long);
        // "a" expired at once; the next put takes it out.
        cache.put("c", b"3", long, b"e", long);
        assert_eq!(cache.len(), 2);
        assert!(cache.get("a").is_none());
        // Replaced with a later expiry: its first expiry must not remove it.
        cache.put("b", b"22", Duration::ZERO, b"e", long);
        cache.put("b", b"23", long, b"e", long);
        cache.put("d", b"4", long, b"e", long);
        assert_eq!(cache.get("b").as_deref(), Some(&b"23"[..]));
        cache.evict(&["b".to_owned(), "c".to_owned()]);
        assert_eq!(cache.len(), 1);
    }
}
