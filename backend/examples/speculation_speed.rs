//! What prompt-lookup speculative decoding buys, for docs/benchmarks.md:
//!
//!     cargo run --release -p sluice-backend --example speculation_speed -- MODEL.gguf [ROUNDS]
//!
//! One sequence at a time through the engine's scheduler, greedy, 64 tokens at most, with
//! drafting on and off in alternating rounds: on chat prompts that copy from their context
//! (repeat, list, edit) and on prompts that do not (open questions). Prints tokens per
//! second for each, the acceptance rate, and whether the replies were the same.

use std::time::Instant;

use sluice_backend::device::cpu::Cpu;
use sluice_backend::engine::sampling::SamplingParams;
use sluice_backend::engine::scheduler::{Event, Request, Scheduler};
use sluice_backend::model::gguf::Gguf;
use sluice_backend::model::llama::Llama;
use sluice_backend::model::tokenizer::LlamaTokenizer;
use sluice_backend::test_tools::requests::user_turn;

const COPYING: [&str; 3] = [
    "Repeat this paragraph exactly: The river rose in the spring, and the people of the valley moved their boats to higher ground, as their grandparents had done before them.",
    "Fix the spelling and give the whole sentence back: Teh comittee will recieve the anual reprot on Wendsday and discus it at lenght.",
    "Copy this list, one item per line: apples, oranges, pears, plums, cherries, grapes, lemons, limes, figs, dates.",
];
const FRESH: [&str; 3] = [
    "Tell me a story about a lighthouse keeper.",
    "Why is the sky blue?",
    "Give me three ideas for a weekend trip.",
];

fn main() -> anyhow::Result<()> {
    let usage = "usage: speculation_speed MODEL.gguf [ROUNDS]";
    let mut args = std::env::args().skip(1);
    let path = std::path::PathBuf::from(args.next().expect(usage));
    let rounds: usize = args.next().map_or(Ok(2), |s| s.parse())?;
    let gguf = Gguf::open(&path)?;
    let tokenizer = LlamaTokenizer::from_gguf(&gguf).map_err(anyhow::Error::msg)?;
    let model = Llama::load(Cpu, &gguf, &path)?;
    drop(gguf);
    let prompt = |text: &str| user_turn(&tokenizer, text).map_err(anyhow::Error::msg);
    for (kind, texts) in [("copying", COPYING), ("fresh", FRESH)] {
        let prompts = texts
            .iter()
            .map(|t| prompt(t))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // [off, on]: decoding seconds, tokens, drafted, kept; and the replies.
        let mut totals = [(0.0f64, 0u64, 0u64, 0u64); 2];
        let mut replies: [Vec<Vec<u32>>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..rounds {
            for (k, speculate) in [false, true].into_iter().enumerate() {
                replies[k].clear();
                for prompt in &prompts {
                    let mut scheduler = Scheduler::new(&model, 64, 16, 512, tokenizer.eos)?;
                    scheduler.add(Request {
                        id: 0,
                        prompt: prompt.clone(),
                        params: SamplingParams {
                            temperature: 0.0,
                            ..SamplingParams::default()
                        },
                        max_tokens: 64,
                        speculate,
                        logprobs: None,
                        constraint: None,
                    });
                    // The prompt's step is not timed: speculation changes decoding only.
                    let mut reply = Vec::new();
                    let mut started = None;
                    while !scheduler.is_idle() {
                        let events = scheduler.step()?;
                        let report = scheduler.report();
                        totals[k].2 += report.drafted_tokens;
                        totals[k].3 += report.accepted_tokens;
                        for event in events {
                            if let Event::Token { token, .. } = event {
                                reply.push(token);
                            }
                        }
                        started.get_or_insert_with(Instant::now);
                    }
                    let seconds = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
                    // The first token came from the prompt's step.
                    totals[k].0 += seconds;
                    totals[k].1 += reply.len().saturating_sub(1) as u64;
                    replies[k].push(reply);
                }
            }
        }
        let rate = |t: (f64, u64, u64, u64)| t.1 as f64 / t.0;
        let (off, on) = (totals[0], totals[1]);
        println!(
            "{kind} prompts: speculation off {:.1} tokens/s, on {:.1} tokens/s ({:.2}×), {} of {} drafted tokens kept ({:.0}%), replies {}",
            rate(off),
            rate(on),
            rate(on) / rate(off),
            on.3,
            on.2,
            100.0 * on.3 as f64 / on.2.max(1) as f64,
            if replies[0] == replies[1] { "identical" } else { "DIFFERENT" }
        );
    }
    Ok(())
}
