//! The numbers of a run, per arm and between arms: what `summary.json` holds and what the report
//! and the plots are drawn from. Computed by `stats::summarize` from the result lines alone.

use serde::{Deserialize, Serialize};

use super::record::{Arm, BudgetKind};

/// How the run was set up (echoed into the summary and the report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// Model name (repo id or directory) and backend ("engine" / "vllm").
    pub model: String,
    pub backend: String,
    /// Suite name, or the task file's path.
    pub source: String,
    pub seed: u64,
    /// Items selected for the run.
    pub items: u64,
    pub arms: Vec<Arm>,
    pub agents: u64,
    pub rounds: u32,
    pub refine_rounds: u32,
    pub vote_match: BudgetKind,
    pub max_tokens_per_call: u32,
    /// Whole run wall time in seconds (this invocation; a resumed run adds its own).
    pub wall_time_s: f64,
    /// Every item × arm has a result line.
    pub complete: bool,
}

/// One arm's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmSummary {
    pub arm: Arm,
    /// Result lines of this arm (including failed and skipped runs).
    pub runs: u64,
    pub failed: u64,
    pub skipped: u64,
    /// Runs with an expected answer (failed ones included, counted wrong).
    pub scored: u64,
    pub correct: u64,
    /// correct / scored; `None` when nothing was scored.
    pub accuracy: Option<f64>,
    /// Standard error of the accuracy, sqrt(p (1 - p) / n).
    pub stderr: Option<f64>,
    /// Scored runs whose final answer did not parse (counted wrong), and their share of `scored`.
    pub parse_failures: u64,
    pub parse_failure_rate: Option<f64>,
    /// Share of runs with a consensus value that reached consensus.
    pub consensus_rate: Option<f64>,
    /// Accuracy after each round, with the flips from the round before.
    pub rounds: Vec<RoundSummary>,
    pub calls: u64,
    pub failed_calls: u64,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Means per run (not skipped).
    pub mean_calls: f64,
    pub mean_tokens: f64,
    /// Per-run latency percentiles (nearest-rank), milliseconds.
    pub latency_p50_ms: Option<u64>,
    pub latency_p95_ms: Option<u64>,
    /// Sum of per-run latencies, seconds (runs overlap, so this exceeds the run's wall time).
    pub latency_sum_s: f64,
    /// Majority vote: the council budget it was matched to (sums over runs) and what it spent.
    pub budget: Option<BudgetSummary>,
    /// Council: mean winner score and margin (the free-form measure).
    pub mean_score: Option<f64>,
    pub mean_margin: Option<f64>,
    /// Council and majority: the pool oracle beside the arm's accuracy.
    pub pool: Option<PoolSummary>,
}

/// How often a right answer was in a run's pool, and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSummary {
    /// Scored runs that had a pool (council, majority; failed runs have none).
    pub runs: u64,
    /// Runs where some first answer was right, and their share of `runs`.
    pub first_correct: u64,
    pub first_accuracy: f64,
    /// Runs where some final answer was right, and their share of `runs`.
    pub last_correct: u64,
    pub last_accuracy: f64,
    /// Of these runs, those whose chosen answer was right.
    pub picked_correct: u64,
    /// Runs with a right final answer in the pool whose chosen answer was wrong: lost by
    /// picking (a bad judge, a wrong majority).
    pub lost_by_picking: u64,
    /// Runs with a right first answer and no right final one: lost in review (conformity).
    pub lost_in_review: u64,
}

/// Accuracy after one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    pub round: u32,
    /// Runs with a scored answer at this round.
    pub scored: u64,
    pub correct: u64,
    pub accuracy: Option<f64>,
    /// Runs correct at round - 1 and wrong at this round (0 at round 0).
    pub correct_to_wrong: u64,
    /// Runs wrong at round - 1 and correct at this round (0 at round 0).
    pub wrong_to_correct: u64,
}

/// The matched budget of the majority arm against what it actually spent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetSummary {
    pub matched: BudgetKind,
    pub target_calls: u64,
    pub target_tokens: Option<u64>,
    pub actual_calls: u64,
    pub actual_tokens: u64,
    pub mean_samples: f64,
}

/// A paired comparison of two arms on the items both scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub a: Arm,
    pub b: Arm,
    /// Items scored by both arms.
    pub pairs: u64,
    pub both_correct: u64,
    pub only_a: u64,
    pub only_b: u64,
    pub neither: u64,
    /// accuracy(a) - accuracy(b) on the paired items.
    pub difference: f64,
    /// Exact two-sided McNemar test (binomial on the discordant pairs); 1.0 when there are none.
    pub mcnemar_p: f64,
    /// 95 % paired bootstrap interval of the difference (percentile, seeded).
    pub ci_low: f64,
    pub ci_high: f64,
}

/// Everything `summary.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub run: RunInfo,
    pub arms: Vec<ArmSummary>,
    pub comparisons: Vec<Comparison>,
}
