//! Which token comes next? Chosen from a sequence's logits, as OpenAI's parameters describe
//! it.
//!
//! Order of operations (that of vLLM and llama.cpp): presence and frequency penalties on
//! the raw logits, over the tokens this sequence has generated so far, and any per-token
//! bias (`logit_bias`); then temperature;
//! then top-k and top-p (nucleus) filtering of the resulting distribution; then one draw.
//! Temperature 0 is greedy: the largest logit, the lowest id on a tie, and no draw, so
//! greedy output never depends on a seed. A seed makes a sequence's draws reproducible.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A request's sampling parameters, already validated (the server answers 400 before
/// building them).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 keeps every token.
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    /// Added to the logit of each listed token before anything else (OpenAI's
    /// `logit_bias`, -100 to 100: -100 all but bans a token, 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    /// OpenAI's defaults.
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
        }
    }
}

/// How far below the likeliest token's scaled logit a token's may be and still be drawn.
const NEGLIGIBLE_LOGIT_GAP: f64 = 40.0;

/// Tokens sorted first when looking for a top_p nucleus.
const NUCLEUS_GUESS: usize = 256;

/// One sequence's sampler: its parameters, random state and generated-token counts.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    counts: HashMap<u32, u32>,
    /// Scratch for the candidates, kept between tokens to avoid a vocabulary-sized
    /// allocation per step.
    candidates: Vec<(u32, f64)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Sampler {
            params,
            rng,
            counts: HashMap::new(),
            candidates: Vec::new(),
        }
    }

    /// Picks the next token from `logits` (one per vocabulary entry) and records it as
    /// generated, for the penalties of the tokens after it.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        // The penalties touch only the tokens generated so far, and the biases only the
        // tokens they name: applied to those alone, the vocabulary-wide pass below needs no
        // look-up per token.
        let penalised: Vec<f32>;
        let penalties =
            !self.counts.is_empty() && (p.presence_penalty != 0.0 || p.frequency_penalty != 0.0);
        let logits = if !penalties && p.logit_bias.is_empty() {
            logits
        } else {
            let mut adjusted = logits.to_vec();
            if penalties {
                for (&id, &n) in &self.counts {
                    if let Some(logit) = adjusted.get_mut(id as usize) {
                        *logit -= p.presence_penalty + p.frequency_penalty * n as f32;
                    }
                }
            }
            for &(id, bias) in &p.logit_bias {
                if let Some(logit) = adjusted.get_mut(id as usize) {
                    *logit += bias;
                }
            }
            penalised = adjusted;
            &penalised[..]
        };
        let token = if p.temperature <= 0.0 {
            argmax(logits)
        } else {
            let inv_t = 1.0 / f64::from(p.temperature);
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let max = f64::from(max) * inv_t;
            let c = &mut self.candidates;
            c.clear();
            // Tokens below e^-40 of the likeliest (4e-18 each, under 2e-13 for a whole
            // vocabulary) cannot change a draw in f64; leaving them out spares sorting them.
            c.extend(
                logits
                    .iter()
                    .enumerate()
                    .map(|(id, &l)| (id as u32, f64::from(l) * inv_t))
                    .filter(|&(_, v)| v >= max - NEGLIGIBLE_LOGIT_GAP),
            );
            // Most likely first; ids break ties so the order (and a seeded draw) is fixed.
            // Without top_p no order is needed: the draw walks the candidates as they are.
            let order = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
            if p.top_k > 0 && p.top_k < c.len() {
                c.select_nth_unstable_by(p.top_k - 1, order);
                c.truncate(p.top_k);
            }
            let mut total = 0.0;
            for (_, v) in c.iter_mut() {
                *v = (*v - max).exp();
                total += *v;
            }
            if p.top_p < 1.0 {
                // The smallest prefix, most likely first, whose probability reaches top_p
                // (at least one token). The nucleus is usually a handful of tokens: sort a
                // few of the likeliest first, and the whole vocabulary only if they fall short.
                let want = f64::from(p.top_p) * total;
                let mut sorted = NUCLEUS_GUESS.min(c.len());
                loop {
                    if sorted < c.len() {
                        c.select_nth_unstable_by(sorted - 1, order);
                    }
                    c[..sorted].sort_unstable_by(order);
                    let mut sum = 0.0;
                    let reached = c[..sorted].iter().position(|(_, v)| {
                        sum += v;
                        sum >= want
                    });
                    if let Some(last) = reached {
                        c.truncate(last + 1);
                        total = sum.min(total);
                        break;
                    }
                    if sorted == c.len() {
                        // Rounding left the sum a hair short: keep everything.
                        break;
                    }
                    sorted = c.len();
                }
            }
            let mut u = self.rng.random::<f64>() * total;
            let mut chosen = c[c.len() - 1].0;
            for &(id, v) in c.iter() {
                if u < v {
                    chosen = id;
                    break;
                }
                u -= v;
            }
            chosen
        };
        *self.counts.entry(token).or_insert(0) += 1;
        token
    }
}

/// The most alternatives a reply may ask for at each token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A chosen token's log probability under the model, and the likeliest tokens' (what
/// `logprobs` and `top_logprobs` report). The distribution is the model's own: the
/// log-softmax of the raw logits, before penalties, temperature, top-k/top-p or a format's
/// mask, as vLLM reports it by default.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// Up to the number asked for, likeliest first (the lower id first on a tie).
    pub top: Vec<(u32, f32)>,
}

/// `token`'s log probability in `logits`, and the `top` likeliest tokens'.
pub fn log_probs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // In f64 with the maximum taken out: no overflow, and the sum of 10^5 terms keeps its
    // precision.
    let sum: f64 = logits
        .iter()
        .map(|&l| (f64::from(l) - f64::from(max)).exp())
        .sum();
    let log_total = f64::from(max) + sum.ln();
    let logprob = |l: f32| (f64::from(l) - log_total) as f32;
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut all: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(id, &l)| (id as u32, l))
            .collect();
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let keep = top.min(all.len());
        if keep < all.len() {
            all.select_nth_unstable_by(keep - 1, order);
            all.truncate(keep);
        }
        all.sort_unstable_by(order);
        best = all.into_iter().map(|(id, l)| (id, logprob(l))).collect();
    }
    TokenLogprobs {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| logprob(l)),
        top: best,
    }
}

/// The greedy token: the first of the highest logits (NaNs never win).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (id, &v) in logits.iter().enumerate() {
        if v > best.1 {
            best = (id, v);
        }
    }
    best.0 as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logit_bias_bans_or_forces_a_token_greedy_or_sampled() {
        let logits = [2.0f32, 1.0, 0.5, -1.0];
        for temperature in [0.0, 1.0] {
            let with = |logit_bias: Vec<(u32, f32)>| SamplingParams {
                temperature,
                seed: Some(3),
                logit_bias,
                ..SamplingParams::default()
            };
            for _ in 0..20 {
                assert_eq!(Sampler::new(with(vec![(3, 100.0)])).sample(&logits), 3);
                let banned = Sampler::new(with(vec![(0, -100.0), (1, -100.0)])).sample(&logits);
                assert!(banned >= 2, "{banned}");
            }
        }
    }

    #[test]
    fn log_probs_are_the_log_softmax_with_the_likeliest_first() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let total: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        let expected = |l: f32| (f64::from(l) - total.ln()) as f32;
        let got = log_probs(&logits, 2, 3);
        assert_eq!(got.token, 2);
        assert!((got.logprob - expected(2.0)).abs() < 1e-6, "{got:?}");
        // Ties by the lower id.
        let ids: Vec<u32> = got.top.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, [1, 3, 2]);
        assert!((got.top[0].1 - expected(3.0)).abs() < 1e-6);
        let probability: f64 = logits
            .iter()
            .enumerate()
            .map(|(id, _)| f64::from(log_probs(&logits, id as u32, 0).logprob).exp())
            .sum();
        assert!((probability - 1.0).abs() < 1e-6, "{probability}");
        assert!(log_probs(&logits, 0, 0).top.is_empty());
        assert_eq!(log_probs(&logits, 0, 99).top.len(), logits.len());
    }

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    fn draws(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            // A fresh sampler per draw keeps penalties out; the seed advances per draw.
            let mut s = Sampler::new(SamplingParams {
                seed: params
                    .seed
                    .map(|seed| seed + counts.iter().sum::<usize>() as u64),
                ..params.clone()
            });
            counts[s.sample(logits) as usize] += 1;
        }
        counts
    }

    #[test]
    fn temperature_zero_is_greedy_with_the_lowest_id_on_a_tie() {
        let mut s = Sampler::new(SamplingParams {
            seed: None,
            ..params(0.0)
        });
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 2.0]), 1);
    }

    #[test]
    fn draws_follow_the_softmax_of_logits_over_temperature() {
        let logits = [1.0f32, 0.0, -1.0, 2.0];
        for t in [1.0f32, 0.5] {
            let n = 20_000;
            let got = draws(params(t), &logits, n);
            let e: Vec<f64> = logits.iter().map(|&l| (f64::from(l / t)).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (id, (&g, w)) in got.iter().zip(&e).enumerate() {
                let (g, w) = (g as f64 / n as f64, w / sum);
                assert!((g - w).abs() < 0.015, "T={t} token {id}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn top_k_and_top_p_keep_only_the_likeliest() {
        // Probabilities 0.4, 0.3, 0.2, 0.1.
        let logits: Vec<f32> = [0.4f32, 0.3, 0.2, 0.1].iter().map(|p| p.ln()).collect();
        let top_k = draws(
            SamplingParams {
                top_k: 2,
                ..params(1.0)
            },
            &logits,
            4000,
        );
        assert_eq!(top_k[2] + top_k[3], 0, "{top_k:?}");
        let top_p = draws(
            SamplingParams {
                top_p: 0.5,
                ..params(1.0)
            },
            &logits,
            4000,
        );
        assert_eq!(top_p[2] + top_p[3], 0, "{top_p:?}");
        // Renormalised over the two kept: 4/7 and 3/7.
        assert!(
            (top_p[0] as f64 / 4000.0 - 4.0 / 7.0).abs() < 0.03,
            "{top_p:?}"
        );
        let one = draws(
            SamplingParams {
                top_k: 1,
                ..params(1.0)
            },
            &logits,
            200,
        );
        assert_eq!(one[0], 200);
    }

    #[test]
    fn a_wide_nucleus_past_the_first_guess_is_kept_whole() {
        // 1000 equally likely tokens: top_p 0.9 keeps the 900 with the lowest ids (ties go
        // by id), more than the first sort looks at.
        let logits = vec![0.0f32; 1000];
        let got = draws(
            SamplingParams {
                top_p: 0.9,
                ..params(1.0)
            },
            &logits,
            5000,
        );
        assert!(got[900..].iter().all(|&n| n == 0), "drew past the nucleus");
        assert!(got[NUCLEUS_GUESS..900].iter().sum::<usize>() > 3000);
    }

    #[test]
    fn penalties_count_what_this_sequence_generated() {
        // Greedy with a frequency penalty of 0.3: token 0 leads by 0.2 until picked once.
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.3,
            ..params(0.0)
        });
        let logits = [1.0f32, 0.8, 0.0];
        let picks: Vec<u32> = (0..4).map(|_| s.sample(&logits)).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
        // A presence penalty applies once, however often the token came.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            ..params(0.0)
        });
        let picks: Vec<u32> = (0..3).map(|_| s.sample(&[1.0, 0.8, 0.0])).collect();
        assert_eq!(picks, [0, 1, 0]);
    }

    #[test]
    fn a_seed_makes_draws_reproducible() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..params(1.0)
            });
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }
}
