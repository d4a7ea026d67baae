//! `POST /v1/chat/completions`: one chat turn from the simulated engine or a native decoder,
//! whole or streamed.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::ApiError;
use crate::generation::{self, Generation, Outcome, SamplingFields};
use crate::metrics::Route;
use crate::native::tokenizer;
use crate::native::TextModel;
use crate::openai::{
    AssistantMessage, ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion,
    ChatCompletionRequest, ChatMessage, Delta, FinishReason, ReplyId, Usage, NATIVE_FINGERPRINT,
    SYSTEM_FINGERPRINT,
};
use crate::request::{choice_count, parse_body, required, token_cap};
use crate::sim::{self, count_tokens, MESSAGE_OVERHEAD_TOKENS};
use crate::sse::{self, ChunkWriter, Reply, Sequence};
use crate::state::{AppState, ModelEngine};

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    state.metrics.record_request(Route::ChatCompletions);
    let mut request: ChatCompletionRequest = parse_body(body)?;
    let model = required(request.model.take(), "model")?;
    let messages = required(request.messages.take(), "messages")?;
    if messages.is_empty() {
        return Err(ApiError::invalid_value(
            "messages",
            "the conversation must contain at least one message",
        ));
    }
    let n = choice_count(request.n)?;
    let cap = token_cap(request.max_tokens, request.max_completion_tokens)?;
    let served = state.text_model(&model, "/v1/chat/completions")?;
    let model = served.name.clone();
    if let ModelEngine::Text(engine) = &served.engine {
        let engine = engine.clone();
        return native_chat(&state, model, &engine, request, &messages, n, cap).await;
    }

    let prompt = ChatPrompt::new(&messages);
    let (len, finish_reason) = state.sim.reply_length(cap);
    let sequences: Vec<Sequence> = (0..n)
        .map(|index| Sequence {
            index,
            tokens: sim::reply_tokens(&prompt.text, request.seed, index, len),
            finish_reason,
        })
        .collect();
    let usage = Usage::new(prompt.tokens, len as u64 * u64::from(n));
    state.metrics.add_prompt_tokens(prompt.tokens);
    let reply_id = ReplyId::new("chatcmpl");

    let stream = sse::StreamRequest {
        stream: request.stream,
        options: request.stream_options.as_ref(),
        user: request.user.as_deref(),
    };
    let writer = |include_usage| ChatChunks {
        reply_id: reply_id.clone(),
        model: model.clone(),
        fingerprint: SYSTEM_FINGERPRINT,
        include_usage,
    };
    let sequences = match sse::stream_or_finish(&state, stream, writer, sequences, usage, len).await
    {
        Reply::Streamed(response) => return Ok(response),
        Reply::Finished(sequences) => sequences,
    };
    let completion = ChatCompletion {
        id: &reply_id.id,
        object: "chat.completion",
        created: reply_id.created,
        model: &model,
        system_fingerprint: SYSTEM_FINGERPRINT,
        choices: sequences
            .into_iter()
            .map(|sequence| ChatChoice {
                index: sequence.index,
                message: AssistantMessage {
                    role: "assistant",
                    content: sequence.tokens.concat(),
                },
                logprobs: None,
                finish_reason: sequence.finish_reason,
            })
            .collect(),
        usage,
    };
    Ok(Json(completion).into_response())
}

/// One chat turn from a native decoder: the chat template applied, `n` replies generated
/// by the model's engine thread and sent whole or as they come.
async fn native_chat(
    state: &Arc<AppState>,
    model: String,
    engine: &TextModel,
    request: ChatCompletionRequest,
    messages: &[ChatMessage],
    n: u32,
    cap: Option<u32>,
) -> Result<Response, ApiError> {
    let (params, stop) = SamplingFields {
        temperature: request.temperature,
        top_p: request.top_p,
        top_k: request.top_k,
        presence_penalty: request.presence_penalty,
        frequency_penalty: request.frequency_penalty,
        seed: request.seed,
        stop: request.stop,
    }
    .check()?;
    let texts: Vec<String> = messages.iter().map(|m| m.texts().collect()).collect();
    let chat: Vec<tokenizer::ChatMessage<'_>> = messages
        .iter()
        .zip(&texts)
        .map(|(message, text)| tokenizer::ChatMessage {
            role: &message.role,
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
    let generation = Generation {
        prompts: vec![prompt],
        n,
        cap,
        params,
        stop,
        prompt_param: "messages",
    };
    let reply_id = ReplyId::new("chatcmpl");
    let stream = sse::StreamRequest {
        stream: request.stream,
        options: request.stream_options.as_ref(),
        user: request.user.as_deref(),
    };
    let writer = |include_usage| ChatChunks {
        reply_id: reply_id.clone(),
        model: model.clone(),
        fingerprint: NATIVE_FINGERPRINT,
        include_usage,
    };
    let (choices, usage) = match generation::run(state, engine, generation, stream, writer).await? {
        Outcome::Streamed(response) => return Ok(response),
        Outcome::Finished { choices, usage } => (choices, usage),
    };
    let completion = ChatCompletion {
        id: &reply_id.id,
        object: "chat.completion",
        created: reply_id.created,
        model: &model,
        system_fingerprint: NATIVE_FINGERPRINT,
        choices: choices
            .into_iter()
            .map(|choice| ChatChoice {
                index: choice.index,
                message: AssistantMessage {
                    role: "assistant",
                    content: choice.text,
                },
                logprobs: None,
                finish_reason: choice.finish_reason,
            })
            .collect(),
        usage,
    };
    Ok(Json(completion).into_response())
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

struct ChatChunks {
    reply_id: ReplyId,
    model: String,
    /// Which engine wrote the reply (`system_fingerprint`).
    fingerprint: &'static str,
    include_usage: bool,
}

impl ChatChunks {
    fn chunk(&self, choice: Option<ChatChunkChoice<'_>>, usage: Option<Usage>) -> Bytes {
        sse::event(&ChatChunk {
            id: &self.reply_id.id,
            object: "chat.completion.chunk",
            created: self.reply_id.created,
            model: &self.model,
            system_fingerprint: self.fingerprint,
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
        };
        Some(self.chunk(Some(choice(index, delta, None)), None))
    }

    fn token(&self, index: u32, text: &str) -> Bytes {
        let delta = Delta {
            role: None,
            content: Some(text),
        };
        self.chunk(Some(choice(index, delta, None)), None)
    }

    fn finish(&self, index: u32, reason: FinishReason) -> Bytes {
        self.chunk(Some(choice(index, Delta::default(), Some(reason))), None)
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
