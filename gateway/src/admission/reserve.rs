//! What can this request cost at most? The reservation a request makes before it is
//! forwarded: every prompt's estimate, every choice's completion cap, and their dearest cost.
//!
//! The prompt estimate is the byte length of the prompt's JSON (messages, prompt or input)
//! plus [`TEMPLATE_ALLOWANCE`] for what a chat template adds: every token of a byte-level BPE
//! tokenizer covers at least one byte, so it never under-reserves; it is generous, and
//! settlement returns the difference. The completion cap is `max_completion_tokens` (or
//! `max_tokens`, or the configured default) for each of `n` (or `best_of`) choices of each
//! prompt. A request past its tier's [`RequestCaps`] is refused before anything is reserved.

use crate::error::ApiError;
use crate::metering::Ceiling;
use crate::request::{RequestView, Route};
use serde_json::value::RawValue;
use sluice_policies::pricing::{ModelPrice, TokenCounts};
use sluice_policies::quota::{self, Reservation};
use sluice_policies::RequestCaps;

/// Prompt tokens a chat template may add around the messages (roles, separators, a default
/// system turn).
pub const TEMPLATE_ALLOWANCE: u64 = 64;

/// The most tokens one request may reserve, and nano-units it may cost: far beyond any real
/// request, and far enough below 2⁵³ that the stores' counters (Lua numbers are doubles)
/// stay exact however many such requests they add up.
const MAX_TOKENS_RESERVED: u64 = 1 << 44;
const MAX_COST_RESERVED: i64 = 1 << 50;

/// How many prompts a completions `prompt` or embeddings `input` holds: a string or a list
/// of token ids is one; a list of strings or of token-id lists is one per element.
pub fn prompt_count(raw: &RawValue) -> u64 {
    let text = raw.get();
    if !text.starts_with('[') {
        return 1;
    }
    match serde_json::from_str::<Vec<&RawValue>>(text) {
        Ok(items) => match items.first() {
            Some(first)
                if first
                    .get()
                    .starts_with(['-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9']) =>
            {
                1
            }
            Some(_) => items.len() as u64,
            None => 1,
        },
        Err(_) => 1,
    }
}

/// The reservation for a request and the token ceiling it was sized by, or a 400 when it
/// asks for more than its tier allows.
pub fn reservation(
    route: Route,
    view: &RequestView,
    caps: &RequestCaps,
    default_max_tokens: u64,
    price: Option<&ModelPrice>,
) -> Result<(Reservation, Ceiling), ApiError> {
    let prompts = match route {
        Route::Completions => view.prompt.map_or(1, prompt_count),
        Route::Embeddings => view.input.map_or(1, prompt_count),
        _ => 1,
    };
    if prompts > caps.max_prompts {
        let field = if route == Route::Embeddings {
            "input"
        } else {
            "prompt"
        };
        return Err(ApiError::bad_request(format!(
            "Invalid '{field}': {prompts} items, more than the {} one request may carry.",
            caps.max_prompts
        ))
        .with_param(field));
    }
    let prompt_bytes = [view.messages, view.prompt, view.input]
        .into_iter()
        .flatten()
        .map(|raw| raw.get().len() as u64)
        .sum::<u64>();
    let completion = match route {
        Route::Embeddings => 0,
        _ => {
            let (field, cap) = match (view.max_completion_tokens, view.max_tokens) {
                (Some(cap), _) => ("max_completion_tokens", u64::from(cap)),
                (None, Some(cap)) => ("max_tokens", u64::from(cap)),
                (None, None) => ("max_tokens", default_max_tokens.min(caps.max_tokens)),
            };
            if cap > caps.max_tokens {
                return Err(ApiError::bad_request(format!(
                    "Invalid '{field}': {cap} is more than the {} tokens one completion may ask for.",
                    caps.max_tokens
                ))
                .with_param(field));
            }
            let (field, choices) = match (view.n, view.best_of) {
                (_, Some(best_of)) if best_of > view.n.unwrap_or(1) => ("best_of", best_of),
                (n, _) => ("n", n.unwrap_or(1)),
            };
            let choices = u64::from(choices.max(1));
            if choices > caps.max_n {
                return Err(ApiError::bad_request(format!(
                    "Invalid '{field}': {choices} is more than the {} choices one request may ask for.",
                    caps.max_n
                ))
                .with_param(field));
            }
            cap.saturating_mul(choices).saturating_mul(prompts)
        }
    };
    let input = prompt_bytes + TEMPLATE_ALLOWANCE;
    let tokens = input.saturating_add(completion);
    let counts = TokenCounts {
        input,
        output: completion,
        cached: 0,
    };
    let cost_nano = price.map_or(0, |p| {
        quota::to_nano_ceil(crate::billing::cost_ceiling(p, &counts))
    });
    if tokens > MAX_TOKENS_RESERVED || cost_nano > MAX_COST_RESERVED {
        return Err(ApiError::bad_request(format!(
            "This request could use {tokens} tokens; that is more than Sluice can reserve for one request. Lower max_tokens, n or the number of prompts."
        ))
        .with_param("max_tokens"));
    }
    let reservation = Reservation {
        requests: 1,
        tokens,
        cost_nano,
    };
    let ceiling = Ceiling {
        prompt_tokens: input,
        completion_tokens: completion,
    };
    Ok((reservation, ceiling))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reserve(route: Route, body: &str, caps: &RequestCaps) -> Result<Reservation, ApiError> {
        let view = RequestView::parse(route, body.as_bytes()).unwrap();
        reservation(route, &view, caps, 100, None).map(|(r, _)| r)
    }

    #[test]
    fn every_prompt_and_every_choice_is_reserved() {
        let caps = RequestCaps::default();
        let body = r#"{"model":"m","prompt":["a","b","c"],"n":2,"max_tokens":10}"#;
        let r = reserve(Route::Completions, body, &caps).unwrap();
        let prompt = r#"["a","b","c"]"#.len() as u64 + TEMPLATE_ALLOWANCE;
        assert_eq!(r.tokens, prompt + 60);

        let body = r#"{"model":"m","prompt":[1,2,3],"best_of":4,"n":2,"max_tokens":10}"#;
        let r = reserve(Route::Completions, body, &caps).unwrap();
        assert_eq!(
            r.tokens,
            "[1,2,3]".len() as u64 + TEMPLATE_ALLOWANCE + 40,
            "token ids are one prompt"
        );

        let body = r#"{"model":"m","input":[[1,2],[3]]}"#;
        let r = reserve(Route::Embeddings, body, &caps).unwrap();
        assert_eq!(r.tokens, "[[1,2],[3]]".len() as u64 + TEMPLATE_ALLOWANCE);
    }

    #[test]
    fn a_request_past_its_tiers_caps_names_the_field() {
        let caps = RequestCaps {
            max_tokens: 100,
            max_n: 2,
            max_prompts: 2,
        };
        let cases = [
            (
                Route::ChatCompletions,
                r#"{"model":"m","messages":[],"max_tokens":101}"#,
                "max_tokens",
            ),
            (
                Route::ChatCompletions,
                r#"{"model":"m","messages":[],"max_completion_tokens":101}"#,
                "max_completion_tokens",
            ),
            (
                Route::ChatCompletions,
                r#"{"model":"m","messages":[],"n":3}"#,
                "n",
            ),
            (
                Route::Completions,
                r#"{"model":"m","prompt":"x","best_of":3}"#,
                "best_of",
            ),
            (
                Route::Completions,
                r#"{"model":"m","prompt":["a","b","c"]}"#,
                "prompt",
            ),
            (
                Route::Embeddings,
                r#"{"model":"m","input":["a","b","c"]}"#,
                "input",
            ),
        ];
        for (route, body, field) in cases {
            let e = reserve(route, body, &caps).unwrap_err();
            assert_eq!((e.status, e.param), (400, Some(field)), "{body}");
        }
        assert!(reserve(
            Route::ChatCompletions,
            r#"{"model":"m","messages":[],"max_tokens":100,"n":2}"#,
            &caps
        )
        .is_ok());
    }

    #[test]
    fn reservations_that_would_overflow_the_counters_are_refused() {
        let caps = RequestCaps {
            max_tokens: u64::MAX,
            max_n: u64::MAX,
            max_prompts: u64::MAX,
        };
        let body = r#"{"model":"m","prompt":["a","b"],"n":4294967295,"max_tokens":4294967295}"#;
        let e = reserve(Route::Completions, body, &caps).unwrap_err();
        assert_eq!(e.status, 400);
    }
}
