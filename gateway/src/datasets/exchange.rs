//! What was said: a chat completion's request and its answer, as they passed the gateway,
//! read into the conversations a dataset keeps, one per choice the model answered with.
//!
//! The request's `messages` (and `tools`) are kept byte for byte as the client sent them;
//! the answer becomes the assistant message a fine-tuning file expects: its content, tool
//! calls and refusal, whether the backend sent one JSON body or a stream of deltas. Only
//! answers that ended (a finish reason) are kept: a cut-off answer is not a training example.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// One captured conversation, as the dataset store keeps it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Conversation {
    /// When the answer ended, unix milliseconds.
    pub time_ms: i64,
    pub request_id: String,
    pub tenant: String,
    pub key_id: String,
    /// The model that answered (aliases resolved).
    pub model: String,
    pub finish_reason: String,
    /// The request's messages, exactly as sent.
    pub messages: Box<RawValue>,
    /// The request's tools, exactly as sent, when it offered any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Box<RawValue>>,
    /// The assistant's answer to them.
    pub answer: Answer,
}

/// The assistant's message, as a fine-tuning example holds it: what it said or called, not
/// the response's empty or null extras (`audio: null`, `annotations: []`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub role: String,
    /// Text, or the content parts the backend answered with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// The pre-tools way of calling a function, from backends that still answer so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_call: Option<Value>,
}

/// Who asked, when, and of which model: what every conversation of one exchange shares.
#[derive(Debug, Clone)]
pub struct Asker {
    pub time_ms: i64,
    pub request_id: String,
    pub tenant: String,
    pub key_id: String,
    pub model: String,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Box<RawValue>,
    #[serde(default)]
    tools: Option<Box<RawValue>>,
}

/// The conversations of one exchange: one per choice that ended; none when the request or
/// the answer cannot be read as a chat completion.
pub fn conversations(asker: &Asker, request: &[u8], answer: &[Bytes]) -> Vec<Conversation> {
    let Ok(ChatRequest { messages, tools }) = serde_json::from_slice::<ChatRequest>(request) else {
        return Vec::new();
    };
    if !messages.get().trim_start().starts_with('[') {
        return Vec::new();
    }
    let tools = tools.filter(|t| t.get().trim() != "null");
    let body: Vec<u8> = answer.concat();
    let choices = if is_event_stream(&body) {
        streamed_choices(&body)
    } else {
        json_choices(&body)
    };
    choices
        .into_iter()
        .map(|(answer, finish_reason)| Conversation {
            time_ms: asker.time_ms,
            request_id: asker.request_id.clone(),
            tenant: asker.tenant.clone(),
            key_id: asker.key_id.clone(),
            model: asker.model.clone(),
            finish_reason,
            messages: messages.clone(),
            tools: tools.clone(),
            answer,
        })
        .collect()
}

fn is_event_stream(body: &[u8]) -> bool {
    let start = body.iter().position(|b| !b.is_ascii_whitespace());
    start.is_some_and(|i| body[i..].starts_with(b"data:") || body[i..].starts_with(b":"))
}

/// The assistant messages of a whole JSON answer, each with its finish reason.
fn json_choices(body: &[u8]) -> Vec<(Answer, String)> {
    let Ok(response) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let Some(choices) = response.get("choices").and_then(Value::as_array) else {
        return Vec::new();
    };
    choices
        .iter()
        .filter_map(|choice| {
            let finish_reason = choice.get("finish_reason")?.as_str()?.to_owned();
            let message = choice.get("message")?.as_object()?;
            Some((assistant_message(message), finish_reason))
        })
        .collect()
}

fn assistant_message(message: &Map<String, Value>) -> Answer {
    let field = |name: &str| message.get(name).filter(|v| has_content(v)).cloned();
    Answer {
        role: "assistant".to_owned(),
        content: field("content"),
        refusal: field("refusal"),
        tool_calls: field("tool_calls"),
        function_call: field("function_call"),
    }
}

fn has_content(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Array(a) => !a.is_empty(),
        _ => true,
    }
}

/// One choice's answer, put together from its deltas.
#[derive(Default)]
struct Deltas {
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: BTreeMap<u64, ToolCall>,
    finish_reason: Option<String>,
}

#[derive(Default)]
struct ToolCall {
    id: Option<String>,
    kind: Option<String>,
    name: String,
    arguments: String,
}

impl Deltas {
    fn add(&mut self, delta: &Value) {
        let text = |field: &str| delta.get(field).and_then(Value::as_str);
        if let Some(piece) = text("content") {
            self.content.get_or_insert_with(String::new).push_str(piece);
        }
        if let Some(piece) = text("refusal") {
            self.refusal.get_or_insert_with(String::new).push_str(piece);
        }
        let calls = delta.get("tool_calls").and_then(Value::as_array);
        for (position, call) in calls.into_iter().flatten().enumerate() {
            let index = call
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(position as u64);
            let entry = self.tool_calls.entry(index).or_default();
            let text = |field: &str| call.get(field).and_then(Value::as_str);
            if let Some(id) = text("id") {
                entry.id.get_or_insert_with(|| id.to_owned());
            }
            if let Some(kind) = text("type") {
                entry.kind.get_or_insert_with(|| kind.to_owned());
            }
            let function = call.get("function");
            let part = |field: &str| function.and_then(|f| f.get(field)).and_then(Value::as_str);
            entry.name.push_str(part("name").unwrap_or(""));
            entry.arguments.push_str(part("arguments").unwrap_or(""));
        }
    }

    fn message(self) -> Answer {
        let tool_calls = (!self.tool_calls.is_empty()).then(|| {
            let calls = self.tool_calls.into_values().map(|c| {
                json!({
                    "id": c.id,
                    "type": c.kind.unwrap_or_else(|| "function".to_owned()),
                    "function": {"name": c.name, "arguments": c.arguments},
                })
            });
            Value::Array(calls.collect())
        });
        Answer {
            role: "assistant".to_owned(),
            content: self.content.map(Value::String),
            refusal: self.refusal.map(Value::String),
            tool_calls,
            function_call: None,
        }
    }
}

/// The assistant messages of a server-sent-event answer, by choice index, each with its
/// finish reason; none when an event cannot be read or carries an error.
fn streamed_choices(body: &[u8]) -> Vec<(Answer, String)> {
    let Ok(text) = std::str::from_utf8(body) else {
        return Vec::new();
    };
    let mut choices: BTreeMap<u64, Deltas> = BTreeMap::new();
    // Any of LF, CRLF or CR ends a line in an event stream.
    for line in text.split(['\n', '\r']) {
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let data = data.trim();
        if data == "[DONE]" {
            break;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            return Vec::new();
        };
        if chunk.get("error").is_some() {
            return Vec::new();
        }
        let parts = chunk.get("choices").and_then(Value::as_array);
        for choice in parts.into_iter().flatten() {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let deltas = choices.entry(index).or_default();
            if let Some(delta) = choice.get("delta").filter(|d| d.is_object()) {
                deltas.add(delta);
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                deltas.finish_reason = Some(reason.to_owned());
            }
        }
    }
    choices
        .into_values()
        .filter_map(|mut deltas| {
            let finish_reason = deltas.finish_reason.take()?;
            Some((deltas.message(), finish_reason))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asker() -> Asker {
        Asker {
            time_ms: 7,
            request_id: "req-1".into(),
            tenant: "acme".into(),
            key_id: "key_1".into(),
            model: "big".into(),
        }
    }

    const REQUEST: &str = r#"{"model":"big","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi ☃"}]}],"stream":true}"#;

    #[test]
    fn the_request_messages_are_kept_byte_for_byte() {
        let answer = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hello!","refusal":null,"annotations":[]},"finish_reason":"stop"}]}"#;
        let got = conversations(&asker(), REQUEST.as_bytes(), &[Bytes::from(answer)]);
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].messages.get(),
            r#"[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi ☃"}]}]"#
        );
        assert_eq!(
            serde_json::to_string(&got[0].answer).unwrap(),
            r#"{"role":"assistant","content":"Hello!"}"#
        );
        assert_eq!(got[0].finish_reason, "stop");
        assert!(got[0].tools.is_none());
    }

    #[test]
    fn a_stream_is_put_together_per_choice_with_its_tool_calls() {
        let events = [
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}},{\"index\":1,\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Par\"}}]}\r\n\r\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"is\"},\"finish_reason\":\"stop\"}]}\r\r",
            "data: {\"choices\":[{\"index\":1,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"weather\",\"arguments\":\"{\\\"ci\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":1,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"ty\\\":1}\"}}]},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}}\n\ndata: [DONE]\n\n",
        ];
        // Chunk borders fall anywhere, mid-event included.
        let whole = events.concat();
        let (a, b) = whole.split_at(37);
        let answer = [Bytes::from(a.to_owned()), Bytes::from(b.to_owned())];
        let request = r#"{"messages":[{"role":"user","content":"Weather?"}],"tools":[{"type":"function","function":{"name":"weather"}}]}"#;
        let got = conversations(&asker(), request.as_bytes(), &answer);
        assert_eq!(got.len(), 2);
        let answer = |i: usize| serde_json::to_value(&got[i].answer).unwrap();
        assert_eq!(answer(0), json!({"role": "assistant", "content": "Paris"}));
        assert_eq!(got[0].finish_reason, "stop");
        assert_eq!(
            answer(1),
            json!({"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                   "function": {"name": "weather", "arguments": "{\"city\":1}"}}]})
        );
        assert_eq!(got[1].finish_reason, "tool_calls");
        assert_eq!(
            got[1].tools.as_ref().unwrap().get(),
            r#"[{"type":"function","function":{"name":"weather"}}]"#
        );
    }

    #[test]
    fn unfinished_unreadable_or_failed_answers_are_not_kept() {
        let cut = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Par\"}}]}\n\n";
        assert!(conversations(&asker(), REQUEST.as_bytes(), &[Bytes::from(cut)]).is_empty());
        let failed = "data: {\"error\":{\"message\":\"overloaded\"}}\n\n";
        assert!(conversations(&asker(), REQUEST.as_bytes(), &[Bytes::from(failed)]).is_empty());
        let no_finish =
            r#"{"choices":[{"index":0,"message":{"content":"x"},"finish_reason":null}]}"#;
        assert!(conversations(&asker(), REQUEST.as_bytes(), &[Bytes::from(no_finish)]).is_empty());
        let answer =
            r#"{"choices":[{"index":0,"message":{"content":"x"},"finish_reason":"stop"}]}"#;
        for request in [r#"{"prompt":"x"}"#, r#"{"messages":"x"}"#, "not json"] {
            assert!(conversations(&asker(), request.as_bytes(), &[Bytes::from(answer)]).is_empty());
        }
    }
}
