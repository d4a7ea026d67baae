//! Do two questions ask the same thing? The second stage of the semantic cache: the stored
//! questions nearest by embedding are only candidates, and a candidate's answer is served
//! only if the pair passes every check here.
//!
//! Sentence embeddings are close to blind to word order and to many one-word changes of
//! meaning: "Can a landlord evict a tenant…" and "Can a tenant evict a landlord…" embed at
//! 0.99, and so do "cheaper" and "more expensive", "last year" and "next year". Each check
//! looks for one such kind of change ([`Check`]); a new kind is one more variant and one more
//! function in `checks`. Below the strict similarity the words themselves must also line up
//! (the same stems, or typos of them), so reordered, politer, retyped and recased questions
//! are found far below the threshold that embeddings alone would need.

mod checks;
mod lexicon;
mod words;

pub use words::normal_form;

/// A kind of change that makes two similar questions different; each is counted apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Check {
    /// Different quoted text.
    Quoted,
    /// Different dates or relative times (years, months, weekdays, "last year"/"next year",
    /// "yesterday"/"tomorrow", "ago").
    Time,
    /// Different units, or the same units on different numbers ("10 km to miles" / "10 miles
    /// to km").
    Units,
    /// Different numbers, in digits of any script or spelled out.
    Numbers,
    /// A different number of negations, or a word negated by a prefix or suffix.
    Negation,
    /// A name in one question and not the other.
    Entities,
    /// Opposite ends of a scale ("cheaper"/"more expensive", "before"/"after"), or the same
    /// comparison with its terms the other way round.
    Comparison,
    /// Terms that changed places around a shared word ("landlord evicts tenant" / "tenant
    /// evicts landlord").
    RoleSwap,
    /// Below the strict similarity, a word without its match in the other question.
    Wording,
    /// A question longer than [`MAX_WORDS`]: not compared (an exact hit still serves it).
    TooLong,
}

/// The longest question the checks compare, in words. Some checks compare every pair or
/// triple of words, so a bound keeps a huge prompt from costing a replica seconds; a near
/// repeat of a long document is also where a wrong answer is likeliest to go unnoticed.
pub const MAX_WORDS: usize = 150;

impl Check {
    pub const ALL: [Check; 10] = [
        Check::Quoted,
        Check::Time,
        Check::Units,
        Check::Numbers,
        Check::Negation,
        Check::Entities,
        Check::Comparison,
        Check::RoleSwap,
        Check::Wording,
        Check::TooLong,
    ];

    /// As it appears in stats and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Check::Quoted => "quoted",
            Check::Time => "time",
            Check::Units => "units",
            Check::Numbers => "numbers",
            Check::Negation => "negation",
            Check::Entities => "entities",
            Check::Comparison => "comparison",
            Check::RoleSwap => "role_swap",
            Check::Wording => "wording",
            Check::TooLong => "too_long",
        }
    }
}

/// Whether `asked` asks what `stored` asked, given the cosine `similarity` of their
/// embeddings: `Err` names the first check the pair fails. At or above `strict` similarity,
/// words without a match are taken for synonyms (every other check still applies).
pub fn verify(stored: &str, asked: &str, similarity: f32, strict: f32) -> Result<(), Check> {
    if [stored, asked]
        .iter()
        .any(|q| q.split_whitespace().nth(MAX_WORDS).is_some())
    {
        return Err(Check::TooLong);
    }
    let a = words::Question::of(stored);
    let mut b = words::Question::of(asked);
    checks::spell_like(&mut b, &a);
    let pair = checks::Pair {
        a,
        b,
        similarity,
        strict,
    };
    match checks::CHECKS.iter().find(|(_, passes)| !passes(&pair)) {
        Some((check, _)) => Err(*check),
        None => Ok(()),
    }
}

/// The structural checks alone (every check but [`Check::Wording`]), for when a learned
/// verifier judges the wording.
pub fn verify_structure(stored: &str, asked: &str) -> Result<(), Check> {
    verify(stored, asked, 1.0, 1.0)
}

#[cfg(test)]
mod tests;
