//! What does one request accumulate on its way through the phases? The request context
//! pingora hands every phase, and the outcome it becomes at the end.

use crate::admission::Admitted;
use crate::auth::Identity;
use crate::cache::{CacheStatus, Plan};
use crate::error::ApiError;
use crate::metering::{Meter, Usage, UsageSource};
use crate::outcome::RequestOutcome;
use crate::request::Route;
use crate::upstream::{Backend, ModelRoute};
use bytes::{Bytes, BytesMut};
use sluice_policies::quota::LimitKind;
use std::sync::Arc;
use std::time::Instant;

/// Everything one request accumulates on its way through the phases.
pub struct RequestCtx {
    pub request_id: String,
    pub route: Option<Route>,
    pub identity: Option<Arc<Identity>>,
    /// The request body, read whole in `request_filter` and replayed to the backend.
    pub body: Bytes,
    pub model: Option<String>,
    /// The backends serving `model`, looked up once in `request_filter`.
    pub model_route: Option<Arc<ModelRoute>>,
    pub stream: bool,
    /// The body was changed to ask for a usage chunk the client did not ask for, which is
    /// then removed from the client's stream.
    pub usage_chunk_added: bool,
    /// The body was changed (an alias resolved); its length is set again.
    pub body_rewritten: bool,
    pub backend: Option<Arc<Backend>>,
    /// Hash of the prompt's leading bytes, for prefix affinity.
    pub prompt_prefix: u64,
    /// Backends already tried for this request (a retry goes elsewhere).
    pub tried: Vec<Arc<Backend>>,
    pub retries: u32,
    /// The models still to fall back to, in order (`[fallbacks]`), when none of the current
    /// model's backends can serve; the current one's are given up when it is set.
    pub fallbacks: std::collections::VecDeque<String>,
    pub route_exhausted: bool,
    /// `model` is a fallback, not the model the body names.
    pub fell_back: bool,
    /// The body as the current backend is sent it, when that differs from `body` (another
    /// model's name: a fallback, or the backend's own name for the model).
    pub attempt_body: Option<Bytes>,
    /// A 400's body, read (and the answer held) while a fallback could take the request, to
    /// tell a context-length refusal from the client's own mistake.
    pub refusal: Option<BytesMut>,
    /// When the current backend was chosen: its latency sample starts here.
    pub backend_started: Option<Instant>,
    /// The backend's response status, once its header arrived.
    pub upstream_status: Option<u16>,
    pub meter: Option<Meter>,
    /// The backend's answer ended (its last byte passed `response_body_filter`).
    pub body_done: bool,
    pub usage: Option<Usage>,
    /// Where `usage` came from (see `settle_unread_usage`).
    pub usage_source: UsageSource,
    pub first_byte_at: Option<Instant>,
    /// The client hung up while the backend was still answering.
    pub client_left: bool,
    /// The quota reservation, settled in `logging`.
    pub admitted: Option<Admitted>,
    /// `x-ratelimit-*` values and `Retry-After` for a refused request.
    pub refused_headers: Option<(sluice_policies::quota::RateHeaders, Option<u64>)>,
    /// The limit that refused the request, for metrics.
    pub refused_by: Option<&'static str>,
    /// Whose limit it was and which, for the answer's `x-sluice-limit`.
    pub refused_limit: Option<(String, LimitKind)>,
    /// Set when the gateway refuses the request itself, for `fail_to_proxy` and the log.
    pub error: Option<ApiError>,
    /// What the last failed attempt at a backend ran into, told to the client when no other
    /// backend is left to retry on.
    pub last_failure: Option<ApiError>,
    /// The cache's business with this request: how it was answered, and, for a miss whose
    /// answer may be kept, the plan and the answer's bytes as they pass.
    pub cache_status: Option<CacheStatus>,
    pub cache_plan: Option<Plan>,
    pub cache_capture: Option<BytesMut>,
    /// The answer's chunks, while it is to be captured for distillation (see `datasets`).
    pub dataset_capture: Option<crate::datasets::Capture>,
    /// The request's exported span and its current upstream attempt's, when trace export is
    /// on (see sluice-telemetry); `None` costs nothing.
    pub span: Option<tracing::Span>,
    pub upstream_span: Option<tracing::Span>,
    pub started: Instant,
    /// This request's place among the replica's requests in flight, and the request-body
    /// bytes it holds (see `overload`); given back when the context drops.
    pub in_flight: Option<crate::overload::InFlight>,
    pub body_bytes: Option<crate::overload::BodyBytes>,
}

impl RequestCtx {
    pub fn new() -> RequestCtx {
        RequestCtx {
            request_id: String::new(),
            route: None,
            identity: None,
            body: Bytes::new(),
            model: None,
            model_route: None,
            stream: false,
            usage_chunk_added: false,
            body_rewritten: false,
            backend: None,
            prompt_prefix: 0,
            tried: Vec::new(),
            retries: 0,
            fallbacks: std::collections::VecDeque::new(),
            route_exhausted: false,
            fell_back: false,
            attempt_body: None,
            refusal: None,
            backend_started: None,
            upstream_status: None,
            meter: None,
            body_done: false,
            usage: None,
            usage_source: UsageSource::Reported,
            first_byte_at: None,
            client_left: false,
            admitted: None,
            refused_headers: None,
            refused_by: None,
            refused_limit: None,
            error: None,
            last_failure: None,
            cache_status: None,
            cache_plan: None,
            cache_capture: None,
            dataset_capture: None,
            span: None,
            upstream_span: None,
            started: Instant::now(),
            in_flight: None,
            body_bytes: None,
        }
    }

    /// Settles what a backend's 2xx answer used when its usage could not be read (see
    /// `metering::unread_usage`).
    /// With the model's tokenizer, the prompt is counted from the request and an estimated
    /// completion from the text that passed.
    pub fn settle_unread_usage(&mut self, tokenizer: Option<&tokenizers::Tokenizer>) {
        let answered = self
            .upstream_status
            .is_some_and(|s| (200..300).contains(&s));
        if self.usage.is_some() || !answered {
            return;
        }
        let (Some(meter), Some(admitted)) = (self.meter.as_mut(), self.admitted.as_ref()) else {
            return;
        };
        let ceiling = admitted.ceiling;
        let (mut usage, source) = crate::metering::unread_usage(meter, self.body_done, ceiling);
        if let (Some(tokenizer), Some(route)) = (tokenizer, self.route) {
            use crate::metering::tokens;
            if let Some(prompt) = tokens::prompt_tokens(tokenizer, route, &self.body) {
                usage.prompt_tokens = prompt.min(ceiling.prompt_tokens);
            }
            if let (UsageSource::Estimated, Some(text)) = (source, meter.generated_text()) {
                usage.completion_tokens =
                    tokens::count(tokenizer, text).min(ceiling.completion_tokens);
            }
        }
        self.body_done = true;
        self.usage = Some(usage);
        self.usage_source = source;
    }

    /// How the request ended, for billing, metrics, traces and the log.
    pub fn outcome<'a>(
        &'a self,
        method: &'a str,
        protocol: &'static str,
        status: u16,
        cost: (i64, &'a str),
        error: Option<String>,
    ) -> RequestOutcome<'a> {
        RequestOutcome {
            request_id: &self.request_id,
            method,
            protocol,
            route: self.route,
            status,
            upstream_status: self.upstream_status,
            identity: self.identity.as_deref(),
            model: self.model.as_deref().unwrap_or(""),
            stream: self.stream,
            backend: self.backend.as_ref().map_or("", |b| b.name.as_str()),
            cache: self.cache_status,
            usage: self.usage,
            usage_source: self.usage_source,
            cost_nano: cost.0,
            currency: cost.1,
            client_left: self.client_left,
            duration: self.started.elapsed(),
            first_byte: self.first_byte_at.map(|t| t - self.started),
            retries: self.retries,
            refused_by: self.refused_by,
            error,
        }
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        RequestCtx::new()
    }
}
