//! The proxy: pingora's request phases, each handing its question to the module that answers
//! it. The phases orchestrate; they hold no policy.
//!
//! 1. `request_filter`: which route (request), who is calling (auth), what they ask for
//!    (request: the body is read here, bounded, and parsed into a borrowed view), may they
//!    (admission), and do we already know the answer (cache: a hit is answered here).
//! 2. `upstream_peer`: which backend (upstream).
//! 3. `upstream_request_filter` / `request_body_filter`: the request as the backend sees it:
//!    the client's credential removed, the body read in step 1 replayed.
//! 4. `response_filter` / `response_body_filter`: the headers every answer carries; the
//!    usage read as the body passes (metering); a cacheable answer copied aside (cache).
//! 5. `fail_to_proxy` / `logging`: errors in OpenAI's shape; the usage event and one
//!    access-log line.

use crate::admission::Admitted;
use crate::app::Gateway;
use crate::auth::Identity;
use crate::cache::answer::{CachedAnswer, Shape};
use crate::cache::{CacheStatus, Hit, Plan};
use crate::error::ApiError;
use crate::metering::{request_usage_chunk, Meter, Usage, UsageSource};
use crate::request::{RequestView, Route};
use crate::traces;
use crate::upstream::{Backend, ModelRoute};
use crate::usage::UsageEvent;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

pub struct Proxy {
    gateway: Arc<Gateway>,
}

impl Proxy {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Proxy { gateway }
    }
}

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
    /// When the current backend was chosen: its latency sample starts here.
    pub backend_started: Option<Instant>,
    /// The backend's response status, once its header arrived.
    pub upstream_status: Option<u16>,
    pub meter: Option<Meter>,
    /// The backend's answer ended (its last byte passed `response_body_filter`).
    pub body_done: bool,
    pub usage: Option<Usage>,
    /// Where `usage` came from (see `read_usage`).
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
    /// Set when the gateway refuses the request itself, for `fail_to_proxy` and the log.
    pub error: Option<ApiError>,
    /// The cache's business with this request: how it was answered, and, for a miss whose
    /// answer may be kept, the plan and the answer's bytes as they pass.
    pub cache_status: Option<CacheStatus>,
    pub cache_plan: Option<Plan>,
    pub cache_capture: Option<BytesMut>,
    /// The request's exported span and its current upstream attempt's, when trace export is
    /// on (see sluice-telemetry); `None` costs nothing.
    pub span: Option<tracing::Span>,
    pub upstream_span: Option<tracing::Span>,
    pub started: Instant,
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
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
            error: None,
            cache_status: None,
            cache_plan: None,
            cache_capture: None,
            span: None,
            upstream_span: None,
            started: Instant::now(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.request_id = request_id(&session.req_header().headers);
        ctx.span = traces::request_span(session.req_header(), &ctx.request_id);
        match self.admit(session, ctx).await {
            Ok(Some(LocalAnswer::Json(body))) => {
                respond(session, ctx, 200, body).await?;
                Ok(true)
            }
            Ok(Some(LocalAnswer::Cached(hit))) => {
                respond_from_cache(session, ctx, hit).await?;
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(error) => {
                // An unread body would be taken for the next request on this connection.
                let body_pending = !session.is_body_done();
                if body_pending {
                    session.set_keepalive(None);
                }
                let body = error.body();
                let status = error.status;
                ctx.error = Some(error);
                respond(session, ctx, status, body).await?;
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
        let config = &self.gateway.config.balancer;
        let model = ctx.model.as_deref().unwrap_or_default();
        let Some(backend) = ctx.model_route.as_ref().and_then(|r| {
            r.pick(
                config.strategy,
                &ctx.tried,
                ctx.prompt_prefix,
                config.affinity_load_factor,
            )
        }) else {
            let total = ctx.model_route.as_ref().map_or(0, |r| r.backends.len());
            ctx.error = Some(ApiError::unavailable(format!(
                "No backend is serving model `{model}` right now: {} of {total} tried, the rest down, ejected or draining.",
                ctx.tried.len()
            )));
            return Err(Error::explain(
                ErrorType::HTTPStatus(503),
                "no backend for model",
            ));
        };
        backend.state.in_flight.fetch_add(1, Ordering::Relaxed);
        ctx.upstream_span = traces::upstream_span(ctx.span.as_ref(), &backend, ctx.retries);
        let mut peer = HttpPeer::new(backend.addr, false, String::new());
        peer.options.connection_timeout = Some(Duration::from_millis(config.connect_timeout_ms));
        peer.options.read_timeout = Some(Duration::from_secs(config.read_timeout_secs));
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
        if e.esource() == &pingora_core::ErrorSource::Upstream
            || ctx.upstream_status.is_some_and(|s| s >= 500)
        {
            self.backend_failed(ctx);
        }
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
        if matches!(status, 502 | 503) && self.retries_left(ctx) {
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
        // The client's credential is for the gateway; backends never see it.
        upstream_request.remove_header("authorization");
        if self.gateway.config.metering {
            // A compressed answer could not be read for usage.
            upstream_request.remove_header("accept-encoding");
        }
        upstream_request.insert_header("x-request-id", &ctx.request_id)?;
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
            upstream_request.insert_header("host", backend.addr.to_string())?;
        }
        if ctx.body_rewritten || ctx.usage_chunk_added {
            upstream_request.remove_header("transfer-encoding");
            upstream_request.insert_header("content-length", ctx.body.len().to_string())?;
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
            *body = Some(ctx.body.clone());
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        upstream_response.insert_header("x-request-id", &ctx.request_id)?;
        if let Some(backend) = &ctx.backend {
            upstream_response.insert_header("x-sluice-backend", &backend.name)?;
        }
        if let Some(admitted) = &ctx.admitted {
            rate_limit_headers(upstream_response, &admitted.headers, None)?;
        }
        if let Some(status) = ctx.cache_status {
            upstream_response.insert_header("x-sluice-cache", status.as_str())?;
        }
        let status = upstream_response.status.as_u16();
        let encoded = upstream_response
            .headers
            .contains_key(http::header::CONTENT_ENCODING);
        if status == 200 && !encoded && ctx.cache_plan.is_some() {
            ctx.cache_capture = Some(BytesMut::new());
        }
        ctx.upstream_status = Some(status);
        if let (Some(backend), Some(started)) = (&ctx.backend, ctx.backend_started) {
            if status < 500 {
                backend.state.succeeded(started.elapsed());
            } else {
                backend.state.failed(&self.gateway.config.balancer);
            }
        }
        if self.gateway.config.metering && (200..300).contains(&status) {
            let content_type = upstream_response
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.as_bytes());
            let meter = if encoded {
                Meter::Unreadable
            } else {
                Meter::for_response(content_type, ctx.usage_chunk_added)
            };
            if ctx.usage_chunk_added && matches!(meter, Meter::Sse(_)) {
                // The body may shrink by the removed chunk.
                upstream_response.remove_header("content-length");
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
        self.copy_for_cache(body.as_ref(), end_of_stream, ctx);
        if let Some(meter) = ctx.meter.as_mut() {
            if let Some(chunk) = body.take() {
                *body = Some(meter.feed(chunk));
            }
            if end_of_stream {
                ctx.body_done = true;
                let (rest, usage) = meter.finish();
                ctx.usage = usage;
                if !rest.is_empty() {
                    let mut joined = BytesMut::from(body.take().unwrap_or_default());
                    joined.extend_from_slice(&rest);
                    *body = Some(joined.freeze());
                }
            }
        }
        Ok(None)
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

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let error = ctx.error.clone().or_else(|| upstream_error(e, ctx));
        let code = match error {
            Some(error) => {
                let status = error.status;
                if let Err(write_error) = respond(session, ctx, status, error.body()).await {
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
        if let Some(backend) = ctx.backend.take() {
            backend.state.in_flight.fetch_sub(1, Ordering::Relaxed);
            ctx.backend = Some(backend);
        }
        let metering = traces::child(ctx.span.as_ref(), "metering");
        let metering_entered = metering.enter();
        read_usage(ctx);
        if let Some(event) = self.usage_event(ctx) {
            self.gateway.usage.record(event);
        }
        if let (Some(admitted), Some(identity)) = (ctx.admitted.take(), ctx.identity.clone()) {
            self.gateway.admission.settle(
                identity,
                ctx.model.clone().unwrap_or_default(),
                admitted,
                ctx.usage,
            );
        }
        let (cost_nano, currency) = self.request_cost(ctx);
        drop(metering_entered);
        self.record_metrics(status, ctx, cost_nano, currency);
        traces::finish(ctx, status);
        let identity = ctx.identity.as_ref();
        tracing::info!(
            target: "sluice::access",
            request_id = %ctx.request_id,
            method = %session.req_header().method,
            route = ctx.route.map_or("unknown", Route::name),
            status,
            key_id = identity.map_or("", |i| i.key_id.as_str()),
            tenant = identity.map_or("", |i| i.tenant.as_str()),
            tier = identity.map_or("", |i| i.tier.as_str()),
            model = ctx.model.as_deref().unwrap_or(""),
            stream = ctx.stream,
            backend = ctx.backend.as_ref().map_or("", |b| b.name.as_str()),
            prompt_tokens = ctx.usage.map_or(0, |u| u.prompt_tokens),
            completion_tokens = ctx.usage.map_or(0, |u| u.completion_tokens),
            cached_tokens = ctx.usage.map_or(0, |u| u.cached_tokens),
            cost = %rust_decimal::Decimal::new(cost_nano, 9).normalize(),
            currency,
            client_left = ctx.client_left,
            cache = ctx.cache_status.map_or("", CacheStatus::as_str),
            duration_ms = ctx.started.elapsed().as_millis() as u64,
            first_byte_ms = ctx.first_byte_at.map(|t| (t - ctx.started).as_millis() as u64),
            retries = ctx.retries,
            error = e.map(|e| e.to_string()),
            "request"
        );
    }
}

impl Proxy {
    fn retries_left(&self, ctx: &RequestCtx) -> bool {
        ctx.retries < self.gateway.config.balancer.retries
    }

    /// Whether this request may go to another backend; counts the retry when it may.
    fn may_retry(&self, ctx: &mut RequestCtx) -> bool {
        let may = self.retries_left(ctx);
        if may {
            ctx.retries += 1;
        }
        may
    }

    /// Passive health: the current backend failed this request.
    fn backend_failed(&self, ctx: &RequestCtx) {
        if let Some(backend) = &ctx.backend {
            if backend.state.failed(&self.gateway.config.balancer) {
                tracing::warn!(backend = %backend.name, "backend ejected after consecutive failures");
            }
        }
    }

    /// The usage event of a request a backend answered; `None` for everything else.
    fn usage_event(&self, ctx: &RequestCtx) -> Option<UsageEvent> {
        if !self.gateway.config.metering {
            return None;
        }
        let served_from_cache = matches!(
            ctx.cache_status,
            Some(CacheStatus::Hit | CacheStatus::Semantic)
        );
        let status = match ctx.upstream_status {
            Some(status) => status,
            None if served_from_cache => 200,
            None => return None,
        };
        let identity = ctx.identity.as_ref()?;
        let usage = ctx.usage.unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Some(UsageEvent {
            id: uuid::Uuid::now_v7().to_string(),
            time_ms: now,
            request_id: ctx.request_id.clone(),
            key_id: identity.key_id.clone(),
            tenant: identity.tenant.clone(),
            tier: identity.tier.clone(),
            model: ctx.model.clone().unwrap_or_default(),
            backend: ctx
                .backend
                .as_ref()
                .map(|b| b.name.clone())
                .unwrap_or_default(),
            route: ctx.route.map_or("", Route::name).to_owned(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_tokens: usage.cached_tokens,
            cache_status: ctx
                .cache_status
                .unwrap_or(CacheStatus::Miss)
                .as_str()
                .to_owned(),
            status,
            latency_ms: ctx.started.elapsed().as_millis() as u64,
            ttft_ms: ctx
                .first_byte_at
                .map(|t| (t - ctx.started).as_millis() as u64),
            client_disconnected: ctx.client_left,
            usage_reported: ctx.usage_source == UsageSource::Reported,
            usage_source: ctx.usage_source,
        })
    }

    /// What the request cost at the price book's first bands (graduated prices are applied
    /// in billing exports), in nano-units of the currency; 0 and "" when it has no price.
    fn request_cost(&self, ctx: &RequestCtx) -> (i64, &str) {
        let tier = ctx.identity.as_ref().map_or("", |i| i.tier.as_str());
        let model = ctx.model.as_deref().unwrap_or("");
        let prices = &self.gateway.config.prices;
        match (ctx.usage, prices.lookup(model, tier)) {
            (Some(usage), Some(price)) => (
                crate::billing::settled_cost_nano(prices, model, tier, &usage),
                price.currency(),
            ),
            _ => (0, ""),
        }
    }

    fn record_metrics(&self, status: u16, ctx: &RequestCtx, cost_nano: i64, currency: &str) {
        let tier = ctx.identity.as_ref().map_or("", |i| i.tier.as_str());
        let model = ctx.model.as_deref().unwrap_or("");
        let usage = ctx.usage.unwrap_or_default();
        crate::metrics::get().record_request(&crate::metrics::RequestRecord {
            route: ctx.route.map_or("unknown", Route::name),
            model,
            tier,
            status,
            cache: ctx.cache_status.map_or("", CacheStatus::as_str),
            duration: ctx.started.elapsed(),
            first_byte: ctx.first_byte_at.map(|t| t - ctx.started),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_tokens: usage.cached_tokens,
            cost_nano,
            currency,
            refused_by: ctx.refused_by,
        });
    }

    /// Copies a cacheable answer aside as it passes, and keeps it once it is complete.
    fn copy_for_cache(&self, body: Option<&Bytes>, end_of_stream: bool, ctx: &mut RequestCtx) {
        let Some(copy) = ctx.cache_capture.as_mut() else {
            return;
        };
        if let Some(chunk) = body {
            if copy.len() + chunk.len() > self.gateway.cache.max_entry_bytes() {
                ctx.cache_capture = None;
                return;
            }
            copy.extend_from_slice(chunk);
        }
        if !end_of_stream {
            return;
        }
        let (Some(copy), Some(plan)) = (ctx.cache_capture.take(), ctx.cache_plan.take()) else {
            return;
        };
        let answer = if ctx.stream {
            CachedAnswer::from_stream(plan.route, &copy)
        } else {
            CachedAnswer::from_json(plan.route, &copy)
        };
        if let Some(answer) = answer {
            self.gateway.cache.keep(plan, answer);
        }
    }

    /// Decides whether the request goes on: `Ok(None)` to forward it, `Ok(Some(answer))` when
    /// the gateway answers it itself, `Err` to refuse it.
    async fn admit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Option<LocalAnswer>, ApiError> {
        let header = session.req_header();
        let route = Route::resolve(&header.method, header.uri.path())?;
        ctx.route = Some(route);
        if route == Route::Health {
            return Ok(Some(LocalAnswer::Json(Bytes::from_static(
                b"{\"status\":\"ok\"}",
            ))));
        }
        let authorization = header.headers.get(http::header::AUTHORIZATION);
        let identity = self
            .gateway
            .auth
            .authenticate(authorization.map(|v| v.as_bytes()))
            .instrument(traces::child(ctx.span.as_ref(), "auth"))
            .await?;
        ctx.identity = Some(identity);
        if route == Route::Models {
            return Ok(Some(LocalAnswer::Json(self.gateway.model_list())));
        }

        ctx.body = read_body(session, self.gateway.config.max_body_bytes).await?;
        let route_kind = route;
        if !self.gateway.config.aliases.is_empty() {
            // An alias names a model per tier: the backend is sent the model it stands for.
            let tier = ctx.identity.as_ref().map_or("", |i| i.tier.as_str());
            let view = RequestView::parse(route, &ctx.body)?;
            if let Some(target) = self.gateway.config.resolve_alias(view.model(), tier) {
                let target = target.to_owned();
                ctx.body = with_model(&ctx.body, &target)?;
                ctx.body_rewritten = true;
            }
        }
        let view = RequestView::parse(route, &ctx.body)?;
        let model = view.model();
        let route = self
            .gateway
            .upstreams
            .model(model)
            .ok_or_else(|| ApiError::model_not_found(model))?;
        ctx.model_route = Some(route);
        ctx.model = Some(model.to_owned());
        if self.gateway.config.balancer.strategy == crate::balancer::Strategy::PrefixAffinity {
            let prompt = view
                .messages
                .or(view.prompt)
                .or(view.input)
                .map_or("", |r| r.get());
            ctx.prompt_prefix = crate::balancer::prefix_hash(
                prompt.as_bytes(),
                self.gateway.config.balancer.affinity_prefix_bytes,
            );
        }
        ctx.stream = view.is_stream();
        let identity = ctx.identity.clone().expect("authenticated above");
        traces::record_request(ctx.span.as_ref(), route_kind, &view);
        let admitting = self
            .gateway
            .admission
            .admit(&identity, route_kind, &view)
            .instrument(traces::child(ctx.span.as_ref(), "admission"));
        match admitting.await {
            Ok(admitted) => {
                let path = match (&admitted.lease, admitted.local_only) {
                    (_, true) => "local",
                    (Some(_), false) => "lease",
                    (None, false) => "store",
                };
                crate::metrics::get().record_admission(path);
                ctx.admitted = Some(admitted);
            }
            Err(refused) => {
                ctx.refused_headers = Some((refused.headers, refused.retry_after_secs));
                ctx.refused_by = Some(refused.limit.map_or("store_unavailable", |l| l.name()));
                return Err(refused.error);
            }
        }
        let cache_control = session
            .req_header()
            .headers
            .get(http::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok());
        let include_usage = view.stream_options.is_some_and(|o| {
            serde_json::from_str::<serde_json::Value>(o.get())
                .is_ok_and(|o| o["include_usage"] == serde_json::Value::Bool(true))
        });
        if let Some(mut plan) = self.gateway.cache.plan(
            route_kind,
            &identity,
            &ctx.body,
            cache_control,
            include_usage,
        ) {
            let lookup = traces::child(ctx.span.as_ref(), "cache lookup");
            if let Some(hit) = self
                .gateway
                .cache
                .lookup(&mut plan)
                .instrument(lookup)
                .await
            {
                return Ok(Some(LocalAnswer::Cached(hit)));
            }
            ctx.cache_status = Some(CacheStatus::Miss);
            if self.gateway.cache.wants(&plan) {
                ctx.cache_plan = Some(plan);
            }
        }
        let streams_text = matches!(route_kind, Route::ChatCompletions | Route::Completions);
        if ctx.stream && streams_text && self.gateway.config.metering {
            let stream_options = view.stream_options.map(|o| o.get().to_owned());
            if let Some(body) = request_usage_chunk(&ctx.body, stream_options.as_deref()) {
                ctx.body = body;
                ctx.usage_chunk_added = true;
            }
        }
        Ok(None)
    }
}

/// Settles what a backend's 2xx answer used when its usage could not be read (a body past
/// the copy bound, a stream cut off before its usage chunk, a compressed body, a backend
/// that reports none): an estimate from what passed, or the reservation. Never zero.
fn read_usage(ctx: &mut RequestCtx) {
    if ctx.usage.is_some() || !ctx.upstream_status.is_some_and(|s| (200..300).contains(&s)) {
        return;
    }
    let (Some(meter), Some(admitted)) = (ctx.meter.as_mut(), ctx.admitted.as_ref()) else {
        return;
    };
    if !ctx.body_done {
        // Cut off: what is held of the last event is read too.
        ctx.body_done = true;
        if let (_, Some(usage)) = meter.finish() {
            ctx.usage = Some(usage);
            return;
        }
    }
    let (usage, source) = meter.estimate(admitted.ceiling);
    ctx.usage = Some(usage);
    ctx.usage_source = source;
}

/// An answer the gateway gives without a backend.
enum LocalAnswer {
    Json(Bytes),
    Cached(Hit),
}

/// Serves a cached answer in the shape the client asked for, and records it as this
/// request's usage (billed at the cached price).
async fn respond_from_cache(session: &mut Session, ctx: &mut RequestCtx, hit: Hit) -> Result<()> {
    let shape = hit.shape;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let body = hit.answer.render(shape, now);
    let mut header = ResponseHeader::build(200, Some(8))?;
    let content_type = match shape {
        Shape::Json => "application/json",
        Shape::Stream { .. } => "text/event-stream",
    };
    header.insert_header("content-type", content_type)?;
    header.insert_header("content-length", body.len().to_string())?;
    header.insert_header("x-request-id", &ctx.request_id)?;
    header.insert_header("x-sluice-cache", hit.status.as_str())?;
    if let Some(similarity) = hit.similarity {
        header.insert_header("x-sluice-cache-similarity", format!("{similarity:.4}"))?;
    }
    if let Some(admitted) = &ctx.admitted {
        rate_limit_headers(&mut header, &admitted.headers, None)?;
    }
    ctx.cache_status = Some(hit.status);
    let tokens = hit.answer.prompt_tokens + hit.answer.completion_tokens;
    ctx.usage = Some(Usage {
        prompt_tokens: hit.answer.prompt_tokens,
        completion_tokens: hit.answer.completion_tokens,
        cached_tokens: tokens,
        served_from_cache: true,
    });
    ctx.first_byte_at = Some(Instant::now());
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// The body with its `model` replaced (an alias resolved).
fn with_model(body: &Bytes, model: &str) -> Result<Bytes, ApiError> {
    let mut value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}.")))?;
    if let Some(object) = value.as_object_mut() {
        object.insert(
            "model".to_owned(),
            serde_json::Value::String(model.to_owned()),
        );
    }
    Ok(Bytes::from(
        serde_json::to_vec(&value).expect("JSON re-serializes"),
    ))
}

/// Reads the whole request body, refusing it past `limit` bytes.
async fn read_body(session: &mut Session, limit: usize) -> Result<Bytes, ApiError> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::body_too_large(limit));
    }
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        // The client waits for this before sending a large body (curl does).
        session
            .write_continue_response()
            .await
            .map_err(|e| ApiError::bad_request(format!("Could not read the request body: {e}")))?;
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(0));
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(ApiError::body_too_large(limit));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body.freeze()),
            Err(e) => {
                return Err(ApiError::bad_request(format!(
                    "Could not read the request body: {e}"
                )))
            }
        }
    }
}

/// The client's `x-request-id` when it is a sane token, else a fresh UUIDv7.
pub fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned)
}

/// OpenAI's `x-ratelimit-*` headers (for the limits the key has), and `Retry-After`.
fn rate_limit_headers(
    header: &mut ResponseHeader,
    h: &sluice_policies::quota::RateHeaders,
    retry_after: Option<u64>,
) -> Result<()> {
    use sluice_policies::quota::reset_duration;
    let pairs = [
        (
            "x-ratelimit-limit-requests",
            h.limit_requests.map(|v| v.to_string()),
        ),
        (
            "x-ratelimit-remaining-requests",
            h.remaining_requests.map(|v| v.to_string()),
        ),
        (
            "x-ratelimit-reset-requests",
            h.reset_requests_secs.map(reset_duration),
        ),
        (
            "x-ratelimit-limit-tokens",
            h.limit_tokens.map(|v| v.to_string()),
        ),
        (
            "x-ratelimit-remaining-tokens",
            h.remaining_tokens.map(|v| v.to_string()),
        ),
        (
            "x-ratelimit-reset-tokens",
            h.reset_tokens_secs.map(reset_duration),
        ),
        ("retry-after", retry_after.map(|v| v.to_string())),
    ];
    for (name, value) in pairs {
        if let Some(value) = value {
            header.insert_header(name, value)?;
        }
    }
    Ok(())
}

/// An answer the gateway writes itself: JSON, with the request id.
async fn respond(session: &mut Session, ctx: &RequestCtx, status: u16, body: Bytes) -> Result<()> {
    let mut header = ResponseHeader::build(status, Some(4))?;
    header.insert_header("content-type", "application/json")?;
    header.insert_header("content-length", body.len().to_string())?;
    header.insert_header("x-request-id", &ctx.request_id)?;
    if let Some((headers, retry_after)) = &ctx.refused_headers {
        rate_limit_headers(&mut header, headers, *retry_after)?;
    } else if let Some(admitted) = &ctx.admitted {
        rate_limit_headers(&mut header, &admitted.headers, None)?;
    }
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// What the client is told when forwarding failed; `None` when the client is gone.
fn upstream_error(e: &Error, ctx: &RequestCtx) -> Option<ApiError> {
    use ErrorType::*;
    let backend = ctx
        .backend
        .as_ref()
        .map_or("the backend", |b| b.name.as_str());
    Some(match e.etype() {
        HTTPStatus(code) => ApiError::internal(format!("Request failed with status {code}.")),
        ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure
        | BindError | SocketError => ApiError::bad_gateway(format!(
            "Backend {backend} is unreachable ({}).",
            e.etype().as_str()
        )),
        ReadTimedout | WriteTimedout => {
            ApiError::gateway_timeout(format!("Backend {backend} did not answer in time."))
        }
        _ if e.esource() == &pingora_core::ErrorSource::Downstream => return None,
        _ => ApiError::bad_gateway(format!("Backend {backend} failed: {}.", e.etype().as_str())),
    })
}
