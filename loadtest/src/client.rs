//! One request, measured: its outcome, its latency from the scheduled send time, and for
//! streams the time to first token, the gaps between tokens and the tokens produced.

use crate::workload::RequestSpec;
use futures::StreamExt;
use serde::Deserialize;
use std::time::Duration;
use tokio::time::Instant;

/// What one request came to.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub outcome: Outcome,
    pub latency: Duration,
    /// Streams only: scheduled send time to the first event that carries content.
    pub ttft: Option<Duration>,
    /// Streams only: the gaps between consecutive content events.
    pub inter_token: Vec<Duration>,
    /// From the usage block when there is one, else the content events counted.
    pub output_tokens: u64,
    /// From the first content event to the end, for tokens per second.
    pub generation_time: Option<Duration>,
    /// The `x-sluice-cache` header, when present.
    pub cache: Option<String>,
    /// Whether any `x-ratelimit-*` header came back.
    pub rate_limit_headers: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Ok,
    /// A non-2xx answer, with the OpenAI error `code` when the body has one.
    Http {
        status: u16,
        code: Option<String>,
    },
    /// No HTTP answer: connect error, timeout, reset, or a stream that broke.
    Transport(String),
}

#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    choices: Vec<EventChoice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct EventChoice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: Option<String>,
}

fn transport(e: &reqwest::Error) -> Outcome {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    };
    Outcome::Transport(kind.to_owned())
}

/// Sends `spec` to `base_url` and measures it against `scheduled`.
pub async fn send(
    http: &reqwest::Client,
    base_url: &str,
    spec: &RequestSpec,
    key: Option<&str>,
    scheduled: Instant,
) -> Sample {
    let mut sample = Sample {
        outcome: Outcome::Ok,
        latency: Duration::ZERO,
        ttft: None,
        inter_token: Vec::new(),
        output_tokens: 0,
        generation_time: None,
        cache: None,
        rate_limit_headers: false,
    };
    let mut request = http
        .post(format!("{base_url}{}", spec.path))
        .header("content-type", "application/json")
        .body(spec.body.clone());
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            sample.outcome = transport(&e);
            sample.latency = scheduled.elapsed();
            return sample;
        }
    };
    let status = response.status().as_u16();
    let headers = response.headers();
    sample.cache = headers
        .get("x-sluice-cache")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    sample.rate_limit_headers = headers
        .keys()
        .any(|k| k.as_str().starts_with("x-ratelimit-"));

    if !(200..300).contains(&status) {
        let body = response.bytes().await.unwrap_or_default();
        let code = serde_json::from_slice::<ErrorBody>(&body)
            .ok()
            .and_then(|e| e.error.code);
        sample.outcome = Outcome::Http { status, code };
        sample.latency = scheduled.elapsed();
        return sample;
    }

    if spec.stream {
        read_stream(response, scheduled, &mut sample).await;
    } else {
        match response.bytes().await {
            Ok(body) => {
                sample.output_tokens = serde_json::from_slice::<Event>(&body)
                    .ok()
                    .and_then(|e| e.usage)
                    .and_then(|u| u.completion_tokens)
                    .unwrap_or(0);
            }
            Err(e) => sample.outcome = transport(&e),
        }
    }
    sample.latency = scheduled.elapsed();
    sample
}

async fn read_stream(response: reqwest::Response, scheduled: Instant, sample: &mut Sample) {
    let mut body = response.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut content_events = 0u64;
    let mut usage_tokens = None;
    let mut first_token: Option<Instant> = None;
    let mut last_token: Option<Instant> = None;
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                sample.outcome = transport(&e);
                break;
            }
        };
        let now = Instant::now();
        pending.extend_from_slice(&chunk);
        while let Some(end) = find_event_end(&pending) {
            let event: Vec<u8> = pending.drain(..end).collect();
            let Some(data) = event_data(&event) else {
                continue;
            };
            if data == b"[DONE]" {
                continue;
            }
            let Ok(event) = serde_json::from_slice::<Event>(data) else {
                continue;
            };
            if let Some(tokens) = event.usage.and_then(|u| u.completion_tokens) {
                usage_tokens = Some(tokens);
            }
            let has_content = event.choices.iter().any(|c| {
                c.delta
                    .as_ref()
                    .and_then(|d| d.content.as_deref())
                    .is_some_and(|t| !t.is_empty())
                    || c.text.as_deref().is_some_and(|t| !t.is_empty())
            });
            if has_content {
                content_events += 1;
                match last_token {
                    None => {
                        sample.ttft = Some(now - scheduled);
                        first_token = Some(now);
                    }
                    Some(previous) => sample.inter_token.push(now - previous),
                }
                last_token = Some(now);
            }
        }
    }
    sample.output_tokens = usage_tokens.unwrap_or(content_events);
    sample.generation_time = first_token.map(|first| Instant::now() - first);
}

/// The end (exclusive, blank line included) of the first complete SSE event in `buf`.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The `data:` payload of one event (single-line data, which is what OpenAI streams use).
fn event_data(event: &[u8]) -> Option<&[u8]> {
    event
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .find_map(|line| line.strip_prefix(b"data:"))
        .map(|d| d.strip_prefix(b" ").unwrap_or(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_on_blank_lines_of_either_style() {
        assert_eq!(find_event_end(b"data: a\n\ndata: b"), Some(9));
        assert_eq!(find_event_end(b"data: a\r\n\r\n"), Some(11));
        assert_eq!(find_event_end(b"data: a\n"), None);
        assert_eq!(
            event_data(b"event: x\ndata: {\"a\":1}\n\n"),
            Some(&b"{\"a\":1}"[..])
        );
        assert_eq!(event_data(b": comment\n\n"), None);
    }
}
