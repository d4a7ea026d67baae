//! Which tokens may come next in a reply that must follow a format (a JSON schema)? A
//! [`Constraint`] per sequence answers it at each step, as a mask over the vocabulary; the
//! scheduler samples only among the tokens it allows and tells it which was chosen.
//!
//! The automaton is llguidance's (an Earley parser over lexemes, walked along a trie of the
//! vocabulary's bytes): the grammar is compiled once per request on the async side
//! ([`Formats::compile`], where a bad schema is a 400), and only requests that ask for a
//! format pay for a mask; unconstrained sequences never touch this module.

use std::sync::{Arc, OnceLock};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{
    InferenceCapabilities, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv,
};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::model::tokenizer::LlamaTokenizer;

/// A format a reply must follow.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A value valid against this JSON schema.
    JsonSchema(Value),
}

/// Why a format cannot be followed: the schema is invalid or beyond what the parser takes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(pub String);

/// How JSON is laid out when the schema does not say: one space after `:` and `,`, no other
/// whitespace. A small model left free to add whitespace can fill a reply with it; fixed
/// separators also give the tokens models see most in JSON.
fn layout() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// A model's vocabulary as the constraint engine sees it, built on the first request that
/// asks for a format (a trie of 49,152 tokens takes a fraction of a second).
pub struct Formats {
    tokenizer: Arc<LlamaTokenizer>,
    factory: OnceLock<Result<ParserFactory, FormatError>>,
}

impl std::fmt::Debug for Formats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Formats")
            .field("ready", &self.factory.get().is_some())
            .finish()
    }
}

impl Formats {
    pub fn new(tokenizer: Arc<LlamaTokenizer>) -> Self {
        Formats {
            tokenizer,
            factory: OnceLock::new(),
        }
    }

    /// A constraint for one sequence following `format`. Compiling may take milliseconds
    /// for a large schema: call it off the async runtime.
    pub fn compile(&self, format: &Format) -> Result<Constraint, FormatError> {
        let factory = self
            .factory
            .get_or_init(|| factory(&self.tokenizer))
            .as_ref()
            .map_err(Clone::clone)?;
        let mut schema = match format {
            Format::JsonObject => json!({"type": "object"}),
            Format::JsonSchema(schema) => schema.clone(),
        };
        match &mut schema {
            Value::Object(fields) => {
                fields.entry("x-guidance").or_insert_with(layout);
            }
            // `true` (anything) and `false` (nothing) are schemas too.
            Value::Bool(_) => {}
            _ => {
                return Err(FormatError(
                    "a JSON schema is an object (or true/false)".to_owned(),
                ))
            }
        }
        let parser = factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|err| FormatError(err.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(err) = matcher.get_error() {
            return Err(FormatError(err));
        }
        Ok(Constraint { matcher })
    }
}

fn factory(tokenizer: &LlamaTokenizer) -> Result<ParserFactory, FormatError> {
    let Some(eos) = tokenizer.eos else {
        return Err(FormatError(
            "this model has no end-of-sequence token to end a formatted reply with".to_owned(),
        ));
    };
    let words: Vec<Vec<u8>> = (0..tokenizer.vocab_size() as u32)
        .map(|id| {
            let bytes = tokenizer.token_bytes(id);
            if tokenizer.is_control(id) {
                // Marked so that no format ever writes a control token as text.
                let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                marked.extend_from_slice(bytes);
                marked
            } else {
                bytes.to_vec()
            }
        })
        .collect();
    let info = TokRxInfo::new(words.len() as u32, eos);
    let env: TokEnv = Arc::new(Vocabulary {
        trie: TokTrie::from(&info, &words),
    });
    let mut factory = ParserFactory::new(
        &env,
        InferenceCapabilities::default(),
        &llguidance::earley::SlicedBiasComputer::general_slices(),
    )
    .map_err(|err| FormatError(err.to_string()))?;
    factory.quiet();
    *factory.limits_mut() = ParserLimits::default();
    Ok(factory)
}

/// The vocabulary's trie. Only the parser's own forced-token shortcuts tokenize text, and
/// the engine does not take them; the trie's greedy split serves them.
struct Vocabulary {
    trie: TokTrie,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// One sequence's place in its format.
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

/// A copy at the same place, that moves on by itself (for `n` choices of one request).
impl Clone for Constraint {
    fn clone(&self) -> Self {
        Constraint {
            matcher: self.matcher.deep_clone(),
        }
    }
}

impl Constraint {
    /// `logits` with every token the format does not allow next set to minus infinity,
    /// into `out`. Once the format is complete only the end-of-sequence token is allowed.
    pub fn mask(&mut self, logits: &[f32], out: &mut Vec<f32>) -> Result<(), FormatError> {
        let allowed: SimpleVob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|err| FormatError(err.to_string()))?;
        out.clear();
        out.extend(logits.iter().enumerate().map(|(id, &logit)| {
            if allowed.is_allowed(id as TokenId) {
                logit
            } else {
                f32::NEG_INFINITY
            }
        }));
        if out.iter().all(|&l| l == f32::NEG_INFINITY) {
            return Err(FormatError(
                "the format allows no token of this vocabulary here".to_owned(),
            ));
        }
        Ok(())
    }

    /// Moves past `token`, which [`Constraint::mask`] allowed.
    pub fn accept(&mut self, token: u32) -> Result<(), FormatError> {
        self.matcher
            .consume_token(token)
            .map_err(|err| FormatError(err.to_string()))
    }
}
