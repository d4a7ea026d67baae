//! `POST /v1/chat/completions`: what is particular to a chat turn. Its prompt is a
//! conversation, read by the simulated engine as role-tagged text and by a native decoder
//! through the model's chat template; its reply is one assistant message per choice,
//! streamed as `chat.completion.chunk` deltas that open with the role.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::output;
use super::sampling::SamplingFields;
use super::tools::{self, CallStream, ToolPlan};
use super::{Asked, CompletionRoute, ReplyHeader};
use crate::engine::generator::Logprob;
use crate::engine::sim::{self, count_tokens, MESSAGE_OVERHEAD_TOKENS};
use crate::engine::speculation;
use crate::engine::{Finish, TextModel};
use crate::http::error::ApiError;
use crate::http::honoured::{first_unhonoured, Unhonoured};
use crate::http::metrics::Route;
use crate::http::openai::{
    AssistantMessage, ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion,
    ChatCompletionRequest, ChatLogprobs, ChatMessage, Delta, FinishReason, MessageContent, ReplyId,
    Usage,
};
use crate::http::request::{choice_count, required, token_cap};
use crate::http::sse::{self, Choice, ChunkWriter, Sequence};
use crate::model::tokenizer;

/// The chat completion route.
pub struct Chat;

/// The first content part that is not text (an image, audio, a file): a text-only decoder
/// would answer as if it had not been sent.
fn beyond_text(messages: &[ChatMessage]) -> Option<Unhonoured> {
    messages.iter().enumerate().find_map(|(i, message)| {
        let Some(MessageContent::Parts(parts)) = &message.content else {
            return None;
        };
        let j = parts.iter().position(|part| part.kind != "text")?;
        Some(Unhonoured {
            param: format!("messages[{i}].content[{j}].type"),
            reason: "this model reads text only",
        })
    })
}

impl CompletionRoute for Chat {
    type Request = ChatCompletionRequest;
    type Prompt = Conversation;
    type Chunks = ChatChunks;

    const ROUTE: Route = Route::ChatCompletions;
    const PATH: &'static str = "/v1/chat/completions";
    const ID_PREFIX: &'static str = "chatcmpl";
    const PROMPT_PARAM: &'static str = "messages";

    fn read(request: ChatCompletionRequest) -> Result<Asked<Conversation>, ApiError> {
        let model = required(request.model, "model")?;
        let messages = required(request.messages, "messages")?;
        if messages.is_empty() {
            return Err(ApiError::invalid_value(
                "messages",
                "the conversation must contain at least one message",
            ));
        }
        let logprobs =
            output::chat_logprobs(request.logprobs.as_ref(), request.top_logprobs.as_ref())?;
        let mut format = output::response_format(request.response_format.as_ref())?;
        let (tools, unhonoured_tools) =
            match tools::plan(request.tools.as_ref(), request.tool_choice.as_ref())? {
                ToolPlan::NoCall => (None, None),
                ToolPlan::Unhonoured(refused) => (None, Some(refused)),
                ToolPlan::Call {
                    format: call,
                    instructions,
                } => {
                    if format.is_some() {
                        return Err(ApiError::invalid_value(
                            "response_format",
                            "a reply that must call a tool cannot also follow a response_format",
                        ));
                    }
                    format = Some(call);
                    (Some(instructions), None)
                }
            };
        let unhonoured = unhonoured_tools
            .or_else(|| {
                first_unhonoured([
                    ("functions", request.functions.as_ref()),
                    ("function_call", request.function_call.as_ref()),
                    ("modalities", request.modalities.as_ref()),
                    ("audio", request.audio.as_ref()),
                ])
            })
            .or_else(|| beyond_text(&messages));
        Ok(Asked {
            model,
            tool_call: tools.is_some(),
            prompt: Conversation { messages, tools },
            n: choice_count(request.n)?,
            cap: token_cap(request.max_tokens, request.max_completion_tokens)?,
            seed: request.seed,
            sampling: SamplingFields {
                temperature: request.temperature,
                top_p: request.top_p,
                top_k: request.top_k,
                presence_penalty: request.presence_penalty,
                frequency_penalty: request.frequency_penalty,
                seed: request.seed,
                stop: request.stop,
                logit_bias: request.logit_bias,
            },
            stream: request.stream,
            stream_options: request.stream_options,
            user: request.user,
            unhonoured,
            speculate: request
                .speculative_decoding
                .unwrap_or(speculation::ON_BY_DEFAULT),
            logprobs,
            format,
        })
    }

    fn simulate(
        conversation: &Conversation,
        seed: Option<i64>,
        n: u32,
        len: usize,
        finish: Finish,
    ) -> (Vec<Sequence>, u64) {
        let prompt = ChatPrompt::new(&conversation.messages);
        let sequences = (0..n)
            .map(|index| Sequence {
                index,
                tokens: sim::reply_tokens(&prompt.text, seed, index, len),
                finish_reason: finish.into(),
            })
            .collect();
        (sequences, prompt.tokens)
    }

    /// The model's chat template applied to the conversation, with the tools to call
    /// described in its system message: one prompt.
    fn tokenize(engine: &TextModel, conversation: Conversation) -> Result<Vec<Vec<u32>>, ApiError> {
        let Conversation { messages, tools } = conversation;
        let mut texts: Vec<String> = messages.iter().map(message_text).collect();
        let mut roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
        if let Some(tools) = tools {
            match roles.first() {
                Some(&"system") => texts[0] = format!("{}\n\n{tools}", texts[0]),
                _ => {
                    roles.insert(0, "system");
                    texts.insert(0, tools);
                }
            }
        }
        let chat: Vec<tokenizer::ChatMessage<'_>> = roles
            .iter()
            .zip(&texts)
            .map(|(role, text)| tokenizer::ChatMessage {
                role,
                content: text,
            })
            .collect();
        let tokenizer = engine.tokenizer();
        let prompt_text = tokenizer
            .apply_chat_template(&chat)
            .map_err(|err| ApiError::invalid_value("messages", err))?;
        let prompt = tokenizer
            .encode(&prompt_text)
            .map_err(ApiError::Generation)?;
        Ok(vec![prompt])
    }

    fn chunks(header: ReplyHeader, include_usage: bool, tool_call: bool) -> ChatChunks {
        ChatChunks {
            header,
            include_usage,
            calls: tool_call.then(HashMap::new),
        }
    }

    fn body(header: &ReplyHeader, choices: Vec<Choice>, usage: Usage, tool_call: bool) -> Response {
        let completion = ChatCompletion {
            id: &header.id.id,
            object: "chat.completion",
            created: header.id.created,
            model: &header.model,
            system_fingerprint: header.fingerprint,
            choices: choices
                .into_iter()
                .map(|choice| {
                    let call = tool_call
                        .then(|| tools::call(&choice.text, &call_id(&header.id, choice.index)))
                        .flatten();
                    let logprobs = choice.logprobs.as_deref().map(ChatLogprobs::new);
                    match call {
                        Some(call) => ChatChoice {
                            index: choice.index,
                            logprobs,
                            message: AssistantMessage {
                                role: "assistant",
                                content: None,
                                tool_calls: Some(vec![call]),
                            },
                            finish_reason: FinishReason::ToolCalls,
                        },
                        None => ChatChoice {
                            index: choice.index,
                            logprobs,
                            message: AssistantMessage {
                                role: "assistant",
                                content: Some(choice.text),
                                tool_calls: None,
                            },
                            finish_reason: choice.finish_reason,
                        },
                    }
                })
                .collect(),
            usage,
        };
        Json(completion).into_response()
    }
}

/// A chat request's prompt: the conversation, and the tools to describe to the model when
/// the reply must call one.
pub struct Conversation {
    messages: Vec<ChatMessage>,
    tools: Option<String>,
}

/// What a message says in the prompt: its text, then any tool calls it made, each as the
/// JSON object a call is written as.
fn message_text(message: &ChatMessage) -> String {
    let mut text: String = message.texts().collect();
    for call in message.tool_calls.iter().flatten() {
        let arguments = serde_json::from_str::<serde_json::Value>(&call.function.arguments)
            .unwrap_or_else(|_| call.function.arguments.clone().into());
        let written = serde_json::json!({"name": call.function.name, "arguments": arguments});
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&written.to_string());
    }
    text
}

/// The id of the tool call in choice `index` of reply `id`.
fn call_id(id: &ReplyId, index: u32) -> String {
    format!("call_{}_{index}", id.id.trim_start_matches("chatcmpl-"))
}

/// A conversation as the simulated engine reads it.
struct ChatPrompt {
    /// What the reply is derived from: every role and text, so that a different system
    /// prompt or a different speaker gives a different reply.
    text: String,
    /// The billed prompt size, by the rule documented on [`count_tokens`].
    tokens: u64,
}

impl ChatPrompt {
    fn new(messages: &[ChatMessage]) -> Self {
        let mut text = String::new();
        let mut tokens = 0;
        for message in messages {
            tokens += MESSAGE_OVERHEAD_TOKENS;
            text.push_str(&message.role);
            text.push(':');
            for part in message.texts() {
                tokens += count_tokens(part);
                text.push(' ');
                text.push_str(part);
            }
            text.push('\n');
        }
        Self { text, tokens }
    }
}

/// A chat reply's stream events.
pub struct ChatChunks {
    header: ReplyHeader,
    include_usage: bool,
    /// When the reply is a tool call: each choice's call so far.
    calls: Option<HashMap<u32, CallStream>>,
}

impl ChatChunks {
    fn chunk(&self, choice: Option<ChatChunkChoice<'_>>, usage: Option<Usage>) -> Bytes {
        sse::event(&ChatChunk {
            id: &self.header.id.id,
            object: "chat.completion.chunk",
            created: self.header.id.created,
            model: &self.header.model,
            system_fingerprint: self.header.fingerprint,
            choices: choice.into_iter().collect(),
            usage: self.include_usage.then_some(usage),
        })
    }
}

impl ChunkWriter for ChatChunks {
    fn opening(&self, index: u32) -> Option<Bytes> {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(""),
            tool_calls: None,
        };
        Some(self.chunk(Some(choice(index, delta, None)), None))
    }

    fn token(&mut self, index: u32, text: &str, logprobs: Option<&[Logprob]>) -> Bytes {
        let delta = match &mut self.calls {
            None => Delta {
                role: None,
                content: Some(text),
                tool_calls: None,
            },
            Some(calls) => {
                let id = call_id(&self.header.id, index);
                let call = calls.entry(index).or_default().push(text, &id);
                Delta {
                    tool_calls: call.map(|call| vec![call]),
                    ..Delta::default()
                }
            }
        };
        let choice = ChatChunkChoice {
            logprobs: logprobs.map(ChatLogprobs::new),
            ..choice(index, delta, None)
        };
        self.chunk(Some(choice), None)
    }

    fn finish(&mut self, index: u32, reason: FinishReason) -> Bytes {
        let Some(calls) = &mut self.calls else {
            return self.chunk(Some(choice(index, Delta::default(), Some(reason))), None);
        };
        let call = calls.entry(index).or_default();
        let (rest, reason) = match reason {
            // A call that ran out of tokens, or never began, is not a call.
            FinishReason::Length => (None, reason),
            _ if !call.started() => (None, reason),
            _ => (call.finish(), FinishReason::ToolCalls),
        };
        let delta = Delta {
            tool_calls: rest.map(|call| vec![call]),
            ..Delta::default()
        };
        self.chunk(Some(choice(index, delta, Some(reason))), None)
    }

    fn usage(&self, usage: Usage) -> Bytes {
        self.chunk(None, Some(usage))
    }
}

fn choice(
    index: u32,
    delta: Delta<'_>,
    finish_reason: Option<FinishReason>,
) -> ChatChunkChoice<'_> {
    ChatChunkChoice {
        index,
        delta,
        logprobs: None,
        finish_reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_tokens_are_words_punctuation_and_three_per_message() {
        let messages: Vec<ChatMessage> = serde_json::from_str(
            r#"[{"role":"system","content":"Be brief."},
                {"role":"user","content":[{"type":"text","text":"Hello, world!"}]}]"#,
        )
        .unwrap();
        // "Be brief." = 3, "Hello, world!" = 4, plus 3 per message.
        assert_eq!(ChatPrompt::new(&messages).tokens, 3 + 4 + 2 * 3);
    }
}
