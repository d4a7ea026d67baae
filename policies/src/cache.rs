//! Which answers the response cache may keep and serve: the rules per tier and model, whether a
//! request is eligible, and the guard that keeps a semantic hit from answering a question
//! that only looks like the one that was asked.
//!
//! Pure functions of their arguments; the gateway's cache module does the I/O.

use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

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
            similarity_threshold: 0.95,
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

/// Why two prompts that embed close together were judged different.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardFailure {
    Negation,
    Numbers,
    Entities,
    Quoted,
}

/// The cheap check a semantic hit must pass: the stored prompt and the new one must agree on
/// negation, numbers, named entities and quoted strings. Sentence embeddings put "Is X safe?"
/// and "Is X not safe?" (or "2 cups" and "3 cups") close together; these markers are what
/// such near-misses differ in.
pub fn same_meaning_markers(stored: &str, asked: &str) -> Result<(), GuardFailure> {
    let (a, b) = (Markers::of(stored), Markers::of(asked));
    if a.negations != b.negations {
        return Err(GuardFailure::Negation);
    }
    if a.numbers != b.numbers {
        return Err(GuardFailure::Numbers);
    }
    if a.entities != b.entities {
        return Err(GuardFailure::Entities);
    }
    if a.quoted != b.quoted {
        return Err(GuardFailure::Quoted);
    }
    Ok(())
}

#[derive(Debug, Default, PartialEq)]
struct Markers {
    /// How many negations the prompt has: "not X" and "never X" say the same thing, "not not
    /// X" does not, so the count is compared, not which words were used.
    negations: usize,
    numbers: BTreeSet<String>,
    entities: BTreeSet<String>,
    quoted: BTreeSet<String>,
}

const NEGATIONS: &[&str] = &[
    "not", "no", "never", "none", "nobody", "nothing", "neither", "nor", "nowhere", "without",
    "cannot", "cant", "dont", "doesnt", "didnt", "isnt", "arent", "wasnt", "werent", "wont",
    "wouldnt", "shouldnt", "couldnt", "hasnt", "havent", "hadnt", "mustnt", "neednt", "aint",
    "nein", "nicht", "pas", "jamais",
];

const NUMBER_WORDS: &[&str] = &[
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
    "thirty",
    "forty",
    "fifty",
    "sixty",
    "seventy",
    "eighty",
    "ninety",
    "hundred",
    "thousand",
    "million",
    "billion",
    "trillion",
    "first",
    "second",
    "third",
    "fourth",
    "fifth",
    "sixth",
    "seventh",
    "eighth",
    "ninth",
    "tenth",
    "half",
    "twice",
    "double",
    "triple",
    "dozen",
];

/// Capitalised words that start questions and sentences without naming anything (folded
/// to lower case without apostrophes).
const COMMON_CAPITALISED: &[&str] = &[
    "a",
    "an",
    "the",
    "what",
    "whats",
    "which",
    "who",
    "whom",
    "whose",
    "when",
    "where",
    "why",
    "how",
    "is",
    "are",
    "was",
    "were",
    "am",
    "be",
    "do",
    "does",
    "did",
    "can",
    "could",
    "will",
    "would",
    "shall",
    "should",
    "may",
    "might",
    "must",
    "has",
    "have",
    "had",
    "i",
    "im",
    "ive",
    "id",
    "ill",
    "you",
    "we",
    "they",
    "he",
    "she",
    "it",
    "its",
    "this",
    "that",
    "these",
    "those",
    "there",
    "here",
    "please",
    "tell",
    "give",
    "explain",
    "describe",
    "list",
    "show",
    "write",
    "name",
    "define",
    "compare",
    "summarize",
    "summarise",
    "translate",
    "find",
    "let",
    "lets",
    "if",
    "in",
    "on",
    "at",
    "for",
    "to",
    "of",
    "and",
    "or",
    "but",
    "so",
    "my",
    "your",
    "our",
    "their",
    "yes",
    "ok",
    "okay",
    "hi",
    "hello",
    "hey",
    "thanks",
    "thank",
    "any",
    "some",
    "all",
    "each",
    "every",
    "also",
    "then",
    "now",
    "just",
    "help",
    "me",
    "convert",
    "calculate",
    "create",
    "make",
    "generate",
    "suggest",
    "recommend",
    "say",
    "dear",
    "answer",
    "provide",
    "draft",
    "fix",
    "check",
];

impl Markers {
    fn of(text: &str) -> Markers {
        let mut markers = Markers {
            quoted: quoted_strings(text),
            ..Markers::default()
        };
        for raw in text.split(|c: char| c.is_whitespace() || "()[]{}<>\"“”«»`;:/".contains(c))
        {
            let word = raw.trim_matches(|c: char| !c.is_alphanumeric());
            if word.is_empty() {
                continue;
            }
            let folded: String = word
                .chars()
                .filter(|c| c.is_alphanumeric())
                .flat_map(char::to_lowercase)
                .collect();
            let bare = folded.strip_suffix('s').filter(|_| word.ends_with("'s"));
            if NEGATIONS.contains(&folded.as_str())
                || word.to_lowercase().ends_with("n't")
                || word.to_lowercase().ends_with("n’t")
            {
                markers.negations += 1;
            } else if looks_numeric(word) {
                markers.numbers.insert(normalise_number(word));
            } else if NUMBER_WORDS.contains(&folded.as_str()) {
                markers.numbers.insert(folded.clone());
            } else if is_entity_like(word, &folded) {
                markers
                    .entities
                    .insert(bare.map_or(folded.clone(), str::to_owned));
            }
        }
        markers
    }
}

fn looks_numeric(word: &str) -> bool {
    let trimmed = word.trim_matches(|c: char| !c.is_alphanumeric());
    trimmed.chars().any(|c| c.is_ascii_digit())
}

/// "1,000", "1000" and "1000.0" are the same number; "10%" keeps its sign of percent.
fn normalise_number(word: &str) -> String {
    let kept: String = word.chars().filter(|c| *c != ',' && *c != '_').collect();
    match kept.parse::<f64>() {
        Ok(v) if v.is_finite() => format!("{v}"),
        _ => kept.to_lowercase(),
    }
}

fn is_entity_like(word: &str, folded: &str) -> bool {
    let mut chars = word.chars();
    let first_upper = chars.next().is_some_and(char::is_uppercase);
    let inner_upper = chars.any(char::is_uppercase);
    if inner_upper {
        // "iPhone", "NASA", "McDonald": never a plain word.
        return true;
    }
    if !first_upper {
        return false;
    }
    // Capitalised question words and the like start sentences; they name nothing.
    !COMMON_CAPITALISED.contains(&folded)
}

/// Text between matching quotes: "…", “…”, «…», `…`, and '…' when it does not look like an
/// apostrophe.
fn quoted_strings(text: &str) -> BTreeSet<String> {
    let pairs = [('"', '"'), ('“', '”'), ('«', '»'), ('`', '`'), ('\'', '\'')];
    let mut found = BTreeSet::new();
    for (open, close) in pairs {
        let mut rest = text;
        while let Some(start) = rest.find(open) {
            let opened_mid_word = open == '\''
                && rest[..start]
                    .chars()
                    .next_back()
                    .is_some_and(char::is_alphanumeric);
            let after = &rest[start + open.len_utf8()..];
            if opened_mid_word {
                rest = after;
                continue;
            }
            let Some(end) = after.find(close) else { break };
            let inner = &after[..end];
            if !inner.trim().is_empty() {
                found.insert(inner.to_owned());
            }
            rest = &after[end + close.len_utf8()..];
        }
    }
    found
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
        assert_eq!(policy.rules("pro", "small").similarity_threshold, 0.95);
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

    #[test]
    fn paraphrases_pass_the_guard() {
        for (a, b) in [
            (
                "What is the capital of France?",
                "Which city is the capital of France?",
            ),
            ("How do I reset my password?", "How can I reset my password"),
            ("Is aspirin safe for children?", "Is aspirin safe for kids?"),
            (
                "Convert 1,000 meters to feet",
                "How many feet are 1000 meters?",
            ),
            (
                "What's France's population?",
                "What is the population of France?",
            ),
            ("Is it not safe?", "Isn't it safe?"),
        ] {
            assert_eq!(same_meaning_markers(a, b), Ok(()), "{a} / {b}");
        }
    }

    #[test]
    fn near_misses_fail_the_guard() {
        for (a, b, why) in [
            (
                "Is ibuprofen safe during pregnancy?",
                "Is ibuprofen not safe during pregnancy?",
                GuardFailure::Negation,
            ),
            ("Can I do this?", "Can't I do this?", GuardFailure::Negation),
            (
                "How many calories are in 2 eggs?",
                "How many calories are in 3 eggs?",
                GuardFailure::Numbers,
            ),
            (
                "Give me two reasons",
                "Give me three reasons",
                GuardFailure::Numbers,
            ),
            (
                "What is the capital of France?",
                "What is the capital of Germany?",
                GuardFailure::Entities,
            ),
            (
                "Translate \"good morning\" into Spanish",
                "Translate \"good night\" into Spanish",
                GuardFailure::Quoted,
            ),
            (
                "Who founded Microsoft?",
                "Who founded Apple?",
                GuardFailure::Entities,
            ),
        ] {
            assert_eq!(same_meaning_markers(a, b), Err(why), "{a} / {b}");
        }
    }

    #[test]
    fn apostrophes_are_not_quotes() {
        assert!(quoted_strings("it's John's dog and Mary's cat").is_empty());
        assert_eq!(
            quoted_strings("say 'hello world' twice"),
            BTreeSet::from(["hello world".to_owned()])
        );
    }
}
