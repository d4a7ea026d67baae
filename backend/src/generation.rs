//! A native decoder's reply to a chat or text completion request: the request's sampling
//! parameters checked, each prompt checked against the context, `n` choices of every prompt
//! queued on the model's engine, then streamed as they come or collected for one JSON body.
//!
//! Chat and text completions differ only in how they build their prompts and how a chunk or
//! a body looks; everything between the tokens and the engine is here.

use std::sync::Arc;

use crate::error::ApiError;
use crate::native::generator::{self, GenerateJob};
use crate::native::sampling::SamplingParams;
use crate::native::TextModel;
use crate::openai::{ChatCompletionRequest, CompletionRequest, Stop, Usage};
use crate::sse::{self, Choice, ChunkWriter, Outcome, StreamRequest};
use crate::state::AppState;

/// The sampling fields of a chat or text completion request, as sent.
pub struct SamplingFields {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
}

/// What to generate: token prompts, `n` choices of each, within a cap.
pub struct Generation {
    pub prompts: Vec<Vec<u32>>,
    pub n: u32,
    pub cap: Option<u32>,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    /// The request field the prompts came from, named when one is too long.
    pub prompt_param: &'static str,
}

/// The most stop strings a request may give, as OpenAI allows.
const MAX_STOPS: usize = 4;

impl SamplingFields {
    /// A chat request's sampling fields; its stop strings are taken out of it.
    pub fn of_chat(request: &mut ChatCompletionRequest) -> Self {
        SamplingFields {
            temperature: request.temperature,
            top_p: request.top_p,
            top_k: request.top_k,
            presence_penalty: request.presence_penalty,
            frequency_penalty: request.frequency_penalty,
            seed: request.seed,
            stop: request.stop.take(),
        }
    }

    /// A text completion request's sampling fields; its stop strings are taken out of it.
    pub fn of_completion(request: &mut CompletionRequest) -> Self {
        SamplingFields {
            temperature: request.temperature,
            top_p: request.top_p,
            top_k: request.top_k,
            presence_penalty: request.presence_penalty,
            frequency_penalty: request.frequency_penalty,
            seed: request.seed,
            stop: request.stop.take(),
        }
    }

    /// The parameters in OpenAI's ranges, and the stop strings.
    pub fn check(self) -> Result<(SamplingParams, Vec<String>), ApiError> {
        let ranged =
            |param: &'static str, value: Option<f64>, min: f64, max: f64, default| match value {
                None => Ok(default),
                Some(v) if (min..=max).contains(&v) => Ok(v as f32),
                Some(v) => Err(ApiError::invalid_value(
                    param,
                    format!("{v} is out of range; it must be between {min} and {max}"),
                )),
            };
        let defaults = SamplingParams::default();
        let top_p = ranged("top_p", self.top_p, 0.0, 1.0, defaults.top_p)?;
        if top_p == 0.0 {
            return Err(ApiError::invalid_value(
                "top_p",
                "0 keeps no token; it must be above 0",
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) => 0,
            Some(k @ 0..) => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => {
                return Err(ApiError::invalid_value(
                    "top_k",
                    format!(
                        "{k} is out of range; give 0 (or -1) for no limit, or a positive count"
                    ),
                ))
            }
        };
        let stop = self.stop.map(Stop::into_vec).unwrap_or_default();
        if stop.len() > MAX_STOPS {
            return Err(ApiError::invalid_value(
                "stop",
                format!(
                    "{} stop sequences; at most {MAX_STOPS} are allowed",
                    stop.len()
                ),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid_value(
                "stop",
                "a stop sequence must not be empty",
            ));
        }
        let params = SamplingParams {
            temperature: ranged(
                "temperature",
                self.temperature,
                0.0,
                2.0,
                defaults.temperature,
            )?,
            top_p,
            top_k,
            presence_penalty: ranged("presence_penalty", self.presence_penalty, -2.0, 2.0, 0.0)?,
            frequency_penalty: ranged("frequency_penalty", self.frequency_penalty, -2.0, 2.0, 0.0)?,
            // The seed's bits, whatever its sign: any i64 names a distinct stream.
            seed: self.seed.map(|seed| seed as u64),
        };
        Ok((params, stop))
    }
}

/// Runs `generation` on `engine`: streamed through `writer` (told whether the client asked
/// for a usage chunk) when `stream` asks for it, else collected.
pub async fn run<W: ChunkWriter>(
    state: &Arc<AppState>,
    engine: &TextModel,
    generation: Generation,
    stream: StreamRequest<'_>,
    writer: impl FnOnce(bool) -> W,
) -> Result<Outcome, ApiError> {
    let context = engine.context_length();
    for prompt in &generation.prompts {
        if prompt.is_empty() {
            return Err(ApiError::invalid_value(
                generation.prompt_param,
                "the prompt is empty; give at least one token of text",
            ));
        }
        if prompt.len() >= context {
            return Err(ApiError::ContextLengthExceeded {
                context,
                prompt: prompt.len(),
                param: generation.prompt_param,
            });
        }
    }
    let prompt_tokens: u64 = generation.prompts.iter().map(|p| p.len() as u64).sum();
    let mut choices = Vec::with_capacity(generation.prompts.len() * generation.n as usize);
    for (k, prompt) in generation.prompts.iter().enumerate() {
        // A cap beyond the context is cut to it: the reply then ends with `length` there.
        let room = context - prompt.len();
        let max_tokens = generation.cap.map_or(room, |cap| (cap as usize).min(room));
        for j in 0..generation.n {
            let mut params = generation.params.clone();
            // Each choice draws its own stream; with a seed, reproducibly so.
            params.seed = params.seed.map(|seed| seed.wrapping_add(u64::from(j)));
            let (reply, pieces) = tokio::sync::mpsc::unbounded_channel();
            let queued = engine.generate(GenerateJob {
                prompt: prompt.clone(),
                params,
                max_tokens,
                stop: generation.stop.clone(),
                reply,
            });
            if !queued {
                return Err(ApiError::Generation("the engine has stopped".to_owned()));
            }
            let index = (k as u32).saturating_mul(generation.n).saturating_add(j);
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
        };
        return Ok(Outcome::Streamed(sse::respond_live(state.clone(), job)));
    }

    let _running = state.metrics.running();
    let replies =
        futures::future::try_join_all(choices.into_iter().map(|(index, pieces)| async move {
            generator::collect(pieces)
                .await
                .map(|(text, finish, tokens)| (index, text, finish, tokens))
        }))
        .await
        .map_err(ApiError::Generation)?;
    let completion_tokens = replies.iter().map(|reply| reply.3).sum();
    state.metrics.add_generated_tokens(completion_tokens);
    Ok(Outcome::Finished {
        choices: replies
            .into_iter()
            .map(|(index, text, finish, _)| Choice {
                index,
                text,
                finish_reason: finish.into(),
            })
            .collect(),
        usage: Usage::new(prompt_tokens, completion_tokens),
    })
}
