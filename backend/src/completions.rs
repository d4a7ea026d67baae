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
use crate::generation::{self, Generation, SamplingFields};
use crate::metrics::Route;
use crate::native::TextModel;
use crate::openai::{
    CompletionRequest, FinishReason, Input, ReplyId, TextChoice, TextCompletion, Usage,
    NATIVE_FINGERPRINT, SYSTEM_FINGERPRINT,
};
use crate::request::{choice_count, parse_body, required, token_cap};
use crate::sim::{self, count_input_tokens};
use crate::sse::{self, ChunkWriter, Outcome, Sequence};
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
    let sampling = SamplingFields::of_completion(&mut request);

    let native = match &served.engine {
        ModelEngine::Text(engine) => Some(engine.clone()),
        _ => None,
    };
    let fingerprint = match native {
        Some(_) => NATIVE_FINGERPRINT,
        None => SYSTEM_FINGERPRINT,
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
        fingerprint,
        include_usage,
    };
    let outcome = match native {
        Some(engine) => {
            let generation = native_prompts(&engine, prompts, n, cap, sampling)?;
            generation::run(&state, &engine, generation, stream, writer).await?
        }
        None => {
            let (len, finish_reason) = state.sim.reply_length(cap);
            let mut prompt_tokens = 0;
            let mut sequences = Vec::with_capacity(prompts.len() * n as usize);
            for (k, prompt) in prompts.iter().enumerate() {
                prompt_tokens += count_input_tokens(prompt);
                let text = prompt.to_text();
                // The reply depends on the choice's place within its prompt, not in the
                // batch, so a prompt gets the same reply alone or among others.
                sequences.extend((0..n).map(|j| Sequence {
                    index: (k as u32).saturating_mul(n).saturating_add(j),
                    tokens: sim::reply_tokens(&text, request.seed, j, len),
                    finish_reason,
                }));
            }
            let usage = Usage::new(prompt_tokens, len as u64 * sequences.len() as u64);
            state.metrics.add_prompt_tokens(prompt_tokens);
            sse::stream_or_finish(&state, stream, writer, sequences, usage, len).await
        }
    };
    let (choices, usage) = match outcome {
        Outcome::Streamed(response) => return Ok(response),
        Outcome::Finished { choices, usage } => (choices, usage),
    };
    let completion = TextCompletion {
        id: &reply_id.id,
        object: "text_completion",
        created: reply_id.created,
        model: &model,
        system_fingerprint: fingerprint,
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

/// What a native decoder generates for text completions: each prompt as given (text is
/// tokenized, with the model's BOS token when it wants one; token lists are taken as they
/// are), no template, `n` choices each.
fn native_prompts(
    engine: &TextModel,
    inputs: Vec<Input>,
    n: u32,
    cap: Option<u32>,
    sampling: SamplingFields,
) -> Result<Generation, ApiError> {
    let (params, stop) = sampling.check()?;
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
    Ok(Generation {
        prompts,
        n,
        cap,
        params,
        stop,
        prompt_param: "prompt",
    })
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
