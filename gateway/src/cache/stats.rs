//! What has the cache done on this replica? Its counters, as the admin API and the metrics
//! show them.

/// The cache's counters on this replica, as `GET /admin/v1/cache/stats` and the metrics
/// show them.
#[derive(Debug, Clone, serde::Serialize)]
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
    pub guard_rejections: u64,
    pub stored: u64,
    pub embedding_failures: u64,
    pub store_failures: u64,
    pub by_tenant: std::collections::BTreeMap<String, TenantCacheStats>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TenantCacheStats {
    pub entries: u64,
    pub hits: u64,
    pub semantic_hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
}
