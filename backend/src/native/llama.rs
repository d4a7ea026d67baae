//! A Llama-family decoder (SmolLM2, TinyLlama and their kin) from a GGUF file: token ids in,
//! next-token logits out, for one sequence with its own key/value cache.
//!
//! Per layer: RMSNorm, grouped-query self-attention with rotary position embeddings (GGUF's
//! adjacent-pair form), a residual add, RMSNorm, a SwiGLU feed-forward block, a residual
//! add; then a final RMSNorm and the output head, which is the token embedding itself when
//! the file has no `output.weight` (tied). Weights stay in their stored encoding on the
//! device. Batching many sequences and a paged cache are the engine's business, not this
//! module's: it only promises that the same tokens give the same logits.

use super::device::{CausalAttention, Device, DeviceError, Tensor};
use super::gguf::{Gguf, Value};
use super::quant::{dequantize, QMatrix};
use super::LoadError;

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

struct Layer<D: Device> {
    attn_norm: Tensor<D::Storage>,
    q: D::Matrix,
    k: D::Matrix,
    v: D::Matrix,
    o: D::Matrix,
    ffn_norm: Tensor<D::Storage>,
    gate: D::Matrix,
    up: D::Matrix,
    down: D::Matrix,
}

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every new token's: for checking a whole prompt against a reference.
    All,
    /// The last new token's only, which is all that sampling needs: the output head is the
    /// largest matrix (49152 × 576 for SmolLM2), so a prompt's other rows would cost as
    /// much again as its whole forward pass.
    Last,
}

/// A loaded decoder on device `D`.
pub struct Llama<D: Device> {
    device: D,
    config: LlamaConfig,
    embed: D::Matrix,
    layers: Vec<Layer<D>>,
    norm: Tensor<D::Storage>,
    /// `None`: the output head is `embed` (tied).
    output: Option<D::Matrix>,
}

/// One sequence's keys and values, for every layer, in room for `capacity` tokens.
pub struct KvCache<S> {
    k: Vec<Tensor<S>>,
    v: Vec<Tensor<S>>,
    len: usize,
}

impl<S> KvCache<S> {
    /// Tokens the cache holds.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.k.first().map_or(0, Tensor::rows)
    }
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

    /// An empty cache with room for `capacity` tokens (at most the context length).
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache<D::Storage>, DeviceError> {
        let capacity = capacity.min(self.config.context_length);
        let width = self.config.kv_heads * self.config.head_dim();
        let zeros = vec![0.0f32; capacity * width];
        let mut k = Vec::with_capacity(self.config.layers);
        let mut v = Vec::with_capacity(self.config.layers);
        for _ in 0..self.config.layers {
            k.push(self.device.upload(&zeros, &[capacity, width])?);
            v.push(self.device.upload(&zeros, &[capacity, width])?);
        }
        Ok(KvCache { k, v, len: 0 })
    }

    /// Runs `tokens` (at least one), which follow the ones already in `cache`, and returns
    /// their logits, `[tokens, vocab]` (row `i` predicts the token after `tokens[i]`), or
    /// `[1, vocab]` for [`Logits::Last`]. The caller checks that the tokens are in the
    /// vocabulary and fit in the cache.
    pub fn forward(
        &self,
        cache: &mut KvCache<D::Storage>,
        tokens: &[u32],
        logits: Logits,
    ) -> Result<Tensor<D::Storage>, DeviceError> {
        let dev = &self.device;
        let c = &self.config;
        let past = cache.len;
        assert!(!tokens.is_empty(), "forward over no tokens");
        assert!(
            past + tokens.len() <= cache.capacity(),
            "{past} + {} tokens in a cache of {}",
            tokens.len(),
            cache.capacity()
        );
        let positions: Vec<u32> = (past..past + tokens.len()).map(|p| p as u32).collect();
        let layout = CausalAttention {
            past,
            heads: c.heads,
            kv_heads: c.kv_heads,
            scale: 1.0 / (c.head_dim() as f32).sqrt(),
        };
        let mut x = dev.gather_matrix_rows(&self.embed, tokens)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = dev.rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let mut q = dev.matmul(&h, &layer.q)?;
            let mut k = dev.matmul(&h, &layer.k)?;
            let v = dev.matmul(&h, &layer.v)?;
            dev.rope(&mut q, c.heads, &positions, c.rope_base)?;
            dev.rope(&mut k, c.kv_heads, &positions, c.rope_base)?;
            dev.write_rows(&mut cache.k[i], &k, past)?;
            dev.write_rows(&mut cache.v[i], &v, past)?;
            let attended = dev.causal_attention(&q, &cache.k[i], &cache.v[i], layout)?;
            dev.add_assign(&mut x, &dev.matmul(&attended, &layer.o)?)?;

            let h = dev.rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let mut gate = dev.matmul(&h, &layer.gate)?;
            dev.silu_mul(&mut gate, &dev.matmul(&h, &layer.up)?)?;
            dev.add_assign(&mut x, &dev.matmul(&gate, &layer.down)?)?;
        }
        cache.len = past + tokens.len();
        if logits == Logits::Last && tokens.len() > 1 {
            x = dev.gather_rows(&x, &[tokens.len() as u32 - 1])?;
        }
        let x = dev.rms_norm(&x, &self.norm, c.rms_eps)?;
        dev.matmul(&x, self.output.as_ref().unwrap_or(&self.embed))
    }
}
