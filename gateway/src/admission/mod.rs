//! May they? Reserve before forwarding, settle after: the whole life of a request's quota
//! reservation lives here.
//!
//! A request reserves one request, what it can cost at most ([`reserve`]: every prompt,
//! every choice, the dearest price) and one concurrency slot, in one atomic store step
//! (`sluice_policies::ledger`, the contract both stores implement); the store refuses it
//! when any limit would be passed. Reservation ids are minted here, never taken from the
//! client, so no client can fold its requests into one slot. While the request runs its
//! slot is renewed ([`held`]); when the response is done, the reservation is replaced by the
//! usage metering read (or estimated).
//!
//! Every request counts in two ledgers: its key's and its tenant's (see
//! `sluice_policies::tenants`). Both are checked and counted in the same atomic store step,
//! leases included, so a tenant's keys together never pass the tenant's limits.
//!
//! Each replica also keeps a local sliding minute per key ([`local`]). It runs ahead of the
//! store, turning a flood away without a store call. When the store cannot be reached it is
//! the only limit left, if the key's tier fails open; what such requests use is charged to
//! the key once the store answers again. A tier that fails closed gets 503 instead.

pub mod held;
pub mod leases;
pub mod local;
pub mod reserve;

use crate::auth::{Identity, Ledgers, LimitOwner, QuotaPlan};
use crate::clock::Clock;
use crate::error::ApiError;
use crate::metering::{Ceiling, Usage};
use crate::request::{RequestView, Route};
use crate::store::Store;
use arc_swap::ArcSwap;
use held::{Held, OwedCharge};
use http::HeaderValue;
use leases::{give_back, Leases, Miss, GIVE_BACK_GATHER};
use sluice_policies::ledger::{Admit, Settle};
use sluice_policies::pricing::PriceBook;
use sluice_policies::quota::{self, LimitKind, LimitScope, RateHeaders, Reservation};
use sluice_policies::{FailMode, RequestCaps, Tiers};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

pub use local::LocalLimiter;
pub use reserve::TEMPLATE_ALLOWANCE;

/// How often keys that stopped calling are dropped from the local limiter.
const LOCAL_PRUNE_EVERY: Duration = Duration::from_secs(10);

/// A reservation id no other request of any replica has: this process's random tag and a
/// counter. Shared, not copied: a lease's id goes with each of the requests it admits.
pub fn mint_reservation_id() -> Arc<str> {
    static REPLICA: LazyLock<String> =
        LazyLock::new(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_owned());
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{}-{:x}", *REPLICA, NEXT.fetch_add(1, Ordering::Relaxed)).into()
}

/// A reservation that was granted, kept in the request context until it is settled.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub reservation: Reservation,
    pub reservation_id: Arc<str>,
    pub admitted_sec: i64,
    pub month: Arc<str>,
    pub headers: RateHeaders,
    /// Admitted by this replica alone while the store was unreachable: what it uses is
    /// charged to the store later.
    pub local_only: bool,
    /// Admitted from this replica's lease (see `leases`): settled into the lease.
    pub lease: Option<Arc<str>>,
    /// The tokens it was reserved for: what an unreadable answer is billed at, at most.
    pub ceiling: Ceiling,
    /// The quota ledgers it was counted in (settled, renewed and charged there).
    pub ledgers: Ledgers,
}

/// A request counted against this replica's request rate before its body was read.
#[must_use = "a count is admitted or uncounted"]
#[derive(Debug)]
pub struct Counted {
    /// The second it was counted at; `None` when the key has no request rate.
    second: Option<i64>,
}

/// A refusal, with the headers the 429 carries.
pub struct Refused {
    pub error: ApiError,
    pub retry_after_secs: Option<u64>,
    pub headers: RateHeaders,
    /// The limit that refused it; `None` when something else did (the store was down, the
    /// request was malformed).
    pub limit: Option<LimitKind>,
    /// Whose limit it was: `key`, `tenant`, `key/MODEL` or `tenant/MODEL`.
    pub scope: String,
}

impl From<ApiError> for Refused {
    fn from(error: ApiError) -> Self {
        Refused {
            error,
            retry_after_secs: None,
            headers: RateHeaders::default(),
            limit: None,
            scope: LimitScope::Key.name().to_owned(),
        }
    }
}

use crate::clock::month_of;

/// How admission is set up: the request defaults and the quota knobs of `[quotas]`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The completion cap reserved for a request that names no max_tokens.
    pub default_max_tokens: u64,
    /// How long a concurrency slot is held unless renewed or freed.
    pub slot_ttl_secs: u64,
    /// The most requests one lease may cover (0 or 1: no leases), and how long it admits.
    pub lease_max_requests: u64,
    pub lease_ttl: Duration,
}

/// Admission for one replica: what it decides with (store, tiers, prices, clock) and what
/// it keeps (the local limiter, leases, reservations held open and charges owed).
pub struct Admission {
    store: Arc<dyn Store>,
    tiers: Arc<ArcSwap<Tiers>>,
    prices: PriceBook,
    settings: Settings,
    clock: Clock,
    local: LocalLimiter,
    leases: Leases,
    held: Arc<Held>,
    /// Leases to take ahead of need (see `leases::REFILL_LEFT`), taken by `run` on the
    /// support runtime; asked for only while `run` is taking them.
    refills: tokio::sync::mpsc::Sender<Refill>,
    refills_due: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<Refill>>>,
    refilling: std::sync::atomic::AtomicBool,
}

/// A busy key's next lease, to take before its current one is spent.
struct Refill {
    identity: Arc<Identity>,
    model: String,
    /// The reservation of the request that asked, times `size`, is the lease.
    reservation: Reservation,
    size: u64,
}

/// Refills waiting for the store; past it, a key's next lease is taken by the request that
/// needs it, as without refills.
const REFILLS_QUEUED: usize = 1024;

impl Admission {
    pub fn new(
        store: Arc<dyn Store>,
        tiers: Arc<ArcSwap<Tiers>>,
        prices: PriceBook,
        settings: Settings,
        clock: Clock,
    ) -> Admission {
        let refills = tokio::sync::mpsc::channel(REFILLS_QUEUED);
        Admission {
            store,
            tiers,
            prices,
            leases: Leases::new(settings.lease_max_requests, settings.lease_ttl),
            settings,
            clock,
            local: LocalLimiter::default(),
            held: Arc::default(),
            refills: refills.0,
            refills_due: parking_lot::Mutex::new(Some(refills.1)),
            refilling: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// What a request's usage costs against its key's budget, in nano-units.
    pub fn cost_nano(&self, model: &str, tier: &str, usage: &Usage) -> i64 {
        crate::billing::settled_cost_nano(&self.prices, model, tier, usage)
    }

    /// Starts a key afresh on this replica (after an operator's quota reset).
    pub fn forget_key(&self, key_id: &str) {
        self.local.forget(key_id);
    }

    /// Charges owed from outages, waiting for the store.
    pub fn owed_charges(&self) -> usize {
        self.held.owed()
    }

    /// Gives back idle leases, renews held slots, charges what is owed and prunes the local
    /// limiter, until the process ends.
    pub async fn run(self: Arc<Self>) {
        let held = self.held.clone().run(
            self.store.clone(),
            self.clock.clone(),
            self.settings.slot_ttl_secs,
        );
        let refills = async {
            let Some(mut due) = self.refills_due.lock().take() else {
                return;
            };
            if !self.leases.enabled() {
                return;
            }
            self.refilling.store(true, Ordering::Release);
            while let Some(refill) = due.recv().await {
                // Each on its own task: one key's store round trip does not hold up another's.
                tokio::spawn(self.clone().take_lease_ahead(refill));
            }
        };
        let leases = async {
            if !self.leases.enabled() {
                return;
            }
            // Expired leases are found by the tick; spent ones announce themselves.
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = self.leases.idle_due() => tokio::time::sleep(GIVE_BACK_GATHER).await,
                }
                give_back(self.store.as_ref(), &self.held, self.leases.sweep()).await;
            }
        };
        let prune = async {
            let mut every = tokio::time::interval(LOCAL_PRUNE_EVERY);
            loop {
                every.tick().await;
                self.local.prune(self.clock.now_sec());
            }
        };
        tokio::join!(held, leases, refills, prune);
    }
}

impl Admission {
    /// Reserves for one request, or says why not.
    pub async fn admit(
        &self,
        identity: &Arc<Identity>,
        route: Route,
        view: &RequestView<'_>,
    ) -> Result<Admitted, Refused> {
        let counted = self.count(identity).map_err(|refused| *refused)?;
        self.admit_counted(identity, route, view, counted).await
    }

    /// The part of admission that needs nothing of the request but who sent it: this
    /// replica's request rate, counted before the body is read, so that a key over its rate
    /// is turned away without the gateway reading (and holding) its upload. The count is
    /// handed to [`Admission::admit_counted`], or back to [`Admission::uncount`] when the
    /// request goes no further.
    pub fn count(&self, identity: &Identity) -> Result<Counted, Box<Refused>> {
        let now = self.clock.now_sec();
        let rpm = identity.limits.requests_per_minute;
        if let Err(retry) = self.local.check(&identity.key_id, rpm, now) {
            return Err(Box::new(Refused {
                error: refusal_error(LimitOwner::default(), LimitKind::RequestsPerMinute, retry),
                limit: Some(LimitKind::RequestsPerMinute),
                scope: LimitScope::Key.name().to_owned(),
                retry_after_secs: Some(retry),
                headers: RateHeaders {
                    limit_requests: rpm,
                    remaining_requests: Some(0),
                    reset_requests_secs: Some(retry),
                    ..RateHeaders::default()
                },
            }));
        }
        Ok(Counted {
            second: rpm.is_some().then_some(now),
        })
    }

    /// Takes back a count whose request was not admitted (its body could not be read, or
    /// it was refused), so that refusals never fill this replica's window.
    pub fn uncount(&self, identity: &Identity, counted: Counted) {
        if let Some(second) = counted.second {
            self.local.uncount(&identity.key_id, second);
        }
    }

    /// Reserves for a request already [counted](Admission::count), or says why not.
    pub async fn admit_counted(
        &self,
        identity: &Arc<Identity>,
        route: Route,
        view: &RequestView<'_>,
        counted: Counted,
    ) -> Result<Admitted, Refused> {
        let decided = self.decide(identity, route, view).await;
        if decided.is_err() {
            self.uncount(identity, counted);
        }
        decided
    }

    async fn decide(
        &self,
        identity: &Arc<Identity>,
        route: Route,
        view: &RequestView<'_>,
    ) -> Result<Admitted, Refused> {
        let tiers = self.tiers.load();
        let tier = tiers.get(&identity.tier).ok();
        let caps = tier.map_or_else(RequestCaps::default, |t| t.request_caps);
        let price = self.prices.lookup(view.model(), &identity.tier);
        let (reservation, ceiling) =
            reserve::reservation(route, view, &caps, self.settings.default_max_tokens, price)?;
        let plan = identity.quota_plan(view.model());
        for (owner, limits) in plan.owners.iter().zip(&plan.limits) {
            if let Some(kind) = quota::never_fits(limits, &reservation) {
                return Err(ApiError::bad_request(format!(
                "This request needs up to {} tokens (prompt estimate + max_tokens), more than {} of {} ({}.{}); lower max_tokens or shorten the prompt.",
                reservation.tokens,
                kind.name(),
                match kind {
                    LimitKind::TokensPerMinute => limits.tokens_per_minute,
                    _ => limits.tokens_per_day,
                }
                .unwrap_or_default(),
                owner.label(),
                kind.name(),
            ))
            .with_param("max_tokens")
            .into());
            }
        }
        let now = self.clock.now_sec();
        let (month, secs_to_month_end) = month_of(now);
        if self.leases.enabled() && !plan.per_model() {
            if let Some(admitted) = self
                .admit_leased(
                    identity,
                    view.model(),
                    &plan,
                    &reservation,
                    (now, &month, secs_to_month_end),
                )
                .await
            {
                return Ok(Admitted {
                    ceiling,
                    ..admitted
                });
            }
        }
        let reservation_id = mint_reservation_id();
        let scopes = plan.scopes();
        let args = Admit {
            scopes: &scopes,
            reservation: &reservation,
            reservation_id: &reservation_id,
            now_sec: now,
            month: &month,
            secs_to_month_end,
            slot_ttl_secs: self.settings.slot_ttl_secs as i64,
        };
        let verdict = match self.store.admit(&args).await {
            Ok(verdict) => verdict,
            Err(e) => {
                let fail_mode = tier.map_or(FailMode::Closed, |t| t.on_store_unavailable);
                tracing::warn!(error = %e, key_id = %identity.key_id, ?fail_mode, "quota store unreachable");
                return match fail_mode {
                    // The local limiter (`count`) has already admitted it.
                    FailMode::Open => Ok(Admitted {
                        reservation,
                        reservation_id,
                        admitted_sec: now,
                        month,
                        headers: RateHeaders::default(),
                        local_only: true,
                        lease: None,
                        ceiling,
                        ledgers: plan.ledgers.clone(),
                    }),
                    FailMode::Closed => Err(Refused::from(ApiError::unavailable(
                        "Sluice cannot check quotas right now; try again shortly.",
                    ))),
                };
            }
        };
        match (verdict.refused_by, verdict.decision.refused) {
            (Some(by), Some((kind, retry_after))) => {
                let owner = plan.owners.get(by).copied().unwrap_or_default();
                Err(Refused {
                    error: refusal_error(owner, kind, retry_after),
                    limit: Some(kind),
                    scope: owner.label(),
                    retry_after_secs: Some(retry_after),
                    headers: verdict.decision.headers,
                })
            }
            _ => {
                self.held
                    .hold(&plan.ledgers, &reservation_id, reservation.requests);
                Ok(Admitted {
                    reservation,
                    reservation_id,
                    admitted_sec: now,
                    month,
                    headers: verdict.decision.headers,
                    local_only: false,
                    lease: None,
                    ceiling,
                    ledgers: plan.ledgers.clone(),
                })
            }
        }
    }

    /// Admits from this replica's lease of the key, taking (or waiting for) one when the key is
    /// busy; `None` when the request is to be decided alone.
    async fn admit_leased(
        &self,
        identity: &Arc<Identity>,
        model: &str,
        plan: &QuotaPlan<'_>,
        reservation: &Reservation,
        (now, month, secs_to_month_end): (i64, &Arc<str>, u64),
    ) -> Option<Admitted> {
        /// How long a request waits, in all, for leases other requests are taking.
        const LEASE_WAIT: std::time::Duration = std::time::Duration::from_millis(50);
        let deadline = tokio::time::Instant::now() + LEASE_WAIT;
        loop {
            match self
                .leases
                .try_admit(&identity.key_id, &plan.limits, reservation, now)
            {
                Ok(leased) => {
                    if let Some(size) = leased.refill {
                        self.ask_for_refill(identity, model, reservation, size);
                    }
                    return Some(Admitted {
                        reservation: *reservation,
                        reservation_id: leased.lease_id.clone(),
                        admitted_sec: leased.admitted_sec,
                        month: month.clone(),
                        headers: leased.headers,
                        local_only: false,
                        lease: Some(leased.lease_id),
                        ceiling: Ceiling::default(),
                        ledgers: identity.ledgers.clone(),
                    });
                }
                Err(Miss::Take(size)) => {
                    return self
                        .take_lease(
                            identity,
                            plan,
                            reservation,
                            size,
                            (now, month, secs_to_month_end),
                        )
                        .await
                }
                // More requests wait than the lease being taken will hold: wait for the
                // next one too, within the same bound, rather than each going to the store.
                Err(Miss::Wait(taking)) if tokio::time::Instant::now() < deadline => {
                    // Registered before looking again, so a lease installed in between is
                    // not missed (which would cost the whole wait).
                    let installed = taking.notified();
                    tokio::pin!(installed);
                    installed.as_mut().enable();
                    if self.leases.is_taking(&identity.key_id, &taking) {
                        let _ = tokio::time::timeout_at(deadline, installed).await;
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Asks the store for a lease of `size` requests, the first of which is this one. `None`
    /// when it is refused (or the store fails): the request is then decided alone.
    async fn take_lease(
        &self,
        identity: &Identity,
        plan: &QuotaPlan<'_>,
        first: &Reservation,
        size: u64,
        when: (i64, &Arc<str>, u64),
    ) -> Option<Admitted> {
        let (lease_id, mut headers) = self
            .lease(identity, plan, first, size, Some(*first), when)
            .await?;
        let (now, month, _) = when;
        headers.remaining_requests = headers.remaining_requests.map(|v| v + size - 1);
        Some(Admitted {
            reservation: *first,
            reservation_id: lease_id.clone(),
            admitted_sec: now,
            month: month.clone(),
            headers,
            local_only: false,
            lease: Some(lease_id),
            ceiling: Ceiling::default(),
            ledgers: plan.ledgers.clone(),
        })
    }

    /// Takes a lease of `size` requests like `per_request` for the key from the store and
    /// installs it (with `first` taken from it, or none); its id and the store's headers.
    /// `None` when the store refuses it or fails: the key's next request then takes one.
    async fn lease(
        &self,
        identity: &Identity,
        plan: &QuotaPlan<'_>,
        per_request: &Reservation,
        size: u64,
        first: Option<Reservation>,
        (now, month, secs_to_month_end): (i64, &Arc<str>, u64),
    ) -> Option<(Arc<str>, RateHeaders)> {
        let lease_id = mint_reservation_id();
        let bulk = Reservation {
            requests: size,
            tokens: per_request.tokens.saturating_mul(size),
            cost_nano: per_request.cost_nano.saturating_mul(size as i64),
        };
        let scopes = plan.scopes();
        let args = Admit {
            scopes: &scopes,
            reservation: &bulk,
            reservation_id: &lease_id,
            now_sec: now,
            month,
            secs_to_month_end,
            slot_ttl_secs: self.settings.slot_ttl_secs as i64,
        };
        match self.store.admit(&args).await {
            Ok(verdict) if verdict.refused_by.is_none() => {
                self.held.hold(&plan.ledgers, &lease_id, size);
                self.leases.install(
                    &identity.key_id,
                    plan.ledgers.clone(),
                    lease_id.clone(),
                    now,
                    month.to_owned(),
                    bulk,
                    first,
                    verdict.decision.headers.clone(),
                );
                Some((lease_id, verdict.decision.headers))
            }
            _ => {
                self.leases.not_taken(&identity.key_id);
                None
            }
        }
    }

    /// Queues the key's next lease for `run` to take; when it cannot (no `run`, or the
    /// queue is full), the key's next request takes it, as without refills.
    fn ask_for_refill(
        &self,
        identity: &Arc<Identity>,
        model: &str,
        reservation: &Reservation,
        size: u64,
    ) {
        let refill = Refill {
            identity: identity.clone(),
            model: model.to_owned(),
            reservation: *reservation,
            size,
        };
        if !self.refilling.load(Ordering::Acquire) || self.refills.try_send(refill).is_err() {
            self.leases.not_taken(&identity.key_id);
        }
    }

    /// Takes the key's next lease ahead of need (see `leases::REFILL_LEFT`), none of its
    /// requests taken yet.
    async fn take_lease_ahead(self: Arc<Self>, refill: Refill) {
        let plan = refill.identity.quota_plan(&refill.model);
        let now = self.clock.now_sec();
        let (month, secs_to_month_end) = month_of(now);
        let when = (now, &month, secs_to_month_end);
        let (identity, reservation) = (&refill.identity, &refill.reservation);
        self.lease(identity, &plan, reservation, refill.size, None, when)
            .await;
    }

    /// Replaces a reservation with what the request used. Runs on its own task so that it is
    /// done even after the client has gone, and never delays the next request on a connection.
    pub fn settle(
        self: &Arc<Self>,
        identity: Arc<Identity>,
        model: String,
        admitted: Admitted,
        usage: Option<Usage>,
    ) {
        let usage = usage.unwrap_or_default();
        let actual = Reservation {
            requests: 1,
            tokens: usage.prompt_tokens + usage.completion_tokens,
            cost_nano: self.cost_nano(&model, &identity.tier, &usage),
        };
        if admitted.local_only {
            self.held.owe(OwedCharge {
                ledgers: admitted.ledgers.clone(),
                id: admitted.reservation_id.to_string(),
                at_sec: admitted.admitted_sec,
                month: admitted.month,
                amount: actual,
            });
            return;
        }
        if let Some(lease_id) = &admitted.lease {
            self.leases
                .settle(&identity.key_id, lease_id, &admitted.reservation, &actual);
            return;
        }
        self.held.release(&admitted.reservation_id);
        let admission = self.clone();
        tokio::spawn(async move {
            let args = Settle {
                reservation_id: &admitted.reservation_id,
                admitted_sec: admitted.admitted_sec,
                month: &admitted.month,
                reserved: admitted.reservation,
                actual,
            };
            // A settlement lost to an outage leaves the reservation counted (never less than
            // used) and its slot held until it expires; retry a few times first.
            for attempt in 0..5u32 {
                match admission.store.settle(&admitted.ledgers, &args).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, attempt, "quota settlement failed");
                        tokio::time::sleep(std::time::Duration::from_millis(200 << attempt)).await;
                    }
                }
            }
        });
    }
}

/// OpenAI's `x-ratelimit-*` headers for the limits a key has, and `Retry-After` when given:
/// the (name, value) pairs an answer carries. Every answer carries these, so they cost little:
/// the values are written into one buffer that they all share (one allocation, not one per
/// value), and names are static strings.
pub fn rate_limit_headers(
    h: &RateHeaders,
    retry_after: Option<u64>,
) -> impl Iterator<Item = (&'static str, HeaderValue)> {
    use std::fmt::Write;
    let fields = [
        ("x-ratelimit-limit-requests", h.limit_requests, false),
        (
            "x-ratelimit-remaining-requests",
            h.remaining_requests,
            false,
        ),
        ("x-ratelimit-reset-requests", h.reset_requests_secs, true),
        ("x-ratelimit-limit-tokens", h.limit_tokens, false),
        ("x-ratelimit-remaining-tokens", h.remaining_tokens, false),
        ("x-ratelimit-reset-tokens", h.reset_tokens_secs, true),
        ("retry-after", retry_after, false),
    ];
    // Seven values of at most 20 digits (or a duration of as many) fit.
    let mut text = bytes::BytesMut::with_capacity(fields.len() * 24);
    let mut spans: [Option<std::ops::Range<usize>>; 7] = Default::default();
    for ((_, value, is_duration), span) in fields.iter().zip(&mut spans) {
        let Some(value) = *value else { continue };
        let start = text.len();
        let written = if *is_duration {
            quota::write_reset_duration(&mut text, value)
        } else {
            write!(text, "{value}")
        };
        written.expect("BytesMut takes any text");
        *span = Some(start..text.len());
    }
    let text = text.freeze();
    fields
        .into_iter()
        .zip(spans)
        .filter_map(move |((name, _, _), span)| {
            // Digits and unit letters only: always a valid value.
            let value = HeaderValue::from_maybe_shared(text.slice(span?)).ok()?;
            Some((name, value))
        })
}

fn refusal_error(owner: LimitOwner<'_>, kind: LimitKind, retry_after: u64) -> ApiError {
    // The tenant's limits are shared by all of its keys: say so, since this key alone may
    // have used little.
    let whose = match owner.scope {
        LimitScope::Key => "your",
        LimitScope::Tenant => "your organization's",
    };
    let scope = owner.label();
    let for_model = owner
        .model
        .map_or(String::new(), |m| format!(" for model {m}"));
    let message = match kind {
        LimitKind::MonthlyBudget => format!(
            "You exceeded {whose} monthly budget ({scope}.monthly_budget); ask the operator to raise it."
        ),
        LimitKind::RequestsPerDay | LimitKind::TokensPerDay => format!(
            "You exceeded {whose} daily quota{for_model} ({scope}.{}); it renews in {}.",
            kind.name(),
            quota::reset_duration(retry_after)
        ),
        _ => format!(
            "{} limit reached{for_model} ({scope}.{}); retry in {}.",
            match owner.scope {
                LimitScope::Key => "Rate",
                LimitScope::Tenant => "Your organization's rate",
            },
            kind.name(),
            quota::reset_duration(retry_after)
        ),
    };
    ApiError::rate_limited(kind.code(), message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EmbeddedStore;
    use sluice_policies::Limits;

    fn admission(dir: &std::path::Path, clock: Clock) -> Admission {
        Admission::new(
            Arc::new(EmbeddedStore::open(dir).unwrap()),
            Arc::new(ArcSwap::from_pointee(Tiers::builtin())),
            PriceBook::default(),
            Settings {
                default_max_tokens: 16,
                slot_ttl_secs: 60,
                lease_max_requests: 0,
                lease_ttl: Duration::from_secs(1),
            },
            clock,
        )
    }

    fn identity(limits: Limits) -> Identity {
        Identity {
            key_id: "k".into(),
            tenant: "t".into(),
            tier: "free".into(),
            limits,
            cache: true,
            models: Default::default(),
            tenant_limits: Limits::default(),
            ledgers: crate::auth::quota_ledgers("k", "t"),
            model_limits: Default::default(),
            tenant_model_limits: Default::default(),
            distillation: None,
        }
    }

    #[tokio::test]
    async fn a_full_minute_refuses_until_the_clock_moves_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::manual(1_796_299_200_000);
        let admission = admission(dir.path(), clock.clone());
        let who = Arc::new(identity(Limits {
            requests_per_minute: Some(2),
            ..Limits::default()
        }));
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let view = RequestView::parse(Route::ChatCompletions, body).unwrap();
        for _ in 0..2 {
            let admitted = admission.admit(&who, Route::ChatCompletions, &view).await;
            assert!(admitted.is_ok());
        }
        clock.set_ms(1_796_299_230_000);
        let Err(refused) = admission.admit(&who, Route::ChatCompletions, &view).await else {
            panic!("the third request of the minute is refused");
        };
        assert_eq!(refused.limit, Some(LimitKind::RequestsPerMinute));
        assert_eq!(
            refused.retry_after_secs,
            Some(30),
            "the minute frees room 30 s later"
        );
        clock.set_ms(1_796_299_260_000);
        assert!(admission
            .admit(&who, Route::ChatCompletions, &view)
            .await
            .is_ok());
    }
}
