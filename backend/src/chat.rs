//! `POST /v1/chat/completions`: one chat turn from the simulated engine or a native decoder,
//! whole or streamed.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::ApiError;
use crate::generation::{self, Generation, SamplingFields};
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
use crate::sse::{self, ChunkWriter, Outcome, Sequence};
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
    let sampling = SamplingFields::of_chat(&mut request);

    let native = match &served.engine {
        ModelEngine::Text(engine) => Some(engine.clone()),
        _ => None,
    };
    let fingerprint = match native {
        Some(_) => NATIVE_FINGERPRINT,
        None => SYSTEM_FINGERPRINT,
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
        fingerprint,
        include_usage,
    };
    let outcome = match native {
        Some(engine) => {
            let generation = native_prompt(&engine, &messages, n, cap, sampling)?;
            generation::run(&state, &engine, generation, stream, writer).await?
        }
        None => {
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
            sse::stream_or_finish(&state, stream, writer, sequences, usage, len).await
        }
    };
    let (choices, usage) = match outcome {
        Outcome::Streamed(response) => return Ok(response),
        Outcome::Finished { choices, usage } => (choices, usage),
    };
    let completion = ChatCompletion {
        id: &reply_id.id,
        object: "chat.completion",
        created: reply_id.created,
        model: &model,
        system_fingerprint: fingerprint,
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

/// What a native decoder generates for a chat: its chat template applied to the
/// conversation, `n` replies.
fn native_prompt(
    engine: &TextModel,
    messages: &[ChatMessage],
    n: u32,
    cap: Option<u32>,
    sampling: SamplingFields,
) -> Result<Generation, ApiError> {
    let (params, stop) = sampling.check()?;
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
    Ok(Generation {
        prompts: vec![prompt],
        n,
        cap,
        params,
        stop,
        prompt_param: "messages",
    })
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
