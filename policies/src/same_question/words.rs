//! A question taken apart for comparison: its words folded and stemmed, its numbers read by
//! value, and its units, times, negations and quoted text picked out. Also the normal form of a
//! question that the exact cache key is taken from.

use super::lexicon::{
    AMBIGUOUS_UNITS, COURTESY, FILLER, MONTHS, MULTIPLIERS, NEGATIONS, NUMBER_SCALES, NUMBER_WORDS,
    ORDINAL_WORDS, PERIODS, PERIOD_MODIFIERS, RELATIVE_DAYS, SEASONS, TIME_DIRECTIONS, UNITS,
    WEEKDAYS,
};
use std::collections::BTreeSet;
use std::sync::OnceLock;
use unicode_normalization::UnicodeNormalization;

/// What a word is to the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Grammar or courtesy: ignored when matching.
    Filler,
    Negation,
    Number,
    Unit,
    Time,
    /// Everything else: the words that say what is asked.
    Content,
}

#[derive(Debug, Clone)]
pub struct Word {
    /// As written, without the punctuation around it (digits of any script made ASCII).
    pub text: String,
    /// Lower case, without apostrophes or hyphens: "Don't" is "dont", "e-mail" is "email".
    pub folded: String,
    /// The folded word's stem: "eggs" and "egg", "conquered" and "conquer" agree.
    pub stem: String,
    pub starts_sentence: bool,
    pub kind: Kind,
}

#[derive(Debug, Default)]
pub struct Question {
    pub words: Vec<Word>,
    /// Quoted text, folded: what is between "…", “…”, «…», `…` and '…'.
    pub quoted: BTreeSet<String>,
    /// Numbers by value ("2", "two" and "2.0" are "2"; ordinals are "#3"; "twice" and the
    /// like as written).
    pub numbers: BTreeSet<String>,
    pub units: BTreeSet<&'static str>,
    /// Numbers with the unit written right after them: "10 km" is ("10", "km").
    pub quantities: BTreeSet<(String, &'static str)>,
    /// Times: years, months, weekdays, days relative to today, periods relative to this one
    /// ("year-1" for last year), and past or future spans ("ago").
    pub times: BTreeSet<String>,
    pub negations: usize,
    /// Mostly capitals: then capitals say nothing about names.
    pub shouting: bool,
}

impl Question {
    pub fn of(text: &str) -> Question {
        let text = unify(text);
        let mut question = Question {
            quoted: quoted_strings(&text),
            shouting: shouting(&text),
            ..Question::default()
        };
        let tokens = without_courtesy(split_units(tokenize(&text)));
        let (mut i, mut last_number, mut currency) = (0, None, None);
        while i < tokens.len() {
            let (raw, starts_sentence) = &tokens[i];
            let folded = fold(raw);
            let previous_is_number = question
                .words
                .last()
                .is_some_and(|w| w.kind == Kind::Number);
            if let Some((number, taken)) = question.read_number(&tokens[i..]) {
                question.numbers.insert(number.clone());
                if let Some(unit) = currency.take() {
                    question.quantities.insert((number.clone(), unit));
                }
                last_number = Some(number);
                question.push_all(&tokens[i..i + taken], Kind::Number);
                i += taken;
                continue;
            }
            if let Some((time, taken)) = read_time(&folded, raw, *starts_sentence, &tokens[i + 1..])
            {
                question.times.insert(time);
                question.push_all(&tokens[i..i + taken], Kind::Time);
                i += taken;
                continue;
            }
            let kind = if is_negation(raw, &folded) {
                question.negations += 1;
                Kind::Negation
            } else if let Some(unit) = unit(&folded, previous_is_number) {
                question.units.insert(unit);
                if let (true, Some(number)) = (previous_is_number, last_number.take()) {
                    question.quantities.insert((number, unit));
                } else if matches!(raw.as_str(), "$" | "€" | "£" | "¥") {
                    // "$2000" is "2000 dollars": the sign stands before its number.
                    currency = Some(unit);
                }
                Kind::Unit
            } else if is_filler(&folded) {
                Kind::Filler
            } else {
                Kind::Content
            };
            question.push(raw, *starts_sentence, kind);
            i += 1;
        }
        question
    }

    fn push_all(&mut self, tokens: &[(String, bool)], kind: Kind) {
        for (raw, starts) in tokens {
            self.push(raw, *starts, kind);
        }
    }

    fn push(&mut self, raw: &str, starts_sentence: bool, kind: Kind) {
        let folded = fold(raw);
        let stem = stemmer().stem(&folded).into_owned();
        self.words.push(Word {
            text: raw.to_owned(),
            folded,
            stem,
            starts_sentence,
            kind,
        });
    }

    /// Reads a number at the start of `tokens` (digits, or spelled out over several words:
    /// "two hundred five" is one number): its canonical form and how many tokens it took.
    fn read_number(&mut self, tokens: &[(String, bool)]) -> Option<(String, usize)> {
        let (first, _) = tokens.first()?;
        let folded = fold(first);
        if let Some(n) = ordinal(first, &folded) {
            return Some((format!("#{n}"), 1));
        }
        if first.chars().any(|c| c.is_ascii_digit()) {
            let value = digits_value(first)?;
            // "5 years" is a span and "2000 calories" an amount: a year stands alone.
            let before_unit = tokens
                .get(1)
                .is_some_and(|(next, _)| unit(&fold(next), true).is_some());
            let year = !before_unit
                && !first.contains(['.', ','])
                && (1000..=2999).contains(&(value as i64));
            if year && value.fract() == 0.0 {
                self.times.insert(format!("year:{value}"));
            }
            return Some((canonical(value), 1));
        }
        if MULTIPLIERS.contains(&folded.as_str()) {
            return Some((folded, 1));
        }
        // Spelled out: units and tens add, scales multiply ("two hundred five thousand").
        let (mut total, mut current, mut taken, mut seen) = (0.0, 0.0, 0, false);
        for (raw, _) in tokens {
            let parts: Vec<String> = raw.split('-').map(fold).collect();
            let mut consumed = false;
            for part in &parts {
                if let Some((_, v)) = NUMBER_WORDS.iter().find(|(w, _)| w == part) {
                    current += v;
                    consumed = true;
                } else if let Some((_, scale)) = NUMBER_SCALES.iter().find(|(w, _)| w == part) {
                    current = if current == 0.0 { 1.0 } else { current } * scale;
                    if *scale >= 1000.0 {
                        total += current;
                        current = 0.0;
                    }
                    consumed = true;
                } else {
                    consumed = false;
                    break;
                }
            }
            if !consumed {
                break;
            }
            seen = true;
            taken += 1;
        }
        if !seen {
            return None;
        }
        // "which one", "quick one", "one of": a pronoun, not a count.
        let next = tokens
            .get(taken)
            .filter(|(_, starts)| !starts)
            .map(|(w, _)| fold(w));
        let pronoun = next.as_deref().is_none_or(|w| w == "of" || is_filler(w));
        if taken == 1 && fold(first) == "one" && pronoun {
            return None;
        }
        Some((canonical(total + current), taken))
    }

    /// The words that say what is asked.
    pub fn content(&self) -> impl Iterator<Item = &Word> {
        self.words.iter().filter(|w| w.kind == Kind::Content)
    }
}

/// A time expression starting at this word: the marker it adds and how many words it took.
fn read_time(
    folded: &str,
    raw: &str,
    starts_sentence: bool,
    rest: &[(String, bool)],
) -> Option<(String, usize)> {
    if let Some((_, marker)) = RELATIVE_DAYS.iter().find(|(w, _)| *w == folded) {
        return Some(((*marker).to_owned(), 1));
    }
    if let Some((_, direction)) = TIME_DIRECTIONS.iter().find(|(w, _)| *w == folded) {
        return Some(((*direction).to_owned(), 1));
    }
    let next = rest.first().map(|(w, _)| fold(w));
    if folded == "from" && next.as_deref() == Some("now") {
        return Some(("future".to_owned(), 2));
    }
    if let Some((_, offset)) = PERIOD_MODIFIERS.iter().find(|(w, _)| *w == folded) {
        let period = stemmer().stem(next.as_deref()?).into_owned();
        let known = PERIODS
            .iter()
            .any(|p| stemmer().stem(p).as_ref() == period.as_str());
        return known.then(|| (format!("{period}{offset:+}"), 2));
    }
    if WEEKDAYS.contains(&folded) || SEASONS.contains(&folded) {
        return Some((folded.to_owned(), 1));
    }
    // "may" is a month only where it is written as a name.
    let month_name = folded != "may" || (raw.starts_with('M') && !starts_sentence);
    if month_name && MONTHS.contains(&folded) {
        return Some((folded.to_owned(), 1));
    }
    None
}

/// NFKC (fullwidth forms, ligatures, compatibility characters) and every script's decimal
/// digits as ASCII ones.
fn unify(text: &str) -> String {
    text.nfkc().map(ascii_digit).collect()
}

/// The first code point of each Unicode block of decimal digits 0–9 (Arabic-Indic, Devanagari,
/// Bengali, Thai, …); NFKC has already made fullwidth digits ASCII.
const DIGIT_ZEROS: &[u32] = &[
    0x0660, 0x06F0, 0x07C0, 0x0966, 0x09E6, 0x0A66, 0x0AE6, 0x0B66, 0x0BE6, 0x0C66, 0x0CE6, 0x0D66,
    0x0DE6, 0x0E50, 0x0ED0, 0x0F20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80, 0x1A90,
    0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0, 0xFF10,
];

fn ascii_digit(c: char) -> char {
    let code = c as u32;
    if code < 0x0660 {
        return c;
    }
    DIGIT_ZEROS
        .iter()
        .find(|&&zero| (zero..zero + 10).contains(&code))
        .and_then(|zero| char::from_digit(code - zero, 10))
        .unwrap_or(c)
}

/// Splits text into words, each with whether it starts a sentence. Apostrophes and hyphens
/// inside words, and decimal points and thousands separators inside numbers, stay in the word;
/// "%" and currency signs are words of their own; "°" starts one ("°C").
fn tokenize(text: &str) -> Vec<(String, bool)> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let (mut current, mut current_starts, mut sentence_start) = (String::new(), true, true);
    for (i, &c) in chars.iter().enumerate() {
        let before = i.checked_sub(1).map(|j| chars[j]);
        let after = chars.get(i + 1).copied();
        let alnum = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
        let digit = |c: Option<char>| c.is_some_and(|c| c.is_ascii_digit());
        let letter = |c: Option<char>| c.is_some_and(char::is_alphabetic);
        let joins = c.is_alphanumeric()
            || (c == '°' && after.is_some_and(char::is_alphabetic))
            || (matches!(c, '\'' | '’') && alnum(before) && alnum(after))
            // "e-mail" is one word, "5-year-old" three: the number stays a number.
            || (c == '-' && letter(before) && letter(after))
            || (matches!(c, '.' | ',') && digit(before) && digit(after))
            || (matches!(c, '+' | '#') && !current.is_empty() && !alnum(after));
        if joins {
            if current.is_empty() {
                current_starts = sentence_start;
            }
            current.push(c);
            sentence_start = false;
            continue;
        }
        if !current.is_empty() {
            tokens.push((std::mem::take(&mut current), current_starts));
        }
        if matches!(c, '%' | '$' | '€' | '£' | '¥') {
            tokens.push((c.to_string(), sentence_start));
            sentence_start = false;
        }
        if matches!(c, '.' | '!' | '?' | ':' | ';' | '\n' | '¿' | '¡') {
            sentence_start = true;
        }
    }
    if !current.is_empty() {
        tokens.push((current, current_starts));
    }
    tokens
}

/// Drops courtesy phrases ("if you don't mind", "no rush"): their negations negate nothing.
fn without_courtesy(tokens: Vec<(String, bool)>) -> Vec<(String, bool)> {
    let folded: Vec<String> = tokens.iter().map(|(t, _)| fold(t)).collect();
    let mut keep = vec![true; tokens.len()];
    for phrase in COURTESY {
        let words: Vec<&str> = phrase.split(' ').collect();
        for start in 0..folded.len() {
            let end = start + words.len();
            if end <= folded.len() && folded[start..end].iter().zip(&words).all(|(a, b)| a == b) {
                keep[start..end].iter_mut().for_each(|k| *k = false);
            }
        }
    }
    let mut kept = Vec::with_capacity(tokens.len());
    let mut starts_next = false;
    for ((token, starts), keep) in tokens.into_iter().zip(keep) {
        if keep {
            kept.push((token, starts || starts_next));
            starts_next = false;
        } else {
            starts_next |= starts;
        }
    }
    kept
}

/// "10km" is "10" and "km", "30°C" is "30" and "°C", "3rd" stays one word; a hyphenated
/// number ("twenty-five", "fifteen-year") is its words.
fn split_units(tokens: Vec<(String, bool)>) -> Vec<(String, bool)> {
    let mut out = Vec::with_capacity(tokens.len());
    for (token, starts) in tokens {
        let spelled_number = token.contains('-')
            && token.split('-').any(|part| {
                let part = fold(part);
                NUMBER_WORDS.iter().any(|(w, _)| *w == part)
                    || NUMBER_SCALES.iter().any(|(w, _)| *w == part)
            });
        if spelled_number {
            for (i, part) in token.split('-').enumerate() {
                out.push((part.to_owned(), starts && i == 0));
            }
            continue;
        }
        let digits_end = token
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_digit() || c == '.' || c == ','))
            .map_or(token.len(), |(at, _)| at);
        let (number, rest) = token.split_at(digits_end);
        let rest_folded = fold(rest);
        let is_unit = UNITS.iter().any(|(u, _)| *u == rest_folded)
            || AMBIGUOUS_UNITS.iter().any(|(u, _)| *u == rest_folded);
        if digits_end > 0 && !rest.is_empty() && is_unit {
            out.push((number.to_owned(), starts));
            out.push((rest.to_owned(), false));
        } else {
            out.push((token, starts));
        }
    }
    out
}

pub(crate) fn fold(word: &str) -> String {
    word.chars()
        .filter(|c| !matches!(c, '\'' | '’' | '-'))
        .flat_map(char::to_lowercase)
        .collect()
}

fn stemmer() -> &'static rust_stemmers::Stemmer {
    static STEMMER: OnceLock<rust_stemmers::Stemmer> = OnceLock::new();
    STEMMER.get_or_init(|| rust_stemmers::Stemmer::create(rust_stemmers::Algorithm::English))
}

/// A filler word in any inflection ("telling" as much as "tell").
fn is_filler(folded: &str) -> bool {
    static STEMS: OnceLock<BTreeSet<String>> = OnceLock::new();
    let stems = STEMS.get_or_init(|| {
        FILLER
            .iter()
            .map(|w| stemmer().stem(w).into_owned())
            .collect()
    });
    FILLER.contains(&folded) || stems.contains(stemmer().stem(folded).as_ref())
}

fn is_negation(raw: &str, folded: &str) -> bool {
    let lower = raw.to_lowercase();
    NEGATIONS.contains(&folded) || lower.ends_with("n't") || lower.ends_with("n’t")
}

fn unit(folded: &str, after_number: bool) -> Option<&'static str> {
    let known = |list: &'static [(&str, &'static str)]| {
        list.iter().find(|(w, _)| *w == folded).map(|(_, u)| *u)
    };
    known(UNITS).or_else(|| after_number.then(|| known(AMBIGUOUS_UNITS)).flatten())
}

fn ordinal(raw: &str, folded: &str) -> Option<u32> {
    if let Some((_, n)) = ORDINAL_WORDS.iter().find(|(w, _)| *w == folded) {
        return Some(*n);
    }
    let lower = raw.to_lowercase();
    let digits = ["st", "nd", "rd", "th"]
        .iter()
        .find_map(|suffix| lower.strip_suffix(suffix))?;
    digits.parse().ok()
}

/// A number written in digits: "1,000", "1000" and "1000.0" are one value.
fn digits_value(token: &str) -> Option<f64> {
    let kept: String = token.chars().filter(|c| *c != ',').collect();
    kept.parse::<f64>().ok().filter(|v| v.is_finite())
}

fn canonical(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

fn shouting(text: &str) -> bool {
    let upper = text.chars().filter(|c| c.is_uppercase()).count();
    let lower = text.chars().filter(|c| c.is_lowercase()).count();
    upper >= 6 && upper > 2 * lower
}

/// Text between matching quotes, folded: "…", “…”, «…», `…`, and '…' when it does not look
/// like an apostrophe.
fn quoted_strings(text: &str) -> BTreeSet<String> {
    let pairs = [
        ('"', '"'),
        ('“', '”'),
        ('«', '»'),
        ('`', '`'),
        ('\'', '\''),
        ('‘', '’'),
    ];
    let mut found = BTreeSet::new();
    for (open, close) in pairs {
        let mut rest = text;
        while let Some(start) = rest.find(open) {
            let opened_mid_word = matches!(open, '\'' | '‘')
                && rest[..start]
                    .chars()
                    .next_back()
                    .is_some_and(char::is_alphanumeric);
            let after = &rest[start + open.len_utf8()..];
            if opened_mid_word {
                rest = after;
                continue;
            }
            // A closing apostrophe inside a word ("it's") does not close the quote.
            let mut end = None;
            for (at, c) in after.char_indices() {
                if c != close {
                    continue;
                }
                let next_alnum = after[at + c.len_utf8()..]
                    .chars()
                    .next()
                    .is_some_and(char::is_alphanumeric);
                if matches!(close, '\'' | '’') && next_alnum {
                    continue;
                }
                end = Some(at);
                break;
            }
            let Some(end) = end else { break };
            let inner = after[..end]
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            let inner = inner
                .trim_matches(|c: char| ".,!?;:".contains(c))
                .to_lowercase();
            if !inner.is_empty() {
                found.insert(inner);
            }
            rest = &after[end + close.len_utf8()..];
        }
    }
    found
}

/// The form of a question that the exact cache key is taken from: Unicode compatibility
/// forms and other scripts' digits unified, case folded, runs of whitespace made one space,
/// and sentence punctuation dropped where it does not sit inside a word or number ("3.5"
/// keeps its point). Text that looks like code (backticks, braces, operators, indented
/// lines) keeps its case, punctuation and spacing: there they change the meaning.
pub fn normal_form(text: &str) -> String {
    let unified = unify(text);
    let code_like = unified.contains(['`', '{', '}', '=', '<', '>', '\\', '|', '$'])
        || unified
            .lines()
            .any(|l| l.starts_with("    ") || l.starts_with('\t'));
    if code_like {
        return unified.trim().to_owned();
    }
    let chars: Vec<char> = unified.chars().collect();
    let mut out = String::with_capacity(unified.len());
    let mut pending_space = false;
    for (i, &c) in chars.iter().enumerate() {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
            continue;
        }
        let inside = i > 0
            && chars[i - 1].is_alphanumeric()
            && chars.get(i + 1).is_some_and(|n| n.is_alphanumeric());
        if matches!(c, '.' | ',' | '!' | '?' | ';' | ':' | '¿' | '¡' | '…') && !inside {
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        out.extend(c.to_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_by_value_in_any_script() {
        for (a, b) in [
            ("2 eggs", "two eggs"),
            ("1,000 meters", "1000 meters"),
            ("twenty-five", "25"),
            ("two hundred five", "205"),
            ("٣ apples", "3 apples"),
            ("３ apples", "3 apples"),
            ("the 3rd floor", "the third floor"),
            ("a dozen", "12"),
        ] {
            assert_eq!(
                Question::of(a).numbers,
                Question::of(b).numbers,
                "{a} / {b}"
            );
        }
        assert_ne!(
            Question::of("2 eggs").numbers,
            Question::of("३ eggs").numbers
        );
    }

    #[test]
    fn units_and_times_are_recognised() {
        let q = Question::of("Is 30°C hot for May in 2024, or 10km away last year?");
        assert!(
            q.units.contains("celsius") && q.units.contains("km"),
            "{q:?}"
        );
        assert!(
            q.times.contains("year:2024") && q.times.contains("year-1"),
            "{q:?}"
        );
        assert!(q.times.contains("may"), "{q:?}");
        assert!(!Question::of("May I ask?").times.contains("may"));
        assert!(Question::of("5 years ago").times.contains("past"));
        assert!(!Question::of("2000 calories").times.contains("year:2000"));
    }

    #[test]
    fn the_normal_form_ignores_case_spacing_and_sentence_punctuation_but_not_code() {
        assert_eq!(
            normal_form("  What is   the capital of FRANCE?? "),
            normal_form("what is the capital of france")
        );
        assert_eq!(normal_form("Is 3.5 > 3.05?"), "Is 3.5 > 3.05?");
        assert_ne!(normal_form("Is 3.5 bigger"), normal_form("Is 35 bigger"));
        assert_ne!(
            normal_form("what does `ls -L` do"),
            normal_form("what does `ls -l` do")
        );
        assert_eq!(normal_form("ｈｅｌｌｏ"), "hello");
    }
}
