//! What does this backend report to Prometheus and to the gateway's balancer?
//!
//! Hand-written text exposition: a handful of atomics does not justify a metrics crate.
//! The balancer reads `sluice_backend_requests_running` and `sluice_backend_requests_waiting`
//! to weigh backends, so their names are part of the interface. Recording must stay cheap
//! and lock-free: it runs on every request.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::engine::stats::{StatsSnapshot, TTFT_BUCKETS};

/// The routes counted by `sluice_backend_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    ChatCompletions,
    Completions,
    Embeddings,
    Models,
    Health,
    Metrics,
    SimGates,
}

impl Route {
    const ALL: [Route; 7] = [
        Route::ChatCompletions,
        Route::Completions,
        Route::Embeddings,
        Route::Models,
        Route::Health,
        Route::Metrics,
        Route::SimGates,
    ];

    fn label(self) -> &'static str {
        match self {
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
            Route::Embeddings => "/v1/embeddings",
            Route::Models => "/v1/models",
            Route::Health => "/health",
            Route::Metrics => "/metrics",
            Route::SimGates => "/sim/gates",
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    requests: [AtomicU64; Route::ALL.len()],
    running: AtomicI64,
    waiting: AtomicI64,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
}

impl Metrics {
    pub fn record_request(&self, route: Route) {
        self.requests[route as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request as running until the guard is dropped, however it ends.
    pub fn running(self: &Arc<Self>) -> RunningGuard {
        self.running.fetch_add(1, Ordering::Relaxed);
        RunningGuard(Arc::clone(self))
    }

    /// Counts a request as waiting for the engine until the guard is dropped.
    pub fn waiting(self: &Arc<Self>) -> WaitingGuard {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        WaitingGuard(Arc::clone(self))
    }

    pub fn add_prompt_tokens(&self, tokens: u64) {
        self.prompt_tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    pub fn add_generated_tokens(&self, tokens: u64) {
        self.generated_tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4), with each native decoder's engine
    /// statistics under its model name.
    pub fn render(&self, engine: &str, engines: &[(&str, StatsSnapshot)]) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = self.write(&mut out, engine, engines);
        let _ = write_engines(&mut out, engines);
        out
    }

    fn write(
        &self,
        out: &mut String,
        engine: &str,
        engines: &[(&str, StatsSnapshot)],
    ) -> std::fmt::Result {
        // A native request waiting in its engine's queue is in flight here, but not yet
        // generating: it counts as waiting, so the balancer sees the queue.
        let engine_waiting: i64 = engines.iter().map(|(_, s)| s.waiting as i64).sum();
        let (kv_used, kv_total) = engines.iter().fold((0, 0), |(u, t), (_, s)| {
            (u + s.kv_blocks_used, t + s.kv_blocks_total)
        });
        let kv_ratio = if kv_total == 0 {
            0.0
        } else {
            kv_used as f64 / kv_total as f64
        };
        writeln!(
            out,
            "# HELP sluice_backend_info Which engine serves this backend."
        )?;
        writeln!(out, "# TYPE sluice_backend_info gauge")?;
        writeln!(out, "sluice_backend_info{{engine=\"{engine}\"}} 1")?;

        writeln!(
            out,
            "# HELP sluice_backend_requests_total Requests received, by route."
        )?;
        writeln!(out, "# TYPE sluice_backend_requests_total counter")?;
        for route in Route::ALL {
            let count = self.requests[route as usize].load(Ordering::Relaxed);
            writeln!(
                out,
                "sluice_backend_requests_total{{route=\"{}\"}} {count}",
                route.label()
            )?;
        }

        writeln!(
            out,
            "# HELP sluice_backend_requests_running Requests generating now."
        )?;
        writeln!(out, "# TYPE sluice_backend_requests_running gauge")?;
        writeln!(
            out,
            "sluice_backend_requests_running {}",
            (self.running.load(Ordering::Relaxed) - engine_waiting).max(0)
        )?;

        // The simulated engine queues only past --sim-max-running and fills no KV cache;
        // the series exist for it too, so dashboards and the balancer read one schema.
        writeln!(
            out,
            "# HELP sluice_backend_requests_waiting Requests queued for the engine."
        )?;
        writeln!(out, "# TYPE sluice_backend_requests_waiting gauge")?;
        writeln!(
            out,
            "sluice_backend_requests_waiting {}",
            self.waiting.load(Ordering::Relaxed).max(0) + engine_waiting
        )?;
        writeln!(
            out,
            "# HELP sluice_backend_kv_cache_usage_ratio Share of KV-cache blocks in use."
        )?;
        writeln!(out, "# TYPE sluice_backend_kv_cache_usage_ratio gauge")?;
        writeln!(out, "sluice_backend_kv_cache_usage_ratio {kv_ratio}")?;

        writeln!(
            out,
            "# HELP sluice_backend_prompt_tokens_total Prompt tokens processed."
        )?;
        writeln!(out, "# TYPE sluice_backend_prompt_tokens_total counter")?;
        writeln!(
            out,
            "sluice_backend_prompt_tokens_total {}",
            self.prompt_tokens.load(Ordering::Relaxed)
        )?;
        writeln!(
            out,
            "# HELP sluice_backend_generation_tokens_total Tokens generated."
        )?;
        writeln!(out, "# TYPE sluice_backend_generation_tokens_total counter")?;
        writeln!(
            out,
            "sluice_backend_generation_tokens_total {}",
            self.generated_tokens.load(Ordering::Relaxed)
        )
    }
}

/// Each native decoder's queue, cache, throughput and time to first token, labelled with
/// its model name.
fn write_engines(out: &mut String, engines: &[(&str, StatsSnapshot)]) -> std::fmt::Result {
    if engines.is_empty() {
        return Ok(());
    }
    type Field = fn(&StatsSnapshot) -> f64;
    let families: [(&str, &str, &str, Field); 12] = [
        (
            "sluice_backend_engine_sequences_waiting",
            "gauge",
            "Sequences queued for the engine (not yet admitted, or preempted).",
            |s| s.waiting as f64,
        ),
        (
            "sluice_backend_engine_sequences_running",
            "gauge",
            "Sequences admitted to the engine's batch.",
            |s| s.running as f64,
        ),
        (
            "sluice_backend_kv_cache_blocks_used",
            "gauge",
            "Key/value cache blocks held by sequences.",
            |s| s.kv_blocks_used as f64,
        ),
        (
            "sluice_backend_kv_cache_blocks_total",
            "gauge",
            "Key/value cache blocks, in all.",
            |s| s.kv_blocks_total as f64,
        ),
        (
            "sluice_backend_engine_prefill_tokens_total",
            "counter",
            "Prompt tokens computed (recomputed ones after a preemption included).",
            |s| s.prefill_tokens as f64,
        ),
        (
            "sluice_backend_engine_decode_tokens_total",
            "counter",
            "Tokens decoded.",
            |s| s.decode_tokens as f64,
        ),
        (
            "sluice_backend_engine_preemptions_total",
            "counter",
            "Sequences sent back to wait because the key/value cache ran out.",
            |s| s.preemptions as f64,
        ),
        (
            "sluice_backend_engine_drafted_tokens_total",
            "counter",
            "Tokens drafted by prompt lookup and checked in a forward pass (speculative decoding).",
            |s| s.drafted_tokens as f64,
        ),
        (
            "sluice_backend_engine_accepted_tokens_total",
            "counter",
            "Drafted tokens the model confirmed; divided by the drafted ones, the acceptance rate.",
            |s| s.accepted_tokens as f64,
        ),
        (
            "sluice_backend_engine_prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens whose keys and values were found in the cache (automatic prefix caching), not computed.",
            |s| s.prefix_hit_tokens as f64,
        ),
        (
            "sluice_backend_prefill_tokens_per_second",
            "gauge",
            "Prompt tokens computed per second over the last 10 seconds.",
            |s| s.prefill_tokens_per_second,
        ),
        (
            "sluice_backend_decode_tokens_per_second",
            "gauge",
            "Tokens decoded per second over the last 10 seconds.",
            |s| s.decode_tokens_per_second,
        ),
    ];
    for (name, kind, help, field) in families {
        writeln!(out, "# HELP {name} {help}")?;
        writeln!(out, "# TYPE {name} {kind}")?;
        for (model, stats) in engines {
            writeln!(out, "{name}{{model=\"{model}\"}} {}", field(stats))?;
        }
    }
    let name = "sluice_backend_time_to_first_token_seconds";
    writeln!(
        out,
        "# HELP {name} From a request's arrival at the engine to its first generated token."
    )?;
    writeln!(out, "# TYPE {name} histogram")?;
    for (model, stats) in engines {
        let bounds = TTFT_BUCKETS.iter().map(|b| b.to_string());
        for (le, count) in bounds
            .chain(std::iter::once("+Inf".to_owned()))
            .zip(&stats.ttft_buckets)
        {
            writeln!(
                out,
                "{name}_bucket{{model=\"{model}\",le=\"{le}\"}} {count}"
            )?;
        }
        let count = stats.ttft_buckets.last().copied().unwrap_or(0);
        writeln!(
            out,
            "{name}_sum{{model=\"{model}\"}} {}",
            stats.ttft_sum_seconds
        )?;
        writeln!(out, "{name}_count{{model=\"{model}\"}} {count}")?;
    }
    Ok(())
}

#[derive(Debug)]
pub struct RunningGuard(Arc<Metrics>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct WaitingGuard(Arc<Metrics>);

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_requests_are_counted_until_they_end() {
        let metrics = Arc::new(Metrics::default());
        let guard = metrics.running();
        metrics.record_request(Route::Embeddings);
        metrics.add_generated_tokens(5);
        let text = metrics.render("sim", &[]);
        assert!(text.contains("sluice_backend_requests_running 1\n"));
        assert!(text.contains("sluice_backend_requests_total{route=\"/v1/embeddings\"} 1\n"));
        assert!(text.contains("sluice_backend_generation_tokens_total 5\n"));
        drop(guard);
        assert!(metrics
            .render("sim", &[])
            .contains("sluice_backend_requests_running 0\n"));
    }
}
