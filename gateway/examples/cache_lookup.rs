//! Response cache index benchmark: lookup latency (embedding excluded) and memory per entry
//! with N entries in one namespace, the worst case for a lookup.
//!
//! `cargo run --release -p sluice-gateway --example cache_lookup -- 10000 100000 1000000`
//!
//! Vectors are random unit vectors of MiniLM's 384 dimensions: as hard as it gets for an
//! approximate index (real embeddings cluster). Queries are stored vectors with noise added
//! (what a paraphrase looks like: the nearest entry should be found) and fresh random vectors
//! (a miss: nothing is near).

use hdrhistogram::Histogram;
use sluice_gateway::cache::index::{normalise, CacheIndex, IndexEntry, FLAT_MAX};
use std::time::Instant;

const DIM: usize = 384;
const QUERIES: usize = 2000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }

    fn unit(&mut self) -> Vec<f32> {
        let mut v: Vec<f32> = (0..DIM).map(|_| self.next()).collect();
        normalise(&mut v);
        v
    }
}

/// Where vectors come from: uniformly random on the sphere (no structure at all: the worst
/// case for a graph index), or like sentence embeddings, which vary along far fewer
/// directions than they have dimensions: a random point in a LATENT-dimensional space,
/// mapped to 384 dimensions by a fixed random matrix, plus a little noise.
struct Source {
    rng: Rng,
    projection: Option<Vec<f32>>,
}

const LATENT: usize = 32;

impl Source {
    fn new(kind: &str, seed: u64) -> Source {
        let mut rng = Rng(seed | 1);
        let projection = match kind {
            "random" => None,
            "embedding-like" => Some((0..LATENT * DIM).map(|_| rng.next()).collect()),
            other => panic!("unknown data {other}: random or embedding-like"),
        };
        Source { rng, projection }
    }

    fn next(&mut self) -> Vec<f32> {
        let Some(w) = &self.projection else {
            return self.rng.unit();
        };
        let z: Vec<f32> = (0..LATENT).map(|_| self.rng.next()).collect();
        let mut v: Vec<f32> = (0..DIM)
            .map(|d| {
                let row = &w[d * LATENT..(d + 1) * LATENT];
                row.iter().zip(&z).map(|(a, b)| a * b).sum::<f32>() + self.rng.next() * 0.02
            })
            .collect();
        normalise(&mut v);
        v
    }
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let data = std::env::var("DATA").unwrap_or_else(|_| "embedding-like".to_owned());
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("entry counts"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10_000, 100_000]
    } else {
        sizes
    };
    println!("Data: {data}.\n");
    println!("| entries | index | build (s) | memory per entry (bytes) | near p50 (µs) | near p99 (µs) | recall@1 | new p50 (µs) | new p99 (µs) | new found |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for n in sizes {
        run(n, &data);
    }
}

fn run(n: usize, data: &str) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ n as u64);
    let mut source = Source::new(data, 0x5EED ^ n as u64);
    let namespace = [7u8; 32];
    let before = rss();
    let index = CacheIndex::default();
    let started = Instant::now();
    // Keep a sample of stored vectors to query near.
    let mut probes = Vec::with_capacity(QUERIES);
    let stride = (n / QUERIES).max(1);
    for i in 0..n {
        let v = source.next();
        if i % stride == 0 && probes.len() < QUERIES {
            probes.push((i, v.clone()));
        }
        let mut exact = [0u8; 32];
        exact[..8].copy_from_slice(&(i as u64).to_le_bytes());
        index.insert(IndexEntry {
            id: format!("{i:08}"),
            tenant: "bench".into(),
            model: "m".into(),
            namespace,
            exact,
            expires_ms: i64::MAX,
            embedding: v,
            body_bytes: 0,
        });
    }
    let build = started.elapsed().as_secs_f64();
    let per_entry = rss().saturating_sub(before) / n as u64;

    let mut hit = Histogram::<u64>::new(3).unwrap();
    let mut found = 0;
    for (i, v) in &probes {
        let mut q: Vec<f32> = v.iter().map(|x| x + rng.next() * 0.01).collect();
        normalise(&mut q);
        let t = Instant::now();
        let nearest = index.nearest(&namespace, &q, 0.9, 3, 0);
        hit.record(t.elapsed().as_nanos() as u64).unwrap();
        found += usize::from(nearest.first().is_some_and(|f| f.id == format!("{i:08}")));
    }
    let mut miss = Histogram::<u64>::new(3).unwrap();
    let mut misses_found = 0;
    for _ in 0..QUERIES {
        let q = source.next();
        let t = Instant::now();
        let nearest = index.nearest(&namespace, &q, 0.9, 3, 0);
        miss.record(t.elapsed().as_nanos() as u64).unwrap();
        misses_found += nearest.len();
    }
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "| {n} | {} | {build:.1} | {per_entry} | {:.1} | {:.1} | {:.3} | {:.1} | {:.1} | {misses_found} |",
        if n > FLAT_MAX { "lists" } else { "scan" },
        us(&hit, 0.5),
        us(&hit, 0.99),
        found as f64 / probes.len() as f64,
        us(&miss, 0.5),
        us(&miss, 0.99),
    );
}
