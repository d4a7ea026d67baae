//! What the configuration file says, as written: its sections and fields, before defaults,
//! environment overrides and checks (`config::resolve`).

use serde::Deserialize;
use sluice_policies::pricing::PriceEntry;
use sluice_policies::Limits;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    pub(super) server: ServerSection,
    #[serde(default)]
    pub(super) auth: AuthSection,
    #[serde(default)]
    pub(super) tiers: BTreeMap<String, TierSection>,
    #[serde(default)]
    pub(super) backends: Vec<crate::backend_spec::BackendSpec>,
    #[serde(default)]
    pub(super) metering: MeteringSection,
    #[serde(default)]
    pub(super) prices: Vec<PriceEntry>,
    #[serde(default)]
    pub(super) quotas: QuotasSection,
    #[serde(default)]
    pub(super) balancer: crate::balancer::BalancerConfig,
    #[serde(default)]
    pub(super) aliases: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub(super) cache: CacheSection,
    #[serde(default)]
    pub(super) billing: BillingSection,
    pub(super) alerts: Option<AlertsSection>,
    #[serde(default)]
    pub(super) datasets: DatasetsSection,
    /// model -> its tokenizer.json
    #[serde(default)]
    pub(super) tokenizers: BTreeMap<String, PathBuf>,
    /// model or alias -> the models tried, in order, when none of its backends can serve
    #[serde(default)]
    pub(super) fallbacks: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AlertsSection {
    pub(super) webhook_url: Option<String>,
    pub(super) webhook_secret: Option<String>,
    pub(super) thresholds: Option<Vec<u32>>,
    pub(super) check_interval_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DatasetsSection {
    pub(super) retention_days: Option<u64>,
    pub(super) max_records: Option<usize>,
    pub(super) max_answer_bytes: Option<usize>,
    pub(super) queue_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BillingSection {
    pub(super) postgres_url: Option<String>,
    pub(super) postgres_pool: Option<u32>,
    pub(super) retention_days: Option<u64>,
    pub(super) nats_url: Option<String>,
    pub(super) nats_subject: Option<String>,
    pub(super) nats_stream: Option<String>,
    pub(super) nats_duplicate_window_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CacheSection {
    pub(super) enabled: Option<bool>,
    pub(super) ttl_secs: Option<u64>,
    pub(super) similarity_threshold: Option<f32>,
    pub(super) cache_unset_temperature: Option<bool>,
    pub(super) embedding_url: Option<String>,
    pub(super) embedding_model: Option<String>,
    pub(super) embedding_api_key: Option<String>,
    pub(super) embedding_timeout_ms: Option<u64>,
    pub(super) max_entry_bytes: Option<usize>,
    pub(super) max_entries: Option<usize>,
    pub(super) max_bytes: Option<u64>,
    pub(super) tenant_max_percent: Option<u8>,
    pub(super) verify: Option<bool>,
    pub(super) retrieval_threshold: Option<f32>,
    pub(super) retrieval_top_k: Option<usize>,
    pub(super) verifier_url: Option<String>,
    pub(super) verifier_model: Option<String>,
    pub(super) verifier_api_key: Option<String>,
    pub(super) verifier_threshold: Option<f32>,
    pub(super) verifier_timeout_ms: Option<u64>,
    #[serde(default)]
    pub(super) tiers: BTreeMap<String, sluice_policies::cache::RuleOverrides>,
    #[serde(default)]
    pub(super) models: BTreeMap<String, sluice_policies::cache::RuleOverrides>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct QuotasSection {
    pub(super) default_max_tokens: Option<u64>,
    pub(super) slot_ttl_secs: Option<u64>,
    pub(super) lease_max_requests: Option<u64>,
    pub(super) lease_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MeteringSection {
    pub(super) enabled: Option<bool>,
    pub(super) drain_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServerSection {
    pub(super) listen: Option<String>,
    pub(super) admin_listen: Option<String>,
    pub(super) max_body_bytes: Option<usize>,
    pub(super) data_dir: Option<PathBuf>,
    pub(super) redis_url: Option<String>,
    pub(super) redis_prefix: Option<String>,
    pub(super) redis_tls_ca_file: Option<PathBuf>,
    pub(super) redis_tls_cert_file: Option<PathBuf>,
    pub(super) redis_tls_key_file: Option<PathBuf>,
    pub(super) admin_token: Option<String>,
    pub(super) threads: Option<usize>,
    pub(super) grace_period_secs: Option<u64>,
    pub(super) max_in_flight: Option<usize>,
    pub(super) max_body_bytes_in_flight: Option<usize>,
    pub(super) body_read_timeout_secs: Option<u64>,
    pub(super) admin_max_connections: Option<usize>,
    pub(super) admin_header_timeout_secs: Option<u64>,
    pub(super) max_connections: Option<usize>,
    pub(super) header_timeout_secs: Option<u64>,
    /// HTTP/2 without TLS (prior knowledge) on the proxy listener.
    pub(super) h2c: Option<bool>,
    pub(super) tls: Option<TlsSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TlsSection {
    pub(super) cert_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
    pub(super) http2: Option<bool>,
    pub(super) admin: Option<bool>,
    pub(super) admin_client_ca_file: Option<PathBuf>,
    pub(super) reload_check_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuthSection {
    pub(super) jwt: Option<JwtSection>,
    pub(super) admin_jwt: Option<JwtSection>,
    pub(super) key_cache_entries: Option<usize>,
    pub(super) unknown_key_cache_entries: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JwtSection {
    pub(super) issuer: Option<String>,
    pub(super) audience: Option<String>,
    pub(super) hs256_secret: Option<String>,
    #[serde(default)]
    pub(super) public_keys: Vec<PublicKeySection>,
    pub(super) tenant_claim: Option<String>,
    pub(super) tier_claim: Option<String>,
    pub(super) role_claim: Option<String>,
    pub(super) leeway_secs: Option<u64>,
    pub(super) jwks_url: Option<String>,
    pub(super) jwks_refresh_secs: Option<u64>,
    pub(super) jwks_min_refresh_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PublicKeySection {
    pub(super) alg: String,
    pub(super) pem: Option<String>,
    pub(super) pem_file: Option<PathBuf>,
    pub(super) kid: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TierSection {
    #[serde(default = "default_currency")]
    pub(super) currency: String,
    #[serde(default)]
    pub(super) limits: Limits,
    #[serde(default)]
    pub(super) on_store_unavailable: sluice_policies::FailMode,
    #[serde(default)]
    pub(super) request_caps: sluice_policies::RequestCaps,
    #[serde(default)]
    pub(super) allowed_models: Option<Vec<String>>,
    #[serde(default)]
    pub(super) denied_models: Vec<String>,
    /// `[tiers.NAME.model_limits."llama-70b"]`: limits for one model.
    #[serde(default)]
    pub(super) model_limits: sluice_policies::ModelLimits,
}

pub(super) fn default_currency() -> String {
    "USD".to_owned()
}
