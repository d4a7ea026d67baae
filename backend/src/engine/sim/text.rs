//! What does the simulated engine reply, and how many tokens does a text count for? Its
//! replies and the token count that bills them.
//!
//! There is no tokenizer behind the simulated engine, so a "token" is defined here, once,
//! and the same rule counts prompts and replies: the gateway's metering, the usage blocks
//! and the number of stream deltas all agree with it exactly.

use sha2::{Digest, Sha256};

use crate::engine::ModelInput;

/// Words a simulated reply is made of. Changing this list changes every simulated reply,
/// which tests and recorded benchmarks may depend on.
const VOCABULARY: [&str; 64] = [
    "the", "a", "sluice", "gate", "river", "water", "flows", "through", "quiet", "stone",
    "channel", "light", "morning", "token", "stream", "model", "answer", "question", "small",
    "large", "fast", "slow", "bright", "deep", "field", "valley", "bridge", "mill", "wheel",
    "turns", "and", "of", "to", "in", "on", "with", "under", "over", "every", "some", "clear",
    "cold", "warm", "path", "garden", "window", "story", "signal", "echo", "harbor", "lantern",
    "meadow", "north", "south", "paper", "engine", "batch", "cache", "request", "reply", "measure",
    "balance", "steady", "open",
];

/// Tokens added per chat message for its role and framing, in the spirit of OpenAI's own
/// per-message overhead.
pub const MESSAGE_OVERHEAD_TOKENS: u64 = 3;

/// The simulated token count of `text`: every maximal run of letters and digits is one
/// token, and every other non-whitespace character (punctuation, symbols, emoji) is one
/// token of its own. `"Hello, world!"` is 4 tokens; `"don't"` is 3.
///
/// A chat prompt counts the text of every message (its string content, or the `text` of
/// each of its text parts) plus [`MESSAGE_OVERHEAD_TOKENS`] per message. A reply counts one
/// token per word it emits, which is also one stream delta per token.
pub fn count_tokens(text: &str) -> u64 {
    let mut count = 0;
    let mut in_word = false;
    for c in text.chars() {
        if c.is_alphanumeric() {
            if !in_word {
                count += 1;
                in_word = true;
            }
        } else {
            in_word = false;
            if !c.is_whitespace() {
                count += 1;
            }
        }
    }
    count
}

/// The simulated token count of one completions prompt or embeddings input: token ids count
/// one token each, text counts by [`count_tokens`].
pub fn count_input_tokens(input: &ModelInput) -> u64 {
    match input {
        ModelInput::Text(text) => count_tokens(text),
        ModelInput::Tokens(ids) => ids.len() as u64,
    }
}

/// The text the simulated engine reads from one completions prompt or embeddings input. It
/// has no tokenizer, so token ids are read as their decimal numbers: the same ids always
/// give the same text.
pub fn input_text(input: &ModelInput) -> String {
    match input {
        ModelInput::Text(text) => text.clone(),
        ModelInput::Tokens(ids) => ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "),
    }
}

/// The first `len` tokens of the simulated reply to `prompt`: words from a fixed vocabulary,
/// each but the first with a leading space, so the tokens concatenate into the reply text.
///
/// The words are drawn from a SHA-256 of the prompt, the seed and the choice index, so one
/// request always gets one reply, a different seed gets another, and the `n` choices of a
/// request differ from one another. A shorter `len` gives a prefix of a longer one.
pub fn reply_tokens(prompt: &str, seed: Option<i64>, choice: u32, len: usize) -> Vec<String> {
    let mut hasher = Sha256::new();
    hasher.update(b"sluice-sim-reply-v1\0");
    hasher.update(prompt.as_bytes());
    match seed {
        Some(seed) => {
            hasher.update(b"\0seed\0");
            hasher.update(seed.to_le_bytes());
        }
        None => hasher.update(b"\0noseed\0"),
    }
    hasher.update(choice.to_le_bytes());
    let digest = hasher.finalize();
    let mut state = digest
        .iter()
        .take(8)
        .fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte));

    (0..len)
        .map(|i| {
            let word = VOCABULARY[(splitmix64(&mut state) % VOCABULARY.len() as u64) as usize];
            if i == 0 {
                word.to_owned()
            } else {
                format!(" {word}")
            }
        })
        .collect()
}

/// A small, well-mixed generator: one SHA-256 per reply is enough, not one per token.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_read_as_decimal_text() {
        assert_eq!(input_text(&ModelInput::Tokens(vec![7, 42])), "7 42");
    }

    #[test]
    fn words_and_punctuation_are_tokens() {
        assert_eq!(count_tokens("Hello, world!"), 4);
        assert_eq!(count_tokens("don't"), 3);
        assert_eq!(count_tokens("  many   spaces\n\there "), 3);
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("v1.2"), 3);
    }

    #[test]
    fn a_reply_is_a_pure_function_of_prompt_seed_and_choice() {
        let a = reply_tokens("hi", None, 0, 12);
        assert_eq!(a, reply_tokens("hi", None, 0, 12));
        assert_ne!(a, reply_tokens("hi", Some(1), 0, 12));
        assert_ne!(a, reply_tokens("hi", None, 1, 12));
        assert_ne!(a, reply_tokens("hello", None, 0, 12));
        assert_eq!(reply_tokens("hi", None, 0, 5), a[..5]);
    }

    #[test]
    fn reply_tokens_join_into_text_with_one_token_per_word() {
        let tokens = reply_tokens("count me", Some(7), 0, 10);
        assert!(!tokens[0].starts_with(' '));
        assert!(tokens[1..].iter().all(|t| t.starts_with(' ')));
        assert_eq!(count_tokens(&tokens.concat()), 10);
    }
}
