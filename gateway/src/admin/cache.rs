//! The response cache: its counters, and purges by tenant and model.

use super::{store_error, AppState};
use crate::cache::CacheStats;
use crate::error::{ApiError, ApiErrorBody};
use axum::extract::{Query, State};
use axum::Json;
use serde::Serialize;
use std::collections::HashMap;
use utoipa::ToSchema;

/// Entries (the same on every replica) and this replica's lookups by kind, overall and per
/// tenant.
#[utoipa::path(
    get,
    path = "/admin/v1/cache/stats",
    tag = "cache",
    responses((status = 200, description = "The cache's counters", body = CacheStats)),
)]
pub(super) async fn cache_stats(State(gateway): State<AppState>) -> Json<CacheStats> {
    Json(gateway.cache.stats())
}

#[derive(Serialize, ToSchema)]
pub(super) struct CachePurged {
    deleted: usize,
    /// The purge's scope as asked; `null`: every tenant (or model).
    #[schema(required)]
    tenant: Option<String>,
    #[schema(required)]
    model: Option<String>,
}

/// Deletes the entries of a tenant, a model, both, or (with neither) every entry, on every
/// replica.
#[utoipa::path(
    delete,
    path = "/admin/v1/cache",
    tag = "cache",
    params(
        ("tenant" = Option<String>, Query, description = "Only this tenant's entries"),
        ("model" = Option<String>, Query, description = "Only this model's entries"),
    ),
    responses(
        (status = 200, description = "How many entries were deleted", body = CachePurged),
        (status = 400, description = "An unknown or empty parameter", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn purge_cache(
    State(gateway): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<CachePurged>, ApiError> {
    if let Some(unknown) = params
        .keys()
        .find(|k| !matches!(k.as_str(), "tenant" | "model"))
    {
        return Err(ApiError::bad_request(format!(
            "Unknown parameter '{unknown}': purge by tenant, model, or neither for everything."
        )));
    }
    let tenant = params.get("tenant").map(String::as_str);
    let model = params.get("model").map(String::as_str);
    for (name, value) in [("tenant", tenant), ("model", model)] {
        if value.is_some_and(str::is_empty) {
            return Err(ApiError::bad_request(format!(
                "'{name}' must not be empty."
            )));
        }
    }
    let deleted = gateway
        .cache
        .purge(tenant, model)
        .await
        .map_err(store_error)?;
    tracing::info!(tenant, model, deleted, "cache purged");
    Ok(Json(CachePurged {
        deleted,
        tenant: tenant.map(str::to_owned),
        model: model.map(str::to_owned),
    }))
}
