//! What this gateway was told to be: one TOML file, with environment variables for what a
//! deployment overrides. Every error names the field it is about, and stops start-up.

mod file;
mod resolve;

pub use resolve::{backend, redis_tls, RedisTlsFiles};

use file::FileConfig;
use sluice_policies::pricing::PriceBook;
use sluice_policies::Tiers;
use std::collections::BTreeMap;
use std::net::SocketAddr;
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
    /// The CA and client certificate a `rediss://` store connects with (default: the
    /// system's roots, no client certificate).
    pub redis_tls: crate::store::RedisTls,
    pub admin_token: Option<String>,
    pub threads: usize,
    pub grace_period_secs: u64,
    /// Past these, requests are shed with 503 (see `overload`).
    pub marks: crate::overload::Marks,
    /// How long a request body may take to arrive, in all.
    pub body_read_timeout: std::time::Duration,
    /// Connections the admin listener serves at once, and how long one may take to send its
    /// request head.
    pub admin_max_connections: usize,
    pub admin_header_timeout: std::time::Duration,
    /// Client connections the proxy listener holds open at once (more are closed), and how
    /// long a client may take to send a request header, idle keep-alive wait included.
    pub max_connections: usize,
    pub header_timeout: std::time::Duration,
    /// HTTP/2 without TLS (prior knowledge) on the proxy listener.
    pub h2c: bool,
    /// `[server.tls]`: HTTPS (and HTTP/2 by ALPN) on the listeners.
    pub tls: Option<crate::tls::ListenerTls>,
    /// model or alias -> the models tried, in order, when none of its backends can serve.
    pub fallbacks: BTreeMap<String, Vec<String>>,
    /// Verifies JWTs on API calls (`[auth.jwt]`).
    pub jwt: Option<JwtConfig>,
    /// Verifies JWTs on the admin API (`[auth.admin_jwt]`): a separate issuer's keys.
    pub admin_jwt: Option<JwtConfig>,
    /// Valid keys, and apart from them unknown secrets, each replica's key cache holds.
    pub key_cache_entries: usize,
    pub unknown_key_cache_entries: usize,
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
    /// The PostgreSQL usage ledger (`[billing]`); without one the store keeps usage events.
    pub ledger: Option<crate::ledger::LedgerConfig>,
    /// The NATS JetStream usage feed (`[billing] nats_url`).
    pub feed: Option<crate::metering::FeedConfig>,
    /// model -> its `tokenizer.json` (`[tokenizers]`, relative to the config file), for
    /// counting the usage of a backend that reports none.
    pub tokenizers: BTreeMap<String, PathBuf>,
    /// Spend alerts (`[alerts]`): off unless the section is there.
    pub alerts: Option<crate::alerts::AlertsConfig>,
    /// What the distillation dataset keeps (`[datasets]`).
    pub datasets: crate::datasets::DatasetsConfig,
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
    /// Bytes each replica's cache index (and, on the embedded store, the answers) may hold;
    /// past it the least recently used entries of the largest tenant leave first.
    pub max_bytes: u64,
    /// The share of `max_bytes` one tenant may hold at most (100: no cap beyond fairness).
    pub tenant_max_percent: u8,
    /// How semantic candidates are found and checked.
    pub verification: VerificationConfig,
}

/// `[cache] verify`, `retrieval_*`, `verifier_*`: semantic hits in two stages. The index
/// finds up to `top_k` stored questions at or above `retrieval_threshold`; each must then
/// pass the structural checks (`sluice_policies::same_question`), and the learned verifier
/// where one is configured, before its answer is served.
#[derive(Debug, Clone)]
pub struct VerificationConfig {
    /// Off: a semantic hit is the nearest entry at or above the similarity threshold, on the
    /// embedding alone.
    pub enabled: bool,
    pub retrieval_threshold: f32,
    pub top_k: usize,
    pub learned: Option<LearnedVerifierConfig>,
}

impl Default for VerificationConfig {
    fn default() -> Self {
        VerificationConfig {
            enabled: true,
            retrieval_threshold: 0.70,
            top_k: 4,
            learned: None,
        }
    }
}

/// A pair-scoring endpoint: vLLM's `/v1/score` shape, or `/rerank` (TEI, Cohere, Jina).
#[derive(Debug, Clone)]
pub struct LearnedVerifierConfig {
    pub url: String,
    pub model: String,
    pub api_key: Option<String>,
    /// Scores at or above this are the same question.
    pub threshold: f32,
    pub timeout: std::time::Duration,
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
    /// An identity provider's published keys, fetched and refreshed (`jwks_url`).
    pub jwks: Option<JwksConfig>,
}

/// Where an identity provider publishes its keys, and how often to fetch them.
#[derive(Debug, Clone)]
pub struct JwksConfig {
    pub url: String,
    pub refresh: std::time::Duration,
    pub min_refresh: std::time::Duration,
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
    /// The URL as configured, normalised: `scheme://host:port` and the path given, if any.
    pub url: String,
    /// The `Host` its requests carry (the URL's host, and port when not the default).
    pub host: String,
    /// Its address when it was configured or added (a backend then follows its name, see
    /// `lookup`).
    pub addr: SocketAddr,
    /// The host name and port to look up again now and then; `None` when the URL names an
    /// address.
    pub lookup: Option<(String, u16)>,
    /// What replaces a request path's leading `/v1` (`/v1` for a URL without a path).
    pub base_path: String,
    /// Models this backend serves; empty means "ask its models endpoint".
    pub models: Vec<String>,
    pub kind: BackendKind,
    /// `Some` for an `https://` backend.
    pub tls: Option<BackendTls>,
    /// The API key the gateway sends it (the client's never is).
    pub credential: Option<UpstreamCredential>,
    /// Extra headers set on every request to it.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// The client's model -> the name this backend knows it by.
    pub model_map: BTreeMap<String, String>,
    /// Lower first: a model's backends of a higher priority serve only when none of a lower
    /// one can.
    pub priority: u32,
    /// What it was made from, so that a pool change tells a changed entry from the same one.
    pub spec: crate::backend_spec::BackendSpec,
}

/// What a backend is, for what the gateway may ask of it besides the OpenAI endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// An inference server beside the gateway (Sluice's own, vLLM): `/health` for health
    /// checks and `/metrics` for load.
    Sluice,
    /// A hosted OpenAI-compatible API: its models endpoint is its health check, and its
    /// rate-limit headers are respected.
    OpenAiCompatible,
}

impl BackendKind {
    /// Its name in `kind = "..."` and in the admin API.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Sluice => "sluice",
            BackendKind::OpenAiCompatible => "openai_compatible",
        }
    }

    fn named(name: &str) -> Option<BackendKind> {
        [BackendKind::Sluice, BackendKind::OpenAiCompatible]
            .into_iter()
            .find(|kind| kind.name() == name)
    }
}

#[derive(Debug, Clone)]
pub struct BackendTls {
    /// The name sent as SNI and checked against the backend's certificate.
    pub server_name: String,
    pub trust: crate::tls::BackendTrust,
    /// Offer HTTP/2 by ALPN.
    pub http2: bool,
}

/// An upstream API key, as the header that carries it. Never printed.
#[derive(Clone)]
pub struct UpstreamCredential {
    pub header: http::HeaderName,
    pub value: http::HeaderValue,
}

impl std::fmt::Debug for UpstreamCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UpstreamCredential({}: <redacted>)", self.header)
    }
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
        let mut file = file;
        let tls = resolve::tls(file.server.tls.take(), base_dir, env)?;
        let h2c = file.server.h2c.unwrap_or(false);
        let server = resolve::server(file.server, base_dir, env)?;
        let key_cache_entries = file.auth.key_cache_entries.unwrap_or(200_000).max(1);
        let unknown_key_cache_entries =
            file.auth.unknown_key_cache_entries.unwrap_or(20_000).max(1);
        use resolve::JwtUse;
        let jwt = file
            .auth
            .jwt
            .map(|j| resolve::resolve_jwt(j, base_dir, JwtUse::Proxy, env))
            .transpose()?;
        let admin_jwt = file
            .auth
            .admin_jwt
            .map(|j| resolve::resolve_jwt(j, base_dir, JwtUse::Admin, env))
            .transpose()?;
        if let (Some(proxy), Some(admin)) = (&jwt, &admin_jwt) {
            // Whoever can mint tenant tokens must not be able to mint admin ones.
            let shared_secret =
                proxy.hs256_secret.is_some() && proxy.hs256_secret == admin.hs256_secret;
            let shared_key = admin.public_keys.iter().any(|a| {
                proxy
                    .public_keys
                    .iter()
                    .any(|p| p.pem.trim() == a.pem.trim())
            });
            let shared_jwks = proxy.jwks.is_some()
                && proxy.jwks.as_ref().map(|j| &j.url) == admin.jwks.as_ref().map(|j| &j.url);
            if shared_secret || shared_key || shared_jwks {
                return Err(invalid(
                    "auth.admin_jwt",
                    "must not share a secret, public key or jwks_url with auth.jwt: tenant tokens must not open the admin API",
                ));
            }
        }
        let tiers = resolve::tiers(file.tiers)?;
        let backends = resolve::backends(file.backends, base_dir, env)?;
        let fallbacks = resolve::fallbacks(file.fallbacks, &file.aliases)?;
        let (metering, drain_limit) = resolve::metering(&file.metering, env)?;
        resolve::balancer(&file.balancer)?;
        resolve::aliases(&file.aliases, &tiers)?;
        let prices = resolve::prices(file.prices, &tiers)?;
        let quotas = resolve::quotas(&file.quotas)?;
        let cache = resolve::resolve_cache(file.cache, &tiers, env)?;
        let feed = resolve::feed(&file.billing, env)?;
        let alerts = file.alerts.map(|a| resolve::alerts(a, env)).transpose()?;
        let datasets = resolve::datasets(&file.datasets)?;
        let ledger = resolve::ledger(file.billing, env)?;
        Ok(Config {
            listen: server.listen,
            admin_listen: server.admin_listen,
            max_body_bytes: server.max_body_bytes,
            data_dir: server.data_dir,
            redis_url: server.redis_url,
            redis_prefix: server.redis_prefix,
            redis_tls: server.redis_tls,
            admin_token: server.admin_token,
            threads: server.threads,
            grace_period_secs: server.grace_period_secs,
            marks: server.marks,
            body_read_timeout: server.body_read_timeout,
            admin_max_connections: server.admin_max_connections,
            admin_header_timeout: server.admin_header_timeout,
            max_connections: server.max_connections,
            header_timeout: server.header_timeout,
            h2c,
            tls,
            fallbacks,
            jwt,
            admin_jwt,
            key_cache_entries,
            unknown_key_cache_entries,
            tiers,
            backends,
            prices,
            balancer: file.balancer,
            aliases: file.aliases,
            default_max_tokens: quotas.default_max_tokens,
            lease_max_requests: quotas.lease_max_requests,
            lease_ms: quotas.lease_ms,
            slot_ttl_secs: quotas.slot_ttl_secs,
            metering,
            drain_limit,
            cache,
            ledger,
            feed,
            alerts,
            datasets,
            tokenizers: file
                .tokenizers
                .into_iter()
                .map(|(model, path)| (model, base_dir.join(path)))
                .collect(),
        })
    }
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
    fn a_backend_named_by_host_is_looked_up_again_and_one_named_by_address_is_not() {
        use crate::backend_spec::BackendSpec;
        let spec = |url: &str| BackendSpec::plain(None, url.to_owned(), Vec::new());
        let by_name = backend("n", spec("http://localhost:9000/v1")).unwrap();
        assert_eq!(by_name.lookup, Some(("localhost".to_owned(), 9000)));
        assert!(by_name.addr.ip().is_loopback());
        for url in ["http://127.0.0.1:9000", "http://[::1]:9000"] {
            assert_eq!(backend("a", spec(url)).unwrap().lookup, None, "{url}");
        }
        // Files of a backend added at run time are read on every replica: absolute only.
        let mut relative = spec("https://127.0.0.1:9000");
        relative.ca_file = Some(PathBuf::from("certs/ca.pem"));
        let error = backend("r", relative).unwrap_err().to_string();
        assert!(error.starts_with("backend.ca_file:"), "{error}");
    }

    #[test]
    fn backends_take_tls_credentials_paths_and_priorities_and_refuse_what_cannot_work() {
        let env = |name: &str| (name == "PROVIDER_KEY").then(|| "sk-provider-secret".to_owned());
        let c = Config::from_toml(
            r#"
[[backends]]
name = "hosted"
url = "https://127.0.0.1:8443/openai/deployments/big/"
kind = "openai_compatible"
api_key_env = "PROVIDER_KEY"
api_key_header = "api-key"
headers = { "openai-organization" = "org-1" }
model_map = { "llama-70b" = "meta-llama/Llama-3.3-70B-Instruct" }
priority = 2

[[backends]]
url = "http://127.0.0.1:7001"
models = ["llama-70b"]

[fallbacks]
"llama-70b" = ["llama-8b"]
"#,
            &env,
        )
        .unwrap();
        let hosted = &c.backends[0];
        assert_eq!(hosted.kind, BackendKind::OpenAiCompatible);
        assert_eq!(hosted.base_path, "/openai/deployments/big");
        assert_eq!(hosted.host, "127.0.0.1:8443");
        assert_eq!(hosted.priority, 2);
        assert_eq!(hosted.models, ["llama-70b"], "a mapped model is served");
        assert_eq!(hosted.tls.as_ref().unwrap().server_name, "127.0.0.1");
        let credential = hosted.credential.as_ref().unwrap();
        assert_eq!(credential.header, "api-key");
        assert_eq!(credential.value, "sk-provider-secret");
        assert!(
            !format!("{c:?}").contains("sk-provider-secret"),
            "never printed"
        );
        let plain = &c.backends[1];
        assert_eq!((plain.base_path.as_str(), plain.priority), ("/v1", 0));
        assert!(plain.tls.is_none() && plain.credential.is_none());
        assert_eq!(c.fallbacks["llama-70b"], ["llama-8b"]);

        let refused = [
            (
                "[[backends]]\nurl = \"https://127.0.0.1:1\"\napi_key_env = \"MISSING\"\n",
                "backends[0].api_key_env",
                "MISSING is not set",
            ),
            (
                "[[backends]]\nurl = \"http://127.0.0.1:1\"\nheaders = { authorization = \"Bearer sk-x\" }\n",
                "backends[0].headers",
                "api_key_env or api_key_file",
            ),
            (
                "[[backends]]\nurl = \"http://127.0.0.1:1\"\nca_file = \"ca.pem\"\n",
                "backends[0].ca_file",
                "https://",
            ),
            (
                "[[backends]]\nurl = \"https://127.0.0.1:1\"\nclient_cert_file = \"c.pem\"\n",
                "backends[0].client_cert_file",
                "go together",
            ),
            (
                "[[backends]]\nurl = \"https://127.0.0.1:1\"\nca_file = \"/nonexistent/ca.pem\"\n",
                "backends[0]",
                "/nonexistent/ca.pem",
            ),
            (
                "[[backends]]\nurl = \"http://user:pw@127.0.0.1:1\"\n",
                "backends[0].url",
                "credentials",
            ),
            (
                "[[backends]]\nurl = \"http://127.0.0.1:1\"\nkind = \"vllm\"\n",
                "backends[0].kind",
                "openai_compatible",
            ),
            ("[fallbacks]\nm = [\"m\"]\n", "fallbacks.m[0]", "another model"),
            ("[fallbacks]\nm = []\n", "fallbacks.m", "no model"),
            (
                "[aliases.fast]\n\"*\" = \"small\"\n[fallbacks]\nm = [\"fast\"]\n",
                "fallbacks.m[0]",
                "alias",
            ),
            (
                "[server.tls]\ncert_file = \"cert.pem\"\n",
                "server.tls.key_file",
                "needed",
            ),
            (
                "[server.tls]\ncert_file = \"/nonexistent/c.pem\"\nkey_file = \"/nonexistent/k.pem\"\n",
                "server.tls",
                "/nonexistent/c.pem",
            ),
            ("[server.tls]\nhttp2 = false\n", "server.tls", "cert_file"),
        ];
        for (text, field, says) in refused {
            let err = Config::from_toml(text, &|_: &str| None)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(field), "{text}: {err}");
            assert!(err.contains(says), "{text}: {err}");
            assert!(!err.contains("sk-x"), "{err}");
        }
    }

    #[test]
    fn a_jwks_url_is_checked_and_never_shared_with_admin_tokens() {
        let c = Config::from_toml(
            "[auth.jwt]\njwks_url = \"http://idp.example/jwks\"\n",
            &no_env,
        )
        .unwrap();
        let jwks = c.jwt.unwrap().jwks.unwrap();
        assert_eq!(jwks.refresh, std::time::Duration::from_secs(300));
        assert_eq!(jwks.min_refresh, std::time::Duration::from_secs(10));
        for (toml, field) in [
            ("[auth.jwt]\njwks_url = \"ftp://idp\"\n", "auth.jwt.jwks_url"),
            ("[auth.jwt]\njwks_url = \"idp/keys\"\n", "auth.jwt.jwks_url"),
            (
                "[auth.jwt]\njwks_url = \"http://idp\"\njwks_min_refresh_secs = 0\n",
                "auth.jwt.jwks_min_refresh_secs",
            ),
            (
                "[auth.jwt]\njwks_url = \"http://idp\"\n[auth.admin_jwt]\nissuer = \"i\"\naudience = \"a\"\njwks_url = \"http://idp\"\n",
                "auth.admin_jwt",
            ),
        ] {
            let err = Config::from_toml(toml, &no_env).unwrap_err().to_string();
            assert!(err.starts_with(field), "{toml}: {err}");
        }
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

        let err = Config::from_toml("[[backends]]\nurl = \"ftp://127.0.0.1:1\"\n", &no_env)
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

    #[test]
    fn billing_ledger_and_feed_settings_are_checked() {
        let c = Config::from_toml(
            "[billing]\npostgres_url = \"postgres://u@h/db\"\nretention_days = 30\nnats_url = \"nats://127.0.0.1:4222\"",
            &no_env,
        )
        .unwrap();
        let ledger = c.ledger.unwrap();
        assert_eq!(ledger.pool, 8);
        assert_eq!(
            ledger.retention,
            Some(std::time::Duration::from_secs(30 * 86_400))
        );
        let feed = c.feed.unwrap();
        assert_eq!(
            (feed.subject.as_str(), feed.stream.as_str()),
            ("sluice.usage", "SLUICE_USAGE")
        );
        let env =
            |name: &str| (name == "SLUICE_POSTGRES_URL").then(|| "postgresql://env/db".to_owned());
        assert_eq!(
            Config::from_toml("", &env).unwrap().ledger.unwrap().url,
            "postgresql://env/db"
        );
        assert!(Config::from_toml("", &no_env).unwrap().ledger.is_none());
        for (bad, field) in [
            ("postgres_url = \"mysql://x\"", "billing.postgres_url"),
            ("retention_days = 30", "billing.retention_days"),
            (
                "postgres_url = \"postgres://h/d\"\nretention_days = 0",
                "billing.retention_days",
            ),
            (
                "postgres_url = \"postgres://h/d\"\npostgres_pool = 0",
                "billing.postgres_pool",
            ),
            ("nats_url = \"http://x\"", "billing.nats_url"),
            (
                "nats_url = \"nats://x\"\nnats_subject = \"usage.>\"",
                "billing.nats_subject",
            ),
            (
                "nats_url = \"nats://x\"\nnats_stream = \"a.b\"",
                "billing.nats_stream",
            ),
        ] {
            let err = Config::from_toml(&format!("[billing]\n{bad}"), &no_env)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(field), "{bad}: {err}");
        }
    }

    /// PEM framing around a few base64 bytes: what the config check reads (the DER inside
    /// is parsed when the store connects, by the e2e tests with real certificates).
    fn pem(label: &str) -> String {
        format!("-----BEGIN {label}-----\nMIIBAA==\n-----END {label}-----\n")
    }

    #[test]
    fn redis_tls_files_are_read_at_start_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), pem("CERTIFICATE")).unwrap();
        std::fs::write(dir.path().join("client.pem"), pem("CERTIFICATE")).unwrap();
        std::fs::write(dir.path().join("client.key"), pem("PRIVATE KEY")).unwrap();
        let config = |server: &str| {
            let path = dir.path().join("sluice.toml");
            std::fs::write(&path, format!("[server]\n{server}\n")).unwrap();
            Config::load(Some(&path), &no_env)
        };
        let all = "redis_tls_ca_file = \"ca.pem\"\nredis_tls_cert_file = \"client.pem\"\nredis_tls_key_file = \"client.key\"";

        let c = config(&format!(
            "redis_url = \"rediss://redis.internal:6380\"\n{all}"
        ))
        .unwrap();
        assert!(c.redis_tls.is_configured());
        let debug = format!("{:?}", c.redis_tls);
        assert!(
            !debug.contains("MIIBAA"),
            "no key material in Debug: {debug}"
        );
        // A cluster's nodes take the same certificates.
        let cluster = "redis_url = \"rediss://10.0.0.1:6380,rediss://10.0.0.2:6380\"";
        assert!(config(&format!("{cluster}\n{all}")).is_ok());
        // rediss:// alone verifies against the system's roots.
        let c = config("redis_url = \"rediss://redis.internal:6380\"").unwrap();
        assert!(!c.redis_tls.is_configured());

        for (server, field, says) in [
            (
                format!("redis_url = \"redis://127.0.0.1:6379\"\n{all}"),
                "server.redis_tls_ca_file",
                "applies only to a rediss://",
            ),
            (
                "redis_tls_cert_file = \"client.pem\"\nredis_tls_key_file = \"client.key\"".to_owned(),
                "server.redis_tls_cert_file",
                "applies only to a rediss://",
            ),
            (
                "redis_url = \"rediss://h:6380\"\nredis_tls_ca_file = \"missing.pem\"".to_owned(),
                "server.redis_tls_ca_file",
                "cannot read",
            ),
            (
                "redis_url = \"rediss://h:6380\"\nredis_tls_ca_file = \"client.key\"".to_owned(),
                "server.redis_tls_ca_file",
                "holds no PEM certificate",
            ),
            (
                "redis_url = \"rediss://h:6380\"\nredis_tls_cert_file = \"client.pem\"".to_owned(),
                "server.redis_tls_key_file",
                "is required with a client certificate",
            ),
            (
                "redis_url = \"rediss://h:6380\"\nredis_tls_key_file = \"client.key\"".to_owned(),
                "server.redis_tls_cert_file",
                "is required with a client key",
            ),
            (
                "redis_url = \"rediss://h:6380\"\nredis_tls_cert_file = \"client.pem\"\nredis_tls_key_file = \"ca.pem\"".to_owned(),
                "server.redis_tls_key_file",
                "holds no PEM private key",
            ),
            (
                "redis_url = \"rediss://10.0.0.1:6380,redis://10.0.0.2:6379\"".to_owned(),
                "server.redis_url",
                "mixes redis:// and rediss://",
            ),
        ] {
            let err = config(&server).unwrap_err().to_string();
            assert!(
                err.starts_with(field) && err.contains(says),
                "{server}: {err}"
            );
        }
    }

    #[test]
    fn redis_tls_files_come_from_the_environment_too() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, pem("CERTIFICATE")).unwrap();
        let env = |name: &str| match name {
            "SLUICE_REDIS_URL" => Some("rediss://127.0.0.1:6380".to_owned()),
            "SLUICE_REDIS_TLS_CA" => Some(ca.display().to_string()),
            _ => None,
        };
        let c = Config::from_toml("", &env).unwrap();
        assert!(c.redis_tls.is_configured());
        let env = |name: &str| match name {
            "SLUICE_REDIS_URL" => Some("rediss://127.0.0.1:6380".to_owned()),
            "SLUICE_REDIS_TLS_KEY" => Some(ca.display().to_string()),
            _ => None,
        };
        let err = Config::from_toml("", &env).unwrap_err().to_string();
        assert!(
            err.starts_with("server.redis_tls_cert_file (SLUICE_REDIS_TLS_CERT)"),
            "{err}"
        );
    }
}
