//! Which tokens might come next, guessed from the text so far? Prompt lookup: the latest
//! earlier place where the sequence's last few tokens appeared is taken as a guess that
//! what followed them there follows again (a summary quoting its source, an edit repeating
//! most of its input, code restating names). No draft model: the guess costs a scan.
//!
//! A draft is only a guess. The scheduler feeds it with the token before it in one forward
//! pass, as generated tokens, and keeps the longest prefix the model itself would have
//! chosen (see the scheduler), so drafting never changes an output.

/// Tokens drafted at most per step: each costs a row of the forward pass whether or not it
/// is kept.
pub const MAX_DRAFT: usize = 4;

/// Whether a request that does not say (`speculative_decoding`) gets drafts. On: drafts
/// are fed only while few sequences decode, a wholly wrong one pauses drafting and a draft
/// is at most one token longer than the last one kept, so replies that copy their context
/// came 1.3× faster and others 0.98-0.99× (`examples/speculation_speed.rs`,
/// docs/benchmarks.md). A request can still say `false`.
pub const ON_BY_DEFAULT: bool = true;

/// The longest and shortest n-grams looked up: a longer match is a better guess. A single
/// token's match was too weak a one: drafts from it were kept a quarter as often, and
/// replies that do not copy lost more time to them than copying ones gained.
const LONGEST_NGRAM: usize = 3;
const SHORTEST_NGRAM: usize = 2;

/// Up to `limit` tokens that followed the latest earlier occurrence of the longest suffix
/// of `history` (3 tokens down to 2) found in it; empty when none recurs.
pub fn prompt_lookup(history: &[u32], limit: usize) -> Vec<u32> {
    if limit == 0 {
        return Vec::new();
    }
    for n in (SHORTEST_NGRAM..=LONGEST_NGRAM).rev() {
        if history.len() <= n {
            continue;
        }
        let suffix = &history[history.len() - n..];
        // The latest match whose continuation is not the suffix itself.
        let found = (0..history.len() - n)
            .rev()
            .find(|&start| &history[start..start + n] == suffix);
        if let Some(start) = found {
            let from = start + n;
            let to = (from + limit).min(history.len());
            return history[from..to].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_longest_match_proposes_what_followed_it() {
        // ... 1 2 3 9 8 ... 1 2 3 -> 9 8 (the 3-gram), not what followed a lone 3 elsewhere.
        let history = [1, 2, 3, 9, 8, 7, 3, 5, 1, 2, 3];
        assert_eq!(prompt_lookup(&history, 2), [9, 8]);
        assert_eq!(prompt_lookup(&history, 4), [9, 8, 7, 3]);
        // The latest occurrence wins.
        let history = [4, 5, 1, 4, 5, 6, 2, 4, 5];
        assert_eq!(prompt_lookup(&history, 1), [6]);
        // A draft stops where the history does.
        let history = [7, 8, 7, 8];
        assert_eq!(prompt_lookup(&history, 4), [7, 8]);
    }

    #[test]
    fn nothing_recurring_means_no_draft() {
        assert!(prompt_lookup(&[1, 2, 3, 4], 4).is_empty());
        // One token recurring is not enough of a match.
        assert!(prompt_lookup(&[5, 1, 6, 1], 4).is_empty());
        assert!(prompt_lookup(&[], 4).is_empty());
        assert!(prompt_lookup(&[5], 4).is_empty());
        assert!(prompt_lookup(&[1, 2, 1], 0).is_empty());
    }
}
