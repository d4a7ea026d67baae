//! What is the gateway doing? Prometheus metrics, served at `GET /metrics` on the admin
//! listener.
//!
//! Counters and histograms are process-wide (one gateway per process) and updated where
//! things happen: the proxy's `logging` phase, the Redis connection. State that already lives
//! elsewhere (cache entries and lookups, backend health and load) is read when scraped rather
//! than counted twice.
//!
//! Labels are bounded: route, model (only models the gateway serves), tier, status code,
//! cache status, limit kind, Redis command, backend name. Never a key, tenant or prompt.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};
use std::cell::{OnceCell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::LazyLock;
use std::time::Duration;

/// How a request was admitted (`sluice_quota_admissions_total`'s `path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmissionPath {
    /// From this replica's quota lease, no store call.
    Lease,
    /// By one atomic store step.
    Store,
    /// By the local limiter alone, the store unreachable (fail-open).
    Local,
}

impl AdmissionPath {
    pub fn as_str(self) -> &'static str {
        match self {
            AdmissionPath::Lease => "lease",
            AdmissionPath::Store => "store",
            AdmissionPath::Local => "local",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    first_byte: HistogramVec,
    tokens: IntCounterVec,
    cost: IntCounterVec,
    refused: IntCounterVec,
    admissions: IntCounterVec,
    /// `admissions`' series by path, each looked up once, on its first admission (every
    /// request is admitted, and a label lookup hashes and takes the vector's lock).
    admission_paths: [std::sync::OnceLock<IntCounter>; 3],
    budget_alerts: IntCounterVec,
    budget_alert_deliveries: IntCounterVec,
    dataset_captures: IntCounterVec,
    certificate_reloads: IntCounterVec,
    upstream_backoffs: IntCounterVec,
    backend_address_changes: IntCounterVec,
    fallbacks: IntCounterVec,
    redis_calls: HistogramVec,
    redis_errors: IntCounterVec,
    shed: IntCounterVec,
    usage_spilled: prometheus::IntCounter,
    usage_buffered: prometheus::IntCounter,
    connections_open: prometheus::IntGauge,
    connections_refused: prometheus::IntCounter,
}

/// Request latencies: 1 ms to 2 minutes.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Redis round trips: 50 µs to 1 s.
const REDIS_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
];

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub fn get() -> &'static Metrics {
    &METRICS
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

/// One finished request, as `logging` saw it.
pub struct RequestRecord<'a> {
    pub route: &'a str,
    /// Empty when the request never named a served model.
    pub model: &'a str,
    pub tier: &'a str,
    pub status: u16,
    pub cache: &'a str,
    pub duration: Duration,
    pub first_byte: Option<Duration>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    /// What the request cost, in nano-units of `currency`.
    pub cost_nano: i64,
    pub currency: &'a str,
    /// The limit that refused it, if one did.
    pub refused_by: Option<&'a str>,
}

/// The series one kind of request (route, model, tier, status, cache) counts in.
struct RequestSeries {
    requests: IntCounter,
    duration: Histogram,
    // Made when first used, so that a series nothing was counted in is not shown.
    first_byte: OnceCell<Histogram>,
    /// Prompt, completion and cached tokens.
    tokens: [OnceCell<IntCounter>; 3],
}

/// Each thread's series, by request kind. `with_label_values` hashes every label and takes
/// the vector's lock on each call, which every request did five times or more; here a
/// request does one lookup in its own thread's map.
#[derive(Default)]
struct ThreadSeries {
    by_kind: HashMap<Box<str>, RequestSeries>,
    /// The lookup key, reused.
    key: String,
}

/// Kinds kept per thread at most (labels are bounded, see the top of this file; this bounds
/// the map even so).
const SERIES_PER_THREAD: usize = 4096;

thread_local! {
    static SERIES: RefCell<ThreadSeries> = RefCell::default();
}

impl ThreadSeries {
    fn of(&mut self, metrics: &Metrics, r: &RequestRecord<'_>) -> &RequestSeries {
        // A status code's own text, not a String per request (0, "no answer", is not a code).
        let code = http::StatusCode::from_u16(r.status).ok();
        let status: std::borrow::Cow<str> = match &code {
            Some(code) => code.as_str().into(),
            None => r.status.to_string().into(),
        };
        self.key.clear();
        for label in [r.route, r.model, r.tier, &status, r.cache] {
            // A label never holds a NUL (Prometheus' text format would not carry it).
            self.key.push_str(label);
            self.key.push('\0');
        }
        if !self.by_kind.contains_key(self.key.as_str()) {
            if self.by_kind.len() >= SERIES_PER_THREAD {
                self.by_kind.clear();
            }
            let series = RequestSeries {
                requests: metrics
                    .requests
                    .with_label_values(&[r.route, r.model, r.tier, &status, r.cache]),
                duration: metrics
                    .duration
                    .with_label_values(&[r.route, r.model, r.tier]),
                first_byte: OnceCell::new(),
                tokens: Default::default(),
            };
            self.by_kind.insert(self.key.as_str().into(), series);
        }
        &self.by_kind[self.key.as_str()]
    }
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        let metrics = Metrics {
            requests: counter(
                &r,
                "sluice_requests_total",
                "Requests answered, by route, model, tier, status and cache status.",
                &["route", "model", "tier", "status", "cache"],
            ),
            duration: histogram(
                &r,
                "sluice_request_duration_seconds",
                "Time from request to the end of its response.",
                &["route", "model", "tier"],
                LATENCY_BUCKETS,
            ),
            first_byte: histogram(
                &r,
                "sluice_time_to_first_byte_seconds",
                "Time from request to the first byte of its response body (time to first token for streams).",
                &["route", "model"],
                LATENCY_BUCKETS,
            ),
            tokens: counter(
                &r,
                "sluice_tokens_total",
                "Tokens metered, by kind (prompt, completion, cached).",
                &["model", "tier", "kind"],
            ),
            cost: counter(
                &r,
                "sluice_cost_nano_total",
                "What requests cost at the price book's first bands, in nano-units of the currency (graduated prices are applied in billing exports).",
                &["model", "tier", "currency"],
            ),
            refused: counter(
                &r,
                "sluice_rate_limited_total",
                "Requests refused by a limit, by tier and limit kind.",
                &["tier", "limit"],
            ),
            admissions: counter(
                &r,
                "sluice_quota_admissions_total",
                "Requests admitted, by how: from this replica's quota lease (no store call), by one atomic store step, or by the local limiter alone while the store was unreachable (fail-open).",
                &["path"],
            ),
            admission_paths: Default::default(),
            budget_alerts: counter(
                &r,
                "sluice_budget_alerts_total",
                "Spend alerts recorded by this replica (each once across the fleet), by budget (hard, soft).",
                &["budget"],
            ),
            budget_alert_deliveries: counter(
                &r,
                "sluice_budget_alert_deliveries_total",
                "Spend alert webhooks by outcome: delivered (a 2xx, after any retries) or failed (every attempt refused or unreachable).",
                &["outcome"],
            ),
            shed: counter(
                &r,
                "sluice_requests_shed_total",
                "Requests shed with 503 because the replica was past a load mark, by mark (in_flight, body_bytes).",
                &["mark"],
            ),
            usage_spilled: registered(
                &r,
                prometheus::IntCounter::new(
                    "sluice_usage_events_spilled_total",
                    "Usage events written straight to the journal because the queue to the store was full (the store too slow or unreachable).",
                ),
            ),
            usage_buffered: registered(
                &r,
                prometheus::IntCounter::new(
                    "sluice_usage_events_buffered_total",
                    "Usage events put in the store's buffer because the PostgreSQL ledger could not take them (moved there once it answers).",
                ),
            ),
            connections_open: registered(
                &r,
                prometheus::IntGauge::new(
                    "sluice_connections_open",
                    "Client connections the proxy listener holds open now.",
                ),
            ),
            connections_refused: registered(
                &r,
                prometheus::IntCounter::new(
                    "sluice_connections_refused_total",
                    "Client connections closed on arrival because the replica held server.max_connections.",
                ),
            ),
            dataset_captures: counter(
                &r,
                "sluice_dataset_captures_total",
                "Conversations captured for distillation, by outcome: kept, or not kept and why (too_large, dropped_queue, dropped_store, unreadable).",
                &["outcome"],
            ),
            certificate_reloads: counter(
                &r,
                "sluice_tls_certificate_reloads_total",
                "Re-reads of [server.tls]'s certificate files (on SIGHUP or a change), by outcome: reloaded, or failed (the previous certificate stays in use).",
                &["outcome"],
            ),
            upstream_backoffs: counter(
                &r,
                "sluice_upstream_backoffs_total",
                "Times a backend was set aside for its own rate limit (a 429, or x-ratelimit-remaining at 0), by backend.",
                &["backend"],
            ),
            backend_address_changes: counter(
                &r,
                "sluice_backend_address_changes_total",
                "Times a backend's host name, looked up again ([balancer] dns_refresh_secs), no longer gave the address in use, so its requests moved to a new one, by backend.",
                &["backend"],
            ),
            fallbacks: counter(
                &r,
                "sluice_fallbacks_total",
                "Requests a [fallbacks] chain moved to another model before any byte reached the client, by the model asked for (from) and the one tried next (to).",
                &["from", "to"],
            ),
            redis_calls: histogram(
                &r,
                "sluice_redis_call_duration_seconds",
                "Redis round trips and their latency, by command (pipelines as PIPELINE).",
                &["command"],
                REDIS_BUCKETS,
            ),
            redis_errors: counter(
                &r,
                "sluice_redis_errors_total",
                "Redis round trips that failed, by command.",
                &["command"],
            ),
            registry: r,
        };
        // Rare events are exported from the start, at 0, so that a rate over them is defined
        // before the first one (and dashboards find the series).
        for budget in ["hard", "soft"] {
            metrics.budget_alerts.with_label_values(&[budget]);
        }
        for outcome in ["delivered", "failed"] {
            metrics
                .budget_alert_deliveries
                .with_label_values(&[outcome]);
        }
        for outcome in [
            "kept",
            "too_large",
            "dropped_queue",
            "dropped_store",
            "unreadable",
        ] {
            metrics.dataset_captures.with_label_values(&[outcome]);
        }
        for outcome in ["reloaded", "failed"] {
            metrics.certificate_reloads.with_label_values(&[outcome]);
        }
        metrics
    }

    pub fn record_request(&self, r: &RequestRecord<'_>) {
        SERIES.with_borrow_mut(|series| {
            let found = series.of(self, r);
            found.requests.inc();
            found.duration.observe(r.duration.as_secs_f64());
            if let Some(first) = r.first_byte {
                found
                    .first_byte
                    .get_or_init(|| self.first_byte.with_label_values(&[r.route, r.model]))
                    .observe(first.as_secs_f64());
            }
            for ((kind, n), counter) in [
                ("prompt", r.prompt_tokens),
                ("completion", r.completion_tokens),
                ("cached", r.cached_tokens),
            ]
            .into_iter()
            .zip(&found.tokens)
            {
                if n > 0 {
                    counter
                        .get_or_init(|| self.tokens.with_label_values(&[r.model, r.tier, kind]))
                        .inc_by(n);
                }
            }
        });
        if r.cost_nano > 0 {
            self.cost
                .with_label_values(&[r.model, r.tier, r.currency])
                .inc_by(r.cost_nano as u64);
        }
        if let Some(limit) = r.refused_by {
            self.refused.with_label_values(&[r.tier, limit]).inc();
        }
    }

    pub fn record_usage_spill(&self) {
        self.usage_spilled.inc();
    }

    pub fn record_usage_buffered(&self, events: usize) {
        self.usage_buffered.inc_by(events as u64);
    }

    pub fn connection_opened(&self) {
        self.connections_open.inc();
    }

    pub fn connection_closed(&self) {
        self.connections_open.dec();
    }

    pub fn record_connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// `mark`: `in_flight` or `body_bytes`.
    pub fn record_shed(&self, mark: &str) {
        self.shed.with_label_values(&[mark]).inc();
    }

    pub fn record_admission(&self, path: AdmissionPath) {
        self.admission_paths[path as usize]
            .get_or_init(|| self.admissions.with_label_values(&[path.as_str()]))
            .inc();
    }

    pub fn record_budget_alert(&self, budget: &str) {
        self.budget_alerts.with_label_values(&[budget]).inc();
    }

    pub fn record_dataset_captures(&self, outcome: &str, conversations: u64) {
        self.dataset_captures
            .with_label_values(&[outcome])
            .inc_by(conversations);
    }

    pub fn record_certificate_reload(&self, outcome: &str) {
        self.certificate_reloads.with_label_values(&[outcome]).inc();
    }

    pub fn record_upstream_backoff(&self, backend: &str) {
        self.upstream_backoffs.with_label_values(&[backend]).inc();
    }

    pub fn record_fallback(&self, from: &str, to: &str) {
        self.fallbacks.with_label_values(&[from, to]).inc();
    }

    pub fn record_backend_address_change(&self, backend: &str) {
        self.backend_address_changes
            .with_label_values(&[backend])
            .inc();
    }

    pub fn record_budget_alert_delivery(&self, outcome: &str) {
        self.budget_alert_deliveries
            .with_label_values(&[outcome])
            .inc();
    }

    pub fn record_redis(&self, command: &str, took: Duration, ok: bool) {
        self.redis_calls
            .with_label_values(&[command])
            .observe(took.as_secs_f64());
        if !ok {
            self.redis_errors.with_label_values(&[command]).inc();
        }
    }

    /// What live traffic (the `traffic` module) takes differences of: the requests answered
    /// so far, summed over every label but status and cache status, their latencies and
    /// times to first byte per bucket, and the tokens metered.
    pub fn totals(&self) -> Totals {
        let mut totals = Totals {
            duration: vec![0; LATENCY_BUCKETS.len() + 1],
            first_byte: vec![0; LATENCY_BUCKETS.len() + 1],
            ..Totals::default()
        };
        for family in self.requests.collect() {
            for m in family.get_metric() {
                let n = m.get_counter().get_value() as u64;
                if let Some(status) = label(m, "status").and_then(|s| s.parse().ok()) {
                    *totals.by_status.entry(status).or_default() += n;
                }
                if let Some(cache) = label(m, "cache") {
                    *totals.by_cache.entry(cache.to_owned()).or_default() += n;
                }
            }
        }
        add_buckets(&self.duration, &mut totals.duration);
        add_buckets(&self.first_byte, &mut totals.first_byte);
        for family in self.tokens.collect() {
            for m in family.get_metric() {
                let n = m.get_counter().get_value() as u64;
                match label(m, "kind") {
                    Some("prompt") => totals.prompt_tokens += n,
                    Some("completion") => totals.completion_tokens += n,
                    _ => {}
                }
            }
        }
        totals
    }

    /// The text exposition: the counters above, then `state` as read at scrape time.
    pub fn render(&self, state: &ScrapeState) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding of gathered metrics");
        let mut out = String::from_utf8(out).expect("the text exposition is UTF-8");
        render_state(&mut out, state);
        out
    }
}

/// What this process has counted since it started (see [`Metrics::totals`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub by_status: BTreeMap<u16, u64>,
    /// By `x-sluice-cache` status (`hit`, `semantic`, `miss`; empty for requests the cache
    /// did not look at).
    pub by_cache: BTreeMap<String, u64>,
    /// Requests per latency bucket, not cumulative: one per [`LATENCY_BUCKETS`] bound (at
    /// most that long), then one for longer.
    pub duration: Vec<u64>,
    /// The same for the time to the first byte of the answer.
    pub first_byte: Vec<u64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

fn label<'a>(metric: &'a prometheus::proto::Metric, name: &str) -> Option<&'a str> {
    metric
        .get_label()
        .iter()
        .find(|l| l.name() == name)
        .map(|l| l.value())
}

/// Adds each series of `histogram`, per bucket and not cumulative, to `into` (one slot per
/// bound, then one past the last).
fn add_buckets(histogram: &HistogramVec, into: &mut [u64]) {
    for family in histogram.collect() {
        for m in family.get_metric() {
            let h = m.get_histogram();
            let mut below = 0;
            let finite = h
                .get_bucket()
                .iter()
                .filter(|b| b.upper_bound().is_finite());
            for (slot, bucket) in into.iter_mut().zip(finite) {
                let cumulative = bucket.cumulative_count();
                *slot += cumulative.saturating_sub(below);
                below = cumulative;
            }
            if let Some(last) = into.last_mut() {
                *last += h.get_sample_count().saturating_sub(below);
            }
        }
    }
}

/// What other modules keep, read at scrape time by whoever serves `/metrics`.
pub struct ScrapeState {
    pub backends: Vec<BackendGauges>,
    pub cache: CacheCounters,
    pub journal_bytes: u64,
    /// Bytes of usage events waiting for the NATS feed (None: no feed).
    pub feed_pending_bytes: Option<u64>,
}

/// The response cache's counters on this replica.
pub struct CacheCounters {
    pub entries: u64,
    pub hits: u64,
    pub semantic_hits: u64,
    pub misses: u64,
    /// Semantic candidates the verifier let through.
    pub verified: u64,
    /// Semantic candidates turned down, by check.
    pub rejected: Vec<(&'static str, u64)>,
}

/// One backend as the balancer sees it now.
pub struct BackendGauges {
    pub name: String,
    pub up: bool,
    pub in_flight: u64,
    pub latency_ewma: Duration,
}

/// Gauges and counters kept by other modules, written as they are at scrape time.
fn render_state(out: &mut String, state: &ScrapeState) {
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let per_backend = |f: &dyn Fn(&BackendGauges) -> f64| -> Vec<(String, f64)> {
        state
            .backends
            .iter()
            .map(|b| (format!("{{backend=\"{}\"}}", escape(&b.name)), f(b)))
            .collect()
    };
    family(
        "sluice_backend_up",
        "gauge",
        "1 when the backend takes requests (healthy, not ejected, not draining).",
        per_backend(&|b| f64::from(u8::from(b.up))),
    );
    family(
        "sluice_backend_in_flight",
        "gauge",
        "Requests this gateway has at the backend now.",
        per_backend(&|b| b.in_flight as f64),
    );
    family(
        "sluice_backend_latency_ewma_seconds",
        "gauge",
        "The backend's latency EWMA as the balancer sees it.",
        per_backend(&|b| b.latency_ewma.as_secs_f64()),
    );

    let cache = &state.cache;
    family(
        "sluice_cache_entries",
        "gauge",
        "Response cache entries (the same on every replica).",
        vec![(String::new(), cache.entries as f64)],
    );
    family(
        "sluice_cache_lookups_total",
        "counter",
        "Response cache lookups on this replica, by result.",
        [
            ("hit", cache.hits),
            ("semantic", cache.semantic_hits),
            ("miss", cache.misses),
        ]
        .iter()
        .map(|(result, n)| (format!("{{result=\"{result}\"}}"), *n as f64))
        .collect(),
    );
    family(
        "sluice_cache_verifications_total",
        "counter",
        "Semantic candidates judged by the cache's verifier on this replica: verified, or \
         rejected and by which check (role_swap, comparison, negation, numbers, units, time, \
         entities, quoted, wording, too_long, learned, verifier_unavailable).",
        std::iter::once(("{verdict=\"verified\"}".to_owned(), cache.verified as f64))
            .chain(cache.rejected.iter().map(|(check, n)| {
                (
                    format!("{{verdict=\"rejected\",check=\"{check}\"}}"),
                    *n as f64,
                )
            }))
            .collect(),
    );
    family(
        "sluice_usage_journal_bytes",
        "gauge",
        "Usage events waiting in the on-disk journal for the store to come back, in bytes.",
        vec![(String::new(), state.journal_bytes as f64)],
    );
    if let Some(pending) = state.feed_pending_bytes {
        family(
            "sluice_usage_feed_pending_bytes",
            "gauge",
            "Usage events recorded but not yet acknowledged by the NATS JetStream feed, in bytes.",
            vec![(String::new(), pending as f64)],
        );
    }
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
