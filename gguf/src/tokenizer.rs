//! How does a GGUF file's text become tokens? GGUF stores a GPT-2-style byte-level BPE as
//! `tokenizer.ggml.tokens` (the vocabulary, in id order), `tokenizer.ggml.merges` ("a b"
//! lines, in rank order) and `tokenizer.ggml.token_type` (3 marks control tokens, which match
//! whole and are never split). `tokenizer.ggml.pre` names the pre-tokenizer, which GGUF does
//! not store, so only the ones known here are accepted.

use crate::Value;
use std::collections::BTreeMap;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Llama 3's split before its byte-level mapping (its tokenizer.json, and llama.cpp's
/// `llama-bpe`): contractions, letter runs with one leading non-letter, numbers up to three
/// digits, punctuation runs, newlines, spaces.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's: Llama 3's with every digit on its own.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF's `token_type` of control tokens (`<|im_start|>`...).
pub const CONTROL: i64 = 3;

/// The tokenizer the metadata describes, with its vocabulary and each token's type.
pub struct BytePairs {
    pub tokenizer: Tokenizer,
    /// The vocabulary as written (byte-level characters), in id order.
    pub tokens: Vec<String>,
    /// Each token's `token_type` (1 where the file says none).
    pub types: Vec<i64>,
}

fn strings<'a>(metadata: &'a BTreeMap<String, Value>, key: &str) -> Result<Vec<&'a str>, String> {
    metadata
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{key} is missing or not an array"))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| format!("{key} holds a non-string"))
        })
        .collect()
}

/// Builds the byte-level BPE a GGUF file's metadata describes.
pub fn byte_pairs(metadata: &BTreeMap<String, Value>) -> Result<BytePairs, String> {
    let model = metadata
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(format!(
            "tokenizer.ggml.model `{model}` (only `gpt2`, byte-level BPE, is read)"
        ));
    }
    let pre = metadata
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    // What Hugging Face's tokenizer.json says for these models: SmolLM's splits every
    // digit on its own before GPT-2's regex.
    let byte_level = ByteLevel::new(false, true, true);
    // Llama 3's and Qwen2's split by their own pattern, then map bytes without GPT-2's.
    let split_then_bytes = |pattern: &str| -> Result<PreTokenizerWrapper, String> {
        let split = Split::new(
            SplitPattern::Regex(pattern.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|err| format!("the pre-tokenizer's pattern: {err}"))?;
        Ok(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "gpt2" | "default" => byte_level.into(),
        "llama-bpe" | "llama3" => split_then_bytes(LLAMA3_SPLIT)?,
        "qwen2" => split_then_bytes(QWEN2_SPLIT)?,
        other => {
            return Err(format!(
                "tokenizer.ggml.pre `{other}` (known: smollm, gpt2, default, llama-bpe, qwen2)"
            ))
        }
    };
    let tokens = strings(metadata, "tokenizer.ggml.tokens")?;
    let merges = strings(metadata, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|line| {
            line.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| format!("merge `{line}` is not two tokens"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let types: Vec<i64> = match metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .as_array()
            .ok_or("tokenizer.ggml.token_type is not an array")?
            .iter()
            .map(|t| match *t {
                Value::I32(t) => Ok(i64::from(t)),
                _ => t
                    .as_u64()
                    .map(|t| t as i64)
                    .ok_or("tokenizer.ggml.token_type holds a non-integer"),
            })
            .collect::<Result<_, _>>()?,
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(format!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        ));
    }
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| ((*t).to_owned(), id as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|err| format!("BPE: {err}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == CONTROL)
        .map(|(t, _)| AddedToken::from((*t).to_owned(), true))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|err| format!("control tokens: {err}"))?;
    Ok(BytePairs {
        tokenizer,
        tokens: tokens.into_iter().map(str::to_owned).collect(),
        types,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Value;

    fn strings(items: &[&str]) -> Value {
        Value::Array(
            items
                .iter()
                .map(|s| Value::String((*s).to_owned()))
                .collect(),
        )
    }

    fn metadata(pre: &str) -> BTreeMap<String, Value> {
        // Byte-level characters: `Ġ` is a space.
        let tokens = [
            "h", "e", "l", "o", "Ġ", "1", "2", "he", "ll", "hell", "hello", "<|end|>",
        ];
        let mut types = vec![Value::I32(1); tokens.len()];
        types[11] = Value::I32(CONTROL as i32);
        [
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String(pre.into())),
            ("tokenizer.ggml.tokens", strings(&tokens)),
            (
                "tokenizer.ggml.merges",
                strings(&["h e", "l l", "he ll", "hell o"]),
            ),
            ("tokenizer.ggml.token_type", Value::Array(types)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    fn ids(pairs: &BytePairs, text: &str) -> Vec<u32> {
        pairs
            .tokenizer
            .encode_fast(text, false)
            .unwrap()
            .get_ids()
            .to_vec()
    }

    #[test]
    fn merges_apply_in_rank_order_and_control_tokens_match_whole() {
        let pairs = byte_pairs(&metadata("gpt2")).unwrap();
        assert_eq!(ids(&pairs, "hello"), [10]);
        assert_eq!(ids(&pairs, "hello hello<|end|>"), [10, 4, 10, 11]);
        assert_eq!(pairs.tokens.len(), pairs.types.len());
        // SmolLM's pre-tokenizer splits digits one by one; GPT-2's keeps them together (and
        // this vocabulary has no merge for them either way).
        let smollm = byte_pairs(&metadata("smollm")).unwrap();
        assert_eq!(ids(&smollm, "12"), [5, 6]);
    }

    /// The pieces `pre` cuts `text` into, before byte-level mapping is undone.
    fn pieces(pre: &str, text: &str) -> Vec<String> {
        use tokenizers::tokenizer::{OffsetReferential, OffsetType, PreTokenizedString};
        use tokenizers::PreTokenizer;
        let pairs = byte_pairs(&metadata(pre)).unwrap();
        let mut split = PreTokenizedString::from(text);
        pairs
            .tokenizer
            .get_pre_tokenizer()
            .unwrap()
            .pre_tokenize(&mut split)
            .unwrap();
        split
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(piece, _, _)| piece.to_owned())
            .collect()
    }

    /// The expected pieces are what Hugging Face's Python `tokenizers` gives for the same
    /// split and byte-level steps.
    #[test]
    fn llama3_and_qwen2_split_numbers_words_and_spaces_as_their_tokenizers_do() {
        let text = "I'll pay 12345 now,\n\n  ok";
        // Byte-level characters: `Ġ` a space, `Ċ` a newline.
        assert_eq!(
            pieces("llama-bpe", text),
            ["I", "'ll", "Ġpay", "Ġ", "123", "45", "Ġnow", ",ĊĊ", "Ġ", "Ġok"]
        );
        assert_eq!(
            pieces("qwen2", text),
            ["I", "'ll", "Ġpay", "Ġ", "1", "2", "3", "4", "5", "Ġnow", ",ĊĊ", "Ġ", "Ġok"]
        );
    }

    #[test]
    fn what_is_not_a_known_byte_level_bpe_is_refused_with_the_key() {
        let mut unknown_pre = metadata("gpt2");
        unknown_pre.insert(
            "tokenizer.ggml.pre".into(),
            Value::String("deepseek".into()),
        );
        assert!(byte_pairs(&unknown_pre)
            .err()
            .unwrap()
            .contains("tokenizer.ggml.pre"));
        let mut sentencepiece = metadata("gpt2");
        sentencepiece.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        assert!(byte_pairs(&sentencepiece)
            .err()
            .unwrap()
            .contains("tokenizer.ggml.model"));
        let mut short_types = metadata("gpt2");
        short_types.insert("tokenizer.ggml.token_type".into(), Value::Array(vec![]));
        assert!(byte_pairs(&short_types)
            .err()
            .unwrap()
            .contains("token types"));
    }
}
