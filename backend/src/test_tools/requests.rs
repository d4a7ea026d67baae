//! What the engine's tests and examples ask a scheduler for: a greedy request, and a prompt
//! of one user turn through the model's chat template.

use crate::engine::sampling::SamplingParams;
use crate::engine::scheduler::Request;
use crate::model::tokenizer::{ChatMessage, LlamaTokenizer};

/// A greedy request for up to `max_tokens` tokens, with nothing else asked.
pub fn greedy(id: u64, prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request {
        id,
        prompt,
        params: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        max_tokens,
        speculate: false,
        logprobs: None,
        constraint: None,
    }
}

/// The tokens of a chat whose one turn is the user's `text`.
pub fn user_turn(tokenizer: &LlamaTokenizer, text: &str) -> Result<Vec<u32>, String> {
    let chat = tokenizer.apply_chat_template(&[ChatMessage {
        role: "user",
        content: text,
    }])?;
    tokenizer.encode(&chat)
}
