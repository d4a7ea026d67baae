//! What does a quota ledger look like to an operator? One view of a ledger's live state
//! against its limits, for keys (`/admin/v1/keys/{id}/quota`) and tenants
//! (`/admin/v1/tenants/{id}/quota`) alike.

use super::store_error;
use crate::app::Gateway;
use crate::error::ApiError;
use rust_decimal::Decimal;
use serde::Serialize;
use sluice_policies::quota::{self, LimitState};
use sluice_policies::{ledger, Limits, ModelLimits};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// A ledger's live state: each limit, the month's budget, and each per-model limit (each
/// model's own ledger). `used` includes what requests in flight have reserved.
#[derive(Serialize, ToSchema)]
pub(super) struct QuotaView {
    #[serde(flatten)]
    limits: LimitStates,
    monthly_budget: BudgetState,
    /// Per-model limits by model name (budgets are per key and tenant, so none here).
    models: BTreeMap<String, LimitStates>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct LimitStates {
    requests_per_minute: RateState,
    tokens_per_minute: RateState,
    requests_per_day: RateState,
    tokens_per_day: RateState,
    max_concurrent: ConcurrencyState,
}

/// A rate or daily cap; `null` limits are unlimited.
#[derive(Serialize, ToSchema)]
pub(super) struct RateState {
    #[schema(required)]
    limit: Option<u64>,
    used: u64,
    #[schema(required)]
    remaining: Option<u64>,
    /// When the window frees room (rates) or renews (days).
    #[schema(required)]
    resets_in_secs: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct ConcurrencyState {
    #[schema(required)]
    limit: Option<u64>,
    in_flight: u64,
    /// When the soonest slot held runs out; `null` when none is held.
    #[schema(required)]
    next_slot_expires_in_secs: Option<u64>,
}

/// The month's spend against the budget, as exact decimal strings.
#[derive(Serialize, ToSchema)]
pub(super) struct BudgetState {
    /// `null`: no budget.
    #[schema(required)]
    limit: Option<String>,
    used: String,
    #[schema(required)]
    remaining: Option<String>,
    /// The budget's currency, when one currency is known.
    #[schema(required)]
    currency: Option<String>,
    /// `YYYY-MM` (UTC).
    month: String,
    resets_in_secs: u64,
}

/// [`quota_view`] with, under `models`, the live state of each per-model limit.
pub(super) async fn quota_view_with_models(
    gateway: &Gateway,
    ledger: &str,
    limits: &Limits,
    model_limits: &ModelLimits,
    currency: Option<&str>,
) -> Result<QuotaView, ApiError> {
    let (limits, monthly_budget) = quota_view(gateway, ledger, limits, currency).await?;
    let mut models = BTreeMap::new();
    for (model, limits) in model_limits {
        let of_model = ledger::model_ledger(ledger, model);
        let (state, _) = quota_view(gateway, &of_model, limits, currency).await?;
        models.insert(model.clone(), state);
    }
    Ok(QuotaView {
        limits,
        monthly_budget,
        models,
    })
}

/// Each limit's live state in `ledger`. `used` includes what requests in flight have
/// reserved; `resets_in_secs` is when the window frees room (rates) or renews (days,
/// months). `currency` is the budget's, when one currency is known.
async fn quota_view(
    gateway: &Gateway,
    ledger: &str,
    limits: &Limits,
    currency: Option<&str>,
) -> Result<(LimitStates, BudgetState), ApiError> {
    let now = crate::clock::now_ms() / 1000;
    let (month, to_month_end) = crate::clock::month_of(now);
    let counters = gateway
        .store
        .quota_counters(ledger, now, &month)
        .await
        .map_err(store_error)?;
    let state = quota::QuotaState::of(limits, &counters, now);
    let rate = |l: &LimitState| RateState {
        limit: l.limit,
        used: l.used,
        remaining: l.limit.map(|limit| limit.saturating_sub(l.used)),
        resets_in_secs: l.resets_in_secs,
    };
    let spent = Decimal::from(state.month_spend_nano) / Decimal::from(quota::NANO);
    let budget = limits.monthly_budget.map(|b| b.amount());
    let limit_states = LimitStates {
        requests_per_minute: rate(&state.requests_per_minute),
        tokens_per_minute: rate(&state.tokens_per_minute),
        requests_per_day: rate(&state.requests_per_day),
        tokens_per_day: rate(&state.tokens_per_day),
        max_concurrent: ConcurrencyState {
            limit: state.max_concurrent.limit,
            in_flight: state.max_concurrent.used,
            next_slot_expires_in_secs: state.max_concurrent.resets_in_secs,
        },
    };
    let budget_state = BudgetState {
        limit: budget.map(|b| b.normalize().to_string()),
        used: spent.normalize().to_string(),
        remaining: budget.map(|b| (b - spent).max(Decimal::ZERO).normalize().to_string()),
        currency: currency.map(str::to_owned),
        month: month.to_string(),
        resets_in_secs: to_month_end,
    };
    Ok((limit_states, budget_state))
}
