//! One function per kind of change that can make two similar questions ask different things.
//! Each returns whether the pair passes; [`CHECKS`] lists them in the order they run.

use super::lexicon::{NEGATING_PREFIXES, OPPOSED_SUFFIXES, SCALES, SENTENCE_WORDS, SYMMETRIC};
use super::words::{Kind, Question, Word};
use super::Check;
use std::collections::{BTreeMap, BTreeSet};

/// The stored question, the one asked, and how close their embeddings are.
pub(super) struct Pair {
    pub a: Question,
    pub b: Question,
    pub similarity: f32,
    /// At or above this similarity, different words are taken for synonyms.
    pub strict: f32,
}

pub(super) type CheckFn = fn(&Pair) -> bool;

/// Every check, in the order they run; the first that fails names the rejection.
pub(super) const CHECKS: &[(Check, CheckFn)] = &[
    (Check::Quoted, |p| p.a.quoted == p.b.quoted),
    (Check::Time, times),
    (Check::Units, units),
    (Check::Numbers, |p| p.a.numbers == p.b.numbers),
    (Check::Negation, negation),
    (Check::Entities, entities),
    (Check::Comparison, comparison),
    (Check::RoleSwap, roles),
    (Check::Wording, wording),
];

/// Takes a retyped word of `b` for the word of `a` it is a typo of ("landlrod" for
/// "landlord"), so that the order and comparison checks see the same term in both: without
/// it a typo hides a swap ("Can a landlrod evict a tenant" against "Can a tenant evict a
/// landlord").
pub(super) fn spell_like(b: &mut Question, a: &Question) {
    for word in b.words.iter_mut().filter(|w| w.kind == Kind::Content) {
        if a.words.iter().any(|o| o.stem == word.stem) {
            continue;
        }
        if let Some(original) = a
            .words
            .iter()
            .find(|o| o.kind == Kind::Content && same_word(o, word))
        {
            word.stem = original.stem.clone();
        }
    }
}

/// The same times. A number both questions have is no date in one and not the other
/// ("$1000" and "$1,000"): the numbers check has it.
fn times(p: &Pair) -> bool {
    let dates = |q: &Question| -> BTreeSet<String> {
        q.times
            .iter()
            .filter(|t| {
                t.strip_prefix("year:")
                    .is_none_or(|n| !(p.a.numbers.contains(n) && p.b.numbers.contains(n)))
            })
            .cloned()
            .collect()
    };
    dates(&p.a) == dates(&p.b)
}

/// The same units, attached to the same numbers: "10 km in miles" and "10 miles in km" name
/// the same units but not the same quantity.
fn units(p: &Pair) -> bool {
    p.a.units == p.b.units && p.a.quantities == p.b.quantities
}

/// As many negations, and no word negated by a prefix or suffix that the other question has
/// plain ("legal" / "illegal", "harmful" / "harmless").
fn negation(p: &Pair) -> bool {
    p.a.negations == p.b.negations && !negated_word(&p.a, &p.b) && !negated_word(&p.b, &p.a)
}

fn negated_word(a: &Question, b: &Question) -> bool {
    let in_a: BTreeSet<&str> = a.words.iter().map(|w| w.folded.as_str()).collect();
    let in_b: BTreeSet<&str> = b.words.iter().map(|w| w.folded.as_str()).collect();
    let only_b = |w: &str| in_b.contains(w) && !in_a.contains(w);
    a.content()
        .filter(|w| !in_b.contains(w.folded.as_str()))
        .any(|w| {
            let word = w.folded.as_str();
            let prefixed = NEGATING_PREFIXES.iter().any(|prefix| {
                word.strip_prefix(prefix)
                    .is_some_and(|base| base.chars().count() >= 4 && only_b(base))
            });
            let suffixed = OPPOSED_SUFFIXES.iter().any(|(plain, negated)| {
                word.strip_suffix(negated).is_some_and(|base| {
                    base.chars().count() >= 3 && only_b(&format!("{base}{plain}"))
                })
            });
            prefixed || suffixed
        })
}

/// Every name in one question is in the other. A name is a capitalised word that does not
/// start a sentence, or a word with capitals inside ("iPhone", "NASA"); it is found in the
/// other question in any case and with a one-letter typo.
fn entities(p: &Pair) -> bool {
    names(&p.a).all(|n| mentions(&p.b, n)) && names(&p.b).all(|n| mentions(&p.a, n))
}

fn names(q: &Question) -> impl Iterator<Item = &Word> {
    q.content().filter(move |w| {
        let mut chars = w.text.chars();
        let first_upper = chars.next().is_some_and(char::is_uppercase);
        let inner_upper = chars.any(char::is_uppercase);
        !q.shouting
            && (inner_upper || (first_upper && !w.starts_sentence))
            && !SENTENCE_WORDS.contains(&w.folded.as_str())
    })
}

fn mentions(q: &Question, name: &Word) -> bool {
    q.words.iter().any(|w| same_word(w, name))
}

/// Whether two words are the same word, allowing for inflection and for a typo in a longer
/// word (a transposition in a short one).
fn same_word(a: &Word, b: &Word) -> bool {
    if a.folded == b.folded || a.stem == b.stem {
        return true;
    }
    let shorter = a.folded.chars().count().min(b.folded.chars().count());
    let distance = strsim::osa_distance(&a.folded, &b.folded);
    let first = |w: &str| w.chars().next();
    let last = |w: &str| w.chars().next_back();
    match shorter {
        0..=2 => false,
        3 => distance == 1 && same_letters(&a.folded, &b.folded),
        // A transposition, or a letter dropped inside the word ("wman" for "woman").
        4 => {
            distance == 1
                && (same_letters(&a.folded, &b.folded)
                    || (first(&a.folded) == first(&b.folded)
                        && last(&a.folded) == last(&b.folded)
                        && a.folded.chars().count() != b.folded.chars().count()))
        }
        5..=7 => distance <= 1,
        _ => distance <= 2,
    }
}

fn same_letters(a: &str, b: &str) -> bool {
    let sorted = |s: &str| {
        let mut c: Vec<char> = s.chars().collect();
        c.sort_unstable();
        c
    };
    sorted(a) == sorted(b)
}

/// The two ends of a scale agree: "cheaper" against "more expensive" is a different
/// question, and so is "A cheaper than B" against "B cheaper than A"; "B dearer than A" is
/// the same one.
fn comparison(p: &Pair) -> bool {
    let (a, b) = (scale_words(&p.a), scale_words(&p.b));
    for (scale, ends_a) in &a {
        let Some(ends_b) = b.get(scale) else { continue };
        if let ([(at_a, end_a)], [(at_b, end_b)]) = (ends_a.as_slice(), ends_b.as_slice()) {
            // The terms of a comparison stand either side of "than" where there is one
            // ("worse to skip breakfast than to skip dinner"), else of the scale word.
            let (pivot_a, pivot_b) = match (only(&p.a, "than"), only(&p.b, "than")) {
                (Some(a), Some(b)) => (a, b),
                _ => (*at_a, *at_b),
            };
            let turned = if terms_swapped(&p.a, pivot_a, &p.b, pivot_b) {
                -1
            } else {
                1
            };
            if end_a * end_b * turned < 0 {
                return false;
            }
        } else {
            let ends = |e: &[(usize, i8)]| {
                let mut v: Vec<i8> = e.iter().map(|(_, end)| *end).collect();
                v.sort_unstable();
                v
            };
            if ends(ends_a) != ends(ends_b) {
                return false;
            }
        }
    }
    true
}

/// Where `word` stands, if it occurs once.
fn only(q: &Question, word: &str) -> Option<usize> {
    let mut at = q.words.iter().enumerate().filter(|(_, w)| w.folded == word);
    match (at.next(), at.next()) {
        (Some((i, _)), None) => Some(i),
        _ => None,
    }
}

/// The scale words of a question, by scale: where each stands and which end it names ("less
/// expensive" names the cheap end).
fn scale_words(q: &Question) -> BTreeMap<&'static str, Vec<(usize, i8)>> {
    let mut found: BTreeMap<&'static str, Vec<(usize, i8)>> = BTreeMap::new();
    let mut modifier: Option<i8> = None;
    for (at, word) in q.words.iter().enumerate() {
        let Some(&(_, scale, end)) = SCALES.iter().find(|(w, _, _)| *w == word.folded) else {
            modifier = None;
            continue;
        };
        let next_scales = q.words.get(at + 1).and_then(|next| {
            SCALES
                .iter()
                .find(|(w, s, _)| *w == next.folded && *s != "amount")
        });
        if scale == "amount" && next_scales.is_some() {
            // "more" or "less" before a scale word modifies it.
            modifier = Some(end);
            continue;
        }
        found
            .entry(scale)
            .or_default()
            .push((at, end * modifier.take().unwrap_or(1)));
    }
    found
}

/// Whether the terms on either side of a word changed sides: some word before it in `a` is
/// after it in `b`, and some word after it in `a` is before it in `b`.
fn terms_swapped(a: &Question, at_a: usize, b: &Question, at_b: usize) -> bool {
    let sides = |q: &Question, at: usize| {
        let terms = |range: &[Word]| -> BTreeSet<String> {
            range
                .iter()
                .filter(|w| matches!(w.kind, Kind::Content | Kind::Number | Kind::Unit))
                .map(|w| w.stem.clone())
                .collect()
        };
        let (before, after) = (terms(&q.words[..at]), terms(&q.words[at + 1..]));
        // A word on both sides says nothing about which side a term is on.
        (
            before.difference(&after).cloned().collect::<BTreeSet<_>>(),
            after.difference(&before).cloned().collect::<BTreeSet<_>>(),
        )
    };
    let ((before_a, after_a), (before_b, after_b)) = (sides(a, at_a), sides(b, at_b));
    !before_a.is_disjoint(&after_b) && !after_a.is_disjoint(&before_b)
}

/// No two terms changed places around a word both questions share: "a landlord evicts a
/// tenant" against "a tenant evicts a landlord", "from Paris to Rome" against "from Rome to
/// Paris". Moving a clause ("In Python, how…" / "How… in Python?") crosses no shared word;
/// "and", "or", "versus" and the like join terms without ranking them; a change to the
/// passive voice ("was conquered by") is allowed for.
fn roles(p: &Pair) -> bool {
    let (a, b) = (positions(&p.a), positions(&p.b));
    let shared: Vec<(&str, usize, usize)> = a
        .iter()
        .filter_map(|(stem, &(at_a, _))| b.get(stem).map(|&(at_b, _)| (*stem, at_a, at_b)))
        .collect();
    let voice_changed = has_by(&p.a) != has_by(&p.b);
    if voice_changed {
        return true;
    }
    if markers_swapped(&p.a, &p.b) {
        return false;
    }
    // A word listed with others ("the tenant or the landlord") moves with its list when a
    // question is turned round ("who pays: the landlord or the tenant?"): it is neither a term
    // nor an anchor of a crossing. Worked out once, as the loops below visit each shared word
    // for every pair of terms.
    let (listed_a, listed_b) = (listed(&p.a), listed(&p.b));
    let listed: Vec<bool> = shared
        .iter()
        .map(|&(_, at_a, at_b)| listed_a[at_a] || listed_b[at_b])
        .collect();
    let terms: Vec<(usize, usize)> = shared
        .iter()
        .zip(&listed)
        .filter(|((stem, _, _), listed)| !**listed && a.get(stem).is_some_and(|(_, t)| *t))
        .map(|(&(_, at_a, at_b), _)| (at_a, at_b))
        .collect();
    let anchors: Vec<(usize, usize)> = shared
        .iter()
        .zip(&listed)
        .filter(|((stem, _, _), listed)| {
            !**listed
                && !SYMMETRIC.contains(stem)
                && *stem != "than"
                && !SCALES.iter().any(|(w, _, _)| w == stem)
        })
        .map(|(&(_, at_a, at_b), _)| (at_a, at_b))
        .collect();
    // x before y in a and after it in b: do they sit on either side of a shared word, the
    // other way round in b?
    !terms.iter().any(|&(xa, xb)| {
        terms.iter().any(|&(ya, yb)| {
            xa < ya
                && yb < xb
                && anchors
                    .iter()
                    .any(|&(va, vb)| xa < va && va < ya && yb < vb && vb < xb)
        })
    })
}

/// Whether two terms traded the words that introduce them: "from Paris to Rome" against
/// "from Rome to Paris" ("from" and "to"), "the landlord evicts the tenant" against "the
/// tenant evicts the landlord" (the start and "evicts"). Unlike the crossing test this works
/// when the introducing words repeat elsewhere in the question.
fn markers_swapped(a: &Question, b: &Question) -> bool {
    let (ma, mb) = (role_markers(a), role_markers(b));
    for (x, mx_a) in &ma {
        for (y, my_a) in &ma {
            if x >= y || mx_a == my_a {
                continue;
            }
            let (Some(mx_b), Some(my_b)) = (mb.get(x), mb.get(y)) else {
                continue;
            };
            // "than" is the comparison check's: "B dearer than A" is "A cheaper than B".
            let symmetric = [mx_a, my_a]
                .iter()
                .any(|m| SYMMETRIC.contains(&m.as_str()) || *m == "than");
            if mx_b == my_a && my_b == mx_a && !symmetric {
                return true;
            }
        }
    }
    false
}

/// Each term that occurs once, with the word that introduces it: the nearest grammar word or
/// preposition before it, determiners skipped ("^" at the start of a sentence).
fn role_markers(q: &Question) -> BTreeMap<String, String> {
    let once = positions(q);
    let mut markers = BTreeMap::new();
    for (stem, &(at, term)) in &once {
        if !term {
            continue;
        }
        let sentence = q.words[..=at]
            .iter()
            .rposition(|w| w.starts_sentence)
            .unwrap_or(0);
        let marker = q.words[sentence..at]
            .iter()
            .rev()
            .find(|w| {
                let word = w.folded.as_str();
                !DETERMINERS.contains(&word)
                    && (w.kind != Kind::Content || PREPOSITIONS.contains(&word))
            })
            .map_or("^".to_owned(), |w| pronoun(&w.stem).to_owned());
        markers.insert((*stem).to_owned(), marker);
    }
    markers
}

/// Words that introduce a term's role ("from" and "to", "for", "against").
const PREPOSITIONS: &[&str] = &[
    "from", "to", "into", "onto", "toward", "towards", "at", "in", "on", "by", "for", "of",
    "about", "against", "over", "under", "via", "through", "across", "per", "than", "after",
    "before", "out",
];

const DETERMINERS: &[&str] = &[
    "a", "an", "the", "my", "your", "our", "their", "his", "her", "its", "this", "that", "these",
    "those", "some", "any", "every", "each",
];

/// For each word, whether it stands in a list with another ("cats or dogs", "the tenant or
/// the landlord"): within three words of a content word, a joining word between them.
fn listed(q: &Question) -> Vec<bool> {
    let words = &q.words;
    (0..words.len())
        .map(|i| {
            let near = i.saturating_sub(3)..(i + 4).min(words.len());
            near.filter(|&j| j != i && words[j].kind == Kind::Content)
                .any(|j| {
                    words[i.min(j) + 1..i.max(j)]
                        .iter()
                        .any(|w| SYMMETRIC.contains(&w.folded.as_str()))
                })
        })
        .collect()
}

/// Each stem that occurs once in the question: where, and whether it is a term (a word that
/// can fill a role: content words, units, and personal pronouns).
fn positions(q: &Question) -> BTreeMap<&str, (usize, bool)> {
    let mut seen: BTreeMap<&str, Option<(usize, bool)>> = BTreeMap::new();
    for (at, w) in q.words.iter().enumerate() {
        let stem = pronoun(&w.stem);
        let term = (matches!(w.kind, Kind::Content | Kind::Unit | Kind::Number)
            && !NOT_TERMS.contains(&w.folded.as_str()))
            || PRONOUNS.contains(&stem);
        seen.entry(stem)
            .and_modify(|once| *once = None)
            .or_insert(Some((at, term)));
    }
    seen.into_iter()
        .filter_map(|(stem, once)| once.map(|o| (stem, o)))
        .collect()
}

const PRONOUNS: &[&str] = &["i", "we", "he", "she", "they"];

/// Content words that fill no role: question words and modal verbs move when a question is
/// rephrased ("…; why might that be?" / "Why might…?").
const NOT_TERMS: &[&str] = &[
    "why", "how", "when", "where", "who", "whom", "whose", "might", "should", "must", "may",
    "shall", "ought",
];

/// A personal pronoun in its subject form: "me" and "I" name the same role-filler.
fn pronoun(stem: &str) -> &str {
    match stem {
        "me" => "i",
        "us" => "we",
        "him" => "he",
        "her" => "she",
        "them" => "they",
        other => other,
    }
}

fn has_by(q: &Question) -> bool {
    q.words.iter().any(|w| w.folded == "by")
}

/// Below the strict similarity, every word that says what is asked has its match in the other
/// question (the same stem, or a typo of it): reordered, politer, retyped or recased
/// questions pass; a changed or added word does not. At or above it, the embedding is
/// trusted to have seen synonyms.
fn wording(p: &Pair) -> bool {
    if p.similarity >= p.strict {
        return true;
    }
    let matched =
        |a: &Question, b: &Question| a.content().all(|w| b.words.iter().any(|o| same_word(w, o)));
    matched(&p.a, &p.b) && matched(&p.b, &p.a)
}
