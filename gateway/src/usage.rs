//! What is a metered request, as billing keeps it? The usage event, and where its figures
//! came from. Only the types: the store keeps them, metering writes them, billing prices them.

use serde::{Deserialize, Serialize};

/// Where a request's billed usage came from: the backend's own report; an estimate from
/// what was sent and received (the backend reported none, or the stream was cut before its
/// usage chunk); or, when nothing could be read, the reservation itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    pub route: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens the backend served from its prompt cache; for an answer from Sluice's
    /// response cache (`cache_status` hit or semantic), every token of it.
    pub cached_tokens: u64,
    /// `miss`, `hit` or `semantic`.
    pub cache_status: String,
    pub status: u16,
    pub latency_ms: u64,
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
