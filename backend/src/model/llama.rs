//! How does a Llama-family decoder (SmolLM2, TinyLlama and their kin) turn tokens into
//! logits? Loaded from a GGUF file (or a Hugging Face folder, which `hf_llama` reads into it):
//! token ids in, next-token logits out, for a batch of sequences over a paged key/value
//! cache ([`crate::kv_cache`]).
//!
//! Per layer: RMSNorm, grouped-query self-attention with rotary position embeddings (GGUF's
//! adjacent-pair form), a residual add, RMSNorm, a SwiGLU feed-forward block, a residual
//! add; then a final RMSNorm and the output head, which is the token embedding itself when
//! the file has no `output.weight` (tied). Weights stay in their stored encoding on the
//! device. One forward pass runs a batch of sequences, each with its own new tokens (a
//! whole or partial prompt, or one generated token), over a paged key/value cache: blocks of
//! a fixed number of positions handed out as sequences grow. Which sequences run together
//! is the engine's business; this module promises that it never changes their logits, since
//! every row's arithmetic is the same whatever else is in the batch.

use super::gguf::{Gguf, Value};
use super::LoadError;
use crate::device::{Device, DeviceError, PagedAttention, PagedSequence, Tensor};
use crate::kv_cache::{KvCache, SeqCache};
use crate::quant::{dequantize, QMatrix};

/// The shape of the network, from the GGUF's `llama.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn_size: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    pub context_length: usize,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.heads
    }

    pub fn from_gguf(gguf: &Gguf) -> Result<LlamaConfig, String> {
        let arch = gguf
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or("no general.architecture")?;
        if arch != "llama" {
            return Err(format!(
                "general.architecture `{arch}` (only `llama` runs here)"
            ));
        }
        let int = |key: &str| -> Result<usize, String> {
            gguf.get(&format!("llama.{key}"))
                .and_then(Value::as_u64)
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| format!("llama.{key} is missing or not an integer"))
        };
        let float = |key: &str, default: Option<f64>| -> Result<f32, String> {
            match gguf.get(&format!("llama.{key}")) {
                Some(v) => v
                    .as_f64()
                    .map(|v| v as f32)
                    .ok_or_else(|| format!("llama.{key} is not a number")),
                None => default
                    .map(|v| v as f32)
                    .ok_or_else(|| format!("llama.{key} is missing")),
            }
        };
        let heads = int("attention.head_count")?;
        let config = LlamaConfig {
            vocab_size: match int("vocab_size") {
                Ok(n) => n,
                // Older writers leave it out; the vocabulary says it.
                Err(_) => gguf
                    .get("tokenizer.ggml.tokens")
                    .and_then(Value::as_array)
                    .map(<[Value]>::len)
                    .ok_or("neither llama.vocab_size nor tokenizer.ggml.tokens")?,
            },
            hidden_size: int("embedding_length")?,
            layers: int("block_count")?,
            heads,
            kv_heads: int("attention.head_count_kv").unwrap_or(heads),
            ffn_size: int("feed_forward_length")?,
            rms_eps: float("attention.layer_norm_rms_epsilon", None)?,
            // llama.cpp's default when a file does not say.
            rope_base: float("rope.freq_base", Some(10_000.0))?,
            context_length: int("context_length")?,
        };
        let head_dim = config.hidden_size / heads.max(1);
        if heads == 0
            || config.kv_heads == 0
            || !config.hidden_size.is_multiple_of(heads)
            || !heads.is_multiple_of(config.kv_heads)
            || !head_dim.is_multiple_of(2)
        {
            return Err(format!(
                "{} wide over {heads} heads and {} key/value heads",
                config.hidden_size, config.kv_heads
            ));
        }
        if let Ok(rope_dims) = int("rope.dimension_count") {
            if rope_dims != head_dim {
                return Err(format!(
                    "rotary embeddings over {rope_dims} of each head's {head_dim} dimensions (only whole heads)"
                ));
            }
        }
        Ok(config)
    }
}

/// One decoder layer's weights. `q` and `k` rows are in GGUF's order, permuted for
/// adjacent-pair rotary embeddings (see [`Device::rope`]).
pub(super) struct Layer<D: Device> {
    pub(super) attn_norm: Tensor<D::Storage>,
    pub(super) q: D::Matrix,
    pub(super) k: D::Matrix,
    pub(super) v: D::Matrix,
    pub(super) o: D::Matrix,
    pub(super) ffn_norm: Tensor<D::Storage>,
    pub(super) gate: D::Matrix,
    pub(super) up: D::Matrix,
    pub(super) down: D::Matrix,
}

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every new token's: for checking a whole prompt against a reference.
    All,
    /// Each sequence's last [`Step::outputs`] new tokens' (its last one's, to sample the
    /// next token; more to check tokens drafted for it), which is all that sampling needs:
    /// the output head is the largest matrix (49152 × 576 for SmolLM2), so a prompt's other
    /// rows would cost as much again as its whole forward pass.
    Last,
}

/// A loaded decoder on device `D`.
pub struct Llama<D: Device> {
    pub(super) device: D,
    pub(super) config: LlamaConfig,
    pub(super) embed: D::Matrix,
    pub(super) layers: Vec<Layer<D>>,
    pub(super) norm: Tensor<D::Storage>,
    /// `None`: the output head is `embed` (tied).
    pub(super) output: Option<D::Matrix>,
}

/// One sequence's part in a forward pass.
pub struct Step<'a> {
    pub seq: &'a mut SeqCache,
    /// The tokens that follow the ones in `seq`'s cache: at least one, with room reserved.
    pub tokens: &'a [u32],
    /// How many of `tokens`, at the end, the model generated (the rest are prompt): one
    /// for a decode step, none for a prompt chunk. See [`Device::matmul`]: the kind of a
    /// token, not the batch it runs in, decides how its products are computed.
    pub generated: usize,
    /// How many of `tokens`, at the end, [`Logits::Last`] returns logits for: at least one.
    pub outputs: usize,
}

impl<D: Device> Llama<D> {
    /// Loads the decoder in `gguf` (read from `path`, named in errors) onto `device`.
    pub fn load(device: D, gguf: &Gguf, path: &std::path::Path) -> Result<Self, LoadError> {
        let invalid = |message: String| LoadError::Invalid {
            path: path.to_owned(),
            message,
        };
        let config = LlamaConfig::from_gguf(gguf).map_err(invalid)?;
        let (d, kv) = (config.hidden_size, config.kv_heads * config.head_dim());
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<D::Matrix, LoadError> {
            let (info, bytes) = gguf.tensor(name).ok_or_else(|| LoadError::MissingTensor {
                path: path.to_owned(),
                name: name.to_owned(),
            })?;
            if info.dims != [cols, rows] {
                return Err(LoadError::TensorShape {
                    name: name.to_owned(),
                    found: info.dims.clone(),
                    expected: vec![cols, rows],
                });
            }
            Ok(device.upload_matrix(QMatrix::new(info.dtype, rows, cols, bytes.to_vec()))?)
        };
        let vector = |name: &str| -> Result<Tensor<D::Storage>, LoadError> {
            let (info, bytes) = gguf.tensor(name).ok_or_else(|| LoadError::MissingTensor {
                path: path.to_owned(),
                name: name.to_owned(),
            })?;
            if info.dims != [d] {
                return Err(LoadError::TensorShape {
                    name: name.to_owned(),
                    found: info.dims.clone(),
                    expected: vec![d],
                });
            }
            let mut values = vec![0.0f32; d];
            dequantize(info.dtype, bytes, &mut values);
            Ok(device.upload(&values, &[d])?)
        };
        let layers = (0..config.layers)
            .map(|i| {
                let name = |part: &str| format!("blk.{i}.{part}.weight");
                Ok(Layer {
                    attn_norm: vector(&name("attn_norm"))?,
                    q: matrix(&name("attn_q"), d, d)?,
                    k: matrix(&name("attn_k"), kv, d)?,
                    v: matrix(&name("attn_v"), kv, d)?,
                    o: matrix(&name("attn_output"), d, d)?,
                    ffn_norm: vector(&name("ffn_norm"))?,
                    gate: matrix(&name("ffn_gate"), config.ffn_size, d)?,
                    up: matrix(&name("ffn_up"), config.ffn_size, d)?,
                    down: matrix(&name("ffn_down"), d, config.ffn_size)?,
                })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        let output = match gguf.tensors.contains_key("output.weight") {
            true => Some(matrix("output.weight", config.vocab_size, d)?),
            false => None,
        };
        Ok(Llama {
            embed: matrix("token_embd.weight", config.vocab_size, d)?,
            norm: vector("output_norm.weight")?,
            layers,
            output,
            config,
            device,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// Bytes of device memory one cache block of `block_size` positions takes (keys and
    /// values, every layer, f32): divide a memory budget by it for the block count.
    pub fn cache_block_bytes(&self, block_size: usize) -> usize {
        let c = &self.config;
        2 * c.layers * block_size * c.kv_heads * c.head_dim() * std::mem::size_of::<f32>()
    }

    /// An empty cache of `blocks` blocks of `block_size` positions each, shaped for this
    /// model's layers and key/value heads.
    pub fn new_cache(
        &self,
        blocks: usize,
        block_size: usize,
    ) -> Result<KvCache<D::Storage>, DeviceError> {
        let width = self.config.kv_heads * self.config.head_dim();
        KvCache::new(&self.device, self.config.layers, width, blocks, block_size)
    }

    /// Runs one step of a batch: each sequence's new tokens, all at once. Returns the logits
    /// of every new token, `[new tokens, vocab]` packed in `steps` order (row `i` predicts
    /// the token after new token `i`), or of each sequence's last [`Step::outputs`] ones,
    /// packed the same way, for [`Logits::Last`]. The caller checks that tokens are in the vocabulary, within
    /// the context length, and have cache room reserved ([`KvCache::reserve`]).
    pub fn forward(
        &self,
        cache: &mut KvCache<D::Storage>,
        steps: &mut [Step<'_>],
        logits: Logits,
    ) -> Result<Tensor<D::Storage>, DeviceError> {
        self.device
            .run(|| self.forward_on_device(cache, steps, logits))
    }

    fn forward_on_device(
        &self,
        cache: &mut KvCache<D::Storage>,
        steps: &mut [Step<'_>],
        logits: Logits,
    ) -> Result<Tensor<D::Storage>, DeviceError> {
        let dev = &self.device;
        let c = &self.config;
        let bs = cache.block_size();
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut last_rows = Vec::with_capacity(steps.len());
        let mut prompt_rows = Vec::new();
        for step in steps.iter() {
            let (past, new) = (step.seq.len(), step.tokens.len());
            assert!(new > 0, "a step with no tokens");
            assert!(
                step.generated <= new,
                "{} generated of {new}",
                step.generated
            );
            assert!(
                (1..=new).contains(&step.outputs),
                "logits for {} of {new}",
                step.outputs
            );
            prompt_rows.extend((0..new).map(|i| i < new - step.generated));
            assert!(
                step.seq.blocks().len() * bs >= past + new,
                "{past} + {new} positions in {} blocks of {bs}: reserve first",
                step.seq.blocks().len()
            );
            ids.extend_from_slice(step.tokens);
            for p in past..past + new {
                positions.push(p as u32);
                slots.push(step.seq.blocks()[p / bs] * bs as u32 + (p % bs) as u32);
            }
            last_rows.extend((ids.len() - step.outputs..ids.len()).map(|r| r as u32));
        }
        let seqs: Vec<PagedSequence<'_>> = steps
            .iter()
            .map(|step| PagedSequence {
                past: step.seq.len(),
                new: step.tokens.len(),
                blocks: step.seq.blocks(),
            })
            .collect();
        let layout = PagedAttention {
            seqs: &seqs,
            block_size: bs,
            heads: c.heads,
            kv_heads: c.kv_heads,
            scale: 1.0 / (c.head_dim() as f32).sqrt(),
        };
        let mut x = dev.gather_matrix_rows(&self.embed, &ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = dev.rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let mut q = dev.matmul(&h, &layer.q, &prompt_rows)?;
            let mut k = dev.matmul(&h, &layer.k, &prompt_rows)?;
            let v = dev.matmul(&h, &layer.v, &prompt_rows)?;
            dev.rope(&mut q, c.heads, &positions, c.rope_base)?;
            dev.rope(&mut k, c.kv_heads, &positions, c.rope_base)?;
            let (keys, values) = cache.layer_mut(i);
            dev.scatter_rows(keys, &k, &slots)?;
            dev.scatter_rows(values, &v, &slots)?;
            let attended = dev.paged_attention(&q, keys, values, layout)?;
            dev.add_assign(&mut x, &dev.matmul(&attended, &layer.o, &prompt_rows)?)?;

            let h = dev.rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let mut gate = dev.matmul(&h, &layer.gate, &prompt_rows)?;
            dev.silu_mul(&mut gate, &dev.matmul(&h, &layer.up, &prompt_rows)?)?;
            dev.add_assign(&mut x, &dev.matmul(&gate, &layer.down, &prompt_rows)?)?;
        }
        drop(seqs);
        for step in steps.iter_mut() {
            step.seq.advance(step.tokens.len());
        }
        if logits == Logits::Last && last_rows.len() < ids.len() {
            x = dev.gather_rows(&x, &last_rows)?;
            prompt_rows = last_rows.iter().map(|&r| prompt_rows[r as usize]).collect();
        }
        let x = dev.rms_norm(&x, &self.norm, c.rms_eps)?;
        dev.matmul(
            &x,
            self.output.as_ref().unwrap_or(&self.embed),
            &prompt_rows,
        )
    }
}
