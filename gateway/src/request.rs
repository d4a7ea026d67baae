//! What are they asking for? Which OpenAI route a request is for, its body (read whole,
//! bounded), and a borrowed view of just the body fields that policy needs. The body itself
//! is forwarded as it came, but for an alias resolved to the model it stands for.

use crate::error::ApiError;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// The routes the gateway serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    Models,
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Route {
    /// The route for a method and path, or the error to answer with.
    pub fn resolve(method: &http::Method, path: &str) -> Result<Route, ApiError> {
        let path = path
            .strip_suffix('/')
            .filter(|p| !p.is_empty())
            .unwrap_or(path);
        let (route, allowed) = match path {
            "/health" => (Route::Health, http::Method::GET),
            "/v1/models" => (Route::Models, http::Method::GET),
            "/v1/chat/completions" => (Route::ChatCompletions, http::Method::POST),
            "/v1/completions" => (Route::Completions, http::Method::POST),
            "/v1/embeddings" => (Route::Embeddings, http::Method::POST),
            _ => {
                return Err(ApiError::not_found(format!(
                    "Unknown request URL: {method} {path}."
                )))
            }
        };
        if *method != allowed && !(allowed == http::Method::GET && method == http::Method::HEAD) {
            return Err(ApiError::method_not_allowed(method.as_str(), path));
        }
        Ok(route)
    }

    /// Whether the gateway forwards this route to a backend (and so reads a body for it).
    pub fn is_forwarded(self) -> bool {
        matches!(
            self,
            Route::ChatCompletions | Route::Completions | Route::Embeddings
        )
    }

    /// A short stable name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Route::Health => "health",
            Route::Models => "models",
            Route::ChatCompletions => "chat_completions",
            Route::Completions => "completions",
            Route::Embeddings => "embeddings",
        }
    }
}

/// The fields of an OpenAI request body that policy reads, borrowed from the body bytes.
#[derive(Debug, Deserialize)]
pub struct RequestView<'a> {
    #[serde(borrow, default)]
    pub model: Option<Cow<'a, str>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub n: Option<u32>,
    /// Completions only: choices generated per prompt, of which `n` are returned.
    #[serde(default)]
    pub best_of: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(borrow, default)]
    pub messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub stream_options: Option<&'a RawValue>,
}

impl<'a> RequestView<'a> {
    /// Parses and checks a body for `route`. Errors say what is wrong and where.
    pub fn parse(route: Route, body: &'a [u8]) -> Result<RequestView<'a>, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad_request(
                "The request body is empty; send a JSON object.",
            ));
        }
        let view: RequestView = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!(
                "We could not parse the JSON body of your request: {e}."
            ))
        })?;
        let model = view.model.as_deref().unwrap_or("");
        if model.is_empty() {
            return Err(
                ApiError::bad_request("You must provide a model parameter.").with_param("model")
            );
        }
        let (field, present) = match route {
            Route::ChatCompletions => ("messages", view.messages),
            Route::Completions => ("prompt", view.prompt),
            Route::Embeddings => ("input", view.input),
            Route::Health | Route::Models => return Ok(view),
        };
        let param: &'static str = field;
        match present.map(RawValue::get) {
            None | Some("null") => {
                return Err(ApiError::bad_request(format!(
                    "Missing required parameter: '{field}'."
                ))
                .with_param(param))
            }
            Some(raw) if route == Route::ChatCompletions && !raw.starts_with('[') => {
                return Err(ApiError::bad_request(
                    "Invalid type for 'messages': expected an array of message objects.",
                )
                .with_param(param))
            }
            Some(_) => {}
        }
        if let Some(t) = view.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::bad_request(format!(
                    "Invalid 'temperature': {t} is not between 0 and 2."
                ))
                .with_param("temperature"));
            }
        }
        if view.n == Some(0) {
            return Err(ApiError::bad_request("Invalid 'n': must be at least 1.").with_param("n"));
        }
        Ok(view)
    }

    pub fn model(&self) -> &str {
        self.model.as_deref().unwrap_or_default()
    }

    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }
}

/// The client's `x-request-id` when it is a sane token, else a fresh UUIDv7.
pub fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map_or_else(time_ordered_id, str::to_owned)
}

/// A new UUIDv7 (unique, ordered by time) in its hyphenated form. Encoded directly: through
/// `Display` it went through the formatting machinery, twice per request (the request id and
/// the usage event's).
pub fn time_ordered_id() -> String {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Uuid::now_v7()
        .hyphenated()
        .encode_lower(&mut text)
        .to_owned()
}

/// The body with its `model` replaced (an alias resolved).
pub fn with_model(body: &Bytes, model: &str) -> Result<Bytes, ApiError> {
    let model = serde_json::Value::String(model.to_owned()).to_string();
    with_members(body, &[("model", &model)])
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}.")))
}

/// `body`, a JSON object, with the top-level members named in `set` given these JSON values:
/// replaced where they stand (every occurrence) or else appended. Everything else is kept
/// byte for byte, so the backend reads exactly the numbers and strings the client sent (a
/// parsed and re-serialised float may come back one unit in the last place off).
pub fn with_members(body: &[u8], set: &[(&str, &str)]) -> Result<Bytes, serde_json::Error> {
    let Members(members) = serde_json::from_slice(body)?;
    let mut out = Vec::with_capacity(body.len() + 64);
    out.push(b'{');
    let push = |out: &mut Vec<u8>, key: &str, value: &str| {
        if out.len() > 1 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, key).expect("a string serializes");
        out.push(b':');
        out.extend_from_slice(value.as_bytes());
    };
    for (key, raw) in &members {
        let value = set
            .iter()
            .find(|(name, _)| name == key)
            .map_or(raw.get(), |(_, value)| value);
        push(&mut out, key, value);
    }
    for (name, value) in set {
        if !members.iter().any(|(key, _)| key == name) {
            push(&mut out, name, value);
        }
    }
    out.push(b'}');
    Ok(Bytes::from(out))
}

/// A JSON object's top-level members in order, each value as the bytes it was sent as.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// How much of a request body the gateway reads, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    /// The whole body must have arrived within this, however it trickles in.
    pub timeout: std::time::Duration,
}

/// Reads the whole request body: 413 past `max_bytes`, 408 past the timeout, 503 when the
/// replica already holds its budget of body bytes (counted into `share` as they arrive).
/// Memory grows with what arrives, never with what the client announces.
pub async fn read_body(
    session: &mut pingora_proxy::Session,
    limits: BodyLimits,
    overload: &crate::overload::Overload,
    share: &mut crate::overload::BodyBytes,
) -> Result<Bytes, ApiError> {
    let limit = limits.max_bytes;
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::body_too_large(limit));
    }
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let reading = async {
        if expects_continue {
            // The client waits for this before sending a large body (curl does).
            session.write_continue_response().await.map_err(|e| {
                ApiError::bad_request(format!("Could not read the request body: {e}"))
            })?;
        }
        // Chunks are kept as they arrive and joined once at the end, so what a body holds
        // is what was sent (a growing buffer would hold up to twice that).
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut received = 0;
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if received + chunk.len() > limit {
                        return Err(ApiError::body_too_large(limit));
                    }
                    overload.grow(share, chunk.len())?;
                    received += chunk.len();
                    chunks.push(chunk);
                }
                Ok(None) if chunks.len() == 1 => return Ok(chunks.pop().unwrap_or_default()),
                Ok(None) => {
                    let mut body = BytesMut::with_capacity(received);
                    for chunk in chunks {
                        body.extend_from_slice(&chunk);
                    }
                    return Ok(body.freeze());
                }
                Err(e) => {
                    return Err(ApiError::bad_request(format!(
                        "Could not read the request body: {e}"
                    )))
                }
            }
        }
    };
    match tokio::time::timeout(limits.timeout, reading).await {
        Ok(read) => read,
        Err(_) => Err(ApiError::request_timeout(format!(
            "The request body did not arrive within {} seconds.",
            limits.timeout.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<RequestView<'_>, ApiError> {
        RequestView::parse(Route::ChatCompletions, body.as_bytes())
    }

    #[test]
    fn reads_the_fields_policy_needs() {
        let v = chat(r#"{"model":"m","stream":true,"max_tokens":7,"n":2,"messages":[{"role":"user","content":"hi"}],"tools":[]}"#).unwrap();
        assert_eq!(v.model(), "m");
        assert!(v.is_stream());
        assert_eq!(v.max_tokens, Some(7));
        assert_eq!(v.n, Some(2));
        assert!(v.messages.unwrap().get().contains("hi"));
    }

    #[test]
    fn says_what_is_wrong() {
        let e = chat("{\"model\": ").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("line 1 column"), "{}", e.message);

        let e = chat(r#"{"messages":[]}"#).unwrap_err();
        assert_eq!(e.param, Some("model"));

        let e = chat(r#"{"model":"m","stream":"yes","messages":[]}"#).unwrap_err();
        assert!(e.message.contains("expected a boolean"), "{}", e.message);

        let e = chat(r#"{"model":"m"}"#).unwrap_err();
        assert_eq!(e.param, Some("messages"));

        let e = chat(r#"{"model":"m","messages":"hi"}"#).unwrap_err();
        assert_eq!(e.param, Some("messages"));

        let e = RequestView::parse(Route::Embeddings, br#"{"model":"m"}"#).unwrap_err();
        assert_eq!(e.param, Some("input"));

        let e = chat("[1,2]").unwrap_err();
        assert_eq!(e.status, 400);

        let e = chat("  ").unwrap_err();
        assert!(e.message.contains("empty"));
    }

    #[test]
    fn rewritten_members_keep_every_other_byte() {
        let body = br#"{"model":"alias", "temperature":0.70000000000000001,"x":[1e400,"\u00e9"],"model":"again"}"#;
        let out = with_members(body, &[("model", "\"real\""), ("added", "true")]).unwrap();
        assert_eq!(
            &out[..],
            &br#"{"model":"real","temperature":0.70000000000000001,"x":[1e400,"\u00e9"],"model":"real","added":true}"#[..]
        );
        assert!(with_members(b"[1,2]", &[("model", "1")]).is_err());
    }

    #[test]
    fn routes_resolve_by_method_and_path() {
        use http::Method;
        assert_eq!(
            Route::resolve(&Method::POST, "/v1/chat/completions").unwrap(),
            Route::ChatCompletions
        );
        assert_eq!(
            Route::resolve(&Method::GET, "/v1/models/").unwrap(),
            Route::Models
        );
        assert_eq!(
            Route::resolve(&Method::GET, "/v1/chat/completions")
                .unwrap_err()
                .status,
            405
        );
        assert_eq!(
            Route::resolve(&Method::POST, "/v1/nope")
                .unwrap_err()
                .status,
            404
        );
    }
}
