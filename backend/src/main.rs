//! What does the `sluice-backend` command do? Read the command line, pick the engine, serve
//! until told to stop.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;

use sluice_backend::cli::model_spec::{served_names, ModelSpec};
use sluice_backend::cli::{DeviceChoice, EngineKind};
use sluice_backend::device::{cuda, Target};
use sluice_backend::engine::{EmbeddingModel, EngineOptions, TextModel};
use sluice_backend::http::{ModelEngine, ServedModel};
use sluice_backend::model::{self, LoadError, ModelKind};
use sluice_backend::{serve, AppState, SimConfig};

/// Sluice's co-located OpenAI-compatible inference service.
#[derive(Debug, Parser)]
#[command(name = "sluice-backend", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,

    /// A model to serve, as [NAME=]PATH (a GGUF file or a Hugging Face folder). NAME
    /// defaults to the folder name or the file stem. Repeatable. With --engine sim, PATH is
    /// not read and a bare name will do; with no --model, sim serves `sluice-sim`.
    #[arg(long = "model", value_name = "[NAME=]PATH")]
    models: Vec<ModelSpec>,

    /// The engine that answers requests.
    #[arg(long, value_enum, default_value_t = EngineKind::Native)]
    engine: EngineKind,

    /// Where the native engine runs: auto (the first GPU if one can be used, else the CPU),
    /// cpu, or cuda:N (an NVIDIA GPU; exit status 2 if it cannot be used).
    #[arg(long, env = "SLUICE_DEVICE", default_value = "auto")]
    device: DeviceChoice,

    /// Native engine: memory for each decoder's key/value cache, in MiB [default: 1024 on
    /// the CPU; on a GPU, 80% of its memory free once the weights are loaded]. At least one
    /// full-context sequence always fits; past that, more concurrent sequences.
    #[arg(long, env = "SLUICE_KV_CACHE_MB",
          value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    kv_cache_mb: Option<u64>,

    /// Simulated engine: milliseconds before the first token.
    #[arg(long, env = "SLUICE_SIM_TTFT_MS", default_value_t = 0)]
    sim_ttft_ms: u64,

    /// Simulated engine: milliseconds between tokens.
    #[arg(long, env = "SLUICE_SIM_TOKEN_DELAY_MS", default_value_t = 0)]
    sim_token_delay_ms: u64,

    /// Simulated engine: reply length, in tokens, when the request does not cap it lower.
    #[arg(long, env = "SLUICE_SIM_OUTPUT_TOKENS", default_value_t = 16)]
    sim_output_tokens: u32,

    /// Simulated engine: length of embedding vectors.
    #[arg(
        long,
        env = "SLUICE_SIM_EMBEDDING_DIM",
        default_value_t = 384,
        value_parser = clap::value_parser!(u32).range(1..=65_536)
    )]
    sim_embedding_dim: u32,

    /// Simulated engine: replies generated at once at most, like a GPU's batch; the rest
    /// wait their turn (shown as sluice_backend_requests_waiting). 0: no limit.
    #[arg(long, env = "SLUICE_SIM_MAX_RUNNING", default_value_t = 0)]
    sim_max_running: usize,
}

/// Exit status for a command line this build cannot serve, as for clap's own usage errors.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let args = Args::parse();
    let _telemetry = sluice_telemetry::init("sluice-backend", "RUST_LOG");

    let names = match served_names(&args.models) {
        Ok(names) => names,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Models load before the runtime starts: a backend that cannot serve what it was asked
    // to exits at once instead of listening and failing every request.
    let state = match args.engine {
        EngineKind::Sim => {
            if args.device != DeviceChoice::Auto {
                tracing::info!(device = %args.device, "the simulated engine runs on no device; --device is ignored");
            }
            AppState::new(names, sim_config(&args))
        }
        EngineKind::Native => match load_native(&args) {
            Ok(state) => state,
            Err((code, message)) => {
                eprintln!("error: {message}");
                return code;
            }
        },
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, state)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn sim_config(args: &Args) -> SimConfig {
    SimConfig {
        ttft: Duration::from_millis(args.sim_ttft_ms),
        token_delay: Duration::from_millis(args.sim_token_delay_ms),
        output_tokens: args.sim_output_tokens,
        embedding_dim: args.sim_embedding_dim as usize,
        max_running: args.sim_max_running,
    }
}

/// Loads every `--model` for the native engine, or says why not with the exit status to
/// leave with: 2 for what this build cannot serve, 1 for files that are broken.
fn load_native(args: &Args) -> Result<Arc<AppState>, (ExitCode, String)> {
    let usage = |message: String| (ExitCode::from(EXIT_USAGE), message);
    let target = match args.device {
        DeviceChoice::Cuda(ordinal) => {
            let gpu = cuda::probe(ordinal as usize)
                .map_err(|why| usage(format!("--device {}: no usable GPU: {why}", args.device)))?;
            tracing::info!(
                gpu = %gpu.name,
                compute = ?gpu.compute_capability,
                "--device {}",
                args.device
            );
            Target::Cuda(ordinal as usize)
        }
        DeviceChoice::Auto => {
            let (target, why) = Target::auto();
            tracing::info!("--device auto: {why}");
            target
        }
        DeviceChoice::Cpu => Target::Cpu,
    };
    if args.models.is_empty() {
        return Err(usage(
            "the native engine needs at least one --model [NAME=]PATH (or run with --engine sim)"
                .to_owned(),
        ));
    }
    let mut models = Vec::with_capacity(args.models.len());
    for spec in &args.models {
        let fail = |err: LoadError| {
            let code = if err.is_usage() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            };
            (code, format!("model `{}`: {err}", spec.name))
        };
        match model::inspect(&spec.path).map_err(fail)? {
            ModelKind::Bert => {
                let started = Instant::now();
                let model = EmbeddingModel::load(&spec.name, &spec.path, target).map_err(fail)?;
                tracing::info!(
                    model = %spec.name,
                    path = %spec.path.display(),
                    device = model.device(),
                    dimensions = model.dim(),
                    max_tokens = model.max_tokens(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "embedding model loaded"
                );
                models.push(ServedModel {
                    name: spec.name.clone(),
                    engine: ModelEngine::Embedding(Arc::new(model)),
                });
            }
            ModelKind::Llama => {
                let started = Instant::now();
                let options = EngineOptions {
                    kv_cache_bytes: args
                        .kv_cache_mb
                        .map(|mb| usize::try_from(mb << 20).unwrap_or(usize::MAX)),
                    target,
                };
                let model = TextModel::load(&spec.name, &spec.path, options).map_err(fail)?;
                tracing::info!(
                    model = %spec.name,
                    path = %spec.path.display(),
                    device = model.device(),
                    context_length = model.context_length(),
                    kv_cache_blocks = model.stats().snapshot().kv_blocks_total,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "chat model loaded"
                );
                models.push(ServedModel {
                    name: spec.name.clone(),
                    engine: ModelEngine::Text(Arc::new(model)),
                });
            }
        }
    }
    Ok(AppState::native(models))
}

async fn run(args: Args, state: Arc<AppState>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener
        .local_addr()
        .context("cannot read the listening address")?;
    tracing::info!(
        %address,
        engine = args.engine.label(),
        models = ?state.model_names(),
        config = ?(args.engine == EngineKind::Sim).then_some(&state.sim),
        "sluice-backend listening"
    );
    serve(listener, state, shutdown_signal())
        .await
        .context("server failed")?;
    tracing::info!("sluice-backend stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes and docker send), starting a graceful
/// shutdown.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();

    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
