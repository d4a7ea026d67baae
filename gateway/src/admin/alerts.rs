//! Spend alerts: the ones recorded for the fleet, newest first.

use super::{store_error, AppState, Caller};
use crate::alerts::SpendAlert;
use crate::error::{ApiError, ApiErrorBody};
use axum::extract::{Query, State};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct AlertsQuery {
    /// At most this many, 1 to 1000 (default 100).
    limit: Option<usize>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct AlertList {
    /// Always `list`.
    object: &'static str,
    /// Whether alerts are configured (`[alerts]`); without them the list is empty.
    enabled: bool,
    data: Vec<SpendAlert>,
}

/// The spend alerts recorded, each with what it said; a viewer scoped to a tenant sees that
/// tenant's only.
#[utoipa::path(
    get,
    path = "/admin/v1/alerts",
    tag = "alerts",
    params(AlertsQuery),
    responses(
        (status = 200, description = "The alerts, newest first", body = AlertList),
        (status = 400, description = "`limit` is out of range, or a parameter is unknown", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn list_alerts(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<AlertsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AlertList>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("'limit' must be from 1 to 1000.").with_param("limit"));
    }
    let Some(alerts) = &gateway.alerts else {
        return Ok(Json(AlertList {
            object: "list",
            enabled: false,
            data: Vec::new(),
        }));
    };
    let data = alerts
        .recent(limit)
        .await
        .map_err(store_error)?
        .into_iter()
        .filter(|a| caller.sees(&a.tenant))
        .collect();
    Ok(Json(AlertList {
        object: "list",
        enabled: true,
        data,
    }))
}
