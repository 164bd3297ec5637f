//! One line of `results.jsonl`: what one arm did on one item. The statistics are computed from
//! these lines alone, so a results file (complete, partial or resumed) is the whole record.

use serde::{Deserialize, Serialize};

/// The compared ways of spending compute on an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arm {
    /// One agent, one answer.
    Single,
    /// One agent critiques and revises its own answer for R rounds.
    SelfRefine,
    /// Independent samples, majority vote over their answers, budget matched to the council.
    Majority,
    /// The council: propose, critique and revise rounds, score and rank.
    Council,
}

impl Arm {
    pub const ALL: [Arm; 4] = [Arm::Single, Arm::SelfRefine, Arm::Majority, Arm::Council];

    pub fn as_str(self) -> &'static str {
        match self {
            Arm::Single => "single",
            Arm::SelfRefine => "self_refine",
            Arm::Majority => "majority",
            Arm::Council => "council",
        }
    }
}

impl std::str::FromStr for Arm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Arm::ALL
            .into_iter()
            .find(|a| a.as_str() == s || (s == "self-refine" && *a == Arm::SelfRefine))
            .ok_or_else(|| {
                format!("unknown arm {s:?}: expected single, self_refine, majority or council")
            })
    }
}

impl std::fmt::Display for Arm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an arm's run on an item ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum RunStatus {
    /// It produced a final answer or proposal (which may still be unparseable or wrong).
    Ok,
    /// It could not produce one (every call failed, quorum lost): counted wrong when scored.
    Failed { reason: String },
    /// The arm does not apply to the item (majority vote on a task without an answer format).
    Skipped { reason: String },
}

/// The arm's answer after one round (round 0 = the first answers, before any review).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundAnswer {
    pub round: u32,
    /// Council and majority: the plurality answer of the current proposals; self-refine: the
    /// agent's answer after the round. `None` when none parsed.
    pub answer: Option<String>,
    /// `None` when the item has no expected answer.
    pub correct: Option<bool>,
}

/// The compute a majority-vote run was asked to match, and what it spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// What was matched: "tokens" or "calls".
    pub matched: BudgetKind,
    /// The council's calls and total tokens on this item (or its planned calls when the
    /// council arm did not run).
    pub target_calls: u64,
    pub target_tokens: Option<u64>,
    /// Samples drawn.
    pub samples: u64,
}

/// Which budget the majority arm matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetKind {
    Tokens,
    Calls,
}

/// Whether some answer of a run's pool was right, before and after review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub first: bool,
    pub last: bool,
}

/// One line of `results.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRecord {
    pub item: String,
    pub suite: String,
    pub arm: Arm,
    pub status: RunStatus,
    /// `Expected::describe` of the item's expected answer; `None` for free-form items.
    pub expected: Option<String>,
    /// The arm's final answer as extracted; `None` when it did not parse (or no format).
    pub answer: Option<String>,
    /// `None` for free-form items and skipped runs; a parse failure or a failed run is `false`.
    pub correct: Option<bool>,
    /// The item declares an answer format and the final answer could not be extracted.
    pub parse_failed: bool,
    /// Answers after each round, from round 0.
    pub rounds: Vec<RoundAnswer>,
    /// The pool oracle: some answer the run had in hand was right. Council: some agent's
    /// first-round answer (`first`) and some agent's final answer (`last`); majority: some
    /// sample's answer (both). `None` for one-answer arms, free-form items and failed runs.
    /// Beside `correct`, it shows what picking lost (a wrong winner while a right answer was
    /// there) and what revision lost (right first answers argued away).
    #[serde(default)]
    pub pool: Option<Pool>,
    /// Every final answer of the run was the same, parsed answer (council agents, majority
    /// samples); `None` for one-answer arms and free-form items.
    pub consensus: Option<bool>,
    pub calls: u64,
    pub failed_calls: u64,
    pub prompt_tokens: u64,
    /// Prompt tokens whose KV the backend served from its cache.
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Wall time of this arm on this item, from its first call to its last reply.
    pub latency_ms: u64,
    /// Majority vote only: the budget it matched.
    pub budget: Option<Budget>,
    /// Council only: the winner's combined score and its margin over the runner-up.
    pub score: Option<f64>,
    pub margin: Option<f64>,
    /// Path of the call transcript, relative to the output directory.
    pub transcript: Option<String>,
}

impl ResultRecord {
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}
