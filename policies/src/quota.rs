//! Admission arithmetic: whether a key may start one more request, given what it has used,
//! and what to tell the client about it. Pure: the stores (embedded and Redis) keep the
//! counters and call this with them, at one instant, atomically.
//!
//! Rates (per minute) are sliding windows of 60 one-second buckets: exact to the second, with
//! no burst of twice the limit across a window edge as fixed windows allow. Days and months
//! are calendar windows in UTC. Money is counted in nano-units (10⁻⁹ of the currency), an
//! integer, so the budget arithmetic is exact, also in Redis's Lua (whose numbers are doubles,
//! exact to 2⁵³ nano-units: 9 million currency units per key and month); reservations and
//! settlements round a cost up to the next nano-unit.

use crate::limits::Limits;
use rust_decimal::Decimal;

/// Seconds in a rate window, and so the number of one-second buckets in it.
pub const WINDOW_SECS: i64 = 60;

/// Nano-units (10⁻⁹) per currency unit.
pub const NANO: i64 = 1_000_000_000;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    RequestsPerMinute,
    RequestsPerDay,
    TokensPerMinute,
    TokensPerDay,
    Concurrent,
    MonthlyBudget,
}

impl LimitKind {
    /// OpenAI's error code: a rate waits for its window, a cap needs more quota.
    pub fn code(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute | LimitKind::TokensPerMinute | LimitKind::Concurrent => {
                "rate_limit_exceeded"
            }
            LimitKind::RequestsPerDay | LimitKind::TokensPerDay | LimitKind::MonthlyBudget => {
                "insufficient_quota"
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute => "requests_per_minute",
            LimitKind::RequestsPerDay => "requests_per_day",
            LimitKind::TokensPerMinute => "tokens_per_minute",
            LimitKind::TokensPerDay => "tokens_per_day",
            LimitKind::Concurrent => "max_concurrent",
            LimitKind::MonthlyBudget => "monthly_budget",
        }
    }
}

/// Whose limit refused a request: its key's own, or its tenant's (all of the tenant's keys
/// together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LimitScope {
    #[default]
    Key,
    Tenant,
}

impl LimitScope {
    pub fn name(self) -> &'static str {
        match self {
            LimitScope::Key => "key",
            LimitScope::Tenant => "tenant",
        }
    }
}

/// What a request (or a lease of several) reserves before it is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reservation {
    /// Requests: 1, or a lease's size.
    pub requests: u64,
    /// Estimated prompt tokens plus the completion cap (all of them, for a lease).
    pub tokens: u64,
    /// Upper bound of its cost, in nano-units.
    pub cost_nano: i64,
}

/// One second's bucket of a rate window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bucket {
    /// Unix second the bucket covers.
    pub second: i64,
    pub requests: u64,
    pub tokens: u64,
}

/// A key's counters at the instant of a decision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Counters {
    /// The buckets of the last [`WINDOW_SECS`] seconds (older ones are ignored).
    pub minute: Vec<Bucket>,
    pub day_requests: u64,
    pub day_tokens: u64,
    pub in_flight: u64,
    /// When the soonest-expiring concurrency slot in flight runs out (unix seconds): the
    /// latest a slot frees if its request has died without settling.
    pub next_slot_expiry: Option<i64>,
    pub month_spend_nano: i64,
}

/// The outcome of an admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// `None`: admitted. Otherwise the first limit that refused, and when to retry.
    pub refused: Option<(LimitKind, u64)>,
    /// The state to report in `x-ratelimit-*` headers (after this request, if admitted).
    pub headers: RateHeaders,
}

/// OpenAI's `x-ratelimit-*` values for the per-minute limits (absent when unlimited).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RateHeaders {
    pub limit_requests: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub reset_requests_secs: Option<u64>,
    pub limit_tokens: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_tokens_secs: Option<u64>,
}

/// The money limits in nano-units.
pub fn budget_nano(limits: &Limits) -> Option<i64> {
    limits.monthly_budget.map(|m| to_nano_ceil(m.amount()))
}

/// `amount` in nano-units, rounded up (a reservation must never be short).
pub fn to_nano_ceil(amount: Decimal) -> i64 {
    let scaled = (amount * Decimal::from(NANO)).ceil();
    i64::try_from(scaled.mantissa() / 10i128.pow(scaled.scale())).unwrap_or(i64::MAX)
}

/// The window's use. Buckets stamped after `now_sec` count too: another replica may have
/// admitted in the next second before this decision ran, and the store's script counts them.
fn window_sum(counters: &Counters, now_sec: i64, field: fn(&Bucket) -> u64) -> u64 {
    counters
        .minute
        .iter()
        .filter(|b| b.second > now_sec - WINDOW_SECS)
        .map(field)
        .sum()
}

/// Seconds until `need` more fits under `limit` in the sliding minute, as old buckets leave.
fn minute_retry(
    counters: &Counters,
    now_sec: i64,
    limit: u64,
    need: u64,
    field: fn(&Bucket) -> u64,
) -> u64 {
    let mut live: Vec<&Bucket> = counters
        .minute
        .iter()
        .filter(|b| b.second > now_sec - WINDOW_SECS)
        .collect();
    live.sort_by_key(|b| b.second);
    let mut used: u64 = live.iter().map(|b| field(b)).sum();
    for b in live {
        if used + need <= limit {
            break;
        }
        used -= field(b);
        // The bucket of second s leaves the window at s + WINDOW_SECS.
        let leaves = b.second + WINDOW_SECS - now_sec;
        if used + need <= limit {
            return leaves.max(1) as u64;
        }
    }
    1
}

/// Seconds until the minute window holds none of its current use (OpenAI's "reset"):
/// until the newest used bucket leaves it. `adding_now` counts a use in the current second.
fn window_clears(
    counters: &Counters,
    now_sec: i64,
    adding_now: bool,
    field: fn(&Bucket) -> u64,
) -> u64 {
    let newest = counters
        .minute
        .iter()
        .filter(|b| b.second > now_sec - WINDOW_SECS && field(b) > 0)
        .map(|b| b.second)
        .max();
    let newest = if adding_now { Some(now_sec) } else { newest };
    newest.map_or(0, |s| (s + WINDOW_SECS - now_sec).max(0) as u64)
}

/// Seconds until the next UTC midnight after `now_sec`.
pub fn secs_to_next_day(now_sec: i64) -> u64 {
    (86_400 - now_sec.rem_euclid(86_400)) as u64
}

/// Decides whether a request reserving `r` may start now. `secs_to_month_end` is the time
/// left in the calendar month (the caller knows the calendar).
pub fn decide(
    limits: &Limits,
    counters: &Counters,
    r: &Reservation,
    now_sec: i64,
    secs_to_month_end: u64,
) -> Decision {
    let rpm_used = window_sum(counters, now_sec, |b| b.requests);
    let tpm_used = window_sum(counters, now_sec, |b| b.tokens);
    let checks: [(LimitKind, Option<u64>, u64, u64); 5] = [
        (
            LimitKind::Concurrent,
            limits.max_concurrent,
            counters.in_flight,
            r.requests,
        ),
        (
            LimitKind::RequestsPerMinute,
            limits.requests_per_minute,
            rpm_used,
            r.requests,
        ),
        (
            LimitKind::TokensPerMinute,
            limits.tokens_per_minute,
            tpm_used,
            r.tokens,
        ),
        (
            LimitKind::RequestsPerDay,
            limits.requests_per_day,
            counters.day_requests,
            r.requests,
        ),
        (
            LimitKind::TokensPerDay,
            limits.tokens_per_day,
            counters.day_tokens,
            r.tokens,
        ),
    ];
    let mut refused = None;
    for (kind, limit, used, need) in checks {
        if let Some(limit) = limit {
            if used.saturating_add(need) > limit {
                let retry = match kind {
                    LimitKind::RequestsPerMinute => {
                        minute_retry(counters, now_sec, limit, need, |b| b.requests)
                    }
                    LimitKind::TokensPerMinute => {
                        minute_retry(counters, now_sec, limit, need, |b| b.tokens)
                    }
                    LimitKind::RequestsPerDay | LimitKind::TokensPerDay => {
                        secs_to_next_day(now_sec)
                    }
                    // A slot frees when its request ends, which no one can know in advance;
                    // what is known is when the soonest one runs out unless it is renewed.
                    LimitKind::Concurrent => counters
                        .next_slot_expiry
                        .map_or(1, |expiry| (expiry - now_sec).max(1) as u64),
                    LimitKind::MonthlyBudget => secs_to_month_end.max(1),
                };
                refused = Some((kind, retry));
                break;
            }
        }
    }
    if refused.is_none() {
        if let Some(budget) = budget_nano(limits) {
            if counters.month_spend_nano.saturating_add(r.cost_nano) > budget {
                refused = Some((LimitKind::MonthlyBudget, secs_to_month_end.max(1)));
            }
        }
    }
    let admitted = refused.is_none();
    let after = |used: u64, need: u64| if admitted { used + need } else { used };
    let headers = RateHeaders {
        limit_requests: limits.requests_per_minute,
        remaining_requests: limits
            .requests_per_minute
            .map(|l| l.saturating_sub(after(rpm_used, r.requests))),
        reset_requests_secs: limits.requests_per_minute.map(|_| {
            window_clears(counters, now_sec, admitted && r.requests > 0, |b| {
                b.requests
            })
        }),
        limit_tokens: limits.tokens_per_minute,
        remaining_tokens: limits
            .tokens_per_minute
            .map(|l| l.saturating_sub(after(tpm_used, r.tokens))),
        reset_tokens_secs: limits
            .tokens_per_minute
            .map(|_| window_clears(counters, now_sec, admitted && r.tokens > 0, |b| b.tokens)),
    };
    Decision { refused, headers }
}

/// One limit's live state, as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    pub limit: Option<u64>,
    /// What admitted requests count against it now (reservations of those in flight
    /// included).
    pub used: u64,
    /// When the window frees room (rates), renews (days), or the soonest slot runs out
    /// (concurrency); `None` when nothing is held.
    pub resets_in_secs: Option<u64>,
}

/// A key's quota as `GET /admin/v1/keys/{id}/quota` reports it: the same for every store,
/// since it is computed from the counters alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaState {
    pub requests_per_minute: LimitState,
    pub tokens_per_minute: LimitState,
    pub requests_per_day: LimitState,
    pub tokens_per_day: LimitState,
    pub max_concurrent: LimitState,
    pub month_spend_nano: i64,
}

impl QuotaState {
    pub fn of(limits: &Limits, counters: &Counters, now_sec: i64) -> QuotaState {
        let to_day_end = Some(secs_to_next_day(now_sec));
        QuotaState {
            requests_per_minute: LimitState {
                limit: limits.requests_per_minute,
                used: window_sum(counters, now_sec, |b| b.requests),
                resets_in_secs: Some(window_clears(counters, now_sec, false, |b| b.requests)),
            },
            tokens_per_minute: LimitState {
                limit: limits.tokens_per_minute,
                used: window_sum(counters, now_sec, |b| b.tokens),
                resets_in_secs: Some(window_clears(counters, now_sec, false, |b| b.tokens)),
            },
            requests_per_day: LimitState {
                limit: limits.requests_per_day,
                used: counters.day_requests,
                resets_in_secs: to_day_end,
            },
            tokens_per_day: LimitState {
                limit: limits.tokens_per_day,
                used: counters.day_tokens,
                resets_in_secs: to_day_end,
            },
            max_concurrent: LimitState {
                limit: limits.max_concurrent,
                used: counters.in_flight,
                resets_in_secs: counters
                    .next_slot_expiry
                    .map(|expiry| (expiry - now_sec).max(0) as u64),
            },
            month_spend_nano: counters.month_spend_nano,
        }
    }
}

/// Whether a request can never fit: its own reservation exceeds a token limit outright.
pub fn never_fits(limits: &Limits, r: &Reservation) -> Option<LimitKind> {
    if limits.tokens_per_minute.is_some_and(|l| r.tokens > l) {
        return Some(LimitKind::TokensPerMinute);
    }
    if limits.tokens_per_day.is_some_and(|l| r.tokens > l) {
        return Some(LimitKind::TokensPerDay);
    }
    None
}

/// OpenAI's duration format for reset headers: `1s`, `6m0s`, `1h2m3s`.
pub fn reset_duration(secs: u64) -> String {
    let mut text = String::new();
    write_reset_duration(&mut text, secs).expect("a String takes any text");
    text
}

/// [`reset_duration`], written into `out` (digits and unit letters only).
pub fn write_reset_duration(out: &mut impl std::fmt::Write, secs: u64) -> std::fmt::Result {
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    match (h, m) {
        (0, 0) => write!(out, "{s}s"),
        (0, _) => write!(out, "{m}m{s}s"),
        _ => write!(out, "{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(rpm: Option<u64>, tpm: Option<u64>) -> Limits {
        Limits {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            ..Limits::default()
        }
    }

    fn one(tokens: u64) -> Reservation {
        Reservation {
            requests: 1,
            tokens,
            cost_nano: 0,
        }
    }

    /// Runs admissions at the given seconds against a model of the store's counters.
    fn admit_all(limits: &Limits, seconds: &[i64], tokens: u64) -> Vec<bool> {
        let mut counters = Counters::default();
        seconds
            .iter()
            .map(|&now| {
                let d = decide(limits, &counters, &one(tokens), now, 1000);
                if d.refused.is_none() {
                    match counters.minute.iter_mut().find(|b| b.second == now) {
                        Some(b) => {
                            b.requests += 1;
                            b.tokens += tokens;
                        }
                        None => counters.minute.push(Bucket {
                            second: now,
                            requests: 1,
                            tokens,
                        }),
                    }
                }
                d.refused.is_none()
            })
            .collect()
    }

    #[test]
    fn exactly_the_limit_is_admitted_within_a_minute() {
        let admitted = admit_all(&limits(Some(60), None), &[1000; 300], 1);
        assert_eq!(admitted.iter().filter(|a| **a).count(), 60);
    }

    #[test]
    fn the_window_slides_by_the_second() {
        let l = limits(Some(2), None);
        // Two at t=0, refused at t=59, one frees at t=60.
        assert_eq!(
            admit_all(&l, &[0, 0, 59, 60, 60], 1),
            [true, true, false, true, true]
        );
    }

    #[test]
    fn refusals_say_which_limit_and_when() {
        let mut counters = Counters::default();
        counters.minute.push(Bucket {
            second: 100,
            requests: 5,
            tokens: 50,
        });
        let l = Limits {
            requests_per_minute: Some(5),
            ..Limits::default()
        };
        let d = decide(&l, &counters, &one(1), 130, 1000);
        assert_eq!(d.refused, Some((LimitKind::RequestsPerMinute, 30)));
        assert_eq!(d.headers.remaining_requests, Some(0));
        assert_eq!(LimitKind::RequestsPerMinute.code(), "rate_limit_exceeded");

        let l = Limits {
            tokens_per_day: Some(100),
            ..Limits::default()
        };
        counters.day_tokens = 90;
        let d = decide(&l, &counters, &one(20), 86_400 * 3 + 3600, 1000);
        assert_eq!(d.refused, Some((LimitKind::TokensPerDay, 82_800)));
        assert_eq!(LimitKind::TokensPerDay.code(), "insufficient_quota");

        let l = Limits {
            monthly_budget: Some("1".parse().unwrap()),
            ..Limits::default()
        };
        counters.month_spend_nano = NANO - 10;
        let r = Reservation {
            requests: 1,
            tokens: 1,
            cost_nano: 11,
        };
        assert_eq!(
            decide(&l, &counters, &r, 0, 77).refused,
            Some((LimitKind::MonthlyBudget, 77))
        );
        let r = Reservation {
            requests: 1,
            tokens: 1,
            cost_nano: 10,
        };
        assert_eq!(decide(&l, &counters, &r, 0, 77).refused, None);
    }

    #[test]
    fn headers_report_the_minute_after_this_request() {
        let l = limits(Some(10), Some(1000));
        let d = decide(&l, &Counters::default(), &one(300), 50, 1000);
        assert_eq!(d.refused, None);
        assert_eq!(d.headers.remaining_requests, Some(9));
        assert_eq!(d.headers.remaining_tokens, Some(700));
        // The window holds this request for a full minute: that is when it is reset.
        assert_eq!(d.headers.reset_requests_secs, Some(60));
        assert_eq!(d.headers.limit_tokens, Some(1000));
    }

    #[test]
    fn a_request_larger_than_a_token_limit_never_fits() {
        let l = limits(None, Some(100));
        assert_eq!(never_fits(&l, &one(101)), Some(LimitKind::TokensPerMinute));
        assert_eq!(never_fits(&l, &one(100)), None);
    }

    #[test]
    fn money_rounds_up_to_the_nano_unit() {
        assert_eq!(
            to_nano_ceil(Decimal::from_str_exact("0.000000000001").unwrap()),
            1
        );
        assert_eq!(
            to_nano_ceil(Decimal::from_str_exact("1.5").unwrap()),
            1_500_000_000
        );
        assert_eq!(to_nano_ceil(Decimal::ZERO), 0);
    }

    #[test]
    fn reset_durations_read_like_openais() {
        assert_eq!(reset_duration(1), "1s");
        assert_eq!(reset_duration(360), "6m0s");
        assert_eq!(reset_duration(3723), "1h2m3s");
    }

    proptest! {
        /// However requests arrive, no sliding minute ever holds more than the limit.
        #[test]
        fn no_sliding_minute_exceeds_the_limit(
            limit in 1u64..20,
            gaps in proptest::collection::vec(0i64..5, 1..200),
        ) {
            let mut t = 0;
            let seconds: Vec<i64> = gaps.iter().map(|g| { t += g; t }).collect();
            let admitted = admit_all(&limits(Some(limit), None), &seconds, 1);
            let times: Vec<i64> = seconds.iter().zip(&admitted).filter(|(_, a)| **a).map(|(s, _)| *s).collect();
            for &end in &times {
                let in_window = times.iter().filter(|&&s| s > end - WINDOW_SECS && s <= end).count() as u64;
                prop_assert!(in_window <= limit);
            }
        }

        /// A refusal is never a waste: whenever a request is refused, the window really is full.
        #[test]
        fn refusals_only_when_full(limit in 1u64..10, n in 1usize..50) {
            let admitted = admit_all(&limits(Some(limit), None), &vec![7; n], 1);
            let count = admitted.iter().filter(|a| **a).count() as u64;
            prop_assert_eq!(count, limit.min(n as u64));
        }
    }
}
