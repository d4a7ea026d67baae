//! Which captured conversations, and in what form: the filters an export or a purge takes,
//! and the OpenAI fine-tuning line (`{"messages": [...]}`) each conversation becomes.

use super::exchange::Conversation;
use serde::Serialize;
use serde_json::value::RawValue;
use sluice_policies::model_access;
use std::collections::HashMap;

/// Conversations read from the store per call.
pub const PAGE: usize = 500;

/// What an export or a purge selects; every field set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// A model name or pattern (`*` for any run of characters).
    pub model: Option<String>,
    pub tenant: Option<String>,
    pub key: Option<String>,
    /// Captured in `[from_ms, to_ms)`.
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// Any of these finish reasons (`stop`, `length`, `tool_calls`, …); empty: any.
    pub finish_reasons: Vec<String>,
}

/// A filter parameter that cannot be read, and why.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct FilterError {
    pub param: &'static str,
    pub message: String,
}

impl Filter {
    /// From the query string: `model`, `tenant`, `key`, `from`, `to` (YYYY-MM-DD or RFC
    /// 3339), `finish_reason` (comma-separated).
    pub fn parse(params: &HashMap<String, String>) -> Result<Filter, FilterError> {
        const KNOWN: [&str; 6] = ["model", "tenant", "key", "from", "to", "finish_reason"];
        if let Some(unknown) = params.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(FilterError {
                param: "query",
                message: format!(
                    "unknown parameter '{unknown}': use model, tenant, key, from, to or finish_reason"
                ),
            });
        }
        let text = |name: &'static str| -> Result<Option<String>, FilterError> {
            match params.get(name).map(|v| v.trim()) {
                None => Ok(None),
                Some("") => Err(FilterError {
                    param: name,
                    message: format!("'{name}' is empty"),
                }),
                Some(v) => Ok(Some(v.to_owned())),
            }
        };
        let time = |name: &'static str| -> Result<Option<i64>, FilterError> {
            text(name)?
                .map(|v| {
                    crate::billing::parse_time(name, &v).map_err(|e| FilterError {
                        param: name,
                        message: e.to_string(),
                    })
                })
                .transpose()
        };
        let filter = Filter {
            model: text("model")?,
            tenant: text("tenant")?,
            key: text("key")?,
            from_ms: time("from")?,
            to_ms: time("to")?,
            finish_reasons: text("finish_reason")?
                .map(|v| {
                    v.split(',')
                        .map(|r| r.trim().to_owned())
                        .filter(|r| !r.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        };
        if let (Some(from), Some(to)) = (filter.from_ms, filter.to_ms) {
            if from >= to {
                return Err(FilterError {
                    param: "from",
                    message: "'from' must be before 'to'".to_owned(),
                });
            }
        }
        Ok(filter)
    }

    /// No field set: everything.
    pub fn selects_everything(&self) -> bool {
        *self == Filter::default()
    }

    pub fn admits(&self, c: &Conversation) -> bool {
        self.model
            .as_deref()
            .is_none_or(|m| model_access::matches(m, &c.model))
            && self.tenant.as_deref().is_none_or(|t| t == c.tenant)
            && self.key.as_deref().is_none_or(|k| k == c.key_id)
            && self.from_ms.is_none_or(|from| c.time_ms >= from)
            && self.to_ms.is_none_or(|to| c.time_ms < to)
            && (self.finish_reasons.is_empty() || self.finish_reasons.contains(&c.finish_reason))
    }
}

/// One example of an OpenAI fine-tuning file: a line of the dataset export.
#[derive(Serialize, utoipa::ToSchema)]
pub struct FineTuningExample<'a> {
    /// The request's messages as sent, then the assistant's answer.
    #[schema(value_type = Vec<Object>)]
    messages: Vec<&'a RawValue>,
    /// The tools the request offered, as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    tools: Option<&'a RawValue>,
}

/// Appends the conversation as one line of an OpenAI fine-tuning file: the request's
/// messages as sent, then the assistant's answer (and the tools it was offered).
pub fn write_line(out: &mut Vec<u8>, c: &Conversation) -> Result<(), serde_json::Error> {
    let mut messages: Vec<&RawValue> = serde_json::from_str(c.messages.get())?;
    let answer = serde_json::value::to_raw_value(&c.answer)?;
    messages.push(&answer);
    let line = FineTuningExample {
        messages,
        tools: c.tools.as_deref(),
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.push(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> Conversation {
        serde_json::from_str(
            r#"{"time_ms": 1700000000000, "request_id": "r", "tenant": "acme", "key_id": "key_1",
                "model": "llama-70b", "finish_reason": "stop",
                "messages": [{"role": "user", "content": "Hi", "name": "ann"}],
                "answer": {"role": "assistant", "content": "Hello"}}"#,
        )
        .unwrap()
    }

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_line_is_the_request_then_the_answer() {
        let mut out = Vec::new();
        write_line(&mut out, &conversation()).unwrap();
        // The request's messages byte for byte, as they were sent.
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"messages\":[{\"role\": \"user\", \"content\": \"Hi\", \"name\": \"ann\"},\
             {\"role\":\"assistant\",\"content\":\"Hello\"}]}\n"
        );
    }

    #[test]
    fn every_filter_field_must_match() {
        let c = conversation();
        assert!(Filter::default().admits(&c));
        let admits = |pairs: &[(&str, &str)]| Filter::parse(&params(pairs)).unwrap().admits(&c);
        assert!(admits(&[("model", "llama-*"), ("tenant", "acme")]));
        assert!(!admits(&[("model", "mistral-*")]));
        assert!(!admits(&[("tenant", "globex")]));
        assert!(!admits(&[("key", "key_2")]));
        assert!(admits(&[("finish_reason", "length, stop")]));
        assert!(!admits(&[("finish_reason", "length")]));
        assert!(admits(&[("from", "2023-11-14"), ("to", "2023-11-15")]));
        assert!(!admits(&[("from", "2023-11-15")]));
    }

    #[test]
    fn bad_filters_name_their_parameter() {
        for (pairs, param) in [
            (&[("from", "yesterday")][..], "from"),
            (&[("from", "2024-01-02"), ("to", "2024-01-01")][..], "from"),
            (&[("tenant", " ")][..], "tenant"),
            (&[("modle", "x")][..], "query"),
        ] {
            assert_eq!(Filter::parse(&params(pairs)).unwrap_err().param, param);
        }
    }
}
