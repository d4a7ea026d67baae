//! Live traffic: the last minutes of requests, errors, latency, tokens and cache hits, for
//! the console's Traffic page (see `crate::traffic`).

use super::{known_params, number_param, store_error, AppState};
use crate::error::{ApiError, ApiErrorBody};
use crate::traffic::{points, TrafficView, INTERVAL_SECS};
use axum::extract::{Query, State};
use axum::Json;
use std::collections::HashMap;

/// One point per 5-second bucket, oldest first, up to the last whole bucket: the fleet's on
/// a shared store (every replica adds its share to the same bucket), this replica's on the
/// embedded one.
#[utoipa::path(
    get,
    path = "/admin/v1/traffic",
    tag = "traffic",
    params(
        ("minutes" = Option<u32>, Query, description = "How far back: 1 to 60 (default 15)"),
    ),
    responses(
        (status = 200, description = "Live traffic", body = TrafficView),
        (status = 400, description = "A parameter is invalid", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn traffic(
    State(gateway): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<TrafficView>, ApiError> {
    known_params(&params, &["minutes"])?;
    let minutes = number_param(&params, "minutes", 1..=60)?.unwrap_or(15) as i64;
    let now_sec = crate::clock::now_ms() / 1000;
    // The bucket under way is left out: replicas add to it when it ends.
    let to = now_sec / INTERVAL_SECS * INTERVAL_SECS;
    let from = to - minutes * 60;
    let buckets = gateway
        .store
        .traffic(from, to, INTERVAL_SECS)
        .await
        .map_err(store_error)?;
    Ok(Json(TrafficView {
        object: "traffic",
        interval_secs: INTERVAL_SECS,
        scope: if gateway.store.shared() {
            "fleet"
        } else {
            "replica"
        },
        points: points(&buckets, from, to),
    }))
}
