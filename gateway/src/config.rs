//! What this gateway was told to be: one TOML file, with environment variables for what a
//! deployment overrides. Every error names the field it is about, and stops start-up.

use serde::Deserialize;
use sluice_policies::pricing::{PriceBook, PriceEntry};
use sluice_policies::{Limits, Tier, Tiers};
use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";
/// Large enough for long-context prompts; small enough that one client cannot tie up memory.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The configuration in force, resolved and validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_body_bytes: usize,
    pub data_dir: PathBuf,
    pub redis_url: Option<String>,
    pub redis_prefix: String,
    pub admin_token: Option<String>,
    pub threads: usize,
    pub grace_period_secs: u64,
    pub jwt: Option<JwtConfig>,
    pub tiers: Tiers,
    pub backends: Vec<BackendConfig>,
    /// Prices per model and tier; a model without a price costs nothing.
    pub prices: PriceBook,
    pub balancer: crate::balancer::BalancerConfig,
    /// Model aliases: alias -> (tier or "*") -> model.
    pub aliases: BTreeMap<String, BTreeMap<String, String>>,
    /// The completion cap reserved for a request that names no max_tokens.
    pub default_max_tokens: u64,
    /// The most requests one quota lease may cover; 0 or 1 turns leases off.
    pub lease_max_requests: u64,
    /// How long a lease may admit from memory.
    pub lease_ms: u64,
    /// How long a concurrency slot is held unless its request renews it (every quarter of
    /// this while it runs) or ends; what a replica that died mid-request holds at most.
    pub slot_ttl_secs: u64,
    /// Read usage from responses and record a usage event per request.
    pub metering: bool,
    /// How long the gateway keeps reading a backend's answer after its client hung up, so
    /// that what was generated is known and billed.
    pub drain_limit: std::time::Duration,
    pub cache: CacheConfig,
}

/// `[cache]`: the response cache's rules, and where prompts are embedded for semantic hits.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub policy: sluice_policies::cache::CachePolicy,
    /// An OpenAI-compatible `/v1/embeddings` URL; without one only exact hits are served.
    pub embedding_url: Option<String>,
    pub embedding_model: String,
    pub embedding_api_key: Option<String>,
    pub embedding_timeout: std::time::Duration,
    /// Larger answers are not kept.
    pub max_entry_bytes: usize,
    /// Entries each replica indexes at most; past it new answers are not kept.
    pub max_entries: usize,
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub hs256_secret: Option<String>,
    pub public_keys: Vec<PublicKeyConfig>,
    pub tenant_claim: String,
    pub tier_claim: String,
    pub role_claim: String,
    pub leeway_secs: u64,
}

#[derive(Debug, Clone)]
pub struct PublicKeyConfig {
    pub algorithm: jsonwebtoken::Algorithm,
    pub pem: String,
    pub kid: Option<String>,
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub name: String,
    /// `http://host:port` as configured.
    pub url: String,
    pub addr: SocketAddr,
    /// Models this backend serves; empty means "ask its `/v1/models`".
    pub models: Vec<String>,
}

// ---- the file, as written ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    auth: AuthSection,
    #[serde(default)]
    tiers: BTreeMap<String, TierSection>,
    #[serde(default)]
    backends: Vec<BackendSection>,
    #[serde(default)]
    metering: MeteringSection,
    #[serde(default)]
    prices: Vec<PriceEntry>,
    #[serde(default)]
    quotas: QuotasSection,
    #[serde(default)]
    balancer: crate::balancer::BalancerConfig,
    #[serde(default)]
    aliases: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    cache: CacheSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheSection {
    enabled: Option<bool>,
    ttl_secs: Option<u64>,
    similarity_threshold: Option<f32>,
    cache_unset_temperature: Option<bool>,
    embedding_url: Option<String>,
    embedding_model: Option<String>,
    embedding_api_key: Option<String>,
    embedding_timeout_ms: Option<u64>,
    max_entry_bytes: Option<usize>,
    max_entries: Option<usize>,
    #[serde(default)]
    tiers: BTreeMap<String, sluice_policies::cache::RuleOverrides>,
    #[serde(default)]
    models: BTreeMap<String, sluice_policies::cache::RuleOverrides>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotasSection {
    default_max_tokens: Option<u64>,
    slot_ttl_secs: Option<u64>,
    lease_max_requests: Option<u64>,
    lease_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MeteringSection {
    enabled: Option<bool>,
    drain_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    listen: Option<String>,
    admin_listen: Option<String>,
    max_body_bytes: Option<usize>,
    data_dir: Option<PathBuf>,
    redis_url: Option<String>,
    redis_prefix: Option<String>,
    admin_token: Option<String>,
    threads: Option<usize>,
    grace_period_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthSection {
    jwt: Option<JwtSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JwtSection {
    issuer: Option<String>,
    audience: Option<String>,
    hs256_secret: Option<String>,
    #[serde(default)]
    public_keys: Vec<PublicKeySection>,
    tenant_claim: Option<String>,
    tier_claim: Option<String>,
    role_claim: Option<String>,
    leeway_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublicKeySection {
    alg: String,
    pem: Option<String>,
    pem_file: Option<PathBuf>,
    kid: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierSection {
    #[serde(default = "default_currency")]
    currency: String,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    on_store_unavailable: sluice_policies::FailMode,
    #[serde(default)]
    request_caps: sluice_policies::RequestCaps,
}

fn default_currency() -> String {
    "USD".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendSection {
    name: Option<String>,
    url: String,
    #[serde(default)]
    models: Vec<String>,
}

/// Where environment overrides come from; a function so tests need not touch the process env.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Config {
    /// The model an alias names for `tier`, if `model` is an alias.
    pub fn resolve_alias(&self, model: &str, tier: &str) -> Option<&str> {
        let by_tier = self.aliases.get(model)?;
        by_tier
            .get(tier)
            .or_else(|| by_tier.get("*"))
            .map(String::as_str)
    }

    /// Loads `path` (or the built-in defaults when `None`) and applies the environment.
    pub fn load(path: Option<&Path>, env: Env) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        let base_dir = path.and_then(Path::parent).unwrap_or(Path::new("."));
        Config::resolve(file, base_dir, env)
    }

    /// Parses config text; for tests and `sluice check`.
    pub fn from_toml(text: &str, env: Env) -> Result<Config, ConfigError> {
        let file = toml::from_str::<FileConfig>(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            message: e.to_string(),
        })?;
        Config::resolve(file, Path::new("."), env)
    }

    fn resolve(file: FileConfig, base_dir: &Path, env: Env) -> Result<Config, ConfigError> {
        let s = file.server;
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
                        format!("'{url}' is not a redis:// URL"),
                    ));
                }
            }
        }
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

        let jwt = file
            .auth
            .jwt
            .map(|j| resolve_jwt(j, base_dir))
            .transpose()?;

        let tiers = if file.tiers.is_empty() {
            Tiers::builtin()
        } else {
            Tiers::new(file.tiers.into_iter().map(|(name, t)| Tier {
                name,
                currency: t.currency,
                limits: t.limits,
                on_store_unavailable: t.on_store_unavailable,
                request_caps: t.request_caps,
            }))
            .map_err(|e| invalid("tiers", e.to_string()))?
        };

        let backends = match env("SLUICE_BACKENDS") {
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .enumerate()
                .map(|(i, url)| {
                    resolve_backend(
                        &format!("SLUICE_BACKENDS[{i}]"),
                        BackendSection {
                            name: None,
                            url: url.to_owned(),
                            models: Vec::new(),
                        },
                    )
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => file
                .backends
                .into_iter()
                .enumerate()
                .map(|(i, b)| resolve_backend(&format!("backends[{i}]"), b))
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
            None => file.metering.enabled.unwrap_or(true),
        };
        let drain_limit = std::time::Duration::from_secs(file.metering.drain_secs.unwrap_or(120));
        let b = &file.balancer;
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
        let aliases = file.aliases;
        for (alias, by_tier) in &aliases {
            for tier in by_tier.keys() {
                if tier != "*" && tiers.get(tier).is_err() {
                    return Err(invalid(
                        format!("aliases.{alias}.{tier}"),
                        format!("'{tier}' is not a tier (use a tier name or \"*\")"),
                    ));
                }
            }
        }
        let prices = PriceBook::new(file.prices).map_err(|e| invalid("prices", e.to_string()))?;
        prices
            .validate(&tiers)
            .map_err(|e| invalid("prices", e.to_string()))?;

        let cache = resolve_cache(file.cache, &tiers, env)?;

        Ok(Config {
            listen,
            admin_listen,
            max_body_bytes,
            data_dir,
            redis_url,
            redis_prefix,
            admin_token,
            threads,
            grace_period_secs: s.grace_period_secs.unwrap_or(10),
            jwt,
            tiers,
            backends,
            prices,
            balancer: file.balancer,
            aliases,
            default_max_tokens: file.quotas.default_max_tokens.unwrap_or(4096),
            lease_max_requests: file.quotas.lease_max_requests.unwrap_or(16),
            lease_ms: file.quotas.lease_ms.unwrap_or(1000),
            slot_ttl_secs: match file.quotas.slot_ttl_secs.unwrap_or(60) {
                0 => return Err(invalid("quotas.slot_ttl_secs", "must be at least 1")),
                ttl => ttl,
            },
            metering,
            drain_limit,
            cache,
        })
    }
}

fn resolve_cache(c: CacheSection, tiers: &Tiers, env: Env) -> Result<CacheConfig, ConfigError> {
    use sluice_policies::cache::{CachePolicy, CacheRules};
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
    for (field, value) in [
        ("cache.embedding_timeout_ms", embedding_timeout_ms as usize),
        ("cache.max_entry_bytes", max_entry_bytes),
        ("cache.max_entries", max_entries),
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
    })
}

fn socket_addr(field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| invalid(field, format!("'{value}' is not a host:port address")))
}

fn resolve_jwt(j: JwtSection, base_dir: &Path) -> Result<JwtConfig, ConfigError> {
    use jsonwebtoken::Algorithm;
    let mut public_keys = Vec::new();
    for (i, k) in j.public_keys.into_iter().enumerate() {
        let field = format!("auth.jwt.public_keys[{i}]");
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
    let hs256_secret = process_env("SLUICE_JWT_HS256_SECRET").or(j.hs256_secret);
    if let Some(secret) = &hs256_secret {
        if secret.len() < 32 {
            return Err(invalid(
                "auth.jwt.hs256_secret",
                "must be at least 32 bytes long",
            ));
        }
    }
    if hs256_secret.is_none() && public_keys.is_empty() {
        return Err(invalid(
            "auth.jwt",
            "needs hs256_secret or at least one of public_keys",
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
    })
}

/// A backend added at run time (the admin API), checked as a `[[backends]]` entry would be.
pub fn backend(name: &str, url: &str, models: Vec<String>) -> Result<BackendConfig, ConfigError> {
    resolve_backend(
        "backend",
        BackendSection {
            name: Some(name.to_owned()),
            url: url.to_owned(),
            models,
        },
    )
}

fn resolve_backend(field: &str, b: BackendSection) -> Result<BackendConfig, ConfigError> {
    let uri: http::Uri = b
        .url
        .parse()
        .map_err(|e| invalid(format!("{field}.url"), format!("'{}': {e}", b.url)))?;
    if uri.scheme_str() != Some("http") {
        return Err(invalid(
            format!("{field}.url"),
            format!(
                "'{}' must be an http:// URL (backends are co-located and spoken to in plain HTTP)",
                b.url
            ),
        ));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| invalid(format!("{field}.url"), format!("'{}' has no host", b.url)))?;
    let host_port = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let addr = socket_addr(&format!("{field}.url"), &host_port)?;
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(invalid(
            format!("{field}.url"),
            format!("'{}' must not have a path; Sluice adds /v1/...", b.url),
        ));
    }
    for (i, m) in b.models.iter().enumerate() {
        if m.is_empty() {
            return Err(invalid(format!("{field}.models[{i}]"), "is empty"));
        }
    }
    Ok(BackendConfig {
        name: b.name.unwrap_or_else(|| host_port.clone()),
        url: format!("http://{host_port}"),
        addr,
        models: b.models,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_need_nothing() {
        let c = Config::from_toml("", &no_env).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
        assert!(c.redis_url.is_none());
        assert!(c.tiers.get("free").is_ok());
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = |k: &str| match k {
            "SLUICE_LISTEN" => Some("127.0.0.1:9999".to_owned()),
            "SLUICE_BACKENDS" => Some("http://127.0.0.1:7001, http://127.0.0.1:7002".to_owned()),
            _ => None,
        };
        let c = Config::from_toml("[server]\nlisten = \"127.0.0.1:1\"\n", &env).unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.backends[1].url, "http://127.0.0.1:7002");
    }

    #[test]
    fn errors_name_the_field() {
        let err = Config::from_toml("[server]\nlisten = \"nowhere\"\n", &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("server.listen"), "{err}");

        let err = Config::from_toml("[server]\nlisen = \"x\"\n", &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");

        let err = Config::from_toml("[[backends]]\nurl = \"https://127.0.0.1:1\"\n", &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("backends[0].url"), "{err}");

        let err = Config::from_toml(
            "[tiers.pro.limits]\nrequests_per_minute = \"many\"\n",
            &no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("requests_per_minute"), "{err}");
    }

    #[test]
    fn the_example_policy_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/sluice.example.toml");
        let c = Config::load(Some(&path), &no_env).unwrap();
        assert_eq!(c.backends.len(), 1);
        assert_eq!(
            c.tiers.get("pro").unwrap().limits.monthly_budget,
            Some("500".parse().unwrap())
        );
    }

    #[test]
    fn declared_tiers_must_include_the_default() {
        let err = Config::from_toml("[tiers.pro.limits]\nrequests_per_minute = 5\n", &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("tiers:"), "{err}");
    }
}
