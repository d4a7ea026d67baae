//! Turns a question into a unit vector through an OpenAI-compatible `/v1/embeddings`
//! endpoint (the backend's MiniLM, or any other). A failure is a cache miss, never an error
//! the client sees.

use super::index::normalise;
use serde::Deserialize;
use std::time::Duration;

pub struct Embedder {
    http: reqwest::Client,
    url: String,
    model: String,
    api_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("embedding endpoint unreachable: {0}")]
    Http(#[from] reqwest::Error),
    #[error("embedding endpoint answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("embedding endpoint returned no vector")]
    Empty,
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
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .expect("an HTTP client without TLS builds");
        Embedder {
            http,
            url,
            model,
            api_key,
        }
    }

    pub async fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let mut request = self.http.post(&self.url).json(&serde_json::json!({
            "model": self.model,
            "input": text,
            "encoding_format": "float",
        }));
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(EmbedError::Status {
                status: status.as_u16(),
                body: body.chars().take(200).collect(),
            });
        }
        let list: EmbeddingList = response.json().await?;
        let mut vector = list
            .data
            .into_iter()
            .next()
            .map(|d| d.embedding)
            .filter(|v| !v.is_empty())
            .ok_or(EmbedError::Empty)?;
        normalise(&mut vector);
        Ok(vector)
    }
}
