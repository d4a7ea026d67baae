//! How is a Llama-family decoder read from a Hugging Face folder? `config.json` for the
//! shape, `model.safetensors` (or the shards that `model.safetensors.index.json` lists) for
//! the weights, kept in their saved encoding (F32, F16 or BF16). The family is `model_type`:
//! `llama` (with Llama 3's or linear `rope_scaling`, and `attention_bias`), `mistral` (a
//! sliding attention window is served by capping the context at it, where the window covers
//! every position) and `qwen2` (biases on the query, key and value products).
//!
//! Hugging Face's code applies rotary embeddings to the two *halves* of each head; the
//! forward pass here (like llama.cpp's) turns *adjacent* pairs. The two agree once the
//! query and key rows of each head are reordered, which is what llama.cpp's converter does
//! when it writes a GGUF: [`interleave_rope_rows`] does the same here, at load time.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::llama::{
    interleave_rope_rows, interleave_rope_values, rope_divisors, AttentionBiases, Layer, Llama,
    LlamaConfig, RopeScaling,
};
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
    /// Mistral's and Qwen2's sliding attention window, if one is used.
    sliding_window: Option<usize>,
    /// Qwen2's switch for its window (off in its released models).
    use_sliding_window: Option<bool>,
}

/// The families this engine runs from a Hugging Face folder.
const MODEL_TYPES: [&str; 3] = ["llama", "mistral", "qwen2"];

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
    fn model_type(&self) -> &str {
        self.model_type.as_deref().unwrap_or("llama")
    }

    /// Which of the attention's products have a bias: (q, k and v; o).
    fn biases(&self) -> (bool, bool) {
        match self.model_type() {
            "qwen2" => (true, false),
            _ => (self.attention_bias, self.attention_bias),
        }
    }

    /// `rope_scaling`, read; `None` when there is none.
    fn rope_scaling(&self) -> Result<Option<RopeScaling>, String> {
        let Some(scaling) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let number = |key: &str| -> Result<f64, String> {
            scaling
                .get(key)
                .and_then(serde_json::Value::as_f64)
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| format!("rope_scaling.{key} is missing or not a positive number"))
        };
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        match kind {
            "default" => Ok(None),
            "linear" => Ok(Some(RopeScaling::Linear {
                factor: number("factor")?,
            })),
            "llama3" => {
                let scaling = RopeScaling::Llama3 {
                    factor: number("factor")?,
                    low_freq_factor: number("low_freq_factor")?,
                    high_freq_factor: number("high_freq_factor")?,
                    original_context: number("original_max_position_embeddings")?,
                };
                match scaling {
                    RopeScaling::Llama3 {
                        low_freq_factor,
                        high_freq_factor,
                        ..
                    } if high_freq_factor <= low_freq_factor => Err(
                        "rope_scaling.high_freq_factor must be above low_freq_factor".to_owned(),
                    ),
                    scaling => Ok(Some(scaling)),
                }
            }
            other => Err(format!(
                "rope_scaling type `{other}` is not supported by this engine (llama3 and linear are)"
            )),
        }
    }

    /// The network's shape, or why this engine cannot run it.
    fn llama_config(&self) -> Result<LlamaConfig, String> {
        let kind = self.model_type();
        if !MODEL_TYPES.contains(&kind) {
            return Err(format!(
                "model_type `{kind}` (these run here: {})",
                MODEL_TYPES.join(", ")
            ));
        }
        let unsupported = |what: &str| Err(format!("{what} is not supported by this engine"));
        if self.mlp_bias {
            return unsupported("a bias on the feed-forward weights (mlp_bias)");
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
        let head_dim = self.hidden_size / heads;
        // A window that covers the whole context is no window: positions past it are not
        // served, so every position attends to all before it, exactly as the model would.
        let window = match (kind, self.use_sliding_window) {
            ("qwen2", Some(true)) | ("mistral", _) => self.sliding_window,
            _ => None,
        };
        let context_length = match window {
            Some(window) => self.max_position_embeddings.min(window),
            None => self.max_position_embeddings,
        };
        Ok(LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            layers: self.num_hidden_layers,
            heads,
            kv_heads,
            ffn_size: self.intermediate_size,
            rms_eps: self.rms_norm_eps as f32,
            rope_base: self.rope_theta as f32,
            rope_divisors: self
                .rope_scaling()?
                .map(|scaling| scaling.divisors(self.rope_theta, head_dim))
                .unwrap_or_default(),
            context_length,
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
        let (qkv_bias, o_bias) = hf.biases();
        // A bias, when the family has one; query and key biases reordered as their rows are.
        let bias = |present: bool, name: &str, len: usize, heads: Option<usize>| {
            if !present {
                return Ok(None);
            }
            let values = checkpoint.vector(name, len)?;
            let values = match heads {
                Some(heads) => interleave_rope_values(&values, heads),
                None => values,
            };
            Ok::<_, LoadError>(Some(device.upload(&values, &[len])?))
        };
        let layers = (0..config.layers)
            .map(|i| {
                let name = |part: &str| format!("model.layers.{i}.{part}.weight");
                let bias_name = |part: &str| format!("model.layers.{i}.self_attn.{part}.bias");
                Ok(Layer {
                    attn_norm: vector(&name("input_layernorm"))?,
                    q: rope_matrix(&name("self_attn.q_proj"), d, config.heads)?,
                    k: rope_matrix(&name("self_attn.k_proj"), kv, config.kv_heads)?,
                    v: matrix(&name("self_attn.v_proj"), kv, d)?,
                    o: matrix(&name("self_attn.o_proj"), d, d)?,
                    biases: AttentionBiases {
                        q: bias(qkv_bias, &bias_name("q_proj"), d, Some(config.heads))?,
                        k: bias(qkv_bias, &bias_name("k_proj"), kv, Some(config.kv_heads))?,
                        v: bias(qkv_bias, &bias_name("v_proj"), kv, None)?,
                        o: bias(o_bias, &bias_name("o_proj"), d, None)?,
                    },
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
            rope_divisors: rope_divisors(&device, &config)?,
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
            (r#","model_type":"gemma""#, "gemma"),
            (r#","rope_scaling":{"type":"yarn","factor":2}"#, "yarn"),
            (
                r#","rope_scaling":{"rope_type":"llama3","factor":8}"#,
                "low_freq_factor",
            ),
            (r#","mlp_bias":true"#, "mlp_bias"),
            (r#","hidden_act":"gelu""#, "gelu"),
            (r#","num_key_value_heads":3"#, "3 key/value heads"),
        ] {
            let err = parse(&format!("{{{base}{extra}}}")).unwrap_err();
            assert!(err.contains(named), "{extra}: {err}");
        }
    }
}
