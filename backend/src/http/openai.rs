//! What does the OpenAI wire format look like, as far as this backend speaks it?
//!
//! Requests keep every field a client may omit as `Option`, so that a missing field is
//! reported by the handler with its parameter name (OpenAI's wording) rather than by serde.
//! Fields whose shape varies (structured output, log probabilities, tools) are kept as sent
//! and read by the handler (`completion::output`), or, where the native engine cannot act
//! on them, refused by name once the engine is known (`super::honoured`); the simulated
//! engine accepts them, as it does sampling and stop, which it ignores. Fields that change nothing in a reply (`user`,
//! `metadata`, `store`...) are accepted and ignored. Responses borrow what they can; they
//! are serialised once and dropped.
//!
//! These types never travel past the HTTP side: the engine has its own ([`ModelInput`],
//! [`Finish`]), and the conversions between the two are here.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::{Finish, ModelInput};

// ---------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(expecting = "a JSON object")]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub n: Option<i64>,
    pub seed: Option<i64>,
    pub user: Option<String>,
    /// Sampling and stopping, which the native engine acts on and the simulated one ignores.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Not OpenAI's, but vLLM's and llama.cpp's: keep the k likeliest tokens (0: all).
    pub top_k: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub stop: Option<Stop>,
    /// As sent: read by `completion::output`, or refused where the engine cannot honour
    /// them (`super::honoured`).
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub response_format: Option<Value>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub logit_bias: Option<Value>,
    pub modalities: Option<Value>,
    pub audio: Option<Value>,
    /// Sluice's own: whether to draft tokens by prompt lookup for this request (it never
    /// changes a reply, only how fast it comes; `engine::speculation::ON_BY_DEFAULT`).
    pub speculative_decoding: Option<bool>,
}

/// `stop`: one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or an array of strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(stop) => vec![stop],
            Stop::Many(stops) => stops,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a JSON object")]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<Inputs>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub n: Option<i64>,
    pub seed: Option<i64>,
    pub user: Option<String>,
    /// As for chat: acted on by the native engine.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub stop: Option<Stop>,
    /// As for chat.
    pub logprobs: Option<Value>,
    pub echo: Option<Value>,
    pub suffix: Option<Value>,
    pub best_of: Option<Value>,
    pub logit_bias: Option<Value>,
    /// As for chat.
    pub speculative_decoding: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a JSON object")]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    pub input: Option<Inputs>,
    pub encoding_format: Option<String>,
    pub dimensions: Option<i64>,
    pub user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a JSON object")]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a message object with a role")]
pub struct ChatMessage {
    pub role: String,
    /// Absent or null for an assistant turn that only carried tool calls.
    pub content: Option<MessageContent>,
    /// An earlier assistant turn's calls, as sent back by the client.
    pub tool_calls: Option<Vec<SentToolCall>>,
}

/// A tool call in the conversation so far.
#[derive(Debug, Deserialize)]
#[serde(expecting = "a tool call object with a function")]
pub struct SentToolCall {
    pub function: SentFunction,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a function object with a name and arguments")]
pub struct SentFunction {
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

impl ChatMessage {
    /// The text this message contributes to the prompt; non-text parts (images, audio)
    /// contribute nothing (a native decoder refuses them first: `super::honoured`).
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        let (single, parts) = match &self.content {
            None => (None, &[][..]),
            Some(MessageContent::Text(text)) => (Some(text.as_str()), &[][..]),
            Some(MessageContent::Parts(parts)) => (None, parts.as_slice()),
        };
        single.into_iter().chain(
            parts
                .iter()
                .filter(|part| part.kind == "text")
                .filter_map(|part| part.text.as_deref()),
        )
    }
}

#[derive(Debug)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a content part object with a type")]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

// Hand-written so a wrong shape says what is accepted, instead of serde's "did not match any
// variant of untagged enum".
impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor;

        impl<'de> Visitor<'de> for ContentVisitor {
            type Value = MessageContent;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of content parts")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(MessageContent::Text(text.to_owned()))
            }

            fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
                Ok(MessageContent::Text(text))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                while let Some(part) = seq.next_element()? {
                    parts.push(part);
                }
                Ok(MessageContent::Parts(parts))
            }
        }

        deserializer.deserialize_any(ContentVisitor)
    }
}

/// One prompt (completions) or one input (embeddings): text, or token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Text(String),
    Tokens(Vec<u32>),
}

/// The engine reads an input as its own type: the wire shape stops here.
impl From<Input> for ModelInput {
    fn from(input: Input) -> Self {
        match input {
            Input::Text(text) => ModelInput::Text(text),
            Input::Tokens(ids) => ModelInput::Tokens(ids),
        }
    }
}

/// OpenAI's `prompt` / `input`: a string, an array of strings, an array of token ids, or an
/// array of arrays of token ids. The first and third are one input each.
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs(pub Vec<Input>);

const INPUTS_EXPECTED: &str =
    "a string, an array of strings, an array of token ids or an array of arrays of token ids";

impl<'de> Deserialize<'de> for Inputs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InputsVisitor;

        impl<'de> Visitor<'de> for InputsVisitor {
            type Value = Inputs;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(INPUTS_EXPECTED)
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Inputs(vec![Input::Text(text.to_owned())]))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                while let Some(item) = seq.next_element::<Value>()? {
                    items.push(item);
                }
                inputs_from_array(items)
                    .ok_or_else(|| de::Error::invalid_value(de::Unexpected::Seq, &self))
            }
        }

        deserializer.deserialize_any(InputsVisitor)
    }
}

fn inputs_from_array(items: Vec<Value>) -> Option<Inputs> {
    let Some(first) = items.first() else {
        return Some(Inputs(Vec::new()));
    };
    match first {
        Value::String(_) => items
            .into_iter()
            .map(|item| match item {
                Value::String(text) => Some(Input::Text(text)),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(Inputs),
        Value::Number(_) => token_ids(&items).map(|ids| Inputs(vec![Input::Tokens(ids)])),
        Value::Array(_) => items
            .iter()
            .map(|item| match item {
                Value::Array(ids) => token_ids(ids).map(Input::Tokens),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(Inputs),
        _ => None,
    }
}

fn token_ids(items: &[Value]) -> Option<Vec<u32>> {
    items
        .iter()
        .map(|item| item.as_u64().and_then(|id| u32::try_from(id).ok()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
    /// The reply is a tool call (`tool_calls`).
    #[serde(rename = "tool_calls")]
    ToolCalls,
}

impl From<Finish> for FinishReason {
    fn from(finish: Finish) -> Self {
        match finish {
            Finish::Stop => FinishReason::Stop,
            Finish::Length => FinishReason::Length,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// The `id` and `created` every reply carries; a stream repeats them on each chunk.
#[derive(Debug, Clone)]
pub struct ReplyId {
    pub id: String,
    pub created: u64,
}

impl ReplyId {
    /// `prefix` is OpenAI's: `chatcmpl` for chat, `cmpl` for text completions.
    pub fn new(prefix: &str) -> Self {
        Self {
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created: unix_now(),
        }
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Tells clients which build produced a reply, as OpenAI's `system_fingerprint` does: the
/// simulated engine's replies, and the native engine's (with the build's version).
pub const SYSTEM_FINGERPRINT: &str = "sluice-sim";
pub const NATIVE_FINGERPRINT: &str = concat!("sluice-native-", env!("CARGO_PKG_VERSION"));

#[derive(Debug, Serialize)]
pub struct ChatCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub system_fingerprint: &'static str,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// `null` when the reply is a tool call.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Debug, Serialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: ToolFunction,
}

#[derive(Debug, Serialize)]
pub struct ToolFunction {
    pub name: String,
    /// The arguments as JSON text, as the model wrote them.
    pub arguments: String,
}

/// A piece of a streamed tool call: the first carries its id, type and name; each one a
/// piece of the arguments' text.
#[derive(Debug, Serialize)]
pub struct ToolCallDelta {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: ToolFunctionDelta,
}

#[derive(Debug, Serialize)]
pub struct ToolFunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

#[derive(Debug, Serialize)]
pub struct ChatChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub system_fingerprint: &'static str,
    pub choices: Vec<ChatChunkChoice<'a>>,
    /// Absent unless the client asked for usage; then `null` on every chunk but the last,
    /// as OpenAI does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Serialize)]
pub struct ChatChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// Both the non-streamed `text_completion` and each of its stream chunks: OpenAI uses the
/// same object for the two.
#[derive(Debug, Serialize)]
pub struct TextCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub system_fingerprint: &'static str,
    pub choices: Vec<TextChoice<'a>>,
    /// Always present on a non-streamed reply; on a stream, as for [`ChatChunk::usage`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Serialize)]
pub struct TextChoice<'a> {
    pub text: &'a str,
    pub index: u32,
    pub logprobs: Option<TextLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

/// Chat's `logprobs` object: one entry per token in `content`.
#[derive(Debug, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
    pub refusal: Option<()>,
}

#[derive(Debug, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Serialize)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// Completions' `logprobs` object: parallel lists, one entry per token.
#[derive(Debug, Serialize)]
pub struct TextLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// The alternatives of each token, text to log probability (the likeliest first; of
    /// two tokens with the same text, the likelier).
    pub top_logprobs: Vec<serde_json::Map<String, Value>>,
    /// Where each token starts in the reply's text, in characters.
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Serialize)]
pub struct EmbeddingList<'a> {
    pub object: &'static str,
    pub data: Vec<EmbeddingData>,
    pub model: &'a str,
    pub usage: EmbeddingUsage,
}

#[derive(Debug, Serialize)]
pub struct EmbeddingData {
    pub object: &'static str,
    pub index: u32,
    pub embedding: EmbeddingVector,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    /// Little-endian f32 bytes, standard base64.
    Base64(String),
}

#[derive(Debug, Serialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
}

#[derive(Debug, Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: Vec<ModelCard<'a>>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// Lets operators and tests see at a glance that no real model answers here.
    pub simulated: bool,
    /// Where a native model runs: `cpu`, `cuda:0`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<&'a str>,
    /// A decoder's longest prompt and reply together, in tokens (vLLM's name for it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(json: &str) -> Result<Inputs, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn every_input_shape_openai_accepts_is_read() {
        assert_eq!(inputs(r#""hi""#).unwrap().0, vec![Input::Text("hi".into())]);
        assert_eq!(
            inputs(r#"["a","b"]"#).unwrap().0,
            vec![Input::Text("a".into()), Input::Text("b".into())]
        );
        assert_eq!(
            inputs("[1,2,3]").unwrap().0,
            vec![Input::Tokens(vec![1, 2, 3])]
        );
        assert_eq!(
            inputs("[[1],[2,3]]").unwrap().0,
            vec![Input::Tokens(vec![1]), Input::Tokens(vec![2, 3])]
        );
        assert!(inputs("[]").unwrap().0.is_empty());
    }

    #[test]
    fn mixed_or_wrongly_typed_inputs_are_refused_with_what_is_accepted() {
        for bad in [r#"["a",1]"#, "[-1]", "[1.5]", r#"[[1],"a"]"#, "[null]"] {
            let err = inputs(bad).unwrap_err().to_string();
            assert!(err.contains(INPUTS_EXPECTED), "{bad}: {err}");
        }
        let err = inputs("42").unwrap_err().to_string();
        assert!(err.starts_with("invalid type"), "{err}");
    }

    #[test]
    fn message_text_comes_from_a_string_or_text_parts() {
        let message: ChatMessage = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{}},{"type":"text","text":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(message.texts().collect::<Vec<_>>(), ["a", "b"]);
        let message: ChatMessage =
            serde_json::from_str(r#"{"role":"user","content":"hello"}"#).unwrap();
        assert_eq!(message.texts().collect::<Vec<_>>(), ["hello"]);
        let message: ChatMessage =
            serde_json::from_str(r#"{"role":"assistant","content":null}"#).unwrap();
        assert_eq!(message.texts().count(), 0);
    }
}
