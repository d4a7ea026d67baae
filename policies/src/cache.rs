//! Which answers the response cache may keep and serve: the rules per tier and model, and
//! whether a request is eligible. Whether a stored question asks what was asked is
//! [`crate::same_question`]'s.
//!
//! Pure functions of their arguments; the gateway's cache module does the I/O.

use serde::Deserialize;
use std::collections::BTreeMap;

/// The rules in force for one request (its tier and model).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheRules {
    pub enabled: bool,
    /// How long an entry lives, in seconds.
    pub ttl_secs: u64,
    /// Cosine similarity at or above which the nearest stored prompt counts as the same.
    pub similarity_threshold: f32,
    /// Treat a request that leaves `temperature` unset as deterministic. Off by default:
    /// OpenAI's default temperature is 1.
    pub cache_unset_temperature: bool,
}

impl Default for CacheRules {
    fn default() -> Self {
        CacheRules {
            enabled: true,
            ttl_secs: 3600,
            similarity_threshold: 0.96,
            cache_unset_temperature: false,
        }
    }
}

/// Settings that a tier or a model may change; unset ones come from the level above.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleOverrides {
    pub enabled: Option<bool>,
    pub ttl_secs: Option<u64>,
    pub similarity_threshold: Option<f32>,
    pub cache_unset_temperature: Option<bool>,
}

impl RuleOverrides {
    fn apply(&self, rules: &mut CacheRules) {
        // Destructured so that a new setting does not compile until it is applied here.
        let RuleOverrides {
            enabled,
            ttl_secs,
            similarity_threshold,
            cache_unset_temperature,
        } = self;
        if let Some(enabled) = enabled {
            // Off anywhere means off: a tier cannot switch on what the operator switched off.
            rules.enabled &= enabled;
        }
        if let Some(ttl) = ttl_secs {
            rules.ttl_secs = *ttl;
        }
        if let Some(threshold) = similarity_threshold {
            rules.similarity_threshold = *threshold;
        }
        if let Some(unset) = cache_unset_temperature {
            rules.cache_unset_temperature = *unset;
        }
    }
}

/// The cache policy: defaults, then per-tier, then per-model settings (the most specific
/// wins, except that `enabled = false` at any level wins).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CachePolicy {
    pub defaults: CacheRules,
    pub tiers: BTreeMap<String, RuleOverrides>,
    pub models: BTreeMap<String, RuleOverrides>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CachePolicyError {
    #[error("{at}: similarity_threshold must be between 0 and 1, not {value}")]
    Threshold { at: String, value: String },
    #[error("{at}: ttl_secs must be at least 1")]
    Ttl { at: String },
}

impl CachePolicy {
    pub fn check(&self) -> Result<(), CachePolicyError> {
        let levels = std::iter::once(("cache".to_owned(), self.defaults_as_overrides()))
            .chain(
                self.tiers
                    .iter()
                    .map(|(n, o)| (format!("cache.tiers.{n}"), o.clone())),
            )
            .chain(
                self.models
                    .iter()
                    .map(|(n, o)| (format!("cache.models.{n}"), o.clone())),
            );
        for (at, o) in levels {
            if let Some(t) = o.similarity_threshold {
                if !(t > 0.0 && t <= 1.0) {
                    return Err(CachePolicyError::Threshold {
                        at,
                        value: t.to_string(),
                    });
                }
            }
            if o.ttl_secs == Some(0) {
                return Err(CachePolicyError::Ttl { at });
            }
        }
        Ok(())
    }

    fn defaults_as_overrides(&self) -> RuleOverrides {
        RuleOverrides {
            enabled: Some(self.defaults.enabled),
            ttl_secs: Some(self.defaults.ttl_secs),
            similarity_threshold: Some(self.defaults.similarity_threshold),
            cache_unset_temperature: Some(self.defaults.cache_unset_temperature),
        }
    }

    pub fn rules(&self, tier: &str, model: &str) -> CacheRules {
        let mut rules = self.defaults;
        if let Some(o) = self.tiers.get(tier) {
            o.apply(&mut rules);
        }
        if let Some(o) = self.models.get(model) {
            o.apply(&mut rules);
        }
        rules
    }

    /// The longest any entry can live: how far back replicas replay the cache's log.
    pub fn max_ttl_secs(&self) -> u64 {
        self.tiers
            .values()
            .chain(self.models.values())
            .filter_map(|o| o.ttl_secs)
            .fold(self.defaults.ttl_secs, u64::max)
    }
}

/// What the cache needs to know about a request to decide whether it may be cached.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RequestFacts {
    pub temperature: Option<f64>,
    pub n: Option<u32>,
    /// Tools, functions or a tool choice were sent.
    pub uses_tools: bool,
    /// Log probabilities were asked for (they are not kept).
    pub wants_logprobs: bool,
}

/// Why a request is not cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ineligible {
    Disabled,
    Sampled,
    SeveralChoices,
    Tools,
    Logprobs,
}

/// Whether a request's answer may be served from, and stored into, the cache.
pub fn eligible(rules: &CacheRules, facts: &RequestFacts) -> Result<(), Ineligible> {
    if !rules.enabled {
        return Err(Ineligible::Disabled);
    }
    match facts.temperature {
        Some(0.0) => {}
        None if rules.cache_unset_temperature => {}
        _ => return Err(Ineligible::Sampled),
    }
    if facts.n.unwrap_or(1) != 1 {
        return Err(Ineligible::SeveralChoices);
    }
    if facts.uses_tools {
        return Err(Ineligible::Tools);
    }
    if facts.wants_logprobs {
        return Err(Ineligible::Logprobs);
    }
    Ok(())
}

/// What a `Cache-Control` request header asks of the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// `no-cache`: do not answer from the cache (the answer may still be stored).
    pub skip_lookup: bool,
    /// `no-store`: do not keep this answer.
    pub skip_store: bool,
}

impl CacheControl {
    pub fn parse(header: Option<&str>) -> CacheControl {
        let mut control = CacheControl::default();
        for directive in header.unwrap_or("").split(',') {
            let directive = directive.trim();
            if directive.eq_ignore_ascii_case("no-cache") {
                control.skip_lookup = true;
            } else if directive.eq_ignore_ascii_case("no-store") {
                control.skip_store = true;
            }
        }
        control
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> CacheRules {
        CacheRules::default()
    }

    #[test]
    fn only_deterministic_single_answers_without_tools_are_eligible() {
        let zero = RequestFacts {
            temperature: Some(0.0),
            ..RequestFacts::default()
        };
        assert_eq!(eligible(&rules(), &zero), Ok(()));
        let unset = RequestFacts::default();
        assert_eq!(eligible(&rules(), &unset), Err(Ineligible::Sampled));
        let lenient = CacheRules {
            cache_unset_temperature: true,
            ..rules()
        };
        assert_eq!(eligible(&lenient, &unset), Ok(()));
        let warm = RequestFacts {
            temperature: Some(0.7),
            ..zero
        };
        assert_eq!(eligible(&lenient, &warm), Err(Ineligible::Sampled));
        let two = RequestFacts { n: Some(2), ..zero };
        assert_eq!(eligible(&rules(), &two), Err(Ineligible::SeveralChoices));
        let tools = RequestFacts {
            uses_tools: true,
            ..zero
        };
        assert_eq!(eligible(&rules(), &tools), Err(Ineligible::Tools));
        let off = CacheRules {
            enabled: false,
            ..rules()
        };
        assert_eq!(eligible(&off, &zero), Err(Ineligible::Disabled));
    }

    #[test]
    fn the_most_specific_level_wins_but_off_anywhere_is_off() {
        let mut policy = CachePolicy::default();
        policy.tiers.insert(
            "free".into(),
            RuleOverrides {
                similarity_threshold: Some(0.97),
                ttl_secs: Some(60),
                ..RuleOverrides::default()
            },
        );
        policy.models.insert(
            "big".into(),
            RuleOverrides {
                similarity_threshold: Some(0.9),
                ..RuleOverrides::default()
            },
        );
        policy.models.insert(
            "secret".into(),
            RuleOverrides {
                enabled: Some(false),
                ..RuleOverrides::default()
            },
        );
        assert_eq!(policy.rules("free", "small").similarity_threshold, 0.97);
        assert_eq!(policy.rules("free", "big").similarity_threshold, 0.9);
        assert_eq!(policy.rules("free", "big").ttl_secs, 60);
        assert_eq!(policy.rules("pro", "small").similarity_threshold, 0.96);
        assert!(!policy.rules("pro", "secret").enabled);
        assert_eq!(policy.max_ttl_secs(), 3600);

        policy.tiers.get_mut("free").unwrap().enabled = Some(false);
        policy.models.get_mut("big").unwrap().enabled = Some(true);
        assert!(!policy.rules("free", "big").enabled);
    }

    #[test]
    fn bad_thresholds_and_ttls_are_refused_with_where() {
        let mut policy = CachePolicy::default();
        policy.tiers.insert(
            "pro".into(),
            RuleOverrides {
                similarity_threshold: Some(1.5),
                ..RuleOverrides::default()
            },
        );
        let err = policy.check().unwrap_err().to_string();
        assert!(err.contains("cache.tiers.pro"), "{err}");
        policy.tiers.clear();
        policy.defaults.ttl_secs = 0;
        assert!(policy.check().is_err());
    }

    #[test]
    fn cache_control_directives() {
        assert_eq!(CacheControl::parse(None), CacheControl::default());
        let both = CacheControl::parse(Some("No-Cache, no-store"));
        assert!(both.skip_lookup && both.skip_store);
        let store_only = CacheControl::parse(Some("max-age=0, no-store"));
        assert!(!store_only.skip_lookup && store_only.skip_store);
    }
}
