//! Which backend serves this request? Each backend's live state (requests in flight, a
//! latency EWMA, health from active checks and passive ejection), and the strategies that
//! choose among a model's available backends.
//!
//! - `round_robin`: in turn.
//! - `least_outstanding`: the fewest requests this gateway has in flight there.
//! - `p2c` (default): power of two choices, two backends at random and the one with the lower
//!   latency EWMA × (in flight + 1), as in Finagle and tower's PeakEWMA. It follows real load
//!   (a GPU backend's cost is its queue, not its connection count) at two reads a request.
//! - `load_aware`: the backend's own view of its load, scraped from its `/metrics` every
//!   `scrape_interval_ms` (waiting requests weigh most, then running ones, then KV-cache use),
//!   which counts the load other gateways put on it too; until a backend has been scraped, or
//!   when its scrape is stale, this gateway's in-flight count stands in.
//! - `prefix_affinity`: requests whose prompts start alike go to the same backend, where that
//!   prefix's KV cache is warm: rendezvous hashing of the prompt's first bytes over the
//!   backends, taking the first in hash order whose in-flight count is within
//!   `affinity_load_factor` × the average (bounded-load consistent hashing), so one popular
//!   prefix cannot overload its backend; past the bound it spills to the next.
//!
//! A backend is available while its active checks pass, no passive ejection is running and it
//! is not draining. Passive ejection (Envoy's outlier detection, gateway-failure mode):
//! `eject_after` consecutive failures eject it for a backoff that doubles while it keeps
//! failing (up to `eject_max`); one answer clears it. Only faults of the backend itself
//! count: connect errors, connections reset or closed mid-answer, and 502/503/504. A read
//! timeout does not (a long generation is the backend working, not failing), nor does any
//! other status (the backend answered). Ejection never takes more than
//! `max_ejection_percent` of a model's backends out at once (rounded down: a model with one
//! backend keeps it), so a tenant whose requests fail everywhere cannot empty the pool.

use serde::Deserialize;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};

use std::time::{Duration, Instant};

/// Balancing and health settings (`[balancer]` in the configuration).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalancerConfig {
    pub strategy: Strategy,
    /// Further backends a failed request may be tried on (before any byte reached the client).
    pub retries: u32,
    pub health_interval_ms: u64,
    pub health_timeout_ms: u64,
    /// Consecutive failed checks that mark a backend down, and passed ones that mark it up.
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    pub eject_after: u32,
    pub eject_base_ms: u64,
    pub eject_max_ms: u64,
    /// The largest share of a model's backends passive ejection may take out at once.
    pub max_ejection_percent: u32,
    pub connect_timeout_ms: u64,
    /// The longest wait for the first byte, and between two reads of a stream.
    pub read_timeout_secs: u64,
    /// load_aware: how often each backend's `/metrics` is read.
    pub scrape_interval_ms: u64,
    /// How often a backend's host name is looked up again (0: only at start, or when it is
    /// added), so that a hosted API or a service that moves is followed.
    pub dns_refresh_secs: u64,
    /// prefix_affinity: how many leading bytes of the prompt pick the backend.
    pub affinity_prefix_bytes: usize,
    /// prefix_affinity: a backend takes more only while below this × the average in flight.
    pub affinity_load_factor: f64,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            strategy: Strategy::P2c,
            retries: 2,
            health_interval_ms: 2000,
            health_timeout_ms: 1000,
            unhealthy_threshold: 2,
            healthy_threshold: 2,
            eject_after: 3,
            eject_base_ms: 1000,
            eject_max_ms: 30_000,
            max_ejection_percent: 50,
            connect_timeout_ms: 3000,
            read_timeout_secs: 300,
            scrape_interval_ms: 500,
            dns_refresh_secs: 30,
            affinity_prefix_bytes: 512,
            affinity_load_factor: 1.25,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    RoundRobin,
    LeastOutstanding,
    P2c,
    LoadAware,
    PrefixAffinity,
}

/// A backend's live state, shared by every request and the health checker.
#[derive(Debug)]
pub struct BackendState {
    pub in_flight: AtomicU64,
    /// Latency EWMA in microseconds (f64 bits); 0 until the first answer.
    ewma_us: AtomicU64,
    /// Set by active health checks.
    up: AtomicBool,
    check_failures: AtomicU32,
    check_successes: AtomicU32,
    /// Consecutive request failures, for passive ejection.
    failures: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since `epoch` until which the backend is ejected (0: not ejected).
    ejected_until_ms: AtomicI64,
    /// Milliseconds since `epoch` until which the backend's own rate limit keeps it aside
    /// (0: not backed off).
    backed_off_until_ms: AtomicI64,
    pub draining: AtomicBool,
    /// From the backend's `/metrics`: waiting and running requests, KV-cache use (f64 bits),
    /// and when (ms since `epoch`; 0 = never).
    scraped_waiting: AtomicU64,
    scraped_running: AtomicU64,
    scraped_kv: AtomicU64,
    scraped_at_ms: AtomicI64,
    epoch: Instant,
}

/// How much one new latency sample moves the EWMA.
const EWMA_WEIGHT: f64 = 0.2;

impl Default for BackendState {
    fn default() -> Self {
        BackendState {
            in_flight: AtomicU64::new(0),
            ewma_us: AtomicU64::new(0f64.to_bits()),
            up: AtomicBool::new(true),
            check_failures: AtomicU32::new(0),
            check_successes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicI64::new(0),
            backed_off_until_ms: AtomicI64::new(0),
            draining: AtomicBool::new(false),
            scraped_waiting: AtomicU64::new(0),
            scraped_running: AtomicU64::new(0),
            scraped_kv: AtomicU64::new(0f64.to_bits()),
            scraped_at_ms: AtomicI64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl BackendState {
    fn now_ms(&self) -> i64 {
        self.epoch.elapsed().as_millis() as i64
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > self.now_ms()
    }

    pub fn available(&self) -> bool {
        self.is_up()
            && !self.ejected()
            && !self.backed_off()
            && !self.draining.load(Ordering::Relaxed)
    }

    /// Whether the backend's own rate limit (a 429 and its `Retry-After`, or its
    /// `x-ratelimit-*` headers) keeps it aside now.
    pub fn backed_off(&self) -> bool {
        self.backed_off_until_ms.load(Ordering::Relaxed) > self.now_ms()
    }

    /// How long the backend stays aside, if it is.
    pub fn backed_off_for(&self) -> Option<Duration> {
        let left = self.backed_off_until_ms.load(Ordering::Relaxed) - self.now_ms();
        (left > 0).then(|| Duration::from_millis(left as u64))
    }

    /// Sets the backend aside for `wait`; a longer wait already set stands.
    pub fn back_off(&self, wait: Duration) {
        let until = self.now_ms() + wait.as_millis().min(i64::MAX as u128) as i64;
        self.backed_off_until_ms.fetch_max(until, Ordering::Relaxed);
    }

    pub fn ewma(&self) -> Duration {
        Duration::from_micros(f64::from_bits(self.ewma_us.load(Ordering::Relaxed)) as u64)
    }

    fn score(&self) -> f64 {
        let ewma = f64::from_bits(self.ewma_us.load(Ordering::Relaxed));
        (ewma.max(1.0)) * (self.in_flight.load(Ordering::Relaxed) + 1) as f64
    }

    /// Records a scrape of the backend's `/metrics` text.
    pub fn scraped(&self, metrics: &str) {
        let value = |name: &str| -> f64 {
            metrics
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.rsplit_once(' '))
                .filter(|(series, _)| series.split('{').next() == Some(name))
                .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
                .sum()
        };
        self.scraped_waiting.store(
            value("sluice_backend_requests_waiting") as u64,
            Ordering::Relaxed,
        );
        self.scraped_running.store(
            value("sluice_backend_requests_running") as u64,
            Ordering::Relaxed,
        );
        self.scraped_kv.store(
            value("sluice_backend_kv_cache_usage_ratio").to_bits(),
            Ordering::Relaxed,
        );
        self.scraped_at_ms
            .store(self.now_ms().max(1), Ordering::Relaxed);
    }

    /// The backend's last `/metrics` report: waiting, running, KV-cache use, and how long
    /// ago it was read; `None` before the first.
    pub fn last_scrape(&self) -> Option<(u64, u64, f64, Duration)> {
        let at = self.scraped_at_ms.load(Ordering::Relaxed);
        (at != 0).then(|| {
            (
                self.scraped_waiting.load(Ordering::Relaxed),
                self.scraped_running.load(Ordering::Relaxed),
                f64::from_bits(self.scraped_kv.load(Ordering::Relaxed)),
                Duration::from_millis((self.now_ms() - at).max(0) as u64),
            )
        })
    }

    /// The backend's load as it reports it, or this gateway's in-flight count when its report
    /// is older than `stale`.
    fn reported_load(&self, stale: Duration) -> f64 {
        let at = self.scraped_at_ms.load(Ordering::Relaxed);
        if at == 0 || self.now_ms() - at > stale.as_millis() as i64 {
            return self.in_flight.load(Ordering::Relaxed) as f64;
        }
        let waiting = self.scraped_waiting.load(Ordering::Relaxed) as f64;
        let running = self.scraped_running.load(Ordering::Relaxed) as f64;
        let kv = f64::from_bits(self.scraped_kv.load(Ordering::Relaxed));
        // Requests sent since the scrape are not in it yet: count this gateway's in flight too.
        4.0 * waiting + running.max(self.in_flight.load(Ordering::Relaxed) as f64) + 8.0 * kv
    }

    /// A request reached the backend and got an answer (any status but 502, 503 and 504).
    pub fn succeeded(&self, latency: Duration) {
        self.failures.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
        let sample = latency.as_micros() as f64;
        // A lost race between two updates loses one sample; the average does not drift.
        let old = f64::from_bits(self.ewma_us.load(Ordering::Relaxed));
        let new = if old == 0.0 {
            sample
        } else {
            old + EWMA_WEIGHT * (sample - old)
        };
        self.ewma_us.store(new.to_bits(), Ordering::Relaxed);
    }

    /// A request failed there (connect error, reset, 502/503/504). Says whether it ejected
    /// the backend; it may not when `may_eject` is false (the pool's ejection share is
    /// spent), and then the failures stay counted, so it goes at its next failure once the
    /// share allows.
    pub fn failed(&self, config: &BalancerConfig, may_eject: bool) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < config.eject_after || !may_eject {
            return false;
        }
        self.failures.store(0, Ordering::Relaxed);
        let ejections = self.ejections.fetch_add(1, Ordering::Relaxed);
        let backoff = config
            .eject_base_ms
            .saturating_mul(1u64 << ejections.min(16))
            .min(config.eject_max_ms);
        self.ejected_until_ms
            .store(self.now_ms() + backoff as i64, Ordering::Relaxed);
        true
    }

    /// One active health check's result; says whether it changed the backend's state.
    pub fn checked(&self, ok: bool, config: &BalancerConfig) -> bool {
        if ok {
            self.check_failures.store(0, Ordering::Relaxed);
            let n = self.check_successes.fetch_add(1, Ordering::Relaxed) + 1;
            if !self.is_up() && n >= config.healthy_threshold {
                self.up.store(true, Ordering::Relaxed);
                // A backend that answers its checks again may take traffic again at once.
                self.ejected_until_ms.store(0, Ordering::Relaxed);
                return true;
            }
        } else {
            self.check_successes.store(0, Ordering::Relaxed);
            let n = self.check_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if self.is_up() && n >= config.unhealthy_threshold {
                self.up.store(false, Ordering::Relaxed);
                return true;
            }
        }
        false
    }
}

/// What a choice may take into account beyond the backends' state.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hints {
    /// Round-robin position.
    pub turn: usize,
    /// Hash of the prompt's leading bytes (prefix affinity).
    pub prefix: u64,
    pub load_factor: f64,
    /// load_aware: a scrape older than this is not trusted.
    pub stale: Duration,
}

/// Chooses among `candidates` (already available and not yet tried) by `strategy`.
/// `ids` name the candidates stably (for rendezvous hashing).
pub fn choose<'a, T: AsRef<BackendState>>(
    strategy: Strategy,
    candidates: &'a [T],
    ids: &[u64],
    hints: Hints,
) -> Option<&'a T> {
    let turn = hints.turn;
    match candidates.len() {
        0 => None,
        1 => candidates.first(),
        n => match strategy {
            Strategy::RoundRobin => candidates.get(turn % n),
            Strategy::LeastOutstanding => {
                // Ties go round robin, so equal backends share the load.
                let start = turn % n;
                (0..n)
                    .map(|i| &candidates[(start + i) % n])
                    .min_by_key(|c| c.as_ref().in_flight.load(Ordering::Relaxed))
            }
            Strategy::P2c => {
                use rand::Rng;
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let b = (a + rng.random_range(1..n)) % n;
                let (sa, sb) = (
                    candidates[a].as_ref().score(),
                    candidates[b].as_ref().score(),
                );
                Some(if sa <= sb {
                    &candidates[a]
                } else {
                    &candidates[b]
                })
            }
            Strategy::LoadAware => {
                let start = turn % n;
                (0..n).map(|i| &candidates[(start + i) % n]).min_by(|a, b| {
                    let (la, lb) = (
                        a.as_ref().reported_load(hints.stale),
                        b.as_ref().reported_load(hints.stale),
                    );
                    la.total_cmp(&lb)
                })
            }
            Strategy::PrefixAffinity => {
                let in_flight = |c: &T| c.as_ref().in_flight.load(Ordering::Relaxed);
                let total: u64 = candidates.iter().map(in_flight).sum();
                // The bound counts this request too; at least 1 so an idle fleet has room.
                let bound = ((total + 1) as f64 / n as f64 * hints.load_factor)
                    .ceil()
                    .max(1.0) as u64;
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by_key(|&i| std::cmp::Reverse(mix(hints.prefix ^ ids[i])));
                order
                    .iter()
                    .map(|&i| &candidates[i])
                    .find(|c| in_flight(c) < bound)
                    .or_else(|| candidates.iter().min_by_key(|c| in_flight(c)))
            }
        },
    }
}

/// A well-mixed 64-bit hash of `x` (splitmix64's finaliser).
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The affinity hash of a prompt: its first `len` bytes.
pub fn prefix_hash(prompt: &[u8], len: usize) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    prompt[..prompt.len().min(len)].hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn states(n: usize) -> Vec<Arc<BackendState>> {
        (0..n).map(|_| Arc::new(BackendState::default())).collect()
    }

    #[test]
    fn least_outstanding_picks_the_idlest() {
        let s = states(3);
        s[0].in_flight.store(5, Ordering::Relaxed);
        s[1].in_flight.store(1, Ordering::Relaxed);
        s[2].in_flight.store(3, Ordering::Relaxed);
        for turn in 0..6 {
            let hints = Hints {
                turn,
                ..Hints::default()
            };
            let chosen = choose(Strategy::LeastOutstanding, &s, &[0, 1, 2], hints).unwrap();
            assert!(Arc::ptr_eq(chosen, &s[1]));
        }
    }

    #[test]
    fn p2c_avoids_the_slow_backend() {
        let s = states(3);
        s[0].succeeded(Duration::from_millis(200));
        s[1].succeeded(Duration::from_millis(2));
        s[2].succeeded(Duration::from_millis(2));
        let slow = (0..3000)
            .filter(|&t| {
                let hints = Hints {
                    turn: t,
                    ..Hints::default()
                };
                Arc::ptr_eq(choose(Strategy::P2c, &s, &[0, 1, 2], hints).unwrap(), &s[0])
            })
            .count();
        // The slow one wins only when both draws are itself, which p2c never makes.
        assert_eq!(slow, 0);
    }

    #[test]
    fn prefix_affinity_sticks_within_the_bound_and_spills_past_it() {
        let s = states(3);
        let ids = [11, 22, 33];
        let hints = Hints {
            prefix: prefix_hash(b"You are a helpful assistant.", 512),
            load_factor: 1.25,
            ..Hints::default()
        };
        let first = choose(Strategy::PrefixAffinity, &s, &ids, hints)
            .unwrap()
            .clone();
        for _ in 0..5 {
            let again = choose(Strategy::PrefixAffinity, &s, &ids, hints).unwrap();
            assert!(
                Arc::ptr_eq(again, &first),
                "the same prefix goes to the same backend"
            );
        }
        // Load it past its bound: the same prefix spills to another backend.
        first.in_flight.store(4, Ordering::Relaxed);
        let spilled = choose(Strategy::PrefixAffinity, &s, &ids, hints).unwrap();
        assert!(!Arc::ptr_eq(spilled, &first));
        // Other prefixes spread over the backends.
        first.in_flight.store(0, Ordering::Relaxed);
        let mut used = std::collections::HashSet::new();
        for p in 0..30u64 {
            let h = Hints {
                prefix: prefix_hash(format!("system prompt {p}").as_bytes(), 512),
                ..hints
            };
            used.insert(Arc::as_ptr(
                choose(Strategy::PrefixAffinity, &s, &ids, h).unwrap(),
            ));
        }
        assert_eq!(used.len(), 3);
    }

    #[test]
    fn load_aware_reads_the_backends_own_queue() {
        let s = states(2);
        s[0].scraped("sluice_backend_requests_waiting 3\nsluice_backend_requests_running 8\n");
        s[1].scraped(
            "# HELP x\nsluice_backend_requests_waiting 0\nsluice_backend_requests_running 2\n",
        );
        let hints = Hints {
            stale: Duration::from_secs(5),
            ..Hints::default()
        };
        for turn in 0..4 {
            let h = Hints { turn, ..hints };
            assert!(Arc::ptr_eq(
                choose(Strategy::LoadAware, &s, &[0, 1], h).unwrap(),
                &s[1]
            ));
        }
    }

    #[test]
    fn failures_eject_with_a_growing_backoff_and_success_clears_it() {
        let config = BalancerConfig {
            eject_after: 2,
            eject_base_ms: 10_000,
            ..BalancerConfig::default()
        };
        let s = BackendState::default();
        assert!(!s.failed(&config, true));
        assert!(s.failed(&config, true));
        assert!(s.ejected() && !s.available());
        let first = s.ejected_until_ms.load(Ordering::Relaxed);
        s.failed(&config, true);
        assert!(s.failed(&config, true));
        assert!(
            s.ejected_until_ms.load(Ordering::Relaxed) - first >= 10_000,
            "backoff doubled"
        );
        s.succeeded(Duration::from_millis(1));
        assert_eq!(s.ejections.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn health_checks_mark_down_and_up_by_thresholds() {
        let config = BalancerConfig::default();
        let s = BackendState::default();
        assert!(!s.checked(false, &config));
        assert!(s.checked(false, &config), "down after two failed checks");
        assert!(!s.available());
        assert!(!s.checked(true, &config));
        assert!(s.checked(true, &config), "up after two passed checks");
        assert!(s.available());
    }
}
