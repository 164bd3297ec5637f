//! Deterministic aggregation of peer judgements: Borda and Copeland scores over reviewers'
//! rankings, the Condorcet winner, the final rank order, majority vote over exact answers, and
//! the small numeric helpers (expected score from log-probs, win probability, weighted combination).
//!
//! Every function is pure and breaks ties by a documented rule, so the same judgements always
//! give the same ranking: replay and checkpoints depend on it.

use std::cmp::Ordering;
use std::collections::BTreeMap;

/// One reviewer's ordering of candidates, best first. `voter` is the candidate index of the
/// reviewer's own proposal (None if the reviewer authored none); it must not appear in `order`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ballot {
    pub voter: Option<usize>,
    pub order: Vec<usize>,
}

impl Ballot {
    /// The entries this ballot may legitimately rank: in range, first occurrence only, never the
    /// voter's own proposal. Parsing should already ensure this; aggregation must not trust it.
    fn valid_order(&self, candidates: usize) -> Vec<usize> {
        let mut seen = vec![false; candidates];
        let mut order = Vec::with_capacity(self.order.len());
        for &c in &self.order {
            if c < candidates && Some(c) != self.voter && !seen[c] {
                seen[c] = true;
                order.push(c);
            }
        }
        order
    }

    /// A reviewer is never asked to rank their own proposal, so their ballot says nothing about it.
    fn may_rank(&self, candidate: usize) -> bool {
        self.voter != Some(candidate)
    }
}

/// Borda scores in [0, 1] per candidate. A ballot ranking m candidates gives the candidate at
/// position i (m-1-i)/(m-1) points (m == 1: 1 point). Entries that are out of range, duplicated,
/// or equal to the voter are ignored. A candidate's score is its points divided by the number of
/// ballots that were allowed to rank it (ballots whose voter is not that candidate); 0 ballots -> 0.0.
pub fn borda(candidates: usize, ballots: &[Ballot]) -> Vec<f64> {
    let mut points = vec![0.0; candidates];
    let mut eligible = vec![0usize; candidates];
    for ballot in ballots {
        let order = ballot.valid_order(candidates);
        for (i, &c) in order.iter().enumerate() {
            points[c] += position_points(i, order.len());
        }
        for (c, count) in eligible.iter_mut().enumerate() {
            *count += usize::from(ballot.may_rank(c));
        }
    }
    let average = |(p, k): (f64, usize)| if k == 0 { 0.0 } else { p / k as f64 };
    points.into_iter().zip(eligible).map(average).collect()
}

fn position_points(i: usize, m: usize) -> f64 {
    if m <= 1 {
        1.0
    } else {
        (m - 1 - i) as f64 / (m - 1) as f64
    }
}

/// Copeland scores in [0, 1]: for every pair (a, b), a beats b if more ballots rank a above b
/// than b above a (a ranked candidate is above an unranked one on the same ballot; a ballot where
/// neither appears, or whose voter is a or b, says nothing about that pair).
/// Score = (wins + 0.5 * ties) / (n - 1); n == 1 -> 1.0.
pub fn copeland(candidates: usize, ballots: &[Ballot]) -> Vec<f64> {
    if candidates == 1 {
        return vec![1.0];
    }
    let prefer = pairwise(candidates, ballots);
    let duel = |a: usize, b: usize| match prefer[a][b].cmp(&prefer[b][a]) {
        Ordering::Greater => 1.0,
        Ordering::Equal => 0.5,
        Ordering::Less => 0.0,
    };
    let score = |a: usize| -> f64 {
        (0..candidates)
            .filter(|&b| b != a)
            .map(|b| duel(a, b))
            .sum()
    };
    (0..candidates)
        .map(|a| score(a) / (candidates - 1) as f64)
        .collect()
}

/// The candidate that beats every other pairwise, if any. A lone candidate wins vacuously
/// (consistent with its Copeland score of 1.0).
pub fn condorcet_winner(candidates: usize, ballots: &[Ballot]) -> Option<usize> {
    let prefer = pairwise(candidates, ballots);
    (0..candidates).find(|&w| (0..candidates).all(|b| b == w || prefer[w][b] > prefer[b][w]))
}

/// `prefer[a][b]`: how many ballots rank a above b.
fn pairwise(candidates: usize, ballots: &[Ballot]) -> Vec<Vec<usize>> {
    let mut prefer = vec![vec![0usize; candidates]; candidates];
    for ballot in ballots {
        add_preferences(&mut prefer, ballot);
    }
    prefer
}

fn add_preferences(prefer: &mut [Vec<usize>], ballot: &Ballot) {
    let order = ballot.valid_order(prefer.len());
    let mut ranked = vec![false; prefer.len()];
    for &c in &order {
        ranked[c] = true;
    }
    for (i, &a) in order.iter().enumerate() {
        for &b in &order[i + 1..] {
            prefer[a][b] += 1;
        }
        // Leaving a candidate off the ballot places it below every ranked one; the voter's own
        // proposal was never on offer, so it is not "below" anything.
        for (b, &is_ranked) in ranked.iter().enumerate() {
            if !is_ranked && ballot.may_rank(b) {
                prefer[a][b] += 1;
            }
        }
    }
}

/// Final order of candidates, best first: by `primary` descending, then `secondary` descending,
/// then by `tiebreak` ascending, then index ascending. NaN sorts last. The length is
/// `primary.len()`; a missing `secondary` entry counts as NaN and a missing `tiebreak` as `u64::MAX`.
pub fn rank_order(primary: &[f64], secondary: &[f64], tiebreak: &[u64]) -> Vec<usize> {
    let second = |i: usize| secondary.get(i).copied().unwrap_or(f64::NAN);
    let key = |i: usize| tiebreak.get(i).copied().unwrap_or(u64::MAX);
    let mut order: Vec<usize> = (0..primary.len()).collect();
    order.sort_by(|&a, &b| {
        descending_nan_last(primary[a], primary[b])
            .then_with(|| descending_nan_last(second(a), second(b)))
            .then_with(|| key(a).cmp(&key(b)))
            .then_with(|| a.cmp(&b))
    });
    order
}

fn descending_nan_last(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        // Neither is NaN, so partial_cmp is total here (and treats 0.0 and -0.0 as equal).
        (false, false) => b.partial_cmp(&a).unwrap_or(Ordering::Equal),
    }
}

/// Plurality vote over extracted final answers (None = no answer, never counts as a vote).
#[derive(Debug, Clone, PartialEq)]
pub struct MajorityResult {
    pub winner: Option<String>,
    /// Votes for the winner.
    pub votes: usize,
    /// Answers that parsed (were Some).
    pub voters: usize,
    /// Per input answer: equals the winner.
    pub agrees: Vec<bool>,
}

/// Ties between answers with equal counts: the lexicographically smallest answer wins (byte
/// order, so the result never depends on input order). `winner` is None when no answer parsed.
pub fn majority_vote(answers: &[Option<String>]) -> MajorityResult {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for answer in answers.iter().flatten() {
        *counts.entry(answer.as_str()).or_default() += 1;
    }
    // Ascending iteration plus "only a strictly larger count takes the lead" keeps the smallest
    // answer among those tied for the most votes.
    let mut best: Option<(&str, usize)> = None;
    for (&answer, &count) in &counts {
        if best.is_none_or(|(_, most)| count > most) {
            best = Some((answer, count));
        }
    }
    let winner = best.map(|(answer, _)| answer.to_owned());
    let agrees = answers
        .iter()
        .map(|a| a.is_some() && *a == winner)
        .collect();
    MajorityResult {
        votes: best.map_or(0, |(_, count)| count),
        voters: counts.values().sum(),
        winner,
        agrees,
    }
}

/// Expected value of a score distribution given log-probabilities of the choices `values`
/// (e.g. 1..=10 with their logprobs); renormalises over the given choices (softmax of the
/// logprobs). Non-finite logprobs count as probability 0 and non-finite values are left out;
/// nothing left, or slices of different lengths -> None.
pub fn expected_score(values: &[f64], logprobs: &[f64]) -> Option<f64> {
    if values.len() != logprobs.len() {
        return None;
    }
    let choices: Vec<(f64, f64)> = values
        .iter()
        .zip(logprobs)
        .map(|(&v, &lp)| (v, lp))
        .filter(|(v, lp)| v.is_finite() && lp.is_finite())
        .collect();
    // Shifting by the largest log-prob keeps exp() from overflowing; the softmax is unchanged.
    let top = choices.iter().map(|c| c.1).reduce(f64::max)?;
    let (mut weighted, mut total) = (0.0, 0.0);
    for &(value, lp) in &choices {
        let w = (lp - top).exp();
        weighted += w * value;
        total += w;
    }
    let low = choices.iter().map(|c| c.0).reduce(f64::min)?;
    let high = choices.iter().map(|c| c.0).reduce(f64::max)?;
    // A convex combination lies within [low, high]; clamping only removes rounding error.
    Some((weighted / total).clamp(low, high))
}

/// Bradley-Terry style win probability of a over b from their scores in [0,1]:
/// 1 / (1 + exp(-(a - b) * scale)). Used as the winner's margin over the runner-up.
pub fn win_probability(a: f64, b: f64, scale: f64) -> f64 {
    1.0 / (1.0 + (-(a - b) * scale).exp())
}

/// Weighted combination of per-method scores in [0,1]: methods whose score is None (not run) are
/// left out and the remaining weights renormalised. Entries with a non-positive or non-finite
/// weight, or a non-finite score, are left out too. Nothing left -> None.
pub fn combine(scores: &[(f64, Option<f64>)]) -> Option<f64> {
    let (mut weighted, mut total) = (0.0, 0.0);
    for &(weight, score) in scores {
        let Some(score) = score else { continue };
        if weight.is_finite() && weight > 0.0 && score.is_finite() {
            weighted += weight * score;
            total += weight;
        }
    }
    (total > 0.0).then(|| weighted / total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ballot(voter: Option<usize>, order: &[usize]) -> Ballot {
        Ballot {
            voter,
            order: order.to_vec(),
        }
    }

    #[test]
    fn borda_scores_positions_and_averages_over_eligible_ballots() {
        let ballots = [
            ballot(Some(0), &[1, 2]),
            ballot(Some(1), &[0, 2]),
            ballot(Some(2), &[1, 0]),
        ];
        // 0: ranked by ballots 1 and 2 (first, last) -> 1/2; 1: first twice -> 1; 2: last twice -> 0.
        assert_eq!(borda(3, &ballots), vec![0.5, 1.0, 0.0]);
    }

    #[test]
    fn borda_ignores_invalid_entries() {
        let dirty = [ballot(Some(0), &[0, 7, 2, 2, 1])];
        let clean = [ballot(Some(0), &[2, 1])];
        assert_eq!(borda(3, &dirty), borda(3, &clean));
        assert_eq!(borda(3, &dirty), vec![0.0, 0.0, 1.0]);
    }

    #[test]
    fn borda_single_entry_ballot_and_no_ballots() {
        assert_eq!(borda(2, &[ballot(None, &[1])]), vec![0.0, 1.0]);
        assert_eq!(borda(2, &[]), vec![0.0, 0.0]);
        assert!(borda(0, &[ballot(None, &[0])]).is_empty());
    }

    #[test]
    fn copeland_counts_wins_and_ties() {
        // 0 > 1 on both ballots; 2 is ranked above 0 once and below once -> tie.
        let ballots = [ballot(None, &[0, 1, 2]), ballot(None, &[2, 0, 1])];
        assert_eq!(copeland(3, &ballots), vec![0.75, 0.25, 0.5]);
        assert_eq!(copeland(1, &[]), vec![1.0]);
        assert!(copeland(0, &[]).is_empty());
    }

    #[test]
    fn copeland_ranked_beats_unranked_but_voter_is_silent() {
        // The ballot of 2 ranks only 0: 0 beats the unranked 1; it says nothing about 2 itself,
        // so 2 ties with both.
        let ballots = [ballot(Some(2), &[0])];
        assert_eq!(copeland(3, &ballots), vec![0.75, 0.25, 0.5]);
    }

    #[test]
    fn condorcet_winner_found_or_absent_in_a_cycle() {
        let cycle = [
            ballot(None, &[0, 1, 2]),
            ballot(None, &[1, 2, 0]),
            ballot(None, &[2, 0, 1]),
        ];
        assert_eq!(condorcet_winner(3, &cycle), None);
        let clear = [ballot(None, &[1, 0, 2]), ballot(None, &[1, 2, 0])];
        assert_eq!(condorcet_winner(3, &clear), Some(1));
        assert_eq!(condorcet_winner(1, &[]), Some(0));
        assert_eq!(condorcet_winner(0, &[]), None);
    }

    #[test]
    fn rank_order_uses_secondary_then_tiebreak_then_index_and_puts_nan_last() {
        let primary = [0.5, f64::NAN, 0.5, 0.9, 0.5];
        let secondary = [0.1, 1.0, 0.2, 0.0, 0.2];
        let keys = [0, 0, 9, 5, 3];
        assert_eq!(rank_order(&primary, &secondary, &keys), vec![3, 4, 2, 0, 1]);
        assert_eq!(rank_order(&[1.0, 1.0], &[], &[]), vec![0, 1]);
    }

    #[test]
    fn majority_vote_picks_plurality_and_breaks_ties_lexicographically() {
        let answers = |xs: &[Option<&str>]| -> Vec<Option<String>> {
            xs.iter().map(|x| x.map(str::to_owned)).collect()
        };
        let result = majority_vote(&answers(&[Some("7"), None, Some("12"), Some("7")]));
        assert_eq!(result.winner.as_deref(), Some("7"));
        assert_eq!((result.votes, result.voters), (2, 3));
        assert_eq!(result.agrees, vec![true, false, false, true]);
        let tie = majority_vote(&answers(&[Some("b"), Some("a")]));
        assert_eq!(tie.winner.as_deref(), Some("a"));
        let empty = majority_vote(&answers(&[None, None]));
        assert_eq!(empty.winner, None);
        assert_eq!((empty.votes, empty.voters), (0, 0));
        assert_eq!(empty.agrees, vec![false, false]);
    }

    #[test]
    fn expected_score_is_softmax_weighted_mean() {
        let half = 0.5f64.ln();
        assert_eq!(expected_score(&[2.0, 4.0], &[half, half]), Some(3.0));
        // Renormalised: the raw probabilities need not sum to one.
        assert_eq!(expected_score(&[2.0, 4.0], &[-5.0, -5.0]), Some(3.0));
        let e = expected_score(&[1.0, 10.0], &[0.0, f64::NEG_INFINITY]);
        assert_eq!(e, Some(1.0));
        assert_eq!(expected_score(&[1.0], &[f64::NAN]), None);
        assert_eq!(expected_score(&[1.0, 2.0], &[0.0]), None);
        assert_eq!(expected_score(&[], &[]), None);
    }

    #[test]
    fn win_probability_is_logistic_in_the_score_gap() {
        assert_eq!(win_probability(0.5, 0.5, 10.0), 0.5);
        assert!(win_probability(0.9, 0.1, 10.0) > 0.99);
        let p = win_probability(0.7, 0.4, 5.0);
        assert!((p + win_probability(0.4, 0.7, 5.0) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn combine_renormalises_over_methods_that_ran() {
        assert_eq!(
            combine(&[(1.0, Some(0.25)), (3.0, Some(0.75))]),
            Some(0.625)
        );
        assert_eq!(combine(&[(1.0, Some(0.2)), (3.0, None)]), Some(0.2));
        assert_eq!(combine(&[(1.0, None), (3.0, None)]), None);
        assert_eq!(combine(&[(0.0, Some(0.9))]), None);
        assert_eq!(combine(&[]), None);
    }

    /// Ballots over `n` candidates: any voter (or none), ranking a shuffled subset of the others.
    fn arb_ballot(n: usize) -> impl Strategy<Value = Ballot> {
        let all: Vec<usize> = (0..n).collect();
        (proptest::option::of(0..n), Just(all).prop_shuffle(), 0..=n).prop_map(
            |(voter, shuffled, len)| Ballot {
                voter,
                order: shuffled
                    .into_iter()
                    .filter(|&c| Some(c) != voter)
                    .take(len)
                    .collect(),
            },
        )
    }

    fn arb_election() -> impl Strategy<Value = (usize, Vec<Ballot>)> {
        (1usize..7).prop_flat_map(|n| (Just(n), proptest::collection::vec(arb_ballot(n), 0..9)))
    }

    fn arb_permutation(n: usize) -> impl Strategy<Value = Vec<usize>> {
        Just((0..n).collect::<Vec<_>>()).prop_shuffle()
    }

    fn relabel(ballots: &[Ballot], perm: &[usize]) -> Vec<Ballot> {
        let map = |c: usize| perm.get(c).copied().unwrap_or(c);
        ballots
            .iter()
            .map(|b| Ballot {
                voter: b.voter.map(map),
                order: b.order.iter().map(|&c| map(c)).collect(),
            })
            .collect()
    }

    fn promote(ballot: &Ballot, c: usize) -> Ballot {
        let mut order: Vec<usize> = ballot.order.iter().copied().filter(|&x| x != c).collect();
        order.insert(0, c);
        Ballot {
            voter: ballot.voter,
            order,
        }
    }

    fn score_or_nan() -> impl Strategy<Value = f64> {
        prop_oneof![Just(f64::NAN), (0..3).prop_map(|x| f64::from(x) / 2.0)]
    }

    proptest! {
        #[test]
        fn scores_follow_a_relabelling(
            (n, ballots, perm) in arb_election()
                .prop_flat_map(|(n, b)| (Just(n), Just(b), arb_permutation(n)))
        ) {
            let relabelled = relabel(&ballots, &perm);
            let (b0, b1) = (borda(n, &ballots), borda(n, &relabelled));
            let (c0, c1) = (copeland(n, &ballots), copeland(n, &relabelled));
            for c in 0..n {
                prop_assert_eq!(b0[c], b1[perm[c]]);
                prop_assert_eq!(c0[c], c1[perm[c]]);
            }
        }

        #[test]
        fn borda_is_bounded_and_unanimous_first_scores_one(
            (n, ballots, c) in arb_election().prop_flat_map(|(n, b)| (Just(n), Just(b), 0..n))
        ) {
            prop_assert!(borda(n, &ballots).iter().all(|s| (0.0..=1.0).contains(s)));
            let unanimous: Vec<Ballot> = ballots
                .iter()
                .map(|b| if b.may_rank(c) { promote(b, c) } else { b.clone() })
                .collect();
            let expected = if ballots.iter().any(|b| b.may_rank(c)) { 1.0 } else { 0.0 };
            prop_assert_eq!(borda(n, &unanimous)[c], expected);
        }

        #[test]
        fn a_first_place_ballot_never_lowers_borda(
            (n, ballots, extra, c) in arb_election()
                .prop_flat_map(|(n, b)| (Just(n), Just(b), arb_ballot(n), 0..n))
        ) {
            let before = borda(n, &ballots)[c];
            let mut more = ballots;
            more.push(promote(&extra, c));
            // Float sums may differ in the last bit; the mathematical score never drops.
            prop_assert!(borda(n, &more)[c] >= before - 1e-12);
        }

        #[test]
        fn condorcet_winner_tops_copeland_and_rank_order(
            (n, ballots, keys) in arb_election().prop_flat_map(|(n, b)| {
                (Just(n), Just(b), proptest::collection::vec(any::<u64>(), n))
            })
        ) {
            if let Some(w) = condorcet_winner(n, &ballots) {
                let cope = copeland(n, &ballots);
                prop_assert_eq!(cope[w], 1.0);
                let order = rank_order(&cope, &borda(n, &ballots), &keys);
                prop_assert_eq!(order[0], w);
            }
        }

        #[test]
        fn rank_order_is_a_deterministic_permutation_equivariant_to_relabelling(
            (primary, secondary, keys, perm) in (0usize..8).prop_flat_map(|n| (
                proptest::collection::vec(score_or_nan(), n),
                proptest::collection::vec(score_or_nan(), n),
                arb_permutation(n),
                arb_permutation(n),
            ))
        ) {
            let keys: Vec<u64> = keys.iter().map(|&k| k as u64 * 7919).collect();
            let order = rank_order(&primary, &secondary, &keys);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..primary.len()).collect::<Vec<_>>());
            prop_assert_eq!(&order, &rank_order(&primary, &secondary, &keys));
            // Present the same candidates in another order (with their distinct keys): the
            // ranking of candidates is the same, so the tie order comes only from the keys.
            let moved = |xs: &[f64]| -> Vec<f64> {
                let mut out = vec![0.0; xs.len()];
                for (i, &x) in xs.iter().enumerate() { out[perm[i]] = x; }
                out
            };
            let mut moved_keys = vec![0; keys.len()];
            for (i, &k) in keys.iter().enumerate() { moved_keys[perm[i]] = k; }
            let reordered = rank_order(&moved(&primary), &moved(&secondary), &moved_keys);
            let expected: Vec<usize> = order.iter().map(|&i| perm[i]).collect();
            prop_assert_eq!(reordered, expected);
        }

        #[test]
        fn majority_vote_ignores_answer_order(
            (answers, shuffled) in proptest::collection::vec(
                proptest::option::of(prop_oneof![Just("1"), Just("2"), Just("10")]), 0..10,
            ).prop_flat_map(|a| (Just(a.clone()), Just(a).prop_shuffle()))
        ) {
            let own = |xs: Vec<Option<&str>>| -> Vec<Option<String>> {
                xs.into_iter().map(|x| x.map(str::to_owned)).collect()
            };
            let (a, b) = (majority_vote(&own(answers)), majority_vote(&own(shuffled)));
            prop_assert_eq!(a.winner, b.winner);
            prop_assert_eq!((a.votes, a.voters), (b.votes, b.voters));
        }

        #[test]
        fn expected_score_stays_within_the_values(
            choices in proptest::collection::vec((
                -100.0f64..100.0,
                prop_oneof![-60.0f64..0.0, Just(f64::NEG_INFINITY), Just(f64::NAN)],
            ), 1..12)
        ) {
            let (values, logprobs): (Vec<f64>, Vec<f64>) = choices.into_iter().unzip();
            if let Some(e) = expected_score(&values, &logprobs) {
                let low = values.iter().copied().fold(f64::INFINITY, f64::min);
                let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                prop_assert!(low <= e && e <= high);
            } else {
                prop_assert!(logprobs.iter().all(|lp| !lp.is_finite()));
            }
        }
    }
}
