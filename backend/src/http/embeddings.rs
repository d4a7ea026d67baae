//! What are these inputs' embeddings? `POST /v1/embeddings`, from the served model
//! (simulated, or a real encoder), as floats or as base64.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::metrics::Route;
use super::openai::{
    EmbeddingData, EmbeddingList, EmbeddingRequest, EmbeddingUsage, EmbeddingVector,
};
use super::request::{parse_body, required};
use super::state::{AppState, ModelEngine};
use crate::engine::sim::{self, count_input_tokens};
use crate::engine::ModelInput;

/// OpenAI's limit on inputs per request; it also bounds one request's turn on an engine.
const MAX_INPUTS: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Float,
    /// What the Python `openai` client asks for unless told otherwise.
    Base64,
}

pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    state.metrics.record_request(Route::Embeddings);
    let request: EmbeddingRequest = parse_body(body)?;
    let model = required(request.model, "model")?;
    let inputs: Vec<ModelInput> = required(request.input, "input")?
        .0
        .into_iter()
        .map(ModelInput::from)
        .collect();
    if inputs.is_empty() || inputs.iter().any(ModelInput::is_empty) {
        return Err(ApiError::invalid_value(
            "input",
            "the input must not be empty, nor contain an empty string or token list",
        ));
    }
    let encoding = match request.encoding_format.as_deref() {
        None | Some("float") => Encoding::Float,
        Some("base64") => Encoding::Base64,
        Some(other) => {
            return Err(ApiError::invalid_value(
                "encoding_format",
                format!("`{other}` is not supported; use `float` or `base64`"),
            ))
        }
    };
    let served = state.model(&model)?;
    // `None`: the simulated engine.
    let encoder = match &served.engine {
        ModelEngine::Sim => None,
        ModelEngine::Embedding(model) => Some(model),
        ModelEngine::Text(_) => {
            return Err(ApiError::ChatOnly {
                model: served.name.clone(),
                route: "/v1/embeddings",
            })
        }
    };
    let full_dim = encoder.map_or(state.sim.embedding_dim, |model| model.dim());
    let dim = match request.dimensions {
        None => full_dim,
        Some(dim) if dim >= 1 && dim as u64 <= full_dim as u64 => dim as usize,
        Some(dim) => {
            return Err(ApiError::invalid_value(
                "dimensions",
                format!(
                "{dim} is out of range; this model's embeddings have 1 to {full_dim} dimensions"
            ),
            ))
        }
    };

    let (vectors, prompt_tokens) = match encoder {
        None => {
            let prompt_tokens = inputs.iter().map(count_input_tokens).sum();
            let vectors = inputs
                .iter()
                .map(|input| sim::embed(&sim::input_text(input), full_dim))
                .collect::<Vec<_>>();
            (vectors, prompt_tokens)
        }
        Some(model) => {
            if inputs.len() > MAX_INPUTS {
                return Err(ApiError::invalid_value(
                    "input",
                    format!(
                        "{} inputs is too many; send at most {MAX_INPUTS} per request",
                        inputs.len()
                    ),
                ));
            }
            let _running = state.metrics.running();
            let embedded = model.embed(inputs).await?;
            (embedded.vectors, embedded.tokens)
        }
    };
    state.metrics.add_prompt_tokens(prompt_tokens);

    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, mut vector)| {
            if dim < full_dim {
                vector = sim::truncate(vector, dim);
            }
            EmbeddingData {
                object: "embedding",
                index: index as u32,
                embedding: match encoding {
                    Encoding::Float => EmbeddingVector::Float(vector),
                    Encoding::Base64 => EmbeddingVector::Base64(sim::to_base64(&vector)),
                },
            }
        })
        .collect();
    let list = EmbeddingList {
        object: "list",
        data,
        model: &served.name,
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    };
    Ok(Json(list).into_response())
}
