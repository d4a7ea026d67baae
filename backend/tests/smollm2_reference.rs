//! The native Llama engine's forward pass on real weights (SmolLM2-135M-Instruct, Q4_1 GGUF)
//! against an independent implementation, scripts/smollm2_reference.py: llama.cpp's `gguf`
//! package dequantising every weight, numpy multiplying whole float32 matrices, jinja2 for
//! the chat template, Hugging Face's `tokenizers` for the tokens, and no key/value cache.
//!
//! The weights come from scripts/fetch-weights.sh through `SLUICE_SMOLLM2_GGUF`, the Python
//! packages from scripts/test.sh's .venv. Without the weights these tests say so and pass,
//! except under `CI=true`, where a missing model is a broken setup and fails them.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use sluice_backend::device::cpu::Cpu;
use sluice_backend::device::Device;
use sluice_backend::engine::sampling::argmax;
use sluice_backend::kv_cache::{KvCache, SeqCache};
use sluice_backend::model::gguf::Gguf;
use sluice_backend::model::llama::{Llama, Logits, Step};
use sluice_backend::model::tokenizer::{ChatMessage, LlamaTokenizer};

/// Greedy tokens compared per chat: enough to cover a short answer.
const GREEDY_TOKENS: usize = 10;

/// Small blocks, so that every sequence spans several, not in order.
const BLOCK_SIZE: usize = 16;
const BLOCKS: usize = 64;

/// Largest difference allowed between a logit here and the reference's. Both sum in
/// float32 in different orders over 30 layers (measured: 1e-4 at most, on logits of size
/// ~10-30); the issue asks for 1e-3.
const LOGIT_TOLERANCE: f32 = 1e-3;

struct Reference {
    prompt: String,
    tokens: Vec<u32>,
    greedy: Vec<u32>,
    /// `[tokens, vocab]`, row-major.
    logits: Vec<f32>,
}

fn reference(gguf: &Path, chats: &Value) -> Vec<Reference> {
    let out = std::env::temp_dir().join(format!("sluice-smollm2-ref-{}", std::process::id()));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/smollm2_reference.py"
    );
    let mut child = Command::new(common::python())
        .arg(script)
        .arg(gguf)
        .arg(&out)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run scripts/smollm2_reference.py");
    let request = json!({"chats": chats, "greedy_tokens": GREEDY_TOKENS});
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        request.to_string().as_bytes(),
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "scripts/smollm2_reference.py failed ({}); it needs numpy, gguf, jinja2 and tokenizers \
         (scripts/test.sh installs them into .venv)",
        output.status
    );
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect()
    };
    let refs = answer["chats"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, chat)| {
            let bytes = std::fs::read(out.join(format!("logits-{i}.f32"))).unwrap();
            Reference {
                prompt: chat["prompt"].as_str().unwrap().to_owned(),
                tokens: ids(&chat["tokens"]),
                greedy: ids(&chat["greedy"]),
                logits: bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            }
        })
        .collect();
    std::fs::remove_dir_all(&out).ok();
    refs
}

/// One sequence's step, on its own, downloaded.
fn run(
    model: &Llama<Cpu>,
    cache: &mut KvCache<Vec<f32>>,
    seq: &mut SeqCache,
    tokens: &[u32],
    generated: usize,
    logits: Logits,
) -> Vec<f32> {
    let out = model
        .forward(
            cache,
            &mut [Step {
                seq,
                tokens,
                generated,
                outputs: 1,
            }],
            logits,
        )
        .unwrap();
    model.device().download(&out).unwrap()
}

#[test]
fn chat_logits_and_greedy_tokens_match_an_independent_numpy_reference() {
    let Some(path) = common::smollm2_weights() else {
        return;
    };
    let chats = json!([
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You answer in one short sentence."},
         {"role": "user", "content": "How many legs does a spider have? Answer with 8 or 6."}],
        [{"role": "user", "content": "Write a haiku about rust and water, 2024 edition."}],
    ]);
    let refs = reference(&path, &chats);

    let gguf = Gguf::open(&path).unwrap();
    let tokenizer = LlamaTokenizer::from_gguf(&gguf).unwrap();
    let model = Llama::load(Cpu, &gguf, &path).unwrap();
    drop(gguf);
    let vocab = model.config().vocab_size;

    for (chat, want) in chats.as_array().unwrap().iter().zip(&refs) {
        let messages: Vec<ChatMessage<'_>> = chat
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage {
                role: m["role"].as_str().unwrap(),
                content: m["content"].as_str().unwrap(),
            })
            .collect();
        let prompt = tokenizer.apply_chat_template(&messages).unwrap();
        assert_eq!(prompt, want.prompt, "chat template");
        let tokens = tokenizer.encode(&prompt).unwrap();
        assert_eq!(tokens, want.tokens, "tokens of {prompt:?}");

        let mut cache = model.new_cache(BLOCKS, BLOCK_SIZE).unwrap();
        let mut seq = SeqCache::default();
        assert!(cache.reserve(&mut seq, tokens.len()));
        let logits = run(&model, &mut cache, &mut seq, &tokens, 0, Logits::All);
        assert_eq!(logits.len(), want.logits.len(), "[tokens, {vocab}]");
        let mut worst = 0.0f32;
        for (pos, (got, exp)) in logits
            .chunks_exact(vocab)
            .zip(want.logits.chunks_exact(vocab))
            .enumerate()
        {
            let diff = got
                .iter()
                .zip(exp)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            worst = worst.max(diff);
            assert!(
                diff <= LOGIT_TOLERANCE,
                "position {pos} of {prompt:?}: logits differ by up to {diff}"
            );
            assert_eq!(
                argmax(got),
                argmax(exp),
                "position {pos} of {prompt:?}: a different most likely next token"
            );
        }
        eprintln!(
            "{} tokens: largest logit difference {worst:.2e}",
            tokens.len()
        );

        // The same prompt in two chunks as a second sequence in the cache, asking for the
        // last logits only (as a chunked prefill does), gives the same last row: every row's arithmetic
        // is independent of how many others run with it.
        let mut chunked = SeqCache::default();
        assert!(cache.reserve(&mut chunked, tokens.len()));
        let (first, second) = tokens.split_at(tokens.len() / 2);
        run(&model, &mut cache, &mut chunked, first, 0, Logits::Last);
        let last = run(&model, &mut cache, &mut chunked, second, 0, Logits::Last);
        assert_eq!(chunked.len(), tokens.len());
        assert!(
            last == logits[logits.len() - vocab..],
            "chunked prefill changed the last position's logits"
        );

        // Greedy decoding one token at a time through the cache, which the reference does
        // not have: it recomputes the whole sequence at every step.
        let eos = tokenizer.eos.expect("an end-of-turn token");
        let mut next = argmax(&logits[logits.len() - vocab..]);
        let mut greedy = Vec::new();
        while greedy.len() < GREEDY_TOKENS {
            greedy.push(next);
            if next == eos {
                break;
            }
            assert!(cache.reserve(&mut seq, 1));
            let step = run(&model, &mut cache, &mut seq, &[next], 1, Logits::Last);
            next = argmax(&step);
        }
        assert_eq!(
            greedy,
            want.greedy,
            "greedy continuation of {prompt:?}: {:?} vs the reference's {:?}",
            tokenizer.decode(&greedy),
            tokenizer.decode(&want.greedy)
        );
        eprintln!(
            "{:?} -> {:?}",
            messages.last().map(|m| m.content),
            tokenizer.decode(&greedy)
        );
    }

    // All chats in one cache, joining one step apart and leaving when done: each step runs
    // the newcomer's whole prompt alongside the others' single generated tokens, and blocks
    // freed by one sequence are reused by the others. Their greedy tokens do not change.
    let eos = tokenizer.eos.expect("an end-of-turn token");
    let n = refs.len();
    let mut cache = model.new_cache(BLOCKS, BLOCK_SIZE).unwrap();
    let mut seqs: Vec<SeqCache> = (0..n).map(|_| SeqCache::default()).collect();
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut done = vec![false; n];
    let mut step = 0;
    while done.contains(&false) {
        let inputs: Vec<(usize, Vec<u32>)> = (0..n.min(step + 1))
            .filter(|&i| !done[i])
            .map(|i| match generated[i].last() {
                None => (i, refs[i].tokens.clone()),
                Some(&t) => (i, vec![t]),
            })
            .collect();
        for (i, tokens) in &inputs {
            assert!(cache.reserve(&mut seqs[*i], tokens.len()));
        }
        let mut steps: Vec<Step<'_>> = seqs
            .iter_mut()
            .enumerate()
            .filter_map(|(i, seq)| {
                let (_, tokens) = inputs.iter().find(|(j, _)| *j == i)?;
                let generated = usize::from(!generated[i].is_empty());
                Some(Step {
                    seq,
                    tokens,
                    generated,
                    outputs: 1,
                })
            })
            .collect();
        let logits = model
            .device()
            .download(&model.forward(&mut cache, &mut steps, Logits::Last).unwrap())
            .unwrap();
        drop(steps);
        for ((i, _), row) in inputs.iter().zip(logits.chunks_exact(vocab)) {
            let token = argmax(row);
            generated[*i].push(token);
            if token == eos || generated[*i].len() == GREEDY_TOKENS {
                done[*i] = true;
                cache.release(&mut seqs[*i]);
            }
        }
        step += 1;
    }
    assert_eq!(cache.free_blocks(), BLOCKS);
    for (got, want) in generated.iter().zip(&refs) {
        assert_eq!(
            got, &want.greedy,
            "batched greedy continuation of {:?}",
            want.prompt
        );
    }

    let france = tokenizer.decode(&refs[0].greedy);
    assert!(france.contains("Paris"), "{france:?}");
}
