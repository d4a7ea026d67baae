//! What does a reply carry besides its text, and what shape must its text take? Log
//! probabilities (`logprobs`, `top_logprobs`) and the format (`response_format`), read from
//! a request and checked, and the log probabilities written in each route's shape.

use serde_json::{Map, Value};

use crate::engine::constraint::Format;
use crate::engine::generator::Logprob;
use crate::engine::sampling::MAX_TOP_LOGPROBS;
use crate::http::error::ApiError;
use crate::http::openai::{ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, TextLogprobs};

fn invalid_type(param: &str, message: &str) -> ApiError {
    ApiError::InvalidType {
        param: param.to_owned(),
        message: message.to_owned(),
    }
}

/// An integer field in `0..=MAX_TOP_LOGPROBS`, if sent.
fn count(param: &str, value: Option<&Value>) -> Result<Option<usize>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(k) if k <= MAX_TOP_LOGPROBS as u64 => Ok(Some(k as usize)),
            _ => Err(ApiError::invalid_value(
                param,
                format!("expected an integer from 0 to {MAX_TOP_LOGPROBS}, got {n}"),
            )),
        },
        Some(_) => Err(invalid_type(param, "expected an integer")),
    }
}

/// Chat's `logprobs` (a boolean) and `top_logprobs` (how many alternatives, which needs
/// `logprobs`): `Some(k)` when log probabilities are asked for.
pub fn chat_logprobs(
    logprobs: Option<&Value>,
    top_logprobs: Option<&Value>,
) -> Result<Option<usize>, ApiError> {
    let on = match logprobs {
        None | Some(Value::Null) => false,
        Some(Value::Bool(on)) => *on,
        Some(_) => return Err(invalid_type("logprobs", "expected a boolean")),
    };
    let top = count("top_logprobs", top_logprobs)?;
    match (on, top) {
        (true, top) => Ok(Some(top.unwrap_or(0))),
        (false, None) => Ok(None),
        (false, Some(_)) => Err(ApiError::invalid_value(
            "top_logprobs",
            "top_logprobs needs logprobs set to true",
        )),
    }
}

/// Completions' `logprobs`: how many alternatives to report beside the chosen token (0 for
/// the chosen token alone).
pub fn completion_logprobs(logprobs: Option<&Value>) -> Result<Option<usize>, ApiError> {
    count("logprobs", logprobs)
}

/// `response_format`: `text` (no format), `json_object`, or `json_schema` with its schema.
pub fn response_format(value: Option<&Value>) -> Result<Option<Format>, ApiError> {
    let fields = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(fields)) => fields,
        Some(_) => return Err(invalid_type("response_format", "expected an object")),
    };
    match fields.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Format::JsonObject)),
        Some("json_schema") => {
            let Some(spec) = fields.get("json_schema").and_then(Value::as_object) else {
                return Err(ApiError::MissingParameter("response_format.json_schema"));
            };
            match spec.get("schema") {
                None | Some(Value::Null) => Err(ApiError::MissingParameter(
                    "response_format.json_schema.schema",
                )),
                Some(schema @ (Value::Object(_) | Value::Bool(_))) => {
                    Ok(Some(Format::JsonSchema(schema.clone())))
                }
                Some(_) => Err(invalid_type(
                    "response_format.json_schema.schema",
                    "expected a JSON schema (an object)",
                )),
            }
        }
        Some(other) => Err(ApiError::invalid_value(
            "response_format.type",
            format!("'{other}' is not one of 'text', 'json_object', 'json_schema'"),
        )),
        None => Err(ApiError::MissingParameter("response_format.type")),
    }
}

/// A token as text: its bytes, with any part of a character split across tokens shown as
/// U+FFFD (the exact bytes go in `bytes`).
fn token_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// JSON has no infinities: OpenAI writes an impossible token's log probability as -9999.
fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        -9999.0
    }
}

/// An f32 as the JSON number that reads back to it with the fewest digits (as the f32
/// fields are written), not the f64 widening's seventeen.
fn shortest(value: f32) -> Value {
    value
        .to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

impl ChatLogprobs {
    pub fn new(tokens: &[Logprob]) -> Self {
        let entry = |bytes: &[u8], logprob: f32| ChatTopLogprob {
            token: token_text(bytes),
            logprob: finite(logprob),
            bytes: bytes.to_vec(),
        };
        ChatLogprobs {
            content: tokens
                .iter()
                .map(|t| ChatTokenLogprob {
                    token: token_text(&t.bytes),
                    logprob: finite(t.logprob),
                    bytes: t.bytes.clone(),
                    top_logprobs: t.top.iter().map(|(b, l)| entry(b, *l)).collect(),
                })
                .collect(),
            refusal: None,
        }
    }
}

impl TextLogprobs {
    /// For `tokens`, whose text starts `offset` characters into the reply.
    pub fn new(tokens: &[Logprob], mut offset: usize) -> Self {
        let mut logprobs = TextLogprobs {
            tokens: Vec::with_capacity(tokens.len()),
            token_logprobs: Vec::with_capacity(tokens.len()),
            top_logprobs: Vec::with_capacity(tokens.len()),
            text_offset: Vec::with_capacity(tokens.len()),
        };
        for token in tokens {
            let text = token_text(&token.bytes);
            logprobs.text_offset.push(offset);
            offset += text.chars().count();
            logprobs.tokens.push(text);
            logprobs.token_logprobs.push(finite(token.logprob));
            let mut top = Map::new();
            for (bytes, logprob) in &token.top {
                top.entry(token_text(bytes))
                    .or_insert_with(|| shortest(finite(*logprob)));
            }
            logprobs.top_logprobs.push(top);
        }
        logprobs
    }

    /// Characters of reply text these tokens stand for, where the next token starts.
    pub fn end(&self) -> usize {
        match (self.text_offset.last(), self.tokens.last()) {
            (Some(offset), Some(token)) => offset + token.chars().count(),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chat_logprobs_need_a_boolean_and_top_logprobs_needs_them_on() {
        let (on, off, five) = (json!(true), json!(false), json!(5));
        assert_eq!(chat_logprobs(None, None).unwrap(), None);
        assert_eq!(chat_logprobs(Some(&off), None).unwrap(), None);
        assert_eq!(chat_logprobs(Some(&on), None).unwrap(), Some(0));
        assert_eq!(chat_logprobs(Some(&on), Some(&five)).unwrap(), Some(5));
        for (logprobs, top, param) in [
            (json!(1), json!(null), "logprobs"),
            (json!(false), json!(2), "top_logprobs"),
            (json!(true), json!(21), "top_logprobs"),
            (json!(true), json!(-1), "top_logprobs"),
            (json!(true), json!("3"), "top_logprobs"),
        ] {
            let err = chat_logprobs(Some(&logprobs), Some(&top)).unwrap_err();
            assert_eq!(err.param(), Some(param), "{logprobs} {top}: {err}");
        }
        assert_eq!(completion_logprobs(Some(&json!(0))).unwrap(), Some(0));
        assert!(completion_logprobs(Some(&json!(true))).is_err());
    }

    #[test]
    fn response_formats_are_read_or_refused_by_the_field_at_fault() {
        let read = |value: Value| response_format(Some(&value));
        assert_eq!(read(json!({"type": "text"})).unwrap(), None);
        assert_eq!(
            read(json!({"type": "json_object"})).unwrap(),
            Some(Format::JsonObject)
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            read(json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}))
                .unwrap(),
            Some(Format::JsonSchema(schema))
        );
        for (value, param) in [
            (json!("json"), "response_format"),
            (json!({}), "response_format.type"),
            (json!({"type": "yaml"}), "response_format.type"),
            (
                json!({"type": "json_schema"}),
                "response_format.json_schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "x"}}),
                "response_format.json_schema.schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"schema": 3}}),
                "response_format.json_schema.schema",
            ),
        ] {
            let err = read(value.clone()).unwrap_err();
            assert_eq!(err.param(), Some(param), "{value}: {err}");
        }
    }

    #[test]
    fn completion_logprobs_keep_offsets_and_the_likelier_of_equal_texts() {
        let token = |text: &str, logprob: f32, top: Vec<(&[u8], f32)>| Logprob {
            bytes: text.as_bytes().to_vec(),
            logprob,
            top: top.into_iter().map(|(b, l)| (b.to_vec(), l)).collect(),
        };
        let tokens = [
            token(
                "Hé",
                -0.5,
                vec![(b"H\xc3\xa9", -0.5), (b"x", -1.0), (b"x", -2.0)],
            ),
            token("llo", -0.25, vec![]),
        ];
        let logprobs = TextLogprobs::new(&tokens, 3);
        assert_eq!(logprobs.text_offset, [3, 5]);
        assert_eq!(logprobs.end(), 8);
        assert_eq!(logprobs.tokens, ["Hé", "llo"]);
        assert_eq!(
            Value::Object(logprobs.top_logprobs[0].clone()),
            json!({"Hé": -0.5, "x": -1.0})
        );
        let chat = serde_json::to_value(ChatLogprobs::new(&tokens[..1])).unwrap();
        assert_eq!(chat["content"][0]["bytes"], json!([72, 195, 169]));
        assert_eq!(chat["content"][0]["top_logprobs"][1]["token"], "x");
        assert_eq!(
            serde_json::to_value(ChatLogprobs::new(&[token("a", f32::NEG_INFINITY, vec![])]))
                .unwrap()["content"][0]["logprob"],
            json!(-9999.0)
        );
    }
}
