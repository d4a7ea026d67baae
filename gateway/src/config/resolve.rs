//! How does the file become the configuration in force? Each section resolved on its own:
//! defaults applied, environment overrides taken, values checked. Every error names the
//! field it is about.

use super::file::*;
use super::{
    invalid, BackendConfig, BackendKind, BackendTls, CacheConfig, ConfigError, Env, JwtConfig,
    LearnedVerifierConfig, PublicKeyConfig, VerificationConfig, DEFAULT_ADMIN_LISTEN,
    DEFAULT_LISTEN, DEFAULT_MAX_BODY_BYTES,
};
use crate::backend_spec::BackendSpec;
use sluice_policies::pricing::PriceBook;
use sluice_policies::{Tier, Tiers};
use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

/// Requests one replica carries at once before it sheds more with 503.
const DEFAULT_MAX_IN_FLIGHT: usize = 4096;
/// Request-body bytes one replica holds at once before it sheds more with 503: an eighth of
/// the manifests' 2 GiB pod.
const DEFAULT_BODY_BYTES_IN_FLIGHT: usize = 256 << 20;
/// Client connections one replica holds open (more are closed at once): well above what the
/// in-flight mark lets work, so idle keep-alive connections have room, and well below the
/// file descriptors a service is usually given (raise `ulimit -n` past it).
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// `[server]`: listeners, limits, the store and the admin credential.
pub(super) struct Server {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_body_bytes: usize,
    pub redis_url: Option<String>,
    pub redis_prefix: String,
    pub redis_tls: crate::store::RedisTls,
    pub admin_token: Option<String>,
    pub threads: usize,
    pub data_dir: PathBuf,
    pub grace_period_secs: u64,
    pub marks: crate::overload::Marks,
    pub body_read_timeout: std::time::Duration,
    pub admin_max_connections: usize,
    pub admin_header_timeout: std::time::Duration,
    pub max_connections: usize,
    pub header_timeout: std::time::Duration,
}

pub(super) fn server(s: ServerSection, base_dir: &Path, env: Env) -> Result<Server, ConfigError> {
    let listen = socket_addr(
        "server.listen (SLUICE_LISTEN)",
        &env("SLUICE_LISTEN")
            .or(s.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned()),
    )?;
    let admin_listen = socket_addr(
        "server.admin_listen (SLUICE_ADMIN_LISTEN)",
        &env("SLUICE_ADMIN_LISTEN")
            .or(s.admin_listen)
            .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_owned()),
    )?;
    if listen == admin_listen {
        return Err(invalid(
            "server.admin_listen",
            format!("must differ from server.listen ({listen})"),
        ));
    }
    let max_body_bytes = match env("SLUICE_MAX_BODY_BYTES") {
        Some(v) => v.parse().map_err(|_| {
            invalid(
                "SLUICE_MAX_BODY_BYTES",
                format!("'{v}' is not a byte count"),
            )
        })?,
        None => s.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
    };
    if max_body_bytes == 0 {
        return Err(invalid("server.max_body_bytes", "must be greater than 0"));
    }
    let redis_url = env("SLUICE_REDIS_URL").or(s.redis_url);
    if let Some(urls) = &redis_url {
        // One URL, or a comma-separated list of Redis Cluster nodes.
        for url in urls.split(',').map(str::trim) {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(invalid(
                    "server.redis_url (SLUICE_REDIS_URL)",
                    format!("'{url}' is not a redis:// or rediss:// URL"),
                ));
            }
        }
    }
    let redis_tls = redis_tls(
        redis_url.as_deref(),
        RedisTlsFiles {
            ca: env("SLUICE_REDIS_TLS_CA")
                .map(PathBuf::from)
                .or_else(|| s.redis_tls_ca_file.map(|f| base_dir.join(f))),
            cert: env("SLUICE_REDIS_TLS_CERT")
                .map(PathBuf::from)
                .or_else(|| s.redis_tls_cert_file.map(|f| base_dir.join(f))),
            key: env("SLUICE_REDIS_TLS_KEY")
                .map(PathBuf::from)
                .or_else(|| s.redis_tls_key_file.map(|f| base_dir.join(f))),
        },
    )?;
    let redis_prefix = env("SLUICE_REDIS_PREFIX")
        .or(s.redis_prefix)
        .unwrap_or_else(|| "sluice".to_owned());
    if redis_prefix.is_empty() || redis_prefix.contains(['{', '}', ' ']) {
        return Err(invalid(
            "server.redis_prefix (SLUICE_REDIS_PREFIX)",
            "must be non-empty, without braces or spaces",
        ));
    }
    let admin_token = env("SLUICE_ADMIN_TOKEN").or(s.admin_token);
    if let Some(token) = &admin_token {
        if token.len() < 16 {
            return Err(invalid(
                "server.admin_token (SLUICE_ADMIN_TOKEN)",
                "must be at least 16 characters",
            ));
        }
    }
    let threads = s.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
    });
    if threads == 0 {
        return Err(invalid("server.threads", "must be at least 1"));
    }
    let data_dir = env("SLUICE_DATA_DIR")
        .map(PathBuf::from)
        .or(s.data_dir)
        .unwrap_or_else(|| PathBuf::from("sluice-data"));

    let marks = crate::overload::Marks {
        max_in_flight: s.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT),
        max_body_bytes_in_flight: s
            .max_body_bytes_in_flight
            .unwrap_or(DEFAULT_BODY_BYTES_IN_FLIGHT.max(max_body_bytes)),
    };
    if marks.max_in_flight == 0 {
        return Err(invalid("server.max_in_flight", "must be at least 1"));
    }
    if marks.max_body_bytes_in_flight < max_body_bytes {
        return Err(invalid(
            "server.max_body_bytes_in_flight",
            format!("must be at least server.max_body_bytes ({max_body_bytes}), or no request of the largest size could be read"),
        ));
    }
    let seconds = |field: &str, value: Option<u64>, default: u64| match value.unwrap_or(default) {
        0 => Err(invalid(field, "must be at least 1 second")),
        n => Ok(std::time::Duration::from_secs(n)),
    };
    let body_read_timeout = seconds(
        "server.body_read_timeout_secs",
        s.body_read_timeout_secs,
        30,
    )?;
    let admin_header_timeout = seconds(
        "server.admin_header_timeout_secs",
        s.admin_header_timeout_secs,
        10,
    )?;
    let header_timeout = seconds("server.header_timeout_secs", s.header_timeout_secs, 60)?;
    let max_connections = s.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if max_connections == 0 {
        return Err(invalid("server.max_connections", "must be at least 1"));
    }
    let admin_max_connections = s.admin_max_connections.unwrap_or(256);
    if admin_max_connections == 0 {
        return Err(invalid(
            "server.admin_max_connections",
            "must be at least 1",
        ));
    }

    Ok(Server {
        listen,
        admin_listen,
        max_body_bytes,
        redis_url,
        redis_prefix,
        redis_tls,
        admin_token,
        threads,
        data_dir,
        grace_period_secs: s.grace_period_secs.unwrap_or(10),
        marks,
        body_read_timeout,
        admin_max_connections,
        admin_header_timeout,
        max_connections,
        header_timeout,
    })
}

/// `[server] redis_tls_*_file`: the files a `rediss://` store trusts and shows, with paths
/// resolved (a file's relative to the config file, the environment's as given).
#[derive(Debug, Default)]
pub struct RedisTlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Reads and checks the Redis TLS files for `redis_url`, so a missing or wrong file stops
/// start-up here rather than failing every connection later.
pub fn redis_tls(
    redis_url: Option<&str>,
    files: RedisTlsFiles,
) -> Result<crate::store::RedisTls, ConfigError> {
    use crate::store::RedisTls;
    const CA: &str = "server.redis_tls_ca_file (SLUICE_REDIS_TLS_CA)";
    const CERT: &str = "server.redis_tls_cert_file (SLUICE_REDIS_TLS_CERT)";
    const KEY: &str = "server.redis_tls_key_file (SLUICE_REDIS_TLS_KEY)";
    let RedisTlsFiles { ca, cert, key } = files;
    let nodes: Vec<&str> = redis_url
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    let secure = nodes.iter().filter(|n| n.starts_with("rediss://")).count();
    if secure > 0 && secure < nodes.len() {
        // The cluster client takes TLS or not from the first node for all of them.
        return Err(invalid(
            "server.redis_url (SLUICE_REDIS_URL)",
            "mixes redis:// and rediss:// nodes: a cluster is spoken to with TLS or without it, on every node",
        ));
    }
    if let Some((field, _)) = [(CA, &ca), (CERT, &cert), (KEY, &key)]
        .into_iter()
        .find(|(_, file)| file.is_some())
    {
        if secure == 0 {
            return Err(invalid(
                field,
                "applies only to a rediss:// server.redis_url (SLUICE_REDIS_URL); use rediss:// for TLS to Redis",
            ));
        }
    }
    let read = |field: &str, file: &Path| {
        std::fs::read(file)
            .map_err(|e| invalid(field, format!("cannot read {}: {e}", file.display())))
    };
    let pem = |field: &str, file: &Path, check: fn(&[u8]) -> Result<(), crate::store::PemError>| {
        let bytes = read(field, file)?;
        check(&bytes).map_err(|e| invalid(field, format!("{} {e}", file.display())))?;
        Ok::<_, ConfigError>(bytes)
    };
    let ca = ca
        .map(|file| pem(CA, &file, RedisTls::check_certificates))
        .transpose()?;
    let client = match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some((
            pem(CERT, &cert, RedisTls::check_certificates)?,
            pem(KEY, &key, RedisTls::check_private_key)?,
        )),
        (Some(_), None) => {
            return Err(invalid(
                KEY,
                "is required with a client certificate (redis_tls_cert_file)",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                CERT,
                "is required with a client key (redis_tls_key_file)",
            ))
        }
    };
    Ok(RedisTls::new(ca, client))
}

/// `[tiers.*]`: the built-in tiers unless the file declares its own.
pub(super) fn tiers(declared: BTreeMap<String, TierSection>) -> Result<Tiers, ConfigError> {
    Ok(if declared.is_empty() {
        Tiers::builtin()
    } else {
        Tiers::new(declared.into_iter().map(|(name, t)| Tier {
            name,
            currency: t.currency,
            limits: t.limits,
            on_store_unavailable: t.on_store_unavailable,
            request_caps: t.request_caps,
            models: sluice_policies::ModelLists {
                allowed_models: t.allowed_models,
                denied_models: t.denied_models,
            },
            model_limits: t.model_limits,
        }))
        .map_err(|e| invalid("tiers", e.to_string()))?
    })
}

/// `[[backends]]`, or `SLUICE_BACKENDS` in their place; names must be unique.
pub(super) fn backends(
    declared: Vec<BackendSpec>,
    base_dir: &Path,
    env: Env,
) -> Result<Vec<BackendConfig>, ConfigError> {
    let backends = match env("SLUICE_BACKENDS") {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .enumerate()
            .map(|(i, url)| {
                resolve_backend(
                    &format!("SLUICE_BACKENDS[{i}]"),
                    BackendSpec::plain(None, url.to_owned(), Vec::new()),
                    base_dir,
                    env,
                )
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => declared
            .into_iter()
            .enumerate()
            .map(|(i, b)| resolve_backend(&format!("backends[{i}]"), b, base_dir, env))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let mut names = std::collections::HashSet::new();
    for b in &backends {
        if !names.insert(b.name.as_str()) {
            return Err(invalid(
                "backends",
                format!("two backends are named '{}'", b.name),
            ));
        }
    }

    Ok(backends)
}

/// `[fallbacks]`: each list names other models, once each, none the one it stands in for.
pub(super) fn fallbacks(
    fallbacks: BTreeMap<String, Vec<String>>,
    aliases: &BTreeMap<String, BTreeMap<String, String>>,
) -> Result<BTreeMap<String, Vec<String>>, ConfigError> {
    for (model, targets) in &fallbacks {
        let field = format!("fallbacks.{model}");
        if targets.is_empty() {
            return Err(invalid(field, "lists no model to fall back to"));
        }
        for (i, target) in targets.iter().enumerate() {
            if target.is_empty() || target == model {
                return Err(invalid(format!("{field}[{i}]"), "must name another model"));
            }
            if aliases.contains_key(target) {
                return Err(invalid(
                    format!("{field}[{i}]"),
                    format!("'{target}' is an alias; name the model it stands for"),
                ));
            }
            if targets[..i].contains(target) {
                return Err(invalid(
                    format!("{field}[{i}]"),
                    format!("'{target}' is listed twice"),
                ));
            }
        }
    }
    Ok(fallbacks)
}

/// `[server.tls]`: certificate and key (or `SLUICE_TLS_CERT` and `SLUICE_TLS_KEY`), read
/// now so that a bad pair stops the start instead of the first handshake.
pub(super) fn tls(
    section: Option<TlsSection>,
    base_dir: &Path,
    env: Env,
) -> Result<Option<crate::tls::ListenerTls>, ConfigError> {
    let section = section.unwrap_or_default();
    let cert_file = env("SLUICE_TLS_CERT")
        .map(PathBuf::from)
        .or(section.cert_file.map(|f| base_dir.join(f)));
    let key_file = env("SLUICE_TLS_KEY")
        .map(PathBuf::from)
        .or(section.key_file.map(|f| base_dir.join(f)));
    let (cert_file, key_file) = match (cert_file, key_file) {
        (Some(cert), Some(key)) => (cert, key),
        (None, None) => {
            let set = section.http2.is_some()
                || section.admin.is_some()
                || section.admin_client_ca_file.is_some()
                || section.reload_check_secs.is_some();
            if set {
                return Err(invalid(
                    "server.tls",
                    "needs cert_file and key_file (or SLUICE_TLS_CERT and SLUICE_TLS_KEY)",
                ));
            }
            return Ok(None);
        }
        (Some(_), None) => {
            return Err(invalid(
                "server.tls.key_file (SLUICE_TLS_KEY)",
                "is needed with cert_file",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                "server.tls.cert_file (SLUICE_TLS_CERT)",
                "is needed with key_file",
            ))
        }
    };
    crate::tls::ServedCertificate::load(&cert_file, &key_file)
        .map_err(|e| invalid("server.tls", format!("{e:#}")))?;
    let admin = section.admin.unwrap_or(true);
    let admin_client_ca_file = section.admin_client_ca_file.map(|f| base_dir.join(f));
    if let Some(ca) = &admin_client_ca_file {
        if !admin {
            return Err(invalid(
                "server.tls.admin_client_ca_file",
                "needs the admin listener on TLS (admin = true)",
            ));
        }
        crate::tls::certificates(ca)
            .map_err(|e| invalid("server.tls.admin_client_ca_file", format!("{e:#}")))?;
    }
    let reload_check_secs = section.reload_check_secs.unwrap_or(10);
    if reload_check_secs == 0 {
        return Err(invalid(
            "server.tls.reload_check_secs",
            "must be at least 1",
        ));
    }
    Ok(Some(crate::tls::ListenerTls {
        cert_file,
        key_file,
        http2: section.http2.unwrap_or(true),
        admin,
        admin_client_ca_file,
        reload_check: std::time::Duration::from_secs(reload_check_secs),
    }))
}

/// `[metering]`: on or off (`SLUICE_METERING`), and how long a hung-up stream is drained.
pub(super) fn metering(
    m: &MeteringSection,
    env: Env,
) -> Result<(bool, std::time::Duration), ConfigError> {
    let metering = match env("SLUICE_METERING") {
        Some(v) => match v.as_str() {
            "on" | "true" | "1" => true,
            "off" | "false" | "0" => false,
            _ => {
                return Err(invalid(
                    "SLUICE_METERING",
                    format!("'{v}' is not on or off"),
                ))
            }
        },
        None => m.enabled.unwrap_or(true),
    };
    let drain_limit = std::time::Duration::from_secs(m.drain_secs.unwrap_or(120));
    Ok((metering, drain_limit))
}

/// `[billing]`: the usage ledger, when a PostgreSQL URL is given (file or
/// `SLUICE_POSTGRES_URL`).
/// `[billing] nats_*`: the usage feed, when a NATS URL is given (file or `SLUICE_NATS_URL`).
pub(super) fn feed(
    b: &BillingSection,
    env: Env,
) -> Result<Option<crate::metering::FeedConfig>, ConfigError> {
    let Some(url) = env("SLUICE_NATS_URL").or_else(|| b.nats_url.clone()) else {
        return Ok(None);
    };
    if !(url.starts_with("nats://") || url.starts_with("tls://")) {
        return Err(invalid(
            "billing.nats_url (SLUICE_NATS_URL)",
            format!("'{url}' is not a nats:// URL"),
        ));
    }
    let subject = b
        .nats_subject
        .clone()
        .unwrap_or_else(|| "sluice.usage".into());
    let bad_subject = subject.is_empty()
        || subject
            .split('.')
            .any(|t| t.is_empty() || t == "*" || t == ">")
        || subject.contains(char::is_whitespace);
    if bad_subject {
        return Err(invalid(
            "billing.nats_subject",
            format!("'{subject}' is not a subject to publish on (dot-separated tokens, no wildcards or spaces)"),
        ));
    }
    let stream = b
        .nats_stream
        .clone()
        .unwrap_or_else(|| "SLUICE_USAGE".into());
    if stream.is_empty() || stream.contains(['.', '*', '>', ' ', '\t', '/', '\\']) {
        return Err(invalid(
            "billing.nats_stream",
            format!("'{stream}' is not a stream name (no dots, wildcards, spaces or slashes)"),
        ));
    }
    let window = b.nats_duplicate_window_secs.unwrap_or(600);
    if window == 0 {
        return Err(invalid(
            "billing.nats_duplicate_window_secs",
            "must be at least 1",
        ));
    }
    Ok(Some(crate::metering::FeedConfig {
        url,
        subject,
        stream,
        duplicate_window: std::time::Duration::from_secs(window),
    }))
}

pub(super) fn ledger(
    b: BillingSection,
    env: Env,
) -> Result<Option<crate::ledger::LedgerConfig>, ConfigError> {
    let Some(url) = env("SLUICE_POSTGRES_URL").or(b.postgres_url) else {
        if b.retention_days.is_some() {
            return Err(invalid(
                "billing.retention_days",
                "applies to the PostgreSQL ledger: set billing.postgres_url (SLUICE_POSTGRES_URL) too",
            ));
        }
        return Ok(None);
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(invalid(
            "billing.postgres_url (SLUICE_POSTGRES_URL)",
            format!("'{url}' is not a postgres:// URL"),
        ));
    }
    let pool = b.postgres_pool.unwrap_or(8);
    if pool == 0 {
        return Err(invalid("billing.postgres_pool", "must be at least 1"));
    }
    let retention = match b.retention_days {
        Some(0) => {
            return Err(invalid(
                "billing.retention_days",
                "must be at least 1 (leave it out to keep raw events for ever)",
            ))
        }
        Some(days) if days > 100 * 366 => {
            return Err(invalid("billing.retention_days", "must be at most 36600"))
        }
        Some(days) => Some(std::time::Duration::from_secs(days * 86_400)),
        None => None,
    };
    Ok(Some(crate::ledger::LedgerConfig {
        url,
        pool,
        retention,
    }))
}

/// `[balancer]`: every interval, threshold and timeout is positive.
pub(super) fn balancer(b: &crate::balancer::BalancerConfig) -> Result<(), ConfigError> {
    for (field, value) in [
        ("balancer.health_interval_ms", b.health_interval_ms),
        ("balancer.health_timeout_ms", b.health_timeout_ms),
        (
            "balancer.unhealthy_threshold",
            u64::from(b.unhealthy_threshold),
        ),
        ("balancer.healthy_threshold", u64::from(b.healthy_threshold)),
        ("balancer.eject_after", u64::from(b.eject_after)),
        ("balancer.connect_timeout_ms", b.connect_timeout_ms),
        ("balancer.read_timeout_secs", b.read_timeout_secs),
    ] {
        if value == 0 {
            return Err(invalid(field, "must be greater than 0"));
        }
    }
    Ok(())
}

/// `[aliases]`: each names real tiers (or `*`).
pub(super) fn aliases(
    aliases: &BTreeMap<String, BTreeMap<String, String>>,
    tiers: &Tiers,
) -> Result<(), ConfigError> {
    for (alias, by_tier) in aliases {
        for tier in by_tier.keys() {
            if tier != "*" && tiers.get(tier).is_err() {
                return Err(invalid(
                    format!("aliases.{alias}.{tier}"),
                    format!("'{tier}' is not a tier (use a tier name or \"*\")"),
                ));
            }
        }
    }
    Ok(())
}

/// `[[prices]]`: a valid book, in each tier's currency.
pub(super) fn prices(
    entries: Vec<sluice_policies::pricing::PriceEntry>,
    tiers: &Tiers,
) -> Result<PriceBook, ConfigError> {
    let prices = PriceBook::new(entries).map_err(|e| invalid("prices", e.to_string()))?;
    prices
        .validate(tiers)
        .map_err(|e| invalid("prices", e.to_string()))?;

    Ok(prices)
}

/// A busy key's lease covers twice its requests of the last second, up to this many (and a
/// quarter of any limit it counts against). At 32, a key at 16,000 requests a second took 500
/// leases a second on each replica, and taking and giving them back cost about a tenth of the
/// gateway's CPU per request (docs/benchmarks.md, "Eighth profile"); at 256 a lease lasts
/// about as long as at 2,000 requests a second before. A smaller key's leases are sized by its
/// rate and limits, as before.
const DEFAULT_LEASE_MAX_REQUESTS: u64 = 256;

/// `[quotas]`.
pub(super) struct Quotas {
    pub default_max_tokens: u64,
    pub lease_max_requests: u64,
    pub lease_ms: u64,
    pub slot_ttl_secs: u64,
}

pub(super) fn quotas(q: &QuotasSection) -> Result<Quotas, ConfigError> {
    Ok(Quotas {
        default_max_tokens: q.default_max_tokens.unwrap_or(4096),
        lease_max_requests: q.lease_max_requests.unwrap_or(DEFAULT_LEASE_MAX_REQUESTS),
        lease_ms: q.lease_ms.unwrap_or(1000),
        slot_ttl_secs: match q.slot_ttl_secs.unwrap_or(60) {
            0 => return Err(invalid("quotas.slot_ttl_secs", "must be at least 1")),
            ttl => ttl,
        },
    })
}

pub(super) fn resolve_cache(
    c: CacheSection,
    tiers: &Tiers,
    env: Env,
) -> Result<CacheConfig, ConfigError> {
    use sluice_policies::cache::{CachePolicy, CacheRules};
    let verification = resolve_verification(&c, env)?;
    let mut defaults = CacheRules::default();
    defaults.enabled = match env("SLUICE_CACHE").as_deref() {
        Some("on" | "true" | "1") => true,
        Some("off" | "false" | "0") => false,
        Some(v) => return Err(invalid("SLUICE_CACHE", format!("'{v}' is not on or off"))),
        None => c.enabled.unwrap_or(defaults.enabled),
    };
    defaults.ttl_secs = c.ttl_secs.unwrap_or(defaults.ttl_secs);
    defaults.similarity_threshold = c
        .similarity_threshold
        .unwrap_or(defaults.similarity_threshold);
    defaults.cache_unset_temperature = c
        .cache_unset_temperature
        .unwrap_or(defaults.cache_unset_temperature);
    let policy = CachePolicy {
        defaults,
        tiers: c.tiers,
        models: c.models,
    };
    policy
        .check()
        .map_err(|e| invalid("cache", e.to_string()))?;
    for tier in policy.tiers.keys() {
        if tiers.get(tier).is_err() {
            return Err(invalid(
                format!("cache.tiers.{tier}"),
                format!("'{tier}' is not a tier"),
            ));
        }
    }
    let embedding_url = env("SLUICE_CACHE_EMBEDDING_URL").or(c.embedding_url);
    if let Some(url) = &embedding_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(
                "cache.embedding_url (SLUICE_CACHE_EMBEDDING_URL)",
                format!("'{url}' is not an http:// URL"),
            ));
        }
    }
    let embedding_timeout_ms = c.embedding_timeout_ms.unwrap_or(1000);
    let max_entry_bytes = c.max_entry_bytes.unwrap_or(1 << 20);
    let max_entries = c.max_entries.unwrap_or(1_000_000);
    let max_bytes = c.max_bytes.unwrap_or(256 << 20);
    let tenant_max_percent = c.tenant_max_percent.unwrap_or(100);
    if !(1..=100).contains(&tenant_max_percent) {
        return Err(invalid(
            "cache.tenant_max_percent",
            "must be between 1 and 100",
        ));
    }
    for (field, value) in [
        ("cache.embedding_timeout_ms", embedding_timeout_ms as usize),
        ("cache.max_entry_bytes", max_entry_bytes),
        ("cache.max_entries", max_entries),
        ("cache.max_bytes", max_bytes as usize),
    ] {
        if value == 0 {
            return Err(invalid(field, "must be greater than 0"));
        }
    }
    Ok(CacheConfig {
        policy,
        embedding_url,
        embedding_model: c
            .embedding_model
            .unwrap_or_else(|| "all-MiniLM-L6-v2".to_owned()),
        embedding_api_key: env("SLUICE_CACHE_EMBEDDING_API_KEY").or(c.embedding_api_key),
        embedding_timeout: std::time::Duration::from_millis(embedding_timeout_ms),
        max_entry_bytes,
        max_entries,
        max_bytes,
        tenant_max_percent,
        verification,
    })
}

fn resolve_verification(c: &CacheSection, env: Env) -> Result<VerificationConfig, ConfigError> {
    let defaults = VerificationConfig::default();
    let retrieval_threshold = c
        .retrieval_threshold
        .unwrap_or(defaults.retrieval_threshold);
    if !(retrieval_threshold > 0.0 && retrieval_threshold <= 1.0) {
        return Err(invalid(
            "cache.retrieval_threshold",
            format!("must be between 0 and 1, not {retrieval_threshold}"),
        ));
    }
    let top_k = c.retrieval_top_k.unwrap_or(defaults.top_k);
    if !(1..=32).contains(&top_k) {
        return Err(invalid("cache.retrieval_top_k", "must be between 1 and 32"));
    }
    let learned = match env("SLUICE_CACHE_VERIFIER_URL").or(c.verifier_url.clone()) {
        None => None,
        Some(url) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    "cache.verifier_url (SLUICE_CACHE_VERIFIER_URL)",
                    format!("'{url}' is not an http:// URL"),
                ));
            }
            let threshold = c.verifier_threshold.unwrap_or(0.5);
            if !threshold.is_finite() {
                return Err(invalid("cache.verifier_threshold", "must be a number"));
            }
            let timeout_ms = c.verifier_timeout_ms.unwrap_or(300);
            if timeout_ms == 0 {
                return Err(invalid(
                    "cache.verifier_timeout_ms",
                    "must be greater than 0",
                ));
            }
            Some(LearnedVerifierConfig {
                url,
                model: c.verifier_model.clone().unwrap_or_default(),
                api_key: env("SLUICE_CACHE_VERIFIER_API_KEY").or(c.verifier_api_key.clone()),
                threshold,
                timeout: std::time::Duration::from_millis(timeout_ms),
            })
        }
    };
    Ok(VerificationConfig {
        enabled: c.verify.unwrap_or(defaults.enabled),
        retrieval_threshold,
        top_k,
        learned,
    })
}

fn socket_addr(field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    match value.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| invalid(field, format!("'{value}' resolves to no address"))),
        // A name that does not resolve says so, not that the address is malformed.
        Err(e) => Err(invalid(field, format!("'{value}': {e}"))),
    }
}

/// Which JWTs a `[auth.*]` section verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JwtUse {
    /// `[auth.jwt]`: API calls; claims name tenant and tier.
    Proxy,
    /// `[auth.admin_jwt]`: the admin API; the role claim says admin or viewer.
    Admin,
}

impl JwtUse {
    fn section(self) -> &'static str {
        match self {
            JwtUse::Proxy => "auth.jwt",
            JwtUse::Admin => "auth.admin_jwt",
        }
    }

    fn secret_env(self) -> &'static str {
        match self {
            JwtUse::Proxy => "SLUICE_JWT_HS256_SECRET",
            JwtUse::Admin => "SLUICE_ADMIN_JWT_HS256_SECRET",
        }
    }
}

pub(super) fn resolve_jwt(
    j: JwtSection,
    base_dir: &Path,
    used_for: JwtUse,
    env: Env,
) -> Result<JwtConfig, ConfigError> {
    use jsonwebtoken::Algorithm;
    let section = used_for.section();
    if used_for == JwtUse::Admin {
        // An admin token must be minted for this gateway's admin API by a known issuer; a
        // token for some other audience must never open it.
        for (name, value) in [("issuer", &j.issuer), ("audience", &j.audience)] {
            if value.as_deref().is_none_or(str::is_empty) {
                return Err(invalid(
                    format!("{section}.{name}"),
                    "is required for admin tokens",
                ));
            }
        }
    }
    let mut public_keys = Vec::new();
    for (i, k) in j.public_keys.into_iter().enumerate() {
        let field = format!("{section}.public_keys[{i}]");
        let algorithm = match k.alg.as_str() {
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            other => {
                return Err(invalid(
                    format!("{field}.alg"),
                    format!("'{other}' is not supported; use RS256 or ES256"),
                ))
            }
        };
        let pem = match (k.pem, k.pem_file) {
            (Some(pem), None) => pem,
            (None, Some(file)) => {
                let file = base_dir.join(file);
                std::fs::read_to_string(&file).map_err(|e| {
                    invalid(
                        format!("{field}.pem_file"),
                        format!("cannot read {}: {e}", file.display()),
                    )
                })?
            }
            _ => return Err(invalid(field, "give exactly one of pem or pem_file")),
        };
        let parsed = match algorithm {
            Algorithm::ES256 => jsonwebtoken::DecodingKey::from_ec_pem(pem.as_bytes()),
            _ => jsonwebtoken::DecodingKey::from_rsa_pem(pem.as_bytes()),
        };
        if let Err(e) = parsed {
            return Err(invalid(
                field,
                format!("not a {} public key in PEM form: {e}", k.alg),
            ));
        }
        public_keys.push(PublicKeyConfig {
            algorithm,
            pem,
            kid: k.kid,
        });
    }
    let hs256_secret = env(used_for.secret_env()).or(j.hs256_secret);
    if let Some(secret) = &hs256_secret {
        if secret.len() < 32 {
            return Err(invalid(
                format!("{section}.hs256_secret"),
                "must be at least 32 bytes long",
            ));
        }
    }
    let jwks = match j.jwks_url {
        Some(url) => {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(invalid(
                    format!("{section}.jwks_url"),
                    format!("'{url}' is not an https:// or http:// URL"),
                ));
            }
            let seconds = |field: &str, value: Option<u64>, default: u64| match value {
                Some(0) => Err(invalid(
                    format!("{section}.{field}"),
                    "must be at least 1 second",
                )),
                v => Ok(std::time::Duration::from_secs(v.unwrap_or(default))),
            };
            Some(super::JwksConfig {
                url,
                refresh: seconds("jwks_refresh_secs", j.jwks_refresh_secs, 300)?,
                min_refresh: seconds("jwks_min_refresh_secs", j.jwks_min_refresh_secs, 10)?,
            })
        }
        None => None,
    };
    if hs256_secret.is_none() && public_keys.is_empty() && jwks.is_none() {
        return Err(invalid(
            section,
            "needs hs256_secret, at least one of public_keys, or jwks_url",
        ));
    }
    Ok(JwtConfig {
        issuer: j.issuer,
        audience: j.audience,
        hs256_secret,
        public_keys,
        tenant_claim: j.tenant_claim.unwrap_or_else(|| "tenant".to_owned()),
        tier_claim: j.tier_claim.unwrap_or_else(|| "tier".to_owned()),
        role_claim: j.role_claim.unwrap_or_else(|| "role".to_owned()),
        leeway_secs: j.leeway_secs.unwrap_or(30),
        jwks,
    })
}

/// `[alerts]`: where spend alerts go, signed with what, at which thresholds.
pub(super) fn alerts(
    a: AlertsSection,
    env: Env,
) -> Result<crate::alerts::AlertsConfig, ConfigError> {
    if let Some(url) = &a.webhook_url {
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(invalid(
                "alerts.webhook_url",
                format!("'{url}' is not an https:// or http:// URL"),
            ));
        }
    }
    let secret = env("SLUICE_ALERTS_WEBHOOK_SECRET").or(a.webhook_secret);
    match (&a.webhook_url, &secret) {
        (Some(_), None) => {
            return Err(invalid(
                "alerts.webhook_secret (SLUICE_ALERTS_WEBHOOK_SECRET)",
                "is required with a webhook_url: receivers check each delivery's signature",
            ))
        }
        (_, Some(s)) if s.len() < 16 => {
            return Err(invalid(
                "alerts.webhook_secret (SLUICE_ALERTS_WEBHOOK_SECRET)",
                "must be at least 16 characters",
            ))
        }
        _ => {}
    }
    let thresholds = a.thresholds.unwrap_or_else(|| vec![50, 80, 100]);
    sluice_policies::alerts::validate(&thresholds).map_err(|e| invalid("alerts.thresholds", e))?;
    let check_interval_ms = a.check_interval_ms.unwrap_or(5_000);
    if check_interval_ms < 100 {
        return Err(invalid("alerts.check_interval_ms", "must be at least 100"));
    }
    Ok(crate::alerts::AlertsConfig {
        webhook: a.webhook_url.zip(secret),
        thresholds,
        check_interval: std::time::Duration::from_millis(check_interval_ms),
    })
}

/// `[datasets]`: how much of the distillation dataset is kept, and what capture may hold.
pub(super) fn datasets(
    d: &DatasetsSection,
) -> Result<crate::datasets::DatasetsConfig, ConfigError> {
    let defaults = crate::datasets::DatasetsConfig::default();
    let positive = |field: &'static str, value: Option<usize>, default: usize| match value {
        Some(0) => Err(invalid(field, "must be at least 1")),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let retention_days = match d.retention_days {
        Some(0) => return Err(invalid("datasets.retention_days", "must be at least 1")),
        Some(days) if days > 36_500 => {
            return Err(invalid("datasets.retention_days", "must be at most 36500"))
        }
        Some(days) => std::time::Duration::from_secs(days * 86_400),
        None => defaults.retention,
    };
    Ok(crate::datasets::DatasetsConfig {
        retention: retention_days,
        max_records: positive("datasets.max_records", d.max_records, defaults.max_records)?,
        max_answer_bytes: positive(
            "datasets.max_answer_bytes",
            d.max_answer_bytes,
            defaults.max_answer_bytes,
        )?,
        queue_bytes: positive("datasets.queue_bytes", d.queue_bytes, defaults.queue_bytes)?,
    })
}

/// A backend added at run time (the admin API), checked as a `[[backends]]` entry would be,
/// on each replica that applies it: its files must be absolute paths (each replica reads them
/// from its own disk) and its key's environment variable set there.
pub fn backend(name: &str, mut spec: BackendSpec) -> Result<BackendConfig, ConfigError> {
    if let Some((field, file)) = spec.files().find(|(_, f)| !f.is_absolute()) {
        return Err(invalid(
            format!("backend.{field}"),
            format!(
                "'{}' must be an absolute path (each replica reads it from its own disk)",
                file.display()
            ),
        ));
    }
    spec.name = Some(name.to_owned());
    resolve_backend("backend", spec, Path::new("/"), &super::process_env)
}

pub(super) fn resolve_backend(
    field: &str,
    b: BackendSpec,
    base_dir: &Path,
    env: Env,
) -> Result<BackendConfig, ConfigError> {
    let spec = b.clone();
    let url_field = format!("{field}.url");
    let uri: http::Uri = b
        .url
        .parse()
        .map_err(|e| invalid(&url_field, format!("'{}': {e}", b.url)))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(invalid(
                &url_field,
                format!("'{}' must be an http:// or https:// URL", b.url),
            ))
        }
    };
    let authority = uri
        .authority()
        .ok_or_else(|| invalid(&url_field, format!("'{}' has no host", b.url)))?;
    if authority.as_str().contains('@') {
        return Err(invalid(
            &url_field,
            "must not carry credentials; use api_key_env or api_key_file",
        ));
    }
    if uri.query().is_some() {
        return Err(invalid(
            &url_field,
            format!("'{}' must not have a query", b.url),
        ));
    }
    let default_port = if https { 443 } else { 80 };
    let port = authority.port_u16().unwrap_or(default_port);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let addr = socket_addr(&url_field, &format!("{}:{port}", authority.host()))?;
    let scheme = if https { "https" } else { "http" };
    let origin = format!("{scheme}://{}:{port}", authority.host());
    let path = uri.path().trim_end_matches('/');
    let base_path = match path {
        "" => "/v1".to_owned(),
        path => path.to_owned(),
    };
    let kind = match b.kind.as_deref() {
        None => BackendKind::Sluice,
        Some(name) => BackendKind::named(name).ok_or_else(|| {
            invalid(
                format!("{field}.kind"),
                format!("'{name}' is not sluice or openai_compatible"),
            )
        })?,
    };
    for (i, m) in b.models.iter().enumerate() {
        if m.is_empty() {
            return Err(invalid(format!("{field}.models[{i}]"), "is empty"));
        }
    }
    for (from, to) in &b.model_map {
        if from.is_empty() || to.is_empty() {
            return Err(invalid(
                format!("{field}.model_map"),
                "names an empty model",
            ));
        }
    }
    // A backend whose names are mapped serves the names it is mapped from.
    let mut models = b.models;
    for from in b.model_map.keys() {
        if !models.contains(from) {
            models.push(from.clone());
        }
    }
    let file = |f: PathBuf| base_dir.join(f);
    let tls = if https {
        let client_cert = match (b.client_cert_file.map(file), b.client_key_file.map(file)) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    format!("{field}.client_cert_file"),
                    "client_cert_file and client_key_file go together",
                ))
            }
        };
        let ca_file = b.ca_file.map(file);
        let trust = crate::tls::BackendTrust::load(
            ca_file.as_deref(),
            client_cert
                .as_ref()
                .map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .map_err(|e| invalid(field, format!("{e:#}")))?;
        Some(BackendTls {
            server_name: host.to_owned(),
            trust,
            http2: b.http2.unwrap_or(false),
        })
    } else {
        let tls_only = [
            (b.ca_file.is_some(), "ca_file"),
            (b.client_cert_file.is_some(), "client_cert_file"),
            (b.client_key_file.is_some(), "client_key_file"),
            (b.http2.is_some(), "http2"),
        ];
        if let Some((_, option)) = tls_only.iter().find(|(set, _)| *set) {
            return Err(invalid(
                format!("{field}.{option}"),
                "applies to https:// backends only",
            ));
        }
        None
    };
    let credential = upstream_credential(
        field,
        b.api_key_env,
        b.api_key_file,
        b.api_key_header,
        base_dir,
        env,
    )?;
    let mut headers = Vec::with_capacity(b.headers.len());
    for (name, value) in b.headers {
        let header_name = http::HeaderName::try_from(name.as_str()).map_err(|_| {
            invalid(
                format!("{field}.headers"),
                format!("'{name}' is not a header name"),
            )
        })?;
        if header_name == http::header::AUTHORIZATION {
            return Err(invalid(
                format!("{field}.headers"),
                "an API key goes in api_key_env or api_key_file, not the configuration text",
            ));
        }
        if matches!(
            header_name.as_str(),
            "host" | "content-length" | "transfer-encoding" | "connection"
        ) {
            return Err(invalid(
                format!("{field}.headers"),
                format!("'{name}' is the gateway's to set"),
            ));
        }
        let header_value = http::HeaderValue::try_from(value)
            .map_err(|_| invalid(format!("{field}.headers.{name}"), "is not a header value"))?;
        headers.push((header_name, header_value));
    }
    let host_header = if port == default_port {
        authority.host().to_owned()
    } else {
        format!("{}:{port}", authority.host())
    };
    Ok(BackendConfig {
        name: b
            .name
            .unwrap_or_else(|| format!("{}:{port}", authority.host())),
        url: format!("{origin}{path}"),
        host: host_header,
        addr,
        lookup: host
            .parse::<std::net::IpAddr>()
            .is_err()
            .then(|| (host.to_owned(), port)),
        base_path,
        models,
        kind,
        tls,
        credential,
        headers,
        model_map: b.model_map,
        priority: b.priority.unwrap_or(0),
        spec,
    })
}

/// The API key a backend is sent, from an environment variable or a file, in the header it
/// goes in.
fn upstream_credential(
    field: &str,
    from_env: Option<String>,
    from_file: Option<PathBuf>,
    header: Option<String>,
    base_dir: &Path,
    env: Env,
) -> Result<Option<super::UpstreamCredential>, ConfigError> {
    let key = match (from_env, from_file) {
        (None, None) => {
            if header.is_some() {
                return Err(invalid(
                    format!("{field}.api_key_header"),
                    "needs api_key_env or api_key_file",
                ));
            }
            return Ok(None);
        }
        (Some(var), None) => env(&var).ok_or_else(|| {
            invalid(
                format!("{field}.api_key_env"),
                format!("the environment variable {var} is not set"),
            )
        })?,
        (None, Some(file)) => {
            let path = base_dir.join(file);
            std::fs::read_to_string(&path)
                .map_err(|e| {
                    invalid(
                        format!("{field}.api_key_file"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?
                .trim()
                .to_owned()
        }
        (Some(_), Some(_)) => {
            return Err(invalid(
                format!("{field}.api_key_env"),
                "give api_key_env or api_key_file, not both",
            ))
        }
    };
    if key.is_empty() {
        return Err(invalid(format!("{field}.api_key_env"), "the key is empty"));
    }
    let (header, value) = match header.as_deref().map(str::to_ascii_lowercase) {
        None => (http::header::AUTHORIZATION, format!("Bearer {key}")),
        Some(name) if name == "authorization" => {
            (http::header::AUTHORIZATION, format!("Bearer {key}"))
        }
        Some(name) => (
            http::HeaderName::try_from(name.as_str()).map_err(|_| {
                invalid(
                    format!("{field}.api_key_header"),
                    format!("'{name}' is not a header name"),
                )
            })?,
            key,
        ),
    };
    // The key itself is never part of an error message.
    let mut value = http::HeaderValue::try_from(value).map_err(|_| {
        invalid(
            format!("{field}.api_key_env"),
            "the key has characters a header cannot carry",
        )
    })?;
    value.set_sensitive(true);
    Ok(Some(super::UpstreamCredential { header, value }))
}
