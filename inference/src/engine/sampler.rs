//! Choosing the next token on the host: repetition penalty, temperature, top-k, top-p, and
//! seeded draws. Each request owns its sampler and RNG, so the tokens it gets do not depend
//! on what else is in the batch.

use crate::request::{Sampling, TokenLogprob, TopLogprob};
use crate::rng::Rng;

#[derive(Debug, Clone)]
pub struct Sampler {
    sampling: Sampling,
    rng: Rng,
}

/// Index of the largest value; the lowest index wins ties.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Self {
        Self {
            sampling,
            rng: Rng::new(sampling.seed),
        }
    }

    /// Picks the next token from raw logits; `history` is prompt plus generated tokens.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        let penalty = self.sampling.repetition_penalty;
        if penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
                }
            }
        }
        if self.sampling.is_greedy() {
            return argmax(&logits);
        }
        let t = self.sampling.temperature;
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u32, l / t))
            .collect();
        // Stable order: by logit descending, then by id, so equal logits never depend on sort internals.
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.sampling.top_k > 0 {
            candidates.truncate(self.sampling.top_k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f64> = candidates
            .iter()
            .map(|(_, l)| f64::from(l - max).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.sampling.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= f64::from(self.sampling.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let sum: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= sum);
        }
        let mut draw = self.rng.next_f64();
        for (i, p) in probs.iter().enumerate() {
            if draw < *p {
                return candidates[i].0;
            }
            draw -= p;
        }
        candidates[probs.len() - 1].0
    }
}

/// Log-probability of `token` under the model's (unpenalised, untempered) distribution, with
/// the `top` most likely tokens.
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let top = top.min(logits.len());
    if top > 0 {
        order.select_nth_unstable_by(top - 1, |a, b| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        });
    }
    order.truncate(top);
    order.sort_by(|a, b| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    });
    TokenLogprob {
        token_id: token,
        logprob: logits[token as usize] - log_sum,
        top: order
            .into_iter()
            .map(|id| TopLogprob {
                token_id: id,
                logprob: logits[id as usize] - log_sum,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties() {
        let mut s = Sampler::new(Sampling::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_pushes_seen_tokens_down() {
        let sampling = Sampling {
            repetition_penalty: 4.0,
            ..Sampling::greedy()
        };
        let mut s = Sampler::new(sampling);
        // token 0 (logit 2.0) was seen: 2.0 / 4 = 0.5 < 1.0
        assert_eq!(s.sample(&[2.0, 1.0], &[0]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let draws = |seed| {
            let mut s = Sampler::new(Sampling::with_temperature(1.0, seed));
            (0..4000)
                .map(|_| s.sample(&logits, &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(3), draws(3));
        assert_ne!(draws(3), draws(4));
        let d = draws(3);
        assert!(
            d.iter().all(|t| *t < 2),
            "a token with zero probability was drawn"
        );
        let ones = d.iter().filter(|t| **t == 1).count() as f64 / d.len() as f64;
        assert!(
            (ones - 0.75).abs() < 0.03,
            "token 1 should have p=0.75, drew {ones}"
        );
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut k1 = Sampler::new(Sampling {
            top_k: 1,
            ..Sampling::with_temperature(5.0, 9)
        });
        assert!((0..200).all(|_| k1.sample(&logits, &[]) == 0));
        let mut p = Sampler::new(Sampling {
            top_p: 0.5,
            ..Sampling::with_temperature(1.0, 9)
        });
        // p(0) = 0.64 >= 0.5 so the nucleus is {0}.
        assert!((0..200).all(|_| p.sample(&logits, &[]) == 0));
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let lp = token_logprob(&[1.0, 2.0, 3.0], 1, 2);
        let total: f32 = [1.0f32, 2.0, 3.0]
            .iter()
            .map(|l| (l - 3.0 - (1.0 + (-1.0f32).exp() + (-2.0f32).exp()).ln()).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert_eq!(
            lp.top.iter().map(|t| t.token_id).collect::<Vec<_>>(),
            vec![2, 1]
        );
        assert!((lp.logprob - lp.top[1].logprob).abs() < 1e-6);
        assert!(lp.top[0].logprob < 0.0);
    }
}
