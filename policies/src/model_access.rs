//! Which models may a caller name? A tier's allow- and deny-lists of model and alias names,
//! with a key's own lists on top. A pattern is a name in which `*` stands for any run of
//! characters (`llama-*`, `*`).
//!
//! A request is allowed when the name it asks for, or the model that name is an alias of for
//! the caller's tier, matches the allow-list (no allow-list: every model), and neither matches
//! the deny-list. A key's allow-list replaces its tier's, as a key's limits do; the deny-lists
//! of both apply, so a model a tier forbids stays forbidden to every key of the tier unless
//! the key moves to another tier.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// More patterns than this in one list is a mistake, not a policy, and would make each
/// request pay for it.
pub const MAX_PATTERNS: usize = 256;
const MAX_PATTERN_LEN: usize = 256;

/// The lists as configured on a tier or a key.
/// Flattened into the tier and key records, so the fields sit beside the limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ModelLists {
    /// Absent or `null`: no allow-list of its own (a key inherits its tier's; a tier allows
    /// every model). `[]` allows nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied_models: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("'{field}' holds more than {MAX_PATTERNS} patterns")]
    TooMany { field: &'static str },
    #[error("'{field}': a pattern must be 1 to {MAX_PATTERN_LEN} printable characters without spaces; got {pattern:?}")]
    Bad {
        field: &'static str,
        pattern: String,
    },
}

impl PatternError {
    /// The list the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            PatternError::TooMany { field } | PatternError::Bad { field, .. } => field,
        }
    }
}

impl ModelLists {
    /// Every pattern well-formed, and not too many of them.
    pub fn validate(&self) -> Result<(), PatternError> {
        let lists = [
            (
                "allowed_models",
                self.allowed_models.as_deref().unwrap_or(&[]),
            ),
            ("denied_models", &self.denied_models[..]),
        ];
        for (field, patterns) in lists {
            validate_patterns(field, patterns)?;
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.allowed_models.is_none() && self.denied_models.is_empty()
    }
}

/// One list of patterns, named `field` in errors: each well-formed, and not too many.
pub fn validate_patterns(field: &'static str, patterns: &[String]) -> Result<(), PatternError> {
    if patterns.len() > MAX_PATTERNS {
        return Err(PatternError::TooMany { field });
    }
    if let Some(bad) = patterns.iter().find(|p| !well_formed(p)) {
        return Err(PatternError::Bad {
            field,
            pattern: bad.clone(),
        });
    }
    Ok(())
}

fn well_formed(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern.len() <= MAX_PATTERN_LEN
        && !pattern.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// The lists in force for one caller: its tier's with its key's on top.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelAccess {
    allowed: Option<Vec<String>>,
    denied: Vec<String>,
}

impl ModelAccess {
    pub fn of(tier: &ModelLists, key: &ModelLists) -> Self {
        let allowed = key
            .allowed_models
            .clone()
            .or_else(|| tier.allowed_models.clone());
        let mut denied = tier.denied_models.clone();
        denied.extend(key.denied_models.iter().cloned());
        ModelAccess { allowed, denied }
    }

    /// Every model, no exceptions: what a caller without lists gets.
    pub fn unrestricted(&self) -> bool {
        self.allowed.is_none() && self.denied.is_empty()
    }

    /// May a request that names `asked` (resolved to `target` when it is an alias) go on?
    pub fn permits(&self, asked: &str, target: Option<&str>) -> bool {
        let names = || std::iter::once(asked).chain(target);
        let any_matches =
            |patterns: &[String]| names().any(|name| patterns.iter().any(|p| matches(p, name)));
        if any_matches(&self.denied) {
            return false;
        }
        self.allowed.as_deref().is_none_or(any_matches)
    }
}

/// Does `name` match `pattern`, where `*` matches any run of characters (none included)?
/// Greedy with backtracking to the last star only, so it is linear in practice and at worst
/// `pattern.len() × name.len()`, both bounded.
pub fn matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Where the last star was, and where in `name` its match currently ends.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((star_pi, star_ni)) = star {
            pi = star_pi + 1;
            ni = star_ni + 1;
            star = Some((star_pi, star_ni + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lists(allowed: Option<&[&str]>, denied: &[&str]) -> ModelLists {
        ModelLists {
            allowed_models: allowed.map(|a| a.iter().map(|s| s.to_string()).collect()),
            denied_models: denied.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn stars_match_any_run_of_characters() {
        assert!(matches("*", ""));
        assert!(matches("*", "llama-70b"));
        assert!(matches("llama-*", "llama-70b"));
        assert!(matches("*-70b", "llama-70b"));
        assert!(matches("l*a*b", "llama-70b"));
        assert!(matches("llama-70b", "llama-70b"));
        assert!(!matches("llama-70b", "llama-70b-instruct"));
        assert!(!matches("llama-*", "mistral-7b"));
        assert!(!matches("*-8b", "llama-70b"));
        assert!(matches("a*b*c", "aXbYbZc"));
        assert!(!matches("a*b*c", "aXbYbZ"));
        assert!(!matches("", "x"));
        assert!(matches("**", "anything"));
    }

    #[test]
    fn a_tier_allow_list_refuses_every_other_model() {
        let access = ModelAccess::of(&lists(Some(&["llama-8b", "chat"]), &[]), &lists(None, &[]));
        assert!(access.permits("llama-8b", None));
        assert!(access.permits("chat", Some("llama-8b")));
        assert!(!access.permits("llama-70b", None));
    }

    #[test]
    fn an_alias_is_allowed_through_its_target_but_denied_through_either() {
        let access = ModelAccess::of(
            &lists(Some(&["llama-8b"]), &["llama-70b"]),
            &ModelLists::default(),
        );
        assert!(
            access.permits("chat", Some("llama-8b")),
            "the target is allowed"
        );
        assert!(
            !access.permits("big", Some("llama-70b")),
            "the target is denied"
        );
        let deny_alias = ModelAccess::of(&lists(None, &["chat"]), &ModelLists::default());
        assert!(!deny_alias.permits("chat", Some("llama-8b")));
        assert!(deny_alias.permits("llama-8b", None));
    }

    #[test]
    fn a_key_allow_list_replaces_its_tiers_and_deny_lists_add_up() {
        let tier = lists(Some(&["llama-8b"]), &["secret-*"]);
        let key = lists(Some(&["llama-*"]), &["llama-405b"]);
        let access = ModelAccess::of(&tier, &key);
        assert!(access.permits("llama-70b", None));
        assert!(!access.permits("llama-405b", None));
        assert!(!access.permits("secret-model", None));
        assert!(!access.permits("mistral-7b", None));
        let nothing = ModelAccess::of(&tier, &lists(Some(&[]), &[]));
        assert!(!nothing.permits("llama-8b", None));
        assert!(ModelAccess::default().unrestricted());
        assert!(!access.unrestricted());
    }

    #[test]
    fn malformed_or_too_many_patterns_are_refused() {
        assert!(lists(Some(&["llama-*"]), &["x"]).validate().is_ok());
        assert!(matches!(
            lists(Some(&[""]), &[]).validate(),
            Err(PatternError::Bad {
                field: "allowed_models",
                ..
            })
        ));
        assert!(matches!(
            lists(None, &["two words"]).validate(),
            Err(PatternError::Bad {
                field: "denied_models",
                ..
            })
        ));
        let many: Vec<String> = (0..=MAX_PATTERNS).map(|i| format!("m{i}")).collect();
        let too_many = ModelLists {
            allowed_models: Some(many),
            denied_models: vec![],
        };
        assert_eq!(
            too_many.validate(),
            Err(PatternError::TooMany {
                field: "allowed_models"
            })
        );
    }
}
