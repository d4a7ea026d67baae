//! What automatic prefix caching buys, for docs/benchmarks.md:
//!
//!     cargo run --release -p sluice-backend --example prefix_cache_speed -- MODEL.gguf [ROUNDS]
//!
//! Chat requests that share a system prompt of about 1,000 tokens, through the engine's
//! scheduler: the time to first token of a request whose prefix an earlier request left in
//! the cache, against the same request on a cache that never saw it, in alternating rounds.
//! Prints both, the prompt tokens found in the cache, and whether the replies were the same.

use std::time::{Duration, Instant};

use sluice_backend::device::cpu::Cpu;
use sluice_backend::engine::sampling::SamplingParams;
use sluice_backend::engine::scheduler::{Event, Request, Scheduler};
use sluice_backend::model::gguf::Gguf;
use sluice_backend::model::llama::Llama;
use sluice_backend::model::tokenizer::{ChatMessage, LlamaTokenizer};

const QUESTIONS: [&str; 3] = [
    "Can I bring a bicycle on board?",
    "When does the first boat leave on Sundays?",
    "What happens if I miss my stop?",
];

/// A sequence's time to first token and its reply.
fn serve(
    scheduler: &mut Scheduler<'_, Cpu>,
    request: Request,
) -> anyhow::Result<(Duration, Vec<u32>, u64)> {
    let started = Instant::now();
    scheduler.add(request);
    let (mut first, mut reply, mut hits) = (None, Vec::new(), 0);
    while !scheduler.is_idle() {
        for event in scheduler.step()? {
            if let Event::Token { token, .. } = event {
                first.get_or_insert_with(|| started.elapsed());
                reply.push(token);
            }
        }
        hits += scheduler.report().prefix_hit_tokens;
    }
    Ok((first.unwrap_or_default(), reply, hits))
}

fn main() -> anyhow::Result<()> {
    let usage = "usage: prefix_cache_speed MODEL.gguf [ROUNDS]";
    let mut args = std::env::args().skip(1);
    let path = std::path::PathBuf::from(args.next().expect(usage));
    let rounds: usize = args.next().map_or(Ok(3), |s| s.parse())?;
    let gguf = Gguf::open(&path)?;
    let tokenizer = LlamaTokenizer::from_gguf(&gguf).map_err(anyhow::Error::msg)?;
    let model = Llama::load(Cpu, &gguf, &path)?;
    drop(gguf);
    let rules: Vec<String> = (1..=60)
        .map(|i| {
            format!(
                "Rule {i}: boats on line {} stop at pier {} and wait {} minutes.",
                i % 7,
                i % 11,
                2 + i % 5
            )
        })
        .collect();
    let system = format!(
        "You answer questions about a river ferry. {}",
        rules.join(" ")
    );
    let request = |id: u64, question: &str| -> anyhow::Result<Request> {
        let chat = tokenizer
            .apply_chat_template(&[
                ChatMessage {
                    role: "system",
                    content: &system,
                },
                ChatMessage {
                    role: "user",
                    content: question,
                },
            ])
            .map_err(anyhow::Error::msg)?;
        Ok(Request {
            id,
            prompt: tokenizer.encode(&chat).map_err(anyhow::Error::msg)?,
            params: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            max_tokens: 8,
            speculate: false,
            logprobs: None,
            constraint: None,
        })
    };
    let prompt_len = request(0, QUESTIONS[0])?.prompt.len();
    let blocks = 2 * (prompt_len + 16).div_ceil(16);
    let (mut warm, mut cold, mut hits, mut same) = (Vec::new(), Vec::new(), 0, true);
    for round in 0..rounds {
        for (i, question) in QUESTIONS.iter().enumerate() {
            let id = (round * QUESTIONS.len() + i) as u64;
            let other = QUESTIONS[(i + 1) % QUESTIONS.len()];
            // Warm: another question with the same system prompt went first.
            let mut scheduler = Scheduler::new(&model, blocks, 16, 256, tokenizer.eos)?;
            serve(&mut scheduler, request(id, other)?)?;
            let (ttft, reply, found) = serve(&mut scheduler, request(id, question)?)?;
            warm.push(ttft);
            hits += found;
            // Cold: the same request on a cache that never saw the prefix.
            let mut scheduler = Scheduler::new(&model, blocks, 16, 256, tokenizer.eos)?;
            let (ttft, alone, _) = serve(&mut scheduler, request(id, question)?)?;
            cold.push(ttft);
            same &= reply == alone;
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    let (warm_ms, cold_ms) = (median(&mut warm), median(&mut cold));
    println!(
        "{prompt_len}-token prompts sharing a system prompt: time to first token {warm_ms:.0} ms with its prefix cached, {cold_ms:.0} ms without ({:.1}× faster), {} prompt tokens found in the cache per request, replies {}",
        cold_ms / warm_ms,
        hits / warm.len() as u64,
        if same { "identical" } else { "DIFFERENT" }
    );
    Ok(())
}
