//! How is a decoder served? A Llama-family model's tokenizer, and the engine thread that
//! owns the model and its [`Scheduler`] and runs continuous batching while there is work.
//!
//! Handlers tokenize on the async runtime (cheap) and hand the engine a [`GenerateJob`];
//! the engine turns sampled tokens into text (whole UTF-8 characters, stop strings held
//! back and cut) and sends each piece down the request's own channel. A receiver that is
//! dropped (the client went away) cancels the sequence before the next step, so its cache
//! blocks go to others at once. The engine never blocks on a client: the channels are
//! unbounded and the text pieces are small.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Instant;

use tokio::sync::mpsc as tokio_mpsc;

use super::constraint::{Constraint, Formats};
use super::sampling::SamplingParams;
use super::scheduler::{Event, Request, Scheduler};
use super::stats::{EngineStats, StepReport};
use super::stop::{StopCheck, StopStrings};
use super::Finish;
use crate::device::cpu::Cpu;
use crate::device::cuda::CudaDevice;
use crate::device::{Device, DeviceError, Target};
use crate::model::gguf::Gguf;
use crate::model::llama::Llama;
use crate::model::tokenizer::{LlamaTokenizer, TextStream};
use crate::model::LoadError;

/// Positions per key/value cache block.
const BLOCK_SIZE: usize = 16;
/// The key/value cache's memory on the CPU when `--kv-cache-mb` does not say: room for 16
/// sequences of 2048 positions of SmolLM2-135M (30 layers, 3 × 64 wide, f32).
pub const DEFAULT_KV_CACHE_BYTES: usize = 1 << 30;
/// On a GPU, the part of its free memory (once the weights are in) the cache takes when
/// `--kv-cache-mb` does not say, in tenths. The rest is for activations, cuBLAS's workspace
/// and any other model on the same GPU.
const GPU_KV_CACHE_TENTHS: usize = 8;
/// Tokens per forward pass: decodes first, then prompt chunks. Larger chunks amortise the
/// weight reads; smaller ones keep running streams' inter-token latency low.
const TOKEN_BUDGET: usize = 256;
/// The longest context served, whatever the GGUF allows: beyond it the cache for a single
/// sequence outgrows a small machine's memory.
const MAX_CONTEXT: usize = 8192;

/// What the engine sends back for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text to append to the reply, and the log probabilities (when asked for) of the
    /// tokens sampled since the last piece. Never both empty; the text may be empty while a
    /// stop string is held back, or lag its tokens by part of a character.
    Text {
        text: String,
        logprobs: Vec<Logprob>,
    },
    /// The reply is complete; `completion_tokens` counts every token sampled for it.
    Done {
        finish: Finish,
        completion_tokens: u64,
    },
    /// The device failed mid-generation; the reply is cut short.
    Failed(String),
}

/// A sampled token's log probability and the likeliest alternatives', each token as the
/// bytes it stands for (see [`TokenLogprobs`](super::sampling::TokenLogprobs)).
#[derive(Debug, Clone, PartialEq)]
pub struct Logprob {
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<(Vec<u8>, f32)>,
}

/// Where a decoder's engine runs and how it is sized.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineOptions {
    /// Memory the key/value cache may take: by default [`DEFAULT_KV_CACHE_BYTES`] on the CPU,
    /// and on a GPU [`GPU_KV_CACHE_TENTHS`] of its free memory. At least one full-context
    /// sequence always fits, whatever this says, so that no accepted request can be refused
    /// by the cache.
    pub kv_cache_bytes: Option<usize>,
    pub target: Target,
}

/// One generation request, tokenized and checked against the context by the caller.
pub struct GenerateJob {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Whether tokens may be drafted for it (see the scheduler).
    pub speculate: bool,
    /// `Some(k)`: each token's log probability and the `k` likeliest tokens'.
    pub logprobs: Option<usize>,
    /// The format the reply must follow ([`TextModel::formats`]).
    pub constraint: Option<Constraint>,
    pub reply: tokio_mpsc::UnboundedSender<Piece>,
}

/// A loaded decoder, answering requests through its engine thread.
pub struct TextModel {
    tokenizer: Arc<LlamaTokenizer>,
    formats: Formats,
    jobs: mpsc::Sender<(u64, Queued)>,
    next_id: AtomicU64,
    context_length: usize,
    device: String,
    stats: Arc<EngineStats>,
}

/// A job on its way to the engine thread, stamped with when it arrived.
struct Queued {
    job: GenerateJob,
    at: Instant,
}

impl std::fmt::Debug for TextModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextModel")
            .field("context_length", &self.context_length)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl TextModel {
    /// Loads a decoder (a GGUF file, or a Hugging Face folder) onto the device `options`
    /// names and starts its engine thread, named after `name`. Returns once the engine has
    /// run a first step, so that a model that is served is also warm.
    pub fn load(name: &str, path: &Path, options: EngineOptions) -> Result<Self, LoadError> {
        match options.target {
            Target::Cpu => Self::start(name, path, Cpu, options),
            Target::Cuda(ordinal) => Self::start(name, path, CudaDevice::new(ordinal)?, options),
        }
    }

    fn start<D: Device>(
        name: &str,
        path: &Path,
        device: D,
        options: EngineOptions,
    ) -> Result<Self, LoadError> {
        let invalid = |message: String| LoadError::Invalid {
            path: path.to_owned(),
            message,
        };
        let (tokenizer, model) = if path.is_dir() {
            let tokenizer = LlamaTokenizer::from_folder(path).map_err(invalid)?;
            (tokenizer, Llama::load_safetensors(device, path)?)
        } else {
            let gguf = Gguf::open(path)?;
            let tokenizer = LlamaTokenizer::from_gguf(&gguf).map_err(invalid)?;
            (tokenizer, Llama::load(device, &gguf, path)?)
        };
        let tokenizer = Arc::new(tokenizer);
        let context_length = model.config().context_length.clamp(1, MAX_CONTEXT);
        let per_sequence = context_length.div_ceil(BLOCK_SIZE);
        let cache_bytes =
            options
                .kv_cache_bytes
                .unwrap_or_else(|| match model.device().free_memory() {
                    Some(free) => free / 10 * GPU_KV_CACHE_TENTHS,
                    None => DEFAULT_KV_CACHE_BYTES,
                });
        let blocks = (cache_bytes / model.cache_block_bytes(BLOCK_SIZE)).max(per_sequence);
        let device = model.device().name();
        let eos = tokenizer.eos;
        let engine_tokenizer = tokenizer.clone();
        let stats = Arc::new(EngineStats::default());
        stats.set_kv_blocks_total(blocks);
        let engine_stats = stats.clone();
        let (jobs, queue) = mpsc::channel();
        // The cache is allocated and the model warmed up on the engine thread, but before
        // `load` returns, so that a cache that does not fit fails start-up instead of the
        // first request, and the first request does not pay for cold memory.
        let (ready, started) = mpsc::channel();
        thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || {
                let scheduler = Scheduler::new(&model, blocks, BLOCK_SIZE, TOKEN_BUDGET, eos)
                    .and_then(|mut scheduler| warm_up(&mut scheduler).map(|()| scheduler));
                match scheduler {
                    Ok(scheduler) => {
                        let _ = ready.send(Ok(()));
                        run(scheduler, &engine_tokenizer, &engine_stats, queue);
                    }
                    Err(err) => {
                        let _ = ready.send(Err(err));
                    }
                }
            })
            .map_err(|err| LoadError::Unsupported(format!("cannot start a thread: {err}")))?;
        started
            .recv()
            .map_err(|_| LoadError::Unsupported("the engine thread did not start".to_owned()))??;
        tracing::info!(
            model = name,
            blocks,
            block_size = BLOCK_SIZE,
            context_length,
            "key/value cache ready"
        );
        Ok(Self {
            formats: Formats::new(tokenizer.clone()),
            tokenizer,
            jobs,
            next_id: AtomicU64::new(0),
            context_length,
            device,
            stats,
        })
    }

    /// What the engine says about its queue, cache and speed.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn tokenizer(&self) -> &LlamaTokenizer {
        &self.tokenizer
    }

    /// What compiles a format for this model's vocabulary.
    pub fn formats(&self) -> &Formats {
        &self.formats
    }

    /// Prompt and reply together, in tokens, at most.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// Queues a generation. False when the engine thread is gone (the process is
    /// stopping); the job's channel is then closed without a `Done`.
    pub fn generate(&self, job: GenerateJob) -> bool {
        assert!(job.prompt.len() + job.max_tokens <= self.context_length);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let at = Instant::now();
        self.jobs.send((id, Queued { job, at })).is_ok()
    }
}

/// One greedy token from a one-token prompt: touches every weight and the cache once.
fn warm_up<D: Device>(scheduler: &mut Scheduler<'_, D>) -> Result<(), DeviceError> {
    scheduler.add(Request {
        id: u64::MAX,
        prompt: vec![0],
        params: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        max_tokens: 1,
        speculate: false,
        logprobs: None,
        constraint: None,
    });
    while !scheduler.is_idle() {
        scheduler.step()?;
    }
    Ok(())
}

/// A sequence's way back to its client, and the text not yet safe to send.
struct Live {
    reply: tokio_mpsc::UnboundedSender<Piece>,
    text: TextStream,
    /// Log probabilities of tokens whose text has not gone out yet.
    logprobs: Vec<Logprob>,
    stops: StopStrings,
    tokens: u64,
    /// When the request reached the engine, until its first token is out.
    waiting_since: Option<Instant>,
}

impl Live {
    /// A client that is gone is noticed before the next step, not here.
    fn send_text(&mut self, text: String) {
        if !text.is_empty() || !self.logprobs.is_empty() {
            let logprobs = std::mem::take(&mut self.logprobs);
            let _ = self.reply.send(Piece::Text { text, logprobs });
        }
    }

    /// Ends the reply, after the log probabilities of tokens that brought no text (a stop
    /// string's, or part of a character).
    fn finish(mut self, finish: Finish) {
        self.send_text(String::new());
        let _ = self.reply.send(Piece::Done {
            finish,
            completion_tokens: self.tokens,
        });
    }
}

fn run<D: Device>(
    mut scheduler: Scheduler<'_, D>,
    tokenizer: &LlamaTokenizer,
    stats: &EngineStats,
    queue: mpsc::Receiver<(u64, Queued)>,
) {
    let mut live: HashMap<u64, Live> = HashMap::new();
    loop {
        if scheduler.is_idle() {
            // Nothing to compute: sleep until a request arrives, or stop with the server.
            match queue.recv() {
                Ok((id, job)) => admit(&mut scheduler, &mut live, id, job),
                Err(_) => return,
            }
        }
        while let Ok((id, job)) = queue.try_recv() {
            admit(&mut scheduler, &mut live, id, job);
        }
        live.retain(|id, seq| {
            let gone = seq.reply.is_closed();
            if gone {
                scheduler.cancel(*id);
            }
            !gone
        });
        if scheduler.is_idle() {
            // Cancellations emptied it: the queue and cache changed, but no step ran.
            stats.record_step(StepReport {
                prefill_tokens: 0,
                decode_tokens: 0,
                preemptions: 0,
                drafted_tokens: 0,
                accepted_tokens: 0,
                prefix_hit_tokens: 0,
                ..scheduler.report()
            });
            continue;
        }
        let step = scheduler.step();
        stats.record_step(scheduler.report());
        let events = match step {
            Ok(events) => events,
            Err(err) => {
                tracing::error!(%err, "the engine failed a step; its requests are cut short");
                for (id, seq) in live.drain() {
                    scheduler.cancel(id);
                    let _ = seq.reply.send(Piece::Failed(err.to_string()));
                }
                continue;
            }
        };
        for event in events {
            match event {
                Event::Token {
                    id,
                    token,
                    logprobs,
                } => {
                    let Some(seq) = live.get_mut(&id) else {
                        continue;
                    };
                    seq.tokens += 1;
                    if let Some(logprobs) = logprobs {
                        let bytes = |id: u32| tokenizer.token_bytes(id).to_vec();
                        seq.logprobs.push(Logprob {
                            bytes: bytes(logprobs.token),
                            logprob: logprobs.logprob,
                            top: logprobs
                                .top
                                .iter()
                                .map(|&(id, logprob)| (bytes(id), logprob))
                                .collect(),
                        });
                    }
                    if let Some(since) = seq.waiting_since.take() {
                        stats.record_first_token(since.elapsed());
                    }
                    let text = seq.text.push(tokenizer.token_bytes(token));
                    match seq.stops.push(&text) {
                        StopCheck::Continue(text) => seq.send_text(text),
                        StopCheck::Stopped(last) => {
                            seq.send_text(last);
                            let seq = live.remove(&id).expect("present");
                            scheduler.cancel(id);
                            seq.finish(Finish::Stop);
                        }
                    }
                }
                Event::Finished { id, finish } => {
                    let Some(mut seq) = live.remove(&id) else {
                        continue;
                    };
                    let tail = std::mem::take(&mut seq.text).finish();
                    match seq.stops.push(&tail) {
                        StopCheck::Stopped(last) => {
                            seq.send_text(last);
                            seq.finish(Finish::Stop);
                        }
                        StopCheck::Continue(text) => {
                            seq.send_text(text);
                            let held = std::mem::take(&mut seq.stops).finish();
                            seq.send_text(held);
                            seq.finish(finish);
                        }
                    }
                }
            }
        }
    }
}

fn admit<D: Device>(
    scheduler: &mut Scheduler<'_, D>,
    live: &mut HashMap<u64, Live>,
    id: u64,
    Queued { job, at }: Queued,
) {
    if job.max_tokens == 0 {
        let _ = job.reply.send(Piece::Done {
            finish: Finish::Length,
            completion_tokens: 0,
        });
        return;
    }
    scheduler.add(Request {
        id,
        prompt: job.prompt,
        params: job.params,
        max_tokens: job.max_tokens,
        speculate: job.speculate,
        logprobs: job.logprobs,
        constraint: job.constraint,
    });
    live.insert(
        id,
        Live {
            reply: job.reply,
            text: TextStream::default(),
            logprobs: Vec::new(),
            stops: StopStrings::new(job.stop),
            tokens: 0,
            waiting_since: Some(at),
        },
    );
}

/// A whole reply, as [`collect`] gathers it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub text: String,
    pub finish: Finish,
    /// Every token sampled for it.
    pub completion_tokens: u64,
    /// One per token, when the request asked for them.
    pub logprobs: Vec<Logprob>,
}

/// Waits for a whole reply. Dropping the future (the client went away) cancels the
/// sequence.
pub async fn collect(mut pieces: tokio_mpsc::UnboundedReceiver<Piece>) -> Result<Reply, String> {
    let mut text = String::new();
    let mut all_logprobs = Vec::new();
    loop {
        match pieces.recv().await {
            Some(Piece::Text {
                text: piece,
                logprobs,
            }) => {
                text.push_str(&piece);
                all_logprobs.extend(logprobs);
            }
            Some(Piece::Done {
                finish,
                completion_tokens,
            }) => {
                return Ok(Reply {
                    text,
                    finish,
                    completion_tokens,
                    logprobs: all_logprobs,
                })
            }
            Some(Piece::Failed(err)) => return Err(err),
            None => return Err("the engine has stopped".to_owned()),
        }
    }
}
