//! What has the cache done on this replica? Its counters, as the admin API and the metrics
//! show them.

use super::CacheStatus;
use lru::LruCache;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};

/// The cache's counters on this replica, as `GET /admin/v1/cache/stats` and the metrics
/// show them.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct CacheStats {
    pub entries: usize,
    /// Bytes the entries hold against this replica's budget, the budget, and entries evicted
    /// to keep within it since start.
    pub bytes: u64,
    pub max_bytes: u64,
    pub evicted: u64,
    pub namespaces: usize,
    /// Whether semantic matching is on (an embeddings endpoint is configured).
    pub semantic: bool,
    pub lookups: u64,
    pub hits: u64,
    pub semantic_hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
    pub semantic_hit_rate: f64,
    /// The semantic candidates checked, verified and turned down (by which check).
    pub verification: super::verify::VerificationStats,
    pub stored: u64,
    pub embedding_failures: u64,
    pub store_failures: u64,
    /// Tenants with entries or with lookups among the [`TENANTS_COUNTED`] most recently
    /// active on this replica.
    pub by_tenant: std::collections::BTreeMap<String, TenantCacheStats>,
}

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct TenantCacheStats {
    pub entries: u64,
    pub hits: u64,
    pub semantic_hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
}

/// How many tenants' lookup counters a replica keeps: those of the tenants that looked up
/// least recently are dropped beyond it (the totals stay exact), so counters cannot grow
/// with every tenant and JWT subject a replica ever sees.
pub const TENANTS_COUNTED: usize = 10_000;

/// Lookups and how they were answered, in all and per tenant.
pub(super) struct Lookups {
    total: [AtomicU64; 3],
    by_tenant: Mutex<LruCache<String, LookupCounts>>,
}

/// Lookups by how they were answered.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct LookupCounts {
    pub hits: u64,
    pub semantic_hits: u64,
    pub misses: u64,
}

impl LookupCounts {
    fn add(&mut self, status: CacheStatus) {
        match status {
            CacheStatus::Hit => self.hits += 1,
            CacheStatus::Semantic => self.semantic_hits += 1,
            CacheStatus::Miss => self.misses += 1,
        }
    }

    /// Answered from the cache, exact or semantic, of all lookups.
    pub fn hit_rate(&self) -> f64 {
        rate(
            self.hits + self.semantic_hits,
            self.hits + self.semantic_hits + self.misses,
        )
    }
}

impl Default for Lookups {
    fn default() -> Self {
        Lookups {
            total: Default::default(),
            by_tenant: Mutex::new(LruCache::new(
                NonZeroUsize::new(TENANTS_COUNTED).expect("not zero"),
            )),
        }
    }
}

impl Lookups {
    pub fn count(&self, tenant: &str, status: CacheStatus) {
        let slot = match status {
            CacheStatus::Hit => 0,
            CacheStatus::Semantic => 1,
            CacheStatus::Miss => 2,
        };
        self.total[slot].fetch_add(1, Ordering::Relaxed);
        let mut by_tenant = self.by_tenant.lock();
        match by_tenant.get_mut(tenant) {
            Some(counts) => counts.add(status),
            None => {
                let mut counts = LookupCounts::default();
                counts.add(status);
                by_tenant.push(tenant.to_owned(), counts);
            }
        }
    }

    pub fn total(&self) -> LookupCounts {
        let [hits, semantic_hits, misses] =
            self.total.each_ref().map(|n| n.load(Ordering::Relaxed));
        LookupCounts {
            hits,
            semantic_hits,
            misses,
        }
    }

    pub fn by_tenant(&self) -> HashMap<String, LookupCounts> {
        let by_tenant = self.by_tenant.lock();
        by_tenant.iter().map(|(t, c)| (t.clone(), *c)).collect()
    }
}

/// `part` of `all`, 0 when there is none.
pub(super) fn rate(part: u64, all: u64) -> f64 {
    if all == 0 {
        0.0
    } else {
        part as f64 / all as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_counters_are_bounded_and_totals_stay_exact() {
        let lookups = Lookups::default();
        let tenants = TENANTS_COUNTED + 500;
        for i in 0..tenants {
            lookups.count(&format!("tenant-{i}"), CacheStatus::Miss);
        }
        lookups.count("tenant-0", CacheStatus::Hit);
        let by_tenant = lookups.by_tenant();
        assert_eq!(by_tenant.len(), TENANTS_COUNTED);
        // The tenants that looked up least recently are the ones dropped.
        assert!(!by_tenant.contains_key("tenant-1"));
        assert!(by_tenant.contains_key(&format!("tenant-{}", tenants - 1)));
        // tenant-0 was dropped, then counted again from its next lookup.
        assert_eq!(by_tenant["tenant-0"].hits, 1);
        assert_eq!(by_tenant["tenant-0"].misses, 0);
        let total = lookups.total();
        assert_eq!((total.hits, total.misses), (1, tenants as u64));
    }
}
