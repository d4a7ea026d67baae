//! API keys: create (the secret is shown once), list, read, update, revoke, rotate, and each
//! key's live quota.

use super::quota::QuotaView;
use super::{
    key_written, known_params, non_empty, number_param, parse_body, store_error, AppState, Caller,
};
use crate::app::Gateway;
use crate::error::{ApiError, ApiErrorBody};
use crate::keys::{new_key_id, KeyRecord, NewSecret};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use sluice_policies::{Distillation, LimitOverrides, Limits, ModelLimits, ModelLists};
use std::collections::HashMap;
use utoipa::ToSchema;

/// A key as the admin API shows it: never its secret or hash.
#[derive(Serialize, ToSchema)]
pub(super) struct KeyView {
    id: String,
    /// Always `api_key`.
    object: &'static str,
    name: String,
    tenant: String,
    tier: String,
    /// The key's own overrides of its tier's limits.
    limits: LimitOverrides,
    /// The tier's limits with the key's overrides on top; `null` when the key's tier is gone.
    #[schema(required)]
    effective_limits: Option<Limits>,
    /// The secret's first characters, for telling keys apart.
    display_prefix: String,
    /// Unix seconds.
    created_at: i64,
    /// Unix seconds; `null` while the key is active.
    #[schema(required)]
    revoked_at: Option<i64>,
    cache: bool,
    /// `null`: the tier's allow-list applies.
    #[schema(required)]
    allowed_models: Option<Vec<String>>,
    denied_models: Vec<String>,
    #[schema(value_type = BTreeMap<String, Limits>)]
    model_limits: ModelLimits,
    /// The key's own opt-in to capture for distillation; `null`: its tenant's applies.
    #[schema(required)]
    distillation: Option<Distillation>,
    status: KeyStatus,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum KeyStatus {
    Active,
    Revoked,
}

/// A key just created or rotated: the one answer that carries its secret.
#[derive(Serialize, ToSchema)]
pub(super) struct KeyWithSecret {
    #[serde(flatten)]
    view: KeyView,
    /// The secret (`sk-...`): shown here once, never again.
    key: String,
}

#[derive(Serialize, ToSchema)]
pub(super) struct KeyList {
    /// Always `list`.
    object: &'static str,
    data: Vec<KeyView>,
    /// How many keys match in all (`data` is a page of them when `limit` is given).
    total: usize,
    /// Whether more keys match after this page.
    has_more: bool,
    /// `after` for the next page; `null` on the last.
    #[schema(required)]
    next: Option<String>,
}

pub(super) fn key_view(gateway: &Gateway, record: &KeyRecord) -> KeyView {
    let effective = gateway
        .tiers()
        .get(&record.tier)
        .map(|t| t.limits.with_overrides(&record.limits))
        .ok();
    KeyView {
        id: record.id.clone(),
        object: "api_key",
        name: record.name.clone(),
        tenant: record.tenant.clone(),
        tier: record.tier.clone(),
        limits: record.limits.clone(),
        effective_limits: effective,
        display_prefix: record.display_prefix.clone(),
        created_at: record.created_at,
        revoked_at: record.revoked_at,
        cache: record.cache,
        allowed_models: record.models.allowed_models.clone(),
        denied_models: record.models.denied_models.clone(),
        model_limits: record.model_limits.clone(),
        distillation: record.distillation.clone(),
        status: if record.is_revoked() {
            KeyStatus::Revoked
        } else {
            KeyStatus::Active
        },
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateKey {
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
    #[schema(value_type = BTreeMap<String, Limits>)]
    model_limits: ModelLimits,
    /// The key's own opt-in to capture for distillation; absent: its tenant's applies.
    distillation: Option<Distillation>,
}

#[utoipa::path(
    post,
    path = "/admin/v1/keys",
    tag = "keys",
    request_body = CreateKey,
    responses(
        (status = 201, description = "The key, with its secret (shown this once)", body = KeyWithSecret),
        (status = 400, description = "The body is invalid", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
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
    let view = KeyWithSecret {
        view: key_view(&gateway, &record),
        key: secret.secret,
    };
    Ok((http::StatusCode::CREATED, Json(view)))
}

#[utoipa::path(
    get,
    path = "/admin/v1/keys",
    tag = "keys",
    params(
        ("search" = Option<String>, Query, description = "Only keys whose id, name, tenant or display prefix contains this (any case)"),
        ("tenant" = Option<String>, Query, description = "Only this tenant's keys"),
        ("tier" = Option<String>, Query, description = "Only keys of this tier"),
        ("status" = Option<String>, Query, description = "`active` or `revoked`"),
        ("limit" = Option<usize>, Query, description = "A page of at most this many keys (1 to 1000); without it, every key that matches"),
        ("after" = Option<String>, Query, description = "The `next` of the page before"),
    ),
    responses(
        (status = 200, description = "The keys the caller may see that match, newest first", body = KeyList),
        (status = 400, description = "A parameter is invalid", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn list_keys(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<KeyList>, ApiError> {
    let filter = KeyFilter::parse(&params)?;
    let mut keys: Vec<KeyRecord> = gateway
        .store
        .list_keys()
        .await
        .map_err(store_error)?
        .into_iter()
        .filter(|k| caller.sees(&k.tenant) && filter.matches(k))
        .collect();
    keys.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then_with(|| a.id.cmp(&b.id))
    });
    let total = keys.len();
    let start = match &filter.after {
        Some(after) => keys.partition_point(|k| !after.is_before(k)),
        None => 0,
    };
    let end = filter
        .limit
        .map_or(total, |limit| start.saturating_add(limit).min(total));
    let page = &keys[start.min(end)..end];
    let next = match (filter.limit, page.last()) {
        (Some(_), Some(last)) if end < total => Some(Cursor::of(last).to_string()),
        _ => None,
    };
    Ok(Json(KeyList {
        object: "list",
        data: page.iter().map(|k| key_view(&gateway, k)).collect(),
        total,
        has_more: next.is_some(),
        next,
    }))
}

/// What `GET /admin/v1/keys` was asked to list.
struct KeyFilter {
    /// Lowercased.
    search: Option<String>,
    tenant: Option<String>,
    tier: Option<String>,
    revoked: Option<bool>,
    limit: Option<usize>,
    after: Option<Cursor>,
}

impl KeyFilter {
    fn parse(params: &HashMap<String, String>) -> Result<KeyFilter, ApiError> {
        known_params(
            params,
            &["search", "tenant", "tier", "status", "limit", "after"],
        )?;
        let text = |name: &str| params.get(name).filter(|v| !v.is_empty()).cloned();
        let revoked = match params.get("status").map(String::as_str) {
            None | Some("") => None,
            Some("active") => Some(false),
            Some("revoked") => Some(true),
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "'status' is 'active' or 'revoked', not '{other}'."
                ))
                .with_param("status"))
            }
        };
        let limit = number_param(params, "limit", 1..=1000)?;
        let after = match params.get("after") {
            None => None,
            Some(v) => Some(v.parse::<Cursor>().map_err(|()| {
                ApiError::bad_request(format!(
                    "'after' must be the 'next' of an earlier page, not '{v}'."
                ))
                .with_param("after")
            })?),
        };
        Ok(KeyFilter {
            search: text("search").map(|s| s.to_lowercase()),
            tenant: text("tenant"),
            tier: text("tier"),
            revoked,
            limit,
            after,
        })
    }

    fn matches(&self, key: &KeyRecord) -> bool {
        let is = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        is(&self.tenant, &key.tenant)
            && is(&self.tier, &key.tier)
            && self.revoked.is_none_or(|r| r == key.is_revoked())
            && self.search.as_deref().is_none_or(|needle| {
                [&key.id, &key.name, &key.tenant, &key.display_prefix]
                    .iter()
                    .any(|field| field.to_lowercase().contains(needle))
            })
    }
}

/// Where a page of keys ended, in their order (newest first, then by id): `CREATED.ID`.
/// It names a place in the order rather than a key, so a page goes on from the right place
/// whatever was created or revoked in between.
struct Cursor {
    created_at: i64,
    id: String,
}

impl Cursor {
    fn of(key: &KeyRecord) -> Cursor {
        Cursor {
            created_at: key.created_at,
            id: key.id.clone(),
        }
    }

    /// Whether `key` comes after this place in the order.
    fn is_before(&self, key: &KeyRecord) -> bool {
        (std::cmp::Reverse(self.created_at), self.id.as_str())
            < (std::cmp::Reverse(key.created_at), key.id.as_str())
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.created_at, self.id)
    }
}

impl std::str::FromStr for Cursor {
    type Err = ();

    fn from_str(s: &str) -> Result<Cursor, ()> {
        let (created_at, id) = s.split_once('.').ok_or(())?;
        Ok(Cursor {
            created_at: created_at.parse().map_err(|_| ())?,
            id: id.to_owned(),
        })
    }
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

#[utoipa::path(
    get,
    path = "/admin/v1/keys/{id}",
    tag = "keys",
    responses(
        (status = 200, description = "The key", body = KeyView),
        (status = 404, description = "No such key (or another tenant's)", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn get_key(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
    let record = find_visible_key(&gateway, &caller, &id).await?;
    Ok(Json(key_view(&gateway, &record)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdateKey {
    name: Option<String>,
    tenant: Option<String>,
    tier: Option<String>,
    /// Replaces the key's overrides as a whole; `{}` clears them.
    limits: Option<LimitOverrides>,
    cache: Option<bool>,
    /// `null` clears the key's allow-list, so the tier's applies.
    #[serde(default, deserialize_with = "super::present")]
    #[schema(value_type = Option<Vec<String>>)]
    allowed_models: Option<Option<Vec<String>>>,
    denied_models: Option<Vec<String>>,
    /// Replaces the key's per-model limits as a whole; `{}` clears them.
    #[schema(value_type = Option<BTreeMap<String, Limits>>)]
    model_limits: Option<ModelLimits>,
    /// `null` clears the key's own opt-in, so its tenant's applies.
    #[serde(default, deserialize_with = "super::present")]
    #[schema(value_type = Option<Distillation>)]
    distillation: Option<Option<Distillation>>,
}

#[utoipa::path(
    patch,
    path = "/admin/v1/keys/{id}",
    tag = "keys",
    request_body = UpdateKey,
    responses(
        (status = 200, description = "The key as updated", body = KeyView),
        (status = 400, description = "The body is invalid, or the key is revoked", body = ApiErrorBody),
        (status = 404, description = "No such key", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn update_key(
    State(gateway): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<KeyView>, ApiError> {
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

/// Revoking a revoked key changes nothing and answers the same.
#[utoipa::path(
    delete,
    path = "/admin/v1/keys/{id}",
    tag = "keys",
    responses(
        (status = 200, description = "The key, revoked", body = KeyView),
        (status = 404, description = "No such key", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn revoke_key(
    State(gateway): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
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

/// A new secret for the key; the old one stops working at once.
#[utoipa::path(
    post,
    path = "/admin/v1/keys/{id}/rotate",
    tag = "keys",
    responses(
        (status = 200, description = "The key, with its new secret (shown this once)", body = KeyWithSecret),
        (status = 400, description = "The key is revoked", body = ApiErrorBody),
        (status = 404, description = "No such key", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn rotate_key(
    State(gateway): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<KeyWithSecret>, ApiError> {
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
    Ok(Json(KeyWithSecret {
        view: key_view(&gateway, &record),
        key: secret.secret,
    }))
}

/// Each of the key's limits' live state, per-model limits included.
#[utoipa::path(
    get,
    path = "/admin/v1/keys/{id}/quota",
    tag = "keys",
    responses(
        (status = 200, description = "The key's quota", body = KeyQuota),
        (status = 404, description = "No such key (or another tenant's)", body = ApiErrorBody),
        (status = 500, description = "The key's tier is gone", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn key_quota(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<KeyQuota>, ApiError> {
    let record = find_visible_key(&gateway, &caller, &id).await?;
    let tiers = gateway.tiers();
    let tier = tiers
        .get(&record.tier)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let limits = tier.limits.with_overrides(&record.limits);
    let model_limits =
        sluice_policies::limits::merge_model_limits(&tier.model_limits, &record.model_limits);
    let quota = super::quota::quota_view_with_models(
        &gateway,
        &id,
        &limits,
        &model_limits,
        Some(&tier.currency),
    )
    .await?;
    Ok(Json(KeyQuota {
        key_id: id,
        tier: record.tier,
        quota,
    }))
}

#[derive(Serialize, ToSchema)]
pub(super) struct KeyQuota {
    key_id: String,
    tier: String,
    #[serde(flatten)]
    quota: QuotaView,
}

#[derive(Serialize, ToSchema)]
pub(super) struct QuotaReset {
    key_id: String,
    /// Always `true`.
    reset: bool,
}

/// Forgets the key's windows, caps and month spend.
#[utoipa::path(
    post,
    path = "/admin/v1/keys/{id}/quota/reset",
    tag = "keys",
    responses(
        (status = 200, description = "The key's quota is reset", body = QuotaReset),
        (status = 404, description = "No such key", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn reset_key_quota(
    State(gateway): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<QuotaReset>, ApiError> {
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
    Ok(Json(QuotaReset {
        key_id: id,
        reset: true,
    }))
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
