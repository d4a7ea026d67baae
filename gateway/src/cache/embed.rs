//! Turns a question into a unit vector through an OpenAI-compatible `/v1/embeddings`
//! endpoint (the backend's MiniLM, or any other). A failure is a cache miss, never an error
//! the client sees.

use super::endpoint::{EndpointError, JsonEndpoint};
use super::index::normalise;
use serde::Deserialize;
use std::time::Duration;

pub struct Embedder {
    endpoint: JsonEndpoint,
    model: String,
}

#[derive(Deserialize)]
struct EmbeddingList {
    data: Vec<EmbeddingData>,
}

#[derive(Deserialize)]
struct EmbeddingData {
    embedding: Vec<f32>,
}

impl Embedder {
    pub fn new(url: String, model: String, api_key: Option<String>, timeout: Duration) -> Self {
        Embedder {
            endpoint: JsonEndpoint::new(url, api_key, timeout),
            model,
        }
    }

    pub async fn embed(&self, text: &str) -> Result<Vec<f32>, EndpointError> {
        let list: EmbeddingList = self
            .endpoint
            .post(&serde_json::json!({
                "model": self.model,
                "input": text,
                "encoding_format": "float",
            }))
            .await?;
        let mut vector = list
            .data
            .into_iter()
            .next()
            .map(|d| d.embedding)
            .filter(|v| !v.is_empty())
            .ok_or(EndpointError::Empty("a vector"))?;
        normalise(&mut vector);
        Ok(vector)
    }
}
