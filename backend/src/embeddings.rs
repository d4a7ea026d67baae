//! `POST /v1/embeddings`: simulated embeddings, as floats or as base64.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::ApiError;
use crate::metrics::Route;
use crate::openai::{
    EmbeddingData, EmbeddingList, EmbeddingRequest, EmbeddingUsage, EmbeddingVector, Input,
};
use crate::request::{parse_body, required};
use crate::sim::{self, count_input_tokens};
use crate::state::AppState;

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
    let inputs = required(request.input, "input")?.0;
    if inputs.is_empty() || inputs.iter().any(Input::is_empty) {
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
    let full_dim = state.sim.embedding_dim;
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
    let model = state.model(&model)?;

    let mut prompt_tokens = 0;
    let data = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            prompt_tokens += count_input_tokens(input);
            let mut vector = sim::embed(&input.to_text(), full_dim);
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
    state.metrics.add_prompt_tokens(prompt_tokens);

    let list = EmbeddingList {
        object: "list",
        data,
        model,
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    };
    Ok(Json(list).into_response())
}
