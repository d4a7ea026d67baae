//! What identifies an answer: the exact key (everything that changes the output), the
//! namespace a semantic search runs in (the same, less the last question), and the text of
//! that last question.
//!
//! Both keys start with the tenant, so no lookup can ever reach another tenant's entries.

use crate::request::Route;
use serde::Deserialize;
use serde_json::Value;
use sluice_policies::cache::RequestFacts;
use sluice_policies::same_question::normal_form;
use std::collections::BTreeMap;

/// A 32-byte BLAKE3 digest.
pub type Digest = [u8; 32];

/// The body fields of a chat or text completion request, owned. Every field OpenAI defines
/// is named, so that [`CacheRequest::keys`] must say for each whether it changes the answer;
/// fields nobody named land in `other` and are part of the key.
#[derive(Debug, Deserialize)]
// The delivery-only fields are named so that they are placed, not read.
#[allow(dead_code)]
pub struct CacheRequest {
    model: String,
    #[serde(default)]
    messages: Option<Value>,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    suffix: Option<Value>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    logit_bias: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<Value>,
    #[serde(default)]
    functions: Option<Value>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<Value>,
    #[serde(default)]
    echo: Option<Value>,
    #[serde(default)]
    best_of: Option<Value>,
    #[serde(default)]
    reasoning_effort: Option<Value>,
    #[serde(default)]
    modalities: Option<Value>,
    #[serde(default)]
    audio: Option<Value>,
    #[serde(default)]
    prediction: Option<Value>,
    #[serde(default)]
    verbosity: Option<Value>,
    #[serde(default)]
    web_search_options: Option<Value>,
    // Fields that change how the answer is delivered or recorded, not what it says.
    #[serde(default)]
    stream: Option<Value>,
    #[serde(default)]
    stream_options: Option<Value>,
    #[serde(default)]
    user: Option<Value>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    store: Option<Value>,
    #[serde(default)]
    service_tier: Option<Value>,
    #[serde(default)]
    safety_identifier: Option<Value>,
    #[serde(default)]
    prompt_cache_key: Option<Value>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// Where an answer may be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKeys {
    /// Everything that changes the output, the whole prompt included.
    pub exact: Digest,
    /// Everything that changes the output except the last question: semantic search runs
    /// among entries with the same namespace.
    pub namespace: Digest,
    /// The last question, as it is embedded and compared; `None` when the prompt has no
    /// plain text to compare (then only exact hits are possible).
    pub question: Option<String>,
}

impl CacheRequest {
    pub fn parse(body: &[u8]) -> Option<CacheRequest> {
        serde_json::from_slice(body).ok()
    }

    /// The model as the backend is asked for it (an alias already resolved).
    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn is_stream(&self) -> bool {
        self.stream
            .as_ref()
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    pub fn facts(&self) -> RequestFacts {
        let present = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
        RequestFacts {
            temperature: self.temperature,
            n: self.n,
            uses_tools: present(&self.tools)
                || present(&self.functions)
                || present(&self.tool_choice)
                || present(&self.function_call),
            wants_logprobs: self
                .logprobs
                .as_ref()
                .is_some_and(|v| !v.is_null() && *v != Value::Bool(false))
                || present(&self.top_logprobs),
        }
    }

    /// The request's keys for `tenant` on `route` (the model as the backend is asked for it).
    pub fn keys(&self, tenant: &str, route: Route) -> CacheKeys {
        // Destructured without `..`: a new field does not compile until it is placed on one
        // side or the other.
        let CacheRequest {
            model,
            messages,
            prompt,
            suffix,
            temperature,
            top_p,
            n,
            seed,
            max_tokens,
            max_completion_tokens,
            stop,
            presence_penalty,
            frequency_penalty,
            logit_bias,
            response_format,
            tools,
            tool_choice,
            parallel_tool_calls,
            functions,
            function_call,
            logprobs,
            top_logprobs,
            echo,
            best_of,
            reasoning_effort,
            modalities,
            audio,
            prediction,
            verbosity,
            web_search_options,
            stream: _,
            stream_options: _,
            user: _,
            metadata: _,
            store: _,
            service_tier: _,
            safety_identifier: _,
            prompt_cache_key: _,
            other,
        } = self;

        let mut namespace = KeyWriter::new("sluice-cache-namespace-v1");
        namespace.text("tenant", tenant);
        namespace.text("route", route.name());
        namespace.text("model", model);
        namespace.float("temperature", *temperature);
        namespace.float("top_p", *top_p);
        namespace.json("n", &n.map(Value::from));
        namespace.json("seed", &seed.map(Value::from));
        // max_tokens and max_completion_tokens mean the same cap.
        namespace.json(
            "max_tokens",
            &max_completion_tokens.or(*max_tokens).map(Value::from),
        );
        namespace.json("stop", stop);
        namespace.float("presence_penalty", *presence_penalty);
        namespace.float("frequency_penalty", *frequency_penalty);
        for (name, value) in [
            ("suffix", suffix),
            ("logit_bias", logit_bias),
            ("response_format", response_format),
            ("tools", tools),
            ("tool_choice", tool_choice),
            ("parallel_tool_calls", parallel_tool_calls),
            ("functions", functions),
            ("function_call", function_call),
            ("logprobs", logprobs),
            ("top_logprobs", top_logprobs),
            ("echo", echo),
            ("best_of", best_of),
            ("reasoning_effort", reasoning_effort),
            ("modalities", modalities),
            ("audio", audio),
            ("prediction", prediction),
            ("verbosity", verbosity),
            ("web_search_options", web_search_options),
        ] {
            namespace.json(name, value);
        }
        for (name, value) in other {
            namespace.json(name, &Some(value.clone()));
        }

        let (context, question) = split_prompt(messages.as_ref().or(prompt.as_ref()));
        namespace.json("context", &context);
        let namespace = namespace.finish();

        // The namespace holds everything but the question, so the question's normal form
        // completes the exact key: "What is Rust?" and "what is rust" are one request.
        let mut exact = KeyWriter::new("sluice-cache-exact-v2");
        exact.bytes("namespace", &namespace);
        match &question {
            Some(text) => exact.text("question", &normal_form(text)),
            None => exact.json("prompt", &messages.clone().or_else(|| prompt.clone())),
        }
        CacheKeys {
            exact: exact.finish(),
            namespace,
            question,
        }
    }
}

/// Splits a prompt into what came before the last question and the question's text. For a
/// chat, the question is the last user turn's text; everything else (system prompt, earlier
/// turns, anything after it) is context, so the same words in another conversation are
/// another question. A text prompt that is one string is all question.
fn split_prompt(prompt: Option<&Value>) -> (Option<Value>, Option<String>) {
    match prompt {
        Some(Value::String(text)) => (None, Some(text.clone())),
        Some(Value::Array(messages)) if messages.iter().all(Value::is_object) => {
            let last_user = messages
                .iter()
                .rposition(|m| m.get("role").and_then(Value::as_str) == Some("user"));
            let Some(at) = last_user else {
                return (Some(Value::Array(messages.clone())), None);
            };
            let Some(text) = message_text(&messages[at]) else {
                return (Some(Value::Array(messages.clone())), None);
            };
            let mut context = messages.clone();
            // The turn itself stays in the context without its text: its name and other
            // fields still change the answer.
            if let Some(turn) = context[at].as_object_mut() {
                turn.remove("content");
            }
            (Some(Value::Array(context)), Some(text))
        }
        other => (other.cloned(), None),
    }
}

/// A message's text: its string content, or its text parts joined; `None` when it has
/// anything else (images, audio), which is then compared only exactly.
fn message_text(message: &Value) -> Option<String> {
    match message.get("content")? {
        Value::String(text) => Some(text.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for part in parts {
                if part.get("type").and_then(Value::as_str) != Some("text") {
                    return None;
                }
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(part.get("text")?.as_str()?);
            }
            Some(text)
        }
        _ => None,
    }
}

/// Feeds named fields into BLAKE3, each framed by its name and length so that no two
/// different requests can write the same bytes.
struct KeyWriter {
    hasher: blake3::Hasher,
}

impl KeyWriter {
    fn new(domain: &str) -> KeyWriter {
        KeyWriter {
            hasher: blake3::Hasher::new_derive_key(domain),
        }
    }

    fn bytes(&mut self, name: &str, value: &[u8]) {
        for part in [name.as_bytes(), value] {
            self.hasher.update(&(part.len() as u64).to_le_bytes());
            self.hasher.update(part);
        }
    }

    fn text(&mut self, name: &str, value: &str) {
        self.bytes(name, value.as_bytes());
    }

    /// Numbers by value: `0`, `0.0` and `0e0` are one temperature.
    fn float(&mut self, name: &str, value: Option<f64>) {
        match value {
            Some(v) => self.bytes(name, &v.to_le_bytes()),
            None => self.bytes(name, b"unset"),
        }
    }

    /// JSON by meaning: object keys sorted, whitespace dropped; absent and `null` are one.
    fn json(&mut self, name: &str, value: &Option<Value>) {
        let mut canonical = Vec::new();
        match value {
            None | Some(Value::Null) => canonical.extend_from_slice(b"unset"),
            Some(v) => write_canonical(v, &mut canonical),
        }
        self.bytes(name, &canonical);
    }

    fn finish(self) -> Digest {
        *self.hasher.finalize().as_bytes()
    }
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String(k.clone()).to_string().as_bytes());
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => out.extend_from_slice(format!("{f:e}").as_bytes()),
            _ => out.extend_from_slice(n.to_string().as_bytes()),
        },
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(tenant: &str, body: &str) -> CacheKeys {
        CacheRequest::parse(body.as_bytes())
            .unwrap()
            .keys(tenant, Route::ChatCompletions)
    }

    const ASK: &str = r#"{"model":"m","temperature":0,"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"What is Rust?"}]}"#;

    #[test]
    fn the_same_request_has_the_same_keys_however_it_is_written() {
        let spaced = r#"{ "messages" : [{"content":"Be brief.","role":"system"},{"role":"user","content":"What is Rust?"}], "temperature":0.0, "model":"m", "stream": true, "user":"u1" }"#;
        assert_eq!(keys("t", ASK), keys("t", spaced));
        assert_eq!(keys("t", ASK).question.as_deref(), Some("What is Rust?"));
    }

    #[test]
    fn tenants_and_output_changing_fields_change_the_keys() {
        let base = keys("t", ASK);
        assert_ne!(base.namespace, keys("other", ASK).namespace);
        assert_ne!(base.exact, keys("other", ASK).exact);
        for changed in [
            ASK.replace("\"temperature\":0", "\"temperature\":0,\"seed\":7"),
            ASK.replace("\"temperature\":0", "\"temperature\":0,\"max_tokens\":7"),
            ASK.replace("\"temperature\":0", "\"temperature\":0,\"top_p\":0.5"),
            ASK.replace("\"temperature\":0", "\"temperature\":0,\"stop\":[\"x\"]"),
            ASK.replace(
                "\"temperature\":0",
                "\"temperature\":0,\"response_format\":{\"type\":\"json_object\"}",
            ),
            ASK.replace("\"temperature\":0", "\"temperature\":0,\"brand_new\":1"),
            ASK.replace("\"model\":\"m\"", "\"model\":\"m2\""),
            ASK.replace("Be brief.", "Be verbose."),
        ] {
            let k = keys("t", &changed);
            assert_ne!(k.namespace, base.namespace, "{changed}");
            assert_ne!(k.exact, base.exact, "{changed}");
        }
    }

    #[test]
    fn a_different_question_keeps_the_namespace_but_not_the_exact_key() {
        let other = keys("t", &ASK.replace("What is Rust?", "What's Rust?"));
        let base = keys("t", ASK);
        assert_eq!(other.namespace, base.namespace);
        assert_ne!(other.exact, base.exact);
    }

    #[test]
    fn case_spacing_and_sentence_punctuation_do_not_change_the_exact_key() {
        let base = keys("t", ASK);
        for same in ["what is rust", "  WHAT   is Rust?? ", "What is Rust"] {
            let k = keys("t", &ASK.replace("What is Rust?", same));
            assert_eq!(k.exact, base.exact, "{same}");
            // The question itself is kept as written: it is what gets embedded and verified.
            assert_eq!(k.question.as_deref(), Some(same));
        }
        let code = keys("t", &ASK.replace("What is Rust?", "what does `ls -L` do"));
        let other = keys("t", &ASK.replace("What is Rust?", "what does `ls -l` do"));
        assert_ne!(code.exact, other.exact);
    }

    #[test]
    fn text_parts_are_questions_and_images_are_not() {
        let parts = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#;
        assert_eq!(keys("t", parts).question.as_deref(), Some("a\nb"));
        let image = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#;
        assert_eq!(keys("t", image).question, None);
    }

    #[test]
    fn facts_see_tools_and_logprobs() {
        let r = CacheRequest::parse(
            br#"{"model":"m","messages":[],"tools":[{"type":"function"}],"logprobs":true}"#,
        )
        .unwrap();
        let f = r.facts();
        assert!(f.uses_tools && f.wants_logprobs);
        let r = CacheRequest::parse(
            br#"{"model":"m","messages":[],"tools":null,"logprobs":false,"n":1,"temperature":0}"#,
        )
        .unwrap();
        let f = r.facts();
        assert!(!f.uses_tools && !f.wants_logprobs);
        assert_eq!(f.temperature, Some(0.0));
    }
}
