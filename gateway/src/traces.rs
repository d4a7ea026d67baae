//! What does a request's trace show? The spans the proxy exports when trace export is on
//! (sluice-telemetry): one per request, with children for auth, admission, the cache lookup,
//! each upstream attempt (with its time to first byte) and metering. Attributes follow the
//! OpenTelemetry GenAI conventions where they exist (`gen_ai.*`); never an API key, never
//! prompt or answer text.
//!
//! With export off, every function here returns `None` or a disabled span without building
//! anything.

use crate::outcome::RequestOutcome;
use crate::request::{RequestView, Route};
use crate::upstream::Backend;
use pingora_http::RequestHeader;
use sluice_telemetry::{enabled, TARGET};
use tracing::field::Empty;
use tracing::Span;

/// The request's root span, when trace export is on (health checks are not traced).
pub fn request_span(header: &RequestHeader, request_id: &str) -> Option<Span> {
    if !enabled() || header.uri.path().starts_with("/health") {
        return None;
    }
    Some(tracing::info_span!(
        target: TARGET,
        "request",
        otel.kind = "server",
        http.request.method = %header.method,
        url.path = %header.uri.path(),
        http.response.status_code = Empty,
        gen_ai.operation.name = Empty,
        gen_ai.request.model = Empty,
        gen_ai.request.max_tokens = Empty,
        gen_ai.request.temperature = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        sluice.request_id = %request_id,
        sluice.tenant = Empty,
        sluice.tier = Empty,
        sluice.cache = Empty,
        sluice.backend = Empty,
        sluice.retries = Empty,
    ))
}

/// A phase of the request (auth, admission, cache lookup, metering) under its span.
pub fn child(parent: Option<&Span>, name: &'static str) -> Span {
    match parent {
        Some(parent) => {
            tracing::info_span!(target: TARGET, parent: parent, "phase", otel.name = name)
        }
        None => Span::none(),
    }
}

/// One attempt at a backend; its context goes to the backend as `traceparent`.
pub fn upstream_span(parent: Option<&Span>, backend: &Backend, attempt: u32) -> Option<Span> {
    let parent = parent?;
    Some(tracing::info_span!(
        target: TARGET,
        parent: parent,
        "upstream",
        otel.kind = "client",
        server.address = %backend.addr(),
        sluice.backend = %backend.name,
        sluice.attempt = i64::from(attempt),
        sluice.time_to_first_byte_ms = Empty,
    ))
}

/// What the request asks for, once its body is read.
pub fn record_request(span: Option<&Span>, route: Route, view: &RequestView<'_>) {
    let Some(span) = span else {
        return;
    };
    let operation = match route {
        Route::ChatCompletions => "chat",
        Route::Completions => "text_completion",
        Route::Embeddings => "embeddings",
        Route::Health | Route::Models => return,
    };
    // The span's name is only known now, and its OpenTelemetry span already exists (its
    // children were started): rename that directly.
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    span.context()
        .span()
        .update_name(format!("{operation} {}", view.model()));
    span.record("gen_ai.operation.name", operation);
    span.record("gen_ai.request.model", view.model());
    if let Some(max) = view.max_completion_tokens.or(view.max_tokens) {
        span.record("gen_ai.request.max_tokens", i64::from(max));
    }
    if let Some(t) = view.temperature {
        span.record("gen_ai.request.temperature", t);
    }
}

/// Records how the request ended and closes its spans. (Numbers are recorded as i64:
/// OpenTelemetry has no unsigned integers, and a u64 would be exported as a string.)
pub fn finish(span: Option<tracing::Span>, outcome: &RequestOutcome) {
    let Some(span) = span else {
        return;
    };
    span.record("http.response.status_code", i64::from(outcome.status));
    if let Some(identity) = outcome.identity {
        span.record("sluice.tenant", identity.tenant.as_str());
        span.record("sluice.tier", identity.tier.as_str());
    }
    if let Some(usage) = outcome.usage {
        span.record("gen_ai.usage.input_tokens", usage.prompt_tokens as i64);
        span.record("gen_ai.usage.output_tokens", usage.completion_tokens as i64);
    }
    if let Some(cache) = outcome.cache {
        span.record("sluice.cache", cache.as_str());
    }
    if !outcome.backend.is_empty() {
        span.record("sluice.backend", outcome.backend);
    }
    span.record("sluice.retries", i64::from(outcome.retries));
}
