//! A cached answer: read from a backend's response (JSON or a stream), kept in one form, and
//! written back in whichever shape the next client asks for.
//!
//! Only complete answers are kept: status 200, one choice, plain text, finish reason `stop`
//! or `length`, and for a stream, its `[DONE]`.

use crate::request::Route;
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedAnswer {
    /// `chat_completions` or `completions`.
    pub route: String,
    pub model: String,
    pub text: String,
    pub finish_reason: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    #[serde(default)]
    pub system_fingerprint: Option<String>,
}

/// How a cached answer is served: as one JSON body or as server-sent events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Json,
    Stream { include_usage: bool },
}

impl CachedAnswer {
    /// Reads a whole (non-streamed) JSON response.
    pub fn from_json(route: Route, body: &[u8]) -> Option<CachedAnswer> {
        let response: Value = serde_json::from_slice(body).ok()?;
        let choices = response.get("choices")?.as_array()?;
        let [choice] = choices.as_slice() else {
            return None;
        };
        let text = match route {
            Route::ChatCompletions => {
                let message = choice.get("message")?;
                if has_content(message.get("tool_calls")) || has_content(message.get("refusal")) {
                    return None;
                }
                message.get("content")?.as_str()?.to_owned()
            }
            Route::Completions => choice.get("text")?.as_str()?.to_owned(),
            _ => return None,
        };
        let usage = response.get("usage");
        Self::complete(
            route,
            &response,
            text,
            choice.get("finish_reason").and_then(Value::as_str),
            usage,
        )
    }

    /// Reads a whole server-sent-event stream, as the backend sent it.
    pub fn from_stream(route: Route, body: &[u8]) -> Option<CachedAnswer> {
        let text = std::str::from_utf8(body).ok()?;
        let mut answer = String::new();
        let mut finish_reason = None;
        let mut usage = None;
        let mut first = None;
        let mut done = false;
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                break;
            }
            let chunk: Value = serde_json::from_str(data).ok()?;
            if chunk.get("error").is_some() {
                return None;
            }
            if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
                usage = Some(u.clone());
            }
            let choices = chunk.get("choices").and_then(Value::as_array);
            for choice in choices.into_iter().flatten() {
                if choice.get("index").and_then(Value::as_u64).unwrap_or(0) != 0 {
                    return None;
                }
                let piece = match route {
                    Route::ChatCompletions => {
                        let delta = choice.get("delta");
                        let delta = delta.filter(|d| !d.is_null());
                        if delta.is_some_and(|d| {
                            has_content(d.get("tool_calls")) || has_content(d.get("refusal"))
                        }) {
                            return None;
                        }
                        delta.and_then(|d| d.get("content")).and_then(Value::as_str)
                    }
                    _ => choice.get("text").and_then(Value::as_str),
                };
                answer.push_str(piece.unwrap_or(""));
                if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                    finish_reason = Some(reason.to_owned());
                }
            }
            first.get_or_insert(chunk);
        }
        if !done {
            return None;
        }
        Self::complete(
            route,
            &first?,
            answer,
            finish_reason.as_deref(),
            usage.as_ref(),
        )
    }

    fn complete(
        route: Route,
        response: &Value,
        text: String,
        finish_reason: Option<&str>,
        usage: Option<&Value>,
    ) -> Option<CachedAnswer> {
        let finish_reason = finish_reason.filter(|r| matches!(*r, "stop" | "length"))?;
        let count = |name: &str| {
            usage
                .and_then(|u| u.get(name))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        Some(CachedAnswer {
            route: route.name().to_owned(),
            model: response.get("model")?.as_str()?.to_owned(),
            text,
            finish_reason: finish_reason.to_owned(),
            prompt_tokens: count("prompt_tokens"),
            completion_tokens: count("completion_tokens"),
            system_fingerprint: response
                .get("system_fingerprint")
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
    }

    fn is_chat(&self) -> bool {
        self.route == Route::ChatCompletions.name()
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.prompt_tokens},
        })
    }

    /// The answer as a fresh response: a new id and creation time, the stored content.
    pub fn render(&self, shape: Shape, now_secs: u64) -> Bytes {
        let (prefix, object) = if self.is_chat() {
            ("chatcmpl", "chat.completion")
        } else {
            ("cmpl", "text_completion")
        };
        let id = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
        match shape {
            Shape::Json => {
                let choice = if self.is_chat() {
                    json!({"index": 0, "message": {"role": "assistant", "content": self.text, "refusal": null},
                           "logprobs": null, "finish_reason": self.finish_reason})
                } else {
                    json!({"index": 0, "text": self.text, "logprobs": null, "finish_reason": self.finish_reason})
                };
                let body = json!({
                    "id": id, "object": object, "created": now_secs, "model": self.model,
                    "choices": [choice], "usage": self.usage(),
                    "system_fingerprint": self.system_fingerprint,
                });
                Bytes::from(serde_json::to_vec(&body).expect("JSON serialises"))
            }
            Shape::Stream { include_usage } => self.render_stream(&id, now_secs, include_usage),
        }
    }

    fn render_stream(&self, id: &str, now_secs: u64, include_usage: bool) -> Bytes {
        let object = if self.is_chat() {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let chunk = |choice: Value| {
            let mut chunk = json!({
                "id": id, "object": object, "created": now_secs, "model": self.model,
                "system_fingerprint": self.system_fingerprint, "choices": [choice],
            });
            if include_usage {
                chunk["usage"] = Value::Null;
            }
            chunk
        };
        let mut chunks = Vec::with_capacity(4);
        if self.is_chat() {
            chunks.push(chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})));
            chunks.push(chunk(json!({"index": 0, "delta": {"content": self.text}, "logprobs": null, "finish_reason": null})));
            chunks.push(chunk(json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": self.finish_reason})));
        } else {
            chunks.push(chunk(
                json!({"index": 0, "text": self.text, "logprobs": null, "finish_reason": null}),
            ));
            chunks.push(chunk(json!({"index": 0, "text": "", "logprobs": null, "finish_reason": self.finish_reason})));
        }
        if include_usage {
            let mut last = chunk(Value::Null);
            last["choices"] = json!([]);
            last["usage"] = self.usage();
            chunks.push(last);
        }
        let mut out = BytesMut::new();
        for c in chunks {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&serde_json::to_vec(&c).expect("JSON serialises"));
            out.extend_from_slice(b"\n\n");
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        out.freeze()
    }
}

fn has_content(value: Option<&Value>) -> bool {
    value.is_some_and(|v| match v {
        Value::Null => false,
        Value::Array(a) => !a.is_empty(),
        Value::String(s) => !s.is_empty(),
        _ => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#;

    #[test]
    fn a_json_answer_round_trips_as_json_and_as_a_stream() {
        let answer = CachedAnswer::from_json(Route::ChatCompletions, JSON.as_bytes()).unwrap();
        assert_eq!(answer.text, "Hello there");
        assert_eq!((answer.prompt_tokens, answer.completion_tokens), (5, 2));

        let json = answer.render(Shape::Json, 9);
        let again = CachedAnswer::from_json(Route::ChatCompletions, &json).unwrap();
        assert_eq!(again, answer);
        let v: Value = serde_json::from_slice(&json).unwrap();
        assert_ne!(v["id"], "chatcmpl-1");

        let stream = answer.render(
            Shape::Stream {
                include_usage: true,
            },
            9,
        );
        let from_stream = CachedAnswer::from_stream(Route::ChatCompletions, &stream).unwrap();
        assert_eq!(from_stream, answer);
        let text = std::str::from_utf8(&stream).unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn incomplete_or_unusual_answers_are_not_kept() {
        let cut = JSON.replace("\"stop\"", "null");
        assert!(CachedAnswer::from_json(Route::ChatCompletions, cut.as_bytes()).is_none());
        let filtered = JSON.replace("\"stop\"", "\"content_filter\"");
        assert!(CachedAnswer::from_json(Route::ChatCompletions, filtered.as_bytes()).is_none());
        let tools = JSON.replace(
            "\"content\":\"Hello there\"",
            "\"content\":null,\"tool_calls\":[{\"id\":\"x\"}]",
        );
        assert!(CachedAnswer::from_json(Route::ChatCompletions, tools.as_bytes()).is_none());

        let answer = CachedAnswer::from_json(Route::ChatCompletions, JSON.as_bytes()).unwrap();
        let stream = answer.render(
            Shape::Stream {
                include_usage: false,
            },
            1,
        );
        let without_done = &stream[..stream.len() - "data: [DONE]\n\n".len()];
        assert!(CachedAnswer::from_stream(Route::ChatCompletions, without_done).is_none());
    }

    #[test]
    fn text_completions_round_trip() {
        let body = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"abc","finish_reason":"length"}],"usage":{"prompt_tokens":1,"completion_tokens":3}}"#;
        let answer = CachedAnswer::from_json(Route::Completions, body.as_bytes()).unwrap();
        let stream = answer.render(
            Shape::Stream {
                include_usage: false,
            },
            1,
        );
        let mut back = CachedAnswer::from_stream(Route::Completions, &stream).unwrap();
        back.prompt_tokens = answer.prompt_tokens;
        back.completion_tokens = answer.completion_tokens;
        assert_eq!(back, answer);
    }
}
