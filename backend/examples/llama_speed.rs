//! Prefill and decode speed of the native Llama engine on the CPU, for docs/benchmarks.md:
//!
//!     cargo run --release -p sluice-backend --example llama_speed -- MODEL.gguf [SEQUENCES]
//!
//! Prefills SEQUENCES (default 1) copies of a 128-token prompt one at a time, then decodes
//! 32 tokens for all of them together, one batched step per token, and prints tokens per
//! second for each phase. Greedy, so the work does not depend on a seed.

use std::time::Instant;

use sluice_backend::native::cpu::Cpu;
use sluice_backend::native::gguf::Gguf;
use sluice_backend::native::llama::{Llama, Logits, SeqCache, Step};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = std::path::PathBuf::from(
        args.next()
            .expect("usage: llama_speed MODEL.gguf [SEQUENCES]"),
    );
    let n: usize = args.next().map_or(Ok(1), |s| s.parse())?;
    let (prompt_len, decode) = (128usize, 32usize);
    let gguf = Gguf::open(&path)?;
    let model = Llama::load(Cpu, &gguf, &path)?;
    drop(gguf);
    let vocab = model.config().vocab_size as u32;
    let block = 16;
    let mut cache = model.new_cache(n * (prompt_len + decode).div_ceil(block), block)?;
    let mut seqs: Vec<SeqCache> = (0..n).map(|_| SeqCache::default()).collect();
    // Ordinary tokens (ids past the 17 control ones), different per sequence.
    let prompt = |s: usize| -> Vec<u32> {
        (0..prompt_len)
            .map(|i| 17 + ((i * 7919 + s * 104_729) as u32 % (vocab - 17)))
            .collect()
    };
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            )
            .0 as u32
    };

    let started = Instant::now();
    let mut next = Vec::with_capacity(n);
    for (s, seq) in seqs.iter_mut().enumerate() {
        let tokens = prompt(s);
        assert!(cache.reserve(seq, tokens.len()));
        let logits = model.forward(
            &mut cache,
            &mut [Step {
                seq,
                tokens: &tokens,
                generated: 0,
            }],
            Logits::Last,
        )?;
        next.push(argmax(logits.data()));
    }
    let prefill = started.elapsed().as_secs_f64();

    let started = Instant::now();
    for _ in 0..decode {
        let inputs: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut steps: Vec<Step<'_>> = seqs
            .iter_mut()
            .zip(&inputs)
            .map(|(seq, tokens)| {
                assert!(cache.reserve(seq, 1));
                Step {
                    seq,
                    tokens,
                    generated: 1,
                }
            })
            .collect();
        let logits = model.forward(&mut cache, &mut steps, Logits::Last)?;
        next = logits
            .data()
            .chunks_exact(vocab as usize)
            .map(argmax)
            .collect();
    }
    let decoding = started.elapsed().as_secs_f64();
    println!(
        "{n} sequence(s): prefill {:.0} tokens/s ({} tokens in {prefill:.2} s), decode {:.1} tokens/s ({} steps in {decoding:.2} s)",
        (n * prompt_len) as f64 / prefill,
        n * prompt_len,
        (n * decode) as f64 / decoding,
        decode
    );
    Ok(())
}
