//! When requests are sent: the arrival process (fixed rate or Poisson) and the two ways of
//! driving a target, open loop (by the clock) and closed loop (N clients, each waiting for
//! its answer before sending again).

use rand::{Rng, SeedableRng};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// Exactly `rate` requests per second, evenly spaced.
    Fixed { rate: f64 },
    /// A Poisson process with mean `rate` per second (exponential gaps), from `seed`.
    Poisson { rate: f64, seed: u64 },
}

/// The send times of an arrival process, as offsets from the start of the run.
pub struct Schedule {
    arrivals: Arrivals,
    rng: rand::rngs::StdRng,
    next: Duration,
    sent: u64,
}

impl Schedule {
    pub fn new(arrivals: Arrivals) -> Self {
        let seed = match arrivals {
            Arrivals::Poisson { seed, .. } => seed,
            Arrivals::Fixed { .. } => 0,
        };
        Schedule {
            arrivals,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            next: Duration::ZERO,
            sent: 0,
        }
    }
}

impl Iterator for Schedule {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let at = match self.arrivals {
            // Computed from the index, not accumulated, so rounding never drifts the rate.
            Arrivals::Fixed { rate } => Duration::from_secs_f64(self.sent as f64 / rate),
            Arrivals::Poisson { rate, .. } => {
                let at = self.next;
                let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
                self.next += Duration::from_secs_f64(-u.ln() / rate);
                at
            }
        };
        self.sent += 1;
        Some(at)
    }
}

/// When a run stops: after a duration, after a number of requests, or on a signal.
#[derive(Clone)]
pub struct Stop {
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
    pub signal: Arc<AtomicBool>,
}

impl Stop {
    fn reached(&self, elapsed: Duration, sent: u64) -> bool {
        self.signal.load(Ordering::Relaxed)
            || self.duration.is_some_and(|d| elapsed >= d)
            || self.requests.is_some_and(|n| sent >= n)
    }
}

/// Sends by the clock: `fire(scheduled_at)` is spawned at each scheduled instant, never
/// waiting for earlier requests. When more than `max_in_flight` are outstanding a request is
/// not sent but counted as dropped, so an overloaded target (or generator) shows up in the
/// report instead of silently slowing the schedule. Returns (sent, dropped) once every sent
/// request has finished.
pub async fn open_loop<F, Fut>(
    schedule: Schedule,
    stop: Stop,
    max_in_flight: usize,
    fire: F,
) -> (u64, u64)
where
    F: Fn(Instant) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    let permits = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    let (mut sent, mut dropped) = (0u64, 0u64);
    for offset in schedule {
        if stop.reached(offset, sent + dropped) {
            break;
        }
        let at = start + offset;
        tokio::time::sleep_until(at).await;
        if stop.signal.load(Ordering::Relaxed) {
            break;
        }
        // Reap finished requests so the set does not grow with the run.
        while tasks.try_join_next().is_some() {}
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let request = fire(at);
                tasks.spawn(async move {
                    request.await;
                    drop(permit);
                });
                sent += 1;
            }
            Err(_) => dropped += 1,
        }
    }
    while tasks.join_next().await.is_some() {}
    (sent, dropped)
}

/// Sends as fast as `clients` concurrent clients can, each sending its next request as
/// soon as its previous one has answered. Latency is then measured from each send.
pub async fn closed_loop<F, Fut>(clients: usize, stop: Stop, fire: F) -> u64
where
    F: Fn(Instant) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    let fire = Arc::new(fire);
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (fire, sent, stop) = (fire.clone(), sent.clone(), stop.clone());
        workers.spawn(async move {
            loop {
                let n = sent.fetch_add(1, Ordering::Relaxed);
                if stop.reached(start.elapsed(), n) {
                    sent.fetch_sub(1, Ordering::Relaxed);
                    break;
                }
                fire(Instant::now()).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
    sent.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn stop_after(requests: u64) -> Stop {
        Stop {
            duration: None,
            requests: Some(requests),
            signal: Arc::new(AtomicBool::new(false)),
        }
    }

    #[test]
    fn fixed_rate_is_evenly_spaced() {
        let times: Vec<Duration> = Schedule::new(Arrivals::Fixed { rate: 4.0 })
            .take(5)
            .collect();
        let ms: Vec<u128> = times.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 250, 500, 750, 1000]);
    }

    #[test]
    fn poisson_has_the_asked_mean_rate() {
        let n = 20_000;
        let last = Schedule::new(Arrivals::Poisson {
            rate: 100.0,
            seed: 7,
        })
        .take(n)
        .last()
        .unwrap();
        let rate = (n - 1) as f64 / last.as_secs_f64();
        assert!((rate - 100.0).abs() < 3.0, "mean rate {rate}");
    }

    /// The target stalls for 500 ms on every request. An open loop still sends each request
    /// at its scheduled instant, and the stall shows in every latency. Runs on tokio's paused
    /// clock, so the instants are exact and no real time passes.
    #[tokio::test(start_paused = true)]
    async fn open_loop_sends_on_schedule_while_the_target_stalls() {
        let stall = Duration::from_millis(500);
        let start = Instant::now();
        let sends = Arc::new(Mutex::new(Vec::new()));
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let (sent, dropped) = open_loop(
            Schedule::new(Arrivals::Fixed { rate: 100.0 }),
            stop_after(50),
            1000,
            |scheduled| {
                let (sends, latencies) = (sends.clone(), latencies.clone());
                async move {
                    sends.lock().unwrap().push(Instant::now() - start);
                    tokio::time::sleep(stall).await;
                    latencies.lock().unwrap().push(Instant::now() - scheduled);
                }
            },
        )
        .await;
        assert_eq!((sent, dropped), (50, 0));
        let sends = sends.lock().unwrap();
        for (i, at) in sends.iter().enumerate() {
            assert_eq!(
                *at,
                Duration::from_millis(10 * i as u64),
                "request {i} sent late"
            );
        }
        assert!(latencies.lock().unwrap().iter().all(|l| *l >= stall));
    }

    /// A closed loop with one client waits for each answer: during a stall it sends nothing,
    /// which is exactly the coordinated omission the open loop avoids.
    #[tokio::test(start_paused = true)]
    async fn closed_loop_waits_for_each_answer() {
        let start = Instant::now();
        let sends = Arc::new(Mutex::new(Vec::new()));
        let recorded = sends.clone();
        let sent = closed_loop(1, stop_after(3), move |_| {
            let sends = recorded.clone();
            async move {
                sends.lock().unwrap().push(Instant::now() - start);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
        .await;
        assert_eq!(sent, 3);
        let ms: Vec<u128> = sends
            .lock()
            .unwrap()
            .iter()
            .map(Duration::as_millis)
            .collect();
        assert_eq!(ms, [0, 500, 1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_in_flight_cap_requests_are_dropped_and_counted() {
        let (sent, dropped) = open_loop(
            Schedule::new(Arrivals::Fixed { rate: 1000.0 }),
            stop_after(100),
            10,
            |_| tokio::time::sleep(Duration::from_secs(10)),
        )
        .await;
        assert_eq!(sent, 10);
        assert_eq!(dropped, 90);
    }
}
