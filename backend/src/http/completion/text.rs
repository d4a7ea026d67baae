//! `POST /v1/completions`: what is particular to a legacy text completion. Its prompt is a
//! list of prompts (text, or token ids), each taken as given, with no template; each prompt
//! gets `n` choices, whose indexes run on across prompts as OpenAI's do (prompt k, choice j
//! is index k·n + j). A stream's chunks are `text_completion` objects, with no role to
//! announce.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::output;
use super::sampling::SamplingFields;
use super::{Asked, CompletionRoute, ReplyHeader};
use crate::engine::generator::Logprob;
use crate::engine::sim::{self, count_input_tokens};
use crate::engine::speculation;
use crate::engine::{Finish, ModelInput, TextModel};
use crate::http::error::ApiError;
use crate::http::honoured::first_unhonoured;
use crate::http::metrics::Route;
use crate::http::openai::{
    CompletionRequest, FinishReason, TextChoice, TextCompletion, TextLogprobs, Usage,
};
use crate::http::request::{choice_count, required, token_cap};
use crate::http::sse::{self, Choice, ChunkWriter, Sequence};

/// The text completion route.
pub struct Text;

impl CompletionRoute for Text {
    type Request = CompletionRequest;
    type Prompt = Vec<ModelInput>;
    type Chunks = TextChunks;

    const ROUTE: Route = Route::Completions;
    const PATH: &'static str = "/v1/completions";
    const ID_PREFIX: &'static str = "cmpl";
    const PROMPT_PARAM: &'static str = "prompt";

    fn read(request: CompletionRequest) -> Result<Asked<Vec<ModelInput>>, ApiError> {
        let model = required(request.model, "model")?;
        let prompts = required(request.prompt, "prompt")?.0;
        if prompts.is_empty() {
            return Err(ApiError::invalid_value(
                "prompt",
                "the list of prompts must not be empty",
            ));
        }
        let logprobs = output::completion_logprobs(request.logprobs.as_ref())?;
        Ok(Asked {
            model,
            prompt: prompts.into_iter().map(ModelInput::from).collect(),
            n: choice_count(request.n)?,
            cap: token_cap(request.max_tokens, None)?,
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
            unhonoured: first_unhonoured([
                ("echo", request.echo.as_ref()),
                ("suffix", request.suffix.as_ref()),
                ("best_of", request.best_of.as_ref()),
            ]),
            speculate: request
                .speculative_decoding
                .unwrap_or(speculation::ON_BY_DEFAULT),
            logprobs,
            format: None,
            tool_call: false,
        })
    }

    fn simulate(
        prompts: &Vec<ModelInput>,
        seed: Option<i64>,
        n: u32,
        len: usize,
        finish: Finish,
    ) -> (Vec<Sequence>, u64) {
        let mut prompt_tokens = 0;
        let mut sequences = Vec::with_capacity(prompts.len() * n as usize);
        for (k, prompt) in prompts.iter().enumerate() {
            prompt_tokens += count_input_tokens(prompt);
            let text = sim::input_text(prompt);
            // The reply depends on the choice's place within its prompt, not in the batch,
            // so a prompt gets the same reply alone or among others.
            sequences.extend((0..n).map(|j| Sequence {
                index: (k as u32).saturating_mul(n).saturating_add(j),
                tokens: sim::reply_tokens(&text, seed, j, len),
                finish_reason: finish.into(),
            }));
        }
        (sequences, prompt_tokens)
    }

    /// Each prompt as given: text is tokenized, with the model's BOS token when it wants
    /// one; token lists are taken as they are, once checked against the vocabulary.
    fn tokenize(engine: &TextModel, prompts: Vec<ModelInput>) -> Result<Vec<Vec<u32>>, ApiError> {
        let tokenizer = engine.tokenizer();
        let vocab = tokenizer.vocab_size();
        prompts
            .into_iter()
            .map(|prompt| match prompt {
                ModelInput::Text(text) => tokenizer.encode(&text).map_err(ApiError::Generation),
                ModelInput::Tokens(ids) => match ids.iter().find(|&&id| id as usize >= vocab) {
                    Some(id) => Err(ApiError::invalid_value(
                        "prompt",
                        format!("token {id} is not in the model's vocabulary of {vocab}"),
                    )),
                    None => Ok(ids),
                },
            })
            .collect()
    }

    /// Text completions have no tools: `tool_call` is never set.
    fn chunks(header: ReplyHeader, include_usage: bool, _tool_call: bool) -> TextChunks {
        TextChunks {
            header,
            include_usage,
            offsets: HashMap::new(),
        }
    }

    fn body(
        header: &ReplyHeader,
        choices: Vec<Choice>,
        usage: Usage,
        _tool_call: bool,
    ) -> Response {
        let completion = TextCompletion {
            id: &header.id.id,
            object: "text_completion",
            created: header.id.created,
            model: &header.model,
            system_fingerprint: header.fingerprint,
            choices: choices
                .iter()
                .map(|choice| TextChoice {
                    text: &choice.text,
                    index: choice.index,
                    logprobs: choice.logprobs.as_deref().map(|l| TextLogprobs::new(l, 0)),
                    finish_reason: Some(choice.finish_reason),
                })
                .collect(),
            usage: Some(Some(usage)),
        };
        Json(completion).into_response()
    }
}

/// A text completion's stream events.
pub struct TextChunks {
    header: ReplyHeader,
    include_usage: bool,
    /// Where each choice's next token starts in its text, in characters (`text_offset`).
    offsets: HashMap<u32, usize>,
}

impl TextChunks {
    fn chunk(&self, choice: Option<TextChoice<'_>>, usage: Option<Usage>) -> Bytes {
        sse::event(&TextCompletion {
            id: &self.header.id.id,
            object: "text_completion",
            created: self.header.id.created,
            model: &self.header.model,
            system_fingerprint: self.header.fingerprint,
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

    fn token(&mut self, index: u32, text: &str, logprobs: Option<&[Logprob]>) -> Bytes {
        let logprobs = logprobs.map(|tokens| {
            let offset = self.offsets.entry(index).or_default();
            let logprobs = TextLogprobs::new(tokens, *offset);
            if !tokens.is_empty() {
                *offset = logprobs.end();
            }
            logprobs
        });
        let choice = TextChoice {
            logprobs,
            ..choice(index, text, None)
        };
        self.chunk(Some(choice), None)
    }

    fn finish(&mut self, index: u32, reason: FinishReason) -> Bytes {
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
