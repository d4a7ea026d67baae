//! Which engine answers requests, and on which device it would run.
//!
//! The native engine serves BERT embedding models and Llama decoders on the CPU or on an
//! NVIDIA GPU (`cuda:N`); `auto` takes the first GPU when one can be used.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// Deterministic simulated replies and embeddings; loads no weights.
    Sim,
    /// Real models from local files (this build: BERT embedding models from safetensors,
    /// Llama-family chat models from GGUF).
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

/// `--device auto|cpu|cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The first GPU if one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a device: use auto, cpu or cuda:N")]
pub struct DeviceError(String);

impl FromStr for Device {
    type Err = DeviceError;

    fn from_str(arg: &str) -> Result<Self, Self::Err> {
        match arg {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            // Bare `cuda` means the first GPU, as in most inference servers.
            "cuda" => Ok(Device::Cuda(0)),
            _ => arg
                .strip_prefix("cuda:")
                .and_then(|ordinal| ordinal.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| DeviceError(arg.to_owned())),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print_back() {
        for arg in ["auto", "cpu", "cuda:0", "cuda:3"] {
            assert_eq!(arg.parse::<Device>().unwrap().to_string(), arg);
        }
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            assert!(bad.parse::<Device>().is_err(), "{bad}");
        }
    }
}
