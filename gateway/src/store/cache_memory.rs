//! The embedded store's response cache: bodies and the cache log in this process's memory.
//! A cache is a copy of answers that can be had again, so it is not written to disk; one
//! process is the only replica, so its log is the whole truth.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct MemoryCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    bodies: HashMap<String, (Vec<u8>, Instant)>,
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
        inner.bodies.retain(|_, (_, expires)| *expires > now);
        inner
            .bodies
            .insert(id.to_owned(), (body.to_vec(), now + ttl));
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
    fn append(&mut self, now: Instant, event: &[u8]) {
        // Sequences start at 1, so the cursor "0" means "from the start".
        self.next_seq += 1;
        let seq = self.next_seq;
        self.log.push_back((seq, now, event.to_vec()));
    }
}
