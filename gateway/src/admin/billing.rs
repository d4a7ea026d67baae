//! Usage and billing: priced usage totals and billing exports (CSV or JSON Lines).
//!
//! Both read the store page by page and price events as they pass ([`billing::Pricer`]), so
//! their memory grows with what they return (rows), never with the events read: an export of
//! a month of a busy fleet streams in constant memory.

use super::{store_error, AppState, Caller};
use crate::app::Gateway;
use crate::billing::source::{Item, Pages};
use crate::billing::{
    self, Aggregator, Dim, ExportQuery, Grouping, PricedEvent, Pricer, Row, Tally, UsageCloudEvent,
};
use crate::error::{ApiError, ApiErrorBody};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Extension;
use axum::Json;
use serde::Serialize;
use std::collections::HashMap;
use utoipa::ToSchema;

/// Export bytes sent to the client at a time (a page's lines, or this many bytes of rows).
const CHUNK_BYTES: usize = 64 << 10;

/// The usage a query reads (see `billing::source`), with a read failure as the API's error.
pub(super) struct Reader(Pages);

impl Reader {
    pub(super) fn new(gateway: &Gateway, query: &ExportQuery) -> Reader {
        Reader(Pages::new(
            gateway.store.clone(),
            gateway.ledger.clone(),
            query.from_ms,
            query.to_ms,
            query.grouping == Grouping::Events,
        ))
    }

    pub(super) async fn next(&mut self) -> Result<Option<Vec<Item>>, ApiError> {
        self.0.next().await.map_err(|e| {
            tracing::warn!(error = %e, "usage unreadable");
            ApiError::unavailable("usage cannot be read right now; retry shortly")
        })
    }
}

/// Prices what the caller may see of a page, in order (a key belongs to one tenant, so
/// usage the caller may not see never changes a visible key's graduated price), and hands
/// each priced item on: its tally, and for an event the event itself.
pub(super) fn price_page(
    page: Vec<Item>,
    caller: &Caller,
    pricer: &mut Pricer,
    mut each: impl FnMut(&Tally, Option<&PricedEvent>),
) {
    for item in page {
        match item {
            Item::Event(e) if caller.sees(&e.tenant) => {
                let p = pricer.price(e);
                each(&Tally::of_event(&p), Some(&p));
            }
            Item::Day {
                start_ms,
                rollup: r,
            } if caller.sees(&r.tenant) => {
                let (cost, currency) =
                    pricer.cost(&r.key_id, &r.model, &r.tier, start_ms, &r.billed);
                let tally = Tally {
                    time_ms: start_ms,
                    key_id: &r.key_id,
                    tenant: &r.tenant,
                    model: &r.model,
                    currency: &currency,
                    requests: r.requests,
                    prompt_tokens: r.prompt_tokens,
                    completion_tokens: r.completion_tokens,
                    cached_tokens: r.cached_tokens,
                    cost,
                };
                each(&tally, None);
            }
            _ => {}
        }
    }
}

/// One line of a JSON Lines export: an aggregate row (the default), an event
/// (`group_by=event`) or a CloudEvent (`format=cloudevents`). Only the OpenAPI document
/// names this type: `billing::write_row` and `write_event` write the lines themselves.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum ExportLine<'a> {
    Row(Row),
    Event(PricedEvent),
    CloudEvent(UsageCloudEvent<'a>),
}

/// Streamed: events are read, priced and written a page at a time (rows of a grouped export
/// once all are summed). The first page is read before answering, so a store that cannot
/// be read is a 503; a failure after that cuts the body off (the connection is reset, so
/// no client mistakes a partial export for a whole one).
#[utoipa::path(
    get,
    path = "/admin/v1/billing/export",
    tag = "billing",
    params(
        ("from" = Option<String>, Query, description = "`YYYY-MM-DD` (midnight UTC) or RFC 3339; default: the start of `to`'s month"),
        ("to" = Option<String>, Query, description = "`YYYY-MM-DD` or RFC 3339, exclusive; default: now"),
        ("group_by" = Option<String>, Query, description = "Comma-separated `key`, `tenant`, `model`, `day`, `month`; or `event` for one line per usage event (default `key,model,day`)"),
        ("format" = Option<String>, Query, description = "`csv` (default), `jsonl` (or `json`), or `cloudevents` (with `group_by=event`)"),
    ),
    responses(
        (status = 200, description = "The export: CSV with a header row, or JSON Lines (the schema is that of each line)", content(
            (String = "text/csv"),
            (ExportLine = "application/x-ndjson"),
        )),
        (status = 400, description = "A parameter is invalid", body = ApiErrorBody),
        (status = 503, description = "Usage cannot be read right now", body = ApiErrorBody),
    ),
)]
pub(super) async fn billing_export(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let param = |name: &str| params.get(name).map(String::as_str);
    let query = ExportQuery::parse(
        param("from"),
        param("to"),
        param("group_by"),
        param("format"),
        crate::clock::now_ms(),
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut pages = Reader::new(&gateway, &query);
    let first = pages.next().await?.unwrap_or_default();
    let content_type = match query.format {
        billing::Format::Csv => "text/csv; charset=utf-8",
        billing::Format::Jsonl | billing::Format::CloudEvents => "application/x-ndjson",
    };
    Ok(super::stream::streamed(
        content_type,
        "billing",
        move |tx| async move { write_export(&gateway, &caller, &query, pages, first, &tx).await },
    ))
}

/// Writes the export to `tx`, a chunk at a time; stops quietly when the client has gone.
async fn write_export(
    gateway: &Gateway,
    caller: &Caller,
    query: &ExportQuery,
    mut pages: Reader,
    first: Vec<Item>,
    tx: &super::stream::Chunks,
) -> Result<(), ApiError> {
    let tiers = gateway.tiers();
    let mut pricer = Pricer::new(&gateway.config.prices, &tiers);
    let mut sums = match &query.grouping {
        Grouping::By(dims) => Some(Aggregator::new(dims, query.from_ms, query.to_ms)),
        Grouping::Events => None,
    };
    let range = query.from_ms..query.to_ms;
    let mut chunk = billing::header(query);
    let mut page = Some(first);
    while let Some(items) = page {
        price_page(items, caller, &mut pricer, |tally, event| {
            match (&mut sums, event) {
                (Some(sums), _) => sums.add_tally(tally),
                // An event export reads rollups only for the days before its range (the
                // month-to-date of graduated prices): they are priced, not written.
                (None, Some(p)) if range.contains(&p.event.time_ms) => {
                    billing::write_event(&mut chunk, p, query.format)
                }
                (None, _) => {}
            }
        });
        if !chunk.is_empty() && tx.send(Ok(std::mem::take(&mut chunk))).await.is_err() {
            return Ok(());
        }
        page = pages.next().await?;
    }
    for row in sums.map(Aggregator::rows).unwrap_or_default() {
        billing::write_row(&mut chunk, &row, query.format);
        if chunk.len() >= CHUNK_BYTES && tx.send(Ok(std::mem::take(&mut chunk))).await.is_err() {
            return Ok(());
        }
    }
    if !chunk.is_empty() {
        let _ = tx.send(Ok(chunk)).await;
    }
    Ok(())
}

#[derive(Serialize, ToSchema)]
pub(super) struct UsageView {
    /// Always `usage`.
    object: &'static str,
    from_ms: i64,
    to_ms: i64,
    /// One row per key.
    totals: Vec<Row>,
    /// One row per key and model.
    by_model: Vec<Row>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct UsagePurged {
    /// Always `usage.purge`.
    object: &'static str,
    tenant: String,
    events_deleted: u64,
    rollups_deleted: u64,
}

/// Totals and per-model rows, for one key or all, priced.
#[utoipa::path(
    get,
    path = "/admin/v1/usage",
    tag = "billing",
    params(
        ("key" = Option<String>, Query, description = "One key's id; default: every key the caller may see"),
        ("from" = Option<String>, Query, description = "`YYYY-MM-DD` (midnight UTC) or RFC 3339; default: the start of `to`'s month"),
        ("to" = Option<String>, Query, description = "`YYYY-MM-DD` or RFC 3339, exclusive; default: now"),
    ),
    responses(
        (status = 200, description = "The usage", body = UsageView),
        (status = 400, description = "A parameter is invalid", body = ApiErrorBody),
        (status = 503, description = "Usage cannot be read right now", body = ApiErrorBody),
    ),
)]
pub(super) async fn usage(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<UsageView>, ApiError> {
    let param = |name: &str| params.get(name).map(String::as_str);
    let query = ExportQuery::parse(
        param("from"),
        param("to"),
        None,
        None,
        crate::clock::now_ms(),
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let key = param("key");
    let tiers = gateway.tiers();
    let mut pricer = Pricer::new(&gateway.config.prices, &tiers);
    let mut totals = Aggregator::new(&[Dim::Key], query.from_ms, query.to_ms);
    let mut by_model = Aggregator::new(&[Dim::Key, Dim::Model], query.from_ms, query.to_ms);
    let mut pages = Reader::new(&gateway, &query);
    while let Some(mut items) = pages.next().await? {
        if let Some(key) = key {
            items.retain(|item| match item {
                Item::Event(e) => e.key_id == key,
                Item::Day { rollup, .. } => rollup.key_id == key,
            });
        }
        price_page(items, &caller, &mut pricer, |tally, _| {
            totals.add_tally(tally);
            by_model.add_tally(tally);
        });
    }
    Ok(Json(UsageView {
        object: "usage",
        from_ms: query.from_ms,
        to_ms: query.to_ms,
        totals: totals.rows(),
        by_model: by_model.rows(),
    }))
}

/// A data-deletion request. Deletes the tenant's usage events (and, with the ledger, its
/// rollups) wherever they are kept; their ids stay counted, so nothing replayed later
/// brings them back.
#[utoipa::path(
    delete,
    path = "/admin/v1/tenants/{tenant}/usage",
    tag = "billing",
    responses(
        (status = 200, description = "What was deleted", body = UsagePurged),
        (status = 503, description = "The store or the usage ledger is unavailable", body = ApiErrorBody),
    ),
)]
pub(super) async fn purge_tenant_usage(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(tenant): Path<String>,
) -> Result<Json<UsagePurged>, ApiError> {
    if !caller.sees(&tenant) {
        return Err(ApiError::forbidden(
            "This token may not act on that tenant.",
        ));
    }
    let events = gateway
        .store
        .purge_usage(&tenant)
        .await
        .map_err(store_error)?;
    let (ledger_events, rollups) = match &gateway.ledger {
        Some(ledger) => ledger.purge_tenant(&tenant).await.map_err(|e| {
            tracing::error!(error = %e, "usage ledger purge failed");
            ApiError::unavailable("The usage ledger is unavailable; try again shortly.")
        })?,
        None => (0, 0),
    };
    tracing::info!(tenant = %tenant, events = events + ledger_events, rollups, "tenant usage purged");
    Ok(Json(UsagePurged {
        object: "usage.purge",
        tenant,
        events_deleted: events + ledger_events,
        rollups_deleted: rollups,
    }))
}
