//! Usage and billing: priced usage totals and billing exports (CSV or JSON Lines).

use super::{store_error, AppState, Caller};
use crate::app::Gateway;
use crate::billing;
use crate::error::ApiError;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use serde_json::{json, Value};
use std::collections::HashMap;

/// The priced usage events a query needs: from the start of its first month, so that
/// graduated prices see each key's whole month.
pub(super) async fn priced_events(
    gateway: &Gateway,
    caller: &Caller,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<billing::PricedEvent>, ApiError> {
    let mut events = gateway
        .store
        .usage_events(crate::clock::Month::of_ms(from_ms).start_ms, to_ms)
        .await
        .map_err(store_error)?;
    events.retain(|e| caller.sees(&e.tenant));
    Ok(billing::price(
        events,
        &gateway.config.prices,
        &gateway.tiers(),
    ))
}

/// `GET /admin/v1/billing/export?from=&to=&group_by=key,tenant,model,day|event&format=csv|jsonl`
pub(super) async fn billing_export(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let param = |name: &str| params.get(name).map(String::as_str);
    let query = billing::ExportQuery::parse(
        param("from"),
        param("to"),
        param("group_by"),
        param("format"),
        crate::clock::now_ms(),
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let events = priced_events(&gateway, &caller, query.from_ms, query.to_ms).await?;
    let body = billing::render(&events, &query);
    let content_type = match query.format {
        billing::Format::Csv => "text/csv; charset=utf-8",
        billing::Format::Jsonl => "application/x-ndjson",
    };
    Ok(([(http::header::CONTENT_TYPE, content_type)], body).into_response())
}

/// `GET /admin/v1/usage?key=&from=&to=`: totals and per-model rows, for one key or all.
pub(super) async fn usage(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let param = |name: &str| params.get(name).map(String::as_str);
    let query = billing::ExportQuery::parse(
        param("from"),
        param("to"),
        None,
        None,
        crate::clock::now_ms(),
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut events = priced_events(&gateway, &caller, query.from_ms, query.to_ms).await?;
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
