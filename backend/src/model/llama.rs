//! How does a Llama-family decoder (SmolLM2, TinyLlama and their kin) turn tokens into
//! logits? Loaded from a GGUF file (or a Hugging Face folder, which `hf_llama` reads into it):
//! token ids in, next-token logits out, for a batch of sequences over a paged key/value
//! cache ([`crate::kv_cache`]).
//!
//! Per layer: RMSNorm, grouped-query self-attention with rotary position embeddings (GGUF's
//! adjacent-pair form, with Llama 3's or linear frequency scaling where the model has it;
//! Qwen2's query/key/value biases where it has them), a residual add, RMSNorm, a SwiGLU feed-forward block, a residual
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
use crate::quant::{dequantize, GgmlType, QMatrix};

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
    /// How much slower each rotary pair turns than `rope_base` says (`head_dim / 2`
    /// values); empty when none is (no frequency scaling).
    pub rope_divisors: Vec<f32>,
    pub context_length: usize,
}

/// Rotary frequency scaling, as Hugging Face's `rope_scaling` describes it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3's: low frequencies divided by `factor`, high ones kept, a smooth blend
    /// between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_context: f64,
    },
}

impl RopeScaling {
    /// Each rotary pair's divisor for heads `head_dim` wide turning at `base`.
    pub fn divisors(&self, base: f64, head_dim: usize) -> Vec<f32> {
        (0..head_dim / 2)
            .map(|i| match *self {
                RopeScaling::Linear { factor } => factor as f32,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_context,
                } => {
                    let inv_freq = base.powf(-2.0 * i as f64 / head_dim as f64);
                    let wavelength = 2.0 * std::f64::consts::PI / inv_freq;
                    if wavelength < original_context / high_freq_factor {
                        1.0
                    } else if wavelength > original_context / low_freq_factor {
                        factor as f32
                    } else {
                        let smooth = (original_context / wavelength - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                    }
                }
            })
            .collect()
    }
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.heads
    }

    /// The network's shape from a GGUF's metadata under its architecture's prefix
    /// (`llama.*`, `qwen2.*`).
    pub fn from_gguf(gguf: &Gguf) -> Result<LlamaConfig, String> {
        let arch = architecture(gguf)?;
        let int = |key: &str| -> Result<usize, String> {
            gguf.get(&format!("{arch}.{key}"))
                .and_then(Value::as_u64)
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| format!("{arch}.{key} is missing or not an integer"))
        };
        let float = |key: &str, default: Option<f64>| -> Result<f32, String> {
            match gguf.get(&format!("{arch}.{key}")) {
                Some(v) => v
                    .as_f64()
                    .map(|v| v as f32)
                    .ok_or_else(|| format!("{arch}.{key} is not a number")),
                None => default
                    .map(|v| v as f32)
                    .ok_or_else(|| format!("{arch}.{key} is missing")),
            }
        };
        match gguf
            .get(&format!("{arch}.rope.scaling.type"))
            .and_then(Value::as_str)
        {
            None | Some("none") => {}
            Some(kind) => {
                return Err(format!(
                    "{arch}.rope.scaling.type `{kind}` (frequency scaling here comes from a \
                     rope_freqs tensor, as llama.cpp writes Llama 3's)"
                ))
            }
        }
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
            // From the `rope_freqs` tensor, if the file has one (read with the weights).
            rope_divisors: Vec::new(),
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

/// The decoder families a GGUF may hold, by `general.architecture`: Llama's (also
/// Mistral's and TinyLlama's, which llama.cpp writes as `llama`) and Qwen2's.
const ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];

fn architecture(gguf: &Gguf) -> Result<&str, String> {
    let arch = gguf
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or("no general.architecture")?;
    if !ARCHITECTURES.contains(&arch) {
        return Err(format!(
            "general.architecture `{arch}` (these run here: {})",
            ARCHITECTURES.join(", ")
        ));
    }
    Ok(arch)
}

/// One decoder layer's weights. `q` and `k` rows (and their biases) are in GGUF's llama
/// order, permuted for adjacent-pair rotary embeddings (see [`Device::rope`]).
pub(super) struct Layer<D: Device> {
    pub(super) attn_norm: Tensor<D::Storage>,
    pub(super) q: D::Matrix,
    pub(super) k: D::Matrix,
    pub(super) v: D::Matrix,
    pub(super) o: D::Matrix,
    /// Biases of the attention's products, where the model has them (Qwen2: q, k and v;
    /// Llama's `attention_bias`: all four).
    pub(super) biases: AttentionBiases<D>,
    pub(super) ffn_norm: Tensor<D::Storage>,
    pub(super) gate: D::Matrix,
    pub(super) up: D::Matrix,
    pub(super) down: D::Matrix,
}

/// Added after the attention's products; `None` where the model has no bias.
pub(super) struct AttentionBiases<D: Device> {
    pub(super) q: Option<Tensor<D::Storage>>,
    pub(super) k: Option<Tensor<D::Storage>>,
    pub(super) v: Option<Tensor<D::Storage>>,
    pub(super) o: Option<Tensor<D::Storage>>,
}

/// `x + bias`, where there is a bias.
fn biased<D: Device>(
    dev: &D,
    mut x: Tensor<D::Storage>,
    bias: &Option<Tensor<D::Storage>>,
) -> Result<Tensor<D::Storage>, DeviceError> {
    if let Some(bias) = bias {
        dev.add_bias(&mut x, bias)?;
    }
    Ok(x)
}

/// Reorders each head's rows from Hugging Face's halves (row `i` pairs with row
/// `i + head_dim/2`) to adjacent pairs (rows `2i`, `2i + 1`): new row `2i + t` of a head is
/// old row `t · head_dim/2 + i`. Rows move whole, so any encoding works.
pub(super) fn interleave_rope_rows(matrix: QMatrix, heads: usize) -> QMatrix {
    let head_dim = matrix.rows / heads;
    let half = head_dim / 2;
    let row_bytes = matrix.bytes.len() / matrix.rows;
    let mut bytes = Vec::with_capacity(matrix.bytes.len());
    for h in 0..heads {
        for i in 0..half {
            for t in 0..2 {
                let old = h * head_dim + t * half + i;
                bytes.extend_from_slice(&matrix.bytes[old * row_bytes..(old + 1) * row_bytes]);
            }
        }
    }
    QMatrix::new(matrix.dtype, matrix.rows, matrix.cols, bytes)
}

/// [`interleave_rope_rows`] for one value per row (a query or key bias).
pub(super) fn interleave_rope_values(values: &[f32], heads: usize) -> Vec<f32> {
    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let rows = interleave_rope_rows(QMatrix::new(GgmlType::F32, values.len(), 1, bytes), heads);
    rows.bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect()
}

/// The rotary divisors a model runs with on `device`: its own, or 1 for every pair.
pub(super) fn rope_divisors<D: Device>(
    device: &D,
    config: &LlamaConfig,
) -> Result<Tensor<D::Storage>, DeviceError> {
    let pairs = config.head_dim() / 2;
    match config.rope_divisors.len() {
        0 => device.upload(&vec![1.0; pairs], &[pairs]),
        _ => device.upload(&config.rope_divisors, &[pairs]),
    }
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
    /// [`LlamaConfig::rope_divisors`] on the device (all 1 without frequency scaling).
    pub(super) rope_divisors: Tensor<D::Storage>,
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
        let mut config = LlamaConfig::from_gguf(gguf).map_err(invalid)?;
        // Qwen2's files keep Hugging Face's rotate-half order of query and key rows (llama.cpp
        // runs them with its NEOX rotation); reordered here, they run as llama's do.
        let halves = architecture(gguf).map_err(invalid)? == "qwen2";
        let (d, kv) = (config.hidden_size, config.kv_heads * config.head_dim());
        let stored = |name: &str, rows: usize, cols: usize| -> Result<QMatrix, LoadError> {
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
            Ok(QMatrix::new(info.dtype, rows, cols, bytes.to_vec()))
        };
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<D::Matrix, LoadError> {
            Ok(device.upload_matrix(stored(name, rows, cols)?)?)
        };
        let rope_matrix = |name: &str, rows: usize, heads: usize| -> Result<D::Matrix, LoadError> {
            let weights = stored(name, rows, d)?;
            Ok(device.upload_matrix(match halves {
                true => interleave_rope_rows(weights, heads),
                false => weights,
            })?)
        };
        let values = |name: &str, len: usize| -> Result<Vec<f32>, LoadError> {
            let (info, bytes) = gguf.tensor(name).ok_or_else(|| LoadError::MissingTensor {
                path: path.to_owned(),
                name: name.to_owned(),
            })?;
            if info.dims != [len] {
                return Err(LoadError::TensorShape {
                    name: name.to_owned(),
                    found: info.dims.clone(),
                    expected: vec![len],
                });
            }
            let mut values = vec![0.0f32; len];
            dequantize(info.dtype, bytes, &mut values);
            Ok(values)
        };
        let vector = |name: &str| -> Result<Tensor<D::Storage>, LoadError> {
            Ok(device.upload(&values(name, d)?, &[d])?)
        };
        // A bias, if the file has one; query and key biases reordered as their rows are.
        let bias = |name: &str, len: usize, heads: Option<usize>| {
            if !gguf.tensors.contains_key(name) {
                return Ok(None);
            }
            let values = values(name, len)?;
            let values = match (halves, heads) {
                (true, Some(heads)) => interleave_rope_values(&values, heads),
                _ => values,
            };
            Ok::<_, LoadError>(Some(device.upload(&values, &[len])?))
        };
        if gguf.tensors.contains_key("rope_freqs.weight") {
            config.rope_divisors = values("rope_freqs.weight", config.head_dim() / 2)?;
        }
        let layers = (0..config.layers)
            .map(|i| {
                let name = |part: &str| format!("blk.{i}.{part}.weight");
                let bias_name = |part: &str| format!("blk.{i}.{part}.bias");
                Ok(Layer {
                    attn_norm: vector(&name("attn_norm"))?,
                    q: rope_matrix(&name("attn_q"), d, config.heads)?,
                    k: rope_matrix(&name("attn_k"), kv, config.kv_heads)?,
                    v: matrix(&name("attn_v"), kv, d)?,
                    o: matrix(&name("attn_output"), d, d)?,
                    biases: AttentionBiases {
                        q: bias(&bias_name("attn_q"), d, Some(config.heads))?,
                        k: bias(&bias_name("attn_k"), kv, Some(config.kv_heads))?,
                        v: bias(&bias_name("attn_v"), kv, None)?,
                        o: bias(&bias_name("attn_output"), d, None)?,
                    },
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
            rope_divisors: rope_divisors(&device, &config)?,
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
            let b = &layer.biases;
            let mut q = biased(dev, dev.matmul(&h, &layer.q, &prompt_rows)?, &b.q)?;
            let mut k = biased(dev, dev.matmul(&h, &layer.k, &prompt_rows)?, &b.k)?;
            let v = biased(dev, dev.matmul(&h, &layer.v, &prompt_rows)?, &b.v)?;
            let divisors = &self.rope_divisors;
            dev.rope(&mut q, c.heads, &positions, c.rope_base, divisors)?;
            dev.rope(&mut k, c.kv_heads, &positions, c.rope_base, divisors)?;
            let (keys, values) = cache.layer_mut(i);
            dev.scatter_rows(keys, &k, &slots)?;
            dev.scatter_rows(values, &v, &slots)?;
            let attended = dev.paged_attention(&q, keys, values, layout)?;
            let out = biased(dev, dev.matmul(&attended, &layer.o, &prompt_rows)?, &b.o)?;
            dev.add_assign(&mut x, &out)?;

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
