//! `usage-fill`: writes generated usage events into a store through the gateway's own store
//! code (`Store::append_usage`, the path metering takes), for benchmarks of what reads them
//! back: billing exports of millions of events without sending millions of requests.
//!
//!   usage-fill --redis redis://127.0.0.1:6379 --prefix bench --events 1000000
//!   usage-fill --data-dir sluice-data --events 100000
//!   usage-fill --postgres postgres://postgres@127.0.0.1/bench --events 10000000
//!   usage-fill --redis redis://127.0.0.1:6379 --buffer --events 1000000
//!   usage-fill --redis rediss://redis.internal:6380 --redis-tls-ca ca.pem --events 100000
//!   usage-fill --redis redis://127.0.0.1:6379 --drain-into postgres://...
//!
//! `--postgres` writes through the PostgreSQL ledger's own insert (`Ledger::insert`, in the
//! usage writer's batches of 512, one at a time as one replica's writer does): its rate is a
//! replica's ledger ingest rate. `--buffer` puts the events in the Redis store's usage buffer
//! (where they wait while the ledger is down); `--drain-into` moves that buffer into a ledger
//! as every replica's writer does once it is back.
//!
//! Events are spread evenly over the span before now, over `--keys` keys of `--tenants`
//! tenants and two models; token counts vary by event. Prints the totals written (events,
//! prompt and completion tokens) as one JSON line, for checking an export against.

use clap::Parser;
use sluice_gateway::config::RedisTlsFiles;
use sluice_gateway::ledger::{Ledger, LedgerConfig};
use sluice_gateway::metering::UsageTarget;
use sluice_gateway::store::{EmbeddedStore, RedisStore, Store};
use sluice_gateway::usage::{UsageEvent, UsageSource};
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// A Redis store (with --prefix), as `redis_url` in the gateway's config.
    #[arg(long)]
    redis: Option<String>,
    #[arg(long, default_value = "sluice")]
    prefix: String,
    /// With a rediss:// --redis: the CA, client certificate and key, as the gateway's
    /// `redis_tls_*_file` (and from the same environment variables).
    #[arg(long, env = "SLUICE_REDIS_TLS_CA")]
    redis_tls_ca: Option<std::path::PathBuf>,
    #[arg(long, env = "SLUICE_REDIS_TLS_CERT")]
    redis_tls_cert: Option<std::path::PathBuf>,
    #[arg(long, env = "SLUICE_REDIS_TLS_KEY")]
    redis_tls_key: Option<std::path::PathBuf>,
    /// An embedded store's data directory (the gateway must not have it open).
    #[arg(long, conflicts_with = "redis")]
    data_dir: Option<std::path::PathBuf>,
    /// The PostgreSQL usage ledger, as `[billing] postgres_url`.
    #[arg(long, conflicts_with_all = ["redis", "data_dir"])]
    postgres: Option<String>,
    /// With --redis: into the usage buffer, not the store's events.
    #[arg(long, requires = "redis")]
    buffer: bool,
    /// With --redis: move the usage buffer into this ledger, then exit.
    #[arg(long, requires = "redis")]
    drain_into: Option<String>,
    #[arg(long, default_value_t = 0)]
    events: u64,
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    #[arg(long, default_value_t = 100)]
    tenants: u64,
    /// The events end now and start this many hours before.
    #[arg(long, default_value_t = 24)]
    span_hours: i64,
    /// Events per write (the usage writer's batch is 512).
    #[arg(long, default_value_t = 2000)]
    batch: u64,
}

/// Where the events go.
enum Sink {
    Store(Box<dyn Store>),
    Buffer(Box<dyn Store>),
    Ledger(Ledger),
}

impl Sink {
    async fn write(&self, batch: &[UsageEvent]) -> anyhow::Result<u64> {
        Ok(match self {
            Sink::Store(store) => store.append_usage(batch).await? as u64,
            Sink::Buffer(store) => {
                store.buffer_usage(batch).await?;
                batch.len() as u64
            }
            Sink::Ledger(ledger) => ledger.insert(batch).await? as u64,
        })
    }
}

fn ledger(url: &str) -> anyhow::Result<Ledger> {
    let config = LedgerConfig {
        url: url.to_owned(),
        pool: 2,
        retention: None,
    };
    Ok(Ledger::new(&config, Default::default())?)
}

/// The Redis store at `url`, with the TLS files given, checked as the gateway checks them.
async fn redis(url: &str, args: &Args) -> anyhow::Result<RedisStore> {
    let tls = sluice_gateway::config::redis_tls(
        Some(url),
        RedisTlsFiles {
            ca: args.redis_tls_ca.clone(),
            cert: args.redis_tls_cert.clone(),
            key: args.redis_tls_key.clone(),
        },
    )?;
    Ok(RedisStore::connect_with_tls(url, &args.prefix, &tls).await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let (Some(url), Some(into)) = (&args.redis, &args.drain_into) {
        let store: Arc<dyn Store> = Arc::new(redis(url, &args).await?);
        let target = UsageTarget::new(store, Some(Arc::new(ledger(into)?)));
        let started = Instant::now();
        let mut moved = 0;
        loop {
            let n = target.drain_buffer().await;
            if n == 0 {
                break;
            }
            moved += n;
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({"events": moved, "seconds": seconds, "events_per_second": moved as f64 / seconds})
        );
        return Ok(());
    }
    let sink = match (&args.redis, &args.data_dir, &args.postgres) {
        (Some(url), None, None) if args.buffer => Sink::Buffer(Box::new(redis(url, &args).await?)),
        (Some(url), None, None) => Sink::Store(Box::new(redis(url, &args).await?)),
        (None, Some(dir), None) => Sink::Store(Box::new(EmbeddedStore::open(dir)?)),
        (None, None, Some(url)) => Sink::Ledger(ledger(url)?),
        _ => anyhow::bail!("give --redis, --data-dir or --postgres"),
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let span_ms = args.span_hours * 3_600_000;
    let started = Instant::now();
    let (mut prompt, mut completion) = (0u64, 0u64);
    let mut written = 0u64;
    let mut next = 0u64;
    while next < args.events {
        let end = (next + args.batch).min(args.events);
        let batch: Vec<UsageEvent> = (next..end)
            .map(|i| {
                let event = generated(i, args.events, args.keys, args.tenants, now_ms, span_ms);
                prompt += event.prompt_tokens;
                completion += event.completion_tokens;
                event
            })
            .collect();
        written += sink.write(&batch).await?;
        next = end;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "events": written, "prompt_tokens": prompt, "completion_tokens": completion,
            "seconds": seconds, "events_per_second": written as f64 / seconds,
        })
    );
    Ok(())
}

/// Event `i` of `count`, spread evenly over the span that ends at `now_ms`.
fn generated(i: u64, count: u64, keys: u64, tenants: u64, now_ms: i64, span_ms: i64) -> UsageEvent {
    let key = i % keys;
    let time_ms = now_ms - span_ms + (span_ms as i128 * i as i128 / count.max(1) as i128) as i64;
    UsageEvent {
        id: format!("fill-{i:012}"),
        time_ms,
        request_id: format!("req-fill-{i}"),
        key_id: format!("key_fill_{key:06}"),
        tenant: format!("tenant-{}", key % tenants),
        tier: "pro".into(),
        model: if i.is_multiple_of(4) {
            "sim-large"
        } else {
            "sluice-sim"
        }
        .into(),
        backend: "http://127.0.0.1:9000".into(),
        route: "/v1/chat/completions".into(),
        prompt_tokens: 20 + i % 200,
        completion_tokens: 1 + (i * 7919) % 400,
        cached_tokens: 0,
        cache_status: "miss".into(),
        status: 200,
        latency_ms: 50 + i % 500,
        ttft_ms: Some(10 + i % 90),
        client_disconnected: false,
        usage_reported: true,
        usage_source: UsageSource::Reported,
    }
}
