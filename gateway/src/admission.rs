//! May they? Reserve before forwarding, settle after: the whole life of a request's quota
//! reservation lives here.
//!
//! A request reserves one request, its estimated tokens (prompt estimate + completion cap)
//! and an upper bound of their cost, in one atomic store step; the store refuses it when any
//! limit would be passed. When the response is done, the reservation is replaced by what the
//! backend reported. The prompt estimate is the byte length of the prompt's JSON (messages,
//! prompt or input) plus [`TEMPLATE_ALLOWANCE`] for what a chat template adds: every token of
//! a byte-level BPE tokenizer covers at least one byte, so it never under-reserves; it is
//! generous, and settlement returns the difference.
//!
//! Each replica also keeps a local limiter per key (governor, GCRA at the key's requests per
//! minute with a burst of the same size). It runs ahead of the store: a request it refuses is
//! one the fleet-wide window would refuse too, so a flood is turned away without a store call.
//! When the store cannot be reached it is the only limit left, if the key's tier fails open;
//! a tier that fails closed gets 503 instead.

use crate::app::Gateway;
use crate::auth::Identity;
use crate::error::ApiError;
use crate::leases::{give_back, Miss};
use crate::metering::Usage;
use crate::request::{RequestView, Route};
use crate::store::{AdmitArgs, SettleArgs};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rust_decimal::Decimal;
use sluice_policies::pricing::{ModelPrice, PriceBook, PriceSchedule, TokenCounts};
use sluice_policies::quota::{self, LimitKind, RateHeaders, Reservation};
use sluice_policies::FailMode;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

/// How long an unsettled reservation (a replica that died mid-request) holds its
/// concurrency slot.
const IN_FLIGHT_TTL_SECS: i64 = 600;

/// Prompt tokens a chat template may add around the messages (roles, separators, a default
/// system turn).
pub const TEMPLATE_ALLOWANCE: u64 = 64;

/// Per-key local limiters of this replica.
#[derive(Default)]
pub struct LocalLimiter {
    keys: std::sync::Mutex<HashMap<String, (u64, Arc<DefaultDirectRateLimiter>)>>,
}

impl LocalLimiter {
    /// Whether this replica alone has room for one more request of the key; `true` when the
    /// key has no request rate.
    pub fn check(&self, key_id: &str, requests_per_minute: Option<u64>) -> bool {
        let Some(rpm) = requests_per_minute
            .and_then(|r| u32::try_from(r).ok())
            .and_then(NonZeroU32::new)
        else {
            return true;
        };
        let limiter = {
            let mut keys = self.keys.lock().expect("limiter lock");
            let entry = keys.entry(key_id.to_owned()).or_insert_with(|| {
                (
                    u64::from(rpm.get()),
                    Arc::new(RateLimiter::direct(Quota::per_minute(rpm))),
                )
            });
            if entry.0 != u64::from(rpm.get()) {
                *entry = (
                    u64::from(rpm.get()),
                    Arc::new(RateLimiter::direct(Quota::per_minute(rpm))),
                );
            }
            entry.1.clone()
        };
        limiter.check().is_ok()
    }

    /// Starts a key afresh on this replica (after an operator's quota reset). Other replicas'
    /// limiters refill at the key's rate.
    pub fn forget(&self, key_id: &str) {
        self.keys.lock().expect("limiter lock").remove(key_id);
    }
}

/// A reservation that was granted, kept in the request context until it is settled.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub reservation: Reservation,
    pub reservation_id: String,
    pub admitted_sec: i64,
    pub month: String,
    pub headers: RateHeaders,
    /// Admitted by this replica alone while the store was unreachable: nothing to settle.
    pub local_only: bool,
    /// Admitted from this replica's lease (see `leases`): settled into the lease.
    pub lease: Option<String>,
}

/// A refusal, with the headers the 429 carries.
pub struct Refused {
    pub error: ApiError,
    pub retry_after_secs: Option<u64>,
    pub headers: RateHeaders,
    /// The limit that refused it; `None` when something else did (the store was down).
    pub limit: Option<LimitKind>,
}

impl From<ApiError> for Refused {
    fn from(error: ApiError) -> Self {
        Refused {
            error,
            retry_after_secs: None,
            headers: RateHeaders::default(),
            limit: None,
        }
    }
}

fn now_sec() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `YYYY-MM` of a unix second, and the seconds left in that month (UTC).
pub fn month_of(sec: i64) -> (String, u64) {
    let at =
        time::OffsetDateTime::from_unix_timestamp(sec).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let (year, month) = (at.year(), at.month());
    let next = if month == time::Month::December {
        time::Date::from_calendar_date(year + 1, time::Month::January, 1)
    } else {
        time::Date::from_calendar_date(year, month.next(), 1)
    }
    .expect("valid first of month");
    let left = next.midnight().assume_utc().unix_timestamp() - sec;
    (
        format!("{year:04}-{:02}", u8::from(month)),
        left.max(1) as u64,
    )
}

/// The most any one token of each kind can cost under `price`: its dearest band.
fn dearest(schedule: &PriceSchedule) -> Decimal {
    schedule
        .bands()
        .iter()
        .map(|b| b.per_million.amount())
        .max()
        .unwrap_or(Decimal::ZERO)
}

fn cost_bound(price: &ModelPrice, counts: &TokenCounts) -> Decimal {
    let million = Decimal::from(1_000_000);
    (Decimal::from(counts.input) * dearest(price.input())
        + Decimal::from(counts.output) * dearest(price.output())
        + Decimal::from(counts.cached) * dearest(price.cached()))
        / million
}

/// What a request reserves: its prompt estimate, its completion cap and their dearest cost.
pub fn reservation(gateway: &Gateway, route: Route, view: &RequestView, tier: &str) -> Reservation {
    let prompt = [view.messages, view.prompt, view.input]
        .into_iter()
        .flatten()
        .map(|raw| raw.get().len() as u64)
        .sum::<u64>()
        + TEMPLATE_ALLOWANCE;
    let completion = match route {
        Route::Embeddings => 0,
        _ => {
            let cap = view
                .max_completion_tokens
                .or(view.max_tokens)
                .map_or(gateway.config.default_max_tokens, u64::from);
            cap * u64::from(view.n.unwrap_or(1).max(1))
        }
    };
    let counts = TokenCounts {
        input: prompt,
        output: completion,
        cached: 0,
    };
    let cost = gateway
        .config
        .prices
        .lookup(view.model(), tier)
        .map_or(Decimal::ZERO, |p| cost_bound(p, &counts));
    Reservation {
        requests: 1,
        tokens: prompt + completion,
        cost_nano: quota::to_nano_ceil(cost),
    }
}

/// Reserves for one request, or says why not.
pub async fn admit(
    gateway: &Gateway,
    identity: &Identity,
    route: Route,
    view: &RequestView<'_>,
    reservation_id: &str,
) -> Result<Admitted, Refused> {
    let reservation = reservation(gateway, route, view, &identity.tier);
    if let Some(kind) = quota::never_fits(&identity.limits, &reservation) {
        return Err(ApiError::bad_request(format!(
            "This request needs up to {} tokens (prompt estimate + max_tokens), more than the key's {} of {}; lower max_tokens or shorten the prompt.",
            reservation.tokens,
            kind.name(),
            match kind {
                LimitKind::TokensPerMinute => identity.limits.tokens_per_minute,
                _ => identity.limits.tokens_per_day,
            }
            .unwrap_or_default()
        ))
        .with_param("max_tokens")
        .into());
    }
    let now = now_sec();
    let (month, secs_to_month_end) = month_of(now);
    let rpm = identity.limits.requests_per_minute;
    if !gateway.local_limiter.check(&identity.key_id, rpm) {
        return Err(Refused {
            error: refusal_error(LimitKind::RequestsPerMinute, 1),
            limit: Some(LimitKind::RequestsPerMinute),
            retry_after_secs: Some(1),
            headers: RateHeaders {
                limit_requests: rpm,
                remaining_requests: Some(0),
                reset_requests_secs: Some(1),
                ..RateHeaders::default()
            },
        });
    }
    if gateway.leases.enabled() {
        if let Some(admitted) = admit_leased(
            gateway,
            identity,
            &reservation,
            reservation_id,
            now,
            &month,
            secs_to_month_end,
        )
        .await
        {
            return Ok(admitted);
        }
    }
    let args = AdmitArgs {
        key_id: &identity.key_id,
        limits: &identity.limits,
        reservation: &reservation,
        reservation_id,
        now_sec: now,
        month: &month,
        secs_to_month_end,
        in_flight_ttl_secs: IN_FLIGHT_TTL_SECS,
    };
    let decision = match gateway.store.admit(&args).await {
        Ok(decision) => decision,
        Err(e) => {
            let fail_mode = gateway
                .tiers()
                .get(&identity.tier)
                .map_or(FailMode::Closed, |t| t.on_store_unavailable);
            tracing::warn!(error = %e, key_id = %identity.key_id, ?fail_mode, "quota store unreachable");
            return match fail_mode {
                // The local limiter above has already admitted it.
                FailMode::Open => Ok(Admitted {
                    reservation,
                    reservation_id: reservation_id.to_owned(),
                    admitted_sec: now,
                    month,
                    headers: RateHeaders::default(),
                    local_only: true,
                    lease: None,
                }),
                FailMode::Closed => Err(Refused::from(ApiError::unavailable(
                    "Sluice cannot check quotas right now; try again shortly.",
                ))),
            };
        }
    };
    match decision.refused {
        None => Ok(Admitted {
            reservation,
            reservation_id: reservation_id.to_owned(),
            admitted_sec: now,
            month,
            headers: decision.headers,
            local_only: false,
            lease: None,
        }),
        Some((kind, retry_after)) => Err(Refused {
            error: refusal_error(kind, retry_after),
            limit: Some(kind),
            retry_after_secs: Some(retry_after),
            headers: decision.headers,
        }),
    }
}

/// Admits from this replica's lease of the key, taking (or waiting for) one when the key is
/// busy; `None` when the request is to be decided alone.
async fn admit_leased(
    gateway: &Gateway,
    identity: &Identity,
    reservation: &Reservation,
    reservation_id: &str,
    now: i64,
    month: &str,
    secs_to_month_end: u64,
) -> Option<Admitted> {
    /// How long a request waits for a lease another request is taking.
    const LEASE_WAIT: std::time::Duration = std::time::Duration::from_millis(50);
    for attempt in 0..2 {
        match gateway
            .leases
            .try_admit(&identity.key_id, &identity.limits, reservation, now)
        {
            Ok(leased) => {
                return Some(Admitted {
                    reservation: *reservation,
                    reservation_id: leased.lease_id.clone(),
                    admitted_sec: leased.admitted_sec,
                    month: month.to_owned(),
                    headers: leased.headers,
                    local_only: false,
                    lease: Some(leased.lease_id),
                })
            }
            Err(Miss::Take(size)) => {
                return take_lease(
                    gateway,
                    identity,
                    reservation,
                    reservation_id,
                    size,
                    now,
                    month,
                    secs_to_month_end,
                )
                .await
            }
            Err(Miss::Wait(taking)) if attempt == 0 => {
                let _ = tokio::time::timeout(LEASE_WAIT, taking.notified()).await;
            }
            Err(_) => return None,
        }
    }
    None
}

/// Asks the store for a lease of `size` requests, the first of which is this one. `None`
/// when it is refused (or the store fails): the request is then decided alone.
#[allow(clippy::too_many_arguments)]
async fn take_lease(
    gateway: &Gateway,
    identity: &Identity,
    first: &Reservation,
    reservation_id: &str,
    size: u64,
    now: i64,
    month: &str,
    secs_to_month_end: u64,
) -> Option<Admitted> {
    let lease_id = format!("{reservation_id}-lease");
    let bulk = Reservation {
        requests: size,
        tokens: first.tokens.saturating_mul(size),
        cost_nano: first.cost_nano.saturating_mul(size as i64),
    };
    let args = AdmitArgs {
        key_id: &identity.key_id,
        limits: &identity.limits,
        reservation: &bulk,
        reservation_id: &lease_id,
        now_sec: now,
        month,
        secs_to_month_end,
        in_flight_ttl_secs: IN_FLIGHT_TTL_SECS,
    };
    match gateway.store.admit(&args).await {
        Ok(decision) if decision.refused.is_none() => {
            let lease_headers = decision.headers.clone();
            let mut headers = decision.headers;
            headers.remaining_requests = headers.remaining_requests.map(|v| v + size - 1);
            let idle = gateway.leases.install(
                &identity.key_id,
                lease_id.clone(),
                now,
                month.to_owned(),
                bulk,
                *first,
                lease_headers,
            );
            give_back(gateway.store.clone(), idle);
            Some(Admitted {
                reservation: *first,
                reservation_id: lease_id.clone(),
                admitted_sec: now,
                month: month.to_owned(),
                headers,
                local_only: false,
                lease: Some(lease_id),
            })
        }
        _ => {
            gateway.leases.not_taken(&identity.key_id);
            None
        }
    }
}

fn refusal_error(kind: LimitKind, retry_after: u64) -> ApiError {
    let message = match kind {
        LimitKind::MonthlyBudget => {
            "You exceeded your monthly budget; ask the operator to raise it.".to_owned()
        }
        LimitKind::RequestsPerDay | LimitKind::TokensPerDay => format!(
            "You exceeded your daily quota ({}); it renews in {}.",
            kind.name(),
            quota::reset_duration(retry_after)
        ),
        _ => format!(
            "Rate limit reached ({}); retry in {}.",
            kind.name(),
            quota::reset_duration(retry_after)
        ),
    };
    ApiError::rate_limited(kind.code(), message)
}

/// What a request's usage counts against its budget, in nano-units rounded up: the price of
/// its tokens at the model's first bands (the budget does not follow graduated bands, which
/// billing exports do; for prices that fall with volume this over-counts, never under).
pub fn settled_cost_nano(prices: &PriceBook, model: &str, tier: &str, usage: &Usage) -> i64 {
    let counts = usage.billable();
    let cost = prices
        .lookup(model, tier)
        .map_or(Decimal::ZERO, |p| p.cost(&TokenCounts::default(), &counts));
    quota::to_nano_ceil(cost)
}

/// Replaces a reservation with what the request used. Runs on its own task so that it is
/// done even after the client has gone, and never delays the next request on a connection.
pub fn settle(
    gateway: Arc<Gateway>,
    identity: Arc<Identity>,
    model: String,
    admitted: Admitted,
    usage: Option<Usage>,
) {
    if admitted.local_only {
        return;
    }
    if let Some(lease_id) = &admitted.lease {
        let usage = usage.unwrap_or_default();
        let actual = Reservation {
            requests: 1,
            tokens: usage.prompt_tokens + usage.completion_tokens,
            cost_nano: settled_cost_nano(&gateway.config.prices, &model, &identity.tier, &usage),
        };
        let idle =
            gateway
                .leases
                .settle(&identity.key_id, lease_id, &admitted.reservation, &actual);
        give_back(gateway.store.clone(), idle);
        return;
    }
    tokio::spawn(async move {
        let usage = usage.unwrap_or_default();
        let actual = Reservation {
            requests: 1,
            tokens: usage.prompt_tokens + usage.completion_tokens,
            cost_nano: settled_cost_nano(&gateway.config.prices, &model, &identity.tier, &usage),
        };
        let args = SettleArgs {
            key_id: &identity.key_id,
            reservation_id: &admitted.reservation_id,
            admitted_sec: admitted.admitted_sec,
            month: &admitted.month,
            reserved: admitted.reservation,
            actual,
        };
        // A settlement lost to an outage leaves the reservation counted (never less than
        // used) and its slot held until IN_FLIGHT_TTL_SECS; retry a few times first.
        for attempt in 0..5u32 {
            match gateway.store.settle(&args).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "quota settlement failed");
                    tokio::time::sleep(std::time::Duration::from_millis(200 << attempt)).await;
                }
            }
        }
    });
}
