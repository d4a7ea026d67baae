//! How the cache calls a model service it depends on (the embeddings endpoint, a verifier):
//! one JSON POST with an optional bearer key and a timeout, over http:// or https://; any
//! failure is the caller's miss.

use crate::outbound::{Outbound, Target};
use serde::de::DeserializeOwned;
use std::time::Duration;

pub struct JsonEndpoint {
    http: Outbound,
    pub url: String,
    /// The URL resolved at the first call (and again after a failed resolution).
    target: tokio::sync::OnceCell<Target>,
    authorization: Option<String>,
    timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("unreachable: {0}")]
    Http(String),
    #[error("answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("answered something that is not the JSON expected: {0}")]
    Json(#[from] serde_json::Error),
    #[error("answered without {0}")]
    Empty(&'static str),
}

impl JsonEndpoint {
    pub fn new(url: String, api_key: Option<String>, timeout: Duration) -> JsonEndpoint {
        JsonEndpoint {
            http: Outbound::default(),
            url,
            target: tokio::sync::OnceCell::new(),
            authorization: api_key.map(|key| format!("Bearer {key}")),
            timeout,
        }
    }

    /// POSTs `body` and reads the answer as `T`; a status other than 2xx is an error that
    /// quotes the start of the answer.
    pub async fn post<T: DeserializeOwned>(
        &self,
        body: &serde_json::Value,
    ) -> Result<T, EndpointError> {
        let target = self
            .target
            .get_or_try_init(|| Target::resolve(&self.url))
            .await
            .map_err(EndpointError::Http)?;
        let mut headers = vec![("content-type", "application/json")];
        if let Some(authorization) = &self.authorization {
            headers.push(("authorization", authorization));
        }
        let body = serde_json::to_vec(body)?;
        let answer = self
            .http
            .call_target(target, "POST", &headers, Some(body.into()), self.timeout)
            .await
            .map_err(EndpointError::Http)?;
        if !answer.is_success() {
            return Err(EndpointError::Status {
                status: answer.status,
                body: String::from_utf8_lossy(&answer.body)
                    .chars()
                    .take(200)
                    .collect(),
            });
        }
        Ok(serde_json::from_slice(&answer.body)?)
    }
}
