//! `POST /v1/completions`: legacy text completion from the simulated engine, whole or
//! streamed. Each prompt gets `n` choices; choice indexes run on across prompts, as OpenAI's
//! do (prompt k, choice j is index k·n + j).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::ApiError;
use crate::metrics::Route;
use crate::openai::{
    CompletionRequest, FinishReason, ReplyId, TextChoice, TextCompletion, Usage, SYSTEM_FINGERPRINT,
};
use crate::request::{choice_count, parse_body, required, token_cap};
use crate::sim::{self, count_input_tokens};
use crate::sse::{self, ChunkWriter, Reply, Sequence};
use crate::state::{AppState, ModelEngine};

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    state.metrics.record_request(Route::Completions);
    let request: CompletionRequest = parse_body(body)?;
    let model = required(request.model, "model")?;
    let prompts = required(request.prompt, "prompt")?.0;
    if prompts.is_empty() {
        return Err(ApiError::invalid_value(
            "prompt",
            "the list of prompts must not be empty",
        ));
    }
    let n = choice_count(request.n)?;
    let cap = token_cap(request.max_tokens, None)?;
    let served = state.text_model(&model, "/v1/completions")?;
    if matches!(served.engine, ModelEngine::Text(_)) {
        return Err(ApiError::ChatOnly {
            model: served.name.clone(),
            route: "/v1/completions",
        });
    }
    let model = served.name.clone();

    let (len, finish_reason) = state.sim.reply_length(cap);
    let mut prompt_tokens = 0;
    let mut sequences = Vec::with_capacity(prompts.len() * n as usize);
    for (k, prompt) in prompts.iter().enumerate() {
        prompt_tokens += count_input_tokens(prompt);
        let text = prompt.to_text();
        // The reply depends on the choice's place within its prompt, not in the batch, so
        // a prompt gets the same reply alone or among others.
        sequences.extend((0..n).map(|j| Sequence {
            index: (k as u32).saturating_mul(n).saturating_add(j),
            tokens: sim::reply_tokens(&text, request.seed, j, len),
            finish_reason,
        }));
    }
    let usage = Usage::new(prompt_tokens, len as u64 * sequences.len() as u64);
    state.metrics.add_prompt_tokens(prompt_tokens);
    let reply_id = ReplyId::new("cmpl");

    let stream = sse::StreamRequest {
        stream: request.stream,
        options: request.stream_options.as_ref(),
        user: request.user.as_deref(),
    };
    let writer = |include_usage| TextChunks {
        reply_id: reply_id.clone(),
        model: model.clone(),
        include_usage,
    };
    let sequences = match sse::stream_or_finish(&state, stream, writer, sequences, usage, len).await
    {
        Reply::Streamed(response) => return Ok(response),
        Reply::Finished(sequences) => sequences,
    };
    let texts: Vec<String> = sequences.iter().map(|s| s.tokens.concat()).collect();
    let completion = TextCompletion {
        id: &reply_id.id,
        object: "text_completion",
        created: reply_id.created,
        model: &model,
        system_fingerprint: SYSTEM_FINGERPRINT,
        choices: sequences
            .iter()
            .zip(&texts)
            .map(|(sequence, text)| TextChoice {
                text,
                index: sequence.index,
                logprobs: None,
                finish_reason: Some(sequence.finish_reason),
            })
            .collect(),
        usage: Some(Some(usage)),
    };
    Ok(Json(completion).into_response())
}

struct TextChunks {
    reply_id: ReplyId,
    model: String,
    include_usage: bool,
}

impl TextChunks {
    fn chunk(&self, choice: Option<TextChoice<'_>>, usage: Option<Usage>) -> Bytes {
        sse::event(&TextCompletion {
            id: &self.reply_id.id,
            object: "text_completion",
            created: self.reply_id.created,
            model: &self.model,
            system_fingerprint: SYSTEM_FINGERPRINT,
            choices: choice.into_iter().collect(),
            usage: self.include_usage.then_some(usage),
        })
    }
}

impl ChunkWriter for TextChunks {
    /// Text completions have no role to announce: the first event is the first token.
    fn opening(&self, _index: u32) -> Option<Bytes> {
        None
    }

    fn token(&self, index: u32, text: &str) -> Bytes {
        self.chunk(Some(choice(index, text, None)), None)
    }

    fn finish(&self, index: u32, reason: FinishReason) -> Bytes {
        self.chunk(Some(choice(index, "", Some(reason))), None)
    }

    fn usage(&self, usage: Usage) -> Bytes {
        self.chunk(None, Some(usage))
    }
}

fn choice(index: u32, text: &str, finish_reason: Option<FinishReason>) -> TextChoice<'_> {
    TextChoice {
        text,
        index,
        logprobs: None,
        finish_reason,
    }
}
