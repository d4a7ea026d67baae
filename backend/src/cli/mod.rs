//! What did the command line ask for? Which engine answers requests ([`EngineKind`]), on
//! which device it would run ([`DeviceChoice`]), and which models it serves under which
//! names ([`model_spec`]).
//!
//! The native engine serves BERT embedding models and Llama decoders on the CPU or on an
//! NVIDIA GPU (`cuda:N`); `auto` takes the first GPU when one can be used. A choice is only
//! parsed here: whether a GPU is there is [`crate::device`]'s question, asked at start-up.

pub mod model_spec;

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// Deterministic simulated replies and embeddings; loads no weights.
    Sim,
    /// Real models from local files (this build: BERT embedding models from safetensors;
    /// Llama, Mistral and Qwen2 chat models from GGUF or Hugging Face folders).
    Native,
}

impl EngineKind {
    pub fn label(self) -> &'static str {
        match self {
            EngineKind::Sim => "sim",
            EngineKind::Native => "native",
        }
    }
}

/// `--device auto|cpu|cuda:N`: where the command line asks the native engine to run, before
/// `auto` is resolved into a [`crate::device::Target`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The first GPU if one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda(u32),
}

/// A `--device` value that names no device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a device: use auto, cpu or cuda:N")]
pub struct DeviceChoiceError(String);

impl FromStr for DeviceChoice {
    type Err = DeviceChoiceError;

    fn from_str(arg: &str) -> Result<Self, Self::Err> {
        match arg {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            // Bare `cuda` means the first GPU, as in most inference servers.
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => arg
                .strip_prefix("cuda:")
                .and_then(|ordinal| ordinal.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| DeviceChoiceError(arg.to_owned())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print_back() {
        for arg in ["auto", "cpu", "cuda:0", "cuda:3"] {
            assert_eq!(arg.parse::<DeviceChoice>().unwrap().to_string(), arg);
        }
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            assert!(bad.parse::<DeviceChoice>().is_err(), "{bad}");
        }
    }
}
