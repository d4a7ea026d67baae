//! What the backend's model tests share: where the real weights are, and which Python runs
//! the independent references.

use std::path::{Path, PathBuf};

use sluice_backend::device::cpu::Cpu;
use sluice_backend::device::Device;
use sluice_backend::kv_cache::SeqCache;
use sluice_backend::model::gguf::Gguf;
use sluice_backend::model::llama::{Llama, Logits, Step};
use sluice_backend::model::tokenizer::{ChatMessage, LlamaTokenizer};

/// Whether what a test needs is here. If not, the test says so and passes, except under
/// `CI=true` (scripts/test.sh installs and fetches everything there), where a missing piece
/// is a broken setup and fails it.
pub fn present(found: bool, what: &str) -> bool {
    if found {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what}");
    }
    eprintln!("skipping: {what}");
    false
}

/// The SmolLM2-135M-Instruct GGUF file from `SLUICE_SMOLLM2_GGUF`, under [`present`]'s rule.
#[allow(dead_code)] // Not every test binary that includes this module runs SmolLM2.
pub fn smollm2_weights() -> Option<PathBuf> {
    let path = std::env::var_os("SLUICE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .filter(|p| p.is_file());
    let what = "SLUICE_SMOLLM2_GGUF does not name the SmolLM2-135M-Instruct GGUF file: run \
                `export SLUICE_SMOLLM2_GGUF=$(scripts/fetch-weights.sh SmolLM2-135M-Instruct)` \
                (scripts/test.sh does this)";
    present(path.is_some(), what);
    path
}

/// SmolLM2 on the CPU and its tokenizer, or `None` (said, and a failure under CI) without
/// the weights.
#[allow(dead_code)]
pub fn smollm2() -> Option<(Llama<Cpu>, LlamaTokenizer)> {
    let path = smollm2_weights()?;
    let gguf = Gguf::open(&path).unwrap();
    let tokenizer = LlamaTokenizer::from_gguf(&gguf).unwrap();
    let model = Llama::load(Cpu, &gguf, &path).unwrap();
    Some((model, tokenizer))
}

/// A conversation as the model's chat template turns it into tokens.
#[allow(dead_code)]
pub fn chat(tokenizer: &LlamaTokenizer, turns: &[(&str, &str)]) -> Vec<u32> {
    let messages: Vec<ChatMessage> = turns
        .iter()
        .map(|&(role, content)| ChatMessage { role, content })
        .collect();
    let prompt = tokenizer.apply_chat_template(&messages).unwrap();
    tokenizer.encode(&prompt).unwrap()
}

/// `tokens` through `model` in one pass on a cache of their own, the last `generated` of
/// them as generated tokens; the logits `which` asks for, downloaded.
#[allow(dead_code)]
pub fn one_pass(model: &Llama<Cpu>, tokens: &[u32], generated: usize, which: Logits) -> Vec<f32> {
    let mut cache = model.new_cache(tokens.len().div_ceil(16), 16).unwrap();
    let mut seq = SeqCache::default();
    assert!(cache.reserve(&mut seq, tokens.len()));
    let out = model
        .forward(
            &mut cache,
            &mut [Step {
                seq: &mut seq,
                tokens,
                generated,
                outputs: 1,
            }],
            which,
        )
        .unwrap();
    model.device().download(&out).unwrap()
}

/// SLUICE_TEST_PYTHON, else the repository's .venv, else python3.
#[allow(dead_code)] // Not every test binary that includes this module runs Python.
pub fn python() -> String {
    std::env::var("SLUICE_TEST_PYTHON").unwrap_or_else(|_| {
        let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
        if Path::new(venv).exists() {
            venv.to_owned()
        } else {
            "python3".to_owned()
        }
    })
}

/// The all-MiniLM-L6-v2 folder from `SLUICE_MINILM_DIR`, under [`present`]'s rule.
#[allow(dead_code)] // Not every test binary that includes this module embeds.
pub fn minilm_folder() -> Option<PathBuf> {
    let dir = std::env::var_os("SLUICE_MINILM_DIR")
        .map(PathBuf::from)
        .filter(|d| d.join("config.json").is_file());
    let what = "SLUICE_MINILM_DIR does not name the all-MiniLM-L6-v2 folder: run \
                `export SLUICE_MINILM_DIR=$(scripts/fetch-weights.sh all-MiniLM-L6-v2)` \
                (scripts/test.sh does this)";
    present(dir.is_some(), what);
    dir
}

/// Whether NVRTC loads (the `nvidia-cuda-nvrtc-cu12` package, which scripts/test.sh installs
/// into .venv and puts on LD_LIBRARY_PATH), under [`present`]'s rule.
#[allow(dead_code)] // Only the CUDA tests compile kernels.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library by name.
    let found = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    present(
        found,
        "libnvrtc.so.12 did not load: scripts/test.sh installs the nvidia-cuda-nvrtc-cu12 \
         package into .venv and puts its lib folder on LD_LIBRARY_PATH",
    )
}
