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
    ///
    /// The candidates are ranked by tempered logit (then by id); top-k keeps the first `top_k`,
    /// top-p the shortest prefix whose probability reaches `top_p`, and the draw walks that
    /// prefix in rank order. Neither the cut nor the draw sorts the vocabulary: both are
    /// selections by cumulative probability, linear in the vocabulary on average.
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
        let mut candidates: Vec<Candidate> = logits
            .iter()
            .enumerate()
            .map(|(i, l)| Candidate {
                id: i as u32,
                logit: l / t,
                weight: 0.0,
            })
            .collect();
        let top_k = self.sampling.top_k;
        if top_k > 0 && top_k < candidates.len() {
            candidates.select_nth_unstable_by(top_k - 1, rank);
            candidates.truncate(top_k);
        }
        let max = candidates
            .iter()
            .map(|c| c.logit)
            .max_by(f32::total_cmp)
            .unwrap_or(0.0);
        let mut total = 0.0;
        for c in &mut candidates {
            c.weight = f64::from(c.logit - max).exp();
            total += c.weight;
        }
        let top_p = self.sampling.top_p;
        if top_p < 1.0 {
            let target = f64::from(top_p) * total;
            if let Some(last) = select_by_mass(&mut candidates, target, Reach::AtLeast) {
                candidates.truncate(last + 1);
                total = candidates.iter().map(|c| c.weight).sum();
            }
        }
        let target = self.rng.next_f64() * total;
        match select_by_mass(&mut candidates, target, Reach::Beyond) {
            Some(i) => candidates[i].id,
            // Rounding left the draw past the last candidate: the lowest-ranked one that can
            // be drawn at all takes it.
            None => candidates
                .iter()
                .filter(|c| c.weight > 0.0)
                .max_by(|a, b| rank(a, b))
                .or_else(|| candidates.iter().min_by(|a, b| rank(a, b)))
                .map_or(0, |c| c.id),
        }
    }
}

/// A token competing for the draw: its id, its tempered logit (the rank key) and its
/// unnormalised probability.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    id: u32,
    logit: f32,
    weight: f64,
}

/// Rank order: higher logit first, then lower id, so equal logits never depend on the
/// selection's internals.
fn rank(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// When a running probability total has reached a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// `total >= target` (the top-p cut).
    AtLeast,
    /// `total > target` (inverting a uniform draw in `[0, total)`).
    Beyond,
}

/// How many of the best-ranked candidates the first partition splits off: a peaked
/// distribution's nucleus and draw are found among them after one linear pass.
const PREFILTER: usize = 64;

/// Walks `items` in rank order, summing weights, and returns the index of the candidate at
/// which the sum reaches `target`; `items` is reordered so that exactly the candidates ranked
/// before it precede it. `None` when the whole sum falls short (rounding). Quickselect on
/// cumulative weight: linear on average, no full sort.
fn select_by_mass(items: &mut [Candidate], mut target: f64, reach: Reach) -> Option<usize> {
    let reached = |sum: f64, target: f64| match reach {
        Reach::AtLeast => sum >= target,
        Reach::Beyond => sum > target,
    };
    let (mut lo, mut hi) = (0, items.len());
    let mut first = true;
    while lo < hi {
        let part = &mut items[lo..hi];
        let mid = if first {
            PREFILTER.min(part.len() / 2)
        } else {
            part.len() / 2
        };
        first = false;
        part.select_nth_unstable_by(mid, rank);
        let before: f64 = part[..mid].iter().map(|c| c.weight).sum();
        if mid > 0 && reached(before, target) {
            hi = lo + mid;
            continue;
        }
        let through = before + part[mid].weight;
        if reached(through, target) {
            return Some(lo + mid);
        }
        target -= through;
        lo += mid + 1;
    }
    None
}

/// The reference semantics of [`Sampler::sample`] after the penalty, written the obvious
/// way: sort the whole vocabulary, cut, walk the normalised probabilities. O(V log V) per
/// token where the sampler is linear; tests check the two draw the same tokens and the
/// benches measure one against the other. Not used by the engine.
pub fn sample_by_sorting(sampling: &Sampling, rng: &mut Rng, logits: &[f32]) -> u32 {
    let t = sampling.temperature;
    let mut candidates: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, l / t))
        .collect();
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if sampling.top_k > 0 {
        candidates.truncate(sampling.top_k);
    }
    let max = candidates[0].1;
    let mut probs: Vec<f64> = candidates
        .iter()
        .map(|(_, l)| f64::from(l - max).exp())
        .collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if sampling.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= f64::from(sampling.top_p) {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
    }
    let mut draw = rng.next_f64();
    for (i, p) in probs.iter().enumerate() {
        if draw < *p {
            return candidates[i].0;
        }
        draw -= p;
    }
    candidates[probs.len() - 1].0
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

    /// Logits of `len` tokens: `spread` scales how peaked they are, `step` > 0 quantises them
    /// (ties), and every `holes`-th token is impossible (`-inf`, as a mask leaves it).
    fn logits(rng: &mut Rng, len: usize, spread: f32, step: f32, holes: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                if holes > 0 && i % holes == holes - 1 {
                    return f32::NEG_INFINITY;
                }
                let l = (rng.next_f64() as f32 * 2.0 - 1.0) * spread;
                if step > 0.0 {
                    (l / step).round() * step
                } else {
                    l
                }
            })
            .collect()
    }

    #[test]
    fn selection_by_mass_draws_exactly_what_the_full_sort_draws() {
        let mut source = Rng::new(77);
        let mut draws = 0;
        let mut distinct = std::collections::HashSet::new();
        for (len, spread, step, holes) in [
            (7, 1.0, 0.0, 0),
            (100, 0.5, 0.0, 0),
            (1000, 8.0, 0.0, 0),
            (1000, 4.0, 1.0, 0),
            (5000, 20.0, 0.0, 3),
            (151_936, 1.0, 0.0, 0),
            (151_936, 12.0, 0.0, 10),
        ] {
            let values = logits(&mut source, len, spread, step, holes);
            for (temperature, top_k, top_p) in [
                (1.0, 0, 1.0),
                (0.3, 0, 0.95),
                (0.7, 0, 0.95),
                (0.9, 0, 0.5),
                (1.5, 0, 0.1),
                (0.7, 1, 1.0),
                (0.7, 5, 1.0),
                (1.0, 50, 0.9),
                (0.8, 400, 0.999),
            ] {
                let sampling = Sampling {
                    top_k,
                    top_p,
                    ..Sampling::with_temperature(temperature, 0)
                };
                let rounds = if len > 10_000 { 1 } else { 40 };
                for seed in 0..rounds {
                    let sampling = Sampling { seed, ..sampling };
                    let mut fast = Sampler::new(sampling);
                    let mut slow = Rng::new(seed);
                    for _ in 0..3 {
                        let want = sample_by_sorting(&sampling, &mut slow, &values);
                        let got = fast.sample(&values, &[]);
                        assert_eq!(
                            got, want,
                            "len {len} spread {spread} step {step} holes {holes} t {temperature} \
                             top_k {top_k} top_p {top_p} seed {seed}"
                        );
                        assert!(values[got as usize].is_finite(), "drew a masked token");
                        distinct.insert((len, got));
                        draws += 1;
                    }
                }
            }
        }
        // The comparison covered real spread, not one token drawn over and over.
        assert!(
            draws > 5000 && distinct.len() > 500,
            "{draws} draws, {} distinct",
            distinct.len()
        );
    }

    #[test]
    fn selection_by_mass_reorders_so_the_found_prefix_is_the_best_ranked() {
        let mut source = Rng::new(5);
        for len in [1usize, 2, 3, 65, 130, 1000] {
            let values = logits(&mut source, len, 3.0, 0.0, 0);
            let mut items: Vec<Candidate> = values
                .iter()
                .enumerate()
                .map(|(i, l)| Candidate {
                    id: i as u32,
                    logit: *l,
                    weight: f64::from(*l).exp(),
                })
                .collect();
            let mut sorted = items.clone();
            sorted.sort_by(rank);
            let total: f64 = sorted.iter().map(|c| c.weight).sum();
            for fraction in [0.0, 0.01, 0.3, 0.5, 0.9, 0.999] {
                let target = fraction * total;
                let i =
                    select_by_mass(&mut items, target, Reach::Beyond).expect("inside the total");
                let mut prefix: Vec<u32> = items[..i].iter().map(|c| c.id).collect();
                prefix.sort_unstable();
                let mut want: Vec<u32> = sorted[..i].iter().map(|c| c.id).collect();
                want.sort_unstable();
                assert_eq!(prefix, want, "len {len} fraction {fraction}");
                assert_eq!(items[i].id, sorted[i].id);
                let before: f64 = sorted[..i].iter().map(|c| c.weight).sum();
                assert!(before <= target && before + sorted[i].weight > target);
            }
            assert_eq!(
                select_by_mass(&mut items, total * 1.01, Reach::AtLeast),
                None
            );
        }
    }

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
