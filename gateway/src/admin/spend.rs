//! Where is the money going this month? Every budget against what its ledger has counted
//! (what admission enforces), and the month's top spenders by priced usage (what billing
//! exports invoice), for the console's Money page.

use super::billing::{price_page, Reader};
use super::{known_params, number_param, store_error, AppState, Caller};
use crate::app::Gateway;
use crate::billing::{Aggregator, Dim, ExportQuery, Pricer, Row};
use crate::error::{ApiError, ApiErrorBody};
use axum::extract::{Query, State};
use axum::{Extension, Json};
use rust_decimal::Decimal;
use serde::Serialize;
use sluice_policies::quota;
use sluice_policies::Limits;
use std::collections::HashMap;
use utoipa::ToSchema;

#[derive(Serialize, ToSchema)]
pub(super) struct SpendView {
    /// Always `spend`.
    object: &'static str,
    /// `YYYY-MM` (UTC): this month.
    month: String,
    /// The spend alert thresholds, in percent of a budget (`[alerts] thresholds`, or the
    /// default 50, 80, 100 where alerts are off).
    thresholds: Vec<u32>,
    /// Budgets ordered by the share used, fullest first: at most `budgets` of them.
    budgets: Vec<BudgetUse>,
    /// How many budgets there are in all.
    budgets_total: usize,
    /// The tenants with the most priced usage this month, most first.
    top_tenants: Vec<Spender>,
    /// The keys with the most priced usage this month, most first.
    top_keys: Vec<Spender>,
}

/// A key's or tenant's month spend, as its ledger counted it, against its budgets.
#[derive(Serialize, ToSchema)]
pub(super) struct BudgetUse {
    /// `key` or `tenant`.
    scope: &'static str,
    /// The key's id or the tenant's name.
    id: String,
    /// The key's name; `null` for a tenant.
    #[schema(required)]
    name: Option<String>,
    tenant: String,
    /// Exact decimals, in `currency`.
    spent: String,
    #[schema(required)]
    monthly_budget: Option<String>,
    #[schema(required)]
    soft_monthly_budget: Option<String>,
    #[schema(required)]
    currency: Option<String>,
    /// `spent` over the hard budget (the soft one when there is no hard one), in percent.
    used_percent: f64,
}

/// A tenant's or key's priced usage this month.
#[derive(Serialize, ToSchema)]
pub(super) struct Spender {
    /// The tenant's name or the key's id.
    id: String,
    /// The key's name; `null` for a tenant.
    #[schema(required)]
    name: Option<String>,
    tenant: String,
    /// Exact decimal, in `currency`.
    cost: String,
    currency: String,
    requests: u64,
    tokens: u64,
}

/// A budget to read: whose ledger, and the limits it is held to.
struct Budgeted {
    scope: &'static str,
    ledger: String,
    id: String,
    name: Option<String>,
    tenant: String,
    limits: Limits,
    currency: Option<String>,
}

/// This month's spend: every key and tenant budget against its ledger, and the top
/// spenders. A viewer scoped to a tenant sees only that tenant's.
#[utoipa::path(
    get,
    path = "/admin/v1/spend",
    tag = "billing",
    params(
        ("budgets" = Option<usize>, Query, description = "How many budgets to list, fullest first: 1 to 1000 (default 50)"),
        ("top" = Option<usize>, Query, description = "How many top tenants and keys to list: 1 to 1000 (default 10)"),
    ),
    responses(
        (status = 200, description = "This month's spend", body = SpendView),
        (status = 400, description = "A parameter is invalid", body = ApiErrorBody),
        (status = 503, description = "The store or usage cannot be read right now", body = ApiErrorBody),
    ),
)]
pub(super) async fn spend(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<SpendView>, ApiError> {
    known_params(&params, &["budgets", "top"])?;
    let budgets_shown = number_param(&params, "budgets", 1..=1000)?.unwrap_or(50);
    let top = number_param(&params, "top", 1..=1000)?.unwrap_or(10);
    let now_sec = crate::clock::now_ms() / 1000;
    let (month, _) = crate::clock::month_of(now_sec);

    let keys = gateway.store.list_keys().await.map_err(store_error)?;
    let names: HashMap<&str, (&str, &str)> = keys
        .iter()
        .map(|k| (k.id.as_str(), (k.name.as_str(), k.tenant.as_str())))
        .collect();
    let budgets = budgeted(&gateway, &caller, &keys).await?;
    let ledgers: Vec<String> = budgets.iter().map(|b| b.ledger.clone()).collect();
    let spends = gateway
        .store
        .month_spends(&ledgers, now_sec, &month)
        .await
        .map_err(store_error)?;
    let mut used: Vec<BudgetUse> = budgets
        .into_iter()
        .zip(spends)
        .map(|(b, spent_nano)| budget_use(b, spent_nano))
        .collect();
    used.sort_by(|a, b| {
        b.used_percent
            .total_cmp(&a.used_percent)
            .then_with(|| a.id.cmp(&b.id))
    });
    let budgets_total = used.len();
    used.truncate(budgets_shown);

    let (top_tenants, top_keys) = top_spenders(&gateway, &caller, top).await?;
    Ok(Json(SpendView {
        object: "spend",
        month: month.to_string(),
        thresholds: gateway
            .config
            .alerts
            .as_ref()
            .map_or_else(|| vec![50, 80, 100], |a| a.thresholds.clone()),
        budgets: used,
        budgets_total,
        top_tenants: top_tenants
            .into_iter()
            .map(|r| spender(r, Dim::Tenant, &names))
            .collect(),
        top_keys: top_keys
            .into_iter()
            .map(|r| spender(r, Dim::Key, &names))
            .collect(),
    }))
}

/// Every live key and tenant the caller may see that has a budget (its own or its tier's).
async fn budgeted(
    gateway: &Gateway,
    caller: &Caller,
    keys: &[crate::keys::KeyRecord],
) -> Result<Vec<Budgeted>, ApiError> {
    let has_budget = |l: &Limits| l.monthly_budget.is_some() || l.soft_monthly_budget.is_some();
    let tiers = gateway.tiers();
    let mut out = Vec::new();
    for key in keys
        .iter()
        .filter(|k| !k.is_revoked() && caller.sees(&k.tenant))
    {
        let Ok(tier) = tiers.get(&key.tier) else {
            continue;
        };
        let limits = tier.limits.with_overrides(&key.limits);
        if has_budget(&limits) {
            out.push(Budgeted {
                scope: "key",
                ledger: key.id.clone(),
                id: key.id.clone(),
                name: Some(key.name.clone()),
                tenant: key.tenant.clone(),
                limits,
                currency: Some(tier.currency.clone()),
            });
        }
    }
    // A tenant's currency is its keys' tiers', when they agree (`None` when they do not).
    let mut currencies: HashMap<&str, Option<&str>> = HashMap::new();
    for key in keys {
        if let Ok(tier) = tiers.get(&key.tier) {
            currencies
                .entry(key.tenant.as_str())
                .and_modify(|c| {
                    if *c != Some(tier.currency.as_str()) {
                        *c = None;
                    }
                })
                .or_insert(Some(tier.currency.as_str()));
        }
    }
    let tenants = gateway.store.tenants().await.map_err(store_error)?;
    for tenant in tenants.into_iter().filter(|t| caller.sees(&t.id)) {
        if has_budget(&tenant.limits) {
            let currency = currencies
                .get(tenant.id.as_str())
                .copied()
                .flatten()
                .map(str::to_owned);
            out.push(Budgeted {
                scope: "tenant",
                ledger: sluice_policies::tenants::ledger_of(&tenant.id),
                id: tenant.id.clone(),
                name: None,
                tenant: tenant.id,
                limits: tenant.limits,
                currency,
            });
        }
    }
    Ok(out)
}

fn budget_use(b: Budgeted, spent_nano: i64) -> BudgetUse {
    let spent = Decimal::from(spent_nano) / Decimal::from(quota::NANO);
    let hard = b.limits.monthly_budget.map(|m| m.amount());
    let soft = b.limits.soft_monthly_budget.map(|m| m.amount());
    let used_percent = match hard.or(soft) {
        Some(budget) if !budget.is_zero() => {
            let share = spent * Decimal::from(100) / budget;
            share.round_dp(2).try_into().unwrap_or(f64::MAX)
        }
        _ if spent.is_zero() => 0.0,
        _ => 100.0,
    };
    let exact = |d: Decimal| d.normalize().to_string();
    BudgetUse {
        scope: b.scope,
        id: b.id,
        name: b.name,
        tenant: b.tenant,
        spent: exact(spent),
        monthly_budget: hard.map(exact),
        soft_monthly_budget: soft.map(exact),
        currency: b.currency,
        used_percent,
    }
}

/// The month's priced usage by tenant and by key, each cut to the `top` largest.
async fn top_spenders(
    gateway: &Gateway,
    caller: &Caller,
    top: usize,
) -> Result<(Vec<Row>, Vec<Row>), ApiError> {
    // Up to now, to the millisecond: this second's usage counts too.
    let query = ExportQuery::parse(None, None, None, None, crate::clock::now_ms())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let tiers = gateway.tiers();
    let mut pricer = Pricer::new(&gateway.config.prices, &tiers);
    let mut by_tenant = Aggregator::new(&[Dim::Tenant], query.from_ms, query.to_ms);
    let mut by_key = Aggregator::new(&[Dim::Key], query.from_ms, query.to_ms);
    let mut pages = Reader::new(gateway, &query);
    while let Some(items) = pages.next().await? {
        price_page(items, caller, &mut pricer, |tally, _| {
            by_tenant.add_tally(tally);
            by_key.add_tally(tally);
        });
    }
    let largest = |mut rows: Vec<Row>| {
        rows.sort_by(|a, b| b.cost.cmp(&a.cost).then(b.requests.cmp(&a.requests)));
        rows.truncate(top);
        rows
    };
    Ok((largest(by_tenant.rows()), largest(by_key.rows())))
}

/// A row of the tenant or key aggregation as a spender; a key's name and tenant are its
/// record's (`names`: key id -> name and tenant).
fn spender(row: Row, dim: Dim, names: &HashMap<&str, (&str, &str)>) -> Spender {
    let (id, name, tenant) = match dim {
        Dim::Key => {
            let id = row.key_id.unwrap_or_default();
            let (name, tenant) = names.get(id.as_str()).copied().unwrap_or(("", ""));
            (id, Some(name.to_owned()), tenant.to_owned())
        }
        _ => {
            let tenant = row.tenant.unwrap_or_default();
            (tenant.clone(), None, tenant)
        }
    };
    Spender {
        id,
        name,
        tenant,
        cost: row.cost.normalize().to_string(),
        currency: row.currency,
        requests: row.requests,
        tokens: row.prompt_tokens + row.completion_tokens,
    }
}
