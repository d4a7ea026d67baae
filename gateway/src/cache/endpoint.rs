//! How the cache calls a model service it depends on (the embeddings endpoint, a verifier):
//! one JSON POST with an optional bearer key and a timeout; any failure is the caller's miss.

use serde::de::DeserializeOwned;
use std::time::Duration;

pub struct JsonEndpoint {
    http: reqwest::Client,
    pub url: String,
    api_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("unreachable: {0}")]
    Http(#[from] reqwest::Error),
    #[error("answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("answered without {0}")]
    Empty(&'static str),
}

impl JsonEndpoint {
    pub fn new(url: String, api_key: Option<String>, timeout: Duration) -> JsonEndpoint {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .expect("an HTTP client builds");
        JsonEndpoint { http, url, api_key }
    }

    /// POSTs `body` and reads the answer as `T`; a status other than 2xx is an error that
    /// quotes the start of the answer.
    pub async fn post<T: DeserializeOwned>(
        &self,
        body: &serde_json::Value,
    ) -> Result<T, EndpointError> {
        let mut request = self.http.post(&self.url).json(body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(EndpointError::Status {
                status: status.as_u16(),
                body: body.chars().take(200).collect(),
            });
        }
        Ok(response.json().await?)
    }
}
