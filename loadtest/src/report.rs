//! What a run measured: HDR histograms and counters while it runs, a report (table or JSON)
//! when it ends, and the pair-by-pair ratios of a comparison.

use crate::client::{Outcome, Sample};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// Latencies are recorded in microseconds, from 1 µs to an hour, at 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Collects samples as they arrive; owned by one task, so no locks.
pub struct Recorder {
    latency: Histogram<u64>,
    ttft: Histogram<u64>,
    inter_token: Histogram<u64>,
    /// Per-request output tokens per second, in thousandths.
    tokens_per_sec: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    cache: BTreeMap<String, u64>,
    rate_limit_headers: u64,
    output_tokens: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            latency: histogram(),
            ttft: histogram(),
            inter_token: histogram(),
            tokens_per_sec: Histogram::new_with_bounds(1, 1_000_000_000, 3).expect("bounds"),
            ok: 0,
            errors: BTreeMap::new(),
            cache: BTreeMap::new(),
            rate_limit_headers: 0,
            output_tokens: 0,
        }
    }
}

impl Recorder {
    pub fn record(&mut self, sample: &Sample) {
        self.latency.saturating_record(micros(sample.latency));
        match &sample.outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Http { status, code } => {
                let label = match code {
                    Some(code) => format!("{status} {code}"),
                    None => status.to_string(),
                };
                *self.errors.entry(label).or_default() += 1;
            }
            Outcome::Transport(kind) => {
                *self.errors.entry(format!("transport {kind}")).or_default() += 1;
            }
        }
        if let Some(ttft) = sample.ttft {
            self.ttft.saturating_record(micros(ttft));
        }
        for gap in &sample.inter_token {
            self.inter_token.saturating_record(micros(*gap));
        }
        if let Some(t) = sample.generation_time.filter(|t| !t.is_zero()) {
            let per_sec = sample.output_tokens as f64 / t.as_secs_f64();
            self.tokens_per_sec
                .saturating_record((per_sec * 1000.0) as u64);
        }
        self.output_tokens += sample.output_tokens;
        if let Some(cache) = &sample.cache {
            *self.cache.entry(cache.clone()).or_default() += 1;
        }
        self.rate_limit_headers += u64::from(sample.rate_limit_headers);
    }

    pub fn report(&self, target: &str, elapsed: Duration, sent: u64, dropped: u64) -> Report {
        let completed = self.latency.len();
        let secs = elapsed.as_secs_f64().max(1e-9);
        Report {
            target: target.to_owned(),
            elapsed_secs: secs,
            sent,
            completed,
            dropped,
            throughput_rps: completed as f64 / secs,
            ok: self.ok,
            errors: self.errors.clone(),
            latency_ms: Percentiles::of(&self.latency, 1000.0),
            ttft_ms: Percentiles::of(&self.ttft, 1000.0),
            inter_token_ms: Percentiles::of(&self.inter_token, 1000.0),
            tokens_per_sec_per_request: Percentiles::of(&self.tokens_per_sec, 1000.0),
            output_tokens: self.output_tokens,
            output_tokens_per_sec: self.output_tokens as f64 / secs,
            cache: self.cache.clone(),
            rate_limit_header_responses: self.rate_limit_headers,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// `None` for an empty histogram; values divided by `scale` (µs → ms is 1000).
    fn of(h: &Histogram<u64>, scale: f64) -> Option<Percentiles> {
        if h.is_empty() {
            return None;
        }
        let q = |q: f64| h.value_at_quantile(q) as f64 / scale;
        Some(Percentiles {
            count: h.len(),
            mean: h.mean() / scale,
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: h.max() as f64 / scale,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    pub elapsed_secs: f64,
    pub sent: u64,
    pub completed: u64,
    /// Not sent because too many requests were already in flight.
    pub dropped: u64,
    pub throughput_rps: f64,
    pub ok: u64,
    /// By status and OpenAI error code ("429 rate_limit_exceeded"), or transport failure.
    pub errors: BTreeMap<String, u64>,
    pub latency_ms: Option<Percentiles>,
    pub ttft_ms: Option<Percentiles>,
    pub inter_token_ms: Option<Percentiles>,
    pub tokens_per_sec_per_request: Option<Percentiles>,
    pub output_tokens: u64,
    pub output_tokens_per_sec: f64,
    /// Counts of `x-sluice-cache` values.
    pub cache: BTreeMap<String, u64>,
    pub rate_limit_header_responses: u64,
}

fn row(out: &mut String, name: &str, p: &Option<Percentiles>, unit: &str) {
    if let Some(p) = p {
        let _ = writeln!(
            out,
            "  {name:<16} p50 {:>9.3}  p90 {:>9.3}  p99 {:>9.3}  p99.9 {:>9.3}  max {:>9.3} {unit}",
            p.p50, p.p90, p.p99, p.p999, p.max
        );
    }
}

impl Report {
    /// The human table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "target {}", self.target);
        let _ = writeln!(
            out,
            "  {:.1} s: {} sent, {} completed, {} ok, {} dropped; {:.1} req/s",
            self.elapsed_secs,
            self.sent,
            self.completed,
            self.ok,
            self.dropped,
            self.throughput_rps
        );
        for (label, n) in &self.errors {
            let _ = writeln!(out, "  error {label}: {n}");
        }
        row(&mut out, "latency", &self.latency_ms, "ms");
        row(&mut out, "ttft", &self.ttft_ms, "ms");
        row(&mut out, "inter-token", &self.inter_token_ms, "ms");
        row(
            &mut out,
            "tokens/s/request",
            &self.tokens_per_sec_per_request,
            "",
        );
        if self.output_tokens > 0 {
            let _ = writeln!(
                out,
                "  output tokens {} ({:.1}/s)",
                self.output_tokens, self.output_tokens_per_sec
            );
        }
        if !self.cache.is_empty() {
            let cache: Vec<String> = self.cache.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(out, "  x-sluice-cache: {}", cache.join(", "));
        }
        if self.rate_limit_header_responses > 0 {
            let _ = writeln!(
                out,
                "  responses with x-ratelimit-* headers: {}",
                self.rate_limit_header_responses
            );
        }
        out
    }
}

/// B measured against A, from one A-then-B pair of runs.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub throughput: f64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub added_p50_ms: Option<f64>,
    pub added_p99_ms: Option<f64>,
}

impl Ratio {
    pub fn of(a: &Report, b: &Report) -> Ratio {
        let pair = |f: fn(&Percentiles) -> f64| {
            a.latency_ms
                .as_ref()
                .zip(b.latency_ms.as_ref())
                .map(|(a, b)| (f(a), f(b)))
        };
        let p50 = pair(|p| p.p50);
        let p99 = pair(|p| p.p99);
        Ratio {
            throughput: b.throughput_rps / a.throughput_rps.max(1e-9),
            p50: p50.map(|(a, b)| b / a.max(1e-9)),
            p99: p99.map(|(a, b)| b / a.max(1e-9)),
            added_p50_ms: p50.map(|(a, b)| b - a),
            added_p99_ms: p99.map(|(a, b)| b - a),
        }
    }
}

/// The median of a list (the middle pair's mean for an even count); `None` when empty.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_sample(latency_ms: u64) -> Sample {
        Sample {
            outcome: Outcome::Ok,
            latency: Duration::from_millis(latency_ms),
            ttft: None,
            inter_token: Vec::new(),
            output_tokens: 0,
            generation_time: None,
            cache: None,
            rate_limit_headers: false,
        }
    }

    #[test]
    fn percentiles_of_known_latencies() {
        let mut r = Recorder::default();
        for ms in 1..=1000 {
            r.record(&ok_sample(ms));
        }
        let report = r.report("t", Duration::from_secs(10), 1000, 0);
        let l = report.latency_ms.unwrap();
        // HDR keeps 3 significant digits: within 0.1% of the exact order statistic.
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 1e-9;
        assert!(close(l.p50, 500.0), "p50 {}", l.p50);
        assert!(close(l.p90, 900.0), "p90 {}", l.p90);
        assert!(close(l.p99, 990.0), "p99 {}", l.p99);
        assert!(close(l.p999, 999.0), "p99.9 {}", l.p999);
        assert!(close(l.max, 1000.0), "max {}", l.max);
        assert!(close(l.mean, 500.5), "mean {}", l.mean);
        assert_eq!(report.throughput_rps, 100.0);
        assert!(report.ttft_ms.is_none());
    }

    #[test]
    fn errors_are_counted_by_status_and_code() {
        let mut r = Recorder::default();
        let mut s = ok_sample(1);
        s.outcome = Outcome::Http {
            status: 429,
            code: Some("rate_limit_exceeded".into()),
        };
        r.record(&s);
        r.record(&s);
        s.outcome = Outcome::Transport("connect".into());
        r.record(&s);
        r.record(&ok_sample(1));
        let report = r.report("t", Duration::from_secs(1), 4, 0);
        assert_eq!(report.ok, 1);
        assert_eq!(report.errors["429 rate_limit_exceeded"], 2);
        assert_eq!(report.errors["transport connect"], 1);
        assert!(report.table().contains("429 rate_limit_exceeded: 2"));
    }

    #[test]
    fn stream_samples_fill_ttft_inter_token_and_rates() {
        let mut r = Recorder::default();
        let mut s = ok_sample(100);
        s.ttft = Some(Duration::from_millis(20));
        s.inter_token = vec![Duration::from_millis(10); 8];
        s.output_tokens = 9;
        s.generation_time = Some(Duration::from_millis(90));
        r.record(&s);
        let report = r.report("t", Duration::from_secs(1), 1, 0);
        let ttft = report.ttft_ms.unwrap().p50;
        assert!((ttft - 20.0).abs() <= 0.02, "{ttft}");
        assert_eq!(report.inter_token_ms.unwrap().count, 8);
        let tps = report.tokens_per_sec_per_request.unwrap().p50;
        assert!((tps - 100.0).abs() < 0.1, "{tps}");
    }

    #[test]
    fn ratios_and_medians() {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        for _ in 0..10 {
            a.record(&ok_sample(10));
            b.record(&ok_sample(12));
        }
        let ra = a.report("a", Duration::from_secs(1), 10, 0);
        let mut rb = b.report("b", Duration::from_secs(2), 10, 0);
        rb.target = "b".into();
        let ratio = Ratio::of(&ra, &rb);
        assert_eq!(ratio.throughput, 0.5);
        assert!((ratio.p50.unwrap() - 1.2).abs() < 0.01);
        assert!((ratio.added_p50_ms.unwrap() - 2.0).abs() < 0.02);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
