//! `sluice-backend`: Sluice's co-located, OpenAI-compatible inference service. What answers
//! a request that the gateway sends here?
//!
//! It serves chat completions (whole or as SSE), text completions, embeddings, the model
//! list, health and Prometheus metrics, from one of two engines:
//!
//! - the simulated engine ([`engine::sim`]): deterministic replies, token counts and
//!   embeddings, with configurable pacing and stream gates ([`http::stream_gates`]) so the
//!   gateway can be tested and load-tested end to end without weights or a GPU;
//! - the native engine: real models from local files. This build serves BERT sentence
//!   encoders (all-MiniLM-L6-v2) for `/v1/embeddings` and Llama-family decoders (SmolLM2;
//!   GGUF files or Hugging Face folders) for `/v1/chat/completions` and `/v1/completions`,
//!   on the CPU or on an NVIDIA GPU through CUDA, loaded at run time so that nothing CUDA is
//!   needed to build.
//!
//! The crate is laid out like a model server, each layer asking only the one below it:
//!
//! | module | owns |
//! | --- | --- |
//! | [`cli`] | what the command line asked for: engine, device, models and their names |
//! | [`http`] | routes, the OpenAI wire format, errors, SSE, the shared completion skeleton |
//! | [`engine`] | a thread per model: batching, generating, embedding, sampling, stops; `sim` |
//! | [`model`] | the model families (Llama, BERT), their loaders and tokenizer |
//! | [`quant`] | GGML's weight encodings, and products that read them as stored (models and devices share them) |
//! | [`kv_cache`] | the paged key/value cache's blocks |
//! | [`team`] | the threads that share a forward pass's parallel work |
//! | [`device`] | the `Device` trait and its CPU and CUDA implementations |
//!
//! The binary in `main.rs` is a thin shell over [`serve`].

pub mod cli;
pub mod device;
pub mod engine;
pub mod http;
pub mod kv_cache;
pub mod model;
pub mod quant;
pub mod team;
#[cfg(feature = "test-tools")]
pub mod test_tools;

pub use engine::sim::SimConfig;
pub use http::{router, serve, AppState};
