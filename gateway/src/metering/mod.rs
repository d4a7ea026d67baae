//! How much was that? Reads each response's token usage as it passes to the client, and
//! turns a finished request into a usage event for billing.
//!
//! Nothing here buffers the client's stream: a JSON body is copied aside (bounded) and read
//! at its end; an SSE stream goes through [`sse::SseUsageScanner`].

pub mod events;
mod sse;

pub use sse::SseUsageScanner;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Deserializer, Serialize};

/// A JSON response larger than this is passed on but not read for usage (and counted).
const MAX_JSON_BYTES: usize = 16 << 20;

/// Token usage as OpenAI reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens served from the backend's prompt cache
    /// (`prompt_tokens_details.cached_tokens`); part of `prompt_tokens`.
    pub cached_tokens: u64,
    /// The answer came from Sluice's response cache, not a backend: every token is billed
    /// at the cached price.
    #[serde(skip)]
    pub served_from_cache: bool,
}

impl Usage {
    /// The tokens of each price kind this usage is billed as.
    pub fn billable(&self) -> sluice_policies::TokenCounts {
        if self.served_from_cache {
            return sluice_policies::TokenCounts {
                input: 0,
                output: 0,
                cached: self.prompt_tokens + self.completion_tokens,
            };
        }
        sluice_policies::TokenCounts {
            input: self.prompt_tokens - self.cached_tokens.min(self.prompt_tokens),
            output: self.completion_tokens,
            cached: self.cached_tokens,
        }
    }

    /// The usage a stored event records.
    pub fn of_event(event: &events::UsageEvent) -> Usage {
        Usage {
            prompt_tokens: event.prompt_tokens,
            completion_tokens: event.completion_tokens,
            cached_tokens: event.cached_tokens,
            served_from_cache: event.cache_status != "miss",
        }
    }
}

impl<'de> Deserialize<'de> for Usage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Details {
            #[serde(default)]
            cached_tokens: Option<u64>,
        }
        #[derive(Deserialize)]
        struct Wire {
            #[serde(default)]
            prompt_tokens: Option<u64>,
            #[serde(default)]
            completion_tokens: Option<u64>,
            #[serde(default)]
            prompt_tokens_details: Option<Details>,
        }
        let w = Wire::deserialize(d)?;
        let prompt_tokens = w.prompt_tokens.unwrap_or(0);
        Ok(Usage {
            prompt_tokens,
            completion_tokens: w.completion_tokens.unwrap_or(0),
            cached_tokens: w
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0)
                .min(prompt_tokens),
            served_from_cache: false,
        })
    }
}

/// The usage reader for one response, chosen by its content type.
pub enum Meter {
    Sse(SseUsageScanner),
    Json { body: BytesMut, overflowed: bool },
}

impl Meter {
    pub fn for_response(content_type: Option<&[u8]>, strip_usage_chunk: bool) -> Meter {
        let is_sse = content_type.is_some_and(|ct| ct.starts_with(b"text/event-stream"));
        if is_sse {
            Meter::Sse(SseUsageScanner::new(strip_usage_chunk))
        } else {
            Meter::Json {
                body: BytesMut::new(),
                overflowed: false,
            }
        }
    }

    /// Reads a body chunk; returns what the client gets in its place.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        match self {
            Meter::Sse(scanner) => scanner.feed(chunk),
            Meter::Json { body, overflowed } => {
                if !*overflowed {
                    if body.len() + chunk.len() > MAX_JSON_BYTES {
                        *overflowed = true;
                        *body = BytesMut::new();
                    } else {
                        body.extend_from_slice(&chunk);
                    }
                }
                chunk
            }
        }
    }

    /// The end of the body: anything still held for the client, and the usage read.
    pub fn finish(&mut self) -> (Bytes, Option<Usage>) {
        match self {
            Meter::Sse(scanner) => (scanner.finish(), scanner.usage()),
            Meter::Json { body, overflowed } => {
                #[derive(Deserialize)]
                struct WithUsage {
                    usage: Option<Usage>,
                }
                let usage = if *overflowed {
                    None
                } else {
                    serde_json::from_slice::<WithUsage>(body)
                        .ok()
                        .and_then(|w| w.usage)
                };
                (Bytes::new(), usage)
            }
        }
    }
}

/// The body to send upstream so a stream ends with a usage chunk: unchanged when the client
/// asked for one itself, else with `stream_options.include_usage` set. The common case (no
/// `stream_options` at all) is a splice, not a re-serialisation.
pub fn request_usage_chunk(body: &Bytes, stream_options: Option<&str>) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct Options {
        include_usage: Option<bool>,
    }
    match stream_options {
        None => {
            let open = body.iter().position(|&b| b == b'{')?;
            let rest = &body[open + 1..];
            let empty_object = rest
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|&b| b == b'}');
            let insert: &[u8] = if empty_object {
                br#""stream_options":{"include_usage":true}"#
            } else {
                br#""stream_options":{"include_usage":true},"#
            };
            let mut out = BytesMut::with_capacity(body.len() + insert.len());
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(insert);
            out.extend_from_slice(rest);
            Some(out.freeze())
        }
        Some(raw) => {
            if let Ok(Options {
                include_usage: Some(true),
            }) = serde_json::from_str(raw)
            {
                return None;
            }
            let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
            let options = value
                .as_object_mut()?
                .entry("stream_options")
                .or_insert_with(|| serde_json::json!({}));
            if !options.is_object() {
                *options = serde_json::json!({});
            }
            options["include_usage"] = serde_json::Value::Bool(true);
            Some(Bytes::from(serde_json::to_vec(&value).ok()?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_usage_is_read_at_the_end() {
        let mut meter = Meter::for_response(Some(b"application/json"), true);
        let body =
            br#"{"id":"x","usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}"#;
        let out = meter.feed(Bytes::from_static(&body[..10]));
        assert_eq!(&out[..], &body[..10], "JSON passes through unchanged");
        meter.feed(Bytes::from_static(&body[10..]));
        let (rest, usage) = meter.finish();
        assert!(rest.is_empty());
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 3,
                cached_tokens: 0,
                served_from_cache: false,
            })
        );
    }

    #[test]
    fn embeddings_usage_has_no_completion_tokens() {
        let mut meter = Meter::for_response(Some(b"application/json"), false);
        meter.feed(Bytes::from_static(
            br#"{"data":[],"usage":{"prompt_tokens":7,"total_tokens":7}}"#,
        ));
        assert_eq!(meter.finish().1.unwrap().prompt_tokens, 7);
    }

    #[test]
    fn the_usage_chunk_is_requested_without_disturbing_the_body() {
        let body = Bytes::from_static(br#" {"model":"m","stream":true,"messages":[]}"#);
        let out = request_usage_chunk(&body, None).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");

        let body =
            Bytes::from_static(br#"{"model":"m","stream_options":{"include_usage":false,"x":1}}"#);
        let out = request_usage_chunk(&body, Some(r#"{"include_usage":false,"x":1}"#)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );

        let body = Bytes::from_static(br#"{"model":"m","stream_options":{"include_usage":true}}"#);
        assert!(request_usage_chunk(&body, Some(r#"{"include_usage":true}"#)).is_none());
    }
}
