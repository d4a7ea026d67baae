//! What is a metered request, as billing keeps it? The usage event, and where its figures
//! came from. Only the types: the store keeps them, metering writes them, billing prices them.

use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// Where a request's billed usage came from: the backend's own report; an estimate from
/// what was sent and received (the backend reported none, or the stream was cut before its
/// usage chunk); or, when nothing could be read, the reservation itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum UsageSource {
    #[default]
    Reported,
    Estimated,
    Reserved,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Estimated => "estimated",
            UsageSource::Reserved => "reserved",
        }
    }
}

/// One metered request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageEvent {
    /// UUIDv7: unique, and ordered by time.
    pub id: String,
    /// Unix milliseconds when the request finished.
    pub time_ms: i64,
    pub request_id: String,
    pub key_id: String,
    pub tenant: String,
    pub tier: String,
    pub model: String,
    pub backend: String,
    /// Static names, so borrowed when an event is made (`Cow`): two allocations fewer per
    /// request, and owned when one is read back.
    pub route: Cow<'static, str>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens the backend served from its prompt cache; for an answer from Sluice's
    /// response cache (`cache_status` hit or semantic), every token of it.
    pub cached_tokens: u64,
    /// `miss`, `hit` or `semantic`.
    pub cache_status: Cow<'static, str>,
    pub status: u16,
    pub latency_ms: u64,
    /// Milliseconds to the first token of a stream; `null` otherwise.
    #[schema(required)]
    pub ttft_ms: Option<u64>,
    /// The client hung up before the response ended; the usage is what the backend reported
    /// after the gateway read its response to the end.
    pub client_disconnected: bool,
    /// False when the backend's usage could not be read (see `usage_source`).
    pub usage_reported: bool,
    /// `reported` (the backend's own figures), `estimated` (from what was sent and
    /// received) or `reserved` (nothing could be read: billed at the reservation).
    #[serde(default)]
    pub usage_source: UsageSource,
}

#[cfg(test)]
impl UsageEvent {
    /// A plain answered chat request of `key` at `time_ms` (its id is `{key}-{time_ms}`).
    pub fn for_test(key: &str, model: &str, time_ms: i64, prompt: u64, completion: u64) -> Self {
        UsageEvent {
            id: format!("{key}-{time_ms}"),
            time_ms,
            request_id: String::new(),
            key_id: key.into(),
            tenant: "t".into(),
            tier: "pro".into(),
            model: model.into(),
            backend: "b".into(),
            route: "chat_completions".into(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: 0,
            cache_status: "miss".into(),
            status: 200,
            latency_ms: 1,
            ttft_ms: None,
            client_disconnected: false,
            usage_reported: true,
            usage_source: UsageSource::Reported,
        }
    }
}
