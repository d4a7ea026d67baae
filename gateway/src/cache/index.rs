//! Each replica's in-memory index of the cache: which entry answers an exact key, and the
//! nearest stored questions to an embedding within one namespace.
//!
//! A namespace holding few entries is scanned exactly (a dot product per entry over one
//! contiguous slab). Past [`FLAT_MAX`] entries it is split into inverted lists (IVF): k-means
//! centroids, each entry in its nearest centroid's list, and a search scans only the lists
//! nearest the query. That suits a cache, whose searches only care about entries at cosine
//! 0.9 and up: such an entry is almost always in the query's nearest list. (An HNSW graph
//! through hnsw_rs was tried first; on 384-dimensional vectors it visited most of a
//! namespace per search and came out slower than a plain scan: docs/benchmarks.md.)
//! Entries leave by expiry or purge at once.
//!
//! The response bodies are not here (they live in the store); only what finding them takes.
//!
//! The index is bounded in bytes ([`Budget`]): each entry counts its answer's size, its
//! vector and its names. When an entry would not fit, the least recently used entries of
//! the tenant holding the most bytes leave first, so one tenant filling the cache with
//! unique questions evicts its own entries, never those of a tenant holding less; a tenant
//! may also be capped at a share of the budget outright. A hit makes an entry recently used.

use super::key::Digest;
use parking_lot::RwLock;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Namespaces with more entries than this are split into inverted lists. Below it one exact
/// scan takes about 0.1 ms (see docs/benchmarks.md).
pub const FLAT_MAX: usize = 2048;
/// Lists per namespace: about twice the square root of its size, at most this.
const MAX_LISTS: usize = 4096;
/// Lists a search scans.
const PROBES: usize = 8;
/// k-means: sample points per list, and rounds.
const TRAIN_PER_LIST: usize = 8;
const TRAIN_ROUNDS: usize = 8;

/// What each entry costs beyond its answer, vector and names: the index's own maps.
const ENTRY_OVERHEAD: u64 = 256;

/// How many bytes the index (and the answers it stands for) may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub max_bytes: u64,
    /// The most one tenant may hold.
    pub tenant_max_bytes: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            max_bytes: u64::MAX,
            tenant_max_bytes: u64::MAX,
        }
    }
}

/// What the index knows of one entry.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    pub id: String,
    pub tenant: String,
    pub model: String,
    pub namespace: Digest,
    pub exact: Digest,
    pub expires_ms: i64,
    /// Unit length; empty when the entry can only be found exactly.
    pub embedding: Vec<f32>,
    /// The size of the stored answer.
    pub body_bytes: u64,
}

impl IndexEntry {
    /// What the entry counts against the budget.
    fn cost(&self) -> u64 {
        self.body_bytes
            + (self.embedding.len() * 4) as u64
            + (self.id.len() + self.tenant.len() + self.model.len()) as u64
            + ENTRY_OVERHEAD
    }
}

/// A search result: an entry and how close its question is (cosine similarity).
#[derive(Debug, Clone, PartialEq)]
pub struct Nearest {
    pub id: String,
    pub tenant: String,
    pub similarity: f32,
}

#[derive(Default)]
pub struct CacheIndex {
    inner: RwLock<Inner>,
    budget: Budget,
    evicted: AtomicU64,
}

#[derive(Default)]
struct Inner {
    next_slot: usize,
    slots: HashMap<usize, Meta>,
    by_id: HashMap<String, usize>,
    exact: HashMap<Digest, usize>,
    namespaces: HashMap<Digest, Arc<Namespace>>,
    /// Bytes held, in all and per tenant, with each tenant's entries by last use.
    bytes: u64,
    tenants: HashMap<String, TenantShare>,
    /// The clock of uses: each insert or hit takes the next tick.
    tick: u64,
}

#[derive(Default)]
struct TenantShare {
    bytes: u64,
    /// Last use -> slot, least recent first.
    by_use: BTreeMap<u64, usize>,
}

struct Meta {
    id: String,
    tenant: String,
    model: String,
    namespace: Digest,
    exact: Digest,
    expires_ms: i64,
    has_vector: bool,
    cost: u64,
    last_used: u64,
}

impl CacheIndex {
    pub fn new(budget: Budget) -> CacheIndex {
        CacheIndex {
            budget,
            ..CacheIndex::default()
        }
    }

    /// Bytes the entries hold against the budget.
    pub fn bytes(&self) -> u64 {
        self.read().bytes
    }

    /// Entries evicted to keep within the budget, since start.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Marks an entry just served, so that it leaves last.
    pub fn touch(&self, id: &str) {
        let mut inner = self.write();
        if let Some(&slot) = inner.by_id.get(id) {
            inner.touch_slot(slot);
        }
    }

    pub fn len(&self) -> usize {
        self.read().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn namespaces(&self) -> usize {
        self.read().namespaces.len()
    }

    /// Entries per tenant.
    pub fn entries_by_tenant(&self) -> HashMap<String, u64> {
        let mut counts = HashMap::new();
        for meta in self.read().slots.values() {
            *counts.entry(meta.tenant.clone()).or_default() += 1;
        }
        counts
    }

    fn read(&self) -> parking_lot::RwLockReadGuard<'_, Inner> {
        self.inner.read()
    }

    fn write(&self) -> parking_lot::RwLockWriteGuard<'_, Inner> {
        self.inner.write()
    }

    /// Adds an entry; one with the same id or exact key replaces the older. Returns the ids
    /// of entries evicted to make room (the entry itself, when it alone exceeds what its
    /// tenant may hold).
    pub fn insert(&self, entry: IndexEntry) -> Vec<String> {
        let cost = entry.cost();
        let (namespace, evicted) = {
            let mut inner = self.write();
            if let Some(&slot) = inner.by_id.get(&entry.id) {
                inner.remove_slot(slot);
            }
            if let Some(&slot) = inner.exact.get(&entry.exact) {
                inner.remove_slot(slot);
            }
            if cost > self.budget.tenant_max_bytes.min(self.budget.max_bytes) {
                return vec![entry.id];
            }
            let evicted = inner.make_room(&entry.tenant, cost, &self.budget);
            self.evicted
                .fetch_add(evicted.len() as u64, Ordering::Relaxed);
            let slot = inner.next_slot;
            inner.next_slot += 1;
            inner.by_id.insert(entry.id.clone(), slot);
            inner.exact.insert(entry.exact, slot);
            inner.bytes += cost;
            inner.tenants.entry(entry.tenant.clone()).or_default().bytes += cost;
            inner.slots.insert(
                slot,
                Meta {
                    id: entry.id,
                    tenant: entry.tenant,
                    model: entry.model,
                    namespace: entry.namespace,
                    exact: entry.exact,
                    expires_ms: entry.expires_ms,
                    has_vector: !entry.embedding.is_empty(),
                    cost,
                    last_used: 0,
                },
            );
            inner.touch_slot(slot);
            if entry.embedding.is_empty() {
                return evicted;
            }
            let namespace = inner
                .namespaces
                .entry(entry.namespace)
                .or_insert_with(|| Arc::new(Namespace::new(entry.embedding.len())))
                .clone();
            ((namespace, slot), evicted)
        };
        let (namespace, slot) = namespace;
        namespace.add(slot, &entry.embedding);
        evicted
    }

    /// The entry stored under an exact key, unless it has expired.
    pub fn exact(&self, key: &Digest, now_ms: i64) -> Option<(String, String)> {
        let inner = self.read();
        let meta = inner.slots.get(inner.exact.get(key)?)?;
        (meta.expires_ms > now_ms).then(|| (meta.id.clone(), meta.tenant.clone()))
    }

    /// The `k` stored entries nearest to `embedding` in `namespace` at or above `threshold`,
    /// nearest first.
    pub fn nearest(
        &self,
        namespace: &Digest,
        embedding: &[f32],
        threshold: f32,
        k: usize,
        now_ms: i64,
    ) -> Vec<Nearest> {
        let Some(ns) = self.read().namespaces.get(namespace).cloned() else {
            return Vec::new();
        };
        let found = ns.search(embedding, k);
        let inner = self.read();
        found
            .into_iter()
            .filter(|(_, similarity)| *similarity >= threshold)
            .filter_map(|(slot, similarity)| {
                let meta = inner.slots.get(&slot)?;
                (meta.expires_ms > now_ms).then(|| Nearest {
                    id: meta.id.clone(),
                    tenant: meta.tenant.clone(),
                    similarity,
                })
            })
            .collect()
    }

    /// Drops one entry (its body was found missing or it was replaced).
    pub fn remove(&self, id: &str) -> bool {
        let mut inner = self.write();
        let Some(&slot) = inner.by_id.get(id) else {
            return false;
        };
        inner.remove_slot(slot);
        true
    }

    /// Drops every entry of `tenant` and/or `model` (both `None`: everything); returns the
    /// ids dropped.
    pub fn purge(&self, tenant: Option<&str>, model: Option<&str>) -> Vec<String> {
        let mut inner = self.write();
        let doomed: Vec<usize> = inner
            .slots
            .iter()
            .filter(|(_, m)| tenant.is_none_or(|t| m.tenant == t))
            .filter(|(_, m)| model.is_none_or(|x| m.model == x))
            .map(|(slot, _)| *slot)
            .collect();
        doomed
            .into_iter()
            .filter_map(|slot| inner.remove_slot(slot))
            .collect()
    }

    /// Drops entries that expired; returns how many.
    pub fn sweep(&self, now_ms: i64) -> usize {
        let mut inner = self.write();
        let expired: Vec<usize> = inner
            .slots
            .iter()
            .filter(|(_, m)| m.expires_ms <= now_ms)
            .map(|(slot, _)| *slot)
            .collect();
        let count = expired.len();
        for slot in expired {
            inner.remove_slot(slot);
        }
        count
    }

    /// Brings namespaces that shrank back to a single list.
    pub fn compact(&self) {
        let namespaces: Vec<Arc<Namespace>> = self.read().namespaces.values().cloned().collect();
        for ns in namespaces {
            ns.compact_if_needed();
        }
    }
}

impl Inner {
    fn touch_slot(&mut self, slot: usize) {
        let Some(meta) = self.slots.get_mut(&slot) else {
            return;
        };
        self.tick += 1;
        let previous = std::mem::replace(&mut meta.last_used, self.tick);
        if let Some(share) = self.tenants.get_mut(&meta.tenant) {
            share.by_use.remove(&previous);
            share.by_use.insert(self.tick, slot);
        }
    }

    /// Evicts until `cost` more bytes of `tenant` fit: first its own least recently used
    /// entries while it is over its cap, then those of whichever tenant holds the most.
    fn make_room(&mut self, tenant: &str, cost: u64, budget: &Budget) -> Vec<String> {
        let mut evicted = Vec::new();
        while self.tenants.get(tenant).map_or(0, |t| t.bytes) + cost > budget.tenant_max_bytes {
            match self.evict_from(tenant) {
                Some(id) => evicted.push(id),
                None => break,
            }
        }
        while self.bytes + cost > budget.max_bytes {
            let Some(largest) = self
                .tenants
                .iter()
                .max_by_key(|(_, share)| share.bytes)
                .map(|(name, _)| name.clone())
            else {
                break;
            };
            match self.evict_from(&largest) {
                Some(id) => evicted.push(id),
                None => break,
            }
        }
        evicted
    }

    fn evict_from(&mut self, tenant: &str) -> Option<String> {
        let (_, &slot) = self.tenants.get(tenant)?.by_use.first_key_value()?;
        self.remove_slot(slot)
    }

    fn remove_slot(&mut self, slot: usize) -> Option<String> {
        let meta = self.slots.remove(&slot)?;
        self.bytes -= meta.cost;
        if let Some(share) = self.tenants.get_mut(&meta.tenant) {
            share.bytes -= meta.cost;
            share.by_use.remove(&meta.last_used);
            if share.by_use.is_empty() {
                self.tenants.remove(&meta.tenant);
            }
        }
        self.by_id.remove(&meta.id);
        if self.exact.get(&meta.exact) == Some(&slot) {
            self.exact.remove(&meta.exact);
        }
        if meta.has_vector {
            if let Some(ns) = self.namespaces.get(&meta.namespace) {
                if ns.remove(slot) == 0 {
                    self.namespaces.remove(&meta.namespace);
                }
            }
        }
        Some(meta.id)
    }
}

/// The vectors of one namespace.
struct Namespace {
    dim: usize,
    vectors: RwLock<Vectors>,
    /// Set while the lists are trained again: searches miss instead of waiting.
    busy: AtomicBool,
}

/// Vectors in contiguous slabs: one list (scanned whole) while the namespace is small, then
/// one list per centroid (inverted lists), of which a search scans the nearest few.
struct Vectors {
    /// `lists.len() * dim` floats; empty while there is one list.
    centroids: Vec<f32>,
    lists: Vec<List>,
    /// Where each slot is: (list, position in it).
    positions: HashMap<usize, (usize, usize)>,
    /// How many entries the centroids were trained on (0: not trained).
    trained_on: usize,
}

#[derive(Default)]
struct List {
    slots: Vec<usize>,
    /// `slots.len() * dim` floats, entry i at `i * dim`.
    data: Vec<f32>,
}

impl Namespace {
    fn new(dim: usize) -> Namespace {
        Namespace {
            dim,
            vectors: RwLock::new(Vectors {
                centroids: Vec::new(),
                lists: vec![List::default()],
                positions: HashMap::new(),
                trained_on: 0,
            }),
            busy: AtomicBool::new(false),
        }
    }

    fn write(&self) -> parking_lot::RwLockWriteGuard<'_, Vectors> {
        self.vectors.write()
    }

    fn add(&self, slot: usize, embedding: &[f32]) {
        if embedding.len() != self.dim {
            // Another embedding model wrote this namespace; such an entry stays exact-only.
            return;
        }
        let mut vectors = self.write();
        let list = vectors.nearest_list(embedding, self.dim);
        vectors.push(list, slot, embedding);
        let live = vectors.positions.len();
        // Trained again each time the namespace has doubled, so lists stay short.
        if live > FLAT_MAX && live > vectors.trained_on.saturating_mul(2) {
            self.busy.store(true, Ordering::Release);
            vectors.train(self.dim);
            self.busy.store(false, Ordering::Release);
        }
    }

    /// Removes a slot; returns how many entries are left.
    fn remove(&self, slot: usize) -> usize {
        let mut vectors = self.write();
        let Some((list, at)) = vectors.positions.remove(&slot) else {
            return vectors.positions.len();
        };
        let dim = self.dim;
        let l = &mut vectors.lists[list];
        let last = l.slots.len() - 1;
        l.slots.swap_remove(at);
        if at != last {
            let (head, tail) = l.data.split_at_mut(last * dim);
            head[at * dim..(at + 1) * dim].copy_from_slice(&tail[..dim]);
        }
        l.data.truncate(last * dim);
        if at != last {
            let moved = l.slots[at];
            vectors.positions.insert(moved, (list, at));
        }
        vectors.positions.len()
    }

    fn search(&self, query: &[f32], k: usize) -> Vec<(usize, f32)> {
        if query.len() != self.dim || self.busy.load(Ordering::Acquire) {
            return Vec::new();
        }
        let Some(vectors) = self.vectors.try_read() else {
            return Vec::new();
        };
        let mut best: Vec<(usize, f32)> = Vec::with_capacity(k + 1);
        for list in vectors.lists_to_scan(query, self.dim) {
            let list = &vectors.lists[list];
            for (i, row) in list.data.chunks_exact(self.dim).enumerate() {
                let score = dot(row, query);
                if best.len() < k || score > best[best.len() - 1].1 {
                    let at = best.partition_point(|(_, s)| *s >= score);
                    best.insert(at, (list.slots[i], score));
                    best.truncate(k);
                }
            }
        }
        best
    }

    /// Goes back to a single list once most entries have left.
    fn compact_if_needed(&self) {
        let mut vectors = self.write();
        if vectors.lists.len() > 1 && vectors.positions.len() < FLAT_MAX / 2 {
            self.busy.store(true, Ordering::Release);
            vectors.regroup(Vec::new(), self.dim);
            vectors.trained_on = 0;
            self.busy.store(false, Ordering::Release);
        }
    }
}

/// The index of the row of `rows` (each `dim` long) with the largest dot product with `v`.
fn nearest_row(rows: &[f32], v: &[f32], dim: usize) -> usize {
    rows.chunks_exact(dim)
        .map(|row| dot(row, v))
        .enumerate()
        .fold(
            (0, f32::MIN),
            |best, (i, s)| if s > best.1 { (i, s) } else { best },
        )
        .0
}

impl Vectors {
    fn nearest_list(&self, v: &[f32], dim: usize) -> usize {
        if self.lists.len() == 1 {
            return 0;
        }
        nearest_row(&self.centroids, v, dim)
    }

    /// The lists a search scans: all of them when there is one, else the [`PROBES`] whose
    /// centroids are nearest the query. A stored question similar enough to be served
    /// (cosine 0.9 and up) sits in one of those.
    fn lists_to_scan(&self, query: &[f32], dim: usize) -> Vec<usize> {
        if self.lists.len() == 1 {
            return vec![0];
        }
        let mut scored: Vec<(usize, f32)> = self
            .centroids
            .chunks_exact(dim)
            .map(|c| dot(c, query))
            .enumerate()
            .collect();
        let probes = PROBES.min(scored.len());
        scored.select_nth_unstable_by(probes - 1, |a, b| b.1.total_cmp(&a.1));
        scored[..probes].iter().map(|(i, _)| *i).collect()
    }

    fn push(&mut self, list: usize, slot: usize, v: &[f32]) {
        let l = &mut self.lists[list];
        self.positions.insert(slot, (list, l.slots.len()));
        l.slots.push(slot);
        l.data.extend_from_slice(v);
    }

    /// Spherical k-means over a sample, then every entry into its nearest centroid's list.
    fn train(&mut self, dim: usize) {
        let live = self.positions.len();
        let nlist = (2 * (live as f64).sqrt() as usize).clamp(16, MAX_LISTS);
        let all: Vec<&[f32]> = self
            .lists
            .iter()
            .flat_map(|l| l.data.chunks_exact(dim))
            .collect();
        let stride = (all.len() / (nlist * TRAIN_PER_LIST)).max(1);
        let sample: Vec<&[f32]> = all.iter().step_by(stride).copied().collect();
        let mut centroids: Vec<f32> = sample
            .iter()
            .step_by((sample.len() / nlist).max(1))
            .take(nlist)
            .flat_map(|v| v.iter().copied())
            .collect();
        let nlist = centroids.len() / dim;
        for _ in 0..TRAIN_ROUNDS {
            let mut sums = vec![0.0f32; nlist * dim];
            for v in &sample {
                let nearest = nearest_row(&centroids, v, dim);
                for (sum, x) in sums[nearest * dim..(nearest + 1) * dim].iter_mut().zip(*v) {
                    *sum += x;
                }
            }
            for (c, sum) in centroids
                .chunks_exact_mut(dim)
                .zip(sums.chunks_exact_mut(dim))
            {
                // An empty cluster keeps its centroid.
                if sum.iter().any(|x| *x != 0.0) {
                    normalise(sum);
                    c.copy_from_slice(sum);
                }
            }
        }
        self.regroup(centroids, dim);
        self.trained_on = live;
    }

    /// Puts every entry into the list of its nearest centroid (one list when there are none).
    fn regroup(&mut self, centroids: Vec<f32>, dim: usize) {
        let old = std::mem::take(&mut self.lists);
        self.centroids = centroids;
        let nlist = (self.centroids.len() / dim).max(1);
        self.lists = (0..nlist).map(|_| List::default()).collect();
        self.positions.clear();
        for list in old {
            for (slot, v) in list.slots.iter().zip(list.data.chunks_exact(dim)) {
                let to = self.nearest_list(v, dim);
                self.push(to, *slot, v);
            }
        }
    }
}

/// The dot product of two equally long vectors: the inner loop of every search. Run with
/// AVX2 where the CPU has it (decided once, at run time, so one binary serves any x86-64).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU was just checked to have AVX2, all the callee requires.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    // The same code, compiled for 256-bit registers.
    dot_portable(a, b)
}

/// Sixteen independent sums, so the compiler vectorises the loop (two registers' worth).
#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0.0f32; 16];
    let chunks = a.len().min(b.len()) / 16 * 16;
    for (x, y) in a[..chunks]
        .chunks_exact(16)
        .zip(b[..chunks].chunks_exact(16))
    {
        for i in 0..16 {
            sums[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a[chunks..]
        .iter()
        .zip(&b[chunks..])
        .map(|(x, y)| x * y)
        .sum();
    sums.iter().sum::<f32>() + tail
}

/// Scales a vector to unit length (a zero vector stays zero).
pub fn normalise(v: &mut [f32]) {
    let norm = dot(v, v).sqrt();
    if norm > 0.0 {
        for x in v {
            *x /= norm;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(seed: u64, dim: usize) -> Vec<f32> {
        // A small xorshift so the test needs no RNG crate state.
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut v: Vec<f32> = (0..dim)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 2000) as f32 / 1000.0 - 1.0
            })
            .collect();
        normalise(&mut v);
        v
    }

    fn entry(id: usize, tenant: &str, ns: u8, v: Vec<f32>) -> IndexEntry {
        IndexEntry {
            id: format!("e{id}"),
            tenant: tenant.into(),
            model: "m".into(),
            namespace: [ns; 32],
            exact: *blake3::hash(format!("{tenant}{id}").as_bytes()).as_bytes(),
            expires_ms: 1_000,
            embedding: v,
            body_bytes: 0,
        }
    }

    /// An exact-only entry of `tenant` whose answer is `body_bytes` long.
    fn sized(id: usize, tenant: &str, body_bytes: u64) -> IndexEntry {
        IndexEntry {
            body_bytes,
            ..entry(id, tenant, 0, Vec::new())
        }
    }

    #[test]
    fn a_tenant_flooding_the_cache_evicts_its_own_entries_not_others() {
        let one = sized(0, "tenant-a", 1000).cost();
        let index = CacheIndex::new(Budget {
            max_bytes: one * 1000,
            tenant_max_bytes: u64::MAX,
        });
        for i in 0..100 {
            assert!(index.insert(sized(i, "quiet", 1000)).is_empty());
        }
        let mut evicted = 0;
        for i in 0..200_000 {
            evicted += index.insert(sized(1_000_000 + i, "flood", 1000)).len();
        }
        assert!(index.bytes() <= one * 1000, "within the budget");
        let by_tenant = index.entries_by_tenant();
        assert_eq!(
            by_tenant["quiet"], 100,
            "the quiet tenant keeps every entry"
        );
        assert!(
            by_tenant["flood"] > 800,
            "the flood keeps the rest of the room"
        );
        assert_eq!(evicted as u64, index.evicted());
        for i in 0..100 {
            let e = sized(i, "quiet", 1000);
            assert!(index.exact(&e.exact, 0).is_some());
        }
    }

    #[test]
    fn the_least_recently_used_entry_leaves_first() {
        let one = sized(0, "t", 100).cost();
        let index = CacheIndex::new(Budget {
            max_bytes: one * 3,
            tenant_max_bytes: u64::MAX,
        });
        for i in 0..3 {
            index.insert(sized(i, "t", 100));
        }
        index.touch("e0");
        assert_eq!(index.insert(sized(3, "t", 100)), ["e1"]);
        assert_eq!(index.insert(sized(4, "t", 100)), ["e2"]);
        assert_eq!(index.insert(sized(5, "t", 100)), ["e0"]);
    }

    #[test]
    fn a_tenant_cap_and_an_oversized_entry() {
        let one = sized(0, "capped", 100).cost();
        let index = CacheIndex::new(Budget {
            max_bytes: one * 10,
            tenant_max_bytes: one * 2,
        });
        for i in 0..5 {
            index.insert(sized(i, "capped", 100));
        }
        index.insert(sized(9, "other", 100));
        let by_tenant = index.entries_by_tenant();
        assert_eq!((by_tenant["capped"], by_tenant["other"]), (2, 1));
        // An entry larger than a tenant may hold is not kept at all.
        assert_eq!(index.insert(sized(20, "other", one * 3)), ["e20"]);
        assert_eq!(index.len(), 3);
        // Removing, purging and expiring give their bytes back.
        index.remove("e9");
        index.purge(Some("capped"), None);
        assert_eq!((index.len(), index.bytes()), (0, 0));
    }

    #[test]
    fn finds_the_nearest_in_its_namespace_only() {
        let index = CacheIndex::default();
        for i in 0..50 {
            index.insert(entry(i, "a", 1, unit(i as u64, 16)));
            index.insert(entry(1000 + i, "b", 2, unit(i as u64, 16)));
        }
        let found = index.nearest(&[1; 32], &unit(7, 16), 0.99, 3, 0);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, "e7");
        assert_eq!(found[0].tenant, "a");
        assert!(index.nearest(&[3; 32], &unit(7, 16), 0.0, 3, 0).is_empty());
        // Expired entries are not found.
        assert!(index
            .nearest(&[1; 32], &unit(7, 16), 0.99, 3, 1_000)
            .is_empty());
    }

    #[test]
    fn a_large_namespace_is_split_into_lists_and_still_finds_entries() {
        let index = CacheIndex::default();
        let n = FLAT_MAX + 500;
        for i in 0..n {
            index.insert(entry(i, "a", 1, unit(i as u64, 32)));
        }
        let mut hits = 0;
        for i in (0..n).step_by(97) {
            let found = index.nearest(&[1; 32], &unit(i as u64, 32), 0.999, 3, 0);
            hits += usize::from(found.first().is_some_and(|f| f.id == format!("e{i}")));
        }
        let probes = n.div_ceil(97);
        assert!(hits * 100 >= probes * 95, "recall {hits}/{probes}");

        // Removed entries are gone at once; compaction brings the rest back to one list.
        for i in 0..n - 10 {
            assert!(index.remove(&format!("e{i}")));
        }
        assert!(index
            .nearest(&[1; 32], &unit(3, 32), 0.999, 3, 0)
            .is_empty());
        index.compact();
        let found = index.nearest(&[1; 32], &unit((n - 1) as u64, 32), 0.999, 3, 0);
        assert_eq!(found[0].id, format!("e{}", n - 1));
    }

    #[test]
    fn exact_keys_purge_and_sweep() {
        let index = CacheIndex::default();
        let a = entry(1, "a", 1, unit(1, 8));
        let key = a.exact;
        index.insert(a);
        index.insert(entry(2, "b", 2, Vec::new()));
        assert_eq!(index.exact(&key, 0), Some(("e1".into(), "a".into())));
        assert_eq!(index.exact(&key, 5_000), None);
        assert_eq!(index.purge(Some("a"), None), vec!["e1".to_owned()]);
        assert_eq!(index.exact(&key, 0), None);
        assert_eq!(index.namespaces(), 0);
        assert_eq!(index.len(), 1);
        assert_eq!(index.sweep(2_000), 1);
        assert!(index.is_empty());
    }
}
