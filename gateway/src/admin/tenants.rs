//! Tenants: the customer behind many keys. An operator sets limits that all of a tenant's
//! keys count against together (the key limit fields: rates, days, concurrency, budget);
//! every replica applies them within a second, in the same atomic admission as each key's.

use super::quota::QuotaView;
use super::{key_written, non_empty, parse_body, store_error, AppState, Caller};
use crate::app::Gateway;
use crate::error::{ApiError, ApiErrorBody};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use sluice_policies::{tenants, Distillation, Limits, ModelLimits, Tenant};
use utoipa::ToSchema;

/// A tenant as the admin API shows it.
#[derive(Serialize, ToSchema)]
pub(super) struct TenantView {
    id: String,
    /// Always `tenant`.
    object: &'static str,
    limits: Limits,
    #[schema(value_type = BTreeMap<String, Limits>)]
    model_limits: ModelLimits,
    /// The tenant's opt-in to capture for distillation; `null`: nothing is kept.
    #[schema(required)]
    distillation: Option<Distillation>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct TenantList {
    /// Always `list`.
    object: &'static str,
    data: Vec<TenantView>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct TenantQuota {
    tenant: String,
    #[serde(flatten)]
    quota: QuotaView,
}

pub(super) fn tenant_view(tenant: Tenant) -> TenantView {
    TenantView {
        id: tenant.id,
        object: "tenant",
        limits: tenant.limits,
        model_limits: tenant.model_limits,
        distillation: tenant.distillation,
    }
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

/// Every tenant whose limits were set.
#[utoipa::path(
    get,
    path = "/admin/v1/tenants",
    tag = "tenants",
    responses((status = 200, description = "The tenants the caller may see, by id", body = TenantList)),
)]
pub(super) async fn list_tenants(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Json<TenantList> {
    let mut data: Vec<Tenant> = gateway
        .tenants
        .load()
        .iter()
        .filter(|t| caller.sees(&t.id))
        .collect();
    data.sort_by(|a, b| a.id.cmp(&b.id));
    Json(TenantList {
        object: "list",
        data: data.into_iter().map(tenant_view).collect(),
    })
}

/// The tenant's limits (all unlimited until set). Any tenant name is a tenant: keys and
/// tokens name theirs freely.
#[utoipa::path(
    get,
    path = "/admin/v1/tenants/{tenant}",
    tag = "tenants",
    responses(
        (status = 200, description = "The tenant", body = TenantView),
        (status = 404, description = "Another tenant than a scoped viewer's", body = ApiErrorBody),
    ),
)]
pub(super) async fn get_tenant(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<TenantView>, ApiError> {
    visible(&caller, &id)?;
    Ok(Json(tenant_view(gateway.tenants.load().get(&id))))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PutTenant {
    limits: Limits,
    /// Limits for single models, for all of the tenant's keys together.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, Limits>)]
    model_limits: ModelLimits,
    /// The tenant's opt-in to capture for distillation; absent or `null`: off.
    #[serde(default)]
    distillation: Option<Distillation>,
}

/// Sets (replaces) the tenant's limits; every replica applies them within a second.
#[utoipa::path(
    put,
    path = "/admin/v1/tenants/{tenant}",
    tag = "tenants",
    request_body = PutTenant,
    responses(
        (status = 200, description = "The tenant as written", body = TenantView),
        (status = 400, description = "The body is invalid", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn put_tenant(
    State(gateway): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<TenantView>, ApiError> {
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
    Ok(Json(tenant_view(tenant)))
}

/// The live state of the tenant's own limits, counting every one of its keys.
#[utoipa::path(
    get,
    path = "/admin/v1/tenants/{tenant}/quota",
    tag = "tenants",
    responses(
        (status = 200, description = "The tenant's quota", body = TenantQuota),
        (status = 404, description = "Another tenant than a scoped viewer's", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn tenant_quota(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<TenantQuota>, ApiError> {
    visible(&caller, &id)?;
    let (limits, model_limits) = {
        let tenants = gateway.tenants.load();
        (tenants.limits(&id), tenants.model_limits(&id))
    };
    let currency = tenant_currency(&gateway, &id).await?;
    let quota = super::quota::quota_view_with_models(
        &gateway,
        &tenants::ledger_of(&id),
        &limits,
        &model_limits,
        currency.as_deref(),
    )
    .await?;
    Ok(Json(TenantQuota { tenant: id, quota }))
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
