//! How does a chat turn call a tool? When `tool_choice` asks for a call (`"required"`, or a
//! function by name), the reply is constrained to one JSON object, `{"name": ..., "arguments":
//! {...}}`, whose arguments follow that function's `parameters` schema; the tools are
//! described to the model in a system message; and the object is handed back as OpenAI's
//! `tool_calls`, streamed as a name then pieces of the arguments.
//!
//! `"auto"` (the default when tools are sent) would need the model to choose between a call
//! and text; a model that was not trained to call tools cannot be trusted to choose, so that
//! is refused by name (`tool_choice`) rather than answered as if no tools had been sent.

use serde_json::{json, Map, Value};

use crate::engine::constraint::Format;
use crate::http::error::ApiError;
use crate::http::honoured::Unhonoured;
use crate::http::openai::{ToolCall, ToolCallDelta, ToolFunction, ToolFunctionDelta};

/// What a request's `tools` and `tool_choice` ask of the reply.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolPlan {
    /// No call: no tools, or `tool_choice: "none"`.
    NoCall,
    /// One call of one of the tools, in this format, with the tools described to the model
    /// by `instructions`.
    Call {
        format: Format,
        instructions: String,
    },
    /// A choice the native engine cannot make (see the module's note).
    Unhonoured(Unhonoured),
}

/// One function a request offers.
struct Tool {
    name: String,
    /// Its `parameters` schema (any object when it has none).
    parameters: Value,
    definition: Value,
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_value(param, message)
}

/// Reads `tools` and `tool_choice`.
pub fn plan(tools: Option<&Value>, tool_choice: Option<&Value>) -> Result<ToolPlan, ApiError> {
    let tools = read_tools(tools)?;
    let choice = match tool_choice {
        None | Some(Value::Null) => None,
        Some(choice) => Some(choice),
    };
    if tools.is_empty() {
        return match choice.and_then(Value::as_str) {
            None | Some("none" | "auto") => Ok(ToolPlan::NoCall),
            Some(_) => Err(invalid(
                "tool_choice",
                "a tool must be called, but the request sends no tools",
            )),
        };
    }
    let chosen: Vec<&Tool> = match choice {
        Some(Value::String(mode)) if mode == "none" => return Ok(ToolPlan::NoCall),
        Some(Value::String(mode)) if mode == "required" => tools.iter().collect(),
        None => return Ok(auto()),
        Some(Value::String(mode)) if mode == "auto" => return Ok(auto()),
        Some(Value::String(other)) => {
            return Err(invalid(
                "tool_choice",
                format!("'{other}' is not one of 'none', 'auto', 'required' or a function"),
            ))
        }
        Some(Value::Object(named)) => {
            let Some(name) = named
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
            else {
                return Err(ApiError::MissingParameter("tool_choice.function.name"));
            };
            match tools.iter().find(|tool| tool.name == name) {
                Some(tool) => vec![tool],
                None => {
                    return Err(invalid(
                        "tool_choice.function.name",
                        format!("no tool named '{name}' is in tools"),
                    ))
                }
            }
        }
        Some(_) => {
            return Err(ApiError::InvalidType {
                param: "tool_choice".to_owned(),
                message: "expected a string or an object naming a function".to_owned(),
            })
        }
    };
    let calls: Vec<Value> = chosen
        .iter()
        .map(|tool| {
            json!({
                "type": "object",
                "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = match <[Value; 1]>::try_from(calls) {
        Ok([one]) => one,
        Err(many) => json!({ "anyOf": many }),
    };
    let definitions: Vec<&Value> = chosen.iter().map(|tool| &tool.definition).collect();
    let instructions = format!(
        "You can call these functions:\n{}\nAnswer with one JSON object naming the function \
         to call and its arguments: {{\"name\": ..., \"arguments\": {{...}}}}.",
        serde_json::to_string_pretty(&definitions).unwrap_or_default()
    );
    Ok(ToolPlan::Call {
        format: Format::JsonSchema(schema),
        instructions,
    })
}

fn auto() -> ToolPlan {
    ToolPlan::Unhonoured(Unhonoured {
        param: "tool_choice".to_owned(),
        reason: "this engine calls a tool only when told to: set tool_choice to \"required\" \
                 or to {\"type\": \"function\", \"function\": {\"name\": ...}}; with \"auto\" \
                 (the default when tools are sent) it cannot choose between a call and text",
    })
}

fn read_tools(tools: Option<&Value>) -> Result<Vec<Tool>, ApiError> {
    let list = match tools {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => {
            return Err(ApiError::InvalidType {
                param: "tools".to_owned(),
                message: "expected an array of tools".to_owned(),
            })
        }
    };
    let mut read = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        match tool.get("type").and_then(Value::as_str) {
            Some("function") => {}
            _ => {
                return Err(invalid(
                    &format!("tools[{i}].type"),
                    "the only tool type is 'function'",
                ))
            }
        }
        let Some(function) = tool.get("function").and_then(Value::as_object) else {
            return Err(invalid(
                &format!("tools[{i}].function"),
                "expected an object",
            ));
        };
        let name = function.get("name").and_then(Value::as_str).unwrap_or("");
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(invalid(
                &format!("tools[{i}].function.name"),
                "a function's name is 1 to 64 letters, digits, underscores or dashes",
            ));
        }
        if read.iter().any(|t: &Tool| t.name == name) {
            return Err(invalid(
                &format!("tools[{i}].function.name"),
                format!("two tools are named '{name}'"),
            ));
        }
        let parameters = match function.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object"}),
            Some(schema @ Value::Object(_)) => schema.clone(),
            Some(_) => {
                return Err(invalid(
                    &format!("tools[{i}].function.parameters"),
                    "expected a JSON schema (an object)",
                ))
            }
        };
        let mut definition = Map::new();
        definition.insert("name".to_owned(), Value::from(name));
        if let Some(description) = function.get("description") {
            definition.insert("description".to_owned(), description.clone());
        }
        definition.insert("parameters".to_owned(), parameters.clone());
        read.push(Tool {
            name: name.to_owned(),
            parameters,
            definition: Value::Object(definition),
        });
    }
    Ok(read)
}

/// The tool call a whole constrained reply spells, or `None` when it is incomplete (the
/// reply ran out of tokens first).
pub fn call(text: &str, id: &str) -> Option<ToolCall> {
    let value: Value = serde_json::from_str(text).ok()?;
    let name = value.get("name")?.as_str()?.to_owned();
    // The arguments as the model wrote them, as a stream hands them out.
    let arguments = arguments_start(text).map(|start| text[start..].trim_end())?;
    let arguments = arguments.strip_suffix('}')?.trim_end().to_owned();
    Some(ToolCall {
        id: id.to_owned(),
        kind: "function",
        function: ToolFunction { name, arguments },
    })
}

const ARGUMENTS_KEY: &str = "\"arguments\":";

/// Where the arguments' value starts in a call's text, once it has come.
fn arguments_start(text: &str) -> Option<usize> {
    let key = text.find(ARGUMENTS_KEY)? + ARGUMENTS_KEY.len();
    let rest = &text[key..];
    let value = rest.len() - rest.trim_start().len();
    (key + value < text.len()).then_some(key + value)
}

/// A streamed call: the name once it is known, then the arguments in pieces, holding back
/// what may be the closing brace of the call itself.
#[derive(Debug, Default)]
pub struct CallStream {
    text: String,
    /// Where the arguments start in `text`, once the name has gone out.
    arguments: Option<usize>,
    /// How much of `text` has gone out as arguments.
    sent: usize,
}

impl CallStream {
    /// What `piece` adds to the call, if anything can go out yet.
    pub fn push(&mut self, piece: &str, id: &str) -> Option<ToolCallDelta> {
        self.text.push_str(piece);
        let mut delta = None;
        if self.arguments.is_none() {
            let start = arguments_start(&self.text)?;
            // `{"name": "f", "arguments": ` closed off reads as the call's name.
            let head = format!("{}null}}", &self.text[..start]);
            let name = serde_json::from_str::<Value>(&head)
                .ok()
                .and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_owned))?;
            self.arguments = Some(start);
            self.sent = start;
            delta = Some(ToolCallDelta {
                index: 0,
                id: Some(id.to_owned()),
                kind: Some("function"),
                function: ToolFunctionDelta {
                    name: Some(name),
                    arguments: String::new(),
                },
            });
        }
        // All but the last character: it may close the call rather than the arguments.
        let end = self.text.char_indices().last().map_or(0, |(i, _)| i);
        if end > self.sent {
            let more = self.text[self.sent..end].to_owned();
            self.sent = end;
            match &mut delta {
                Some(first) => first.function.arguments = more,
                None => delta = Some(arguments_delta(more)),
            }
        }
        delta
    }

    /// Whether the call's name has gone out.
    pub fn started(&self) -> bool {
        self.arguments.is_some()
    }

    /// The rest of the arguments when the reply is complete: all but the call's closing
    /// brace.
    pub fn finish(&mut self) -> Option<ToolCallDelta> {
        self.arguments?;
        let rest = self.text[self.sent..].trim_end();
        let rest = rest.strip_suffix('}').unwrap_or(rest).trim_end().to_owned();
        self.sent = self.text.len();
        (!rest.is_empty()).then(|| arguments_delta(rest))
    }
}

fn arguments_delta(arguments: String) -> ToolCallDelta {
    ToolCallDelta {
        index: 0,
        id: None,
        kind: None,
        function: ToolFunctionDelta {
            name: None,
            arguments,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}},
               {"type": "function", "function": {"name": "time"}}])
    }

    #[test]
    fn a_required_or_named_call_is_a_format_and_auto_is_refused_by_name() {
        let tools = weather();
        let ToolPlan::Call {
            format: Format::JsonSchema(schema),
            instructions,
        } = plan(Some(&tools), Some(&json!("required"))).unwrap()
        else {
            panic!("a call");
        };
        assert_eq!(schema["anyOf"].as_array().unwrap().len(), 2);
        assert!(instructions.contains("Weather now"), "{instructions}");
        let named = json!({"type": "function", "function": {"name": "weather"}});
        let ToolPlan::Call {
            format: Format::JsonSchema(schema),
            ..
        } = plan(Some(&tools), Some(&named)).unwrap()
        else {
            panic!("a call");
        };
        assert_eq!(schema["properties"]["name"]["const"], "weather");
        assert_eq!(
            schema["properties"]["arguments"]["required"],
            json!(["city"])
        );
        for choice in [None, Some(json!("auto"))] {
            let ToolPlan::Unhonoured(refused) = plan(Some(&tools), choice.as_ref()).unwrap() else {
                panic!("refused");
            };
            assert_eq!(refused.param, "tool_choice");
        }
        assert_eq!(
            plan(Some(&tools), Some(&json!("none"))).unwrap(),
            ToolPlan::NoCall
        );
        assert_eq!(plan(Some(&json!([])), None).unwrap(), ToolPlan::NoCall);
        assert_eq!(plan(None, Some(&json!("auto"))).unwrap(), ToolPlan::NoCall);
    }

    #[test]
    fn malformed_tools_are_refused_by_the_field_at_fault() {
        let tools = weather();
        for (tools, choice, param) in [
            (json!({}), json!("required"), "tools"),
            (
                json!([{"type": "retrieval"}]),
                json!("required"),
                "tools[0].type",
            ),
            (
                json!([{"type": "function"}]),
                json!("required"),
                "tools[0].function",
            ),
            (
                json!([{"type": "function", "function": {"name": "no spaces"}}]),
                json!("required"),
                "tools[0].function.name",
            ),
            (
                json!([{"type": "function", "function": {"name": "f"}},
                       {"type": "function", "function": {"name": "f"}}]),
                json!("required"),
                "tools[1].function.name",
            ),
            (tools.clone(), json!("sometimes"), "tool_choice"),
            (
                tools.clone(),
                json!({"type": "function", "function": {"name": "nope"}}),
                "tool_choice.function.name",
            ),
            (
                tools.clone(),
                json!({"type": "function"}),
                "tool_choice.function.name",
            ),
            (json!([]), json!("required"), "tool_choice"),
        ] {
            let err = plan(Some(&tools), Some(&choice)).unwrap_err();
            assert_eq!(err.param(), Some(param), "{tools} {choice}: {err}");
        }
    }

    #[test]
    fn a_call_streams_as_its_name_then_its_arguments_and_reads_the_same_whole() {
        let text = r#"{"name": "weather", "arguments": {"city": "Paris {1}"}}"#;
        let whole = call(text, "call_1").unwrap();
        assert_eq!(whole.function.name, "weather");
        assert_eq!(whole.function.arguments, r#"{"city": "Paris {1}"}"#);
        // Any cut of the text into pieces gives the same call.
        for size in [1, 2, 3, 7, 100] {
            let mut stream = CallStream::default();
            let mut deltas = Vec::new();
            let chars: Vec<char> = text.chars().collect();
            for piece in chars.chunks(size) {
                let piece: String = piece.iter().collect();
                deltas.extend(stream.push(&piece, "call_1"));
            }
            deltas.extend(stream.finish());
            assert_eq!(deltas[0].id.as_deref(), Some("call_1"));
            assert_eq!(deltas[0].function.name.as_deref(), Some("weather"));
            assert!(deltas[1..]
                .iter()
                .all(|d| d.id.is_none() && d.function.name.is_none()));
            let arguments: String = deltas
                .iter()
                .map(|d| d.function.arguments.as_str())
                .collect();
            assert_eq!(arguments, whole.function.arguments, "pieces of {size}");
        }
        assert!(call(r#"{"name": "weather", "arguments": {"ci"#, "c").is_none());
    }
}
