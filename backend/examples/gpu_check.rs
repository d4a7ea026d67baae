//! The CUDA device checked against the CPU on a machine with an NVIDIA GPU, and timed there;
//! run by backend/gpu-check.sh, which keeps its report:
//!
//!     gpu_check SMOLLM2.gguf MINILM_DIR [ORDINAL]
//!
//! 1. Every operation of the `Device` trait on random inputs, the GPU against the CPU, each
//!    within its stated tolerance; and a row's product alone against the same row in a
//!    batch, on the GPU, to the bit (`test_tools::device_check`).
//! 2. SmolLM2's greedy replies to a set of chats: the GPU's must be the CPU's, and the GPU's
//!    the same whether each chat runs alone or all run together through a cache small
//!    enough to force chunked prompts and preemption.
//! 3. MiniLM's embeddings of a set of sentences: GPU against CPU, cosine at least 0.9999.
//! 4. Speed: the GPU's memory bandwidth (a large element-wise add), then SmolLM2's prefill
//!    and decode at 1, 16 and 64 sequences, with decode at one sequence set against the
//!    bandwidth limit (every weight byte read once per token).
//!
//! Prints a Markdown report on stdout and exits 1 if any check fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use sluice_backend::device::cpu::Cpu;
use sluice_backend::device::cuda::CudaDevice;
use sluice_backend::device::Device;
use sluice_backend::engine::scheduler::{Event, Scheduler};
use sluice_backend::model::bert::{cosine, Bert, BertConfig};
use sluice_backend::model::gguf::Gguf;
use sluice_backend::model::llama::Llama;
use sluice_backend::model::tokenizer::{ChatMessage, LlamaTokenizer};
use sluice_backend::model::weights::Weights;
use sluice_backend::test_tools::device_check;
use sluice_backend::test_tools::requests;
use sluice_backend::test_tools::speed;

const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Name a colour of the sky.",
    "What is 12 + 30?",
    "Write one word that rhymes with cat.",
    "Who wrote Hamlet?",
    "How many days are in a week?",
    "Give me a fruit that is yellow.",
    "Explain in two sentences why the sea is salty.",
];
const SENTENCES: [&str; 5] = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "Sluice meters every token it serves.",
    "Paris is the capital of France, and its largest city.",
];
const MAX_TOKENS: usize = 24;
const BLOCK_SIZE: usize = 16;
const MIN_COSINE: f64 = 0.9999;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(smollm2), Some(minilm)) = (args.first(), args.get(1)) else {
        eprintln!("usage: gpu_check SMOLLM2.gguf MINILM_DIR [ORDINAL]");
        return ExitCode::from(2);
    };
    let ordinal = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(0);
    let mut report = Report::default();
    if let Err(err) = run(Path::new(smollm2), Path::new(minilm), ordinal, &mut report) {
        report.fail(format!("stopped: {err:#}"));
    }
    println!(
        "\n**{}**",
        if report.failures == 0 {
            "Every check passed.".to_owned()
        } else {
            format!("{} check(s) failed.", report.failures)
        }
    );
    if report.failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Lines printed as they come (a run cut short still shows what it did) and a failure count.
#[derive(Default)]
struct Report {
    failures: usize,
}

impl Report {
    fn line(&self, text: impl AsRef<str>) {
        println!("{}", text.as_ref());
    }

    fn check(&mut self, passed: bool, text: impl AsRef<str>) {
        if !passed {
            self.failures += 1;
        }
        println!(
            "- {} {}",
            if passed { "PASS" } else { "FAIL" },
            text.as_ref()
        );
    }

    fn fail(&mut self, text: impl AsRef<str>) {
        self.check(false, text);
    }
}

fn run(smollm2: &Path, minilm: &Path, ordinal: usize, report: &mut Report) -> anyhow::Result<()> {
    let gpu = CudaDevice::new(ordinal)?;
    let info = gpu.gpu().clone();
    report.line(format!(
        "# GPU check: {} (cuda:{ordinal}, compute {}.{})\n",
        info.name, info.compute_capability.0, info.compute_capability.1
    ));

    report.line("## Operations, GPU against CPU\n");
    let started = Instant::now();
    for c in device_check::compare(&Cpu, &gpu, 2026)? {
        let exact = if c.error == 0.0 { " (bit-exact)" } else { "" };
        report.check(
            c.passed(),
            format!(
                "{}: error {:.2e}{exact}, tolerance {:.0e}",
                c.op, c.error, c.tolerance
            ),
        );
    }
    report.line(format!("\n({:.1} s)\n", started.elapsed().as_secs_f64()));

    report.line("## SmolLM2 greedy replies\n");
    let gguf = Gguf::open(smollm2)?;
    let tokenizer = LlamaTokenizer::from_gguf(&gguf).map_err(anyhow::Error::msg)?;
    let on_cpu = Llama::load(Cpu, &gguf, smollm2)?;
    let on_gpu = Llama::load(CudaDevice::new(ordinal)?, &gguf, smollm2)?;
    drop(gguf);
    let prompts = QUESTIONS
        .iter()
        .map(|q| {
            let text = tokenizer.apply_chat_template(&[ChatMessage {
                role: "user",
                content: q,
            }])?;
            tokenizer.encode(&text)
        })
        .collect::<Result<Vec<_>, String>>()
        .map_err(anyhow::Error::msg)?;
    let cpu_alone = greedy(&on_cpu, &prompts, false, tokenizer.eos)?;
    let gpu_alone = greedy(&on_gpu, &prompts, false, tokenizer.eos)?;
    let gpu_together = greedy(&on_gpu, &prompts, true, tokenizer.eos)?;
    for (i, question) in QUESTIONS.iter().enumerate() {
        let text = tokenizer.decode(&gpu_alone[i]);
        report.check(
            gpu_alone[i] == cpu_alone[i],
            format!("{question:?}: GPU {text:?}, same as the CPU"),
        );
        if gpu_alone[i] != cpu_alone[i] {
            report.line(format!("  - CPU: {:?}", tokenizer.decode(&cpu_alone[i])));
        }
        report.check(
            gpu_together[i] == gpu_alone[i],
            format!("{question:?}: the same batched (chunked, preempted) as alone"),
        );
    }

    report.line("\n## MiniLM embeddings\n");
    embeddings(minilm, ordinal, report)?;

    report.line("\n## Speed\n");
    let bandwidth = bandwidth(&gpu)?;
    let model_bytes = std::fs::metadata(smollm2)?.len() as f64;
    let limit = bandwidth / model_bytes;
    report.line(format!(
        "- Memory bandwidth, measured (a 1 GiB element-wise add): {:.0} GB/s",
        bandwidth / 1e9
    ));
    report.line(format!(
        "- SmolLM2's weights: {:.1} MB, so decode at one sequence is bounded by {limit:.0} tokens/s",
        model_bytes / 1e6
    ));
    report.line("\n| Sequences | Prefill tokens/s | Decode tokens/s | Decode, share of the bandwidth bound |");
    report.line("| --- | --- | --- | --- |");
    for sequences in [1, 16, 64] {
        let s = speed::measure(&on_gpu, sequences, 128, 32)?;
        let share = s.decode_tokens_per_second() / sequences as f64 / limit;
        report.line(format!(
            "| {sequences} | {:.0} | {:.0} | {:.1}% per sequence |",
            s.prefill_tokens_per_second(),
            s.decode_tokens_per_second(),
            share * 100.0
        ));
    }
    let s = speed::measure(&on_cpu, 1, 128, 32)?;
    report.line(format!(
        "\nThe CPU of the same machine, for comparison: {s}"
    ));
    Ok(())
}

/// Each prompt's greedy tokens, run one at a time, or all together through a cache of
/// room for about three and prompt chunks of 24 tokens.
fn greedy<D: Device>(
    model: &Llama<D>,
    prompts: &[Vec<u32>],
    together: bool,
    eos: Option<u32>,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let request = |i: usize| requests::greedy(i as u64, prompts[i].clone(), MAX_TOKENS);
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) + MAX_TOKENS;
    let per_sequence = longest.div_ceil(BLOCK_SIZE);
    let mut tokens: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut drain = |scheduler: &mut Scheduler<'_, D>| -> anyhow::Result<()> {
        while !scheduler.is_idle() {
            for event in scheduler.step()? {
                if let Event::Token { id, token, .. } = event {
                    tokens.entry(id).or_default().push(token);
                }
            }
        }
        Ok(())
    };
    if together {
        let mut scheduler = Scheduler::new(model, 3 * per_sequence, BLOCK_SIZE, 24, eos)?;
        (0..prompts.len()).for_each(|i| scheduler.add(request(i)));
        drain(&mut scheduler)?;
    } else {
        for i in 0..prompts.len() {
            let mut scheduler = Scheduler::new(model, per_sequence, BLOCK_SIZE, 512, eos)?;
            scheduler.add(request(i));
            drain(&mut scheduler)?;
        }
    }
    Ok((0..prompts.len() as u64)
        .map(|id| tokens.remove(&id).unwrap_or_default())
        .collect())
}

fn embeddings(folder: &Path, ordinal: usize, report: &mut Report) -> anyhow::Result<()> {
    let config: BertConfig =
        serde_json::from_str(&std::fs::read_to_string(folder.join("config.json"))?)?;
    let weights = Weights::open(&folder.join("model.safetensors"), "bert.")?;
    let on_cpu = Bert::load(Cpu, config.clone(), &weights)?;
    let on_gpu = Bert::load(CudaDevice::new(ordinal)?, config, &weights)?;
    let tokenizer = tokenizers::Tokenizer::from_file(PathBuf::from(folder).join("tokenizer.json"))
        .map_err(|err| anyhow::anyhow!("tokenizer.json: {err}"))?;
    let ids: Vec<Vec<u32>> = SENTENCES
        .iter()
        .map(|s| {
            tokenizer
                .encode(*s, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|err| anyhow::anyhow!("{err}"))
        })
        .collect::<Result<_, _>>()?;
    let expected = on_cpu.embed(&ids)?;
    let got = on_gpu.embed(&ids)?;
    for ((sentence, e), g) in SENTENCES.iter().zip(&expected).zip(&got) {
        let cosine = cosine(e, g);
        report.check(
            cosine >= MIN_COSINE,
            format!("{sentence:?}: cosine {cosine:.7} (at least {MIN_COSINE})"),
        );
    }
    Ok(())
}

/// Bytes per second the GPU moves in `x += y` over 1 GiB tensors (two read, one written).
fn bandwidth(gpu: &CudaDevice) -> anyhow::Result<f64> {
    let n = 1 << 28;
    let mut x = gpu.zeros(&[n])?;
    let y = gpu.zeros(&[n])?;
    gpu.add_assign(&mut x, &y)?;
    gpu.synchronize()?;
    let runs = 10;
    let started = Instant::now();
    for _ in 0..runs {
        gpu.add_assign(&mut x, &y)?;
    }
    gpu.synchronize()?;
    Ok((runs * 3 * n * 4) as f64 / started.elapsed().as_secs_f64())
}
