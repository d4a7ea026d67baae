//! Pricing tiers: named bundles of limits. `free` is where a new key starts.

use crate::limits::Limits;
use crate::model_access::ModelLists;
use crate::money::Money;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

pub const DEFAULT_TIER: &str = "free";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Tier {
    pub name: String,
    /// ISO 4217 code the tier's prices and budgets are in.
    pub currency: String,
    pub limits: Limits,
    /// What a replica does when the shared quota store cannot be reached.
    #[serde(default)]
    pub on_store_unavailable: FailMode,
    /// The largest single request the tier accepts.
    #[serde(default)]
    pub request_caps: RequestCaps,
    /// Which models the tier's keys may name.
    #[serde(flatten)]
    pub models: ModelLists,
    /// Limits for single models, on top of `limits`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, Limits>)]
    pub model_limits: crate::limits::ModelLimits,
}

/// Bounds on one request, so that what it reserves (prompts × choices × completion cap) is
/// always a number the stores count exactly. A request past one is refused with 400 naming
/// the field, before anything is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RequestCaps {
    /// `max_tokens` / `max_completion_tokens`.
    pub max_tokens: u64,
    /// `n` (and `best_of`): choices generated per prompt.
    pub max_n: u64,
    /// Prompts in one completions request, or inputs in one embeddings request.
    pub max_prompts: u64,
}

impl Default for RequestCaps {
    /// OpenAI's own bounds for `n` (128) and inputs per request (2048); a completion cap of
    /// 2²⁰ tokens, beyond any model's context. Their product stays far below 2⁵³.
    fn default() -> Self {
        RequestCaps {
            max_tokens: 1 << 20,
            max_n: 128,
            max_prompts: 2048,
        }
    }
}

/// Fail-open serves the tier's keys under each replica's local limits only (so a fleet of N
/// replicas may admit up to N times a rate while the store is down); fail-closed refuses
/// them with 503.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    #[default]
    Open,
    Closed,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TierError {
    #[error("unknown tier '{name}'; known tiers: {known}")]
    Unknown { name: String, known: String },
    #[error("tier '{0}': currency must be a three-letter ISO 4217 code")]
    BadCurrency(String),
    #[error("the default tier '{DEFAULT_TIER}' must be declared")]
    NoDefault,
    #[error("tier '{tier}': {reason}")]
    BadModels {
        tier: String,
        reason: crate::model_access::PatternError,
    },
    #[error("tier '{tier}': {reason}")]
    BadModelLimits { tier: String, reason: String },
}

/// The set of tiers in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tiers {
    by_name: BTreeMap<String, Tier>,
}

impl Tiers {
    pub fn new(tiers: impl IntoIterator<Item = Tier>) -> Result<Self, TierError> {
        let by_name: BTreeMap<String, Tier> =
            tiers.into_iter().map(|t| (t.name.clone(), t)).collect();
        for tier in by_name.values() {
            let c = &tier.currency;
            if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(TierError::BadCurrency(tier.name.clone()));
            }
            tier.models
                .validate()
                .map_err(|reason| TierError::BadModels {
                    tier: tier.name.clone(),
                    reason,
                })?;
            crate::limits::validate_model_limits(&tier.model_limits).map_err(|reason| {
                TierError::BadModelLimits {
                    tier: tier.name.clone(),
                    reason,
                }
            })?;
        }
        if !by_name.contains_key(DEFAULT_TIER) {
            return Err(TierError::NoDefault);
        }
        Ok(Tiers { by_name })
    }

    /// The tiers Sluice ships with, used when the policy file declares none.
    pub fn builtin() -> Self {
        let tier = |name: &str, rpm, rpd, tpm, tpd, conc, budget: &str| Tier {
            name: name.to_owned(),
            currency: "USD".to_owned(),
            limits: Limits {
                requests_per_minute: rpm,
                requests_per_day: rpd,
                tokens_per_minute: tpm,
                tokens_per_day: tpd,
                max_concurrent: conc,
                monthly_budget: Some(budget.parse::<Money>().expect("builtin budget")),
                soft_monthly_budget: None,
            },
            on_store_unavailable: FailMode::Open,
            request_caps: RequestCaps::default(),
            models: ModelLists::default(),
            model_limits: Default::default(),
        };
        Tiers::new([
            tier(
                "free",
                Some(20),
                Some(1_000),
                Some(40_000),
                Some(500_000),
                Some(4),
                "5",
            ),
            tier(
                "pro",
                Some(600),
                Some(100_000),
                Some(1_000_000),
                Some(50_000_000),
                Some(64),
                "500",
            ),
            tier(
                "enterprise",
                Some(6_000),
                None,
                Some(10_000_000),
                None,
                Some(512),
                "50000",
            ),
        ])
        .expect("builtin tiers are valid")
    }

    pub fn get(&self, name: &str) -> Result<&Tier, TierError> {
        self.by_name.get(name).ok_or_else(|| TierError::Unknown {
            name: name.to_owned(),
            known: self.names().collect::<Vec<_>>().join(", "),
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Tier> {
        self.by_name.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_tiers_are_free_pro_enterprise() {
        let tiers = Tiers::builtin();
        assert_eq!(
            tiers.names().collect::<Vec<_>>(),
            ["enterprise", "free", "pro"]
        );
        assert!(
            tiers.get("pro").unwrap().limits.requests_per_minute
                > tiers.get("free").unwrap().limits.requests_per_minute
        );
    }

    #[test]
    fn unknown_tier_names_the_known_ones() {
        let err = Tiers::builtin().get("gold").unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown tier 'gold'; known tiers: enterprise, free, pro"
        );
    }

    #[test]
    fn a_policy_without_the_default_tier_is_refused() {
        let only_pro = Tiers::builtin().get("pro").unwrap().clone();
        assert_eq!(Tiers::new([only_pro]), Err(TierError::NoDefault));
    }
}
