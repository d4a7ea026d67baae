//! `sluice`: the gateway binary.

use clap::{Parser, Subcommand};
use sluice_gateway::config::{process_env, Config};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "An OpenAI-compatible LLM API gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (proxy listener and admin listener).
    Serve {
        /// The TOML configuration file; without one, built-in defaults and SLUICE_* variables.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and print what it resolves to, then exit.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => load(config).and_then(sluice_gateway::app::run),
        Command::Check { config } => load(config).map(|c| {
            println!(
                "ok: listen {}, admin {}, store {}, {} backend(s), tiers: {}",
                c.listen,
                c.admin_listen,
                if c.redis_url.is_some() {
                    "redis"
                } else {
                    "embedded"
                },
                c.backends.len(),
                c.tiers.names().collect::<Vec<_>>().join(", ")
            )
        }),
    };
    if let Err(e) = result {
        eprintln!("sluice: {e:#}");
        std::process::exit(1);
    }
}

fn load(path: Option<PathBuf>) -> anyhow::Result<Config> {
    Ok(Config::load(path.as_deref(), &process_env)?)
}

/// JSON lines when logs go to a file or collector, readable text on a terminal.
fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
}
