//! How does a decoder's text become tokens and back? Its tokenizer and chat template, built
//! from the metadata of its GGUF file or read from a Hugging Face folder's `tokenizer.json`
//! and `tokenizer_config.json`.
//!
//! A GGUF file's byte-level BPE is built by `sluice_gguf::tokenizer` (which the gateway shares,
//! to count tokens); this adds each token's bytes, for streaming text, and the special tokens.
//! The `tokenizers` crate runs it. The chat template is Jinja, rendered by minijinja.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::Tokenizer;

use super::gguf::{Gguf, Value};
use sluice_gguf::tokenizer::CONTROL;

/// One message of a chat, as the template sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChatMessage<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

/// Text to token ids and back, and chats to prompt text.
pub struct LlamaTokenizer {
    tokenizer: Tokenizer,
    /// Each token's bytes (byte-level BPE maps bytes to printable characters; this undoes
    /// it), so text can be streamed by bytes: a token may end inside a UTF-8 character.
    token_bytes: Vec<Vec<u8>>,
    /// Control tokens (`<|im_end|>`...): markers, never text a reply may spell out.
    control: Vec<bool>,
    template: Option<minijinja::Environment<'static>>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
}

impl std::fmt::Debug for LlamaTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaTokenizer")
            .field("vocab", &self.token_bytes.len())
            .finish()
    }
}

/// GPT-2's table from bytes to the characters that stand for them in the vocabulary:
/// printable Latin-1 bytes stand for themselves, the rest for U+0100 onwards in order.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        *slot = if printable {
            char::from(b as u8)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..U+0143")
        };
    }
    table
}

impl LlamaTokenizer {
    pub fn from_gguf(gguf: &Gguf) -> Result<LlamaTokenizer, String> {
        let sluice_gguf::tokenizer::BytePairs {
            tokenizer,
            tokens,
            types,
        } = sluice_gguf::tokenizer::byte_pairs(&gguf.metadata)?;
        let to_byte: HashMap<char, u8> = byte_chars()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let token_bytes = tokens
            .iter()
            .zip(&types)
            .map(|(t, &ty)| match ty {
                // Control tokens are text as written, never byte-mapped.
                CONTROL => t.as_bytes().to_vec(),
                _ => t
                    .chars()
                    .map(|c| to_byte.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| t.as_bytes().to_vec()),
            })
            .collect();

        let control = types.iter().map(|&ty| ty == CONTROL).collect();
        let template = gguf
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(|source| chat_template(source, "tokenizer.chat_template"))
            .transpose()?;
        let id = |key: &str| {
            gguf.get(key)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
        };
        Ok(LlamaTokenizer {
            tokenizer,
            token_bytes,
            control,
            template,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            add_bos: gguf
                .get("tokenizer.ggml.add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }

    /// The tokenizer of a Hugging Face folder: `tokenizer.json` for the tokens,
    /// `tokenizer_config.json` for the chat template, the BOS and EOS tokens and whether a
    /// prompt starts with BOS, `generation_config.json` for the EOS id when it says one.
    pub fn from_folder(dir: &Path) -> Result<LlamaTokenizer, String> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|err| format!("{}: {err}", tokenizer_path.display()))?;
        let read_json = |name: &str| -> Result<serde_json::Value, String> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    serde_json::from_str(&text).map_err(|err| format!("{}: {err}", path.display()))
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    Ok(serde_json::Value::Null)
                }
                Err(err) => Err(format!("{}: {err}", path.display())),
            }
        };
        let config = read_json("tokenizer_config.json")?;
        let generation = read_json("generation_config.json")?;

        let byte_level = matches!(tokenizer.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
        let to_byte: HashMap<char, u8> = byte_chars()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let added = tokenizer.get_added_tokens_decoder();
        let vocab_size = tokenizer.get_vocab_size(true);
        let token_bytes = (0..vocab_size as u32)
            .map(|id| {
                let Some(token) = tokenizer.id_to_token(id) else {
                    return Vec::new();
                };
                if added.contains_key(&id) {
                    // Added tokens (`<|im_start|>`...) are text as written.
                    token.into_bytes()
                } else if byte_level {
                    token
                        .chars()
                        .map(|c| to_byte.get(&c).copied())
                        .collect::<Option<Vec<u8>>>()
                        .unwrap_or_else(|| token.into_bytes())
                } else {
                    sentencepiece_bytes(&token)
                }
            })
            .collect();
        let control = (0..vocab_size as u32)
            .map(|id| added.get(&id).is_some_and(|token| token.special))
            .collect();

        // A token is written as its text, or as an object with a `content` field.
        let token_text = |value: &serde_json::Value| {
            value
                .as_str()
                .or_else(|| value["content"].as_str())
                .map(str::to_owned)
        };
        let id_of = |key: &str| -> Option<u32> {
            let id = match &generation[key] {
                serde_json::Value::Array(ids) => ids.first().and_then(serde_json::Value::as_u64),
                other => other.as_u64(),
            };
            id.and_then(|id| u32::try_from(id).ok()).or_else(|| {
                token_text(&config[key.trim_end_matches("_id")])
                    .and_then(|text| tokenizer.token_to_id(&text))
            })
        };
        let template = match &config["chat_template"] {
            serde_json::Value::String(source) => Some(source.as_str()),
            // Several named templates: the default one is the chat template.
            serde_json::Value::Array(named) => named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str()),
            _ => None,
        }
        .map(|source| chat_template(source, "tokenizer_config.json chat_template"))
        .transpose()?;
        Ok(LlamaTokenizer {
            bos: id_of("bos_token_id"),
            eos: id_of("eos_token_id"),
            add_bos: config["add_bos_token"].as_bool().unwrap_or(false),
            tokenizer,
            token_bytes,
            control,
            template,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Token ids of `text`, control tokens written in it matching whole, with the BOS token
    /// first when the model asks for one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|err| err.to_string())?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// The bytes a token stands for; empty for ids past the vocabulary.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map_or(&[][..], Vec::as_slice)
    }

    /// Whether `id` is a control token (a marker such as end-of-turn, not text).
    pub fn is_control(&self, id: u32) -> bool {
        self.control.get(id as usize).copied().unwrap_or(false)
    }

    /// The text of `ids`, bytes joined first so characters split across tokens come out
    /// whole (and any left incomplete as U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| self.token_bytes(id).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The prompt text for `messages`, from the model's chat template, ending where the
    /// assistant's reply begins.
    pub fn apply_chat_template(&self, messages: &[ChatMessage<'_>]) -> Result<String, String> {
        let env = self
            .template
            .as_ref()
            .ok_or("the model has no chat template (tokenizer.chat_template)")?;
        let template = env.get_template("chat").map_err(|err| err.to_string())?;
        let token = |id: Option<u32>| id.map(|id| self.decode(&[id])).unwrap_or_default();
        template
            .render(minijinja::context! {
                messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                add_generation_prompt => true,
                bos_token => token(self.bos),
                eos_token => token(self.eos),
            })
            .map_err(|err| format!("chat template: {err}"))
    }
}

/// A chat template ready to render; `origin` names where it came from, in errors.
fn chat_template(source: &str, origin: &str) -> Result<minijinja::Environment<'static>, String> {
    let mut env = minijinja::Environment::new();
    env.add_template_owned("chat", source.to_owned())
        .map_err(|err| format!("{origin}: {err}"))?;
    // Hugging Face's templates call this to refuse a malformed conversation.
    env.add_function(
        "raise_exception",
        |message: String| -> Result<(), minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    Ok(env)
}

/// The bytes a SentencePiece-style token stands for: `<0xAB>` is one raw byte (byte
/// fallback), `▁` is a space.
fn sentencepiece_bytes(token: &str) -> Vec<u8> {
    let byte = token
        .strip_prefix("<0x")
        .and_then(|hex| hex.strip_suffix('>'))
        .filter(|hex| hex.len() == 2)
        .and_then(|hex| u8::from_str_radix(hex, 16).ok());
    match byte {
        Some(byte) => vec![byte],
        None => token.replace('\u{2581}', " ").into_bytes(),
    }
}

/// Turns the bytes of generated tokens, one token at a time, into text that is safe to send:
/// whole UTF-8 characters only. A token may end inside a character (byte-level BPE splits
/// emoji and CJK into several), so its last bytes wait for the next token's.
#[derive(Debug, Default)]
pub struct TextStream {
    pending: Vec<u8>,
}

impl TextStream {
    /// Adds a token's bytes and returns the text now complete (possibly empty). Bytes that
    /// can never be part of a valid character come out as U+FFFD, as a lossy decode would.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut text = String::new();
        let mut rest = &self.pending[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(err) => {
                    let (valid, after) = rest.split_at(err.valid_up_to());
                    text.push_str(std::str::from_utf8(valid).expect("checked valid"));
                    match err.error_len() {
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        self.pending.drain(..self.pending.len() - keep);
        text
    }

    /// What is left when generation stops: a character cut short, as U+FFFD.
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_gpt2s() {
        let t = byte_chars();
        assert_eq!(t[b'a' as usize], 'a');
        // Space and newline are the well-known Ġ and Ċ.
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        let mut all: Vec<char> = t.to_vec();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 256);
    }

    #[test]
    fn text_streams_only_whole_characters() {
        // "é" is C3 A9, "😀" is F0 9F 98 80: split across tokens as byte-level BPE may.
        let mut stream = TextStream::default();
        assert_eq!(stream.push(b"caf\xC3"), "caf");
        assert_eq!(stream.push(b"\xA9 \xF0\x9F"), "\u{e9} ");
        assert_eq!(stream.push(b"\x98"), "");
        assert_eq!(stream.push(b"\x80!"), "\u{1F600}!");
        // A byte that cannot start a character is replaced at once, not held back.
        assert_eq!(stream.push(b"\xFFok"), "\u{FFFD}ok");
        // A character cut short by the end of generation.
        assert_eq!(stream.push(b"\xE2\x82"), "");
        assert_eq!(stream.finish(), "\u{FFFD}");
    }
}
