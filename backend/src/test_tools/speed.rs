//! How fast does a decoder prefill and decode on its device? Measured in process: the
//! measurement behind `examples/llama_speed.rs` (the CPU figures) and
//! `examples/gpu_check.rs` (the GPU ones), so both report the same thing.
//!
//! `sequences` prompts of `prompt_len` ordinary tokens are prefilled together in one forward
//! pass, then `decode` greedy tokens are decoded for all of them, one batched step per
//! token, each step downloading its logits as the engine does. Greedy, so the work does not
//! depend on a seed; a short warm-up pass first, so that no one-off start-up cost (a GPU's
//! first launches, cuBLAS's set-up) is timed.

use std::time::Instant;

use crate::device::{Device, DeviceError};
use crate::engine::sampling::argmax;
use crate::kv_cache::SeqCache;
use crate::model::llama::{Llama, Logits, Step};

/// Positions per cache block, as the engine uses.
const BLOCK_SIZE: usize = 16;
/// Token ids below this are control tokens in SmolLM2's vocabulary; prompts avoid them.
const FIRST_ORDINARY_TOKEN: usize = 17;

/// One measurement.
#[derive(Debug, Clone, Copy)]
pub struct Speed {
    pub sequences: usize,
    pub prompt_len: usize,
    pub prefill_seconds: f64,
    pub decode_steps: usize,
    pub decode_seconds: f64,
}

impl Speed {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        (self.sequences * self.prompt_len) as f64 / self.prefill_seconds
    }

    pub fn decode_tokens_per_second(&self) -> f64 {
        (self.sequences * self.decode_steps) as f64 / self.decode_seconds
    }
}

impl std::fmt::Display for Speed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} sequence(s): prefill {:.0} tokens/s ({} tokens in {:.3} s), decode {:.1} tokens/s ({} steps in {:.3} s)",
            self.sequences,
            self.prefill_tokens_per_second(),
            self.sequences * self.prompt_len,
            self.prefill_seconds,
            self.decode_tokens_per_second(),
            self.decode_steps,
            self.decode_seconds
        )
    }
}

/// Measures `model` on `sequences` sequences (see the module's comment).
pub fn measure<D: Device>(
    model: &Llama<D>,
    sequences: usize,
    prompt_len: usize,
    decode: usize,
) -> Result<Speed, DeviceError> {
    let vocab = model.config().vocab_size;
    let per_sequence = (prompt_len + decode).div_ceil(BLOCK_SIZE);
    let mut cache = model.new_cache(sequences * per_sequence + 1, BLOCK_SIZE)?;
    // Different ordinary tokens per sequence, the same on every run.
    let prompt = |s: usize| -> Vec<u32> {
        (0..prompt_len)
            .map(|i| {
                (FIRST_ORDINARY_TOKEN + (i * 7919 + s * 104_729) % (vocab - FIRST_ORDINARY_TOKEN))
                    as u32
            })
            .collect()
    };

    let mut warm = SeqCache::default();
    assert!(cache.reserve(&mut warm, 8));
    let tokens = prompt(sequences)[..8.min(prompt_len)].to_vec();
    let steps = &mut [Step {
        seq: &mut warm,
        tokens: &tokens,
        generated: 0,
        outputs: 1,
    }];
    model
        .device()
        .download(&model.forward(&mut cache, steps, Logits::Last)?)?;
    cache.release(&mut warm);

    let prompts: Vec<Vec<u32>> = (0..sequences).map(prompt).collect();
    let mut seqs: Vec<SeqCache> = (0..sequences).map(|_| SeqCache::default()).collect();
    let started = Instant::now();
    let mut steps: Vec<Step<'_>> = seqs
        .iter_mut()
        .zip(&prompts)
        .map(|(seq, tokens)| {
            assert!(cache.reserve(seq, tokens.len()));
            Step {
                seq,
                tokens,
                generated: 0,
                outputs: 1,
            }
        })
        .collect();
    let logits = model.forward(&mut cache, &mut steps, Logits::Last)?;
    let mut next = argmax_rows(&model.device().download(&logits)?, vocab);
    let prefill_seconds = started.elapsed().as_secs_f64();

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
                    outputs: 1,
                }
            })
            .collect();
        let logits = model.forward(&mut cache, &mut steps, Logits::Last)?;
        next = argmax_rows(&model.device().download(&logits)?, vocab);
    }
    Ok(Speed {
        sequences,
        prompt_len,
        prefill_seconds,
        decode_steps: decode,
        decode_seconds: started.elapsed().as_secs_f64(),
    })
}

/// The greedy token of each row of `[rows, vocab]` logits.
pub fn argmax_rows(logits: &[f32], vocab: usize) -> Vec<u32> {
    logits.chunks_exact(vocab).map(argmax).collect()
}
