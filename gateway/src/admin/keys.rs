//! API keys: create (the secret is shown once), list, read, update, revoke, rotate, and each
//! key's live quota.

use super::{key_written, non_empty, parse_body, store_error, AppState, Caller};
use crate::app::Gateway;
use crate::error::ApiError;
use crate::keys::{new_key_id, KeyRecord, NewSecret};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_policies::{Distillation, LimitOverrides, ModelLists};

/// A key as the admin API shows it: never its secret or hash.
pub(super) fn key_view(gateway: &Gateway, record: &KeyRecord) -> Value {
    let effective = gateway
        .tiers()
        .get(&record.tier)
        .map(|t| t.limits.with_overrides(&record.limits))
        .ok();
    json!({
        "id": record.id,
        "object": "api_key",
        "name": record.name,
        "tenant": record.tenant,
        "tier": record.tier,
        "limits": record.limits,
        "effective_limits": effective,
        "display_prefix": record.display_prefix,
        "created_at": record.created_at,
        "revoked_at": record.revoked_at,
        "cache": record.cache,
        "allowed_models": record.models.allowed_models,
        "denied_models": record.models.denied_models,
        "model_limits": record.model_limits,
        "distillation": record.distillation,
        "status": if record.is_revoked() { "revoked" } else { "active" },
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    tenant: String,
    tier: Option<String>,
    #[serde(default)]
    limits: LimitOverrides,
    /// `false` keeps this key's answers out of the response cache.
    cache: Option<bool>,
    /// Replaces the tier's allow-list for this key; absent or `null`: the tier's.
    allowed_models: Option<Vec<String>>,
    /// Added to the tier's deny-list.
    #[serde(default)]
    denied_models: Vec<String>,
    /// Limits for single models; a model named here replaces the tier's limits for it.
    #[serde(default)]
    model_limits: sluice_policies::ModelLimits,
    /// The key's own opt-in to capture for distillation; absent: its tenant's applies.
    distillation: Option<Distillation>,
}

pub(super) async fn create_key(
    State(gateway): State<AppState>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let req: CreateKey = parse_body(&body)?;
    non_empty("name", &req.name)?;
    tenant_name(&req.tenant)?;
    let tier = req
        .tier
        .unwrap_or_else(|| sluice_policies::tiers::DEFAULT_TIER.to_owned());
    gateway
        .tiers()
        .get(&tier)
        .map_err(|e| ApiError::bad_request(e.to_string()).with_param("tier"))?;
    let models = model_lists(ModelLists {
        allowed_models: req.allowed_models,
        denied_models: req.denied_models,
    })?;
    model_limits(&req.model_limits)?;
    if let Some(opt_in) = &req.distillation {
        distillation(opt_in)?;
    }
    let secret = NewSecret::generate();
    let record = KeyRecord {
        id: new_key_id(),
        name: req.name,
        tenant: req.tenant,
        tier,
        limits: req.limits,
        hash: secret.hash,
        display_prefix: secret.display_prefix,
        created_at: crate::clock::now_sec(),
        revoked_at: None,
        cache: req.cache.unwrap_or(true),
        models,
        model_limits: req.model_limits,
        distillation: req.distillation,
    };
    gateway
        .store
        .put_key(&record, None)
        .await
        .map_err(store_error)?;
    key_written(&gateway).await;
    tracing::info!(key_id = %record.id, tenant = %record.tenant, tier = %record.tier, "key created");
    let mut view = key_view(&gateway, &record);
    view["key"] = Value::String(secret.secret);
    Ok((http::StatusCode::CREATED, Json(view)))
}

pub(super) async fn list_keys(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let keys = gateway.store.list_keys().await.map_err(store_error)?;
    let data: Vec<Value> = keys
        .iter()
        .filter(|k| caller.sees(&k.tenant))
        .map(|k| key_view(&gateway, k))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

pub(super) async fn find_key(gateway: &Gateway, id: &str) -> Result<KeyRecord, ApiError> {
    gateway
        .store
        .key(id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found(format!("No API key with id '{id}'.")))
}

/// A key the caller may see; another tenant's key is as good as absent.
async fn find_visible_key(
    gateway: &Gateway,
    caller: &Caller,
    id: &str,
) -> Result<KeyRecord, ApiError> {
    let record = find_key(gateway, id).await?;
    if !caller.sees(&record.tenant) {
        return Err(ApiError::not_found(format!("No API key with id '{id}'.")));
    }
    Ok(record)
}

pub(super) async fn get_key(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let record = find_visible_key(&gateway, &caller, &id).await?;
    Ok(Json(key_view(&gateway, &record)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateKey {
    name: Option<String>,
    tenant: Option<String>,
    tier: Option<String>,
    /// Replaces the key's overrides as a whole; `{}` clears them.
    limits: Option<LimitOverrides>,
    cache: Option<bool>,
    /// `null` clears the key's allow-list, so the tier's applies.
    #[serde(default, deserialize_with = "super::present")]
    allowed_models: Option<Option<Vec<String>>>,
    denied_models: Option<Vec<String>>,
    /// Replaces the key's per-model limits as a whole; `{}` clears them.
    model_limits: Option<sluice_policies::ModelLimits>,
    /// `null` clears the key's own opt-in, so its tenant's applies.
    #[serde(default, deserialize_with = "super::present")]
    distillation: Option<Option<Distillation>>,
}

pub(super) async fn update_key(
    State(gateway): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: UpdateKey = parse_body(&body)?;
    let mut record = find_key(&gateway, &id).await?;
    if record.is_revoked() {
        return Err(ApiError::bad_request(format!(
            "API key '{id}' is revoked and cannot be changed."
        )));
    }
    if let Some(name) = req.name {
        non_empty("name", &name)?;
        record.name = name;
    }
    if let Some(tenant) = req.tenant {
        tenant_name(&tenant)?;
        record.tenant = tenant;
    }
    if let Some(tier) = req.tier {
        gateway
            .tiers()
            .get(&tier)
            .map_err(|e| ApiError::bad_request(e.to_string()).with_param("tier"))?;
        record.tier = tier;
    }
    if let Some(limits) = req.limits {
        record.limits = limits;
    }
    if let Some(cache) = req.cache {
        record.cache = cache;
    }
    if let Some(allowed) = req.allowed_models {
        record.models.allowed_models = allowed;
    }
    if let Some(denied) = req.denied_models {
        record.models.denied_models = denied;
    }
    record.models = model_lists(record.models)?;
    if let Some(model_limits) = req.model_limits {
        self::model_limits(&model_limits)?;
        record.model_limits = model_limits;
    }
    if let Some(opt_in) = req.distillation {
        if let Some(opt_in) = &opt_in {
            distillation(opt_in)?;
        }
        record.distillation = opt_in;
    }
    gateway
        .store
        .put_key(&record, None)
        .await
        .map_err(store_error)?;
    key_written(&gateway).await;
    Ok(Json(key_view(&gateway, &record)))
}

pub(super) async fn revoke_key(
    State(gateway): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let mut record = find_key(&gateway, &id).await?;
    if !record.is_revoked() {
        record.revoked_at = Some(crate::clock::now_sec());
        gateway
            .store
            .put_key(&record, None)
            .await
            .map_err(store_error)?;
        key_written(&gateway).await;
        tracing::info!(key_id = %record.id, "key revoked");
    }
    Ok(Json(key_view(&gateway, &record)))
}

pub(super) async fn rotate_key(
    State(gateway): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let mut record = find_key(&gateway, &id).await?;
    if record.is_revoked() {
        return Err(ApiError::bad_request(format!(
            "API key '{id}' is revoked and cannot be rotated."
        )));
    }
    let secret = NewSecret::generate();
    let old_hash = std::mem::replace(&mut record.hash, secret.hash);
    record.display_prefix = secret.display_prefix;
    gateway
        .store
        .put_key(&record, Some(&old_hash))
        .await
        .map_err(store_error)?;
    key_written(&gateway).await;
    tracing::info!(key_id = %record.id, "key rotated");
    let mut view = key_view(&gateway, &record);
    view["key"] = Value::String(secret.secret);
    Ok(Json(view))
}

/// `GET /admin/v1/keys/{id}/quota`: each of the key's limits' live state (see
/// `quota::quota_view`).
pub(super) async fn key_quota(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let record = find_visible_key(&gateway, &caller, &id).await?;
    let tiers = gateway.tiers();
    let tier = tiers
        .get(&record.tier)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let limits = tier.limits.with_overrides(&record.limits);
    let model_limits =
        sluice_policies::limits::merge_model_limits(&tier.model_limits, &record.model_limits);
    let mut view = super::quota::quota_view_with_models(
        &gateway,
        &id,
        &limits,
        &model_limits,
        Some(&tier.currency),
    )
    .await?;
    view["key_id"] = json!(id);
    view["tier"] = json!(record.tier);
    Ok(Json(view))
}

/// `POST /admin/v1/keys/{id}/quota/reset`: forgets the key's windows, caps and month spend.
pub(super) async fn reset_key_quota(
    State(gateway): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    find_key(&gateway, &id).await?;
    let now = crate::clock::now_ms() / 1000;
    let (month, _) = crate::clock::month_of(now);
    gateway
        .store
        .reset_quota(&id, now, &month)
        .await
        .map_err(store_error)?;
    gateway.admission.forget_key(&id);
    tracing::info!(key_id = %id, "quota reset");
    Ok(Json(json!({"key_id": id, "reset": true})))
}

/// A key's model lists, if every pattern is well-formed.
/// Per-model limits that can be enforced, or a 400 that says which model and why.
pub(super) fn model_limits(limits: &sluice_policies::ModelLimits) -> Result<(), ApiError> {
    sluice_policies::limits::validate_model_limits(limits)
        .map_err(|e| ApiError::bad_request(format!("{e}.")).with_param("model_limits"))
}

pub(super) fn distillation(opt_in: &Distillation) -> Result<(), ApiError> {
    opt_in
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()).with_param(e.field()))
}

fn model_lists(lists: ModelLists) -> Result<ModelLists, ApiError> {
    lists
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()).with_param(e.field()))?;
    Ok(lists)
}

/// An API key's tenant: named by the operator, and never in the `jwt:` namespace, which
/// belongs to tenants that JWTs name (so a token cannot spend or see a key tenant's quota).
fn tenant_name(tenant: &str) -> Result<(), ApiError> {
    non_empty("tenant", tenant)?;
    if tenant.starts_with(crate::auth::JWT_TENANT_PREFIX) {
        return Err(ApiError::bad_request(format!(
            "'tenant' must not start with '{}': that namespace belongs to JWT tenants.",
            crate::auth::JWT_TENANT_PREFIX
        ))
        .with_param("tenant"));
    }
    Ok(())
}
