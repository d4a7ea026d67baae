//! What a format's token mask costs, for docs/benchmarks.md:
//!
//!     cargo run --release -p sluice-backend --example format_speed -- MODEL.gguf [ROUNDS]
//!
//! Through the engine's scheduler, greedy, 96 tokens at most, in alternating rounds: a
//! sequence bound to a JSON schema alone against an unconstrained one alone (its decode
//! steps include computing the mask), and an unconstrained sequence beside a bound one
//! against beside another unconstrained one (what a format costs the other requests in its
//! batch). Prints tokens per second for each.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use sluice_backend::device::cpu::Cpu;
use sluice_backend::engine::constraint::{Format, Formats};
use sluice_backend::engine::scheduler::{Event, Request, Scheduler};
use sluice_backend::model::gguf::Gguf;
use sluice_backend::model::llama::Llama;
use sluice_backend::model::tokenizer::LlamaTokenizer;
use sluice_backend::test_tools::requests::{greedy, user_turn};

const MAX_TOKENS: usize = 96;

/// Runs `requests` together to the end; the seconds request 0 took to decode (after the
/// prompts' step) and the tokens each request got, by id.
fn run(
    model: &Llama<Cpu>,
    eos: Option<u32>,
    requests: Vec<Request>,
) -> anyhow::Result<(f64, Vec<usize>)> {
    let mut scheduler = Scheduler::new(model, 128, 16, 512, eos)?;
    let count = requests.len();
    for request in requests {
        scheduler.add(request);
    }
    let mut tokens = vec![0usize; count];
    let mut started = None;
    let mut seconds = None;
    while !scheduler.is_idle() {
        for event in scheduler.step()? {
            match event {
                Event::Token { id, .. } => tokens[id as usize] += 1,
                Event::Finished { id: 0, .. } => {
                    seconds = started.map(|s: Instant| s.elapsed().as_secs_f64());
                }
                Event::Finished { .. } => {}
            }
        }
        started.get_or_insert_with(Instant::now);
    }
    Ok((seconds.unwrap_or(0.0), tokens))
}

fn main() -> anyhow::Result<()> {
    let usage = "usage: format_speed MODEL.gguf [ROUNDS]";
    let mut args = std::env::args().skip(1);
    let path = std::path::PathBuf::from(args.next().expect(usage));
    let rounds: usize = args.next().map_or(Ok(3), |s| s.parse())?;
    let gguf = Gguf::open(&path)?;
    let tokenizer = Arc::new(LlamaTokenizer::from_gguf(&gguf).map_err(anyhow::Error::msg)?);
    let model = Llama::load(Cpu, &gguf, &path)?;
    drop(gguf);
    let formats = Formats::new(tokenizer.clone());
    let schema = json!({
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "steps": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["title", "steps"],
        "additionalProperties": false,
    });
    let compiled = Instant::now();
    let constraint = formats
        .compile(&Format::JsonSchema(schema))
        .map_err(anyhow::Error::msg)?;
    println!(
        "vocabulary trie and schema compiled in {:.0} ms",
        compiled.elapsed().as_secs_f64() * 1000.0
    );
    let request = |id: u64, text: &str, bound: bool| -> anyhow::Result<Request> {
        let prompt = user_turn(&tokenizer, text).map_err(anyhow::Error::msg)?;
        Ok(Request {
            constraint: bound.then(|| constraint.clone()),
            ..greedy(id, prompt, MAX_TOKENS)
        })
    };
    let recipe = "Write a recipe for bread as JSON with a title and its steps.";
    let story = "Tell me a long story about a lighthouse keeper.";
    // Seconds and tokens of request 0: [bound alone, free alone, free beside free, free
    // beside bound].
    let runs = [
        vec![request(0, recipe, true)?],
        vec![request(0, story, false)?],
        vec![request(0, story, false)?, request(1, recipe, false)?],
        vec![request(0, story, false)?, request(1, recipe, true)?],
    ];
    let mut totals = [(0.0f64, 0usize); 4];
    for _ in 0..rounds {
        for (total, requests) in totals.iter_mut().zip(&runs) {
            let (seconds, tokens) = run(&model, tokenizer.eos, requests.clone())?;
            total.0 += seconds;
            // The first token came from the prompts' step.
            total.1 += tokens[0].saturating_sub(1);
        }
    }
    let rate = |(s, t): (f64, usize)| t as f64 / s;
    println!(
        "alone: bound to a schema {:.1} tokens/s, unconstrained {:.1} tokens/s ({:.2}×); \
         an unconstrained sequence beside a bound one {:.1} tokens/s, beside an unconstrained \
         one {:.1} tokens/s ({:.2}×)",
        rate(totals[0]),
        rate(totals[1]),
        rate(totals[0]) / rate(totals[1]),
        rate(totals[3]),
        rate(totals[2]),
        rate(totals[3]) / rate(totals[2]),
    );
    Ok(())
}
