//! What this machine's GPU can take, for backend/gpu-check.sh:
//!
//!     cargo run --release -p sluice-backend --example cuda_check -- [ORDINAL]
//!
//! Probes the GPU (driver, NVRTC, cuBLAS), compiles every kernel for its architecture, loads
//! them into a context on it and looks up every entry point. Exits 1 with the reason when
//! any step fails.

use std::process::ExitCode;

use sluice_backend::device::cuda::kernels::{self, ENTRY_POINTS, KERNELS};

fn main() -> ExitCode {
    let ordinal = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(0);
    match kernels::load_kernels(ordinal) {
        Ok(gpu) => {
            println!(
                "cuda:{ordinal}: {} (compute {}.{}): {} kernel sources compiled for {} and loaded, {} entry points found",
                gpu.name,
                gpu.compute_capability.0,
                gpu.compute_capability.1,
                KERNELS.len(),
                gpu.arch(),
                ENTRY_POINTS.len()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("cuda:{ordinal}: {err}");
            ExitCode::FAILURE
        }
    }
}
