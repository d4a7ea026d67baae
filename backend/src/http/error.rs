//! What went wrong with a request, and how is a client told?
//!
//! Every failure a handler can meet is one `ApiError` variant, and `IntoResponse` below is the
//! only place that turns one into HTTP: OpenAI's `{"error":{...}}` shape with the right
//! status. Clients (and the gateway's own error handling) parse that shape, so no handler may
//! build an error body by hand.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::engine::EmbedError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON at all; the message is serde's, which says where.
    #[error("We could not parse the JSON body of your request: {0}")]
    InvalidJson(String),

    /// The body could not be read (too large, connection cut); the status comes from axum.
    #[error("We could not read the body of your request: {message}")]
    UnreadableBody { status: StatusCode, message: String },

    #[error("Missing required parameter: '{0}'.")]
    MissingParameter(&'static str),

    /// A field has the wrong JSON type or a malformed shape; `message` is serde's.
    #[error("Invalid type for '{param}': {message}")]
    InvalidType { param: String, message: String },

    /// A field is well-typed but out of range or not one of the allowed values.
    #[error("Invalid value for '{param}': {message}")]
    InvalidValue { param: String, message: String },

    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),

    #[error("Invalid URL ({method} {path})")]
    UnknownRoute { method: String, path: String },

    #[error("Method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },

    /// A chat or completion request named a model that only computes embeddings.
    #[error("The model `{model}` only serves embeddings (POST /v1/embeddings); it cannot answer {route}.")]
    EmbeddingsOnly { model: String, route: &'static str },

    /// A completion or embedding request named a decoder that serves chat only.
    #[error(
        "The model `{model}` generates text (POST /v1/chat/completions and /v1/completions); it cannot answer {route}."
    )]
    ChatOnly { model: String, route: &'static str },

    /// The prompt leaves no room for a reply within the model's context.
    #[error("This model's maximum context length is {context} tokens. However, your {param} resulted in {prompt} tokens.")]
    ContextLengthExceeded {
        context: usize,
        prompt: usize,
        /// `messages` or `prompt`.
        param: &'static str,
    },

    /// A field asks for what the model's engine cannot do (tools, structured output, log
    /// probabilities...): refused, never quietly ignored.
    #[error("The model `{model}` cannot honour '{param}': {reason}.")]
    Unsupported {
        model: String,
        param: String,
        reason: &'static str,
    },

    /// The decoder failed mid-reply (a device fault) or stopped (the server is stopping).
    #[error("The model failed to generate a reply: {0}")]
    Generation(String),

    /// An input the model cannot read whole (too many tokens, an unknown token id).
    #[error("Invalid value for 'input': {0}")]
    UnreadableInput(EmbedError),

    /// The engine failed on a request it had accepted: a server fault, not the client's.
    #[error("The model failed to process your request: {0}")]
    Engine(EmbedError),
}

impl From<EmbedError> for ApiError {
    fn from(err: EmbedError) -> Self {
        match err {
            EmbedError::InputTooLong { .. } | EmbedError::TokenOutOfRange { .. } => {
                Self::UnreadableInput(err)
            }
            EmbedError::Tokenizer(_)
            | EmbedError::Device(_)
            | EmbedError::Panicked
            | EmbedError::EngineStopped => Self::Engine(err),
        }
    }
}

impl ApiError {
    pub fn invalid_value(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidValue {
            param: param.into(),
            message: message.into(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::UnreadableBody { status, .. } => *status,
            Self::ModelNotFound(_) | Self::UnknownRoute { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::InvalidJson(_)
            | Self::MissingParameter(_)
            | Self::InvalidType { .. }
            | Self::InvalidValue { .. }
            | Self::EmbeddingsOnly { .. }
            | Self::ChatOnly { .. }
            | Self::ContextLengthExceeded { .. }
            | Self::Unsupported { .. }
            | Self::UnreadableInput(_) => StatusCode::BAD_REQUEST,
            Self::Engine(_) | Self::Generation(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's error `type`: the client's fault or the server's.
    fn kind(&self) -> &'static str {
        if self.status().is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            Self::InvalidJson(_) => Some("invalid_json"),
            Self::UnreadableBody { .. } => None,
            Self::MissingParameter(_) => Some("missing_required_parameter"),
            Self::InvalidType { .. } => Some("invalid_type"),
            Self::InvalidValue { .. } => Some("invalid_value"),
            Self::ModelNotFound(_) => Some("model_not_found"),
            Self::UnknownRoute { .. } => Some("unknown_url"),
            Self::MethodNotAllowed { .. } => Some("method_not_allowed"),
            Self::EmbeddingsOnly { .. } | Self::ChatOnly { .. } => Some("model_not_supported"),
            Self::ContextLengthExceeded { .. } => Some("context_length_exceeded"),
            Self::Unsupported { .. } => Some("unsupported_parameter"),
            Self::UnreadableInput(EmbedError::InputTooLong { .. }) => {
                Some("context_length_exceeded")
            }
            Self::UnreadableInput(_) => Some("invalid_value"),
            Self::Engine(_) | Self::Generation(_) => None,
        }
    }

    /// The request field at fault, if one is.
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::MissingParameter(param) => Some(param),
            Self::InvalidType { param, .. } | Self::InvalidValue { param, .. } => Some(param),
            Self::ModelNotFound(_) | Self::EmbeddingsOnly { .. } | Self::ChatOnly { .. } => {
                Some("model")
            }
            Self::ContextLengthExceeded { param, .. } => Some(param),
            Self::Unsupported { param, .. } => Some(param),
            Self::UnreadableInput(_) => Some("input"),
            Self::Engine(_)
            | Self::Generation(_)
            | Self::InvalidJson(_)
            | Self::UnreadableBody { .. }
            | Self::UnknownRoute { .. }
            | Self::MethodNotAllowed { .. } => None,
        }
    }
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, %status, "request refused");
        }
        let envelope = ErrorEnvelope {
            error: ErrorBody {
                message: self.to_string(),
                kind: self.kind(),
                code: self.code(),
                param: self.param(),
            },
        };
        (status, Json(envelope)).into_response()
    }
}
