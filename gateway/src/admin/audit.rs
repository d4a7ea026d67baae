//! Who changed what: every admin write that succeeded (keys, tiers, tenants, backends, cache
//! purges, quota resets, usage purges) is appended to the audit trail in the store, by the
//! middleware below, so no write route can be added without it. Entries are never changed:
//! the store only appends, and the API only reads them (writes to it are 405).

use super::{store_error, AppState, Caller};
use crate::error::{ApiError, ApiErrorBody};
use axum::extract::{MatchedPath, Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

/// The most entries one page returns.
const MAX_PAGE: usize = 1000;
/// How many stored entries one filtered read looks through at most, so that a filter that
/// matches little cannot make one call read the whole trail.
const MAX_SCANNED: usize = 20_000;

/// One write, as the trail keeps it.
#[derive(Serialize, Deserialize, ToSchema)]
pub(super) struct AuditEntry {
    /// Unix milliseconds when the write was done.
    at_ms: i64,
    /// `admin-token:<first 12 hex of the token's SHA-256>` or `jwt:<subject>`.
    actor: String,
    method: String,
    /// The route's template (`/admin/v1/keys/{id}`).
    #[schema(required)]
    route: Option<String>,
    path: String,
    /// The request's JSON body; `null` without one, `"(not JSON)"` for another.
    body: Value,
    status: u16,
    request_id: String,
    /// The key, tenant, tier or backend the path names, as it was before the write (`null`
    /// when it did not exist, or the route names none of them).
    #[serde(default)]
    before: Value,
    /// The same after the write; for a key or backend just created, the answer (a key's
    /// secret left out).
    #[serde(default)]
    after: Value,
}

#[derive(Serialize, ToSchema)]
pub(super) struct ListedAuditEntry {
    /// The entry's place in the trail: `before` pages on from it.
    id: String,
    #[serde(flatten)]
    entry: AuditEntry,
}

#[derive(Serialize, ToSchema)]
pub(super) struct AuditPage {
    /// Always `list`.
    object: &'static str,
    data: Vec<ListedAuditEntry>,
    /// `before` for the next page; `null` on the last.
    #[schema(required)]
    next: Option<String>,
}

/// Records a successful write (POST, PUT, PATCH, DELETE answered 2xx) once it is done: when,
/// who, what (method and route), on what (the path), the request body (admin request bodies
/// carry no secrets: a key's secret is only ever in an answer) and the status.
pub(super) async fn record(
    State(gateway): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    if matches!(
        method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    ) {
        return next.run(request).await;
    }
    let actor = request
        .extensions()
        .get::<Caller>()
        .map(|c| c.actor.clone())
        .unwrap_or_default();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let path = request.uri().path().to_owned();
    let request_id = crate::request::request_id(request.headers());
    let (parts, body) = request.into_parts();
    // The body was read whole (and bounded) by `read_body_within` already.
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let before = snapshot(&gateway, &path).await;
    let response = next
        .run(Request::from_parts(
            parts,
            axum::body::Body::from(bytes.clone()),
        ))
        .await;
    if !response.status().is_success() {
        return response;
    }
    let (response, after) = match snapshot(&gateway, &path).await {
        Some(after) => (response, after),
        None if method == http::Method::POST => created(response).await,
        None => (response, Value::Null),
    };
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String("(not JSON)".into()))
    };
    let entry = AuditEntry {
        at_ms: crate::clock::now_ms(),
        actor: actor.clone(),
        method: method.as_str().to_owned(),
        route,
        path: path.clone(),
        body,
        status: response.status().as_u16(),
        request_id,
        before: before.unwrap_or(Value::Null),
        after,
    };
    let entry = serde_json::to_vec(&entry).expect("an audit entry serializes");
    if let Err(e) = gateway.store.append_audit(&entry).await {
        // The write itself is done; what is lost is its record, said loudly.
        tracing::error!(error = %e, %path, %actor, "cannot append to the audit trail");
    }
    response
}

/// The key, tenant, tier or backend an admin path names (`/admin/v1/keys/{id}/rotate` names
/// the key), as the admin API shows it; `None` for other paths or a target that is absent.
async fn snapshot(gateway: &crate::app::Gateway, path: &str) -> Option<Value> {
    let mut segments = path.strip_prefix("/admin/v1/")?.split('/');
    let (kind, id) = (segments.next()?, segments.next()?);
    match kind {
        "keys" => {
            let record = gateway.store.key(id).await.ok()??;
            serde_json::to_value(super::keys::key_view(gateway, &record)).ok()
        }
        "tenants" => {
            serde_json::to_value(super::tenants::tenant_view(gateway.tenants.load().get(id))).ok()
        }
        "tiers" => serde_json::to_value(gateway.tiers().get(id).ok()?).ok(),
        "backends" => {
            let backends = gateway.upstreams.backends();
            let backend = backends.iter().find(|b| b.name == id)?;
            // What an operator sets, not the live load.
            Some(serde_json::json!({
                "name": backend.name,
                "url": backend.config.url,
                "models": backend.declared_models(),
                "draining": backend.state.draining.load(std::sync::atomic::Ordering::Relaxed),
            }))
        }
        _ => None,
    }
}

/// The answer to a create, passed on, and what it created for the trail (a key's secret
/// left out).
async fn created(response: Response) -> (Response, Value) {
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, super::listener::MAX_ADMIN_BODY_BYTES)
        .await
        .unwrap_or_default();
    let mut after: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if let Some(answer) = after.as_object_mut() {
        answer.remove("key");
    }
    (
        Response::from_parts(parts, axum::body::Body::from(bytes)),
        after,
    )
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct AuditQuery {
    /// At most this many entries, 1 to 1000 (default 100).
    limit: Option<usize>,
    /// The `next` of the previous page.
    before: Option<String>,
    actor: Option<String>,
    /// Entries whose path starts with this (`/admin/v1/keys`).
    path: Option<String>,
    /// Entries of this method (any case).
    method: Option<String>,
}

/// Which entries a read keeps (the listing's parameters, less the paging).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct AuditFilter {
    actor: Option<String>,
    /// Entries whose path starts with this (`/admin/v1/keys`).
    path: Option<String>,
    /// Entries of this method (any case).
    method: Option<String>,
}

impl AuditFilter {
    fn admits(&self, e: &AuditEntry) -> bool {
        self.actor.as_deref().is_none_or(|a| e.actor == a)
            && self
                .method
                .as_deref()
                .is_none_or(|m| e.method.eq_ignore_ascii_case(m))
            && self.path.as_deref().is_none_or(|p| e.path.starts_with(p))
    }
}

/// The whole trail, or what the filters keep, newest first: one entry (as listed) a line,
/// streamed in constant memory, for a security review's archive.
#[utoipa::path(
    get,
    path = "/admin/v1/audit/export",
    tag = "audit",
    params(AuditFilter),
    responses(
        (status = 200, description = "JSON Lines (the schema is that of each line)", body = ListedAuditEntry, content_type = "application/x-ndjson"),
        (status = 400, description = "A parameter is invalid or unknown", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn export_audit(
    State(gateway): State<AppState>,
    query: Result<Query<AuditFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(filter) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    // The first page is read before the answer starts, so that a store that is down is a
    // clean 503 rather than an empty export.
    let first = gateway
        .store
        .audit_page(None, MAX_PAGE)
        .await
        .map_err(store_error)?;
    Ok(super::stream::streamed(
        "application/x-ndjson",
        "audit",
        move |tx| async move {
            let mut page = first;
            while !page.is_empty() {
                let mut cursor = None;
                let mut chunk = Vec::new();
                for (id, raw) in page {
                    cursor = Some(id.clone());
                    let Ok(entry) = serde_json::from_slice::<AuditEntry>(&raw) else {
                        continue;
                    };
                    if filter.admits(&entry) {
                        serde_json::to_writer(&mut chunk, &ListedAuditEntry { id, entry })
                            .expect("an audit entry serializes");
                        chunk.push(b'\n');
                    }
                }
                if !chunk.is_empty() && tx.send(Ok(chunk)).await.is_err() {
                    return Ok(());
                }
                page = gateway
                    .store
                    .audit_page(cursor.as_deref(), MAX_PAGE)
                    .await
                    .map_err(store_error)?;
            }
            Ok(())
        },
    ))
}

/// Entries newest first, with `next` to page on (`null` on the last page).
#[utoipa::path(
    get,
    path = "/admin/v1/audit",
    tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "A page of the trail", body = AuditPage),
        (status = 400, description = "A parameter is invalid or unknown", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn list_audit(
    State(gateway): State<AppState>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let filter = AuditFilter {
        actor: q.actor,
        path: q.path,
        method: q.method,
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(
            ApiError::bad_request(format!("'limit' must be 1 to {MAX_PAGE}.")).with_param("limit"),
        );
    }
    let mut data = Vec::new();
    let mut cursor = q.before.clone();
    let mut scanned = 0;
    let mut more = true;
    while data.len() < limit && scanned < MAX_SCANNED {
        let page = gateway
            .store
            .audit_page(cursor.as_deref(), MAX_PAGE.min(MAX_SCANNED - scanned))
            .await
            .map_err(store_error)?;
        more = !page.is_empty();
        scanned += page.len();
        for (id, raw) in page {
            cursor = Some(id.clone());
            let Ok(entry) = serde_json::from_slice::<AuditEntry>(&raw) else {
                continue;
            };
            if filter.admits(&entry) {
                data.push(ListedAuditEntry { id, entry });
                if data.len() == limit {
                    break;
                }
            }
        }
        if !more {
            break;
        }
    }
    Ok(Json(AuditPage {
        object: "list",
        data,
        next: if more { cursor } else { None },
    }))
}

/// Any write to `/admin/v1/audit`: the trail is append-only. Like every method a path does
/// not offer, these are not in the OpenAPI document; they only say why they are refused.
pub(super) async fn append_only(method: http::Method) -> Response {
    ApiError::method_not_allowed(
        method.as_str(),
        "/admin/v1/audit (the audit trail is append-only: the gateway writes it, the API only reads it)",
    )
    .into_response()
}
