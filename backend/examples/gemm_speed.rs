//! What the CPU's matrix products achieve, in GFLOP/s, for docs/benchmarks.md:
//!
//!     cargo run --release -p sluice-backend --example gemm_speed
//!
//! Dense f32 products through `matrixmultiply` (the BERT path, `Device::linear`), at
//! MiniLM's feed-forward shape and a larger square one, and products over Q4_1 weights
//! decoded band by band (the Llama path, `Device::matmul`), at the shapes SmolLM2-135M runs:
//! one row (a lone decode), 16 (a batch of decodes) and 128 (a prompt chunk), against its
//! feed-forward weight (1536 × 576), both ways: dot products (what generated tokens use) and
//! GEMM over decoded tiles (what prompt tokens use). The machine's peak is cores × GHz × 32 (two 8-wide
//! fused multiply-adds per cycle with AVX2 and FMA).

use std::time::Instant;

use sluice_backend::device::cpu::Cpu;
use sluice_backend::device::Device;
use sluice_backend::quant::{GgmlType, QMatrix};

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Runs `f` until a second has passed and returns GFLOP/s for `flops` per run.
fn rate(flops: f64, mut f: impl FnMut()) -> f64 {
    f();
    let started = Instant::now();
    let mut runs = 0u32;
    while started.elapsed().as_secs_f64() < 1.0 {
        f();
        runs += 1;
    }
    flops * f64::from(runs) / started.elapsed().as_secs_f64() / 1e9
}

fn main() -> anyhow::Result<()> {
    let cpu = Cpu;
    println!("threads: {}", rayon::current_num_threads());
    for (m, k, n) in [(128, 384, 1536), (512, 1024, 1024)] {
        let x = cpu.upload(&values(m * k, 1), &[m, k])?;
        let w = cpu.upload(&values(n * k, 2), &[n, k])?;
        let gflops = rate(2.0 * (m * k * n) as f64, || {
            cpu.linear(&x, &w, None).expect("linear");
        });
        println!("dense f32 {m}×{k} · ({n}×{k})ᵀ: {gflops:.1} GFLOP/s");
    }
    let (n, k) = (1536, 576);
    let blocks = n * k / 32;
    let mut bytes = Vec::with_capacity(blocks * 20);
    for (i, v) in values(blocks * 20, 3).iter().enumerate() {
        // Small finite f16 scales and offsets; any nibbles.
        bytes.push(match i % 20 {
            1 | 3 => 0x20,
            _ => (v.to_bits() >> 8) as u8,
        });
    }
    let q = cpu.upload_matrix(QMatrix::new(GgmlType::Q4_1, n, k, bytes))?;
    for m in [1, 16, 128] {
        let x = cpu.upload(&values(m * k, 4), &[m, k])?;
        for (path, prompt) in [("dot products", false), ("GEMM", true)] {
            let kinds = vec![prompt; m];
            let gflops = rate(2.0 * (m * k * n) as f64, || {
                cpu.matmul(&x, &q, &kinds).expect("matmul");
            });
            println!("Q4_1 {m}×{k} · ({n}×{k})ᵀ by {path}: {gflops:.1} GFLOP/s");
        }
    }
    Ok(())
}
