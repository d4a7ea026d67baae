//! What this backend reports to Prometheus and to the gateway's balancer.
//!
//! Hand-written text exposition: a handful of atomics does not justify a metrics crate.
//! The balancer reads `sluice_backend_requests_running` and `sluice_backend_requests_waiting`
//! to weigh backends, so their names are part of the interface. Recording must stay cheap
//! and lock-free: it runs on every request.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

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

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, engine: &str) -> String {
        let mut out = String::with_capacity(2048);
        // Writing to a String cannot fail.
        let _ = self.write(&mut out, engine);
        out
    }

    fn write(&self, out: &mut String, engine: &str) -> std::fmt::Result {
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
            self.running.load(Ordering::Relaxed).max(0)
        )?;

        // The simulated engine queues only past --sim-max-running and fills no KV cache;
        // the series exist so dashboards and the balancer read one schema.
        writeln!(
            out,
            "# HELP sluice_backend_requests_waiting Requests queued for the engine."
        )?;
        writeln!(out, "# TYPE sluice_backend_requests_waiting gauge")?;
        writeln!(
            out,
            "sluice_backend_requests_waiting {}",
            self.waiting.load(Ordering::Relaxed).max(0)
        )?;
        writeln!(
            out,
            "# HELP sluice_backend_kv_cache_usage_ratio Share of KV-cache blocks in use."
        )?;
        writeln!(out, "# TYPE sluice_backend_kv_cache_usage_ratio gauge")?;
        writeln!(out, "sluice_backend_kv_cache_usage_ratio 0")?;

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
        let text = metrics.render("sim");
        assert!(text.contains("sluice_backend_requests_running 1\n"));
        assert!(text.contains("sluice_backend_requests_total{route=\"/v1/embeddings\"} 1\n"));
        assert!(text.contains("sluice_backend_generation_tokens_total 5\n"));
        drop(guard);
        assert!(metrics
            .render("sim")
            .contains("sluice_backend_requests_running 0\n"));
    }
}
