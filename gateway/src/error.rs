//! What a client is told when Sluice refuses or fails a request: every error, from the proxy
//! and from the admin API, becomes OpenAI's error shape here and nowhere else.

use bytes::Bytes;
use serde::Serialize;

/// An error as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub kind: ErrorKind,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
    pub message: String,
    /// `Retry-After` for a refusal that passes by itself (the replica was overloaded).
    pub retry_after_secs: Option<u64>,
}

/// OpenAI's `type` values that Sluice uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidRequest,
    Authentication,
    Permission,
    NotFound,
    RateLimit,
    Server,
    ServiceUnavailable,
}

impl ErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::Authentication => "invalid_request_error",
            ErrorKind::Permission => "permission_error",
            ErrorKind::NotFound => "invalid_request_error",
            ErrorKind::RateLimit => "rate_limit_error",
            ErrorKind::Server => "server_error",
            ErrorKind::ServiceUnavailable => "service_unavailable_error",
        }
    }
}

impl ApiError {
    fn new(status: u16, kind: ErrorKind, code: Option<&'static str>, message: String) -> Self {
        ApiError {
            status,
            kind,
            code,
            param: None,
            message,
            retry_after_secs: None,
        }
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// The same error under a more specific code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, ErrorKind::InvalidRequest, None, message.into())
    }

    pub fn invalid_api_key(message: impl Into<String>) -> Self {
        Self::new(
            401,
            ErrorKind::Authentication,
            Some("invalid_api_key"),
            message.into(),
        )
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(
            403,
            ErrorKind::Permission,
            Some("insufficient_permissions"),
            message.into(),
        )
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, ErrorKind::NotFound, Some("not_found"), message.into())
    }

    /// 409: the request conflicts with what exists (a name already taken).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(
            409,
            ErrorKind::InvalidRequest,
            Some("conflict"),
            message.into(),
        )
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            ErrorKind::NotFound,
            Some("model_not_found"),
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .with_param("model")
    }

    /// 403: the caller's key or tier may not name this model.
    pub fn model_not_allowed(model: &str) -> Self {
        Self::new(
            403,
            ErrorKind::Permission,
            Some("model_not_allowed"),
            format!("This API key is not allowed to use the model `{model}`."),
        )
        .with_param("model")
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            405,
            ErrorKind::InvalidRequest,
            Some("method_not_allowed"),
            format!("{method} is not allowed on {path}"),
        )
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            413,
            ErrorKind::InvalidRequest,
            Some("request_too_large"),
            format!("The request body is larger than the limit of {limit} bytes."),
        )
    }

    pub fn request_timeout(message: impl Into<String>) -> Self {
        Self::new(
            408,
            ErrorKind::InvalidRequest,
            Some("request_timeout"),
            message.into(),
        )
    }

    /// 429: `code` is `rate_limit_exceeded` (wait) or `insufficient_quota` (a cap is spent).
    pub fn rate_limited(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(429, ErrorKind::RateLimit, Some(code), message.into())
    }

    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(502, ErrorKind::Server, Some("bad_gateway"), message.into())
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            503,
            ErrorKind::ServiceUnavailable,
            Some("service_unavailable"),
            message.into(),
        )
    }

    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        Self::new(504, ErrorKind::Server, Some("timeout"), message.into())
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            500,
            ErrorKind::Server,
            Some("internal_error"),
            message.into(),
        )
    }

    /// The JSON body: `{"error":{"message","type","param","code"}}`.
    pub fn body(&self) -> Bytes {
        let body = ApiErrorBody {
            error: ApiErrorDetail {
                message: &self.message,
                r#type: self.kind.as_str(),
                param: self.param,
                code: self.code,
            },
        };
        Bytes::from(serde_json::to_vec(&body).expect("error body serializes"))
    }
}

/// Every error answer's body, from the proxy and the admin API alike (OpenAI's shape); the
/// admin API's OpenAPI document names this schema for its 4xx and 5xx answers.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ApiErrorBody<'a> {
    error: ApiErrorDetail<'a>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct ApiErrorDetail<'a> {
    message: &'a str,
    /// OpenAI's error type: `invalid_request_error`, `permission_error`, `rate_limit_error`,
    /// `server_error` or `service_unavailable_error`.
    r#type: &'static str,
    /// The request field at fault, when one is.
    #[schema(required)]
    param: Option<&'static str>,
    /// What went wrong, for programs (`not_found`, `invalid_api_key`, ...).
    #[schema(required)]
    code: Option<&'static str>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        let status = http::StatusCode::from_u16(self.status)
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            [(http::header::CONTENT_TYPE, "application/json")],
            self.body(),
        )
            .into_response()
    }
}

/// What the client is told when forwarding to `backend` failed; `None` when the client is
/// the one that went away.
pub fn upstream_error(e: &pingora_core::Error, backend: &str) -> Option<ApiError> {
    use pingora_core::ErrorType::*;
    Some(match e.etype() {
        HTTPStatus(502) => ApiError::bad_gateway(format!("Backend {backend} answered 502.")),
        HTTPStatus(503) => ApiError::unavailable(format!(
            "Backend {backend} is unavailable (it answered 503); try again shortly."
        )),
        HTTPStatus(504) => ApiError::gateway_timeout(format!("Backend {backend} answered 504.")),
        HTTPStatus(code) => ApiError::internal(format!("Request failed with status {code}.")),
        ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure
        | BindError | SocketError => ApiError::bad_gateway(format!(
            "Backend {backend} is unreachable ({}).",
            e.etype().as_str()
        )),
        ReadTimedout | WriteTimedout => {
            ApiError::gateway_timeout(format!("Backend {backend} did not answer in time."))
        }
        _ if e.esource() == &pingora_core::ErrorSource::Downstream => return None,
        _ => ApiError::bad_gateway(format!("Backend {backend} failed: {}.", e.etype().as_str())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openai_shape() {
        let body = ApiError::invalid_api_key("Incorrect API key provided.").body();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["message"], "Incorrect API key provided.");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert!(v["error"]["param"].is_null());
    }
}
