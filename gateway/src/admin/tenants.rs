//! Tenants: the customer behind many keys. An operator sets limits that all of a tenant's
//! keys count against together (the key limit fields: rates, days, concurrency, budget);
//! every replica applies them within a second, in the same atomic admission as each key's.

use super::{key_written, non_empty, parse_body, store_error, AppState, Caller};
use crate::app::Gateway;
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_policies::{tenants, Limits, Tenant};

/// A tenant as the admin API shows it.
fn tenant_view(tenant: &Tenant) -> Value {
    json!({"id": tenant.id, "object": "tenant", "limits": tenant.limits,
           "model_limits": tenant.model_limits, "distillation": tenant.distillation})
}

/// The tenant, unless the caller is a viewer scoped to another one (then it does not exist
/// for them).
fn visible(caller: &Caller, id: &str) -> Result<(), ApiError> {
    if caller.sees(id) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("No tenant '{id}'.")))
    }
}

/// `GET /admin/v1/tenants`: every tenant whose limits were set.
pub(super) async fn list_tenants(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Json<Value> {
    let mut data: Vec<Tenant> = gateway
        .tenants
        .load()
        .iter()
        .filter(|t| caller.sees(&t.id))
        .collect();
    data.sort_by(|a, b| a.id.cmp(&b.id));
    let data: Vec<Value> = data.iter().map(tenant_view).collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /admin/v1/tenants/{id}`: the tenant's limits (all unlimited until set). Any tenant
/// name is a tenant: keys and tokens name theirs freely.
pub(super) async fn get_tenant(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    visible(&caller, &id)?;
    Ok(Json(tenant_view(&gateway.tenants.load().get(&id))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutTenant {
    limits: Limits,
    /// Limits for single models, for all of the tenant's keys together.
    #[serde(default)]
    model_limits: sluice_policies::ModelLimits,
    /// The tenant's opt-in to capture for distillation; absent or `null`: off.
    #[serde(default)]
    distillation: Option<sluice_policies::Distillation>,
}

/// `PUT /admin/v1/tenants/{id}` with `{"limits": {...}}`: sets (replaces) the tenant's
/// limits; every replica applies them within a second.
pub(super) async fn put_tenant(
    State(gateway): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    non_empty("id", &id)?;
    let req: PutTenant = parse_body(&body)?;
    super::keys::model_limits(&req.model_limits)?;
    if let Some(opt_in) = &req.distillation {
        super::keys::distillation(opt_in)?;
    }
    let tenant = Tenant {
        id: id.clone(),
        limits: req.limits,
        model_limits: req.model_limits,
        distillation: req.distillation,
    };
    gateway
        .store
        .put_tenant(&tenant)
        .await
        .map_err(store_error)?;
    gateway.reload_shared().await.map_err(|e| {
        tracing::error!(error = %e, "tenant reload failed");
        ApiError::unavailable("The store is unavailable; try again shortly.")
    })?;
    key_written(&gateway).await;
    tracing::info!(tenant = %id, "tenant limits written");
    Ok(Json(tenant_view(&tenant)))
}

/// `GET /admin/v1/tenants/{id}/quota`: the live state of the tenant's own limits, counting
/// every one of its keys.
pub(super) async fn tenant_quota(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    visible(&caller, &id)?;
    let (limits, model_limits) = {
        let tenants = gateway.tenants.load();
        (tenants.limits(&id), tenants.model_limits(&id))
    };
    let currency = tenant_currency(&gateway, &id).await?;
    let mut view = super::quota::quota_view_with_models(
        &gateway,
        &tenants::ledger_of(&id),
        &limits,
        &model_limits,
        currency.as_deref(),
    )
    .await?;
    view["tenant"] = json!(id);
    Ok(Json(view))
}

/// The currency of the tenant's spend: its keys' tiers', when they agree (a tenant's
/// budget counts its keys' costs as they are, so its keys' tiers should share one).
async fn tenant_currency(gateway: &Gateway, tenant: &str) -> Result<Option<String>, ApiError> {
    let tiers = gateway.tiers();
    let mut currencies: Vec<String> = gateway
        .store
        .list_keys()
        .await
        .map_err(store_error)?
        .iter()
        .filter(|k| k.tenant == tenant)
        .filter_map(|k| tiers.get(&k.tier).ok().map(|t| t.currency.clone()))
        .collect();
    currencies.sort();
    currencies.dedup();
    Ok(match currencies.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    })
}
