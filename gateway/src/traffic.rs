//! What is the fleet doing right now? Live traffic for the console and
//! `GET /admin/v1/traffic`: requests per second, errors by status, latency and time to first
//! byte percentiles, tokens per second and the cache's hit rate, in buckets of a few seconds
//! over the last hour.
//!
//! Each replica looks at its own metrics every [`INTERVAL_SECS`] and adds what they counted
//! since its last look to the store's bucket for that interval. Buckets are aligned to the
//! wall clock, so on a shared store (Redis) every replica adds to the same bucket and a read
//! sees the fleet; the embedded store serves one replica, so it sees that one. Nothing here
//! runs on a request's path: requests only update the metrics they already update.

use crate::metrics::{Totals, LATENCY_BUCKETS};
use crate::store::Store;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use utoipa::ToSchema;

/// The width of a bucket, in seconds.
pub const INTERVAL_SECS: i64 = 5;
/// How long the store keeps a bucket.
pub const RETENTION_SECS: i64 = 3600;

/// One bucket's counts by field: `requests`, `status:CODE`, `cache:STATUS`, `latency:I` and
/// `ttfb:I` (per latency bucket I of [`LATENCY_BUCKETS`], then one past the last),
/// `tokens:prompt`, `tokens:completion`. Counts of several replicas add up field by field.
pub type Counts = BTreeMap<String, u64>;

/// What was counted between two looks at the metrics, as the fields of [`Counts`]; fields
/// that did not move are left out.
pub fn counted_between(before: &Totals, now: &Totals) -> Counts {
    let mut counts = Counts::new();
    let mut add = |field: String, n: u64| {
        if n > 0 {
            *counts.entry(field).or_default() += n;
        }
    };
    let mut requests = 0;
    for (status, n) in &now.by_status {
        let n = n.saturating_sub(before.by_status.get(status).copied().unwrap_or(0));
        requests += n;
        add(format!("status:{status}"), n);
    }
    add("requests".to_owned(), requests);
    for (cache, n) in &now.by_cache {
        if !cache.is_empty() {
            let n = n.saturating_sub(before.by_cache.get(cache).copied().unwrap_or(0));
            add(format!("cache:{cache}"), n);
        }
    }
    for (name, now, before) in [
        ("latency", &now.duration, &before.duration),
        ("ttfb", &now.first_byte, &before.first_byte),
    ] {
        for (i, n) in now.iter().enumerate() {
            add(
                format!("{name}:{i}"),
                n.saturating_sub(before.get(i).copied().unwrap_or(0)),
            );
        }
    }
    add(
        "tokens:prompt".to_owned(),
        now.prompt_tokens.saturating_sub(before.prompt_tokens),
    );
    add(
        "tokens:completion".to_owned(),
        now.completion_tokens
            .saturating_sub(before.completion_tokens),
    );
    counts
}

/// Adds this replica's traffic to the store's buckets until the process ends. A bucket the
/// store could not take is added to the next one instead (the counts are kept, not lost).
pub async fn record(store: Arc<dyn Store>) {
    let mut sent = crate::metrics::get().totals();
    loop {
        let now_ms = crate::clock::now_ms();
        let interval_ms = INTERVAL_SECS * 1000;
        // Wake just after the bucket under way ends, so its whole interval is in it.
        let next_ms = (now_ms / interval_ms + 1) * interval_ms;
        tokio::time::sleep(Duration::from_millis((next_ms - now_ms) as u64 + 20)).await;
        let bucket = next_ms / 1000 - INTERVAL_SECS;
        let totals = crate::metrics::get().totals();
        let counts = counted_between(&sent, &totals);
        if counts.is_empty() {
            continue;
        }
        match store.add_traffic(bucket, &counts, RETENTION_SECS).await {
            Ok(()) => sent = totals,
            Err(e) => {
                tracing::debug!(error = %e, "live traffic not recorded; added to the next bucket")
            }
        }
    }
}

/// Live traffic over a span, one point per bucket, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct TrafficView {
    /// Always `traffic`.
    pub object: &'static str,
    /// The width of each point's bucket, in seconds.
    pub interval_secs: i64,
    /// Whose traffic: `fleet` (every replica on the shared store) or `replica` (this one:
    /// the embedded store).
    pub scope: &'static str,
    pub points: Vec<TrafficPoint>,
}

/// One bucket. Rates are per second over the bucket; percentiles are estimated from the
/// latency histogram (linear within a bucket, as Prometheus's `histogram_quantile`), and are
/// `null` when nothing was answered.
#[derive(Debug, Serialize, ToSchema, PartialEq)]
pub struct TrafficPoint {
    /// The bucket's start, unix seconds.
    pub at: i64,
    pub requests: u64,
    pub requests_per_sec: f64,
    /// Answers with status 400 or above, by status.
    pub errors: BTreeMap<u16, u64>,
    /// The share of answers with status 500 or above (0 to 1).
    pub server_error_rate: f64,
    /// The share of answers with status 400 or above (0 to 1).
    pub error_rate: f64,
    #[schema(required)]
    pub latency_p50_ms: Option<f64>,
    #[schema(required)]
    pub latency_p99_ms: Option<f64>,
    /// Time to first byte (to first token for streams).
    #[schema(required)]
    pub ttft_p50_ms: Option<f64>,
    #[schema(required)]
    pub ttft_p99_ms: Option<f64>,
    pub prompt_tokens_per_sec: f64,
    pub completion_tokens_per_sec: f64,
    /// Exact and semantic hits over the cache's lookups; `null` without lookups.
    #[schema(required)]
    pub cache_hit_rate: Option<f64>,
}

/// The points for buckets `from` to `to` (unix seconds, bucket starts, `to` exclusive), with
/// an empty point for every bucket nothing was counted in.
pub fn points(buckets: &[(i64, Counts)], from: i64, to: i64) -> Vec<TrafficPoint> {
    let by_start: BTreeMap<i64, &Counts> = buckets.iter().map(|(at, c)| (*at, c)).collect();
    let empty = Counts::new();
    (from..to)
        .step_by(INTERVAL_SECS as usize)
        .map(|at| point(at, by_start.get(&at).copied().unwrap_or(&empty)))
        .collect()
}

fn point(at: i64, counts: &Counts) -> TrafficPoint {
    let get = |field: &str| counts.get(field).copied().unwrap_or(0);
    let per_sec = |n: u64| n as f64 / INTERVAL_SECS as f64;
    let requests = get("requests");
    let errors: BTreeMap<u16, u64> = counts
        .iter()
        .filter_map(|(field, n)| Some((field.strip_prefix("status:")?.parse().ok()?, *n)))
        .filter(|(status, _)| *status >= 400)
        .collect();
    let share = |n: u64| match requests {
        0 => 0.0,
        all => n as f64 / all as f64,
    };
    let histogram = |name: &str| -> Vec<u64> {
        (0..=LATENCY_BUCKETS.len())
            .map(|i| get(&format!("{name}:{i}")))
            .collect()
    };
    let (latency, ttfb) = (histogram("latency"), histogram("ttfb"));
    let hits = get("cache:hit") + get("cache:semantic");
    let lookups = hits + get("cache:miss");
    TrafficPoint {
        at,
        requests,
        requests_per_sec: per_sec(requests),
        server_error_rate: share(errors.range(500..).map(|(_, n)| n).sum()),
        error_rate: share(errors.values().sum()),
        errors,
        latency_p50_ms: quantile_ms(&latency, 0.5),
        latency_p99_ms: quantile_ms(&latency, 0.99),
        ttft_p50_ms: quantile_ms(&ttfb, 0.5),
        ttft_p99_ms: quantile_ms(&ttfb, 0.99),
        prompt_tokens_per_sec: per_sec(get("tokens:prompt")),
        completion_tokens_per_sec: per_sec(get("tokens:completion")),
        cache_hit_rate: (lookups > 0).then(|| hits as f64 / lookups as f64),
    }
}

/// The `q` quantile of a histogram with one count per [`LATENCY_BUCKETS`] bound (then one
/// for longer), in milliseconds: linear within the bucket it falls in; in the last, open
/// bucket, the last bound (what can be said of it is "at least this").
fn quantile_ms(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &n) in counts.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let Some(&upper) = LATENCY_BUCKETS.get(i) else {
                break;
            };
            let lower = if i == 0 { 0.0 } else { LATENCY_BUCKETS[i - 1] };
            let within = (rank - below as f64) / n as f64;
            return Some((lower + (upper - lower) * within) * 1000.0);
        }
        below += n;
    }
    LATENCY_BUCKETS.last().map(|last| last * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(statuses: &[(u16, u64)], fast: u64, slow: u64) -> Totals {
        let mut duration = vec![0; LATENCY_BUCKETS.len() + 1];
        duration[0] = fast; // at most 1 ms
        duration[LATENCY_BUCKETS.len()] = slow; // over 2 minutes
        Totals {
            by_status: statuses.iter().copied().collect(),
            by_cache: [
                ("hit".to_owned(), 1),
                ("miss".to_owned(), 3),
                (String::new(), 9),
            ]
            .into_iter()
            .collect(),
            duration: duration.clone(),
            first_byte: duration,
            prompt_tokens: 10,
            completion_tokens: 20,
        }
    }

    #[test]
    fn what_was_counted_between_two_looks_is_their_difference() {
        let before = totals(&[(200, 5)], 5, 0);
        let mut now = totals(&[(200, 9), (503, 1)], 9, 1);
        now.by_cache.insert("hit".to_owned(), 3);
        now.prompt_tokens = 40;
        let counts = counted_between(&before, &now);
        assert_eq!(counts["requests"], 5);
        assert_eq!(counts["status:200"], 4);
        assert_eq!(counts["status:503"], 1);
        assert_eq!(counts["cache:hit"], 2);
        assert!(
            !counts.contains_key("cache:miss"),
            "unchanged fields are left out"
        );
        assert!(
            !counts.contains_key("cache:"),
            "requests the cache did not see"
        );
        assert_eq!(counts["latency:0"], 4);
        assert_eq!(counts[&format!("latency:{}", LATENCY_BUCKETS.len())], 1);
        assert_eq!(counts["tokens:prompt"], 30);
        assert!(!counts.contains_key("tokens:completion"));
        assert!(counted_between(&now, &now).is_empty());
    }

    #[test]
    fn a_point_reads_rates_shares_and_percentiles_from_the_counts() {
        let mut counts = Counts::new();
        counts.insert("requests".into(), 100);
        counts.insert("status:200".into(), 90);
        counts.insert("status:429".into(), 6);
        counts.insert("status:502".into(), 4);
        // 98 answers within 1-2.5 ms, 2 within 1-2.5 s.
        counts.insert("latency:1".into(), 98);
        counts.insert("latency:9".into(), 2);
        counts.insert("tokens:completion".into(), 500);
        counts.insert("cache:hit".into(), 1);
        counts.insert("cache:semantic".into(), 1);
        counts.insert("cache:miss".into(), 2);
        let p = point(1_000, &counts);
        assert_eq!(p.requests_per_sec, 100.0 / INTERVAL_SECS as f64);
        assert_eq!(p.errors, [(429, 6), (502, 4)].into_iter().collect());
        assert!((p.error_rate - 0.10).abs() < 1e-9);
        assert!((p.server_error_rate - 0.04).abs() < 1e-9);
        let p50 = p.latency_p50_ms.unwrap();
        assert!((1.0..=2.5).contains(&p50), "{p50}");
        let p99 = p.latency_p99_ms.unwrap();
        assert!((500.0..=1000.0).contains(&p99), "{p99}");
        assert_eq!(p.ttft_p50_ms, None, "nothing timed to first byte");
        assert_eq!(p.completion_tokens_per_sec, 500.0 / INTERVAL_SECS as f64);
        assert_eq!(p.cache_hit_rate, Some(0.5));
    }

    #[test]
    fn every_bucket_of_the_span_has_a_point() {
        let mut counts = Counts::new();
        counts.insert("requests".into(), 5);
        let span = points(&[(1_010, counts)], 1_000, 1_030);
        assert_eq!(
            span.iter().map(|p| (p.at, p.requests)).collect::<Vec<_>>(),
            [
                (1_000, 0),
                (1_005, 0),
                (1_010, 5),
                (1_015, 0),
                (1_020, 0),
                (1_025, 0)
            ]
        );
        assert_eq!(span[0].cache_hit_rate, None);
        assert_eq!(span[0].latency_p99_ms, None);
    }

    #[test]
    fn a_quantile_in_the_open_bucket_is_the_last_bound() {
        let mut counts = vec![0; LATENCY_BUCKETS.len() + 1];
        counts[LATENCY_BUCKETS.len()] = 3;
        assert_eq!(quantile_ms(&counts, 0.5), Some(120_000.0));
    }
}
