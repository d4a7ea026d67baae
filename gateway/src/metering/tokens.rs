//! How many tokens is a text, for a backend that reports none? Each configured model's own
//! tokenizer (`[tokenizers]`: model → its `tokenizer.json`, or its GGUF file, of which only
//! the metadata is read), loaded once at start. Without one, the estimate stays the
//! conservative one from bytes (see `estimate`).

use crate::request::{RequestView, Route};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use tokenizers::Tokenizer;

/// What OpenAI counts for the chat format beyond the messages' text: per message (its role
/// and separators) and once for the reply's start.
const TOKENS_PER_MESSAGE: u64 = 3;
const TOKENS_PER_REPLY: u64 = 3;

#[derive(Default)]
pub struct TokenCounters {
    by_model: HashMap<String, Arc<Tokenizer>>,
}

impl TokenCounters {
    /// Loads each model's tokenizer; a file that cannot be read or parsed is an error naming
    /// the model and the file.
    pub fn load(files: &BTreeMap<String, PathBuf>) -> Result<TokenCounters, String> {
        let mut by_model = HashMap::new();
        for (model, file) in files {
            let cannot = |e: &dyn std::fmt::Display| {
                format!("tokenizers.{model}: cannot load {}: {e}", file.display())
            };
            let is_gguf = file
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
            let mut tokenizer = if is_gguf {
                let header = sluice_gguf::Header::read(file).map_err(|e| cannot(&e))?;
                sluice_gguf::tokenizer::byte_pairs(&header.metadata)
                    .map_err(|e| cannot(&e))?
                    .tokenizer
            } else {
                Tokenizer::from_file(file).map_err(|e| cannot(&e))?
            };
            // Counting, not batching: a padded or truncated encoding miscounts.
            tokenizer.with_padding(None);
            tokenizer
                .with_truncation(None)
                .map_err(|e| format!("tokenizers.{model}: {e}"))?;
            by_model.insert(model.clone(), Arc::new(tokenizer));
        }
        Ok(TokenCounters { by_model })
    }

    pub fn get(&self, model: &str) -> Option<&Tokenizer> {
        self.by_model.get(model).map(Arc::as_ref)
    }
}

/// The tokens of `text`, without the special tokens a model adds around a whole input.
pub fn count(tokenizer: &Tokenizer, text: &str) -> u64 {
    tokenizer
        .encode_fast(text, false)
        .map_or(text.len() as u64, |e| e.len() as u64)
}

/// The prompt tokens of a request body: the messages' text plus the chat format's own
/// tokens, the prompt(s) of a completion, the input(s) of an embedding (token arrays count
/// their length). `None` when the body holds none of these in a readable form.
pub fn prompt_tokens(tokenizer: &Tokenizer, route: Route, body: &[u8]) -> Option<u64> {
    let view = RequestView::parse(route, body).ok()?;
    match route {
        Route::ChatCompletions => {
            #[derive(Deserialize)]
            struct Message<'a> {
                #[serde(borrow, default)]
                content: Option<&'a RawValue>,
            }
            let messages: Vec<Message> = serde_json::from_str(view.messages?.get()).ok()?;
            let mut tokens = TOKENS_PER_REPLY;
            for message in &messages {
                tokens += TOKENS_PER_MESSAGE;
                if let Some(content) = message.content {
                    tokens += content_tokens(tokenizer, content)?;
                }
            }
            Some(tokens)
        }
        Route::Completions => prompts_tokens(tokenizer, view.prompt?),
        Route::Embeddings => prompts_tokens(tokenizer, view.input?),
        Route::Health | Route::Models => None,
    }
}

/// A message's content: a string, or parts of which the text ones count.
fn content_tokens(tokenizer: &Tokenizer, content: &RawValue) -> Option<u64> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Content {
        Text(String),
        Parts(Vec<serde_json::Value>),
        Other(serde::de::IgnoredAny),
    }
    Some(match serde_json::from_str(content.get()).ok()? {
        Content::Text(text) => count(tokenizer, &text),
        Content::Parts(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .map(|text| count(tokenizer, text))
            .sum(),
        Content::Other(_) => 0,
    })
}

/// A prompt or input: a string, an array of strings, a token array, or an array of them.
fn prompts_tokens(tokenizer: &Tokenizer, prompt: &RawValue) -> Option<u64> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Prompt {
        Text(String),
        Tokens(Vec<u64>),
        Many(Vec<Prompt>),
    }
    fn tokens(tokenizer: &Tokenizer, prompt: &Prompt) -> u64 {
        match prompt {
            Prompt::Text(text) => count(tokenizer, text),
            Prompt::Tokens(ids) => ids.len() as u64,
            Prompt::Many(prompts) => prompts.iter().map(|p| tokens(tokenizer, p)).sum(),
        }
    }
    let prompt: Prompt = serde_json::from_str(prompt.get()).ok()?;
    Some(tokens(tokenizer, &prompt))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;

    /// A tokenizer of whitespace-separated words: one token per word.
    fn words() -> Tokenizer {
        let vocab = [("[UNK]".to_owned(), 0)].into_iter().collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("[UNK]".to_owned())
            .build()
            .unwrap();
        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_pre_tokenizer(Some(Whitespace {}));
        tokenizer
    }

    #[test]
    fn chat_prompts_count_their_text_and_the_chat_format() {
        let body = br#"{"model":"m","messages":[
            {"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"how do locks work"},{"type":"image_url","image_url":{"url":"x"}}]},
            {"role":"assistant","content":null,"tool_calls":[]}]}"#;
        let t = words();
        assert_eq!(count(&t, "how do locks work"), 4);
        assert_eq!(
            prompt_tokens(&t, Route::ChatCompletions, body),
            Some(2 + 4 + 3 * TOKENS_PER_MESSAGE + TOKENS_PER_REPLY)
        );
    }

    #[test]
    fn completion_prompts_and_embedding_inputs_count_text_and_token_arrays() {
        let t = words();
        let body = br#"{"model":"m","prompt":["a weir", [5, 6, 7]]}"#;
        assert_eq!(prompt_tokens(&t, Route::Completions, body), Some(2 + 3));
        let body = br#"{"model":"m","input":"one two three"}"#;
        assert_eq!(prompt_tokens(&t, Route::Embeddings, body), Some(3));
        let body = br#"{"model":"m","input":{"not":"a prompt"}}"#;
        assert_eq!(prompt_tokens(&t, Route::Embeddings, body), None);
    }
}
