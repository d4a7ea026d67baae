//! What a key may spend: the limits a tier grants, and a key's own overrides on top of them.

use crate::money::Money;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Limits that apply to one model only, by its name (the model a request is served by, after
/// aliases), on top of the limits for every model: `tokens_per_minute` for `llama-70b` alone.
/// Rates, daily caps and concurrency; budgets are per key and per tenant.
pub type ModelLimits = BTreeMap<String, Limits>;

/// The most models one tier, key or tenant may name limits for.
pub const MAX_MODEL_LIMITS: usize = 64;

/// Whether `model_limits` can be enforced: names of at most 256 bytes, no budgets, at most
/// [`MAX_MODEL_LIMITS`] of them. The error names the model and field.
pub fn validate_model_limits(model_limits: &ModelLimits) -> Result<(), String> {
    if model_limits.len() > MAX_MODEL_LIMITS {
        return Err(format!(
            "model_limits names {} models; at most {MAX_MODEL_LIMITS} are allowed",
            model_limits.len()
        ));
    }
    for (model, limits) in model_limits {
        if model.trim().is_empty() || model.len() > 256 {
            return Err(
                "model_limits: a model name must be a non-empty string of at most 256 bytes"
                    .to_owned(),
            );
        }
        if limits.monthly_budget.is_some() || limits.soft_monthly_budget.is_some() {
            return Err(format!(
                "model_limits.{model}: budgets are per key and per tenant, not per model; \
                 use rates, daily caps or max_concurrent"
            ));
        }
    }
    Ok(())
}

/// A key's per-model limits over its tier's: a model the key names replaces the tier's
/// limits for that model whole; the tier's other models stay.
pub fn merge_model_limits(tier: &ModelLimits, key: &ModelLimits) -> ModelLimits {
    let mut merged = tier.clone();
    merged.extend(key.iter().map(|(m, l)| (m.clone(), l.clone())));
    merged
}

/// The effective limits of a key. `None` means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    pub requests_per_day: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
    pub max_concurrent: Option<u64>,
    pub monthly_budget: Option<Money>,
    /// A budget that only alerts (see `alerts`): spending past it is never refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_monthly_budget: Option<Money>,
}

/// A key's overrides of its tier's limits. An absent field inherits the tier's value; a
/// present one replaces it. Kept as a separate type so "not overridden" and "unlimited"
/// never get confused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_day: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_budget: Option<Money>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_monthly_budget: Option<Money>,
}

impl Limits {
    /// The limits a key ends up with: its tier's, with its own overrides on top.
    pub fn with_overrides(&self, overrides: &LimitOverrides) -> Limits {
        // Destructured so that a new limit does not compile until it is merged here too.
        let LimitOverrides {
            requests_per_minute,
            requests_per_day,
            tokens_per_minute,
            tokens_per_day,
            max_concurrent,
            monthly_budget,
            soft_monthly_budget,
        } = overrides;
        Limits {
            requests_per_minute: requests_per_minute.or(self.requests_per_minute),
            requests_per_day: requests_per_day.or(self.requests_per_day),
            tokens_per_minute: tokens_per_minute.or(self.tokens_per_minute),
            tokens_per_day: tokens_per_day.or(self.tokens_per_day),
            max_concurrent: max_concurrent.or(self.max_concurrent),
            monthly_budget: monthly_budget.or(self.monthly_budget),
            soft_monthly_budget: soft_monthly_budget.or(self.soft_monthly_budget),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_only_what_they_name() {
        let tier = Limits {
            requests_per_minute: Some(60),
            tokens_per_day: Some(1_000_000),
            monthly_budget: Some("10".parse().unwrap()),
            ..Limits::default()
        };
        let overrides = LimitOverrides {
            requests_per_minute: Some(5),
            ..LimitOverrides::default()
        };
        let effective = tier.with_overrides(&overrides);
        assert_eq!(effective.requests_per_minute, Some(5));
        assert_eq!(effective.tokens_per_day, Some(1_000_000));
        assert_eq!(effective.monthly_budget, tier.monthly_budget);
        assert_eq!(effective.max_concurrent, None);
    }

    #[test]
    fn model_limits_take_rates_not_budgets_and_a_key_replaces_its_tiers_per_model() {
        let rpm = |n| Limits {
            requests_per_minute: Some(n),
            ..Limits::default()
        };
        let tier: ModelLimits = [("a".to_owned(), rpm(1)), ("b".to_owned(), rpm(2))].into();
        let key: ModelLimits = [("b".to_owned(), rpm(3))].into();
        let merged = merge_model_limits(&tier, &key);
        assert_eq!((merged["a"].clone(), merged["b"].clone()), (rpm(1), rpm(3)));
        assert!(validate_model_limits(&merged).is_ok());
        let budget: ModelLimits = [(
            "a".to_owned(),
            Limits {
                soft_monthly_budget: Some("1".parse().unwrap()),
                ..Limits::default()
            },
        )]
        .into();
        let err = validate_model_limits(&budget).unwrap_err();
        assert!(
            err.contains("model_limits.a") && err.contains("budgets"),
            "{err}"
        );
        let blank: ModelLimits = [(" ".to_owned(), rpm(1))].into();
        assert!(validate_model_limits(&blank).is_err());
        let many: ModelLimits = (0..=MAX_MODEL_LIMITS)
            .map(|i| (i.to_string(), rpm(1)))
            .collect();
        assert!(validate_model_limits(&many).is_err());
    }

    #[test]
    fn unknown_override_fields_are_refused() {
        let err = serde_json::from_str::<LimitOverrides>(r#"{"requests_per_hour": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("requests_per_hour"), "{err}");
    }
}
