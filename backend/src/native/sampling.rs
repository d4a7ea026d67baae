//! Choosing the next token from a sequence's logits, as OpenAI's parameters describe it.
//!
//! Order of operations (that of vLLM and llama.cpp): presence and frequency penalties on
//! the raw logits, over the tokens this sequence has generated so far; then temperature;
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
        }
    }
}

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
        let penalised = |id: usize, logit: f32| match self.counts.get(&(id as u32)) {
            Some(&n) => logit - p.presence_penalty - p.frequency_penalty * n as f32,
            None => logit,
        };
        let token = if p.temperature <= 0.0 {
            let mut best = (0usize, f32::NEG_INFINITY);
            for (id, &logit) in logits.iter().enumerate() {
                let v = penalised(id, logit);
                if v > best.1 {
                    best = (id, v);
                }
            }
            best.0 as u32
        } else {
            let inv_t = 1.0 / f64::from(p.temperature);
            let c = &mut self.candidates;
            c.clear();
            c.extend(
                logits
                    .iter()
                    .enumerate()
                    .map(|(id, &l)| (id as u32, f64::from(penalised(id, l)) * inv_t)),
            );
            // Most likely first; ids break ties so the order (and a seeded draw) is fixed.
            let order = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
            if p.top_k > 0 && p.top_k < c.len() {
                c.select_nth_unstable_by(p.top_k - 1, order);
                c.truncate(p.top_k);
            }
            c.sort_unstable_by(order);
            let max = c[0].1;
            let mut total = 0.0;
            for (_, v) in c.iter_mut() {
                *v = (*v - max).exp();
                total += *v;
            }
            if p.top_p < 1.0 {
                // The smallest prefix whose probability reaches top_p (at least one token).
                let want = f64::from(p.top_p) * total;
                let mut sum = 0.0;
                let mut keep = c.len();
                for (i, (_, v)) in c.iter().enumerate() {
                    sum += v;
                    if sum >= want {
                        keep = i + 1;
                        break;
                    }
                }
                c.truncate(keep);
                total = sum.min(total);
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

#[cfg(test)]
mod tests {
    use super::*;

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
