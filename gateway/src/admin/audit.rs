//! Who changed what: every admin write that succeeded (keys, tiers, tenants, backends, cache
//! purges, quota resets, usage purges) is appended to the audit trail in the store, by the
//! middleware below, so no write route can be added without it. Entries are never changed:
//! the store only appends, and the API only reads them (writes to it are 405).

use super::{store_error, AppState, Caller};
use crate::error::ApiError;
use axum::extract::{MatchedPath, Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

/// The most entries one page returns.
const MAX_PAGE: usize = 1000;
/// How many stored entries one filtered read looks through at most, so that a filter that
/// matches little cannot make one call read the whole trail.
const MAX_SCANNED: usize = 20_000;

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
    let response = next
        .run(Request::from_parts(
            parts,
            axum::body::Body::from(bytes.clone()),
        ))
        .await;
    if !response.status().is_success() {
        return response;
    }
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String("(not JSON)".into()))
    };
    let entry = json!({
        "at_ms": crate::clock::now_ms(),
        "actor": actor,
        "method": method.as_str(),
        "route": route,
        "path": path,
        "body": body,
        "status": response.status().as_u16(),
        "request_id": request_id,
    });
    if let Err(e) = gateway
        .store
        .append_audit(entry.to_string().as_bytes())
        .await
    {
        // The write itself is done; what is lost is its record, said loudly.
        tracing::error!(error = %e, %path, %actor, "cannot append to the audit trail");
    }
    response
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    limit: Option<usize>,
    /// The `next` of the previous page.
    before: Option<String>,
    actor: Option<String>,
    /// Entries whose path starts with this (`/admin/v1/keys`).
    path: Option<String>,
    method: Option<String>,
}

/// `GET /admin/v1/audit?limit=&before=&actor=&path=&method=`: entries newest first, with
/// `next` to page on (absent on the last page).
pub(super) async fn list_audit(
    State(gateway): State<AppState>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(
            ApiError::bad_request(format!("'limit' must be 1 to {MAX_PAGE}.")).with_param("limit"),
        );
    }
    let matches = |e: &Value| {
        q.actor.as_deref().is_none_or(|a| e["actor"] == a)
            && q.method.as_deref().is_none_or(|m| {
                e["method"]
                    .as_str()
                    .is_some_and(|x| x.eq_ignore_ascii_case(m))
            })
            && q.path
                .as_deref()
                .is_none_or(|p| e["path"].as_str().is_some_and(|x| x.starts_with(p)))
    };
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
            let Ok(mut entry) = serde_json::from_slice::<Value>(&raw) else {
                continue;
            };
            if matches(&entry) {
                entry["id"] = json!(id);
                data.push(entry);
                if data.len() == limit {
                    break;
                }
            }
        }
        if !more {
            break;
        }
    }
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "next": if more { cursor } else { None },
    })))
}

/// Any write to `/admin/v1/audit`: the trail is append-only.
pub(super) async fn append_only(method: http::Method) -> Response {
    ApiError::method_not_allowed(
        method.as_str(),
        "/admin/v1/audit (the audit trail is append-only: the gateway writes it, the API only reads it)",
    )
    .into_response()
}
