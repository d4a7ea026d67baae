//! How does a generation reach a streaming client? Server-Sent Events, one token per event,
//! each sent the moment it exists.
//!
//! The generation runs in its own task and hands events to the response body through a
//! small channel, so nothing is collected before it is sent. The task paces the tokens
//! (time to first token, delay between tokens), holds at a stream gate when asked, and
//! stops as soon as the client goes away: every wait also watches the channel closing.
//! Chat and text completions differ only in how a chunk looks, which a [`ChunkWriter`] says.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};

use super::openai::{FinishReason, StreamOptions, Usage};
use super::state::AppState;
use super::stream_gates::{gate_name, GateOutcome, GateTicket, GATE_TIMEOUT};
use crate::engine::generator::{Logprob, Piece};

/// Events buffered between the generation and the socket: enough to ride out a scheduling
/// hiccup, small enough that a slow reader slows the generation instead of growing memory.
const CHANNEL_DEPTH: usize = 8;

/// One choice of a reply: its index in the response and every token it will emit.
#[derive(Debug)]
pub struct Sequence {
    pub index: u32,
    pub tokens: Vec<String>,
    pub finish_reason: FinishReason,
}

/// What each event of a stream looks like, for one kind of completion.
pub trait ChunkWriter: Send + Sync + 'static {
    /// The event that opens a choice before any token (chat's role chunk), if any.
    fn opening(&self, index: u32) -> Option<Bytes>;
    /// Text of choice `index`, with its tokens' log probabilities when the request asked
    /// for them (a writer may keep count of what it wrote, hence `mut`).
    fn token(&mut self, index: u32, text: &str, logprobs: Option<&[Logprob]>) -> Bytes;
    fn finish(&mut self, index: u32, reason: FinishReason) -> Bytes;
    fn usage(&self, usage: Usage) -> Bytes;
}

pub struct StreamJob<W> {
    pub writer: W,
    pub sequences: Vec<Sequence>,
    /// The usage to report at the end; `None` when the client did not ask for it.
    pub usage: Option<Usage>,
    /// The stream gate to hold at after the first token (see `stream_gates`).
    pub gate: Option<String>,
}

/// What a completion request said about streaming.
pub struct StreamRequest<'a> {
    pub stream: Option<bool>,
    pub options: Option<&'a StreamOptions>,
    pub user: Option<&'a str>,
}

/// One finished choice of a reply.
pub struct Choice {
    pub index: u32,
    pub text: String,
    pub finish_reason: FinishReason,
    /// One per token, when the request asked for them.
    pub logprobs: Option<Vec<Logprob>>,
}

/// How a completion handler's generation ends, whichever engine ran it.
pub enum Outcome {
    /// The request asked for a stream, and this response streams it.
    Streamed(Response),
    /// Every choice, in index order, and the usage of the whole request; the caller writes
    /// the JSON body.
    Finished { choices: Vec<Choice>, usage: Usage },
}

/// The simulated engine's end of a completion handler: streams the reply when the request
/// asked for a stream, otherwise waits as long as the engine would take and hands the
/// choices back. `writer` is told whether the client asked for a usage chunk.
pub async fn stream_or_finish<W: ChunkWriter>(
    state: &Arc<AppState>,
    request: StreamRequest<'_>,
    writer: impl FnOnce(bool) -> W,
    sequences: Vec<Sequence>,
    usage: Usage,
    len: usize,
) -> Outcome {
    if request.stream.unwrap_or(false) {
        let include_usage = request
            .options
            .and_then(|options| options.include_usage)
            .unwrap_or(false);
        let job = StreamJob {
            writer: writer(include_usage),
            sequences,
            usage: include_usage.then_some(usage),
            gate: gate_name(request.user).map(str::to_owned),
        };
        return Outcome::Streamed(respond(state.clone(), job));
    }
    let _generation = state.start_generation().await;
    let generation_time = state.sim.generation_time(len);
    if !generation_time.is_zero() {
        tokio::time::sleep(generation_time).await;
    }
    state.metrics.add_generated_tokens(usage.completion_tokens);
    let choices = sequences
        .into_iter()
        .map(|sequence| Choice {
            index: sequence.index,
            text: sequence.tokens.concat(),
            finish_reason: sequence.finish_reason,
            logprobs: None,
        })
        .collect();
    Outcome::Finished { choices, usage }
}

/// One SSE event carrying `value` as JSON.
pub fn event<T: Serialize>(value: &T) -> Bytes {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(b"data: ");
    if let Err(err) = serde_json::to_writer(&mut buf, value) {
        // Only a bug in our own response types can get here.
        tracing::error!(%err, "could not serialise a stream chunk");
        buf.truncate(6);
        buf.extend_from_slice(br#"{"error":{"message":"internal error","type":"server_error"}}"#);
    }
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

const DONE: &[u8] = b"data: [DONE]\n\n";

/// Starts streaming `job` and returns the response whose body carries it.
pub fn respond<W: ChunkWriter>(state: Arc<AppState>, job: StreamJob<W>) -> Response {
    let (sender, receiver) = mpsc::channel(CHANNEL_DEPTH);
    tokio::spawn(async move {
        let outlet = Outlet(sender);
        if run(&state, job, &outlet).await.is_err() {
            tracing::debug!("client went away; generation stopped");
        }
    });
    event_stream(receiver)
}

/// A generation the native engine is running: one channel of pieces per choice.
pub struct LiveJob<W> {
    pub writer: W,
    /// Each choice's index in the reply and the engine's channel for it.
    pub choices: Vec<(u32, UnboundedReceiver<Piece>)>,
    pub prompt_tokens: u64,
    pub include_usage: bool,
    /// Whether each text chunk carries its tokens' log probabilities.
    pub logprobs: bool,
}

/// Streams the native engine's pieces as they come. When the client goes away the task
/// ends and drops every choice's channel, which the engine takes as the order to cancel.
pub fn respond_live<W: ChunkWriter>(state: Arc<AppState>, job: LiveJob<W>) -> Response {
    let (sender, receiver) = mpsc::channel(CHANNEL_DEPTH);
    tokio::spawn(async move {
        let outlet = Outlet(sender);
        if run_live(&state, job, &outlet).await.is_err() {
            tracing::debug!("client went away; generation cancelled");
        }
    });
    event_stream(receiver)
}

async fn run_live<W: ChunkWriter>(
    state: &AppState,
    job: LiveJob<W>,
    outlet: &Outlet,
) -> Result<(), ClientGone> {
    let _running = state.metrics.running();
    let LiveJob {
        mut writer,
        choices,
        prompt_tokens,
        include_usage,
        logprobs: with_logprobs,
    } = job;
    for (index, _) in &choices {
        if let Some(opening) = writer.opening(*index) {
            outlet.send(opening).await?;
        }
    }
    let mut open = choices.len();
    let mut completion_tokens = 0;
    // A choice's stream ends after its `Done`; one that ends without it was cut short.
    let mut pieces = futures::stream::select_all(choices.into_iter().map(|(index, pieces)| {
        UnboundedReceiverStream::new(pieces).map(move |piece| (index, piece))
    }));
    while open > 0 {
        // Waiting for the engine also watches the client, so that a client that leaves
        // between tokens (a long prefill) is cancelled without waiting for one.
        let piece = tokio::select! {
            piece = pieces.next() => piece,
            () = outlet.0.closed() => return Err(ClientGone),
        };
        match piece {
            Some((index, Piece::Text { text, logprobs })) => {
                let logprobs = with_logprobs.then_some(&logprobs[..]);
                outlet.send(writer.token(index, &text, logprobs)).await?;
            }
            Some((
                index,
                Piece::Done {
                    finish,
                    completion_tokens: tokens,
                },
            )) => {
                open -= 1;
                completion_tokens += tokens;
                state.metrics.add_generated_tokens(tokens);
                outlet.send(writer.finish(index, finish.into())).await?;
            }
            // No `[DONE]`: the client must see a reply cut short, not a complete one.
            Some((_, Piece::Failed(err))) => {
                tracing::error!(%err, "generation failed mid-stream");
                return Ok(());
            }
            None => {
                tracing::warn!("the engine stopped mid-stream");
                return Ok(());
            }
        }
    }
    if include_usage {
        let usage = Usage::new(prompt_tokens, completion_tokens);
        outlet.send(writer.usage(usage)).await?;
    }
    outlet.send(Bytes::from_static(DONE)).await
}

fn event_stream(receiver: mpsc::Receiver<Result<Bytes, Infallible>>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            // Asks any nginx-style proxy in front of us not to buffer the stream either.
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(ReceiverStream::new(receiver)),
    )
        .into_response()
}

async fn run<W: ChunkWriter>(
    state: &AppState,
    job: StreamJob<W>,
    outlet: &Outlet,
) -> Result<(), ClientGone> {
    let _generation = state.start_generation().await;
    let StreamJob {
        mut writer,
        sequences,
        usage,
        gate,
    } = job;

    for sequence in &sequences {
        if let Some(opening) = writer.opening(sequence.index) {
            outlet.send(opening).await?;
        }
    }

    outlet.pause(state.sim.ttft).await?;
    let steps = sequences.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
    let mut gate = gate;
    for step in 0..steps {
        if step > 0 {
            outlet.pause(state.sim.token_delay).await?;
        }
        for sequence in &sequences {
            let Some(token) = sequence.tokens.get(step) else {
                continue;
            };
            // Join the gate before the token leaves, so a client that reacts to the token
            // by opening the gate always finds this stream waiting.
            let ticket = gate.take().map(|name| state.gates.join(&name));
            outlet
                .send(writer.token(sequence.index, token, None))
                .await?;
            state.metrics.add_generated_tokens(1);
            if let Some(ticket) = ticket {
                outlet.hold(ticket).await?;
            }
        }
    }

    for sequence in &sequences {
        outlet
            .send(writer.finish(sequence.index, sequence.finish_reason))
            .await?;
    }
    if let Some(usage) = usage {
        outlet.send(writer.usage(usage)).await?;
    }
    outlet.send(Bytes::from_static(DONE)).await
}

/// The client closed the connection; the generation should stop.
struct ClientGone;

struct Outlet(mpsc::Sender<Result<Bytes, Infallible>>);

impl Outlet {
    async fn send(&self, event: Bytes) -> Result<(), ClientGone> {
        self.0.send(Ok(event)).await.map_err(|_| ClientGone)
    }

    async fn pause(&self, delay: Duration) -> Result<(), ClientGone> {
        if delay.is_zero() {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => Ok(()),
            () = self.0.closed() => Err(ClientGone),
        }
    }

    async fn hold(&self, ticket: GateTicket) -> Result<(), ClientGone> {
        let gate = ticket.name().to_owned();
        tokio::select! {
            outcome = ticket.wait(GATE_TIMEOUT) => {
                if outcome == GateOutcome::TimedOut {
                    tracing::warn!(%gate, timeout = ?GATE_TIMEOUT, "stream gate never opened; carrying on");
                }
                Ok(())
            }
            () = self.0.closed() => Err(ClientGone),
        }
    }
}
