//! How does a BERT encoder embed a sentence? All-MiniLM-L6-v2 and its kin as sentence
//! embedders: token ids in, one unit-length vector per sequence out.
//!
//! The forward pass is the original post-norm BERT: word + position + token-type (0)
//! embeddings, LayerNorm, then per layer self-attention and a GELU feed-forward block, each
//! added back to its input and LayerNorm'd; then the mean over each sequence's tokens
//! (sentence-transformers' pooling for these models) and L2 normalisation. Dropout is a
//! training-time operation and does not appear.

use serde::Deserialize;

use super::weights::Weights;
use super::LoadError;
use crate::device::{Attention, Device, DeviceError, Tensor};

/// The fields of a Hugging Face `config.json` the encoder depends on.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
}

fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_hidden_act() -> String {
    "gelu".to_owned()
}
fn default_position_embedding_type() -> String {
    "absolute".to_owned()
}

impl BertConfig {
    /// Refuses configurations whose forward pass differs from the one implemented here,
    /// which would otherwise load and give wrong vectors.
    fn check(&self) -> Result<(), LoadError> {
        let unsupported = |message: String| Err(LoadError::Unsupported(message));
        if self.hidden_act != "gelu" {
            return unsupported(format!(
                "hidden_act `{}` (only `gelu`, the exact erf form)",
                self.hidden_act
            ));
        }
        if self.position_embedding_type != "absolute" {
            return unsupported(format!(
                "position_embedding_type `{}` (only `absolute`)",
                self.position_embedding_type
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return unsupported(format!(
                "hidden_size {} over {} attention heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.type_vocab_size == 0 || self.max_position_embeddings == 0 {
            return unsupported("an empty token-type or position table".to_owned());
        }
        Ok(())
    }
}

struct Layer<S> {
    query: (Tensor<S>, Tensor<S>),
    key: (Tensor<S>, Tensor<S>),
    value: (Tensor<S>, Tensor<S>),
    attn_out: (Tensor<S>, Tensor<S>),
    attn_norm: (Tensor<S>, Tensor<S>),
    intermediate: (Tensor<S>, Tensor<S>),
    output: (Tensor<S>, Tensor<S>),
    output_norm: (Tensor<S>, Tensor<S>),
}

pub struct Bert<D: Device> {
    device: D,
    config: BertConfig,
    word: Tensor<D::Storage>,
    position: Tensor<D::Storage>,
    token_type: Tensor<D::Storage>,
    embed_norm: (Tensor<D::Storage>, Tensor<D::Storage>),
    layers: Vec<Layer<D::Storage>>,
}

impl<D: Device> Bert<D> {
    /// Loads every weight the config calls for onto `device`.
    pub fn load(device: D, config: BertConfig, weights: &Weights) -> Result<Self, LoadError> {
        config.check()?;
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let tensor = |name: &str, shape: &[usize]| -> Result<Tensor<D::Storage>, LoadError> {
            let values = weights.get(name, shape)?;
            Ok(device.upload(&values, shape)?)
        };
        let linear = |name: &str, out: usize, inp: usize| {
            Ok::<_, LoadError>((
                tensor(&format!("{name}.weight"), &[out, inp])?,
                tensor(&format!("{name}.bias"), &[out])?,
            ))
        };
        let norm = |name: &str| {
            Ok::<_, LoadError>((
                tensor(&format!("{name}.weight"), &[h])?,
                tensor(&format!("{name}.bias"), &[h])?,
            ))
        };
        let layers = (0..config.num_hidden_layers)
            .map(|n| {
                let p = format!("encoder.layer.{n}");
                Ok(Layer {
                    query: linear(&format!("{p}.attention.self.query"), h, h)?,
                    key: linear(&format!("{p}.attention.self.key"), h, h)?,
                    value: linear(&format!("{p}.attention.self.value"), h, h)?,
                    attn_out: linear(&format!("{p}.attention.output.dense"), h, h)?,
                    attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                    intermediate: linear(&format!("{p}.intermediate.dense"), i, h)?,
                    output: linear(&format!("{p}.output.dense"), h, i)?,
                    output_norm: norm(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        Ok(Self {
            word: tensor("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
            position: tensor(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type: tensor(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, h],
            )?,
            embed_norm: norm("embeddings.LayerNorm")?,
            layers,
            device,
            config,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// One unit-length embedding per sequence. Every sequence must be non-empty, no longer
    /// than `max_position_embeddings`, with ids below `vocab_size`: the caller checks
    /// inputs, since a violation here is a bug and panics.
    pub fn embed(&self, sequences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, DeviceError> {
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        let d = &self.device;
        let config = &self.config;
        let seq_lens: Vec<usize> = sequences.iter().map(Vec::len).collect();
        for (seq, &len) in sequences.iter().zip(&seq_lens) {
            assert!(
                len > 0 && len <= config.max_position_embeddings,
                "{len} tokens"
            );
            assert!(seq.iter().all(|&id| (id as usize) < config.vocab_size));
        }
        let ids: Vec<u32> = sequences.iter().flatten().copied().collect();
        let positions: Vec<u32> = seq_lens.iter().flat_map(|&len| 0..len as u32).collect();

        let mut x = d.gather_rows(&self.word, &ids)?;
        d.add_assign(&mut x, &d.gather_rows(&self.position, &positions)?)?;
        // Single-segment input: every token has token type 0.
        d.add_assign(
            &mut x,
            &d.gather_rows(&self.token_type, &vec![0; ids.len()])?,
        )?;
        let eps = config.layer_norm_eps as f32;
        let mut x = d.layer_norm(&x, &self.embed_norm.0, &self.embed_norm.1, eps)?;

        let heads = config.num_attention_heads;
        let attention = Attention {
            seq_lens: &seq_lens,
            heads,
            scale: 1.0 / ((config.hidden_size / heads) as f32).sqrt(),
        };
        for layer in &self.layers {
            let q = d.linear(&x, &layer.query.0, Some(&layer.query.1))?;
            let k = d.linear(&x, &layer.key.0, Some(&layer.key.1))?;
            let v = d.linear(&x, &layer.value.0, Some(&layer.value.1))?;
            let context = d.attention(&q, &k, &v, attention)?;
            let mut attended = d.linear(&context, &layer.attn_out.0, Some(&layer.attn_out.1))?;
            d.add_assign(&mut attended, &x)?;
            let x1 = d.layer_norm(&attended, &layer.attn_norm.0, &layer.attn_norm.1, eps)?;

            let mut hidden = d.linear(&x1, &layer.intermediate.0, Some(&layer.intermediate.1))?;
            d.gelu(&mut hidden)?;
            let mut out = d.linear(&hidden, &layer.output.0, Some(&layer.output.1))?;
            d.add_assign(&mut out, &x1)?;
            x = d.layer_norm(&out, &layer.output_norm.0, &layer.output_norm.1, eps)?;
        }

        let pooled = d.download(&d.mean_pool(&x, &seq_lens)?)?;
        Ok(pooled
            .chunks(config.hidden_size)
            .map(|row| {
                let mut row = row.to_vec();
                l2_normalise(&mut row);
                row
            })
            .collect())
    }
}

/// The cosine of two unit-length embeddings (their dot product), summed in f64: for telling
/// how close two devices' embeddings of the same text are.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum()
}

/// Scales to unit length, as sentence-transformers' `Normalize` does (its epsilon keeps a
/// zero vector zero rather than NaN).
pub fn l2_normalise(v: &mut [f32]) {
    let norm = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let inv = 1.0 / norm.max(1e-12);
    v.iter_mut().for_each(|x| *x = (f64::from(*x) * inv) as f32);
}
