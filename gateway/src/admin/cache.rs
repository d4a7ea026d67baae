//! The response cache: its counters, and purges by tenant and model.

use super::{store_error, AppState};
use crate::error::ApiError;
use axum::extract::{Query, State};
use axum::Json;
use serde_json::{json, Value};
use std::collections::HashMap;

/// `GET /admin/v1/cache/stats`: entries (the same on every replica) and this replica's
/// lookups by kind, overall and per tenant.
pub(super) async fn cache_stats(State(gateway): State<AppState>) -> Json<crate::cache::CacheStats> {
    Json(gateway.cache.stats())
}

/// `DELETE /admin/v1/cache?tenant=..&model=..`: deletes the entries of a tenant, a model,
/// both, or (with neither) every entry, on every replica.
pub(super) async fn purge_cache(
    State(gateway): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(
        json!({"deleted": deleted, "tenant": tenant, "model": model}),
    ))
}
