//! What do we do with a request before any backend sees it? `request_filter`'s questions,
//! in order: which route, who is calling, what they ask for, may they, do we already know
//! the answer, and what the backend must be asked for so that the answer can be metered.

use super::respond::LocalAnswer;
use super::{Proxy, RequestCtx};
use crate::admission::{Counted, Refused};
use crate::auth::Identity;
use crate::cache::CacheStatus;
use crate::error::ApiError;
use crate::metering::request_usage_chunk;
use crate::request::{self, RequestView, Route};
use crate::traces;
use bytes::Bytes;
use pingora_proxy::Session;
use std::sync::Arc;
use tracing::Instrument;

impl Proxy {
    /// What the request cost at the price book's first bands (graduated prices are applied
    /// in billing exports), in nano-units of the currency; 0 and "" when it has no price.
    pub(super) fn cost<'a>(&'a self, ctx: &RequestCtx) -> (i64, &'a str) {
        let tier = ctx.identity.as_ref().map_or("", |i| i.tier.as_str());
        let model = ctx.model.as_deref().unwrap_or("");
        match (ctx.usage, self.gateway.config.prices.lookup(model, tier)) {
            (Some(usage), Some(price)) => (
                self.gateway.admission.cost_nano(model, tier, &usage),
                price.currency(),
            ),
            _ => (0, ""),
        }
    }

    /// `request_filter`'s questions, in order: `Ok(None)` to forward the request,
    /// `Ok(Some(answer))` when the gateway answers it itself, `Err` to refuse it.
    pub(super) async fn take_in(
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
        // Shed before any work: not even a key lookup for a request the replica cannot carry.
        ctx.in_flight = Some(self.gateway.overload.enter()?);
        let authorization = header.headers.get(http::header::AUTHORIZATION);
        let identity = self
            .gateway
            .auth
            .authenticate(authorization.map(|v| v.as_bytes()))
            .instrument(traces::child(ctx.span.as_ref(), "auth"))
            .await?;
        ctx.identity = Some(identity.clone());
        if route == Route::Models {
            return Ok(Some(LocalAnswer::Json(self.gateway.model_list(&identity))));
        }
        // The request rate is checked before the body is read: a key past its rate costs no
        // upload.
        let admission = &self.gateway.admission;
        let counted = admission.count(&identity).map_err(|r| refuse(ctx, *r))?;
        let body = match self.read_request(session, ctx, route, &identity).await {
            Ok(body) => body,
            Err(e) => {
                admission.uncount(&identity, counted);
                return Err(e);
            }
        };
        let view = match RequestView::parse(route, &body)
            .and_then(|view| self.route_to_model(ctx, &view).map(|()| view))
        {
            Ok(view) => view,
            Err(e) => {
                admission.uncount(&identity, counted);
                return Err(e);
            }
        };
        traces::record_request(ctx.span.as_ref(), route, &view);
        self.reserve_quota(ctx, route, &identity, &view, counted)
            .await?;
        if let Some(hit) = self
            .look_up_cache(session, ctx, route, &identity, &view)
            .await
        {
            return Ok(Some(LocalAnswer::Cached(hit)));
        }
        self.ask_for_usage(ctx, route, &view);
        Ok(None)
    }

    /// What are they asking for: the body, read whole (bounded), with an alias resolved to
    /// the model it stands for, and a model outside the caller's lists refused.
    async fn read_request(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        route: Route,
        identity: &Identity,
    ) -> Result<Bytes, ApiError> {
        let config = &self.gateway.config;
        let share = ctx.body_bytes.insert(self.gateway.overload.body_bytes());
        let limits = request::BodyLimits {
            max_bytes: config.max_body_bytes,
            timeout: config.body_read_timeout,
        };
        ctx.body = request::read_body(session, limits, &self.gateway.overload, share).await?;
        let access = &identity.models;
        if config.aliases.is_empty() && access.unrestricted() {
            return Ok(ctx.body.clone());
        }
        let view = RequestView::parse(route, &ctx.body)?;
        let asked = view.model();
        let target = config.resolve_alias(asked, &identity.tier);
        if !access.permits(asked, target) {
            return Err(ApiError::model_not_allowed(asked));
        }
        if target.is_some() {
            // An alias's own fallbacks come before its model's.
            if let Some(fallbacks) = config.fallbacks.get(asked) {
                ctx.fallbacks.extend(fallbacks.iter().cloned());
            }
        }
        if let Some(target) = target {
            ctx.body = request::with_model(&ctx.body, target)?;
            ctx.body_rewritten = true;
        }
        Ok(ctx.body.clone())
    }

    /// Which backends serve the model, and the prompt's prefix for affinity.
    fn route_to_model(&self, ctx: &mut RequestCtx, view: &RequestView) -> Result<(), ApiError> {
        let model = view.model();
        let route = self
            .gateway
            .upstreams
            .model(model)
            .ok_or_else(|| ApiError::model_not_found(model))?;
        ctx.model_route = Some(route);
        ctx.model = Some(model.to_owned());
        if let Some(fallbacks) = self.gateway.config.fallbacks.get(model) {
            for fallback in fallbacks {
                if !ctx.fallbacks.contains(fallback) {
                    ctx.fallbacks.push_back(fallback.clone());
                }
            }
        }
        ctx.stream = view.is_stream();
        let balancer = &self.gateway.config.balancer;
        if balancer.strategy == crate::balancer::Strategy::PrefixAffinity {
            let prompt = view.messages.or(view.prompt).or(view.input);
            ctx.prompt_prefix = crate::balancer::prefix_hash(
                prompt.map_or("", |r| r.get()).as_bytes(),
                balancer.affinity_prefix_bytes,
            );
        }
        Ok(())
    }

    /// May they: the request's reservation, or the refusal with its headers.
    async fn reserve_quota(
        &self,
        ctx: &mut RequestCtx,
        route: Route,
        identity: &Arc<Identity>,
        view: &RequestView<'_>,
        counted: Counted,
    ) -> Result<(), ApiError> {
        let admitting = self
            .gateway
            .admission
            .admit_counted(identity, route, view, counted)
            .instrument(traces::child(ctx.span.as_ref(), "admission"));
        match admitting.await {
            Ok(admitted) => {
                use crate::metrics::AdmissionPath;
                let path = match (&admitted.lease, admitted.local_only) {
                    (_, true) => AdmissionPath::Local,
                    (Some(_), false) => AdmissionPath::Lease,
                    (None, false) => AdmissionPath::Store,
                };
                crate::metrics::get().record_admission(path);
                ctx.admitted = Some(admitted);
                Ok(())
            }
            Err(refused) => Err(refuse(ctx, refused)),
        }
    }

    /// Do we already know the answer: a hit to serve, or, for a miss worth keeping, the
    /// plan to keep its answer by.
    async fn look_up_cache(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        route: Route,
        identity: &Identity,
        view: &RequestView<'_>,
    ) -> Option<crate::cache::Hit> {
        let cache_control = session
            .req_header()
            .headers
            .get(http::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok());
        let include_usage = view.stream_options.is_some_and(|o| {
            serde_json::from_str::<serde_json::Value>(o.get())
                .is_ok_and(|o| o["include_usage"] == serde_json::Value::Bool(true))
        });
        let cache = &self.gateway.cache;
        let mut plan = cache.plan(
            route,
            identity,
            view,
            &ctx.body,
            cache_control,
            include_usage,
        )?;
        let lookup = traces::child(ctx.span.as_ref(), "cache lookup");
        if let Some(hit) = cache.lookup(&mut plan).instrument(lookup).await {
            return Some(hit);
        }
        ctx.cache_status = Some(CacheStatus::Miss);
        if cache.wants(&plan) {
            ctx.cache_plan = Some(plan);
        }
        None
    }

    /// How much will it be: a stream is asked to end with a usage chunk, so that it can be
    /// metered (the chunk is removed again when the client did not ask for it).
    fn ask_for_usage(&self, ctx: &mut RequestCtx, route: Route, view: &RequestView) {
        let streams_text = matches!(route, Route::ChatCompletions | Route::Completions);
        if !(ctx.stream && streams_text && self.gateway.config.metering) {
            return;
        }
        let stream_options = view.stream_options.map(|o| o.get());
        if let Some(body) = request_usage_chunk(&ctx.body, stream_options) {
            ctx.body = body;
            ctx.usage_chunk_added = true;
        }
    }
}

/// A refusal's headers kept for the answer, and its error.
fn refuse(ctx: &mut RequestCtx, refused: Refused) -> ApiError {
    ctx.refused_headers = Some((refused.headers, refused.retry_after_secs));
    ctx.refused_by = Some(refused.limit.map_or("store_unavailable", |l| l.name()));
    ctx.refused_limit = refused.limit.map(|kind| (refused.scope, kind));
    refused.error
}
