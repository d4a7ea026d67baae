//! What does a quota ledger look like to an operator? One view of a ledger's live state
//! against its limits, for keys (`/admin/v1/keys/{id}/quota`) and tenants
//! (`/admin/v1/tenants/{id}/quota`) alike.

use super::store_error;
use crate::app::Gateway;
use crate::error::ApiError;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sluice_policies::quota::{self, LimitState};
use sluice_policies::{ledger, Limits, ModelLimits};

/// [`quota_view`] with, under `models`, the live state of each per-model limit (each model's
/// own ledger).
pub(super) async fn quota_view_with_models(
    gateway: &Gateway,
    ledger: &str,
    limits: &Limits,
    model_limits: &ModelLimits,
    currency: Option<&str>,
) -> Result<Value, ApiError> {
    let mut view = quota_view(gateway, ledger, limits, currency).await?;
    let mut models = serde_json::Map::new();
    for (model, limits) in model_limits {
        let of_model = ledger::model_ledger(ledger, model);
        let mut state = quota_view(gateway, &of_model, limits, currency).await?;
        if let Some(state) = state.as_object_mut() {
            state.remove("monthly_budget");
        }
        models.insert(model.clone(), state);
    }
    view["models"] = Value::Object(models);
    Ok(view)
}

/// Each limit's live state in `ledger`. `used` includes what requests in flight have
/// reserved; `resets_in_secs` is when the window frees room (rates) or renews (days,
/// months). `currency` is the budget's, when one currency is known.
pub(super) async fn quota_view(
    gateway: &Gateway,
    ledger: &str,
    limits: &Limits,
    currency: Option<&str>,
) -> Result<Value, ApiError> {
    let now = crate::clock::now_ms() / 1000;
    let (month, to_month_end) = crate::clock::month_of(now);
    let counters = gateway
        .store
        .quota_counters(ledger, now, &month)
        .await
        .map_err(store_error)?;
    let state = quota::QuotaState::of(limits, &counters, now);
    let rate = |l: &LimitState| {
        json!({
            "limit": l.limit,
            "used": l.used,
            "remaining": l.limit.map(|limit| limit.saturating_sub(l.used)),
            "resets_in_secs": l.resets_in_secs,
        })
    };
    let spent = Decimal::from(state.month_spend_nano) / Decimal::from(quota::NANO);
    let budget = limits.monthly_budget.map(|b| b.amount());
    Ok(json!({
        "requests_per_minute": rate(&state.requests_per_minute),
        "tokens_per_minute": rate(&state.tokens_per_minute),
        "requests_per_day": rate(&state.requests_per_day),
        "tokens_per_day": rate(&state.tokens_per_day),
        "max_concurrent": {
            "limit": state.max_concurrent.limit,
            "in_flight": state.max_concurrent.used,
            "next_slot_expires_in_secs": state.max_concurrent.resets_in_secs,
        },
        "monthly_budget": {
            "limit": budget.map(|b| b.normalize().to_string()),
            "used": spent.normalize().to_string(),
            "remaining": budget.map(|b| (b - spent).max(Decimal::ZERO).normalize().to_string()),
            "currency": currency,
            "month": month,
            "resets_in_secs": to_month_end,
        },
    }))
}
