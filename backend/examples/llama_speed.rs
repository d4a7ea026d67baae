//! Prefill and decode speed of the native Llama engine, for docs/benchmarks.md:
//!
//!     cargo run --release -p sluice-backend --example llama_speed -- MODEL.gguf [SEQUENCES] [DEVICE]
//!
//! Prefills SEQUENCES (default 1) different 128-token prompts together, then decodes 32
//! tokens for all of them, one batched step per token, and prints tokens per second for each
//! phase (see `test_tools::speed`). DEVICE is `cpu` (the default) or `cuda:N`.

use sluice_backend::device::cpu::Cpu;
use sluice_backend::device::cuda::CudaDevice;
use sluice_backend::device::Device;
use sluice_backend::model::gguf::Gguf;
use sluice_backend::model::llama::Llama;
use sluice_backend::test_tools::speed;

fn run<D: Device>(device: D, path: &std::path::Path, sequences: usize) -> anyhow::Result<()> {
    let gguf = Gguf::open(path)?;
    let model = Llama::load(device, &gguf, path)?;
    drop(gguf);
    println!("{}", speed::measure(&model, sequences, 128, 32)?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let usage = "usage: llama_speed MODEL.gguf [SEQUENCES] [cpu|cuda:N]";
    let mut args = std::env::args().skip(1);
    let path = std::path::PathBuf::from(args.next().expect(usage));
    let sequences: usize = args.next().map_or(Ok(1), |s| s.parse())?;
    match args.next().as_deref() {
        None | Some("cpu") => run(Cpu, &path, sequences),
        Some(device) => {
            let ordinal = device
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("{usage}"))?;
            run(CudaDevice::new(ordinal)?, &path, sequences)
        }
    }
}
