//! Is this request well-formed? Body parsing and the checks every generation route shares.
//!
//! Bodies are taken as raw bytes and parsed here rather than by axum's `Json`, so that a
//! missing or wrong content-type is accepted (curl and some SDKs omit it) and every
//! rejection, including "this is not JSON", comes back in OpenAI's error shape with the
//! name of the offending parameter.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::error::Category;

use super::error::ApiError;

/// The most choices one request may ask for, per prompt.
pub const MAX_CHOICES: i64 = 16;

/// Parses a request body, naming the parameter at fault when the JSON is valid but a field
/// is not.
pub fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| ApiError::UnreadableBody {
        status: rejection.status(),
        message: rejection.body_text(),
    })?;
    // serde would read a JSON array positionally into a request struct; a body that is not
    // an object is refused before that can happen.
    let starts_an_object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if !starts_an_object {
        return Err(ApiError::InvalidJson(
            match serde_json::from_slice::<IgnoredAny>(&body) {
                Err(err) => err.to_string(),
                Ok(_) => "the body must be a JSON object".to_owned(),
            },
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(&body);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let message = inner.to_string();
        match inner.classify() {
            // The body as a whole has the wrong shape (an array, a string): there is no
            // parameter to name.
            Category::Data if path == "." => ApiError::InvalidJson(message),
            Category::Data if message.starts_with("invalid type") => ApiError::InvalidType {
                param: path,
                message,
            },
            Category::Data => ApiError::InvalidValue {
                param: path,
                message,
            },
            Category::Syntax | Category::Eof | Category::Io => ApiError::InvalidJson(message),
        }
    })?;
    // Trailing garbage after the object would otherwise be silently ignored.
    deserializer
        .end()
        .map_err(|err| ApiError::InvalidJson(err.to_string()))?;
    Ok(value)
}

pub fn required<T>(value: Option<T>, param: &'static str) -> Result<T, ApiError> {
    value.ok_or(ApiError::MissingParameter(param))
}

/// `n`: how many choices to generate for each prompt.
pub fn choice_count(n: Option<i64>) -> Result<u32, ApiError> {
    match n {
        None => Ok(1),
        Some(n @ 1..=MAX_CHOICES) => Ok(n as u32),
        Some(n) => Err(ApiError::invalid_value(
            "n",
            format!("{n} is out of range; n must be between 1 and {MAX_CHOICES}"),
        )),
    }
}

/// The reply cap from `max_tokens` and `max_completion_tokens`. When both are given the
/// smaller wins: either one is a promise to the caller not to exceed it.
pub fn token_cap(
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
) -> Result<Option<u32>, ApiError> {
    let mut cap: Option<u32> = None;
    for (param, value) in [
        ("max_tokens", max_tokens),
        ("max_completion_tokens", max_completion_tokens),
    ] {
        let Some(value) = value else { continue };
        if value < 1 {
            return Err(ApiError::invalid_value(
                param,
                format!("{value} is too small; it must be at least 1"),
            ));
        }
        let value = u32::try_from(value).unwrap_or(u32::MAX);
        cap = Some(cap.map_or(value, |cap| cap.min(value)));
    }
    Ok(cap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::openai::ChatCompletionRequest;

    fn parse(body: &str) -> Result<ChatCompletionRequest, ApiError> {
        parse_body(Ok(Bytes::from(body.to_owned())))
    }

    #[test]
    fn broken_json_says_where() {
        let err = parse(r#"{"model": "x",}"#).unwrap_err();
        assert!(
            matches!(&err, ApiError::InvalidJson(m) if m.contains("line 1")),
            "{err}"
        );
        assert!(matches!(parse(""), Err(ApiError::InvalidJson(_))));
        assert!(matches!(parse("{} x"), Err(ApiError::InvalidJson(_))));
        assert!(matches!(parse("[1]"), Err(ApiError::InvalidJson(m)) if m.contains("object")));
        assert!(matches!(
            parse(r#"["sim", []]"#),
            Err(ApiError::InvalidJson(_))
        ));
    }

    #[test]
    fn a_wrongly_typed_field_is_named() {
        match parse(r#"{"model":"x","max_tokens":"ten"}"#) {
            Err(ApiError::InvalidType { param, .. }) => assert_eq!(param, "max_tokens"),
            other => panic!("{other:?}"),
        }
        match parse(r#"{"messages":[{"role":"user","content":5}]}"#) {
            Err(ApiError::InvalidType { param, .. }) => assert_eq!(param, "messages[0].content"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn n_and_caps_are_range_checked() {
        assert_eq!(choice_count(None).unwrap(), 1);
        assert_eq!(choice_count(Some(16)).unwrap(), 16);
        assert!(choice_count(Some(0)).is_err());
        assert!(choice_count(Some(17)).is_err());
        assert_eq!(token_cap(None, None).unwrap(), None);
        assert_eq!(token_cap(Some(8), Some(5)).unwrap(), Some(5));
        assert_eq!(token_cap(None, Some(5)).unwrap(), Some(5));
        assert!(token_cap(Some(0), None).is_err());
        assert!(token_cap(None, Some(-3)).is_err());
    }
}
