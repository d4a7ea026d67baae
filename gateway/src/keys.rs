//! API keys: how a secret is minted, how it is hashed for lookup, and the record kept for it.
//! The secret itself exists only in the response that creates or rotates it; everything
//! stored or logged carries its SHA-256 hash or its short public prefix.

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sluice_policies::{LimitOverrides, ModelLists};

const SECRET_PREFIX: &str = "sk-sluice-";
/// How much of the secret is kept in the clear so operators can tell keys apart.
const DISPLAY_PREFIX_LEN: usize = SECRET_PREFIX.len() + 6;

/// The stored form of an API key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub tenant: String,
    pub tier: String,
    #[serde(default)]
    pub limits: LimitOverrides,
    /// Hex SHA-256 of the secret: the lookup key.
    pub hash: KeyHash,
    /// The first characters of the secret, e.g. `sk-sluice-3fa9c1`, for display only.
    pub display_prefix: String,
    /// Unix seconds.
    pub created_at: i64,
    #[serde(default)]
    pub revoked_at: Option<i64>,
    /// Whether this key's answers may be served from and kept in the response cache (the
    /// tier's and model's rules apply as well).
    #[serde(default = "cache_on")]
    pub cache: bool,
    /// Which models the key may name, on top of its tier's lists.
    #[serde(flatten)]
    pub models: ModelLists,
    /// Limits for single models; a model named here replaces its tier's limits for it.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub model_limits: sluice_policies::ModelLimits,
    /// The key's own opt-in to capture for distillation; none: its tenant's applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distillation: Option<sluice_policies::Distillation>,
}

fn cache_on() -> bool {
    true
}

impl KeyRecord {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }
}

/// Hex SHA-256 of an API key secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyHash(String);

impl KeyHash {
    pub fn of_secret(secret: &str) -> Self {
        KeyHash(hex::encode(Sha256::digest(secret.as_bytes())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A freshly minted secret, shown to the operator once.
pub struct NewSecret {
    pub secret: String,
    pub hash: KeyHash,
    pub display_prefix: String,
}

impl NewSecret {
    pub fn generate() -> Self {
        let mut bytes = [0u8; 24];
        rand::rng().fill_bytes(&mut bytes);
        let secret = format!("{SECRET_PREFIX}{}", hex::encode(bytes));
        NewSecret {
            hash: KeyHash::of_secret(&secret),
            display_prefix: secret[..DISPLAY_PREFIX_LEN].to_owned(),
            secret,
        }
    }
}

/// A new key id: `key_` and 16 hex digits, random so ids reveal nothing about order or count.
pub fn new_key_id() -> String {
    let mut bytes = [0u8; 8];
    rand::rng().fill_bytes(&mut bytes);
    format!("key_{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_unique_and_hash_to_their_record() {
        let a = NewSecret::generate();
        let b = NewSecret::generate();
        assert_ne!(a.secret, b.secret);
        assert!(a.secret.starts_with("sk-sluice-"));
        assert_eq!(KeyHash::of_secret(&a.secret), a.hash);
        assert_eq!(a.hash.as_str().len(), 64);
        assert!(a.secret.starts_with(&a.display_prefix));
        assert!(!a.hash.as_str().contains(&a.secret[SECRET_PREFIX.len()..]));
    }
}
