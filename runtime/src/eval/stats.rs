//! The statistics of an evaluation, computed from the result lines alone: per-arm accuracy,
//! accuracy by round, cost, latency and matched budget, and paired comparisons between arms (an
//! exact McNemar test and a seeded bootstrap interval of the accuracy difference).
//!
//! Everything here is a pure function of the records and a seed, so a summary can be recomputed
//! from `results.jsonl` at any time and comes out the same.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::f64::consts::LN_2;

use council_councils::rng::{SplitMix, mix};

use super::record::{Arm, Pool, ResultRecord, RunStatus};
use super::summary::{
    ArmSummary, BudgetSummary, Comparison, PoolSummary, RoundSummary, RunInfo, Summary,
};

/// Paired bootstrap resamples per comparison.
pub const BOOTSTRAP_RESAMPLES: usize = 2000;

/// Percentiles (nearest rank) of the bootstrap differences that bound the 95 % interval.
const CI_LOW_PERCENTILE: f64 = 2.5;
const CI_HIGH_PERCENTILE: f64 = 97.5;

/// Summarizes a results file: one [`ArmSummary`] per arm present (in [`Arm::ALL`] order) and one
/// [`Comparison`] per pair of arms that scored a common item.
///
/// When an (item, arm) appears more than once the last line wins, so a resumed file never counts
/// an item twice. `bootstrap_seed` seeds the comparisons' bootstrap intervals.
pub fn summarize(records: &[ResultRecord], run: RunInfo, bootstrap_seed: u64) -> Summary {
    let latest = latest_per_item(records);
    let arms = Arm::ALL
        .into_iter()
        .filter_map(|arm| {
            let runs = runs_of(&latest, arm);
            (!runs.is_empty()).then(|| arm_summary(arm, &runs))
        })
        .collect();
    let comparisons = compare_arms(&latest, bootstrap_seed);
    Summary {
        run,
        arms,
        comparisons,
    }
}

/// Accuracy `correct / n` and its standard error `sqrt(p (1 - p) / n)`; `None` when `n` is 0.
pub fn accuracy(correct: u64, n: u64) -> Option<(f64, f64)> {
    if n == 0 {
        return None;
    }
    let p = correct as f64 / n as f64;
    Some((p, (p * (1.0 - p) / n as f64).sqrt()))
}

/// Exact two-sided McNemar test: the binomial(b + c, 1/2) probability of a split at least as
/// uneven as the discordant counts `only_a` = b and `only_b` = c,
/// `min(1, 2 · Σ_{k=0}^{min(b,c)} C(b+c, k) / 2^(b+c))`; 1.0 when there are no discordant pairs.
///
/// The terms are carried relative to the largest one, in log space, so large counts neither
/// overflow nor lose the sum (a result below the smallest `f64` comes out as 0).
pub fn mcnemar_exact(only_a: u64, only_b: u64) -> f64 {
    let n = only_a + only_b;
    if n == 0 {
        return 1.0;
    }
    let m = only_a.min(only_b);
    // ln(C(n, k) / 2^n), and Σ_{j≤k} C(n, j) / C(n, k); the terms grow with k up to n / 2.
    let mut ln_term = -(n as f64) * LN_2;
    let mut relative_sum = 1.0;
    for k in 0..m {
        let growth = (n - k) as f64 / (k + 1) as f64;
        ln_term += growth.ln();
        relative_sum = relative_sum / growth + 1.0;
    }
    (2.0 * (ln_term + relative_sum.ln()).exp()).min(1.0)
}

/// Paired percentile bootstrap of accuracy(a) − accuracy(b) over `pairs` of (a correct,
/// b correct): `resamples` resamples of the pairs with replacement, drawn with [`SplitMix`]
/// seeded by `seed`, and the 2.5th and 97.5th percentiles (nearest rank) of their differences.
///
/// `(0.0, 0.0)` when there are no pairs or no resamples.
pub fn bootstrap_difference(pairs: &[(bool, bool)], resamples: usize, seed: u64) -> (f64, f64) {
    if pairs.is_empty() || resamples == 0 {
        return (0.0, 0.0);
    }
    let mut rng = SplitMix::new(seed);
    // Differences of correct counts: exact integers, divided by n only at the end.
    let mut differences: Vec<i64> = (0..resamples)
        .map(|_| resampled_difference(pairs, &mut rng))
        .collect();
    differences.sort_unstable();
    let n = pairs.len() as f64;
    let at = |p| nearest_rank(&differences, p).map_or(0.0, |d| d as f64 / n);
    (at(CI_LOW_PERCENTILE), at(CI_HIGH_PERCENTILE))
}

/// The `p`-th percentile (0–100) of ascending `sorted` by nearest rank: the element at index
/// `ceil(p / 100 · n) − 1` (the first element for `p` = 0); `None` when `sorted` is empty.
pub fn percentile_nearest_rank(sorted: &[u64], p: f64) -> Option<u64> {
    nearest_rank(sorted, p)
}

fn nearest_rank<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let n = sorted.len();
    // p · n / 100 rather than p / 100 · n: exact for the usual p and n (2.5 · 2000 / 100 = 50).
    let rank = (p.clamp(0.0, 100.0) * n as f64 / 100.0).ceil() as usize;
    sorted.get(rank.clamp(1, n.max(1)) - 1).copied()
}

/// Σ (a − b) over one resample of `pairs.len()` pairs drawn with replacement.
fn resampled_difference(pairs: &[(bool, bool)], rng: &mut SplitMix) -> i64 {
    let n = pairs.len() as u64;
    (0..n)
        .map(|_| {
            let (a, b) = pairs[(rng.next_u64() % n) as usize];
            i64::from(a) - i64::from(b)
        })
        .sum()
}

/// The last line of each (item, arm), in the order the pairs first appear.
fn latest_per_item(records: &[ResultRecord]) -> Vec<&ResultRecord> {
    let mut slots: HashMap<(&str, Arm), usize> = HashMap::new();
    let mut latest: Vec<&ResultRecord> = Vec::new();
    for record in records {
        match slots.entry((record.item.as_str(), record.arm)) {
            Entry::Occupied(slot) => latest[*slot.get()] = record,
            Entry::Vacant(slot) => {
                slot.insert(latest.len());
                latest.push(record);
            }
        }
    }
    latest
}

fn runs_of<'a>(latest: &[&'a ResultRecord], arm: Arm) -> Vec<&'a ResultRecord> {
    latest.iter().copied().filter(|r| r.arm == arm).collect()
}

fn arm_summary(arm: Arm, runs: &[&ResultRecord]) -> ArmSummary {
    let scored = count(runs, |r| r.correct.is_some());
    let correct = count(runs, |r| r.correct == Some(true));
    let parse_failures = count(runs, |r| r.correct.is_some() && r.parse_failed);
    let accuracy = accuracy(correct, scored);
    let per_run = PerRun::of(runs);
    ArmSummary {
        arm,
        runs: runs.len() as u64,
        failed: count(runs, |r| matches!(r.status, RunStatus::Failed { .. })),
        skipped: count(runs, is_skipped),
        scored,
        correct,
        accuracy: accuracy.map(|(p, _)| p),
        stderr: accuracy.map(|(_, stderr)| stderr),
        parse_failures,
        parse_failure_rate: ratio(parse_failures, scored),
        consensus_rate: consensus_rate(runs),
        rounds: round_summaries(runs),
        calls: sum(runs, |r| r.calls),
        failed_calls: sum(runs, |r| r.failed_calls),
        prompt_tokens: sum(runs, |r| r.prompt_tokens),
        cached_prompt_tokens: sum(runs, |r| r.cached_prompt_tokens),
        completion_tokens: sum(runs, |r| r.completion_tokens),
        mean_calls: per_run.mean_calls,
        mean_tokens: per_run.mean_tokens,
        latency_p50_ms: per_run.p50_ms,
        latency_p95_ms: per_run.p95_ms,
        latency_sum_s: sum(runs, |r| r.latency_ms) as f64 / 1000.0,
        budget: budget_summary(runs),
        mean_score: mean(runs.iter().filter_map(|r| r.score)),
        mean_margin: mean(runs.iter().filter_map(|r| r.margin)),
        pool: pool_summary(runs),
    }
}

/// The pool oracle over the scored runs that had a pool; `None` when none had.
fn pool_summary(runs: &[&ResultRecord]) -> Option<PoolSummary> {
    let pooled: Vec<(Pool, bool)> = runs
        .iter()
        .filter_map(|r| Some((r.pool?, r.correct?)))
        .collect();
    let n = pooled.len() as u64;
    let count = |keep: fn(&(Pool, bool)) -> bool| pooled.iter().filter(|p| keep(p)).count() as u64;
    let first_correct = count(|(p, _)| p.first);
    let last_correct = count(|(p, _)| p.last);
    (n > 0).then(|| PoolSummary {
        runs: n,
        first_correct,
        first_accuracy: first_correct as f64 / n as f64,
        last_correct,
        last_accuracy: last_correct as f64 / n as f64,
        picked_correct: count(|(_, c)| *c),
        lost_by_picking: count(|(p, c)| p.last && !c),
        lost_in_review: count(|(p, _)| p.first && !p.last),
    })
}

/// Per-run figures over the runs that were not skipped (a skipped run spent nothing).
#[derive(Debug)]
struct PerRun {
    mean_calls: f64,
    mean_tokens: f64,
    p50_ms: Option<u64>,
    p95_ms: Option<u64>,
}

impl PerRun {
    fn of(runs: &[&ResultRecord]) -> Self {
        let ran: Vec<&ResultRecord> = runs.iter().copied().filter(|r| !is_skipped(r)).collect();
        let mean_per_run = |total: u64| {
            if ran.is_empty() {
                0.0
            } else {
                total as f64 / ran.len() as f64
            }
        };
        let mut latencies: Vec<u64> = ran.iter().map(|r| r.latency_ms).collect();
        latencies.sort_unstable();
        Self {
            mean_calls: mean_per_run(sum(&ran, |r| r.calls)),
            mean_tokens: mean_per_run(sum(&ran, ResultRecord::total_tokens)),
            p50_ms: percentile_nearest_rank(&latencies, 50.0),
            p95_ms: percentile_nearest_rank(&latencies, 95.0),
        }
    }
}

fn is_skipped(run: &ResultRecord) -> bool {
    matches!(run.status, RunStatus::Skipped { .. })
}

fn count(runs: &[&ResultRecord], keep: impl Fn(&ResultRecord) -> bool) -> u64 {
    runs.iter().filter(|r| keep(r)).count() as u64
}

fn sum(runs: &[&ResultRecord], value: impl Fn(&ResultRecord) -> u64) -> u64 {
    runs.iter().map(|r| value(r)).sum()
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (total, n) = values.fold((0.0, 0u64), |(total, n), v| (total + v, n + 1));
    (n > 0).then(|| total / n as f64)
}

fn consensus_rate(runs: &[&ResultRecord]) -> Option<f64> {
    let with_value = count(runs, |r| r.consensus.is_some());
    ratio(count(runs, |r| r.consensus == Some(true)), with_value)
}

/// One summary per round index that appears in any run's rounds, ascending.
fn round_summaries(runs: &[&ResultRecord]) -> Vec<RoundSummary> {
    let rounds: BTreeSet<u32> = runs
        .iter()
        .flat_map(|r| r.rounds.iter().map(|answer| answer.round))
        .collect();
    rounds
        .into_iter()
        .map(|round| round_summary(runs, round))
        .collect()
}

fn round_summary(runs: &[&ResultRecord], round: u32) -> RoundSummary {
    let scored = count(runs, |r| correct_at(r, round).is_some());
    let correct = count(runs, |r| correct_at(r, round) == Some(true));
    let flip = |from: bool, to: bool| match round.checked_sub(1) {
        Some(previous) => count(runs, |r| {
            correct_at(r, previous) == Some(from) && correct_at(r, round) == Some(to)
        }),
        None => 0,
    };
    RoundSummary {
        round,
        scored,
        correct,
        accuracy: ratio(correct, scored),
        correct_to_wrong: flip(true, false),
        wrong_to_correct: flip(false, true),
    }
}

/// Whether the run's answer after `round` was correct; `None` when unscored or absent.
fn correct_at(run: &ResultRecord, round: u32) -> Option<bool> {
    run.rounds
        .iter()
        .find(|answer| answer.round == round)
        .and_then(|answer| answer.correct)
}

/// Sums over the runs that carry a budget; `None` when none does.
fn budget_summary(runs: &[&ResultRecord]) -> Option<BudgetSummary> {
    let budgeted: Vec<_> = runs
        .iter()
        .filter_map(|r| Some((*r, r.budget.as_ref()?)))
        .collect();
    let (_, first) = budgeted.first()?;
    let samples: u64 = budgeted.iter().map(|(_, b)| b.samples).sum();
    Some(BudgetSummary {
        matched: first.matched,
        target_calls: budgeted.iter().map(|(_, b)| b.target_calls).sum(),
        target_tokens: budgeted.iter().map(|(_, b)| b.target_tokens).sum(),
        actual_calls: budgeted.iter().map(|(r, _)| r.calls).sum(),
        actual_tokens: budgeted.iter().map(|(r, _)| r.total_tokens()).sum(),
        mean_samples: samples as f64 / budgeted.len() as f64,
    })
}

/// Each arm's scored items; ordered by item id so the bootstrap does not depend on line order.
fn scored_items<'a>(latest: &[&'a ResultRecord], arm: Arm) -> BTreeMap<&'a str, bool> {
    latest
        .iter()
        .filter(|r| r.arm == arm)
        .filter_map(|r| Some((r.item.as_str(), r.correct?)))
        .collect()
}

fn compare_arms(latest: &[&ResultRecord], bootstrap_seed: u64) -> Vec<Comparison> {
    let scored = Arm::ALL.map(|arm| (arm, scored_items(latest, arm)));
    let mut comparisons = Vec::new();
    for (i, (a, a_items)) in scored.iter().enumerate() {
        for (b, b_items) in &scored[i + 1..] {
            let pairs: Vec<(bool, bool)> = a_items
                .iter()
                .filter_map(|(item, a_correct)| Some((*a_correct, *b_items.get(item)?)))
                .collect();
            if !pairs.is_empty() {
                comparisons.push(compare(*a, *b, &pairs, bootstrap_seed));
            }
        }
    }
    comparisons
}

fn compare(a: Arm, b: Arm, pairs: &[(bool, bool)], bootstrap_seed: u64) -> Comparison {
    let tally = |want: (bool, bool)| pairs.iter().filter(|pair| **pair == want).count() as u64;
    let (only_a, only_b) = (tally((true, false)), tally((false, true)));
    let seed = mix(&[bootstrap_seed, a as u64, b as u64]);
    let (ci_low, ci_high) = bootstrap_difference(pairs, BOOTSTRAP_RESAMPLES, seed);
    Comparison {
        a,
        b,
        pairs: pairs.len() as u64,
        both_correct: tally((true, true)),
        only_a,
        only_b,
        neither: tally((false, false)),
        difference: (only_a as f64 - only_b as f64) / pairs.len() as f64,
        mcnemar_p: mcnemar_exact(only_a, only_b),
        ci_low,
        ci_high,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::record::{Budget, BudgetKind, RoundAnswer};

    const FIXTURE: &str = include_str!("fixtures/results.jsonl");

    fn approx(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() <= 1e-12
    }

    fn assert_close(actual: f64, expected: f64, what: &str) {
        assert!(approx(actual, expected), "{what}: {actual} != {expected}");
    }

    fn assert_close_opt(actual: Option<f64>, expected: Option<f64>, what: &str) {
        match (actual, expected) {
            (Some(a), Some(e)) => assert_close(a, e, what),
            (a, e) => assert_eq!(a, e, "{what}"),
        }
    }

    fn run_info() -> RunInfo {
        RunInfo {
            model: "tiny".into(),
            backend: "engine".into(),
            source: "fixture".into(),
            seed: 7,
            items: 6,
            arms: Arm::ALL.to_vec(),
            agents: 3,
            rounds: 2,
            refine_rounds: 2,
            vote_match: BudgetKind::Tokens,
            max_tokens_per_call: 512,
            wall_time_s: 60.0,
            complete: true,
        }
    }

    fn record(item: &str, arm: Arm, correct: Option<bool>) -> ResultRecord {
        ResultRecord {
            item: item.into(),
            suite: "arithmetic".into(),
            arm,
            status: RunStatus::Ok,
            expected: correct.map(|_| "1".into()),
            answer: None,
            correct,
            parse_failed: false,
            rounds: Vec::new(),
            pool: None,
            consensus: None,
            calls: 1,
            failed_calls: 0,
            prompt_tokens: 10,
            cached_prompt_tokens: 0,
            completion_tokens: 5,
            latency_ms: 100,
            budget: None,
            score: None,
            margin: None,
            transcript: None,
        }
    }

    fn fixture_records() -> Vec<ResultRecord> {
        FIXTURE
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| serde_json::from_str(line).expect("fixture line parses"))
            .collect()
    }

    fn round(
        round: u32,
        scored: u64,
        correct: u64,
        accuracy: Option<f64>,
        flips: (u64, u64),
    ) -> RoundSummary {
        RoundSummary {
            round,
            scored,
            correct,
            accuracy,
            correct_to_wrong: flips.0,
            wrong_to_correct: flips.1,
        }
    }

    fn assert_round(actual: &RoundSummary, expected: &RoundSummary, arm: Arm) {
        let what = format!("{arm} round {}", expected.round);
        assert_eq!(actual.round, expected.round, "{what}");
        assert_eq!(actual.scored, expected.scored, "{what} scored");
        assert_eq!(actual.correct, expected.correct, "{what} correct");
        assert_close_opt(
            actual.accuracy,
            expected.accuracy,
            &format!("{what} accuracy"),
        );
        assert_eq!(
            actual.correct_to_wrong, expected.correct_to_wrong,
            "{what} c->w"
        );
        assert_eq!(
            actual.wrong_to_correct, expected.wrong_to_correct,
            "{what} w->c"
        );
    }

    fn assert_budget(actual: Option<&BudgetSummary>, expected: Option<&BudgetSummary>) {
        let (Some(actual), Some(expected)) = (actual, expected) else {
            assert_eq!(actual, expected, "budget");
            return;
        };
        assert_eq!(actual.matched, expected.matched, "budget matched");
        assert_eq!(actual.target_calls, expected.target_calls, "target_calls");
        assert_eq!(
            actual.target_tokens, expected.target_tokens,
            "target_tokens"
        );
        assert_eq!(actual.actual_calls, expected.actual_calls, "actual_calls");
        assert_eq!(
            actual.actual_tokens, expected.actual_tokens,
            "actual_tokens"
        );
        assert_close(actual.mean_samples, expected.mean_samples, "mean_samples");
    }

    fn assert_arm(actual: &ArmSummary, expected: &ArmSummary) {
        let arm = expected.arm;
        let what = |field: &str| format!("{arm} {field}");
        assert_eq!(actual.arm, arm);
        assert_eq!(actual.runs, expected.runs, "{}", what("runs"));
        assert_eq!(actual.failed, expected.failed, "{}", what("failed"));
        assert_eq!(actual.skipped, expected.skipped, "{}", what("skipped"));
        assert_eq!(actual.scored, expected.scored, "{}", what("scored"));
        assert_eq!(actual.correct, expected.correct, "{}", what("correct"));
        assert_close_opt(actual.accuracy, expected.accuracy, &what("accuracy"));
        assert_close_opt(actual.stderr, expected.stderr, &what("stderr"));
        assert_eq!(
            actual.parse_failures,
            expected.parse_failures,
            "{}",
            what("parse")
        );
        assert_close_opt(
            actual.parse_failure_rate,
            expected.parse_failure_rate,
            &what("parse_failure_rate"),
        );
        assert_close_opt(
            actual.consensus_rate,
            expected.consensus_rate,
            &what("consensus"),
        );
        assert_eq!(
            actual.rounds.len(),
            expected.rounds.len(),
            "{}",
            what("rounds")
        );
        for (a, e) in actual.rounds.iter().zip(&expected.rounds) {
            assert_round(a, e, arm);
        }
        assert_eq!(actual.calls, expected.calls, "{}", what("calls"));
        assert_eq!(
            actual.failed_calls,
            expected.failed_calls,
            "{}",
            what("failed_calls")
        );
        assert_eq!(
            actual.prompt_tokens,
            expected.prompt_tokens,
            "{}",
            what("prompt")
        );
        assert_eq!(
            actual.cached_prompt_tokens,
            expected.cached_prompt_tokens,
            "{}",
            what("cached")
        );
        assert_eq!(
            actual.completion_tokens,
            expected.completion_tokens,
            "{}",
            what("completion")
        );
        assert_close(actual.mean_calls, expected.mean_calls, &what("mean_calls"));
        assert_close(
            actual.mean_tokens,
            expected.mean_tokens,
            &what("mean_tokens"),
        );
        assert_eq!(
            actual.latency_p50_ms,
            expected.latency_p50_ms,
            "{}",
            what("p50")
        );
        assert_eq!(
            actual.latency_p95_ms,
            expected.latency_p95_ms,
            "{}",
            what("p95")
        );
        assert_close(
            actual.latency_sum_s,
            expected.latency_sum_s,
            &what("latency_sum_s"),
        );
        assert_budget(actual.budget.as_ref(), expected.budget.as_ref());
        assert_close_opt(actual.mean_score, expected.mean_score, &what("mean_score"));
        assert_close_opt(
            actual.mean_margin,
            expected.mean_margin,
            &what("mean_margin"),
        );
    }

    /// Fixture items, by arm (final correctness; arith-4 single is the later of its two lines):
    ///
    /// | item     | single   | self_refine     | majority | council      |
    /// |----------|----------|-----------------|----------|--------------|
    /// | arith-1  | T        | T (F,T,T)       | T        | T (T,T,T)    |
    /// | arith-2  | F parse  | T (T,F,T)       | F        | F (F,T,F)    |
    /// | arith-3  | F failed | T (F,F,T)       | T        | T (F,T,T)    |
    /// | game24-1 | F        | F parse (T,T,F) | F parse  | T (T,T,T)    |
    /// | arith-4  | F        | F failed (T)    | F        | F failed (F) |
    /// | essay-1  | none     | none            | skipped  | none         |
    fn expected_arms() -> Vec<ArmSummary> {
        vec![
            ArmSummary {
                arm: Arm::Single,
                runs: 6,
                failed: 1, // arith-3
                skipped: 0,
                scored: 5,                     // all but essay-1
                correct: 1,                    // arith-1
                accuracy: Some(0.2),           // 1 / 5
                stderr: Some(0.032f64.sqrt()), // sqrt(0.2 · 0.8 / 5)
                parse_failures: 1,             // arith-2
                parse_failure_rate: Some(0.2), // 1 / 5
                consensus_rate: None,
                // round 0: arith-1 T, arith-2 F, game24-1 F, arith-4 F (arith-3 has no rounds)
                rounds: vec![round(0, 4, 1, Some(0.25), (0, 0))],
                calls: 6,
                failed_calls: 1,
                prompt_tokens: 620,        // 100 + 110 + 0 + 120 + 90 + 200
                cached_prompt_tokens: 30,  // 10 + 20
                completion_tokens: 530,    // 50 + 80 + 0 + 60 + 40 + 300
                mean_calls: 1.0,           // 6 / 6
                mean_tokens: 1150.0 / 6.0, // (620 + 530) / 6
                // sorted 300 1000 1200 1400 1500 5000: ranks ceil(3) = 3 and ceil(5.7) = 6
                latency_p50_ms: Some(1200),
                latency_p95_ms: Some(5000),
                latency_sum_s: 10.4, // (1200 + 1500 + 300 + 1400 + 1000 + 5000) ms
                budget: None,
                mean_score: None,
                mean_margin: None,
                pool: None,
            },
            ArmSummary {
                arm: Arm::SelfRefine,
                runs: 6,
                failed: 1, // arith-4
                skipped: 0,
                scored: 5,                     // all but essay-1
                correct: 3,                    // arith-1, arith-2, arith-3
                accuracy: Some(0.6),           // 3 / 5
                stderr: Some(0.048f64.sqrt()), // sqrt(0.6 · 0.4 / 5)
                parse_failures: 1,             // game24-1
                parse_failure_rate: Some(0.2), // 1 / 5
                consensus_rate: None,
                rounds: vec![
                    // F T F T T
                    round(0, 5, 3, Some(0.6), (0, 0)),
                    // T F F T: arith-1 F→T, arith-2 T→F
                    round(1, 4, 2, Some(0.5), (1, 1)),
                    // T T T F: arith-2 F→T, arith-3 F→T, game24-1 T→F
                    round(2, 4, 3, Some(0.75), (1, 2)),
                ],
                calls: 28,                   // 5 · 5 + 3
                failed_calls: 2,             // arith-4
                prompt_tokens: 5030,         // 800 + 850 + 780 + 900 + 200 + 1500
                cached_prompt_tokens: 1860,  // 300 + 320 + 290 + 350 + 0 + 600
                completion_tokens: 3010,     // 400 + 420 + 390 + 500 + 100 + 1200
                mean_calls: 28.0 / 6.0,      // 28 / 6
                mean_tokens: 1340.0,         // (5030 + 3010) / 6
                latency_p50_ms: Some(6000),  // sorted 2500 5800 6000 6500 7000 12000, rank 3
                latency_p95_ms: Some(12000), // rank ceil(5.7) = 6
                latency_sum_s: 39.8,         // 6000 + 6500 + 5800 + 7000 + 2500 + 12000 ms
                budget: None,
                mean_score: None,
                mean_margin: None,
                pool: None,
            },
            ArmSummary {
                arm: Arm::Majority,
                runs: 6,
                failed: 0,
                skipped: 1,                    // essay-1
                scored: 5,                     // all but essay-1
                correct: 2,                    // arith-1, arith-3
                accuracy: Some(0.4),           // 2 / 5
                stderr: Some(0.048f64.sqrt()), // sqrt(0.4 · 0.6 / 5)
                parse_failures: 1,             // game24-1
                parse_failure_rate: Some(0.2), // 1 / 5
                consensus_rate: Some(0.4),     // T F F F T: 2 / 5
                rounds: vec![round(0, 5, 2, Some(0.4), (0, 0))],
                calls: 26,                  // 6 + 6 + 5 + 6 + 3 + 0
                failed_calls: 1,            // game24-1
                prompt_tokens: 7500,        // 1800 + 1800 + 1500 + 1500 + 900
                cached_prompt_tokens: 6250, // 1500 + 1500 + 1250 + 1250 + 750
                completion_tokens: 5800,    // 1050 + 1200 + 1150 + 1650 + 750
                mean_calls: 5.2,            // 26 / 5 runs not skipped
                mean_tokens: 2660.0,        // (7500 + 5800) / 5
                latency_p50_ms: Some(3000), // sorted 2800 2900 3000 3200 4100, rank ceil(2.5) = 3
                latency_p95_ms: Some(4100), // rank ceil(4.75) = 5
                latency_sum_s: 16.0,        // 3000 + 3200 + 2900 + 4100 + 2800 + 0 ms
                budget: Some(BudgetSummary {
                    matched: BudgetKind::Tokens,
                    target_calls: 42,            // 9 · 4 + 6
                    target_tokens: Some(13_600), // 2900 + 3050 + 2750 + 3200 + 1700
                    actual_calls: 26,            // 6 + 6 + 5 + 6 + 3
                    actual_tokens: 13_300,       // 2850 + 3000 + 2650 + 3150 + 1650
                    mean_samples: 5.0,           // (6 + 6 + 5 + 5 + 3) / 5
                }),
                mean_score: None,
                mean_margin: None,
                pool: None,
            },
            ArmSummary {
                arm: Arm::Council,
                runs: 6,
                failed: 1, // arith-4
                skipped: 0,
                scored: 5,                     // all but essay-1
                correct: 3,                    // arith-1, arith-3, game24-1
                accuracy: Some(0.6),           // 3 / 5
                stderr: Some(0.048f64.sqrt()), // sqrt(0.6 · 0.4 / 5)
                parse_failures: 0,
                parse_failure_rate: Some(0.0), // 0 / 5
                consensus_rate: Some(0.5),     // T F T F: 2 / 4
                rounds: vec![
                    // T F F T F
                    round(0, 5, 2, Some(0.4), (0, 0)),
                    // T T T T: arith-2 F→T, arith-3 F→T
                    round(1, 4, 4, Some(1.0), (0, 2)),
                    // T F T T: arith-2 T→F
                    round(2, 4, 3, Some(0.75), (1, 0)),
                ],
                calls: 51,                   // 9 · 5 + 6
                failed_calls: 4,             // 1 + 3
                prompt_tokens: 12_400,       // 2000 + 2100 + 1900 + 2200 + 1200 + 3000
                cached_prompt_tokens: 9100,  // 1500 + 1600 + 1400 + 1700 + 900 + 2000
                completion_tokens: 6600,     // 900 + 950 + 850 + 1000 + 500 + 2400
                mean_calls: 8.5,             // 51 / 6
                mean_tokens: 19_000.0 / 6.0, // (12400 + 6600) / 6
                latency_p50_ms: Some(8000),  // sorted 4000 7800 8000 8500 9100 15000, rank 3
                latency_p95_ms: Some(15000), // rank 6
                latency_sum_s: 52.4,         // 8000 + 8500 + 7800 + 9100 + 4000 + 15000 ms
                budget: None,
                mean_score: Some(0.77),  // (0.9 + 0.6 + 0.8 + 0.7 + 0.85) / 5
                mean_margin: Some(0.21), // (0.3 + 0.05 + 0.2 + 0.1 + 0.4) / 5
                pool: None,
            },
        ]
    }

    /// (a, b, pairs, both, only a, only b, neither, difference, McNemar p) on the five scored
    /// items; p: b + c = 2 with min 0 gives 2 · 1/4 = 0.5, any split with min ≥ 1 or b + c = 1
    /// is capped at 1.
    #[allow(clippy::type_complexity)]
    const EXPECTED_COMPARISONS: [(Arm, Arm, u64, u64, u64, u64, u64, f64, f64); 6] = [
        (Arm::Single, Arm::SelfRefine, 5, 1, 0, 2, 2, -0.4, 0.5), // (0 - 2) / 5
        (Arm::Single, Arm::Majority, 5, 1, 0, 1, 3, -0.2, 1.0),   // (0 - 1) / 5
        (Arm::Single, Arm::Council, 5, 1, 0, 2, 2, -0.4, 0.5),    // (0 - 2) / 5
        (Arm::SelfRefine, Arm::Majority, 5, 2, 1, 0, 2, 0.2, 1.0), // (1 - 0) / 5
        (Arm::SelfRefine, Arm::Council, 5, 2, 1, 1, 1, 0.0, 1.0), // (1 - 1) / 5
        (Arm::Majority, Arm::Council, 5, 2, 0, 1, 2, -0.2, 1.0),  // (0 - 1) / 5
    ];

    #[test]
    fn accuracy_is_none_without_scored_runs() {
        assert_eq!(accuracy(0, 0), None);
    }

    #[test]
    fn accuracy_and_stderr_match_hand_values() {
        let (p, se) = accuracy(3, 4).expect("scored");
        assert_close(p, 0.75, "3/4");
        assert_close(se, 0.046_875f64.sqrt(), "sqrt(0.75 · 0.25 / 4)");
        let (p, se) = accuracy(1, 5).expect("scored");
        assert_close(p, 0.2, "1/5");
        assert_close(se, 0.032f64.sqrt(), "sqrt(0.2 · 0.8 / 5)");
        assert_eq!(accuracy(5, 5), Some((1.0, 0.0)));
        assert_eq!(accuracy(0, 5), Some((0.0, 0.0)));
    }

    #[test]
    fn mcnemar_small_cases_match_hand_values() {
        // 2 · (C(7,0) + C(7,1)) / 2^7 = 2 · 8 / 128
        assert_close(mcnemar_exact(1, 6), 0.125, "b=1 c=6");
        assert_close(mcnemar_exact(6, 1), 0.125, "b=6 c=1");
        // 2 · 1 / 2^3
        assert_close(mcnemar_exact(0, 3), 0.25, "b=0 c=3");
        // 2 · (1 + 10 + 45) / 2^10 = 112 / 1024
        assert_close(mcnemar_exact(2, 8), 0.109_375, "b=2 c=8");
        // 2 · 1 / 2^10
        assert_close(mcnemar_exact(10, 0), 2.0 / 1024.0, "b=10 c=0");
    }

    #[test]
    fn mcnemar_without_discordant_pairs_is_one() {
        assert_eq!(mcnemar_exact(0, 0), 1.0);
    }

    #[test]
    fn mcnemar_balanced_counts_are_capped_at_one() {
        // 2 · (1 + 10 + 45 + 120 + 210 + 252) / 1024 = 1276 / 1024 > 1
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        // 2 · (1 + 3) / 8 = 1
        assert_eq!(mcnemar_exact(1, 2), 1.0);
        // 2 · 1 / 2 = 1
        assert_eq!(mcnemar_exact(0, 1), 1.0);
    }

    #[test]
    fn mcnemar_large_counts_match_a_direct_sum() {
        let p = mcnemar_exact(100, 130);
        assert!(p.is_finite() && p > 0.0 && p < 1.0, "p = {p}");
        // Direct: C(230, k) by the product recurrence (C(230, 100) ≈ 1e67 and 2^230 ≈ 2e69
        // both fit an f64).
        let mut term = 1.0f64;
        let mut total = 1.0f64;
        for k in 0..100u32 {
            term = term * f64::from(230 - k) / f64::from(k + 1);
            total += term;
        }
        let direct = 2.0 * total / 2f64.powi(230);
        assert!((p - direct).abs() <= 1e-9 * direct, "{p} vs {direct}");
        // Normal approximation with continuity correction: z = 29 / sqrt(230) ≈ 1.91, p ≈ 0.056.
        assert!(p > 0.04 && p < 0.07, "p = {p}");
        assert_eq!(p, mcnemar_exact(130, 100));
    }

    #[test]
    fn mcnemar_very_large_counts_stay_finite() {
        // z = 5000 / sqrt(2_005_000) ≈ 3.53, two-sided p ≈ 4e-4.
        let p = mcnemar_exact(1_000_000, 1_005_000);
        assert!(p.is_finite() && p > 1e-4 && p < 1e-3, "p = {p}");
        // 2 · (1 + 5003 + …) / 2^5003 is far below the smallest f64.
        let tiny = mcnemar_exact(3, 5000);
        assert!(
            tiny.is_finite() && (0.0..1e-300).contains(&tiny),
            "p = {tiny}"
        );
        assert_eq!(mcnemar_exact(2_000_000, 2_000_000), 1.0);
    }

    #[test]
    fn percentile_of_empty_is_none() {
        assert_eq!(percentile_nearest_rank(&[], 50.0), None);
    }

    #[test]
    fn percentile_nearest_rank_matches_hand_ranks() {
        let tens: Vec<u64> = (1..=10).map(|i| i * 10).collect();
        assert_eq!(percentile_nearest_rank(&tens, 50.0), Some(50)); // rank 5
        assert_eq!(percentile_nearest_rank(&tens, 95.0), Some(100)); // rank ceil(9.5) = 10
        assert_eq!(percentile_nearest_rank(&tens, 10.0), Some(10)); // rank 1
        assert_eq!(percentile_nearest_rank(&tens, 11.0), Some(20)); // rank ceil(1.1) = 2
        assert_eq!(percentile_nearest_rank(&tens, 0.0), Some(10)); // the first
        assert_eq!(percentile_nearest_rank(&tens, 100.0), Some(100)); // rank 10
        assert_eq!(percentile_nearest_rank(&[7], 50.0), Some(7));
        let many: Vec<u64> = (0..2000).collect();
        assert_eq!(percentile_nearest_rank(&many, 2.5), Some(49)); // rank 50
        assert_eq!(percentile_nearest_rank(&many, 97.5), Some(1949)); // rank 1950
    }

    fn typical_pairs() -> Vec<(bool, bool)> {
        // 12 both, 10 only a, 4 only b, 4 neither: observed difference (10 - 4) / 30 = 0.2.
        let mut pairs = vec![(true, true); 12];
        pairs.extend([(true, false); 10]);
        pairs.extend([(false, true); 4]);
        pairs.extend([(false, false); 4]);
        pairs
    }

    #[test]
    fn bootstrap_is_deterministic_for_a_seed() {
        let pairs = typical_pairs();
        let first = bootstrap_difference(&pairs, 2000, 42);
        assert_eq!(first, bootstrap_difference(&pairs, 2000, 42));
        let others: Vec<_> = (43..48)
            .map(|seed| bootstrap_difference(&pairs, 2000, seed))
            .collect();
        assert!(others.iter().any(|other| *other != first), "{others:?}");
    }

    #[test]
    fn bootstrap_of_equal_pairs_is_zero() {
        assert_eq!(
            bootstrap_difference(&[(true, true); 10], 2000, 1),
            (0.0, 0.0)
        );
        assert_eq!(
            bootstrap_difference(&[(false, false); 3], 2000, 1),
            (0.0, 0.0)
        );
        let mixed = [(true, true), (false, false), (true, true)];
        assert_eq!(bootstrap_difference(&mixed, 2000, 1), (0.0, 0.0));
    }

    #[test]
    fn bootstrap_of_nothing_is_zero() {
        assert_eq!(bootstrap_difference(&[], 2000, 1), (0.0, 0.0));
        assert_eq!(bootstrap_difference(&typical_pairs(), 0, 1), (0.0, 0.0));
    }

    #[test]
    fn bootstrap_of_one_sided_pairs_is_degenerate() {
        assert_eq!(
            bootstrap_difference(&[(true, false); 8], 2000, 3),
            (1.0, 1.0)
        );
        assert_eq!(
            bootstrap_difference(&[(false, true); 8], 2000, 3),
            (-1.0, -1.0)
        );
    }

    #[test]
    fn bootstrap_interval_contains_the_observed_difference_and_is_ordered() {
        let pairs = typical_pairs();
        for seed in 0..5 {
            let (low, high) = bootstrap_difference(&pairs, 2000, seed);
            assert!(low < 0.2 && 0.2 < high, "seed {seed}: ({low}, {high})");
            assert!(low >= -1.0 && high <= 1.0, "seed {seed}: ({low}, {high})");
            // Differences are whole counts over n = 30.
            assert_close((low * 30.0).round(), low * 30.0, "low on the 1/30 grid");
            assert_close((high * 30.0).round(), high * 30.0, "high on the 1/30 grid");
        }
    }

    #[test]
    fn fixture_arms_match_hand_computed_figures() {
        let summary = summarize(&fixture_records(), run_info(), 11);
        assert_eq!(summary.run, run_info());
        let expected = expected_arms();
        let arms: Vec<Arm> = summary.arms.iter().map(|a| a.arm).collect();
        assert_eq!(arms, Arm::ALL.to_vec());
        for (actual, expected) in summary.arms.iter().zip(&expected) {
            assert_arm(actual, expected);
        }
    }

    #[test]
    fn fixture_comparisons_match_hand_computed_figures() {
        let summary = summarize(&fixture_records(), run_info(), 11);
        assert_eq!(summary.comparisons.len(), EXPECTED_COMPARISONS.len());
        for (c, e) in summary.comparisons.iter().zip(EXPECTED_COMPARISONS) {
            let what = format!("{} vs {}", e.0, e.1);
            assert_eq!((c.a, c.b), (e.0, e.1), "{what}");
            assert_eq!(c.pairs, e.2, "{what} pairs");
            assert_eq!(c.both_correct, e.3, "{what} both");
            assert_eq!(c.only_a, e.4, "{what} only a");
            assert_eq!(c.only_b, e.5, "{what} only b");
            assert_eq!(c.neither, e.6, "{what} neither");
            assert_close(c.difference, e.7, &format!("{what} difference"));
            assert_close(c.mcnemar_p, e.8, &format!("{what} p"));
            assert!(
                c.ci_low <= c.difference && c.difference <= c.ci_high,
                "{what}: {} not in ({}, {})",
                c.difference,
                c.ci_low,
                c.ci_high
            );
        }
    }

    #[test]
    fn fixture_bootstrap_intervals_repeat_for_a_seed() {
        let records = fixture_records();
        let intervals = |seed| {
            summarize(&records, run_info(), seed)
                .comparisons
                .iter()
                .map(|c| (c.ci_low, c.ci_high))
                .collect::<Vec<_>>()
        };
        assert_eq!(intervals(11), intervals(11));
        assert_eq!(intervals(11).len(), 6);
    }

    #[test]
    fn later_line_replaces_earlier_line_for_the_same_item_and_arm() {
        let mut first = record("x", Arm::Single, Some(true));
        first.calls = 100;
        let records = vec![
            first,
            record("y", Arm::Single, Some(true)),
            record("x", Arm::Council, Some(true)),
            record("x", Arm::Single, Some(false)),
        ];
        let summary = summarize(&records, run_info(), 0);
        let single = &summary.arms[0];
        assert_eq!(
            (single.arm, single.runs, single.correct),
            (Arm::Single, 2, 1)
        );
        assert_eq!(single.calls, 2);
        let comparison = &summary.comparisons[0];
        assert_eq!((comparison.pairs, comparison.only_b), (1, 1));
    }

    #[test]
    fn budget_target_tokens_is_none_when_a_run_lacks_it() {
        let budget = |target_tokens| Budget {
            matched: BudgetKind::Calls,
            target_calls: 4,
            target_tokens,
            samples: 4,
        };
        let mut a = record("a", Arm::Majority, Some(true));
        a.budget = Some(budget(Some(100)));
        let mut b = record("b", Arm::Majority, Some(true));
        b.budget = Some(budget(None));
        let no_budget = record("c", Arm::Majority, Some(false));
        let summary = summarize(&[a, b, no_budget], run_info(), 0);
        let budget = summary.arms[0].budget.as_ref().expect("budget");
        assert_eq!(budget.matched, BudgetKind::Calls);
        assert_eq!((budget.target_calls, budget.target_tokens), (8, None));
        // Only the two budgeted runs: 1 + 1 calls, 15 + 15 tokens.
        assert_eq!((budget.actual_calls, budget.actual_tokens), (2, 30));
        assert_close(budget.mean_samples, 4.0, "mean_samples");
    }

    #[test]
    fn arms_without_common_scored_items_are_not_compared() {
        let records = vec![
            record("a", Arm::Single, Some(true)),
            record("b", Arm::Council, Some(true)),
            record("a", Arm::Council, None),
        ];
        let summary = summarize(&records, run_info(), 0);
        assert_eq!(summary.arms.len(), 2);
        assert!(summary.comparisons.is_empty(), "{:?}", summary.comparisons);
    }

    #[test]
    fn the_pool_oracle_counts_what_picking_and_review_lost() {
        let pooled = |item: &str, correct: bool, first: bool, last: bool| {
            let mut r = record(item, Arm::Council, Some(correct));
            r.pool = Some(Pool { first, last });
            r
        };
        let mut failed = record("f", Arm::Council, Some(false));
        failed.status = RunStatus::Failed {
            reason: "quorum lost".into(),
        };
        let records = vec![
            pooled("a", true, true, true),
            // A right final answer was there; the judges picked another.
            pooled("b", false, true, true),
            // A right first answer was argued away in review.
            pooled("c", false, true, false),
            // Right only after review.
            pooled("d", true, false, true),
            pooled("e", false, false, false),
            // A failed run has no pool: it is not in the oracle's denominator.
            failed,
            record("s", Arm::Single, Some(true)),
        ];
        let summary = summarize(&records, run_info(), 0);
        let council = summary
            .arms
            .iter()
            .find(|a| a.arm == Arm::Council)
            .expect("council");
        let pool = council.pool.as_ref().expect("pool");
        assert_eq!(pool.runs, 5);
        assert_eq!((pool.first_correct, pool.last_correct), (3, 3));
        assert_close(pool.first_accuracy, 0.6, "first_accuracy");
        assert_close(pool.last_accuracy, 0.6, "last_accuracy");
        assert_eq!(pool.picked_correct, 2);
        assert_eq!((pool.lost_by_picking, pool.lost_in_review), (1, 1));
        // A one-answer arm has no pool.
        let single = summary
            .arms
            .iter()
            .find(|a| a.arm == Arm::Single)
            .expect("single");
        assert_eq!(single.pool, None);
    }

    #[test]
    fn empty_records_give_an_empty_summary() {
        let summary = summarize(&[], run_info(), 0);
        assert!(summary.arms.is_empty() && summary.comparisons.is_empty());
    }

    #[test]
    fn an_arm_of_skipped_runs_has_no_means_or_percentiles() {
        let mut skipped = record("a", Arm::Majority, None);
        skipped.status = RunStatus::Skipped {
            reason: "free-form".into(),
        };
        skipped.rounds = vec![RoundAnswer {
            round: 0,
            answer: None,
            correct: None,
        }];
        let summary = summarize(&[skipped], run_info(), 0);
        let arm = &summary.arms[0];
        assert_eq!((arm.runs, arm.skipped, arm.scored), (1, 1, 0));
        assert_eq!(
            (arm.accuracy, arm.stderr, arm.parse_failure_rate),
            (None, None, None)
        );
        assert_eq!((arm.mean_calls, arm.mean_tokens), (0.0, 0.0));
        assert_eq!((arm.latency_p50_ms, arm.latency_p95_ms), (None, None));
        assert_eq!(arm.rounds, vec![round(0, 0, 0, None, (0, 0))]);
    }
}
