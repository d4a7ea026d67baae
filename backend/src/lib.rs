//! `sluice-backend`: Sluice's co-located, OpenAI-compatible inference service.
//!
//! It serves chat completions (whole or as SSE), text completions, embeddings, the model
//! list, health and Prometheus metrics, from one of two engines:
//!
//! - the simulated engine ([`sim`]): deterministic replies, token counts and embeddings,
//!   with configurable pacing and stream gates ([`gates`]) so the gateway can be tested and
//!   load-tested end to end without weights or a GPU;
//! - the native engine ([`native`]): real models from local files. This build serves BERT
//!   sentence encoders (all-MiniLM-L6-v2) for `/v1/embeddings` and Llama-family decoders
//!   (SmolLM2; GGUF files or Hugging Face folders) for `/v1/chat/completions` and
//!   `/v1/completions` ([`generation`]), on the CPU; CUDA is not in it yet.
//!
//! The binary in `main.rs` is a thin shell over [`serve`].

mod chat;
mod completions;
mod embeddings;
pub mod engine;
pub mod error;
pub mod gates;
mod generation;
pub mod metrics;
pub mod models;
pub mod native;
pub mod openai;
mod request;
pub mod server;
pub mod sim;
mod sse;
pub mod state;

pub use server::{router, serve};
pub use sim::SimConfig;
pub use state::AppState;
