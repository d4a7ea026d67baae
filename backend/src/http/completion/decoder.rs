//! How does a native decoder answer a chat or text completion request? Each prompt checked
//! against the context, `n` choices of every prompt queued on the model's engine thread,
//! then streamed as they come or collected for one JSON body.

use std::sync::Arc;

use crate::engine::constraint::{Constraint, Format};
use crate::engine::generator::{self, GenerateJob};
use crate::engine::sampling::SamplingParams;
use crate::engine::TextModel;
use crate::http::error::ApiError;
use crate::http::openai::Usage;
use crate::http::sse::{self, Choice, ChunkWriter, Outcome, StreamRequest};
use crate::http::state::AppState;

/// What to generate: token prompts, `n` choices of each, within a cap.
pub struct GenerationRequest {
    pub prompts: Vec<Vec<u32>>,
    pub n: u32,
    pub cap: Option<u32>,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    pub speculate: bool,
    /// `Some(k)`: each token's log probability and the `k` likeliest tokens'.
    pub logprobs: Option<usize>,
    /// The format every reply must follow (`response_format`).
    pub format: Option<Format>,
    /// The request field the prompts came from, named when one is too long.
    pub prompt_param: &'static str,
}

/// Compiles `format` for `engine`'s vocabulary, off the async runtime (a large schema takes
/// milliseconds). A schema the parser cannot follow is the client's error.
async fn constraint(
    engine: &Arc<TextModel>,
    format: Option<Format>,
) -> Result<Option<Constraint>, ApiError> {
    let Some(format) = format else {
        return Ok(None);
    };
    let engine = engine.clone();
    let compiled = tokio::task::spawn_blocking(move || engine.formats().compile(&format))
        .await
        .map_err(|err| ApiError::Generation(format!("the format compiler failed: {err}")))?;
    compiled
        .map(Some)
        .map_err(|err| ApiError::invalid_value("response_format", err.0))
}

/// Runs `request` on `engine`: streamed through `writer` (told whether the client asked
/// for a usage chunk) when `stream` asks for it, else collected.
pub async fn run<W: ChunkWriter>(
    state: &Arc<AppState>,
    engine: &Arc<TextModel>,
    request: GenerationRequest,
    stream: StreamRequest<'_>,
    writer: impl FnOnce(bool) -> W,
) -> Result<Outcome, ApiError> {
    let context = engine.context_length();
    for prompt in &request.prompts {
        if prompt.is_empty() {
            return Err(ApiError::invalid_value(
                request.prompt_param,
                "the prompt is empty; give at least one token of text",
            ));
        }
        if prompt.len() >= context {
            return Err(ApiError::ContextLengthExceeded {
                context,
                prompt: prompt.len(),
                param: request.prompt_param,
            });
        }
    }
    let vocab = engine.tokenizer().vocab_size();
    if let Some(&(id, _)) = request
        .params
        .logit_bias
        .iter()
        .find(|&&(id, _)| id as usize >= vocab)
    {
        return Err(ApiError::invalid_value(
            "logit_bias",
            format!("token {id} is not in the model's vocabulary of {vocab}"),
        ));
    }
    let constraint = constraint(engine, request.format).await?;
    let prompt_tokens: u64 = request.prompts.iter().map(|p| p.len() as u64).sum();
    let mut choices = Vec::with_capacity(request.prompts.len() * request.n as usize);
    for (k, prompt) in request.prompts.iter().enumerate() {
        // A cap beyond the context is cut to it: the reply then ends with `length` there.
        let room = context - prompt.len();
        let max_tokens = request.cap.map_or(room, |cap| (cap as usize).min(room));
        for j in 0..request.n {
            let mut params = request.params.clone();
            // Each choice draws its own stream; with a seed, reproducibly so.
            params.seed = params.seed.map(|seed| seed.wrapping_add(u64::from(j)));
            let (reply, pieces) = tokio::sync::mpsc::unbounded_channel();
            let queued = engine.generate(GenerateJob {
                prompt: prompt.clone(),
                params,
                max_tokens,
                stop: request.stop.clone(),
                speculate: request.speculate,
                logprobs: request.logprobs,
                constraint: constraint.clone(),
                reply,
            });
            if !queued {
                return Err(ApiError::Generation("the engine has stopped".to_owned()));
            }
            let index = (k as u32).saturating_mul(request.n).saturating_add(j);
            choices.push((index, pieces));
        }
    }
    state.metrics.add_prompt_tokens(prompt_tokens);

    if stream.stream.unwrap_or(false) {
        let include_usage = stream
            .options
            .and_then(|options| options.include_usage)
            .unwrap_or(false);
        let job = sse::LiveJob {
            writer: writer(include_usage),
            choices,
            prompt_tokens,
            include_usage,
            logprobs: request.logprobs.is_some(),
        };
        return Ok(Outcome::Streamed(sse::respond_live(state.clone(), job)));
    }

    let _running = state.metrics.running();
    let replies =
        futures::future::try_join_all(choices.into_iter().map(|(index, pieces)| async move {
            generator::collect(pieces).await.map(|reply| (index, reply))
        }))
        .await
        .map_err(ApiError::Generation)?;
    let completion_tokens = replies.iter().map(|(_, r)| r.completion_tokens).sum();
    state.metrics.add_generated_tokens(completion_tokens);
    let with_logprobs = request.logprobs.is_some();
    Ok(Outcome::Finished {
        choices: replies
            .into_iter()
            .map(|(index, reply)| Choice {
                index,
                text: reply.text,
                finish_reason: reply.finish.into(),
                logprobs: with_logprobs.then_some(reply.logprobs),
            })
            .collect(),
        usage: Usage::new(prompt_tokens, completion_tokens),
    })
}
