//! How the cache calls a model service it depends on (the embeddings endpoint, a verifier):
//! one JSON POST with an optional bearer key and a timeout, over http:// or https://; any
//! failure is the caller's miss.

use crate::outbound::{Outbound, Target};
use arc_swap::ArcSwapOption;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a resolved URL is used before its host is looked up again, so that a service
/// whose address changes is followed.
const RESOLVE_AGAIN_AFTER: Duration = Duration::from_secs(30);

pub struct JsonEndpoint {
    http: Outbound,
    pub url: String,
    /// The URL as last resolved, and when (see [`RESOLVE_AGAIN_AFTER`]).
    target: ArcSwapOption<(Target, Instant)>,
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
            target: ArcSwapOption::empty(),
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
        let target = self.target().await.map_err(EndpointError::Http)?;
        let mut headers = vec![("content-type", "application/json")];
        if let Some(authorization) = &self.authorization {
            headers.push(("authorization", authorization));
        }
        let body = serde_json::to_vec(body)?;
        let answer = self
            .http
            .call_target(&target.0, "POST", &headers, Some(body.into()), self.timeout)
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

    /// The resolved URL: looked up at the first call and again once it is
    /// [`RESOLVE_AGAIN_AFTER`] old. A lookup that fails keeps the last address for another
    /// while (so a resolver outage costs one lookup per period, not one per request).
    async fn target(&self) -> Result<Arc<(Target, Instant)>, String> {
        let last = self.target.load_full();
        if let Some(last) = last
            .as_ref()
            .filter(|t| t.1.elapsed() < RESOLVE_AGAIN_AFTER)
        {
            return Ok(last.clone());
        }
        let fresh = match Target::resolve(&self.url).await {
            Ok(target) => Arc::new((target, Instant::now())),
            Err(e) => match last {
                Some(last) => {
                    tracing::warn!(url = %self.url, error = %e, "cannot resolve again; keeping the last address");
                    Arc::new((last.0.clone(), Instant::now()))
                }
                None => return Err(e),
            },
        };
        self.target.store(Some(fresh.clone()));
        Ok(fresh)
    }
}
