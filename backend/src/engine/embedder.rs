//! How is an embedding model served? Its tokenizer, its encoder, and the thread that runs
//! them.
//!
//! Tokenizing and the forward pass are seconds of CPU work for a large request, so they
//! never run on the async runtime: each model owns one engine thread, requests queue for it
//! in arrival order, and the handler awaits the answer. The thread runs every request
//! waiting at once in the same forward passes, on the device the model was loaded onto (on
//! the CPU a pass spreads over every core, see [`crate::device::cpu`]); running requests side by
//! side would only make them fight for the same hardware. `/health` and `/metrics` keep
//! answering meanwhile, since they need nothing from the engine.
//!
//! Inputs longer than the model's position table (512 tokens for MiniLM) are refused with a
//! 400 rather than truncated: a semantic cache comparing the embeddings of two long prompts
//! that share their first 512 tokens would otherwise take them for the same prompt.

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc;
use std::thread;

use tokenizers::Tokenizer;
use tokio::sync::oneshot;

use super::ModelInput;
use crate::device::cpu::Cpu;
use crate::device::cuda::CudaDevice;
use crate::device::{Device, DeviceError, Target};
use crate::model::bert::{Bert, BertConfig};
use crate::model::weights::Weights;
use crate::model::LoadError;

/// Tokens per forward pass. A request with more is run in several passes, so that a
/// batch of 2048 long inputs does not hold gigabytes of activations at once.
const MAX_BATCH_TOKENS: usize = 8192;

/// Requests whose inputs share one set of passes, at most: enough to fill the cores, few
/// enough that one pass does not keep the first of them waiting long.
const MAX_REQUESTS_PER_PASS: usize = 64;

/// The embeddings of a request's inputs, in input order, and the tokens read to make them.
#[derive(Debug)]
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    /// Every token the encoder read, `[CLS]` and `[SEP]` included: what the request used.
    pub tokens: u64,
}

/// Why a request's inputs got no embeddings.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(
        "input[{index}] is {tokens} tokens long; this model reads at most {max} tokens per input"
    )]
    InputTooLong {
        index: usize,
        tokens: usize,
        max: usize,
    },
    #[error("input[{index}] contains token id {id}; this model's vocabulary has {vocab} tokens")]
    TokenOutOfRange { index: usize, id: u32, vocab: usize },
    #[error("the tokenizer failed: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("the embedding engine failed on this request; see the server log")]
    Panicked,
    /// The engine thread is gone (the process is shutting down).
    #[error("the embedding engine has stopped")]
    EngineStopped,
}

struct Job {
    inputs: Vec<ModelInput>,
    reply: oneshot::Sender<Result<Embedded, EmbedError>>,
}

/// A loaded embedding model, answering requests through its engine thread.
pub struct EmbeddingModel {
    jobs: mpsc::Sender<Job>,
    dim: usize,
    max_tokens: usize,
    device: String,
}

impl std::fmt::Debug for EmbeddingModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingModel")
            .field("dim", &self.dim)
            .field("max_tokens", &self.max_tokens)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// What the engine thread owns.
struct Engine<D: Device> {
    tokenizer: Tokenizer,
    bert: Bert<D>,
    /// `[CLS]` and `[SEP]`, which wrap inputs given as token ids as the tokenizer wraps text.
    cls: u32,
    sep: u32,
}

impl EmbeddingModel {
    /// Loads a BERT folder (`config.json`, `model.safetensors`, `tokenizer.json`) onto
    /// `target` and starts its engine thread, named after `name`.
    pub fn load(name: &str, folder: &Path, target: Target) -> Result<Self, LoadError> {
        match target {
            Target::Cpu => Self::start(name, folder, Cpu),
            Target::Cuda(ordinal) => Self::start(name, folder, CudaDevice::new(ordinal)?),
        }
    }

    fn start<D: Device>(name: &str, folder: &Path, device: D) -> Result<Self, LoadError> {
        let config_path = folder.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|err| LoadError::Read {
            path: config_path.clone(),
            message: err.to_string(),
        })?;
        let config: BertConfig = serde_json::from_str(&text).map_err(|err| LoadError::Invalid {
            path: config_path,
            message: err.to_string(),
        })?;
        let weights = Weights::open(&folder.join("model.safetensors"), "bert.")?;
        let bert = Bert::load(device, config, &weights)?;
        drop(weights);
        let tokenizer = load_tokenizer(&folder.join("tokenizer.json"))?;
        let special = |token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                LoadError::Unsupported(format!("tokenizer.json has no {token} token"))
            })
        };
        let (cls, sep) = (special("[CLS]")?, special("[SEP]")?);

        let dim = bert.config().hidden_size;
        let max_tokens = bert.config().max_position_embeddings;
        let device = bert.device().name();
        let engine = Engine {
            tokenizer,
            bert,
            cls,
            sep,
        };
        let (jobs, queue) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || engine.run(queue))
            .map_err(|err| LoadError::Unsupported(format!("cannot start a thread: {err}")))?;
        Ok(Self {
            jobs,
            dim,
            max_tokens,
            device,
        })
    }

    /// The length of this model's vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The longest input, in tokens, this model reads.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// Embeds `inputs` (texts or token ids), in order, as unit-length vectors.
    pub async fn embed(&self, inputs: Vec<ModelInput>) -> Result<Embedded, EmbedError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { inputs, reply })
            .map_err(|_| EmbedError::EngineStopped)?;
        answer.await.map_err(|_| EmbedError::EngineStopped)?
    }
}

impl<D: Device> Engine<D> {
    fn run(self, queue: mpsc::Receiver<Job>) {
        // Ends when the model is dropped, which drops the sender.
        while let Ok(first) = queue.recv() {
            // Every request waiting now runs in the same passes: one short input alone is
            // too little work to keep the cores busy, many together are not.
            let mut jobs = vec![first];
            while jobs.len() < MAX_REQUESTS_PER_PASS {
                match queue.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            // A client that hung up no longer needs the work.
            jobs.retain(|job| !job.reply.is_closed());
            // Each request is tokenized and checked on its own, so bad input fails only its
            // own request.
            let mut ready = Vec::with_capacity(jobs.len());
            for job in jobs {
                match self.tokenize(&job.inputs) {
                    Ok(sequences) => ready.push((job, sequences)),
                    Err(err) => {
                        let _ = job.reply.send(Err(err));
                    }
                }
            }
            if ready.is_empty() {
                continue;
            }
            let all: Vec<Vec<u32>> = ready.iter().flat_map(|(_, s)| s.iter().cloned()).collect();
            // A bug that panics fails the requests of its pass, not every later one.
            let failure = match panic::catch_unwind(AssertUnwindSafe(|| self.embed(&all))) {
                Ok(Ok(vectors)) => {
                    let mut vectors = vectors.into_iter();
                    for (job, sequences) in ready {
                        let embedded = Embedded {
                            vectors: vectors.by_ref().take(sequences.len()).collect(),
                            tokens: sequences.iter().map(|s| s.len() as u64).sum(),
                        };
                        let _ = job.reply.send(Ok(embedded));
                    }
                    continue;
                }
                Ok(Err(err)) => Some(err),
                Err(_) => None,
            };
            for (job, _) in ready {
                let _ = job.reply.send(Err(match &failure {
                    Some(err) => EmbedError::Device(err.clone()),
                    None => EmbedError::Panicked,
                }));
            }
        }
    }

    /// Embeds token sequences in passes of at most [`MAX_BATCH_TOKENS`].
    fn embed(&self, sequences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, DeviceError> {
        let mut vectors = Vec::with_capacity(sequences.len());
        let mut start = 0;
        while start < sequences.len() {
            // At least one sequence per pass, however long, so every input is served.
            let mut end = start + 1;
            let mut batch_tokens = sequences[start].len();
            while end < sequences.len() && batch_tokens + sequences[end].len() <= MAX_BATCH_TOKENS {
                batch_tokens += sequences[end].len();
                end += 1;
            }
            vectors.extend(self.bert.embed(&sequences[start..end])?);
            start = end;
        }
        Ok(vectors)
    }

    /// Each input as the token ids the encoder reads, checked against the model's limits.
    fn tokenize(&self, inputs: &[ModelInput]) -> Result<Vec<Vec<u32>>, EmbedError> {
        let config = self.bert.config();
        let texts: Vec<&str> = inputs
            .iter()
            .filter_map(|input| match input {
                ModelInput::Text(text) => Some(text.as_str()),
                ModelInput::Tokens(_) => None,
            })
            .collect();
        let mut encoded = self
            .tokenizer
            .encode_batch(texts, true)
            .map_err(|err| EmbedError::Tokenizer(err.to_string()))?
            .into_iter();
        let mut sequences = Vec::with_capacity(inputs.len());
        for (index, input) in inputs.iter().enumerate() {
            let ids = match input {
                ModelInput::Text(_) => {
                    encoded
                        .next()
                        .map(|encoding| encoding.get_ids().to_vec())
                        .ok_or_else(|| EmbedError::Tokenizer("too few encodings".to_owned()))?
                }
                ModelInput::Tokens(ids) => {
                    if let Some(&id) = ids.iter().find(|&&id| id as usize >= config.vocab_size) {
                        return Err(EmbedError::TokenOutOfRange {
                            index,
                            id,
                            vocab: config.vocab_size,
                        });
                    }
                    let mut wrapped = Vec::with_capacity(ids.len() + 2);
                    wrapped.push(self.cls);
                    wrapped.extend_from_slice(ids);
                    wrapped.push(self.sep);
                    wrapped
                }
            };
            if ids.len() > config.max_position_embeddings {
                return Err(EmbedError::InputTooLong {
                    index,
                    tokens: ids.len(),
                    max: config.max_position_embeddings,
                });
            }
            sequences.push(ids);
        }
        Ok(sequences)
    }
}

/// The tokenizer as the model was trained with it. MiniLM's tokenizer.json pads every input
/// to 128 tokens and truncates at 128: padding would be averaged into the mean pooling and
/// truncation would hide over-long inputs, so both are turned off.
fn load_tokenizer(path: &Path) -> Result<Tokenizer, LoadError> {
    let invalid = |message: String| LoadError::Invalid {
        path: path.to_owned(),
        message,
    };
    if !path.exists() {
        return Err(LoadError::Read {
            path: path.to_owned(),
            message: "no such file".to_owned(),
        });
    }
    let mut tokenizer = Tokenizer::from_file(path).map_err(|err| invalid(err.to_string()))?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|err| invalid(err.to_string()))?;
    Ok(tokenizer)
}
