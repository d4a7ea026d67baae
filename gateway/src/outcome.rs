//! What happened to a request? One [`RequestOutcome`], built when the request ends, feeds
//! everything that reports on it: its usage event (billing), its metrics, its trace span and
//! its one access-log line. Nothing here reaches back into the proxy: the outcome carries
//! what they need.

use crate::auth::Identity;
use crate::cache::CacheStatus;
use crate::metering::{Usage, UsageSource};
use crate::request::Route;
use crate::usage::UsageEvent;
use std::time::Duration;

/// How a request ended.
#[derive(Debug)]
pub struct RequestOutcome<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub route: Option<Route>,
    /// The status the client got (0 when it got none).
    pub status: u16,
    /// The backend's status, when a backend answered.
    pub upstream_status: Option<u16>,
    pub identity: Option<&'a Identity>,
    pub model: &'a str,
    pub stream: bool,
    /// The backend that served it ("" when none did).
    pub backend: &'a str,
    pub cache: Option<CacheStatus>,
    pub usage: Option<Usage>,
    pub usage_source: UsageSource,
    /// Its cost at the price book's first bands, in nano-units of `currency` ("" when the
    /// model has no price).
    pub cost_nano: i64,
    pub currency: &'a str,
    pub client_left: bool,
    pub duration: Duration,
    pub first_byte: Option<Duration>,
    pub retries: u32,
    /// The limit that refused it.
    pub refused_by: Option<&'static str>,
    pub error: Option<String>,
}

impl RequestOutcome<'_> {
    fn served_from_cache(&self) -> bool {
        matches!(self.cache, Some(CacheStatus::Hit | CacheStatus::Semantic))
    }

    /// The usage event of a request a backend (or the response cache) answered; `None` for
    /// everything else.
    pub fn usage_event(&self, time_ms: i64) -> Option<UsageEvent> {
        let status = match self.upstream_status {
            Some(status) => status,
            None if self.served_from_cache() => 200,
            None => return None,
        };
        let identity = self.identity?;
        let usage = self.usage.unwrap_or_default();
        Some(UsageEvent {
            id: uuid::Uuid::now_v7().to_string(),
            time_ms,
            request_id: self.request_id.to_owned(),
            key_id: identity.key_id.clone(),
            tenant: identity.tenant.clone(),
            tier: identity.tier.clone(),
            model: self.model.to_owned(),
            backend: self.backend.to_owned(),
            route: self.route.map_or("", Route::name).to_owned(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_tokens: usage.cached_tokens,
            cache_status: self.cache.unwrap_or(CacheStatus::Miss).as_str().to_owned(),
            status,
            latency_ms: self.duration.as_millis() as u64,
            ttft_ms: self.first_byte.map(|t| t.as_millis() as u64),
            client_disconnected: self.client_left,
            usage_reported: self.usage_source == UsageSource::Reported,
            usage_source: self.usage_source,
        })
    }

    pub fn record_metrics(&self) {
        let usage = self.usage.unwrap_or_default();
        crate::metrics::get().record_request(&crate::metrics::RequestRecord {
            route: self.route.map_or("unknown", Route::name),
            model: self.model,
            tier: self.identity.map_or("", |i| i.tier.as_str()),
            status: self.status,
            cache: self.cache.map_or("", CacheStatus::as_str),
            duration: self.duration,
            first_byte: self.first_byte,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_tokens: usage.cached_tokens,
            cost_nano: self.cost_nano,
            currency: self.currency,
            refused_by: self.refused_by,
        });
    }

    /// The request's one `sluice::access` log line.
    pub fn log(&self) {
        let identity = self.identity;
        let usage = self.usage;
        tracing::info!(
            target: "sluice::access",
            request_id = %self.request_id,
            method = %self.method,
            route = self.route.map_or("unknown", Route::name),
            status = self.status,
            key_id = identity.map_or("", |i| i.key_id.as_str()),
            tenant = identity.map_or("", |i| i.tenant.as_str()),
            tier = identity.map_or("", |i| i.tier.as_str()),
            model = self.model,
            stream = self.stream,
            backend = self.backend,
            prompt_tokens = usage.map_or(0, |u| u.prompt_tokens),
            completion_tokens = usage.map_or(0, |u| u.completion_tokens),
            cached_tokens = usage.map_or(0, |u| u.cached_tokens),
            usage_source = self.usage_source.as_str(),
            cost = %rust_decimal::Decimal::new(self.cost_nano, 9).normalize(),
            currency = self.currency,
            client_left = self.client_left,
            cache = self.cache.map_or("", CacheStatus::as_str),
            duration_ms = self.duration.as_millis() as u64,
            first_byte_ms = self.first_byte.map(|t| t.as_millis() as u64),
            retries = self.retries,
            error = self.error.as_deref(),
            "request"
        );
    }
}
