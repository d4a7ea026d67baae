//! The backend pool: list with health, add, remove, drain and undrain, on every replica.

use super::{key_written, non_empty, parse_body, store_error, AppState};
use crate::app::Gateway;
use crate::backend_spec::BackendSpec;
use crate::error::{ApiError, ApiErrorBody};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use std::sync::atomic::Ordering;
use utoipa::ToSchema;

/// A backend as the admin API shows it.
#[derive(Serialize, ToSchema)]
pub(super) struct BackendView {
    name: String,
    url: String,
    /// The models it serves.
    models: Vec<String>,
    /// `sluice` (a co-located engine) or `openai_compatible` (a hosted API).
    kind: &'static str,
    /// Lower first: a model's backends of a higher number serve only when none of a lower
    /// one can.
    priority: u32,
    /// The client's model -> the name this backend is asked for.
    model_map: std::collections::BTreeMap<String, String>,
    /// Whether the gateway sends it an API key of its own (which is never shown).
    api_key: bool,
    /// `http/1.1`, or `h2` where it is offered by ALPN (`https://` with `http2`).
    protocol: &'static str,
    health: BackendHealth,
    /// Draining: it takes no new requests.
    draining: bool,
    /// Requests this replica has in flight on it.
    in_flight: u64,
    /// Latency EWMA in milliseconds; 0 until its first answer.
    ewma_ms: f64,
    /// What its `/metrics` said last; `null` until scraped.
    #[schema(required)]
    last_scrape: Option<Scrape>,
}

/// `down`: failing health checks; `ejected`: passively ejected for its errors, for now.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum BackendHealth {
    Up,
    Down,
    Ejected,
}

#[derive(Serialize, ToSchema)]
struct Scrape {
    waiting: u64,
    running: u64,
    /// Fraction of its KV cache in use, 0 to 1.
    kv_cache_usage: f64,
    /// How long ago, in milliseconds.
    age_ms: u64,
}

#[derive(Serialize, ToSchema)]
pub(super) struct BackendList {
    /// Always `list`.
    object: &'static str,
    data: Vec<BackendView>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct BackendRemoved {
    name: String,
    /// Always `true`.
    removed: bool,
}

#[derive(Serialize, ToSchema)]
pub(super) struct DrainState {
    name: String,
    draining: bool,
}

pub(super) fn backend_view(
    gateway: &Gateway,
    b: &std::sync::Arc<crate::upstream::Backend>,
) -> BackendView {
    let models = gateway.upstreams.models();
    let served = models
        .values()
        .filter(|m| m.backends.iter().any(|mb| std::sync::Arc::ptr_eq(mb, b)))
        .map(|m| m.id.clone())
        .collect();
    let st = &b.state;
    BackendView {
        name: b.name.clone(),
        url: b.config.url.clone(),
        models: served,
        kind: b.config.kind.name(),
        priority: b.config.priority,
        model_map: b.config.model_map.clone(),
        api_key: b.config.credential.is_some(),
        protocol: match b.config.tls.as_ref().is_some_and(|t| t.http2) {
            true => "h2",
            false => "http/1.1",
        },
        health: if !st.is_up() {
            BackendHealth::Down
        } else if st.ejected() {
            BackendHealth::Ejected
        } else {
            BackendHealth::Up
        },
        draining: st.draining.load(Ordering::Relaxed),
        in_flight: st.in_flight.load(Ordering::Relaxed),
        ewma_ms: st.ewma().as_secs_f64() * 1000.0,
        last_scrape: st
            .last_scrape()
            .map(|(waiting, running, kv_cache_usage, age)| Scrape {
                waiting,
                running,
                kv_cache_usage,
                age_ms: age.as_millis() as u64,
            }),
    }
}

#[utoipa::path(
    get,
    path = "/admin/v1/backends",
    tag = "backends",
    responses((status = 200, description = "The pool, with each backend's health", body = BackendList)),
)]
pub(super) async fn list_backends(State(gateway): State<AppState>) -> Json<BackendList> {
    let data = gateway
        .upstreams
        .backends()
        .iter()
        .map(|b| backend_view(&gateway, b))
        .collect();
    Json(BackendList {
        object: "list",
        data,
    })
}

/// Adds a backend to the pool on every replica (within a second): the same fields as a
/// `[[backends]]` entry, `name` required. Its API key is named (`api_key_env`, `api_key_file`),
/// never sent, and files are absolute paths: each replica reads them from its own disk, and a
/// replica that cannot logs it and leaves the backend out.
#[utoipa::path(
    post,
    path = "/admin/v1/backends",
    tag = "backends",
    request_body = BackendSpec,
    responses(
        (status = 201, description = "The backend, in the pool", body = BackendView),
        (status = 400, description = "The body or the URL is invalid", body = ApiErrorBody),
        (status = 409, description = "A backend of that name is in the pool", body = ApiErrorBody),
        (status = 500, description = "Stored, but not in the pool", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn add_backend(
    State(gateway): State<AppState>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let spec: BackendSpec = parse_body(&body)?;
    let name = spec.name.clone().unwrap_or_default();
    non_empty("name", &name)?;
    if gateway.upstreams.backends().iter().any(|b| b.name == name) {
        return Err(ApiError::conflict(format!(
            "A backend named '{name}' is already in the pool; remove it first to change it."
        ))
        .with_param("name"));
    }
    // Checked here as every replica will: a bad URL, file or unset key variable is this
    // request's 400, not a log line on each replica.
    crate::config::backend(&name, spec.clone()).map_err(|e| {
        let error = ApiError::bad_request(e.to_string());
        match param_of(&e) {
            Some(param) => error.with_param(param),
            None => error,
        }
    })?;
    gateway
        .store
        .set_backend(&name, Some(&spec))
        .await
        .map_err(store_error)?;
    pool_written(&gateway).await?;
    let added = gateway
        .upstreams
        .backends()
        .iter()
        .find(|b| b.name == name)
        .cloned()
        .ok_or_else(|| ApiError::internal("The backend was stored but is not in the pool."))?;
    tracing::info!(backend = %name, url = %added.config.url, "backend added");
    Ok((
        http::StatusCode::CREATED,
        Json(backend_view(&gateway, &added)),
    ))
}

/// The request field a backend's configuration error is about (`backend.headers.x` ->
/// `headers`), when it names one.
fn param_of(e: &crate::config::ConfigError) -> Option<&'static str> {
    const FIELDS: [&str; 14] = [
        "name",
        "url",
        "models",
        "kind",
        "api_key_env",
        "api_key_file",
        "api_key_header",
        "headers",
        "model_map",
        "priority",
        "ca_file",
        "client_cert_file",
        "client_key_file",
        "http2",
    ];
    let crate::config::ConfigError::Invalid { field, .. } = e else {
        return None;
    };
    let rest = field.strip_prefix("backend.")?;
    FIELDS.into_iter().find(|f| {
        rest.strip_prefix(f)
            .is_some_and(|after| after.is_empty() || after.starts_with(['.', '[']))
    })
}

/// Takes a backend out of the pool on every replica. Requests it is serving finish; no new
/// ones go to it.
#[utoipa::path(
    delete,
    path = "/admin/v1/backends/{name}",
    tag = "backends",
    responses(
        (status = 200, description = "The backend is out of the pool", body = BackendRemoved),
        (status = 404, description = "No such backend", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn remove_backend(
    State(gateway): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<BackendRemoved>, ApiError> {
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
    Ok(Json(BackendRemoved {
        name,
        removed: true,
    }))
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

/// The backend takes no new requests (on every replica within a second); those in flight,
/// streams included, finish.
#[utoipa::path(
    post,
    path = "/admin/v1/backends/{name}/drain",
    tag = "backends",
    responses(
        (status = 200, description = "The backend is draining", body = DrainState),
        (status = 404, description = "No such backend", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn drain_backend(
    State(gateway): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<DrainState>, ApiError> {
    set_draining(&gateway, &name, true).await
}

/// Puts a drained backend back in service.
#[utoipa::path(
    delete,
    path = "/admin/v1/backends/{name}/drain",
    tag = "backends",
    responses(
        (status = 200, description = "The backend is in service", body = DrainState),
        (status = 404, description = "No such backend", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn undrain_backend(
    State(gateway): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<DrainState>, ApiError> {
    set_draining(&gateway, &name, false).await
}

pub(super) async fn set_draining(
    gateway: &Gateway,
    name: &str,
    draining: bool,
) -> Result<Json<DrainState>, ApiError> {
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
    backend.state.draining.store(draining, Ordering::Relaxed);
    key_written(gateway).await;
    tracing::info!(backend = %name, draining, "backend drain changed");
    Ok(Json(DrainState {
        name: name.to_owned(),
        draining,
    }))
}
