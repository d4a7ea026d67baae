//! Which request fields can the native engine honour? Those that change what a reply is
//! and that it cannot act on (legacy functions, audio, echo, a suffix, candidates to rank)
//! are refused by name, so that a client never gets a 200 that quietly ignored what it
//! asked for. (Structured output, tool calls and log probabilities it honours:
//! `completion::output`, `completion::tools`; token biases: `completion::sampling`.) A field
//! sent as `null`, or with the value that asks for nothing (`"functions": []`, `"echo":
//! false`), is no request and passes. The simulated engine stands in for any
//! upstream, one that may well call tools, and accepts them all.

use serde_json::Value;

/// A field the engine cannot act on, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Unhonoured {
    /// The parameter's path, as errors name it: `echo`, `messages[0].content[1].type`.
    pub param: String,
    pub reason: &'static str,
}

/// The first of `fields` (a parameter's name and its value as sent, `None` when absent or
/// null) that asks for something the native engine does not do.
pub fn first_unhonoured<'a>(
    fields: impl IntoIterator<Item = (&'static str, Option<&'a Value>)>,
) -> Option<Unhonoured> {
    fields.into_iter().find_map(|(param, value)| {
        let reason = refusal(param, value?)?;
        Some(Unhonoured {
            param: param.to_owned(),
            reason,
        })
    })
}

/// Why the engine cannot honour `value` in `param`, or `None` when it asks for nothing.
fn refusal(param: &str, value: &Value) -> Option<&'static str> {
    let empty = match value {
        Value::Null => true,
        Value::Array(items) => items.is_empty(),
        Value::Object(fields) => fields.is_empty(),
        Value::String(text) => text.is_empty(),
        Value::Bool(on) => !on,
        Value::Number(_) => false,
    };
    match param {
        "functions" if !empty => Some(FUNCTIONS),
        // "none", and "auto" with nothing to call, ask for no call.
        "function_call" => match value.as_str() {
            Some("none" | "auto") => None,
            _ => Some(FUNCTIONS),
        },
        "modalities" => match value.as_array().map(Vec::as_slice) {
            Some([only]) if only == "text" => None,
            _ => Some("this engine writes text only"),
        },
        "audio" => Some("this engine writes text only"),
        "echo" if !empty => Some("this engine does not echo the prompt in its reply"),
        "suffix" if !empty => Some("this engine does not insert text before a suffix"),
        "best_of" => match value.as_i64() {
            Some(1) => None,
            _ => Some("this engine does not rank candidates; ask for n choices instead"),
        },
        _ => None,
    }
}

const FUNCTIONS: &str = "this engine does not read the legacy functions; send them as tools, \
                         with tool_choice \"required\" or naming the function";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn first(fields: &[(&'static str, Value)]) -> Option<String> {
        first_unhonoured(fields.iter().map(|(p, v)| (*p, Some(v)))).map(|u| u.param)
    }

    #[test]
    fn a_field_asking_for_something_is_named_and_one_asking_for_nothing_passes() {
        for (param, asks) in [
            ("functions", json!([{"name": "f"}])),
            ("function_call", json!({"name": "f"})),
            ("modalities", json!(["text", "audio"])),
            ("audio", json!({"voice": "alloy"})),
            ("echo", json!(true)),
            ("suffix", json!("}")),
            ("best_of", json!(3)),
        ] {
            assert_eq!(
                first(&[(param, asks.clone())]).as_deref(),
                Some(param),
                "{asks}"
            );
        }
        for (param, nothing) in [
            ("functions", json!([])),
            ("function_call", json!("none")),
            ("function_call", json!("auto")),
            ("modalities", json!(["text"])),
            ("echo", json!(false)),
            ("suffix", json!("")),
            ("best_of", json!(1)),
            ("user", json!("anyone")),
        ] {
            assert_eq!(
                first(&[(param, nothing.clone())]),
                None,
                "{param}: {nothing}"
            );
        }
        // Absent or null: nothing asked.
        assert_eq!(
            first_unhonoured([("functions", None), ("echo", None)]),
            None
        );
    }

    #[test]
    fn the_first_refused_field_in_order_is_named() {
        let fields = [
            ("functions", json!([])),
            ("suffix", json!("}")),
            ("echo", json!(true)),
        ];
        assert_eq!(first(&fields).as_deref(), Some("suffix"));
    }
}
