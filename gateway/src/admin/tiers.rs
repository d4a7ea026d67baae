//! Tiers: the limits, caps and fail mode a key gets by name; changed here, applied by every
//! replica within a second.

use super::{key_written, non_empty, parse_body, store_error, AppState};
use crate::error::{ApiError, ApiErrorBody};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use sluice_policies::{Limits, Tier};
use utoipa::ToSchema;

#[derive(Serialize, ToSchema)]
pub(super) struct TierList {
    /// Always `list`.
    object: &'static str,
    data: Vec<Tier>,
    /// The tier a key gets when none is named.
    default_tier: &'static str,
}

#[utoipa::path(
    get,
    path = "/admin/v1/tiers",
    tag = "tiers",
    responses((status = 200, description = "Every tier in force", body = TierList)),
)]
pub(super) async fn list_tiers(State(gateway): State<AppState>) -> Json<TierList> {
    let tiers = gateway.tiers();
    Json(TierList {
        object: "list",
        data: tiers.iter().cloned().collect(),
        default_tier: sluice_policies::tiers::DEFAULT_TIER,
    })
}

#[utoipa::path(
    get,
    path = "/admin/v1/tiers/{name}",
    tag = "tiers",
    responses(
        (status = 200, description = "The tier", body = Tier),
        (status = 404, description = "No such tier", body = ApiErrorBody),
    ),
)]
pub(super) async fn get_tier(
    State(gateway): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Tier>, ApiError> {
    let tiers = gateway.tiers();
    let tier = tiers
        .get(&name)
        .map_err(|e| ApiError::not_found(e.to_string()))?;
    Ok(Json(tier.clone()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PutTier {
    currency: Option<String>,
    limits: Limits,
    #[serde(default)]
    on_store_unavailable: Option<sluice_policies::FailMode>,
    #[serde(default)]
    request_caps: Option<sluice_policies::RequestCaps>,
    /// Absent: the tier's current list; `null`: no allow-list (every model).
    #[serde(default, deserialize_with = "super::present")]
    #[schema(value_type = Option<Vec<String>>)]
    allowed_models: Option<Option<Vec<String>>>,
    denied_models: Option<Vec<String>>,
    /// Absent: the tier's current per-model limits; `{}` removes them.
    #[schema(value_type = Option<BTreeMap<String, Limits>>)]
    model_limits: Option<sluice_policies::ModelLimits>,
}

/// Creates or replaces a tier; every replica applies it within a second (it moves the
/// store's key epoch, which each replica polls).
#[utoipa::path(
    put,
    path = "/admin/v1/tiers/{name}",
    tag = "tiers",
    request_body = PutTier,
    responses(
        (status = 200, description = "The tier as written", body = Tier),
        (status = 400, description = "The body, or the tiers and prices it would make, are invalid", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn put_tier(
    State(gateway): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Tier>, ApiError> {
    let req: PutTier = parse_body(&body)?;
    non_empty("name", &name)?;
    let current = gateway.tiers();
    let existing = current.get(&name).ok();
    let tier = sluice_policies::Tier {
        name: name.clone(),
        currency: req
            .currency
            .or_else(|| existing.map(|t| t.currency.clone()))
            .unwrap_or_else(|| "USD".to_owned()),
        limits: req.limits,
        on_store_unavailable: req
            .on_store_unavailable
            .or_else(|| existing.map(|t| t.on_store_unavailable))
            .unwrap_or_default(),
        request_caps: req
            .request_caps
            .or_else(|| existing.map(|t| t.request_caps))
            .unwrap_or_default(),
        models: sluice_policies::ModelLists {
            allowed_models: req
                .allowed_models
                .unwrap_or_else(|| existing.and_then(|t| t.models.allowed_models.clone())),
            denied_models: req
                .denied_models
                .or_else(|| existing.map(|t| t.models.denied_models.clone()))
                .unwrap_or_default(),
        },
        model_limits: req
            .model_limits
            .or_else(|| existing.map(|t| t.model_limits.clone()))
            .unwrap_or_default(),
    };
    // Validate as the whole set would be, prices included, before storing anything.
    let mut all: Vec<_> = current.iter().filter(|t| t.name != name).cloned().collect();
    all.push(tier.clone());
    let candidate =
        sluice_policies::Tiers::new(all).map_err(|e| ApiError::bad_request(e.to_string()))?;
    gateway
        .config
        .prices
        .validate(&candidate)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    gateway.store.put_tier(&tier).await.map_err(store_error)?;
    gateway.reload_shared().await.map_err(|e| {
        tracing::error!(error = %e, "tier reload failed");
        ApiError::unavailable("The store is unavailable; try again shortly.")
    })?;
    key_written(&gateway).await;
    tracing::info!(tier = %name, "tier written");
    Ok(Json(tier))
}
