//! Each replica's in-memory index of the cache: which entry answers an exact key, and the
//! nearest stored questions to an embedding within one namespace.
//!
//! A namespace holding few entries is scanned exactly (a dot product per entry over one
//! contiguous slab); past [`FLAT_MAX`] entries it moves to an HNSW graph (hnsw_rs). Entries
//! leave by expiry or purge: a scan drops them at once, a graph marks them dead, filters
//! them out of searches, and is rebuilt once the dead outnumber the living.
//!
//! The response bodies are not here (they live in the store); only what finding them takes.

use super::key::Digest;
use hnsw_rs::prelude::{Distance, Hnsw};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

/// Namespaces with more entries than this are searched through a graph. Below it an exact
/// scan is as fast and has perfect recall (see docs/benchmarks.md).
pub const FLAT_MAX: usize = 2048;
/// HNSW parameters: neighbours per node, and the candidate lists at build and search time.
const GRAPH_M: usize = 16;
const GRAPH_EF_BUILD: usize = 64;
const GRAPH_EF_SEARCH: usize = 64;
/// How many nearest entries a search returns: the guard may turn down the nearest.
pub const CANDIDATES: usize = 3;

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
}

#[derive(Default)]
struct Inner {
    next_slot: usize,
    slots: HashMap<usize, Meta>,
    by_id: HashMap<String, usize>,
    exact: HashMap<Digest, usize>,
    namespaces: HashMap<Digest, Arc<Namespace>>,
}

struct Meta {
    id: String,
    tenant: String,
    model: String,
    namespace: Digest,
    exact: Digest,
    expires_ms: i64,
    has_vector: bool,
}

impl CacheIndex {
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

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an entry; one with the same id or exact key replaces the older.
    pub fn insert(&self, entry: IndexEntry) {
        let namespace = {
            let mut inner = self.write();
            if let Some(&slot) = inner.by_id.get(&entry.id) {
                inner.remove_slot(slot);
            }
            if let Some(&slot) = inner.exact.get(&entry.exact) {
                inner.remove_slot(slot);
            }
            let slot = inner.next_slot;
            inner.next_slot += 1;
            inner.by_id.insert(entry.id.clone(), slot);
            inner.exact.insert(entry.exact, slot);
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
                },
            );
            if entry.embedding.is_empty() {
                return;
            }
            let namespace = inner
                .namespaces
                .entry(entry.namespace)
                .or_insert_with(|| Arc::new(Namespace::new(entry.embedding.len())))
                .clone();
            (namespace, slot)
        };
        let (namespace, slot) = namespace;
        namespace.add(slot, &entry.embedding);
    }

    /// The entry stored under an exact key, unless it has expired.
    pub fn exact(&self, key: &Digest, now_ms: i64) -> Option<(String, String)> {
        let inner = self.read();
        let meta = inner.slots.get(inner.exact.get(key)?)?;
        (meta.expires_ms > now_ms).then(|| (meta.id.clone(), meta.tenant.clone()))
    }

    /// The stored entries nearest to `embedding` in `namespace` at or above `threshold`,
    /// nearest first.
    pub fn nearest(
        &self,
        namespace: &Digest,
        embedding: &[f32],
        threshold: f32,
        now_ms: i64,
    ) -> Vec<Nearest> {
        let Some(ns) = self.read().namespaces.get(namespace).cloned() else {
            return Vec::new();
        };
        let found = ns.search(embedding, CANDIDATES);
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

    /// Rebuilds graphs whose dead entries outnumber the living. Slow for a large namespace;
    /// searches in it miss meanwhile rather than wait.
    pub fn compact(&self) {
        let namespaces: Vec<Arc<Namespace>> = self.read().namespaces.values().cloned().collect();
        for ns in namespaces {
            ns.compact_if_needed();
        }
    }
}

impl Inner {
    fn remove_slot(&mut self, slot: usize) -> Option<String> {
        let meta = self.slots.remove(&slot)?;
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
    /// Set while a graph is built or rebuilt: searches miss instead of waiting.
    busy: AtomicBool,
}

enum Vectors {
    Flat {
        slots: Vec<usize>,
        /// `slots.len() * dim` floats, entry i at `i * dim`.
        data: Vec<f32>,
    },
    Graph {
        graph: Box<Hnsw<'static, f32, CosineDistance>>,
        live: usize,
        dead: HashSet<usize>,
    },
}

impl Namespace {
    fn new(dim: usize) -> Namespace {
        Namespace {
            dim,
            vectors: RwLock::new(Vectors::Flat {
                slots: Vec::new(),
                data: Vec::new(),
            }),
            busy: AtomicBool::new(false),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vectors> {
        self.vectors.write().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, slot: usize, embedding: &[f32]) {
        if embedding.len() != self.dim {
            // Another embedding model wrote this namespace; such an entry stays exact-only.
            return;
        }
        let mut vectors = self.write();
        match &mut *vectors {
            Vectors::Flat { slots, data } => {
                slots.push(slot);
                data.extend_from_slice(embedding);
                if slots.len() > FLAT_MAX {
                    self.busy.store(true, Ordering::Release);
                    let graph = new_graph(slots.len() * 2);
                    for (i, slot) in slots.iter().enumerate() {
                        graph.insert((&data[i * self.dim..(i + 1) * self.dim], *slot));
                    }
                    *vectors = Vectors::Graph {
                        graph: Box::new(graph),
                        live: slots.len(),
                        dead: HashSet::new(),
                    };
                    self.busy.store(false, Ordering::Release);
                }
            }
            Vectors::Graph { graph, live, .. } => {
                graph.insert((embedding, slot));
                *live += 1;
            }
        }
    }

    /// Removes a slot; returns how many live entries are left.
    fn remove(&self, slot: usize) -> usize {
        let mut vectors = self.write();
        match &mut *vectors {
            Vectors::Flat { slots, data } => {
                if let Some(i) = slots.iter().position(|s| *s == slot) {
                    let last = slots.len() - 1;
                    slots.swap_remove(i);
                    if i != last {
                        let (head, tail) = data.split_at_mut(last * self.dim);
                        head[i * self.dim..(i + 1) * self.dim].copy_from_slice(&tail[..self.dim]);
                    }
                    data.truncate(last * self.dim);
                }
                slots.len()
            }
            Vectors::Graph { live, dead, .. } => {
                if dead.insert(slot) {
                    *live -= 1;
                }
                *live
            }
        }
    }

    fn search(&self, query: &[f32], k: usize) -> Vec<(usize, f32)> {
        if query.len() != self.dim || self.busy.load(Ordering::Acquire) {
            return Vec::new();
        }
        let Ok(vectors) = self.vectors.try_read() else {
            return Vec::new();
        };
        match &*vectors {
            Vectors::Flat { slots, data } => {
                let mut best: Vec<(usize, f32)> = Vec::with_capacity(k + 1);
                for (i, row) in data.chunks_exact(self.dim).enumerate() {
                    let score = dot(row, query);
                    if best.len() < k || score > best[best.len() - 1].1 {
                        let at = best.partition_point(|(_, s)| *s >= score);
                        best.insert(at, (slots[i], score));
                        best.truncate(k);
                    }
                }
                best
            }
            Vectors::Graph { graph, dead, .. } => {
                let alive = |id: &usize| !dead.contains(id);
                graph
                    .search_filter(query, k, GRAPH_EF_SEARCH.max(k), Some(&alive))
                    .into_iter()
                    .map(|n| (n.d_id, 1.0 - n.distance))
                    .collect()
            }
        }
    }

    fn compact_if_needed(&self) {
        let needs = matches!(&*self.vectors.read().unwrap_or_else(|p| p.into_inner()),
            Vectors::Graph { live, dead, .. } if dead.len() > *live);
        if !needs {
            return;
        }
        let mut vectors = self.write();
        self.busy.store(true, Ordering::Release);
        if let Vectors::Graph { graph, dead, live } = &*vectors {
            let mut slots = Vec::with_capacity(*live);
            let mut data = Vec::with_capacity(*live * self.dim);
            for point in graph.get_point_indexation() {
                let slot = point.get_origin_id();
                if !dead.contains(&slot) {
                    slots.push(slot);
                    data.extend_from_slice(point.get_v());
                }
            }
            *vectors = if slots.len() > FLAT_MAX {
                let fresh = new_graph(slots.len() * 2);
                for (i, slot) in slots.iter().enumerate() {
                    fresh.insert((&data[i * self.dim..(i + 1) * self.dim], *slot));
                }
                Vectors::Graph {
                    graph: Box::new(fresh),
                    live: slots.len(),
                    dead: HashSet::new(),
                }
            } else {
                Vectors::Flat { slots, data }
            };
        }
        self.busy.store(false, Ordering::Release);
    }
}

fn new_graph(capacity: usize) -> Hnsw<'static, f32, CosineDistance> {
    // 16 layers is hnsw_rs's maximum and ample for any size the cache reaches.
    Hnsw::new(GRAPH_M, capacity, 16, GRAPH_EF_BUILD, CosineDistance)
}

/// 1 - cosine similarity of unit vectors. hnsw_rs's own `DistDot` asserts that a dot
/// product never exceeds 1, which float rounding breaks for a vector and itself.
#[derive(Clone, Copy)]
struct CosineDistance;

impl Distance<f32> for CosineDistance {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

/// Written as four independent sums so the compiler vectorises it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0.0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (x, y) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for i in 0..8 {
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
        }
    }

    #[test]
    fn finds_the_nearest_in_its_namespace_only() {
        let index = CacheIndex::default();
        for i in 0..50 {
            index.insert(entry(i, "a", 1, unit(i as u64, 16)));
            index.insert(entry(1000 + i, "b", 2, unit(i as u64, 16)));
        }
        let found = index.nearest(&[1; 32], &unit(7, 16), 0.99, 0);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, "e7");
        assert_eq!(found[0].tenant, "a");
        assert!(index.nearest(&[3; 32], &unit(7, 16), 0.0, 0).is_empty());
        // Expired entries are not found.
        assert!(index
            .nearest(&[1; 32], &unit(7, 16), 0.99, 1_000)
            .is_empty());
    }

    #[test]
    fn a_large_namespace_moves_to_a_graph_and_still_finds_entries() {
        let index = CacheIndex::default();
        let n = FLAT_MAX + 500;
        for i in 0..n {
            index.insert(entry(i, "a", 1, unit(i as u64, 32)));
        }
        let mut hits = 0;
        for i in (0..n).step_by(97) {
            let found = index.nearest(&[1; 32], &unit(i as u64, 32), 0.999, 0);
            hits += usize::from(found.first().is_some_and(|f| f.id == format!("e{i}")));
        }
        let probes = n.div_ceil(97);
        assert!(hits * 100 >= probes * 95, "recall {hits}/{probes}");

        // Removing most entries marks them dead; compaction brings the rest back to a scan.
        for i in 0..n - 10 {
            assert!(index.remove(&format!("e{i}")));
        }
        assert!(index.nearest(&[1; 32], &unit(3, 32), 0.999, 0).is_empty());
        index.compact();
        let found = index.nearest(&[1; 32], &unit((n - 1) as u64, 32), 0.999, 0);
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
