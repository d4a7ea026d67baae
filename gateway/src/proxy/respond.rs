//! How does the gateway answer a request itself? Its own JSON answers and errors, and
//! answers from the response cache, each with the headers every answer carries.

use super::RequestCtx;
use crate::admission::rate_limit_headers;
use crate::cache::answer::Shape;
use crate::cache::Hit;
use crate::metering::Usage;
use bytes::Bytes;
use http::HeaderValue;
use pingora_core::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use sluice_policies::PriceBook;
use std::time::Instant;

/// An answer the gateway gives without a backend.
pub enum LocalAnswer {
    Json(Bytes),
    Cached(Hit),
}

/// The `x-ratelimit-*` headers (and `Retry-After` for a refusal) this request's answer
/// carries; a refusal by a limit also names it: `x-sluice-limit: tenant.requests_per_minute`
/// (whose: `key`, `tenant`, `key/MODEL` or `tenant/MODEL`, and the limit).
pub fn insert_rate_limit_headers(header: &mut ResponseHeader, ctx: &RequestCtx) -> Result<()> {
    if let Some((scope, kind)) = &ctx.refused_limit {
        header.insert_static_header("x-sluice-limit", format!("{scope}.{}", kind.name()))?;
    }
    let (headers, retry_after) = match (&ctx.refused_headers, &ctx.admitted) {
        (Some((headers, retry_after)), _) => (headers, *retry_after),
        (None, Some(admitted)) => (&admitted.headers, None),
        (None, None) => return Ok(()),
    };
    for (name, value) in rate_limit_headers(headers, retry_after) {
        header.insert_static_header(name, value)?;
    }
    Ok(())
}

/// Non-streamed answers up to this size are held until their end, so that their header can
/// say what they cost; a larger one (a big batch of embeddings) is passed on as it comes,
/// without the header.
pub const HOLD_FOR_COST_BYTES: usize = 4 << 20;

/// What the request cost, exactly, and in which currency: its usage at the model's first
/// bands. `None` while its usage is unknown, or when the model has no price for its tier.
pub fn cost(prices: &PriceBook, ctx: &RequestCtx) -> Option<(String, String)> {
    let usage = ctx.usage.as_ref()?;
    let tier = ctx.identity.as_ref()?.tier.as_str();
    let model = ctx.model.as_deref()?;
    let (cost, currency) = crate::billing::first_band_cost(prices, model, tier, usage)?;
    Some((cost.normalize().to_string(), currency.to_owned()))
}

/// Whether the request's model has a price for the caller's tier (so its cost can be told).
pub fn is_priced(prices: &PriceBook, ctx: &RequestCtx) -> bool {
    match (&ctx.identity, &ctx.model) {
        (Some(identity), Some(model)) => prices.lookup(model, &identity.tier).is_some(),
        _ => false,
    }
}

/// `x-sluice-cost` (an exact decimal) and `x-sluice-cost-currency`, when the cost is known.
pub fn insert_cost_headers(
    header: &mut ResponseHeader,
    prices: &PriceBook,
    ctx: &RequestCtx,
) -> Result<()> {
    if let Some((cost, currency)) = cost(prices, ctx) {
        header.insert_static_header("x-sluice-cost", cost)?;
        header.insert_static_header("x-sluice-cost-currency", currency)?;
    }
    Ok(())
}

/// The SSE comment a stream ends with, saying what it cost (clients skip comments; a
/// trailer would not reach most of them).
pub fn cost_comment(prices: &PriceBook, ctx: &RequestCtx) -> Option<Bytes> {
    let (cost, currency) = cost(prices, ctx)?;
    Some(Bytes::from(format!(
        ": x-sluice-cost: {cost} {currency}\n\n"
    )))
}

/// An answer the gateway writes itself: JSON, with the request id.
pub async fn json(session: &mut Session, ctx: &RequestCtx, status: u16, body: Bytes) -> Result<()> {
    let mut header = ResponseHeader::build(status, Some(4))?;
    header.insert_static_header("content-type", "application/json")?;
    header.insert_static_header("content-length", body.len().to_string())?;
    header.insert_static_header("x-request-id", &ctx.request_id)?;
    insert_rate_limit_headers(&mut header, ctx)?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// Serves a cached answer in the shape the client asked for, and records it as this
/// request's usage (billed at the cached price).
pub async fn cached(
    session: &mut Session,
    ctx: &mut RequestCtx,
    prices: &PriceBook,
    hit: Hit,
) -> Result<()> {
    let shape = hit.shape;
    let tokens = hit.answer.prompt_tokens + hit.answer.completion_tokens;
    ctx.usage = Some(Usage {
        prompt_tokens: hit.answer.prompt_tokens,
        completion_tokens: hit.answer.completion_tokens,
        cached_tokens: tokens,
        served_from_cache: true,
    });
    let mut body = hit
        .answer
        .render(shape, crate::clock::now_sec().max(0) as u64);
    if let (Shape::Stream { .. }, Some(comment)) = (shape, cost_comment(prices, ctx)) {
        body = [body, comment].concat().into();
    }
    let mut header = ResponseHeader::build(200, Some(8))?;
    let content_type = match shape {
        Shape::Json => "application/json",
        Shape::Stream { .. } => "text/event-stream",
    };
    // Static and numeric values need no copy or parse.
    header.insert_static_header("content-type", HeaderValue::from_static(content_type))?;
    header.insert_static_header("content-length", HeaderValue::from(body.len()))?;
    header.insert_static_header("x-request-id", &ctx.request_id)?;
    header.insert_static_header(
        "x-sluice-cache",
        HeaderValue::from_static(hit.status.as_str()),
    )?;
    if let Some(similarity) = hit.similarity {
        header.insert_static_header("x-sluice-cache-similarity", format!("{similarity:.4}"))?;
    }
    insert_rate_limit_headers(&mut header, ctx)?;
    insert_cost_headers(&mut header, prices, ctx)?;
    ctx.cache_status = Some(hit.status);
    ctx.first_byte_at = Some(Instant::now());
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}
