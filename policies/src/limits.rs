//! What a key may spend: the limits a tier grants, and a key's own overrides on top of them.

use crate::money::Money;
use serde::{Deserialize, Serialize};

/// The effective limits of a key. `None` means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    fn unknown_override_fields_are_refused() {
        let err = serde_json::from_str::<LimitOverrides>(r#"{"requests_per_hour": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("requests_per_hour"), "{err}");
    }
}
