//! `POST /v1/completions`: legacy text completion from the simulated engine or a native
//! decoder, whole or streamed. Each prompt gets `n` choices; choice indexes run on across prompts, as OpenAI's
//! do (prompt k, choice j is index k·n + j).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::ApiError;
use crate::generation::{self, Generation, Outcome, SamplingFields};
use crate::metrics::Route;
use crate::native::TextModel;
use crate::openai::{
    CompletionRequest, FinishReason, Input, ReplyId, TextChoice, TextCompletion, Usage,
    NATIVE_FINGERPRINT, SYSTEM_FINGERPRINT,
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
    let mut request: CompletionRequest = parse_body(body)?;
    let model = required(request.model.take(), "model")?;
    let prompts = required(request.prompt.take(), "prompt")?.0;
    if prompts.is_empty() {
        return Err(ApiError::invalid_value(
            "prompt",
            "the list of prompts must not be empty",
        ));
    }
    let n = choice_count(request.n)?;
    let cap = token_cap(request.max_tokens, None)?;
    let served = state.text_model(&model, "/v1/completions")?;
    let model = served.name.clone();
    if let ModelEngine::Text(engine) = &served.engine {
        let engine = engine.clone();
        return native_completions(&state, model, &engine, request, prompts, n, cap).await;
    }

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
        fingerprint: SYSTEM_FINGERPRINT,
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

/// Text completions from a native decoder: each prompt as given (text is tokenized, with
/// the model's BOS token when it wants one; token lists are taken as they are), no template.
async fn native_completions(
    state: &Arc<AppState>,
    model: String,
    engine: &TextModel,
    request: CompletionRequest,
    inputs: Vec<Input>,
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
    let tokenizer = engine.tokenizer();
    let vocab = tokenizer.vocab_size();
    let prompts = inputs
        .into_iter()
        .map(|input| match input {
            Input::Text(text) => tokenizer.encode(&text).map_err(ApiError::Generation),
            Input::Tokens(ids) => match ids.iter().find(|&&id| id as usize >= vocab) {
                Some(id) => Err(ApiError::invalid_value(
                    "prompt",
                    format!("token {id} is not in the model's vocabulary of {vocab}"),
                )),
                None => Ok(ids),
            },
        })
        .collect::<Result<Vec<_>, _>>()?;
    let generation = Generation {
        prompts,
        n,
        cap,
        params,
        stop,
        prompt_param: "prompt",
    };
    let reply_id = ReplyId::new("cmpl");
    let stream = sse::StreamRequest {
        stream: request.stream,
        options: request.stream_options.as_ref(),
        user: request.user.as_deref(),
    };
    let writer = |include_usage| TextChunks {
        reply_id: reply_id.clone(),
        model: model.clone(),
        fingerprint: NATIVE_FINGERPRINT,
        include_usage,
    };
    let (choices, usage) = match generation::run(state, engine, generation, stream, writer).await? {
        Outcome::Streamed(response) => return Ok(response),
        Outcome::Finished { choices, usage } => (choices, usage),
    };
    let completion = TextCompletion {
        id: &reply_id.id,
        object: "text_completion",
        created: reply_id.created,
        model: &model,
        system_fingerprint: NATIVE_FINGERPRINT,
        choices: choices
            .iter()
            .map(|choice| TextChoice {
                text: &choice.text,
                index: choice.index,
                logprobs: None,
                finish_reason: Some(choice.finish_reason),
            })
            .collect(),
        usage: Some(Some(usage)),
    };
    Ok(Json(completion).into_response())
}

struct TextChunks {
    reply_id: ReplyId,
    model: String,
    /// Which engine wrote the reply (`system_fingerprint`).
    fingerprint: &'static str,
    include_usage: bool,
}

impl TextChunks {
    fn chunk(&self, choice: Option<TextChoice<'_>>, usage: Option<Usage>) -> Bytes {
        sse::event(&TextCompletion {
            id: &self.reply_id.id,
            object: "text_completion",
            created: self.reply_id.created,
            model: &self.model,
            system_fingerprint: self.fingerprint,
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
