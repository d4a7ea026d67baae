//! The distillation dataset: what was captured for tenants and keys that opted in, exported
//! as an OpenAI fine-tuning file (JSON Lines) and purged on request.

use super::{AppState, Caller};
use crate::datasets::exchange::Conversation;
use crate::datasets::export::{self, Filter, FineTuningExample};
use crate::error::{ApiError, ApiErrorBody};
use axum::extract::{Query, State};
use axum::response::Response;
use axum::{Extension, Json};
use serde::Serialize;
use std::collections::HashMap;
use utoipa::{IntoParams, ToSchema};

/// Conversations the store reads a page at a time; the caller sees those its filter and
/// role admit, or the store's failure as a 503.
struct Pages {
    gateway: AppState,
    after: Option<String>,
    done: bool,
}

impl Pages {
    fn new(gateway: AppState) -> Pages {
        Pages {
            gateway,
            after: None,
            done: false,
        }
    }

    async fn next(&mut self) -> Result<Option<Vec<(String, Conversation)>>, ApiError> {
        if self.done {
            return Ok(None);
        }
        let page = self
            .gateway
            .store
            .captures_page(self.after.as_deref(), export::PAGE)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "captured conversations unreadable");
                ApiError::unavailable("the dataset cannot be read right now; retry shortly")
            })?;
        self.done = page.len() < export::PAGE;
        self.after = page.last().map(|(id, _)| id.clone());
        let read = page
            .into_iter()
            .filter_map(|(id, entry)| match serde_json::from_slice(&entry) {
                Ok(conversation) => Some((id, conversation)),
                Err(e) => {
                    tracing::warn!(id = %id, error = %e, "captured conversation unreadable; skipped");
                    None
                }
            })
            .collect();
        Ok(Some(read))
    }
}

/// The filter's query parameters, as the document shows them (`Filter::parse` reads them,
/// and refuses any other).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code, reason = "only the OpenAPI document reads the fields")]
pub(super) struct FilterParams {
    /// A model name or pattern (`*` for any run of characters).
    model: Option<String>,
    /// One tenant's conversations.
    tenant: Option<String>,
    /// One key's conversations.
    key: Option<String>,
    /// Captured from (`YYYY-MM-DD` or RFC 3339).
    from: Option<String>,
    /// Captured before (`YYYY-MM-DD` or RFC 3339).
    to: Option<String>,
    /// Comma-separated finish reasons (`stop`, `length`, ...).
    finish_reason: Option<String>,
}

fn filter_of(params: &HashMap<String, String>, caller: &Caller) -> Result<Filter, ApiError> {
    let filter =
        Filter::parse(params).map_err(|e| ApiError::bad_request(e.message).with_param(e.param))?;
    if caller.tenant.is_some() {
        return Err(ApiError::forbidden(
            "A token scoped to a tenant cannot read the dataset.",
        ));
    }
    Ok(filter)
}

/// The captured conversations the filter selects, oldest first, one OpenAI fine-tuning
/// example per line. Streamed: the first page is read before answering (a store that cannot
/// be read is a 503); a failure after that cuts the body off, so no client mistakes a
/// partial file for a whole one.
#[utoipa::path(
    get,
    path = "/admin/v1/datasets/export",
    tag = "datasets",
    params(FilterParams),
    responses(
        (status = 200, description = "JSON Lines (the schema is that of each line)", body = FineTuningExample, content_type = "application/x-ndjson"),
        (status = 400, description = "A parameter is invalid or unknown", body = ApiErrorBody),
        (status = 503, description = "The dataset cannot be read right now", body = ApiErrorBody),
    ),
)]
pub(super) async fn export_dataset(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let filter = filter_of(&params, &caller)?;
    let mut pages = Pages::new(gateway);
    let first = pages.next().await?;
    Ok(super::stream::streamed(
        "application/x-ndjson",
        "dataset",
        move |tx| async move {
            let mut page = first;
            while let Some(conversations) = page {
                let mut chunk = Vec::new();
                for (id, c) in conversations.iter().filter(|(_, c)| filter.admits(c)) {
                    if let Err(e) = export::write_line(&mut chunk, c) {
                        tracing::warn!(id = %id, error = %e, "captured conversation not exportable; skipped");
                    }
                }
                if !chunk.is_empty() && tx.send(Ok(chunk)).await.is_err() {
                    return Ok(());
                }
                page = pages.next().await?;
            }
            Ok(())
        },
    ))
}

#[derive(Serialize, ToSchema)]
pub(super) struct DatasetPurged {
    /// Always `dataset.purge`.
    object: &'static str,
    deleted: u64,
}

/// Deletes the captured conversations the filter selects; answers how many went. A filter
/// is required, so that a purge of everything is said outright (`all=true`).
#[utoipa::path(
    delete,
    path = "/admin/v1/datasets",
    tag = "datasets",
    params(
        FilterParams,
        ("all" = Option<bool>, Query, description = "`true`, with no filter: every conversation"),
    ),
    responses(
        (status = 200, description = "How many conversations were deleted", body = DatasetPurged),
        (status = 400, description = "No filter (and no `all=true`), or a parameter is invalid", body = ApiErrorBody),
        (status = 503, description = "The store is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn purge_dataset(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(mut params): Query<HashMap<String, String>>,
) -> Result<Json<DatasetPurged>, ApiError> {
    let all = match params.remove("all").as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "'all' must be true or false, not '{other}'."
            ))
            .with_param("all"))
        }
    };
    let filter = filter_of(&params, &caller)?;
    if filter.selects_everything() && !all {
        return Err(ApiError::bad_request(
            "Name what to purge (model, tenant, key, from, to, finish_reason), or all=true for everything.",
        ));
    }
    let mut pages = Pages::new(gateway.clone());
    let mut deleted = 0;
    while let Some(conversations) = pages.next().await? {
        let ids: Vec<String> = conversations
            .into_iter()
            .filter(|(_, c)| filter.admits(c))
            .map(|(id, _)| id)
            .collect();
        deleted += gateway
            .store
            .delete_captures(&ids)
            .await
            .map_err(super::store_error)?;
    }
    tracing::info!(deleted, "captured conversations purged");
    Ok(Json(DatasetPurged {
        object: "dataset.purge",
        deleted,
    }))
}
