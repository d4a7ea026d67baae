//! The Llama family's relatives run as their own code says they should: Llama 3's rotary
//! frequency scaling, Qwen2's query/key/value biases (and its GGUF files' rotate-half rows),
//! Llama's `attention_bias`, and Mistral's sliding window. For each, a small model with
//! random weights is written by scripts/decoder_families_reference.py, an independent numpy
//! implementation in Hugging Face's conventions, which also computes its logits for a prompt
//! and a greedy continuation; loaded here from the Hugging Face folder (and from the GGUF
//! file where llama.cpp has one for the family), the native engine must give logits within
//! 1e-3 of the reference and the same greedy tokens.

mod common;

use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use sluice_backend::device::cpu::Cpu;
use sluice_backend::engine::scheduler::{Event, Scheduler};
use sluice_backend::model::gguf::Gguf;
use sluice_backend::model::llama::{Llama, Logits};
use sluice_backend::test_tools::requests;

#[derive(Deserialize)]
struct Reference {
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    vocab: usize,
}

/// Writes `family`'s model into `dir` and returns what the reference computed, or `None`
/// (said, and a failure under CI) when the script's Python packages are missing.
fn reference(family: &str, dir: &Path) -> Option<(Reference, Vec<f32>)> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/decoder_families_reference.py"
    );
    let out = Command::new(common::python())
        .arg(script)
        .arg(family)
        .arg(dir)
        .output()
        .expect("run scripts/decoder_families_reference.py");
    let ran = common::present(
        out.status.success(),
        &format!(
            "scripts/decoder_families_reference.py {family} failed (it needs numpy, \
             safetensors and gguf: scripts/test.sh installs them into .venv): {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    );
    if !ran {
        return None;
    }
    let reference: Reference = serde_json::from_slice(&out.stdout).unwrap();
    let logits = std::fs::read(dir.join("logits.f32"))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Some((reference, logits))
}

/// The model's greedy continuation of `prompt`, through the engine's scheduler (prompt in
/// chunks, then one token per step).
fn greedy(model: &Llama<Cpu>, prompt: &[u32], tokens: usize) -> Vec<u32> {
    let mut scheduler = Scheduler::new(model, 16, 16, 20, None).unwrap();
    scheduler.add(requests::greedy(0, prompt.to_vec(), tokens));
    let mut out = Vec::new();
    while !scheduler.is_idle() {
        for event in scheduler.step().unwrap() {
            if let Event::Token { token, .. } = event {
                out.push(token);
            }
        }
    }
    out
}

/// `model` against the reference: every logit within 1e-3, the same greedy tokens.
fn check(family: &str, source: &str, model: &Llama<Cpu>, reference: &Reference, want: &[f32]) {
    let got = common::one_pass(model, &reference.prompt, 0, Logits::All);
    assert_eq!(got.len(), reference.prompt.len() * reference.vocab);
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-3,
        "{family} from {source}: logits up to {worst} from the reference"
    );
    assert_eq!(
        greedy(model, &reference.prompt, reference.greedy.len()),
        reference.greedy,
        "{family} from {source}: greedy tokens"
    );
}

fn family(name: &str, gguf: bool) -> Option<Llama<Cpu>> {
    let dir = tempfile::tempdir().unwrap();
    let (reference, want) = reference(name, dir.path())?;
    let model = Llama::load_safetensors(Cpu, &dir.path().join("hf")).unwrap();
    check(name, "its Hugging Face folder", &model, &reference, &want);
    if gguf {
        let path = dir.path().join("model.gguf");
        let file = Gguf::open(&path).unwrap();
        let from_gguf = Llama::load(Cpu, &file, &path).unwrap();
        check(name, "its GGUF file", &from_gguf, &reference, &want);
        assert_eq!(
            from_gguf.config().rope_divisors,
            model.config().rope_divisors
        );
    }
    Some(model)
}

#[test]
fn llama3_frequency_scaling_matches_the_reference() {
    let Some(model) = family("llama3", true) else {
        return;
    };
    // Scaling is in play: the slowest pairs turn 8× slower, the fastest not at all, and
    // some in between.
    let divisors = &model.config().rope_divisors;
    assert_eq!(divisors.first(), Some(&1.0));
    assert_eq!(divisors.last(), Some(&8.0));
    assert!(divisors.iter().any(|&d| d > 1.0 && d < 8.0), "{divisors:?}");
}

#[test]
fn qwen2_with_biases_and_a_tied_head_matches_the_reference() {
    family("qwen2", true);
}

#[test]
fn llama_with_attention_biases_matches_the_reference() {
    family("llama-bias", false);
}

#[test]
fn mistral_is_served_within_its_sliding_window() {
    let Some(model) = family("mistral", false) else {
        return;
    };
    // A window narrower than the context caps it: every served position sees all before it.
    assert_eq!(model.config().context_length, 512);
}
