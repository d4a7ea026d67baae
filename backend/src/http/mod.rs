//! How does an OpenAI-compatible request reach an engine, and its answer get back? The HTTP
//! side of the backend: the routes and their layers ([`server`]), the wire format
//! ([`openai`]), body parsing (`request`), the fields an engine cannot honour
//! (`honoured`), the one place errors become responses
//! ([`error`]), the chat and text completion routes over one shared skeleton
//! (`completion`), embeddings, Server-Sent Events (`sse`), the simulated streams' test
//! gates ([`stream_gates`]), and the counters `/metrics` reports ([`metrics`]).
//!
//! Handlers convert requests into the engine's own types at this edge and never compute on
//! the async runtime: the engines run on their own threads.

mod completion;
mod embeddings;
pub mod error;
mod honoured;
pub mod metrics;
pub mod openai;
mod request;
pub mod server;
mod sse;
pub mod state;
pub mod stream_gates;

pub use server::{router, serve};
pub use state::{AppState, ModelEngine, ServedModel};
