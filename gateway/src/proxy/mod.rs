//! Where does a request go, phase by phase? pingora's request phases, each handing its
//! question to the module that answers it. The phases orchestrate; they hold no policy.
//!
//! | phase | question | answered by |
//! | --- | --- | --- |
//! | `request_filter` | which route, who is calling, what do they ask, may they, is it cached | `request`, `auth`, `admission`, `cache` |
//! | `upstream_peer` | which backend | `upstream`, `balancer` |
//! | `upstream_request_filter`, `request_body_filter` | what the backend sees | `metering` (usage chunk), `request` (the body read once, replayed) |
//! | `response_filter`, `response_body_filter` | what the client sees, what it used | `admission` (rate headers), `metering`, `cache` (answers kept) |
//! | `hold_response`, `held_response_filter` | what the answer cost (`x-sluice-cost`, once its body has been read) | `billing` (first-band cost) |
//! | `fail_to_proxy` | what went wrong | `error` |
//! | `logging` | what happened | `outcome` (usage event, metrics, trace, access log), `admission` (settlement) |

mod ctx;
mod intake;
mod respond;

pub use ctx::RequestCtx;

use crate::app::Gateway;
use crate::datasets::{Capture, Datasets};
use crate::error::ApiError;
use crate::metering::Meter;
use crate::request::{self, Route};
use crate::traces;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use respond::LocalAnswer;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Proxy {
    gateway: Arc<Gateway>,
}

impl Proxy {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Proxy { gateway }
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.request_id = request::request_id(&session.req_header().headers);
        ctx.span = traces::request_span(session.req_header(), &ctx.request_id);
        match self.take_in(session, ctx).await {
            Ok(None) => Ok(false),
            Ok(Some(LocalAnswer::Json(body))) => {
                respond::json(session, ctx, 200, body).await?;
                Ok(true)
            }
            Ok(Some(LocalAnswer::Cached(hit))) => {
                respond::cached(session, ctx, &self.gateway.config.prices, hit).await?;
                Ok(true)
            }
            Err(error) => {
                // An unread body would be taken for the next request on this connection.
                if !session.is_body_done() {
                    session.set_keepalive(None);
                }
                if let (Some(secs), None) = (error.retry_after_secs, &ctx.refused_headers) {
                    ctx.refused_headers = Some((Default::default(), Some(secs)));
                }
                let (status, body) = (error.status, error.body());
                ctx.error = Some(error);
                respond::json(session, ctx, status, body).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // A retry: the previous backend is done with this request and is not tried again.
        if let Some(previous) = ctx.backend.take() {
            previous.state.in_flight.fetch_sub(1, Ordering::Relaxed);
            ctx.tried.push(previous);
        }
        ctx.upstream_status = None;
        let config = &self.gateway.config.balancer;
        let pick = |ctx: &RequestCtx| {
            ctx.model_route.as_ref().and_then(|r| {
                r.pick(
                    config.strategy,
                    &ctx.tried,
                    ctx.prompt_prefix,
                    config.affinity_load_factor,
                )
            })
        };
        let mut picked = if ctx.route_exhausted { None } else { pick(ctx) };
        while picked.is_none() && self.fall_back(ctx) {
            picked = pick(ctx);
        }
        let model = ctx.model.as_deref().unwrap_or_default();
        let Some(backend) = picked else {
            // A retry that finds no other backend after one that reached a backend: the client
            // hears what that attempt ran into (a timeout is a 504, a backend's 503 a 503). When
            // none could even be connected to, that no backend is serving is the news.
            if let Some(failure) = ctx.last_failure.take() {
                ctx.error = Some(failure);
                return Err(Error::explain(
                    ErrorType::HTTPStatus(ctx.error.as_ref().map_or(502, |e| e.status)),
                    "no other backend to retry on",
                ));
            }
            let route = ctx.model_route.as_ref();
            let total = route.map_or(0, |r| r.backends.len());
            let error = match route.and_then(|r| r.backed_off_for()) {
                Some(wait) => ApiError::unavailable(format!(
                    "Every backend serving model `{model}` is at its own rate limit; try again in {} seconds.",
                    wait.as_secs().max(1)
                ))
                .with_retry_after(wait.as_secs().max(1)),
                None => ApiError::unavailable(format!(
                    "No backend is serving model `{model}` right now: {} of {total} tried, the rest down, ejected or draining.",
                    ctx.tried.len()
                )),
            };
            ctx.error = Some(error);
            return Err(Error::explain(
                ErrorType::HTTPStatus(503),
                "no backend for model",
            ));
        };
        backend.state.in_flight.fetch_add(1, Ordering::Relaxed);
        ctx.upstream_span = traces::upstream_span(ctx.span.as_ref(), &backend, ctx.retries);
        let peer = backend.peer(
            Duration::from_millis(config.connect_timeout_ms),
            Duration::from_secs(config.read_timeout_secs),
        );
        ctx.attempt_body = self.body_for(ctx, &backend)?;
        ctx.backend = Some(backend);
        ctx.backend_started = Some(Instant::now());
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the backend, let alone the client: another backend may serve it.
        self.backend_failed(ctx);
        e.set_retry(self.may_retry(ctx));
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("backend {peer}"));
        // Retried only while the client has seen nothing of this answer; a started stream is
        // never replayed.
        let untouched = session.response_written().is_none() && !ctx.client_left;
        if is_backend_fault(&e, ctx.upstream_status) {
            self.backend_failed(ctx);
        }
        self.remember_failure(ctx, &e);
        e.set_retry(
            untouched
                && e.esource() != &pingora_core::ErrorSource::Downstream
                && self.may_retry(ctx),
        );
        e
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A backend that answers 502/503 (overloaded, shutting down) leaves the request to
        // another, when one is left to try.
        let status = upstream_response.status.as_u16();
        if let Some(backend) = &ctx.backend {
            if let Some(wait) =
                crate::upstream::rate_limit_wait(backend, status, &upstream_response.headers)
            {
                backend.state.back_off(wait);
                crate::metrics::get().record_upstream_backoff(&backend.name);
                tracing::info!(backend = %backend.name, wait_ms = wait.as_millis() as u64, "backend set aside for its own rate limit");
            }
        }
        // The provider's limits are the gateway's business, not the client's: the client is
        // told its own (see respond::insert_rate_limit_headers).
        let provider_limits: Vec<http::HeaderName> = upstream_response
            .headers
            .keys()
            .filter(|name| name.as_str().starts_with("x-ratelimit-"))
            .cloned()
            .collect();
        for name in provider_limits {
            upstream_response.remove_header(&name);
        }
        if matches!(status, 429 | 502 | 503) && self.retries_left(ctx) {
            ctx.upstream_status = Some(status);
            return Err(Error::explain(
                ErrorType::HTTPStatus(status),
                "backend unavailable; retrying elsewhere",
            ));
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // The client's credential is for the gateway; backends never see it (one that needs
        // a key gets its own, below).
        upstream_request.remove_header("authorization");
        if self.gateway.config.metering {
            // A compressed answer could not be read for usage.
            upstream_request.remove_header("accept-encoding");
        }
        upstream_request.insert_static_header("x-request-id", &ctx.request_id)?;
        if let Some(span) = &ctx.upstream_span {
            // The backend continues this trace under the upstream attempt's span.
            let mut context = Vec::new();
            sluice_telemetry::inject(span, &mut |name, value| {
                context.push((name.to_owned(), value))
            });
            for (name, value) in context {
                upstream_request.insert_header(name, value)?;
            }
        }
        if let Some(backend) = &ctx.backend {
            backend.set_headers(upstream_request)?;
            if let Some(path) = backend.path_for(upstream_request.uri.path()) {
                let uri = match upstream_request.uri.query() {
                    Some(query) => format!("{path}?{query}"),
                    None => path,
                };
                let uri = http::Uri::try_from(uri)
                    .map_err(|e| Error::because(ErrorType::InternalError, "backend path", e))?;
                upstream_request.set_uri(uri);
            }
        }
        if ctx.body_rewritten || ctx.usage_chunk_added || ctx.attempt_body.is_some() {
            let length = ctx.attempt_body.as_ref().unwrap_or(&ctx.body).len();
            upstream_request.remove_header("transfer-encoding");
            upstream_request.insert_static_header("content-length", length.to_string())?;
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // The body was consumed in request_filter; the patched forwarding loop (see
        // vendor/README.md) calls here once at its end, on every attempt, to replay it.
        if end_of_stream && body.is_none() && !ctx.body.is_empty() {
            *body = Some(ctx.attempt_body.clone().unwrap_or_else(|| ctx.body.clone()));
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        upstream_response.insert_static_header("x-request-id", &ctx.request_id)?;
        if let Some(backend) = &ctx.backend {
            upstream_response.insert_static_header("x-sluice-backend", &backend.name)?;
        }
        respond::insert_rate_limit_headers(upstream_response, ctx)?;
        if let Some(status) = ctx.cache_status {
            let status = http::HeaderValue::from_static(status.as_str());
            upstream_response.insert_static_header("x-sluice-cache", status)?;
        }
        let status = upstream_response.status.as_u16();
        let encoded = upstream_response
            .headers
            .contains_key(http::header::CONTENT_ENCODING);
        if status == 200 && !encoded && ctx.cache_plan.is_some() {
            ctx.cache_capture = Some(BytesMut::new());
        }
        if status == 200
            && !encoded
            && ctx
                .identity
                .as_deref()
                .is_some_and(|identity| Datasets::wants(identity, ctx.route, ctx.model.as_deref()))
        {
            ctx.dataset_capture = Some(Capture::default());
        }
        ctx.upstream_status = Some(status);
        if status == 400 && !ctx.fallbacks.is_empty() {
            ctx.refusal = Some(BytesMut::new());
        }
        if let (Some(backend), Some(started)) = (&ctx.backend, ctx.backend_started) {
            if is_gateway_failure(status) {
                self.backend_failed(ctx);
            } else {
                backend.state.succeeded(started.elapsed());
            }
        }
        if self.gateway.config.metering && (200..300).contains(&status) {
            let (meter, resized) =
                Meter::for_answer(&upstream_response.headers, ctx.usage_chunk_added);
            // A priced stream ends with a comment saying what it cost.
            let prices = &self.gateway.config.prices;
            if resized || (meter.is_stream() && respond::is_priced(prices, ctx)) {
                upstream_response.remove_header("content-length");
            }
            let mut meter = meter;
            if ctx
                .model
                .as_deref()
                .is_some_and(|m| self.gateway.tokenizers.get(m).is_some())
            {
                meter.collect_text();
            }
            ctx.meter = Some(meter);
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if ctx.first_byte_at.is_none() && body.as_ref().is_some_and(|b| !b.is_empty()) {
            ctx.first_byte_at = Some(Instant::now());
            if let Some(span) = &ctx.upstream_span {
                span.record(
                    "sluice.time_to_first_byte_ms",
                    ctx.started.elapsed().as_millis() as i64,
                );
            }
        }
        self.gateway.cache.capture(
            &mut ctx.cache_capture,
            &mut ctx.cache_plan,
            ctx.stream,
            body.as_ref(),
            end_of_stream,
        );
        if let (Some(refusal), Some(chunk)) = (ctx.refusal.as_mut(), body.as_ref()) {
            if refusal.len() + chunk.len() <= crate::upstream::MAX_REFUSAL_BYTES {
                refusal.extend_from_slice(chunk);
            }
        }
        if let Some(capture) = ctx.dataset_capture.as_mut() {
            let max_bytes = self.gateway.datasets.config.max_answer_bytes;
            if !capture.add(body.as_ref(), end_of_stream, max_bytes) {
                ctx.dataset_capture = None;
            }
        }
        if let Some(meter) = ctx.meter.as_mut() {
            let is_stream = meter.is_stream();
            if let Some(usage) = meter.pass(body, end_of_stream) {
                ctx.body_done = true;
                ctx.usage = usage;
                if is_stream {
                    if let Some(comment) = respond::cost_comment(&self.gateway.config.prices, ctx) {
                        let end = body.take().unwrap_or_default();
                        *body = Some([end, comment].concat().into());
                    }
                }
            }
        }
        Ok(None)
    }

    /// A priced, non-streamed answer is held until its end (see vendor/README.md, patch 4),
    /// so that its header can say what it cost; a 400 while a fallback is left, so that a
    /// context-length refusal goes to the fallback instead of the client.
    fn hold_response(&self, _session: &Session, ctx: &RequestCtx) -> Option<usize> {
        if ctx.refusal.is_some() {
            return Some(crate::upstream::MAX_REFUSAL_BYTES);
        }
        let json_answer = ctx.meter.as_ref().is_some_and(|m| !m.is_stream());
        (json_answer && respond::is_priced(&self.gateway.config.prices, ctx))
            .then_some(respond::HOLD_FOR_COST_BYTES)
    }

    async fn held_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(refusal) = ctx.refusal.take() {
            if crate::upstream::is_context_length_refusal(&refusal) {
                // Nothing was written: the error below is retried (error_while_proxy), on
                // the next fallback model, since every backend of this one has its limit.
                ctx.route_exhausted = true;
                return Err(Error::explain(
                    ErrorType::HTTPStatus(400),
                    "the prompt is longer than the model's context; falling back",
                ));
            }
        }
        respond::insert_cost_headers(upstream_response, &self.gateway.config.prices, ctx)
    }

    fn keep_reading_after_client_left(
        &self,
        _session: &mut Session,
        _e: &Error,
        ctx: &mut RequestCtx,
    ) -> Option<Duration> {
        // What the backend generates is billed, so its answer is read to the end (bounded).
        let metered = self.gateway.config.metering && ctx.route.is_some_and(Route::is_forwarded);
        ctx.client_left = metered;
        metered.then_some(self.gateway.config.drain_limit)
    }

    fn request_header_timeout(&self) -> Option<Duration> {
        Some(self.gateway.config.header_timeout)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let backend = ctx
            .backend
            .as_ref()
            .map_or("the backend", |b| b.name.as_str());
        let error = ctx
            .error
            .clone()
            .or_else(|| crate::error::upstream_error(e, backend));
        let code = match error {
            Some(error) => {
                // The connection is closed after this answer: say so, or a client may send
                // its next request on it and meet a reset.
                session.set_keepalive(None);
                let status = error.status;
                if let Err(write_error) = respond::json(session, ctx, status, error.body()).await {
                    tracing::debug!(error = %write_error, "could not send error response");
                }
                ctx.error = Some(error);
                status
            }
            None => 0,
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        if let Some(backend) = &ctx.backend {
            backend.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        let metering = traces::child(ctx.span.as_ref(), "metering");
        let metering_entered = metering.enter();
        let model = ctx.model.as_deref().unwrap_or_default();
        ctx.settle_unread_usage(self.gateway.tokenizers.get(model));
        let cost = self.cost(ctx);
        let outcome = ctx.outcome(
            session.req_header().method.as_str(),
            crate::outcome::protocol_name(session.req_header().version),
            status,
            cost,
            e.map(|e| e.to_string()),
        );
        if self.gateway.config.metering {
            if let Some(event) = outcome.usage_event(crate::clock::now_ms()) {
                self.gateway.usage.record(event);
            }
        }
        drop(metering_entered);
        outcome.record_metrics();
        outcome.log();
        traces::finish(ctx.span.clone(), &outcome);
        drop(outcome);
        if let (Some(capture), Some(identity)) = (ctx.dataset_capture.take(), &ctx.identity) {
            let model = ctx.model.as_deref().unwrap_or_default();
            self.gateway.datasets.offer(
                identity,
                &ctx.request_id,
                model,
                ctx.body.clone(),
                capture,
            );
        }
        ctx.span = None;
        ctx.upstream_span = None;
        if let (Some(admitted), Some(identity)) = (ctx.admitted.take(), ctx.identity.clone()) {
            let model = ctx.model.clone().unwrap_or_default();
            if let Some(alerts) = &self.gateway.alerts {
                alerts.note(&identity);
            }
            self.gateway
                .admission
                .settle(identity, model, admitted, ctx.usage);
        }
    }
}

impl Proxy {
    fn retries_left(&self, ctx: &RequestCtx) -> bool {
        ctx.retries < self.gateway.config.balancer.retries || !ctx.fallbacks.is_empty()
    }

    /// Whether this request may go to another backend; counts the retry when it may. Past
    /// the model's retries, the next try is the next fallback model.
    fn may_retry(&self, ctx: &mut RequestCtx) -> bool {
        if ctx.retries < self.gateway.config.balancer.retries {
            ctx.retries += 1;
            return true;
        }
        if !ctx.fallbacks.is_empty() {
            ctx.route_exhausted = true;
            return true;
        }
        false
    }

    /// Moves the request to its next fallback model that the caller may use and some
    /// backend serves; false when none is left. The answer will be that model's, billed at
    /// its price, and not kept in the cache under the model that was asked for.
    fn fall_back(&self, ctx: &mut RequestCtx) -> bool {
        while let Some(model) = ctx.fallbacks.pop_front() {
            let permitted = ctx
                .identity
                .as_ref()
                .is_none_or(|identity| identity.models.permits(&model, None));
            let Some(route) = self.gateway.upstreams.model(&model).filter(|_| permitted) else {
                continue;
            };
            tracing::info!(from = ?ctx.model, to = %model, request_id = %ctx.request_id, "falling back to another model");
            crate::metrics::get().record_fallback(ctx.model.as_deref().unwrap_or(""), &model);
            ctx.model = Some(model);
            ctx.model_route = Some(route);
            ctx.fell_back = true;
            ctx.retries = 0;
            ctx.route_exhausted = false;
            ctx.last_failure = None;
            ctx.cache_plan = None;
            return true;
        }
        false
    }

    /// The body the chosen backend is sent, when it is not the client's as read: the model
    /// named as the backend knows it, after any fallback.
    fn body_for(
        &self,
        ctx: &RequestCtx,
        backend: &crate::upstream::Backend,
    ) -> Result<Option<Bytes>> {
        let Some(model) = ctx.model.as_deref() else {
            return Ok(None);
        };
        let mapped = backend.model_name(model);
        if mapped.is_none() && !ctx.fell_back {
            return Ok(None);
        }
        request::with_model(&ctx.body, mapped.unwrap_or(model))
            .map(Some)
            .map_err(|e| Error::explain(ErrorType::InternalError, e.message))
    }

    /// What the client is told if no other backend is left to retry this request on (after
    /// an attempt that reached a backend).
    fn remember_failure(&self, ctx: &mut RequestCtx, e: &Error) {
        let backend = ctx
            .backend
            .as_ref()
            .map_or("the backend", |b| b.name.as_str());
        if let Some(error) = crate::error::upstream_error(e, backend) {
            ctx.last_failure = Some(error);
        }
    }

    /// Passive health: the current backend failed this request.
    fn backend_failed(&self, ctx: &RequestCtx) {
        let (Some(backend), Some(route)) = (&ctx.backend, &ctx.model_route) else {
            return;
        };
        if route.backend_failed(backend, &self.gateway.config.balancer) {
            tracing::warn!(backend = %backend.name, "backend ejected after consecutive failures");
        }
    }
}

/// 502, 503, 504: the backend (or what stands in front of it) says it cannot serve.
fn is_gateway_failure(status: u16) -> bool {
    matches!(status, 502..=504)
}

/// Whether an error proxying to a backend is the backend's fault, for passive ejection:
/// the connection reset or closed under the answer, or a gateway-failure status. A timeout
/// is not: the backend may be working on a long generation.
fn is_backend_fault(e: &Error, upstream_status: Option<u16>) -> bool {
    use ErrorType::*;
    if upstream_status.is_some_and(is_gateway_failure) {
        return true;
    }
    e.esource() == &pingora_core::ErrorSource::Upstream
        && matches!(
            e.etype(),
            ConnectionClosed
                | ReadError
                | WriteError
                | ConnectError
                | ConnectRefused
                | ConnectTimedout
        )
}
