//! `sluice-load`: runs a load against an OpenAI-style API and reports what it measured.
//!
//!     sluice-load run http://127.0.0.1:8080 --rate 200 --duration 30s --key sk-...
//!     sluice-load compare --a http://127.0.0.1:9000 --b http://127.0.0.1:8080 --b-key sk-... \
//!         --rate 500 --duration 10s --rounds 3
//!     sluice-load cache-eval http://127.0.0.1:8080 --key sk-... --pairs pairs.jsonl \
//!         --admin http://127.0.0.1:8081 --admin-token TOKEN --json eval.json

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use sluice_load::report::{median, Ratio, Recorder, Report};
use sluice_load::schedule::{closed_loop, open_loop, Arrivals, Schedule, Stop};
use sluice_load::workload::Workload;
use sluice_load::{cache_eval, client};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Parser)]
#[command(
    name = "sluice-load",
    version,
    about = "Open-loop load generator for OpenAI-style APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load one target and report.
    Run {
        /// Base URL of the target, e.g. http://127.0.0.1:8080
        url: String,
        /// An API key to send as a bearer token (repeat to spread the load over several).
        #[arg(long = "key")]
        keys: Vec<String>,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Load two targets alternately (A B A B ...) with the same load, and report B against A
    /// pair by pair, so that a ratio holds on a noisy machine.
    Compare {
        #[arg(long)]
        a: String,
        #[arg(long)]
        b: String,
        #[arg(long, default_value = "A")]
        a_name: String,
        #[arg(long, default_value = "B")]
        b_name: String,
        #[arg(long = "a-key")]
        a_keys: Vec<String>,
        #[arg(long = "b-key")]
        b_keys: Vec<String>,
        /// How many A-then-B pairs to run.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Measure the semantic cache's precision: ask pairs of questions one after the other and
    /// count how often the second was answered from the cache kept for the first.
    CacheEval {
        /// Base URL of the gateway, e.g. http://127.0.0.1:8080
        url: String,
        #[arg(long)]
        key: String,
        /// JSON Lines, one `{"class", "same", "a", "b"}` a line.
        #[arg(long)]
        pairs: std::path::PathBuf,
        /// The gateway's admin API: to wait until each first answer is stored (else a fixed
        /// 300 ms) and to read the verification counters.
        #[arg(long, requires = "admin_token")]
        admin: Option<String>,
        #[arg(long, env = "SLUICE_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        #[arg(long, default_value = "sluice-sim")]
        model: String,
        #[arg(long, default_value_t = 8)]
        max_tokens: u32,
        /// Per-request timeout.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
        timeout: Duration,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Print each false hit and each missed paraphrase, with its similarity.
        #[arg(long)]
        show_wrong: bool,
    },
}

#[derive(Args, Clone)]
struct LoadArgs {
    /// Open loop: requests per second, sent on schedule whatever the target does.
    #[arg(long, conflicts_with = "concurrency")]
    rate: Option<f64>,
    /// With --rate: Poisson arrivals (exponential gaps) instead of evenly spaced ones.
    #[arg(long)]
    poisson: bool,
    /// Seed for Poisson arrivals.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Closed loop: this many clients, each sending again as soon as it has its answer.
    #[arg(long)]
    concurrency: Option<usize>,
    /// How long to send (after the warm-up), e.g. 30s, 2m.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// How many requests to send (warm-up included); with --duration, whichever comes first.
    #[arg(long)]
    requests: Option<u64>,
    /// Requests sent during the warm-up are not counted.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    warmup: Duration,
    /// A JSON Lines request mix (see workload.rs); overrides --kind/--model/--stream.
    #[arg(long)]
    mix: Option<std::path::PathBuf>,
    /// Without --mix: chat, completions or embeddings.
    #[arg(long, default_value = "chat")]
    kind: String,
    #[arg(long, default_value = "sluice-sim")]
    model: String,
    #[arg(long)]
    stream: bool,
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    #[arg(long, default_value = "Write one sentence about rivers.")]
    prompt: String,
    /// A file of API keys, one per line, added to any --key.
    #[arg(long)]
    keys_file: Option<std::path::PathBuf>,
    /// Per-request timeout.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    timeout: Duration,
    /// Open loop: past this many outstanding requests, a due request is dropped and counted.
    #[arg(long, default_value_t = 10_000)]
    max_in_flight: usize,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl LoadArgs {
    fn workload(&self, mut keys: Vec<String>) -> Result<Workload> {
        if let Some(path) = &self.keys_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned),
            );
        }
        let specs = match &self.mix {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                Workload::parse_mix(&text).with_context(|| path.display().to_string())?
            }
            None => vec![Workload::single(
                &self.kind,
                &self.model,
                self.stream,
                self.max_tokens,
                &self.prompt,
            )?],
        };
        Workload::new(specs, keys)
    }

    fn check(&self) -> Result<()> {
        if self.rate.is_none() && self.concurrency.is_none() {
            bail!("give --rate (open loop) or --concurrency (closed loop)");
        }
        if self.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            bail!("--rate must be a positive number");
        }
        if self.concurrency == Some(0) {
            bail!("--concurrency must be at least 1");
        }
        if self.duration.is_none() && self.requests.is_none() {
            bail!("give --duration or --requests, so the run stops by itself");
        }
        Ok(())
    }
}

/// Runs one load against one target and reports on what came after the warm-up.
async fn run_once(
    url: &str,
    workload: Arc<Workload>,
    load: &LoadArgs,
    signal: Arc<AtomicBool>,
) -> Result<Report> {
    let http = reqwest::Client::builder()
        .timeout(load.timeout)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .build()?;
    let base: Arc<str> = Arc::from(url.trim_end_matches('/'));
    let (samples, mut received) = tokio::sync::mpsc::unbounded_channel();
    let start = Instant::now();
    let measured_from = start + load.warmup;
    let counter = Arc::new(AtomicU64::new(0));

    let progress = indicatif::ProgressBar::new_spinner();
    if !std::io::stderr().is_terminal() {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let collector = {
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut recorder = Recorder::default();
            let mut done = 0u64;
            let mut last_done: Option<Instant> = None;
            while let Some((scheduled, sample)) = received.recv().await {
                done += 1;
                if done.is_multiple_of(100) {
                    progress.set_message(format!("{done} answered"));
                    progress.tick();
                }
                if scheduled >= measured_from {
                    recorder.record(&sample);
                    last_done = Some(Instant::now());
                }
            }
            (recorder, last_done)
        })
    };

    let fire = {
        let (http, base, workload, samples, counter) = (
            http.clone(),
            base.clone(),
            workload.clone(),
            samples.clone(),
            counter.clone(),
        );
        move |scheduled: Instant| {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let (http, base, workload, samples) = (
                http.clone(),
                base.clone(),
                workload.clone(),
                samples.clone(),
            );
            async move {
                let (spec, key) = workload.pick(n);
                let sample = client::send(&http, &base, spec, key, scheduled).await;
                let _ = samples.send((scheduled, sample));
            }
        }
    };
    let stop = Stop {
        duration: load.duration.map(|d| d + load.warmup),
        requests: load.requests,
        signal,
    };
    let (sent, dropped) = match (load.rate, load.concurrency) {
        (Some(rate), _) => {
            let arrivals = if load.poisson {
                Arrivals::Poisson {
                    rate,
                    seed: load.seed,
                }
            } else {
                Arrivals::Fixed { rate }
            };
            open_loop(Schedule::new(arrivals), stop, load.max_in_flight, fire).await
        }
        (None, Some(clients)) => (closed_loop(clients, stop, fire).await, 0),
        (None, None) => unreachable!("checked by LoadArgs::check"),
    };
    drop(samples);
    let (recorder, last_done) = collector.await?;
    progress.finish_and_clear();
    let elapsed = last_done.map_or(Duration::ZERO, |t| {
        t.saturating_duration_since(measured_from)
    });
    Ok(recorder.report(url, elapsed, sent, dropped))
}

fn print_report(report: &Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    if let Err(e) = real_main().await {
        eprintln!("sluice-load: {e:#}");
        std::process::exit(2);
    }
}

async fn real_main() -> Result<()> {
    let cli = Cli::parse();
    // Ctrl-C stops sending; what was sent is answered (or times out) and reported.
    let signal = Arc::new(AtomicBool::new(false));
    {
        let signal = signal.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("sluice-load: stopping; reporting what was measured");
                signal.store(true, Ordering::Relaxed);
            }
        });
    }
    match cli.command {
        Command::Run { url, keys, load } => {
            load.check()?;
            let workload = Arc::new(load.workload(keys)?);
            let report = run_once(&url, workload, &load, signal).await?;
            print_report(&report, load.json)
        }
        Command::Compare {
            a,
            b,
            a_name,
            b_name,
            a_keys,
            b_keys,
            rounds,
            load,
        } => {
            load.check()?;
            let a_work = Arc::new(load.workload(a_keys)?);
            let b_work = Arc::new(load.workload(b_keys)?);
            let mut pairs = Vec::new();
            for round in 1..=rounds {
                if signal.load(Ordering::Relaxed) {
                    break;
                }
                let mut ra = run_once(&a, a_work.clone(), &load, signal.clone()).await?;
                ra.target = format!("{a_name} ({a})");
                let mut rb = run_once(&b, b_work.clone(), &load, signal.clone()).await?;
                rb.target = format!("{b_name} ({b})");
                let ratio = Ratio::of(&ra, &rb);
                if !load.json {
                    println!("round {round}");
                    print!("{}{}", ra.table(), rb.table());
                    println!(
                        "  {b_name}/{a_name}: throughput {:.3}, p50 {}, p99 {}, added p50 {} ms, added p99 {} ms\n",
                        ratio.throughput,
                        fmt_opt(ratio.p50, 3),
                        fmt_opt(ratio.p99, 3),
                        fmt_opt(ratio.added_p50_ms, 3),
                        fmt_opt(ratio.added_p99_ms, 3),
                    );
                }
                pairs.push((ra, rb, ratio));
            }
            let med = |f: fn(&Ratio) -> Option<f64>| {
                median(pairs.iter().filter_map(|(_, _, r)| f(r)).collect())
            };
            let summary = serde_json::json!({
                "a": a_name, "b": b_name, "rounds": pairs.len(),
                "median_throughput_ratio": med(|r| Some(r.throughput)),
                "median_p50_ratio": med(|r| r.p50),
                "median_p99_ratio": med(|r| r.p99),
                "median_added_p50_ms": med(|r| r.added_p50_ms),
                "median_added_p99_ms": med(|r| r.added_p99_ms),
            });
            if load.json {
                let rounds: Vec<_> = pairs
                    .iter()
                    .map(|(a, b, r)| serde_json::json!({"a": a, "b": b, "ratio": r}))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"summary": summary, "rounds": rounds})
                );
            } else {
                println!("median over {} pairs: {b_name}/{a_name} throughput {}, p50 {}, p99 {}; added p50 {} ms, p99 {} ms",
                    pairs.len(),
                    fmt_opt(summary["median_throughput_ratio"].as_f64(), 3),
                    fmt_opt(summary["median_p50_ratio"].as_f64(), 3),
                    fmt_opt(summary["median_p99_ratio"].as_f64(), 3),
                    fmt_opt(summary["median_added_p50_ms"].as_f64(), 3),
                    fmt_opt(summary["median_added_p99_ms"].as_f64(), 3));
            }
            Ok(())
        }
        Command::CacheEval {
            url,
            key,
            pairs,
            admin,
            admin_token,
            model,
            max_tokens,
            timeout,
            json,
            show_wrong,
        } => {
            let text = std::fs::read_to_string(&pairs)
                .with_context(|| format!("cannot read {}", pairs.display()))?;
            let pairs =
                cache_eval::parse_pairs(&text).with_context(|| pairs.display().to_string())?;
            let target = cache_eval::Target {
                url,
                key,
                admin: admin.zip(admin_token),
                model,
                max_tokens,
                timeout,
            };
            let evaluation = cache_eval::evaluate(&target, &pairs, &signal).await?;
            if show_wrong {
                print!("{}", evaluation.wrong(&pairs));
            }
            print!("{}", evaluation.text());
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&evaluation)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Ok(())
        }
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}
