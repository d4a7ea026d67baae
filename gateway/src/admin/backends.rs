//! The backend pool: list with health, add, remove, drain and undrain, on every replica.

use super::{key_written, non_empty, parse_body, store_error, AppState};
use crate::app::Gateway;
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

/// A backend as the admin API shows it.
pub(super) fn backend_view(
    gateway: &Gateway,
    b: &std::sync::Arc<crate::upstream::Backend>,
) -> Value {
    let models = gateway.upstreams.models();
    let served: Vec<&str> = models
        .values()
        .filter(|m| m.backends.iter().any(|mb| std::sync::Arc::ptr_eq(mb, b)))
        .map(|m| m.id.as_str())
        .collect();
    let st = &b.state;
    json!({
        "name": b.name,
        "url": b.url,
        "models": served,
        "health": if !st.is_up() { "down" } else if st.ejected() { "ejected" } else { "up" },
        "draining": st.draining.load(std::sync::atomic::Ordering::Relaxed),
        "in_flight": st.in_flight.load(std::sync::atomic::Ordering::Relaxed),
        "ewma_ms": st.ewma().as_secs_f64() * 1000.0,
        "last_scrape": st.last_scrape().map(|(waiting, running, kv, age)| json!({
            "waiting": waiting,
            "running": running,
            "kv_cache_usage": kv,
            "age_ms": age.as_millis() as u64,
        })),
    })
}

pub(super) async fn list_backends(State(gateway): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = gateway
        .upstreams
        .backends()
        .iter()
        .map(|b| backend_view(&gateway, b))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBackend {
    name: String,
    url: String,
    /// The models it serves; without them the gateway asks its `/v1/models`.
    #[serde(default)]
    models: Vec<String>,
}

/// `POST /admin/v1/backends`: adds a backend to the pool on every replica (within a second).
pub(super) async fn add_backend(
    State(gateway): State<AppState>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let req: AddBackend = parse_body(&body)?;
    non_empty("name", &req.name)?;
    if gateway
        .upstreams
        .backends()
        .iter()
        .any(|b| b.name == req.name)
    {
        return Err(ApiError::conflict(format!(
            "A backend named '{}' is already in the pool; remove it first to change it.",
            req.name
        ))
        .with_param("name"));
    }
    let backend = crate::config::backend(&req.name, &req.url, req.models)
        .map_err(|e| ApiError::bad_request(e.to_string()).with_param("url"))?;
    let record = crate::store::BackendRecord {
        url: backend.url.clone(),
        models: backend.models.clone(),
    };
    gateway
        .store
        .set_backend(&req.name, Some(&record))
        .await
        .map_err(store_error)?;
    pool_written(&gateway).await?;
    let added = gateway
        .upstreams
        .backends()
        .iter()
        .find(|b| b.name == req.name)
        .cloned()
        .ok_or_else(|| ApiError::internal("The backend was stored but is not in the pool."))?;
    tracing::info!(backend = %req.name, url = %added.url, "backend added");
    Ok((
        http::StatusCode::CREATED,
        Json(backend_view(&gateway, &added)),
    ))
}

/// `DELETE /admin/v1/backends/{name}`: takes a backend out of the pool on every replica.
/// Requests it is serving finish; no new ones go to it.
pub(super) async fn remove_backend(
    State(gateway): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !gateway.upstreams.backends().iter().any(|b| b.name == name) {
        return Err(ApiError::not_found(format!("No backend named '{name}'.")));
    }
    gateway
        .store
        .set_backend(&name, None)
        .await
        .map_err(store_error)?;
    pool_written(&gateway).await?;
    tracing::info!(backend = %name, "backend removed");
    Ok(Json(json!({"name": name, "removed": true})))
}

/// Applies a pool change here at once; other replicas follow the store's epoch.
pub(super) async fn pool_written(gateway: &Gateway) -> Result<(), ApiError> {
    gateway.reload_shared().await.map_err(|e| {
        tracing::error!(error = %e, "pool reload failed");
        ApiError::unavailable("The store is unavailable; try again shortly.")
    })?;
    key_written(gateway).await;
    Ok(())
}

/// `POST /admin/v1/backends/{name}/drain`: the backend takes no new requests (on every
/// replica within a second); those in flight, streams included, finish. `DELETE` on the same
/// path puts it back in service.
pub(super) async fn drain_backend(
    State(gateway): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_draining(&gateway, &name, true).await
}

pub(super) async fn undrain_backend(
    State(gateway): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_draining(&gateway, &name, false).await
}

pub(super) async fn set_draining(
    gateway: &Gateway,
    name: &str,
    draining: bool,
) -> Result<Json<Value>, ApiError> {
    let Some(backend) = gateway
        .upstreams
        .backends()
        .iter()
        .find(|b| b.name == name)
        .cloned()
    else {
        return Err(ApiError::not_found(format!("No backend named '{name}'.")));
    };
    gateway
        .store
        .set_draining(name, draining)
        .await
        .map_err(store_error)?;
    backend
        .state
        .draining
        .store(draining, std::sync::atomic::Ordering::Relaxed);
    key_written(gateway).await;
    tracing::info!(backend = %name, draining, "backend drain changed");
    Ok(Json(json!({"name": name, "draining": draining})))
}
