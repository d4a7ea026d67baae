//! `sluice`: the gateway binary.

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_gateway::config::{process_env, Config};
use sluice_gateway::outbound::{Outbound, Target};
use std::path::PathBuf;

// mimalloc by default; `--features system-allocator` leaves the C library's malloc in place,
// for heap profilers that hook it (heaptrack: docs/operations.md, "Heap profiling").
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Billing: exports from a running gateway's admin API; importing the store's usage into
    /// the PostgreSQL ledger.
    Billing {
        #[command(subcommand)]
        command: BillingCommand,
    },
    /// The distillation dataset: exports from a running gateway's admin API.
    Datasets {
        #[command(subcommand)]
        command: DatasetsCommand,
    },
}

/// Where a running gateway's admin API is, and the credential for it.
#[derive(clap::Args)]
struct AdminApi {
    /// The admin API of a running gateway.
    #[arg(
        long,
        env = "SLUICE_ADMIN_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    admin_url: String,
    /// Admin bearer token (or an admin/viewer JWT).
    #[arg(long, env = "SLUICE_ADMIN_TOKEN", hide_env_values = true)]
    token: String,
    /// For an https:// admin URL: the CA bundle its certificate is checked against
    /// (default: the system's roots, or SSL_CERT_FILE).
    #[arg(long, env = "SLUICE_ADMIN_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// A client certificate (PEM), for an admin listener that asks for one
    /// ([server.tls] admin_client_ca_file); with --client-key.
    #[arg(long, env = "SLUICE_ADMIN_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "SLUICE_ADMIN_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DatasetsCommand {
    /// Write the captured conversations as an OpenAI fine-tuning file (JSON Lines, one
    /// `{"messages": [...]}` per line) to stdout or a file.
    Export {
        #[command(flatten)]
        api: AdminApi,
        /// Only this model's answers (a name, or a pattern with `*`).
        #[arg(long)]
        model: Option<String>,
        /// Only this tenant's conversations.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this key's conversations (its id).
        #[arg(long)]
        key: Option<String>,
        /// Captured at or after: YYYY-MM-DD or RFC 3339.
        #[arg(long)]
        from: Option<String>,
        /// Captured before.
        #[arg(long)]
        to: Option<String>,
        /// Only answers that ended so (comma-separated: stop, length, tool_calls, ...).
        #[arg(long)]
        finish_reason: Option<String>,
        /// Write here instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BillingCommand {
    /// Write a billing export (CSV or JSON Lines) to stdout or a file.
    Export {
        #[command(flatten)]
        api: AdminApi,
        /// Start, inclusive: YYYY-MM-DD or RFC 3339. Default: the start of the month.
        #[arg(long)]
        from: Option<String>,
        /// End, exclusive. Default: now.
        #[arg(long)]
        to: Option<String>,
        /// key, tenant, model, day (comma-separated), or event for raw priced events.
        #[arg(long, default_value = "key,model,day")]
        group_by: String,
        /// csv, jsonl, or (with --group-by event) cloudevents.
        #[arg(long, default_value = "csv")]
        format: String,
        /// Write here instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Copy the usage events the store has kept into the PostgreSQL ledger (`[billing]
    /// postgres_url`), for turning the ledger on: exports then read the ledger only. Events
    /// already there are not counted twice, so it can be run again. With the embedded store,
    /// stop the gateway first (its file is opened here).
    Import {
        /// The gateway's configuration (its store and `[billing] postgres_url`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Start, inclusive (YYYY-MM-DD or RFC 3339). Default: everything.
        #[arg(long)]
        from: Option<String>,
        /// End, exclusive. Default: everything.
        #[arg(long)]
        to: Option<String>,
    },
}

fn main() {
    #[cfg(not(feature = "system-allocator"))]
    sluice_gateway::allocator::return_freed_memory_promptly();
    let _telemetry = sluice_telemetry::init("sluice-gateway", "SLUICE_LOG");
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => load(config).and_then(sluice_gateway::server::run),
        Command::Billing { command } => billing(command),
        Command::Datasets { command } => datasets(command),
        Command::Check { config } => load(config).map(|c| {
            println!(
                "ok: listen {}, admin {}, store {}, {} backend(s), tiers: {}",
                c.listen,
                c.admin_listen,
                match &c.redis_url {
                    Some(url) if url.trim_start().starts_with("rediss://") => "redis over TLS",
                    Some(_) => "redis",
                    None => "embedded",
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

fn billing(command: BillingCommand) -> anyhow::Result<()> {
    let (api, from, to, group_by, format, output) = match command {
        BillingCommand::Export {
            api,
            from,
            to,
            group_by,
            format,
            output,
        } => (api, from, to, group_by, format, output),
        BillingCommand::Import { config, from, to } => return import(load(config)?, from, to),
    };
    let mut query = vec![("group_by", group_by), ("format", format)];
    query.extend(from.map(|f| ("from", f)));
    query.extend(to.map(|t| ("to", t)));
    download(&api, "/admin/v1/billing/export", &query, output)
}

fn datasets(command: DatasetsCommand) -> anyhow::Result<()> {
    let DatasetsCommand::Export {
        api,
        model,
        tenant,
        key,
        from,
        to,
        finish_reason,
        output,
    } = command;
    let query: Vec<(&str, String)> = [
        ("model", model),
        ("tenant", tenant),
        ("key", key),
        ("from", from),
        ("to", to),
        ("finish_reason", finish_reason),
    ]
    .into_iter()
    .filter_map(|(name, value)| value.map(|v| (name, v)))
    .collect();
    download(&api, "/admin/v1/datasets/export", &query, output)
}

/// The longest wait to connect to the admin API, and between two pieces of an export.
const EXPORT_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How much of a refusal's answer is quoted.
const REFUSAL_BYTES: usize = 4096;

/// Writes what an admin API export answers to stdout or a file, as it arrives (an export of
/// millions of lines is never held here); into a file beside the output first, renamed into
/// place only once the export ended whole.
fn download(
    api: &AdminApi,
    path: &str,
    query: &[(&str, String)],
    output: Option<PathBuf>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let partial = output.as_ref().map(|path| {
        let mut name = path.as_os_str().to_owned();
        name.push(".partial");
        PathBuf::from(name)
    });
    let mut sink: Box<dyn std::io::Write> = match &partial {
        Some(path) => Box::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
        None => Box::new(std::io::stdout().lock()),
    };
    let written = runtime.block_on(async {
        let mut url = format!("{}{path}", api.admin_url.trim_end_matches('/'));
        if !query.is_empty() {
            url.push('?');
            url.push_str(
                &form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(query)
                    .finish(),
            );
        }
        let trust = sluice_gateway::tls::BackendTrust::load(
            api.ca_file.as_deref(),
            api.client_cert.as_deref().zip(api.client_key.as_deref()),
        )?;
        let target = Target::resolve(&url)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .trusting(&trust);
        let authorization = format!("Bearer {}", api.token);
        // An error's answer is kept (its start) to be said; an export's is written out.
        let mut refusal = Vec::new();
        let status = Outbound::default()
            .stream(
                &target,
                "GET",
                &[("authorization", &authorization)],
                EXPORT_READ_TIMEOUT,
                |status, chunk| match status {
                    200..300 => sink.write_all(chunk).map_err(|e| e.to_string()),
                    _ => {
                        let room = REFUSAL_BYTES.saturating_sub(refusal.len());
                        refusal.extend_from_slice(&chunk[..chunk.len().min(room)]);
                        Ok(())
                    }
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", api.admin_url))
            .context("the export could not be read to its end")?;
        if !(200..300).contains(&status) {
            anyhow::bail!("{status}: {}", String::from_utf8_lossy(&refusal));
        }
        sink.flush()?;
        Ok(())
    });
    drop(sink);
    match (written, partial, output) {
        (Ok(()), Some(partial), Some(path)) => std::fs::rename(partial, path)?,
        (Ok(()), _, _) => {}
        (Err(e), partial, _) => {
            if let Some(partial) = partial {
                let _ = std::fs::remove_file(partial);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// `sluice billing import`: the store's usage events into the ledger.
fn import(config: Config, from: Option<String>, to: Option<String>) -> anyhow::Result<()> {
    use sluice_gateway::billing::parse_time;
    use sluice_gateway::store::{EmbeddedStore, RedisStore, Store};
    let ledger_config = config
        .ledger
        .as_ref()
        .context("no ledger configured: set [billing] postgres_url or SLUICE_POSTGRES_URL")?;
    let from_ms = from
        .map(|f| parse_time("from", &f))
        .transpose()?
        .unwrap_or(0);
    let to_ms = to
        .map(|t| parse_time("to", &t))
        .transpose()?
        .unwrap_or(i64::MAX);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let store: Box<dyn Store> = match &config.redis_url {
            Some(url) => Box::new(
                RedisStore::connect_with_tls(url, &config.redis_prefix, &config.redis_tls)
                    .await
                    .with_context(|| format!("cannot connect to Redis at {url}"))?,
            ),
            None => Box::new(EmbeddedStore::open(&config.data_dir).with_context(|| {
                format!(
                    "cannot open the embedded store in {} (stop the gateway first)",
                    config.data_dir.display()
                )
            })?),
        };
        let ledger = sluice_gateway::ledger::Ledger::new(ledger_config, config.prices.clone())?;
        let (read, new) = ledger.import_from(store.as_ref(), from_ms, to_ms).await?;
        println!("{read} usage events read from the store, {new} new in the ledger");
        Ok(())
    })
}

fn load(path: Option<PathBuf>) -> anyhow::Result<Config> {
    Ok(Config::load(path.as_deref(), &process_env)?)
}
