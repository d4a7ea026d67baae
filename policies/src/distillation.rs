//! Whose conversations may be kept as training data, and with which models? A tenant (or one
//! of its keys) opts in by naming the models whose answers may be kept: a small model can
//! then be trained on a big one's answers to those customers' questions. Nothing is kept for
//! anyone who has not opted in.
//!
//! A key's setting, when it has one, replaces its tenant's (`{"models": []}` opts one key out
//! of its tenant's choice); a key without one follows its tenant.

use crate::model_access::{self, PatternError};
use serde::{Deserialize, Serialize};

/// An opt-in to capture for distillation, as set on a tenant or a key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Distillation {
    /// The models (patterns with `*`, as in model access lists) whose answers are kept;
    /// empty keeps none.
    pub models: Vec<String>,
}

impl Distillation {
    pub fn validate(&self) -> Result<(), PatternError> {
        model_access::validate_patterns("distillation.models", &self.models)
    }

    /// Whether an answer of `model` (the model that served, aliases resolved) is kept.
    pub fn captures(&self, model: &str) -> bool {
        self.models
            .iter()
            .any(|pattern| model_access::matches(pattern, model))
    }

    /// What applies to a key: its own setting where it has one, else its tenant's.
    pub fn of<'a>(
        key: Option<&'a Distillation>,
        tenant: Option<&'a Distillation>,
    ) -> Option<&'a Distillation> {
        key.or(tenant).filter(|d| !d.models.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt_in(models: &[&str]) -> Distillation {
        Distillation {
            models: models.iter().map(|m| m.to_string()).collect(),
        }
    }

    #[test]
    fn only_the_named_models_are_captured() {
        let d = opt_in(&["llama-70b", "mistral-*"]);
        assert!(d.captures("llama-70b"));
        assert!(d.captures("mistral-large"));
        assert!(!d.captures("llama-8b"));
        assert!(!opt_in(&[]).captures("llama-70b"));
    }

    #[test]
    fn a_key_setting_replaces_its_tenants_and_an_empty_one_opts_out() {
        let tenant = opt_in(&["*"]);
        let key_out = opt_in(&[]);
        let key_small = opt_in(&["llama-8b"]);
        assert_eq!(Distillation::of(None, Some(&tenant)), Some(&tenant));
        assert_eq!(Distillation::of(Some(&key_out), Some(&tenant)), None);
        assert_eq!(
            Distillation::of(Some(&key_small), Some(&tenant)),
            Some(&key_small)
        );
        assert_eq!(Distillation::of(None, None), None);
    }

    #[test]
    fn malformed_patterns_are_refused_with_the_field() {
        let err = opt_in(&["llama 70b"]).validate().unwrap_err();
        assert_eq!(err.field(), "distillation.models");
        assert!(opt_in(&["llama-*"]).validate().is_ok());
    }
}
