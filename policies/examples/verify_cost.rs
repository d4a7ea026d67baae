//! What does verifying one semantic candidate cost? CPU time of `same_question::verify` on
//! typical pairs and on the worst case its word bound allows.
//!
//!     cargo run --release -p sluice-policies --example verify_cost

use sluice_policies::same_question::{verify, MAX_WORDS};
use std::time::{Duration, Instant};

fn per_call(rounds: u32, a: &str, b: &str) -> Duration {
    let start = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(verify(a, b, 0.9, 0.96).ok());
    }
    start.elapsed() / rounds
}

fn main() {
    let typical = [
        (
            "Can a landlord evict a tenant for late rent?",
            "Can a tenant evict a landlord for late rent?",
        ),
        (
            "How do I reset my router password?",
            "Could you please tell me how to reset my router password? Thanks!",
        ),
        (
            "Is a heat pump cheaper to run than a gas boiler in winter?",
            "Is a gas boiler more expensive to run than a heat pump in winter?",
        ),
    ];
    for (a, b) in typical {
        println!(
            "{:>9.1} µs  {a} / {b}",
            per_call(2000, a, b).as_secs_f64() * 1e6
        );
    }
    // Every word distinct and the order reversed: the order checks' worst case.
    let words: Vec<String> = (0..MAX_WORDS).map(|i| format!("word{i}")).collect();
    let forward = words.join(" ");
    let reversed: Vec<&str> = words.iter().rev().map(String::as_str).collect();
    let cost = per_call(20, &forward, &reversed.join(" "));
    println!(
        "{:>9.1} µs  {MAX_WORDS} distinct words against the same reversed (the bound)",
        cost.as_secs_f64() * 1e6
    );
}
