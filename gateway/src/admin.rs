//! The admin API, on its own listener: API keys (create, list, read, update, revoke, rotate),
//! tiers and backends. Every call needs the admin bearer token or a JWT whose role claim is
//! `admin` (anything) or `viewer` (reads only). The secret of a key appears in exactly two
//! answers, create and rotate, and nowhere else.

use crate::app::Gateway;
use crate::billing;
use crate::error::ApiError;
use crate::keys::{new_key_id, KeyRecord, NewSecret};
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sluice_policies::LimitOverrides;
use std::collections::HashMap;
use std::sync::Arc;

type AppState = Arc<Gateway>;

pub async fn serve(listener: tokio::net::TcpListener, gateway: Arc<Gateway>) {
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    if let Err(e) = axum::serve(listener, router(gateway)).await {
        tracing::error!(error = %e, "admin listener failed");
    }
}

pub fn router(gateway: Arc<Gateway>) -> Router {
    let api = Router::new()
        .route("/admin/v1/keys", post(create_key).get(list_keys))
        .route(
            "/admin/v1/keys/{id}",
            get(get_key).patch(update_key).delete(revoke_key),
        )
        .route("/admin/v1/keys/{id}/rotate", post(rotate_key))
        .route("/admin/v1/keys/{id}/quota", get(key_quota))
        .route("/admin/v1/keys/{id}/quota/reset", post(reset_key_quota))
        .route("/admin/v1/tiers", get(list_tiers))
        .route("/admin/v1/tiers/{name}", get(get_tier).put(put_tier))
        .route("/admin/v1/backends", get(list_backends).post(add_backend))
        .route(
            "/admin/v1/backends/{name}",
            axum::routing::delete(remove_backend),
        )
        .route(
            "/admin/v1/backends/{name}/drain",
            post(drain_backend).delete(undrain_backend),
        )
        .route("/admin/v1/billing/export", get(billing_export))
        .route("/admin/v1/usage", get(usage))
        .route("/admin/v1/cache", axum::routing::delete(purge_cache))
        .route("/admin/v1/cache/stats", get(cache_stats))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(gateway.clone(), authorize));
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/console", get(console))
        .merge(api)
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

/// Every admin answer carries `x-request-id`: the caller's, or a fresh one.
async fn request_id(request: Request, next: Next) -> Response {
    let id = crate::proxy::request_id(request.headers());
    let mut response = next.run(request).await;
    if let Ok(value) = http::HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Admin,
    Viewer,
}

/// Lets a call through when its credential's role allows the method.
async fn authorize(State(gateway): State<AppState>, request: Request, next: Next) -> Response {
    let authorization = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    let role = match role_of(&gateway, authorization) {
        Ok(role) => role,
        Err(e) => return e.into_response(),
    };
    let is_read = matches!(*request.method(), http::Method::GET | http::Method::HEAD);
    if role == Role::Viewer && !is_read {
        return ApiError::forbidden("The viewer role may only read; this call needs admin.")
            .into_response();
    }
    next.run(request).await
}

fn role_of(gateway: &Gateway, authorization: Option<&[u8]>) -> Result<Role, ApiError> {
    let Some(token) = crate::auth::bearer(authorization) else {
        return Err(ApiError::invalid_api_key(
            "Admin API calls need 'Authorization: Bearer <admin token or JWT>'.",
        ));
    };
    if let Some(admin_token) = &gateway.config.admin_token {
        // Compare digests so the comparison time says nothing about the token.
        if Sha256::digest(token.as_bytes()) == Sha256::digest(admin_token.as_bytes()) {
            return Ok(Role::Admin);
        }
    }
    if let Some(jwt) = gateway.jwt.as_ref().filter(|_| token.starts_with("eyJ")) {
        let claims = jwt
            .verify(token)
            .map_err(|e| ApiError::invalid_api_key(format!("Invalid token: {e}.")))?;
        return match claims.role.as_deref() {
            Some("admin") => Ok(Role::Admin),
            Some("viewer") => Ok(Role::Viewer),
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
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}.")))
}

fn store_error(e: crate::store::StoreError) -> ApiError {
    tracing::error!(error = %e, "admin store call failed");
    ApiError::unavailable("The store is unavailable; try again shortly.")
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
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

/// A key as the admin API shows it: never its secret or hash.
fn key_view(gateway: &Gateway, record: &KeyRecord) -> Value {
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
}

async fn create_key(
    State(gateway): State<AppState>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let req: CreateKey = parse_body(&body)?;
    non_empty("name", &req.name)?;
    non_empty("tenant", &req.tenant)?;
    let tier = req
        .tier
        .unwrap_or_else(|| sluice_policies::tiers::DEFAULT_TIER.to_owned());
    gateway
        .tiers()
        .get(&tier)
        .map_err(|e| ApiError::bad_request(e.to_string()).with_param("tier"))?;
    let secret = NewSecret::generate();
    let record = KeyRecord {
        id: new_key_id(),
        name: req.name,
        tenant: req.tenant,
        tier,
        limits: req.limits,
        hash: secret.hash,
        display_prefix: secret.display_prefix,
        created_at: now_unix(),
        revoked_at: None,
        cache: req.cache.unwrap_or(true),
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

async fn list_keys(State(gateway): State<AppState>) -> Result<Json<Value>, ApiError> {
    let keys = gateway.store.list_keys().await.map_err(store_error)?;
    let data: Vec<Value> = keys.iter().map(|k| key_view(&gateway, k)).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn find_key(gateway: &Gateway, id: &str) -> Result<KeyRecord, ApiError> {
    gateway
        .store
        .key(id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found(format!("No API key with id '{id}'.")))
}

async fn get_key(
    State(gateway): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let record = find_key(&gateway, &id).await?;
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
}

async fn update_key(
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
        non_empty("tenant", &tenant)?;
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
    gateway
        .store
        .put_key(&record, None)
        .await
        .map_err(store_error)?;
    key_written(&gateway).await;
    Ok(Json(key_view(&gateway, &record)))
}

async fn revoke_key(
    State(gateway): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let mut record = find_key(&gateway, &id).await?;
    if !record.is_revoked() {
        record.revoked_at = Some(now_unix());
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

async fn rotate_key(
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

async fn list_tiers(State(gateway): State<AppState>) -> Json<Value> {
    let tiers = gateway.tiers();
    let data: Vec<_> = tiers.iter().collect();
    Json(json!({"object": "list", "data": data}))
}

async fn get_tier(
    State(gateway): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let tiers = gateway.tiers();
    let tier = tiers
        .get(&name)
        .map_err(|e| ApiError::not_found(e.to_string()))?;
    Ok(Json(json!(tier)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutTier {
    currency: Option<String>,
    limits: sluice_policies::Limits,
    #[serde(default)]
    on_store_unavailable: Option<sluice_policies::FailMode>,
    #[serde(default)]
    request_caps: Option<sluice_policies::RequestCaps>,
}

/// `PUT /admin/v1/tiers/{name}`: creates or replaces a tier; every replica applies it within
/// a second (it moves the store's key epoch, which each replica polls).
async fn put_tier(
    State(gateway): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!(tier)))
}

/// A backend as the admin API shows it.
fn backend_view(gateway: &Gateway, b: &std::sync::Arc<crate::upstream::Backend>) -> Value {
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

async fn list_backends(State(gateway): State<AppState>) -> Json<Value> {
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
async fn add_backend(
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
async fn remove_backend(
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
async fn pool_written(gateway: &Gateway) -> Result<(), ApiError> {
    gateway.reload_shared().await.map_err(|e| {
        tracing::error!(error = %e, "pool reload failed");
        ApiError::unavailable("The store is unavailable; try again shortly.")
    })?;
    key_written(gateway).await;
    Ok(())
}

/// The priced usage events a query needs: from the start of its first month, so that
/// graduated prices see each key's whole month.
async fn priced_events(
    gateway: &Gateway,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<billing::PricedEvent>, ApiError> {
    let events = gateway
        .store
        .usage_events(billing::month_start(from_ms), to_ms)
        .await
        .map_err(store_error)?;
    Ok(billing::price(
        events,
        &gateway.config.prices,
        &gateway.tiers(),
    ))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `GET /admin/v1/billing/export?from=&to=&group_by=key,tenant,model,day|event&format=csv|jsonl`
async fn billing_export(
    State(gateway): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let param = |name: &str| params.get(name).map(String::as_str);
    let query = billing::ExportQuery::parse(
        param("from"),
        param("to"),
        param("group_by"),
        param("format"),
        now_ms(),
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let events = priced_events(&gateway, query.from_ms, query.to_ms).await?;
    let body = billing::render(&events, &query);
    let content_type = match query.format {
        billing::Format::Csv => "text/csv; charset=utf-8",
        billing::Format::Jsonl => "application/x-ndjson",
    };
    Ok(([(http::header::CONTENT_TYPE, content_type)], body).into_response())
}

/// `GET /admin/v1/usage?key=&from=&to=`: totals and per-model rows, for one key or all.
async fn usage(
    State(gateway): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let param = |name: &str| params.get(name).map(String::as_str);
    let query = billing::ExportQuery::parse(param("from"), param("to"), None, None, now_ms())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut events = priced_events(&gateway, query.from_ms, query.to_ms).await?;
    if let Some(key) = param("key") {
        events.retain(|p| p.event.key_id == key);
    }
    use billing::Dim;
    let totals = billing::aggregate(&events, &[Dim::Key], query.from_ms, query.to_ms);
    let by_model = billing::aggregate(&events, &[Dim::Key, Dim::Model], query.from_ms, query.to_ms);
    Ok(Json(json!({
        "object": "usage",
        "from_ms": query.from_ms,
        "to_ms": query.to_ms,
        "totals": totals,
        "by_model": by_model,
    })))
}

/// `GET /admin/v1/keys/{id}/quota`: each limit's live state. `used` includes what requests
/// in flight have reserved; `resets_in_secs` is when the window frees room (rates) or renews
/// (days, months).
async fn key_quota(
    State(gateway): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    use sluice_policies::quota;
    let record = find_key(&gateway, &id).await?;
    let tiers = gateway.tiers();
    let tier = tiers
        .get(&record.tier)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let limits = tier.limits.with_overrides(&record.limits);
    let now = now_ms() / 1000;
    let (month, to_month_end) = crate::clock::month_of(now);
    let c = gateway
        .store
        .quota_counters(&id, now, &month)
        .await
        .map_err(store_error)?;
    let state = quota::QuotaState::of(&limits, &c, now);
    let rate = |l: &quota::LimitState| json!({"limit": l.limit, "used": l.used, "remaining": l.limit.map(|limit| limit.saturating_sub(l.used)), "resets_in_secs": l.resets_in_secs});
    let nano = rust_decimal::Decimal::from(quota::NANO);
    let spent = rust_decimal::Decimal::from(state.month_spend_nano) / nano;
    let budget = limits.monthly_budget.map(|b| b.amount());
    Ok(Json(json!({
        "key_id": id,
        "tier": record.tier,
        "requests_per_minute": rate(&state.requests_per_minute),
        "tokens_per_minute": rate(&state.tokens_per_minute),
        "requests_per_day": rate(&state.requests_per_day),
        "tokens_per_day": rate(&state.tokens_per_day),
        "max_concurrent": {
            "limit": state.max_concurrent.limit,
            "in_flight": state.max_concurrent.used,
            "next_slot_expires_in_secs": state.max_concurrent.resets_in_secs,
        },
        "monthly_budget": {
            "limit": budget.map(|b| b.normalize().to_string()),
            "used": spent.normalize().to_string(),
            "remaining": budget.map(|b| (b - spent).max(rust_decimal::Decimal::ZERO).normalize().to_string()),
            "currency": tier.currency,
            "month": month,
            "resets_in_secs": to_month_end,
        },
    })))
}

/// `POST /admin/v1/keys/{id}/quota/reset`: forgets the key's windows, caps and month spend.
async fn reset_key_quota(
    State(gateway): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    find_key(&gateway, &id).await?;
    let now = now_ms() / 1000;
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

/// The admin web console: one static page, built into the binary, that signs in with the
/// admin token and then uses this API like any client. The page holds no data itself, so
/// it is served without credentials.
const CONSOLE: &str = include_str!("console.html");

async fn console() -> impl IntoResponse {
    (
        [
            (http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page runs only its own inline script and talks only to this listener.
            (
                http::header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        CONSOLE,
    )
}

/// `GET /metrics`: Prometheus text exposition (behind the admin listener's auth, like
/// everything on it: give the scraper a viewer token).
async fn metrics(State(gateway): State<AppState>) -> impl IntoResponse {
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::get().render(&gateway),
    )
}

/// `GET /admin/v1/cache/stats`: entries (the same on every replica) and this replica's
/// lookups by kind, overall and per tenant.
async fn cache_stats(State(gateway): State<AppState>) -> Json<Value> {
    Json(gateway.cache.stats())
}

/// `DELETE /admin/v1/cache?tenant=..&model=..`: deletes the entries of a tenant, a model,
/// both, or (with neither) every entry, on every replica.
async fn purge_cache(
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

/// `POST /admin/v1/backends/{name}/drain`: the backend takes no new requests (on every
/// replica within a second); those in flight, streams included, finish. `DELETE` on the same
/// path puts it back in service.
async fn drain_backend(
    State(gateway): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_draining(&gateway, &name, true).await
}

async fn undrain_backend(
    State(gateway): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_draining(&gateway, &name, false).await
}

async fn set_draining(
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
