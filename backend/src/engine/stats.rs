//! How is a decoder's engine doing? What its engine thread says about itself, for
//! `/metrics`: its queue, its key/value cache, its throughput and its time to first token.
//!
//! The engine writes after every step and scrapes read whenever they come, so everything is
//! an atomic except the short window of recent steps behind the tokens-per-second figures,
//! whose lock is held for a push or a sum, never across a step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How far back the tokens-per-second figures look.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Upper bounds of the time-to-first-token histogram's buckets, in seconds: a CPU prefill
/// of a long prompt can take seconds.
pub const TTFT_BUCKETS: [f64; 12] = [
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0,
];

/// One step's worth of change, as the scheduler reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepReport {
    pub waiting: usize,
    pub running: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    /// Prompt tokens (or recomputed ones, after a preemption) this step fed.
    pub prefill_tokens: u64,
    /// Tokens this step decoded: one per decoding sequence, and each drafted token it kept.
    pub decode_tokens: u64,
    pub preemptions: u64,
    /// Tokens drafted by prompt lookup and fed this step, and how many of them were kept.
    pub drafted_tokens: u64,
    pub accepted_tokens: u64,
    /// Prompt tokens whose keys and values were found in the cache, not computed.
    pub prefix_hit_tokens: u64,
}

#[derive(Debug, Default)]
pub struct EngineStats {
    waiting: AtomicU64,
    running: AtomicU64,
    kv_blocks_used: AtomicU64,
    kv_blocks_total: AtomicU64,
    prefill_tokens: AtomicU64,
    decode_tokens: AtomicU64,
    preemptions: AtomicU64,
    drafted_tokens: AtomicU64,
    accepted_tokens: AtomicU64,
    prefix_hit_tokens: AtomicU64,
    /// (when, prefill tokens, decode tokens) of the steps within [`RATE_WINDOW`].
    recent: Mutex<VecDeque<(Instant, u64, u64)>>,
    /// Cumulative counts per [`TTFT_BUCKETS`] bound, then the +Inf count.
    ttft_buckets: [AtomicU64; TTFT_BUCKETS.len() + 1],
    ttft_sum_micros: AtomicU64,
}

/// A consistent-enough reading of [`EngineStats`] for one scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsSnapshot {
    pub waiting: u64,
    pub running: u64,
    pub kv_blocks_used: u64,
    pub kv_blocks_total: u64,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    pub preemptions: u64,
    pub drafted_tokens: u64,
    pub accepted_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    /// Cumulative, one per [`TTFT_BUCKETS`] bound and a last for +Inf.
    pub ttft_buckets: Vec<u64>,
    pub ttft_sum_seconds: f64,
}

impl EngineStats {
    /// The cache's size, known before any step runs.
    pub fn set_kv_blocks_total(&self, blocks: usize) {
        self.kv_blocks_total.store(blocks as u64, Ordering::Relaxed);
    }

    pub fn record_step(&self, report: StepReport) {
        self.record_step_at(report, Instant::now());
    }

    fn record_step_at(&self, report: StepReport, now: Instant) {
        let set = |gauge: &AtomicU64, value: usize| gauge.store(value as u64, Ordering::Relaxed);
        set(&self.waiting, report.waiting);
        set(&self.running, report.running);
        set(&self.kv_blocks_used, report.kv_blocks_used);
        set(&self.kv_blocks_total, report.kv_blocks_total);
        self.prefill_tokens
            .fetch_add(report.prefill_tokens, Ordering::Relaxed);
        self.decode_tokens
            .fetch_add(report.decode_tokens, Ordering::Relaxed);
        self.preemptions
            .fetch_add(report.preemptions, Ordering::Relaxed);
        self.drafted_tokens
            .fetch_add(report.drafted_tokens, Ordering::Relaxed);
        self.accepted_tokens
            .fetch_add(report.accepted_tokens, Ordering::Relaxed);
        self.prefix_hit_tokens
            .fetch_add(report.prefix_hit_tokens, Ordering::Relaxed);
        if report.prefill_tokens + report.decode_tokens > 0 {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            recent.push_back((now, report.prefill_tokens, report.decode_tokens));
            while recent
                .front()
                .is_some_and(|(at, _, _)| now.duration_since(*at) > RATE_WINDOW)
            {
                recent.pop_front();
            }
        }
    }

    /// From a request's arrival to its first generated token.
    pub fn record_first_token(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let first = TTFT_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(TTFT_BUCKETS.len());
        for bucket in &self.ttft_buckets[first..] {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.ttft_sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        self.snapshot_at(Instant::now())
    }

    fn snapshot_at(&self, now: Instant) -> StatsSnapshot {
        let (prefill, decode) = self
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(at, _, _)| now.saturating_duration_since(*at) <= RATE_WINDOW)
            .fold((0, 0), |(p, d), (_, prefill, decode)| {
                (p + prefill, d + decode)
            });
        let window = RATE_WINDOW.as_secs_f64();
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            waiting: get(&self.waiting),
            running: get(&self.running),
            kv_blocks_used: get(&self.kv_blocks_used),
            kv_blocks_total: get(&self.kv_blocks_total),
            prefill_tokens: get(&self.prefill_tokens),
            decode_tokens: get(&self.decode_tokens),
            preemptions: get(&self.preemptions),
            drafted_tokens: get(&self.drafted_tokens),
            accepted_tokens: get(&self.accepted_tokens),
            prefix_hit_tokens: get(&self.prefix_hit_tokens),
            prefill_tokens_per_second: prefill as f64 / window,
            decode_tokens_per_second: decode as f64 / window,
            ttft_buckets: self.ttft_buckets.iter().map(get).collect(),
            ttft_sum_seconds: get(&self.ttft_sum_micros) as f64 / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_add_up_and_rates_cover_only_the_recent_window() {
        let stats = EngineStats::default();
        let start = Instant::now();
        let step = |prefill, decode| StepReport {
            waiting: 1,
            running: 2,
            kv_blocks_used: 3,
            kv_blocks_total: 10,
            prefill_tokens: prefill,
            decode_tokens: decode,
            preemptions: 0,
            drafted_tokens: decode,
            accepted_tokens: decode / 2,
            prefix_hit_tokens: prefill / 4,
        };
        stats.record_step_at(step(100, 0), start);
        stats.record_step_at(step(0, 4), start + Duration::from_secs(5));
        let now = start + Duration::from_secs(6);
        let snapshot = stats.snapshot_at(now);
        assert_eq!((snapshot.prefill_tokens, snapshot.decode_tokens), (100, 4));
        assert_eq!((snapshot.drafted_tokens, snapshot.accepted_tokens), (4, 2));
        assert_eq!(snapshot.prefix_hit_tokens, 25);
        assert_eq!(snapshot.prefill_tokens_per_second, 10.0);
        assert_eq!(snapshot.decode_tokens_per_second, 0.4);
        assert_eq!((snapshot.kv_blocks_used, snapshot.kv_blocks_total), (3, 10));
        // Past the window, the prefill step no longer counts towards the rate, but does
        // towards the total.
        let later = stats.snapshot_at(start + Duration::from_secs(12));
        assert_eq!(later.prefill_tokens_per_second, 0.0);
        assert_eq!(later.decode_tokens_per_second, 0.4);
        assert_eq!(later.prefill_tokens, 100);
    }

    #[test]
    fn first_tokens_fall_into_cumulative_buckets() {
        let stats = EngineStats::default();
        stats.record_first_token(Duration::from_millis(30));
        stats.record_first_token(Duration::from_secs(500));
        let snapshot = stats.snapshot();
        // 30 ms is above 25 ms and within 50 ms; 500 s is only in +Inf.
        assert_eq!(snapshot.ttft_buckets[0], 0);
        assert_eq!(snapshot.ttft_buckets[1], 1);
        assert_eq!(snapshot.ttft_buckets[TTFT_BUCKETS.len() - 1], 1);
        assert_eq!(snapshot.ttft_buckets[TTFT_BUCKETS.len()], 2);
        assert!((snapshot.ttft_sum_seconds - 500.03).abs() < 1e-9);
    }
}
