//! Prometheus metrics, read at scrape time from what the gateway keeps.

use super::AppState;
use crate::app::Gateway;
use axum::extract::State;
use axum::response::IntoResponse;

/// Prometheus text exposition (behind the admin listener's auth, like everything on it:
/// give the scraper a viewer token).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "metrics",
    responses((status = 200, description = "Prometheus text exposition (version 0.0.4)", body = String, content_type = "text/plain")),
)]
pub(super) async fn metrics(State(gateway): State<AppState>) -> impl IntoResponse {
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::get().render(&scrape_state(&gateway)),
    )
}

/// What the gateway keeps, as the metrics render it.
fn scrape_state(gateway: &Gateway) -> crate::metrics::ScrapeState {
    use std::sync::atomic::Ordering;
    crate::metrics::ScrapeState {
        backends: gateway
            .upstreams
            .backends()
            .iter()
            .map(|b| crate::metrics::BackendGauges {
                name: b.name.clone(),
                up: b.state.available(),
                in_flight: b.state.in_flight.load(Ordering::Relaxed),
                latency_ewma: b.state.ewma(),
            })
            .collect(),
        cache: {
            let stats = gateway.cache.stats();
            crate::metrics::CacheCounters {
                entries: stats.entries as u64,
                hits: stats.hits,
                semantic_hits: stats.semantic_hits,
                misses: stats.misses,
                verified: stats.verification.verified,
                rejected: stats.verification.rejected.into_iter().collect(),
            }
        },
        journal_bytes: gateway.usage.journal_bytes(),
        feed_pending_bytes: gateway.feed.as_ref().map(|f| f.pending_bytes()),
    }
}
