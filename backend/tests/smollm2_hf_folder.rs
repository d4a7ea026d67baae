//! A Llama decoder from a Hugging Face folder is the same model as from its GGUF file.
//!
//! scripts/gguf_to_hf.py (llama.cpp's `gguf` package and Hugging Face's `tokenizers`, no code
//! shared with the backend) turns SmolLM2's GGUF into a Hugging Face folder: config.json,
//! model.safetensors with Hugging Face's names and its rotate-half query/key layout, and
//! tokenizer.json. Loaded from an F32 folder, every weight is the GGUF's dequantised value,
//! so the logits must be the very same bits; from a BF16 folder (rounded weights) the greedy
//! answer must still be right. The tokenizer and chat template read from the folder must
//! give the GGUF's token ids.

mod common;

use std::path::Path;
use std::process::Command;

use sluice_backend::device::cpu::Cpu;
use sluice_backend::engine::sampling::argmax;
use sluice_backend::model::gguf::Gguf;
use sluice_backend::model::llama::{Llama, Logits};
use sluice_backend::model::tokenizer::{ChatMessage, LlamaTokenizer};

/// Converts `gguf` into a fresh Hugging Face folder of `dtype` weights.
fn convert(gguf: &Path, dtype: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/gguf_to_hf.py");
    let status = Command::new(common::python())
        .arg(script)
        .arg(gguf)
        .arg(dir.path())
        .args(["--dtype", dtype])
        .status()
        .expect("run scripts/gguf_to_hf.py");
    assert!(
        status.success(),
        "scripts/gguf_to_hf.py failed ({status}); it needs numpy, gguf and tokenizers \
         (scripts/test.sh installs them into .venv)"
    );
    dir
}

/// The last position's logits for `tokens`, run as one prompt.
fn last_logits(model: &Llama<Cpu>, tokens: &[u32]) -> Vec<f32> {
    common::one_pass(model, tokens, 0, Logits::Last)
}

/// Greedy continuation of `prompt`, `count` tokens or up to `eos`.
fn greedy(model: &Llama<Cpu>, prompt: &[u32], count: usize, eos: Option<u32>) -> Vec<u32> {
    let mut tokens = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..count {
        let logits = last_logits(model, &tokens);
        let next = argmax(&logits);
        if Some(next) == eos {
            break;
        }
        out.push(next);
        tokens.push(next);
    }
    out
}

fn chat_prompt(tokenizer: &LlamaTokenizer, question: &str) -> Vec<u32> {
    let text = tokenizer
        .apply_chat_template(&[ChatMessage {
            role: "user",
            content: question,
        }])
        .unwrap();
    tokenizer.encode(&text).unwrap()
}

#[test]
fn an_f32_folder_gives_the_gguf_logits_bit_for_bit_and_a_bf16_one_still_answers() {
    let Some(path) = common::smollm2_weights() else {
        return;
    };
    let gguf = Gguf::open(&path).unwrap();
    let gguf_tokenizer = LlamaTokenizer::from_gguf(&gguf).unwrap();
    let gguf_model = Llama::load(Cpu, &gguf, &path).unwrap();
    drop(gguf);

    let f32_dir = convert(&path, "f32");
    let hf_tokenizer = LlamaTokenizer::from_folder(f32_dir.path()).unwrap();
    for text in [
        "What is the capital of France?",
        "Numbers 12345 and 3.14, tabs\tand  spaces, accents café, emoji 🦀, <|im_end|> inline",
    ] {
        assert_eq!(
            hf_tokenizer.encode(text).unwrap(),
            gguf_tokenizer.encode(text).unwrap(),
            "{text}"
        );
    }
    assert_eq!(
        (hf_tokenizer.bos, hf_tokenizer.eos, hf_tokenizer.add_bos),
        (
            gguf_tokenizer.bos,
            gguf_tokenizer.eos,
            gguf_tokenizer.add_bos
        )
    );
    let question = "What is the capital of France?";
    let prompt = chat_prompt(&gguf_tokenizer, question);
    assert_eq!(chat_prompt(&hf_tokenizer, question), prompt);

    let hf_model = Llama::load_safetensors(Cpu, f32_dir.path()).unwrap();
    assert_eq!(hf_model.config(), gguf_model.config());
    let want = last_logits(&gguf_model, &prompt);
    let got = last_logits(&hf_model, &prompt);
    assert!(want == got, "F32 folder logits differ from the GGUF's");
    drop((hf_model, f32_dir));

    let bf16_dir = convert(&path, "bf16");
    let bf16_model = Llama::load_safetensors(Cpu, bf16_dir.path()).unwrap();
    let answer = greedy(&bf16_model, &prompt, 12, hf_tokenizer.eos);
    let text = hf_tokenizer.decode(&answer);
    assert!(text.contains("Paris"), "{text:?}");
}
