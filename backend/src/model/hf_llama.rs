//! How is a Llama-family decoder read from a Hugging Face folder? `config.json` for the
//! shape, `model.safetensors` (or the shards that `model.safetensors.index.json` lists) for
//! the weights, kept in their saved encoding (F32, F16 or BF16).
//!
//! Hugging Face's code applies rotary embeddings to the two *halves* of each head; the
//! forward pass here (like llama.cpp's) turns *adjacent* pairs. The two agree once the
//! query and key rows of each head are reordered, which is what llama.cpp's converter does
//! when it writes a GGUF: [`interleave_rope_rows`] does the same here, at load time.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::llama::{Layer, Llama, LlamaConfig};
use super::weights::Weights;
use super::LoadError;
use crate::device::Device;
use crate::quant::QMatrix;

/// The fields of a Llama `config.json` this engine reads. Hugging Face's defaults fill what
/// a file leaves out.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_context")]
    max_position_embeddings: usize,
    vocab_size: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
}

fn default_rms_eps() -> f64 {
    1e-6
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_context() -> usize {
    2048
}

impl HfConfig {
    /// The network's shape, or why this engine cannot run it.
    fn llama_config(&self) -> Result<LlamaConfig, String> {
        if let Some(kind) = self.model_type.as_deref().filter(|t| *t != "llama") {
            return Err(format!("model_type `{kind}` (only `llama` runs here)"));
        }
        let unsupported = |what: &str| Err(format!("{what} is not supported by this engine"));
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return unsupported("rope_scaling");
        }
        if self.attention_bias || self.mlp_bias {
            return unsupported("a bias on the attention or feed-forward weights");
        }
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return unsupported(&format!("hidden_act `{act}`"));
        }
        let heads = self.num_attention_heads;
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        if heads == 0
            || kv_heads == 0
            || !self.hidden_size.is_multiple_of(heads)
            || !heads.is_multiple_of(kv_heads)
            || !(self.hidden_size / heads).is_multiple_of(2)
        {
            return Err(format!(
                "{} wide over {heads} heads and {kv_heads} key/value heads",
                self.hidden_size
            ));
        }
        if let Some(head_dim) = self.head_dim.filter(|&d| d != self.hidden_size / heads) {
            return unsupported(&format!(
                "head_dim {head_dim} other than hidden_size / num_attention_heads"
            ));
        }
        Ok(LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            layers: self.num_hidden_layers,
            heads,
            kv_heads,
            ffn_size: self.intermediate_size,
            rms_eps: self.rms_norm_eps as f32,
            rope_base: self.rope_theta as f32,
            context_length: self.max_position_embeddings,
        })
    }
}

/// The checkpoint's files: one, or the shards of an index.
struct Checkpoint {
    shards: Vec<Weights>,
    dir: PathBuf,
}

impl Checkpoint {
    fn open(dir: &Path) -> Result<Checkpoint, LoadError> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(Checkpoint {
                shards: vec![Weights::open(&single, "")?],
                dir: dir.to_owned(),
            });
        }
        let index_path = dir.join("model.safetensors.index.json");
        let index = std::fs::read_to_string(&index_path).map_err(|err| LoadError::Read {
            path: single.clone(),
            message: format!("{err} (nor is there a model.safetensors.index.json)"),
        })?;
        #[derive(Deserialize)]
        struct Index {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let index: Index = serde_json::from_str(&index).map_err(|err| LoadError::Invalid {
            path: index_path,
            message: err.to_string(),
        })?;
        let mut files: Vec<&String> = index.weight_map.values().collect();
        files.sort();
        files.dedup();
        let shards = files
            .into_iter()
            .map(|file| Weights::open(&dir.join(file), ""))
            .collect::<Result<_, _>>()?;
        Ok(Checkpoint {
            shards,
            dir: dir.to_owned(),
        })
    }

    fn shard(&self, name: &str) -> Result<&Weights, LoadError> {
        self.shards
            .iter()
            .find(|shard| shard.contains(name))
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.dir.clone(),
                name: name.to_owned(),
            })
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix, LoadError> {
        self.shard(name)?.matrix(name, rows, cols)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, LoadError> {
        self.shard(name)?.get(name, &[len])
    }
}

/// Reorders each head's rows from Hugging Face's halves (row `i` pairs with row
/// `i + head_dim/2`) to adjacent pairs (rows `2i`, `2i + 1`): new row `2i + t` of a head is
/// old row `t · head_dim/2 + i`. Rows move whole, so any encoding works.
fn interleave_rope_rows(matrix: QMatrix, heads: usize) -> QMatrix {
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

impl<D: Device> Llama<D> {
    /// Loads the decoder in the Hugging Face folder `dir` onto `device`.
    pub fn load_safetensors(device: D, dir: &Path) -> Result<Self, LoadError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|err| LoadError::Read {
            path: config_path.clone(),
            message: err.to_string(),
        })?;
        let invalid = |message: String| LoadError::Invalid {
            path: config_path.clone(),
            message,
        };
        let hf: HfConfig = serde_json::from_str(&text).map_err(|err| invalid(err.to_string()))?;
        let config = hf.llama_config().map_err(invalid)?;
        let checkpoint = Checkpoint::open(dir)?;
        let (d, kv) = (config.hidden_size, config.kv_heads * config.head_dim());
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<D::Matrix, LoadError> {
            Ok(device.upload_matrix(checkpoint.matrix(name, rows, cols)?)?)
        };
        let rope_matrix = |name: &str, rows: usize, heads: usize| -> Result<D::Matrix, LoadError> {
            let stored = checkpoint.matrix(name, rows, d)?;
            Ok(device.upload_matrix(interleave_rope_rows(stored, heads))?)
        };
        let vector = |name: &str| -> Result<_, LoadError> {
            Ok(device.upload(&checkpoint.vector(name, d)?, &[d])?)
        };
        let layers = (0..config.layers)
            .map(|i| {
                let name = |part: &str| format!("model.layers.{i}.{part}.weight");
                Ok(Layer {
                    attn_norm: vector(&name("input_layernorm"))?,
                    q: rope_matrix(&name("self_attn.q_proj"), d, config.heads)?,
                    k: rope_matrix(&name("self_attn.k_proj"), kv, config.kv_heads)?,
                    v: matrix(&name("self_attn.v_proj"), kv, d)?,
                    o: matrix(&name("self_attn.o_proj"), d, d)?,
                    ffn_norm: vector(&name("post_attention_layernorm"))?,
                    gate: matrix(&name("mlp.gate_proj"), config.ffn_size, d)?,
                    up: matrix(&name("mlp.up_proj"), config.ffn_size, d)?,
                    down: matrix(&name("mlp.down_proj"), d, config.ffn_size)?,
                })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        // Some checkpoints store a tied head anyway; the flag says which to use.
        let output = match hf.tie_word_embeddings {
            true => None,
            false => Some(matrix("lm_head.weight", config.vocab_size, d)?),
        };
        Ok(Llama {
            embed: matrix("model.embed_tokens.weight", config.vocab_size, d)?,
            norm: vector("model.norm.weight")?,
            layers,
            output,
            config,
            device,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::GgmlType;

    #[test]
    fn rope_rows_go_from_halves_to_adjacent_pairs_per_head() {
        // Two heads of four rows, one f32 column: row r holds r.
        let bytes: Vec<u8> = (0..8).flat_map(|r| (r as f32).to_le_bytes()).collect();
        let m = interleave_rope_rows(QMatrix::new(GgmlType::F32, 8, 1, bytes), 2);
        let rows: Vec<f32> = m
            .bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        // Head 0: rows 0,1 | 2,3 pair as (0,2), (1,3); head 1 likewise from 4.
        assert_eq!(rows, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    }

    #[test]
    fn configs_outside_this_engine_are_refused_by_name() {
        let parse = |json: &str| {
            serde_json::from_str::<HfConfig>(json)
                .unwrap()
                .llama_config()
        };
        let base = r#""hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"vocab_size":10"#;
        let config = parse(&format!("{{{base}}}")).unwrap();
        assert_eq!((config.kv_heads, config.rope_base), (2, 10_000.0));
        for (extra, named) in [
            (r#","model_type":"qwen2""#, "qwen2"),
            (
                r#","rope_scaling":{"type":"linear","factor":2}"#,
                "rope_scaling",
            ),
            (r#","attention_bias":true"#, "bias"),
            (r#","hidden_act":"gelu""#, "gelu"),
            (r#","num_key_value_heads":3"#, "3 key/value heads"),
        ] {
            let err = parse(&format!("{{{base}{extra}}}")).unwrap_err();
            assert!(err.contains(named), "{extra}: {err}");
        }
    }
}
