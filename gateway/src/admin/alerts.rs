//! Spend alerts: the ones recorded for the fleet, newest first.

use super::{store_error, AppState, Caller};
use crate::error::ApiError;
use axum::extract::{Query, State};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AlertsQuery {
    limit: Option<usize>,
}

/// `GET /admin/v1/alerts?limit=100`: the spend alerts recorded (at most 1000), each with
/// what it said; a viewer scoped to a tenant sees that tenant's only.
pub(super) async fn list_alerts(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<AlertsQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("'limit' must be from 1 to 1000.").with_param("limit"));
    }
    let Some(alerts) = &gateway.alerts else {
        return Ok(Json(
            json!({"object": "list", "enabled": false, "data": []}),
        ));
    };
    let data: Vec<Value> = alerts
        .recent(limit)
        .await
        .map_err(store_error)?
        .into_iter()
        .filter(|a| caller.sees(a["tenant"].as_str().unwrap_or_default()))
        .collect();
    Ok(Json(
        json!({"object": "list", "enabled": true, "data": data}),
    ))
}
