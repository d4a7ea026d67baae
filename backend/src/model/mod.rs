//! What is this model, and how are its weights read? The model families this backend runs,
//! their forward passes and their loaders, all from local files only.
//!
//! A `--model` path is recognised from its files ([`inspect`]): a GGUF file or a Hugging
//! Face folder by its `config.json`. BERT sentence encoders (all-MiniLM-L6-v2) come from
//! `model.safetensors` ([`weights`]) with `tokenizer.json`, and run as [`bert`]. Llama-family
//! decoders (SmolLM2) come from GGUF files ([`gguf`]) or Hugging Face folders ([`hf_llama`])
//! with weights kept in their stored encodings ([`crate::quant`]), and run as [`llama`]: a forward
//! pass over a batch of sequences over a paged key/value cache ([`crate::kv_cache`]),
//! checked against an independent numpy reference; [`tokenizer`] turns their text into
//! tokens and back, chat template included.
//!
//! Models are written once against the [`crate::device::Device`] trait, so the same code
//! runs on the CPU or a GPU. What to run and when (threads, batching, sampling) is the
//! engine's business ([`crate::engine`]), never this module's.

pub mod bert;
pub mod gguf;
pub mod hf_llama;
pub mod llama;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use crate::device::cuda::CudaUnavailable;
use crate::device::DeviceError;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A model this engine does not know how to run at all.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path} has no tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    #[error("tensor `{name}` has shape {found:?}; the config calls for {expected:?}")]
    TensorShape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor `{name}` is {dtype}; only F32, F16 and BF16 weights load")]
    TensorType { name: String, dtype: String },
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Gpu(#[from] CudaUnavailable),
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
}

impl LoadError {
    /// Whether the command line asked for something this build cannot do, as opposed to
    /// files that are broken: the first is a usage error (exit status 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Unsupported(_))
            || matches!(self, Self::Read { path, .. } if !path.exists())
            || matches!(self, Self::Gpu(why) if why.is_absence())
    }
}

/// What kind of model a `--model` path holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelKind {
    /// A Hugging Face BERT folder: served as an embedding model.
    Bert,
    /// A Llama-family decoder (a GGUF file or a Hugging Face folder): served for chat and
    /// text completions.
    Llama,
}

/// Decides from its files what a model path holds, without loading weights.
pub fn inspect(path: &Path) -> Result<ModelKind, LoadError> {
    let meta = std::fs::metadata(path).map_err(|err| LoadError::Read {
        path: path.to_owned(),
        message: err.to_string(),
    })?;
    if meta.is_file() {
        let mut magic = [0u8; 4];
        let is_gguf = path
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("gguf"))
            || std::fs::File::open(path)
                .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut magic))
                .is_ok_and(|()| &magic == b"GGUF");
        if is_gguf {
            return Ok(ModelKind::Llama);
        }
        return Err(LoadError::Unsupported(format!(
            "{}: give a GGUF file or a Hugging Face model folder (with config.json)",
            path.display()
        )));
    }
    let config_path = path.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|err| LoadError::Read {
        path: config_path.clone(),
        message: err.to_string(),
    })?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|err| LoadError::Invalid {
            path: config_path.clone(),
            message: err.to_string(),
        })?;
    let model_type = config["model_type"].as_str().unwrap_or_default();
    let architectures: Vec<&str> = config["architectures"]
        .as_array()
        .map(|list| list.iter().filter_map(|a| a.as_str()).collect())
        .unwrap_or_default();
    if model_type == "bert" || architectures.contains(&"BertModel") {
        return Ok(ModelKind::Bert);
    }
    if model_type == "llama" || architectures.contains(&"LlamaForCausalLM") {
        return Ok(ModelKind::Llama);
    }
    Err(LoadError::Unsupported(format!(
        "{}: model_type `{model_type}`, architectures {architectures:?}; this build serves BERT encoders (model_type `bert`) and Llama decoders (model_type `llama`)",
        config_path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder_with_config(name: &str, config: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sluice-inspect-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), config).unwrap();
        dir
    }

    #[test]
    fn bert_folders_are_embedders_and_gguf_files_and_llama_folders_decoders() {
        let bert = folder_with_config("bert", r#"{"model_type":"bert"}"#);
        assert_eq!(inspect(&bert).unwrap(), ModelKind::Bert);
        let arch = folder_with_config("arch", r#"{"architectures":["BertModel"]}"#);
        assert_eq!(inspect(&arch).unwrap(), ModelKind::Bert);

        let llama = folder_with_config(
            "llama",
            r#"{"model_type":"llama","architectures":["LlamaForCausalLM"]}"#,
        );
        assert_eq!(inspect(&llama).unwrap(), ModelKind::Llama);

        let other = folder_with_config("t5", r#"{"model_type":"qwen2"}"#);
        let err = inspect(&other).unwrap_err();
        assert!(matches!(err, LoadError::Unsupported(_)), "{err}");
        assert!(err.to_string().contains("qwen2"), "{err}");
        assert!(err.is_usage());

        let gguf = bert.join("model.gguf");
        std::fs::write(&gguf, b"GGUF\x03\0\0\0").unwrap();
        assert_eq!(inspect(&gguf).unwrap(), ModelKind::Llama);

        let missing = inspect(Path::new("/nonexistent/sluice-model")).unwrap_err();
        assert!(missing.is_usage(), "{missing}");
        for dir in [bert, arch, llama, other] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
