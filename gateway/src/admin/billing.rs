//! Usage and billing: priced usage totals and billing exports (CSV or JSON Lines).
//!
//! Both read the store page by page and price events as they pass ([`billing::Pricer`]), so
//! their memory grows with what they return (rows), never with the events read: an export of
//! a month of a busy fleet streams in constant memory.

use super::{store_error, AppState, Caller};
use crate::app::Gateway;
use crate::billing::{self, Aggregator, Dim, ExportQuery, Grouping, PricedEvent, Pricer};
use crate::error::ApiError;
use crate::store::{EventCursor, USAGE_PAGE};
use crate::usage::UsageEvent;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// Export bytes sent to the client at a time (a page's lines, or this many bytes of rows).
const CHUNK_BYTES: usize = 64 << 10;

/// The events a query needs, a page at a time: from the start of its first month, so that
/// graduated prices see each key's whole month.
struct Pages {
    gateway: Arc<Gateway>,
    from_ms: i64,
    to_ms: i64,
    next: Option<Option<EventCursor>>,
}

impl Pages {
    fn new(gateway: Arc<Gateway>, query: &ExportQuery) -> Pages {
        Pages {
            gateway,
            from_ms: crate::clock::Month::of_ms(query.from_ms).start_ms,
            to_ms: query.to_ms,
            next: Some(None),
        }
    }

    /// The next page, or `None` after the last.
    async fn next(&mut self) -> Result<Option<Vec<UsageEvent>>, ApiError> {
        let Some(after) = self.next.take() else {
            return Ok(None);
        };
        let (page, cursor) = self
            .gateway
            .store
            .usage_events_page(self.from_ms, self.to_ms, after, USAGE_PAGE)
            .await
            .map_err(store_error)?;
        self.next = cursor.map(Some);
        Ok(Some(page))
    }
}

/// The priced events of a page that the caller may see (a key belongs to one tenant, so
/// events the caller may not see never change a visible key's graduated price).
fn priced<'p, 'b>(
    page: Vec<UsageEvent>,
    caller: &'p Caller,
    pricer: &'p mut Pricer<'b>,
) -> impl Iterator<Item = PricedEvent> + use<'p, 'b> {
    page.into_iter()
        .filter(|e| caller.sees(&e.tenant))
        .map(|e| pricer.price(e))
}

/// `GET /admin/v1/billing/export?from=&to=&group_by=key,tenant,model,day|event&format=csv|jsonl`
///
/// Streamed: events are read, priced and written a page at a time (rows of a grouped export
/// once all are summed). The first page is read before answering, so a store that cannot
/// be read is a 503; a failure after that cuts the body off (the connection is reset, so
/// no client mistakes a partial export for a whole one).
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
    let mut pages = Pages::new(gateway.clone(), &query);
    let first = pages.next().await?.unwrap_or_default();
    let content_type = match query.format {
        billing::Format::Csv => "text/csv; charset=utf-8",
        billing::Format::Jsonl => "application/x-ndjson",
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    tokio::spawn(async move {
        if let Err(e) = write_export(&gateway, &caller, &query, pages, first, &tx).await {
            tracing::error!(error = %e.message, "billing export cut off: the store failed mid-way");
            let _ = tx.send(Err(std::io::Error::other(e.message))).await;
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    Ok((
        [(http::header::CONTENT_TYPE, content_type)],
        Body::from_stream(body),
    )
        .into_response())
}

/// Writes the export to `tx`, a chunk at a time; stops quietly when the client has gone.
async fn write_export(
    gateway: &Gateway,
    caller: &Caller,
    query: &ExportQuery,
    mut pages: Pages,
    first: Vec<UsageEvent>,
    tx: &tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
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
    while let Some(events) = page {
        for p in priced(events, caller, &mut pricer) {
            match &mut sums {
                Some(sums) => sums.add(&p),
                None if range.contains(&p.event.time_ms) => {
                    billing::write_event(&mut chunk, &p, query.format)
                }
                None => {}
            }
        }
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

/// `GET /admin/v1/usage?key=&from=&to=`: totals and per-model rows, for one key or all.
pub(super) async fn usage(
    State(gateway): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
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
    let mut pages = Pages::new(gateway.clone(), &query);
    while let Some(mut events) = pages.next().await? {
        if let Some(key) = key {
            events.retain(|e| e.key_id == key);
        }
        for p in priced(events, &caller, &mut pricer) {
            totals.add(&p);
            by_model.add(&p);
        }
    }
    Ok(Json(json!({
        "object": "usage",
        "from_ms": query.from_ms,
        "to_ms": query.to_ms,
        "totals": totals.rows(),
        "by_model": by_model.rows(),
    })))
}
