//! How does the gateway answer a request itself? Its own JSON answers and errors, and
//! answers from the response cache, each with the headers every answer carries.

use super::RequestCtx;
use crate::admission::rate_limit_headers;
use crate::cache::answer::Shape;
use crate::cache::Hit;
use crate::metering::Usage;
use bytes::Bytes;
use pingora_core::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use std::time::Instant;

/// An answer the gateway gives without a backend.
pub enum LocalAnswer {
    Json(Bytes),
    Cached(Hit),
}

/// The `x-ratelimit-*` headers (and `Retry-After` for a refusal) this request's answer
/// carries.
pub fn insert_rate_limit_headers(header: &mut ResponseHeader, ctx: &RequestCtx) -> Result<()> {
    let (headers, retry_after) = match (&ctx.refused_headers, &ctx.admitted) {
        (Some((headers, retry_after)), _) => (headers, *retry_after),
        (None, Some(admitted)) => (&admitted.headers, None),
        (None, None) => return Ok(()),
    };
    for (name, value) in rate_limit_headers(headers, retry_after) {
        header.insert_header(name, value)?;
    }
    Ok(())
}

/// An answer the gateway writes itself: JSON, with the request id.
pub async fn json(session: &mut Session, ctx: &RequestCtx, status: u16, body: Bytes) -> Result<()> {
    let mut header = ResponseHeader::build(status, Some(4))?;
    header.insert_header("content-type", "application/json")?;
    header.insert_header("content-length", body.len().to_string())?;
    header.insert_header("x-request-id", &ctx.request_id)?;
    insert_rate_limit_headers(&mut header, ctx)?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// Serves a cached answer in the shape the client asked for, and records it as this
/// request's usage (billed at the cached price).
pub async fn cached(session: &mut Session, ctx: &mut RequestCtx, hit: Hit) -> Result<()> {
    let shape = hit.shape;
    let body = hit
        .answer
        .render(shape, crate::clock::now_sec().max(0) as u64);
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
    insert_rate_limit_headers(&mut header, ctx)?;
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
