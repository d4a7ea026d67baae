//! What runs a request on a loaded model, and when? One engine thread per served model,
//! which owns the model and never runs on the async runtime: [`embedder`] for encoders,
//! [`generator`] for decoders, with continuous batching ([`scheduler`]), token choice
//! ([`sampling`]) within a format ([`constraint`]), drafts to check ([`speculation`]), stop strings ([`stop`]) and what `/metrics` shows of it ([`stats`]).
//! [`sim`] answers in their place when no model is loaded.
//!
//! The engine speaks its own types ([`ModelInput`], [`Finish`], the jobs and replies of its
//! threads), never the HTTP wire format: the HTTP side converts at its edge, so that a change
//! to the OpenAI shapes never reaches past it.

pub mod constraint;
pub mod embedder;
pub mod generator;
pub mod sampling;
pub mod scheduler;
pub mod sim;
pub mod speculation;
pub mod stats;
pub mod stop;

pub use embedder::{EmbedError, Embedded, EmbeddingModel};
pub use generator::{EngineOptions, TextModel};

/// One input a model reads: a text prompt (completions) or a text to embed, either as text
/// to tokenize or as token ids already.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelInput {
    Text(String),
    Tokens(Vec<u32>),
}

impl ModelInput {
    pub fn is_empty(&self) -> bool {
        match self {
            Self::Text(text) => text.is_empty(),
            Self::Tokens(ids) => ids.is_empty(),
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// It ended by itself: an end-of-sequence token (not part of its output), a stop
    /// string, or, for the simulated engine, the length it stops at.
    Stop,
    /// It reached `max_tokens`.
    Length,
}
