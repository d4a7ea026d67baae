//! Who may change what, and where? The admin API, on its own listener: API keys and their
//! quota (`keys`, `quota`), tenants' limits (`tenants`), tiers (`tiers`), the backend pool
//! (`backends`), usage and billing exports (`billing`), this month's spend against budgets
//! (`spend`), live traffic (`traffic`), spend alerts (`alerts`), the response
//! cache (`cache`), the distillation dataset (`datasets`), the console (`console`),
//! `/metrics` (`metrics`), the audit trail of every write (`audit`), and the API's own
//! OpenAPI document (`openapi`). This file holds the router and authorisation. Every call
//! needs the admin
//! bearer token or an admin JWT (`[auth.admin_jwt]`: its own keys, issuer and audience, never
//! the proxy's) whose role claim is `admin` (anything) or `viewer` (reads only; with a tenant
//! claim, that tenant's keys, usage and billing only). The secret of a key appears in exactly
//! two answers, create and rotate, and nowhere else.

mod alerts;
mod audit;
mod backends;
mod billing;
mod cache;
mod console;
mod datasets;
mod keys;
mod listener;
mod metrics;
mod openapi;
mod quota;
mod spend;
mod stream;
mod tenants;
mod tiers;
mod traffic;

use crate::app::Gateway;
use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

type AppState = Arc<Gateway>;

/// Serves the admin API on `listener`, over TLS when `tls` is given.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    gateway: Arc<Gateway>,
) {
    let config = &gateway.config;
    let bounds = listener::Bounds {
        max_connections: config.admin_max_connections,
        header_timeout: config.admin_header_timeout,
    };
    listener::serve(listener, tls, router(gateway.clone()), bounds).await;
}

/// Every route the admin listener serves, each registered (by `routes!`) at the path its
/// handler's `#[utoipa::path]` names, which is also where the OpenAPI document puts it. A
/// route added any other way would be served and not documented, which the tests refuse.
struct Routes {
    /// Served to anyone.
    public: OpenApiRouter<AppState>,
    /// Served behind [`authorize`], to admins and viewers.
    guarded: OpenApiRouter<AppState>,
}

fn routes() -> Routes {
    let public = OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(console::console));
    let guarded = OpenApiRouter::new()
        .routes(routes!(keys::create_key, keys::list_keys))
        .routes(routes!(keys::get_key, keys::update_key, keys::revoke_key))
        .routes(routes!(keys::rotate_key))
        .routes(routes!(keys::key_quota))
        .routes(routes!(keys::reset_key_quota))
        .routes(routes!(tiers::list_tiers))
        .routes(routes!(tiers::get_tier, tiers::put_tier))
        .routes(routes!(backends::list_backends, backends::add_backend))
        .routes(routes!(backends::remove_backend))
        .routes(routes!(backends::drain_backend, backends::undrain_backend))
        .routes(routes!(billing::billing_export))
        .routes(routes!(billing::usage))
        .routes(routes!(spend::spend))
        .routes(routes!(traffic::traffic))
        .routes(routes!(tenants::list_tenants))
        .routes(routes!(tenants::get_tenant, tenants::put_tenant))
        .routes(routes!(tenants::tenant_quota))
        .routes(routes!(billing::purge_tenant_usage))
        .routes(routes!(cache::purge_cache))
        .routes(routes!(cache::cache_stats))
        .routes(routes!(alerts::list_alerts))
        .routes(routes!(datasets::purge_dataset))
        .routes(routes!(datasets::export_dataset))
        .routes(routes!(audit::list_audit).map(|read| {
            read.post(audit::append_only)
                .put(audit::append_only)
                .patch(audit::append_only)
                .delete(audit::append_only)
        }))
        .routes(routes!(audit::export_audit))
        .routes(routes!(metrics::metrics))
        .routes(routes!(openapi::openapi_json));
    Routes { public, guarded }
}

pub fn router(gateway: Arc<Gateway>) -> Router {
    let Routes { public, guarded } = routes();
    let guarded = Router::from(guarded)
        // Innermost: it sees the body read, and the caller authorised.
        .layer(middleware::from_fn_with_state(
            gateway.clone(),
            audit::record,
        ))
        .layer(middleware::from_fn_with_state(
            gateway.clone(),
            listener::read_body_within,
        ))
        .layer(middleware::from_fn_with_state(gateway.clone(), authorize));
    Router::from(public)
        .merge(guarded)
        .fallback(|request: Request| async move {
            ApiError::not_found(format!(
                "Unknown admin URL: {} {}.",
                request.method(),
                request.uri().path()
            ))
        })
        .with_state(gateway)
        .layer(middleware::from_fn(request_id))
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct Liveness {
    /// Always `ok`.
    status: &'static str,
}

#[utoipa::path(
    get,
    path = "/health",
    tag = "meta",
    responses((status = 200, description = "The admin listener is up", body = Liveness)),
)]
async fn health() -> Json<Liveness> {
    Json(Liveness { status: "ok" })
}

/// Every admin answer carries `x-request-id`: the caller's, or a fresh one.
async fn request_id(request: Request, next: Next) -> Response {
    let id = crate::request::request_id(request.headers());
    let mut response = next.run(request).await;
    if let Ok(value) = http::HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Viewer,
}

/// Who is calling the admin API, as the handlers see it (a request extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    /// A viewer token that names a tenant sees that tenant's keys, usage and billing only.
    pub tenant: Option<String>,
    /// Who it is, as the audit trail names them: `admin-token:<first 12 hex of the token's
    /// SHA-256>` (never the token) or `jwt:<subject>`.
    pub actor: String,
}

impl Caller {
    /// Whether the caller may see this tenant's data.
    pub fn sees(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|own| own == tenant)
    }
}

/// What a viewer scoped to one tenant may read: its keys, their quota, its usage and
/// billing, the tiers, and the API's description. Fleet-wide views (backends, metrics, the cache) are not its to see.
fn scoped_viewer_may_read(path: &str) -> bool {
    path == "/admin/v1/openapi.json"
        || path == "/admin/v1/keys"
        || path.starts_with("/admin/v1/keys/")
        || path == "/admin/v1/usage"
        || path == "/admin/v1/billing/export"
        || path == "/admin/v1/spend"
        || path == "/admin/v1/alerts"
        || path == "/admin/v1/tenants"
        || path.starts_with("/admin/v1/tenants/")
        || path == "/admin/v1/tiers"
        || path.starts_with("/admin/v1/tiers/")
}

/// Lets a call through when its credential's role allows the method (and, for a viewer
/// scoped to a tenant, the path), with the [`Caller`] for the handler.
async fn authorize(State(gateway): State<AppState>, mut request: Request, next: Next) -> Response {
    let authorization = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    let caller = match caller_of(&gateway, authorization).await {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    let is_read = matches!(*request.method(), http::Method::GET | http::Method::HEAD);
    if caller.role == Role::Viewer && !is_read {
        return ApiError::forbidden("The viewer role may only read; this call needs admin.")
            .into_response();
    }
    if let Some(tenant) = &caller.tenant {
        if !scoped_viewer_may_read(request.uri().path()) {
            return ApiError::forbidden(format!(
                "This viewer token is scoped to tenant '{tenant}'; this view is fleet-wide."
            ))
            .into_response();
        }
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

async fn caller_of(gateway: &Gateway, authorization: Option<&[u8]>) -> Result<Caller, ApiError> {
    let Some(token) = crate::auth::bearer(authorization) else {
        return Err(ApiError::invalid_api_key(
            "Admin API calls need 'Authorization: Bearer <admin token or admin JWT>'.",
        ));
    };
    if let Some(admin_token) = &gateway.config.admin_token {
        // Compare digests so the comparison time says nothing about the token.
        let digest = Sha256::digest(token.as_bytes());
        if digest == Sha256::digest(admin_token.as_bytes()) {
            return Ok(Caller {
                role: Role::Admin,
                tenant: None,
                actor: format!("admin-token:{}", &hex::encode(digest)[..12]),
            });
        }
    }
    // Only the admin verifier (its own issuer, audience and keys) opens the admin API; a
    // token that the proxy accepts is no admin credential.
    if let Some(jwt) = gateway
        .admin_jwt
        .as_ref()
        .filter(|_| token.starts_with("eyJ"))
    {
        let claims = jwt
            .verify(token)
            .await
            .map_err(|e| ApiError::invalid_api_key(format!("Invalid token: {e}.")))?;
        let actor = format!("jwt:{}", claims.subject);
        return match claims.role.as_deref() {
            Some("admin") => Ok(Caller {
                role: Role::Admin,
                tenant: None,
                actor,
            }),
            Some("viewer") => Ok(Caller {
                role: Role::Viewer,
                tenant: claims.tenant,
                actor,
            }),
            _ => Err(ApiError::forbidden(
                "This token carries no admin or viewer role.",
            )),
        };
    }
    Err(ApiError::invalid_api_key("Invalid admin credential."))
}

/// After a key write here: drop this replica's cached lookups at once and take the store's
/// new key epoch, so the poller does not drop the cache a second time.
async fn key_written(gateway: &Gateway) {
    gateway.key_cache.invalidate();
    if let Ok(epoch) = gateway.store.keys_epoch().await {
        gateway.key_cache.observe_epoch(epoch);
    }
}

fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut json = serde_json::Deserializer::from_slice(body);
    let parsed: T = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            String::new()
        } else {
            format!("{path}: ")
        };
        ApiError::bad_request(format!("Invalid request body: {at}{}.", e.inner()))
    })?;
    json.end()
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}.")))?;
    Ok(parsed)
}

/// For a PATCH field where `null` means something (clear it) and absence means "unchanged":
/// with `#[serde(default)]`, absent is `None` and `null` is `Some(None)`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(d).map(Some)
}

/// Refuses a query parameter the view does not take, so that a typo is not silently ignored.
fn known_params(
    params: &std::collections::HashMap<String, String>,
    known: &[&str],
) -> Result<(), ApiError> {
    match params.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(ApiError::bad_request(format!(
            "Unknown parameter '{unknown}': this view takes {}.",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

/// A whole-number query parameter within `range`; `None` when absent.
fn number_param(
    params: &std::collections::HashMap<String, String>,
    name: &'static str,
    range: std::ops::RangeInclusive<usize>,
) -> Result<Option<usize>, ApiError> {
    let Some(value) = params.get(name) else {
        return Ok(None);
    };
    value
        .parse::<usize>()
        .ok()
        .filter(|n| range.contains(n))
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "'{name}' must be a whole number from {} to {}, not '{value}'.",
                range.start(),
                range.end()
            ))
            .with_param(name)
        })
}

fn store_error(e: crate::store::StoreError) -> ApiError {
    tracing::error!(error = %e, "admin store call failed");
    ApiError::unavailable("The store is unavailable; try again shortly.")
}

fn non_empty(field: &'static str, value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() || value.len() > 256 {
        return Err(ApiError::bad_request(format!(
            "'{field}' must be a non-empty string of at most 256 bytes."
        ))
        .with_param(field));
    }
    Ok(())
}
