//! What a deliberation returns: ranked proposals with their scores and history, the winner
//! and its margin, why it stopped, what it cost, and the full transcript.

use crate::checks::CheckReport;
use crate::ids::{AgentId, CouncilId, TaskId};
use crate::prompts::Message;
use crate::role::Role;

/// The phase a call belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Propose,
    Critique,
    Revise,
    Score,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Propose => "propose",
            Phase::Critique => "critique",
            Phase::Revise => "revise",
            Phase::Score => "score",
        }
    }
}

/// Why the rounds ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Every configured round ran.
    RoundsCompleted,
    /// Every agent gave the same final answer.
    Consensus,
    /// No revision changed any proposal.
    Converged,
    /// The same answer held an absolute majority before and after a round of critique: the
    /// leader survived its peers' review and majority voting will pick it.
    StableMajority,
    /// The token budget ran out; the deliberation ended with what it had.
    BudgetExhausted,
    /// Too few agents were left working.
    QuorumLost,
}

/// Token and call accounting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub calls: u64,
    pub failed_calls: u64,
    /// Of `failed_calls`, the judging calls (scores, rankings, choices): their votes are
    /// missing from the scores, never guessed.
    pub failed_judgements: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// How many judgements the deliberation asked for and how many it could read. A judgement that
/// cannot be read (a ranking line that does not parse, a score line missing, a choice without
/// log-probabilities) is counted here and left out of the scores, never guessed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Judging {
    /// Peer rankings asked for: one per judge that had at least two peers to order (with the
    /// log-prob judge, one ranking is read from the choices of every presentation order).
    pub rankings_asked: u64,
    pub rankings_read: u64,
    /// Rubric scores asked for: one per judge, peer and criterion.
    pub scores_asked: u64,
    pub scores_read: u64,
}

impl Judging {
    pub fn asked(&self) -> u64 {
        self.rankings_asked + self.scores_asked
    }

    pub fn read(&self) -> u64 {
        self.rankings_read + self.scores_read
    }
}

/// What put the winner first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Its combined score was strictly the highest.
    Score,
    /// It tied the runner-up on the combined score and won on the Copeland score of the
    /// peers' rankings.
    Condorcet,
    /// Nothing the judges said separated it from the runner-up: the seeded hash of the agent
    /// ids decided (deterministic, but not a judgement).
    TieBreak,
    /// It was the only proposal left.
    Alone,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Score => "score",
            Decision::Condorcet => "condorcet",
            Decision::TieBreak => "tie_break",
            Decision::Alone => "alone",
        }
    }
}

/// Scores of one proposal by method, each in [0, 1]; `None` where the method did not run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MethodScores {
    /// Borda count of the peers' rankings.
    pub peer_ranking: Option<f64>,
    /// Copeland score of the same rankings (the Condorcet tie-break).
    pub condorcet: Option<f64>,
    pub rubric: Option<f64>,
    /// 1 when the proposal's answer is the majority answer, 0 otherwise.
    pub majority: Option<f64>,
    pub checks: Option<f64>,
}

/// One agent's final proposal, ranked.
#[derive(Debug, Clone, PartialEq)]
pub struct RankedProposal {
    pub agent: AgentId,
    pub role: Role,
    pub content: String,
    /// Earlier versions, oldest first.
    pub revisions: Vec<String>,
    /// 1 is best.
    pub rank: u32,
    pub score: f64,
    pub scores: MethodScores,
    pub answer: Option<String>,
    pub checks: Vec<CheckReport>,
    /// Step (0-based) at which the final content was produced; for timestamps in the runtime.
    pub round: u32,
}

/// An agent that dropped out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedAgent {
    pub agent: AgentId,
    pub phase: Phase,
    pub round: u32,
    pub reason: String,
    /// The backend failed the call with a transient error (overload, a server down): another
    /// try may succeed where this one did not. A deliberation is deterministic for its task,
    /// so an empty or unusable reply, or a permanent error, would come again.
    pub backend: bool,
}

/// One call as it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRecord {
    pub call: u64,
    pub agent: AgentId,
    pub phase: Phase,
    pub round: u32,
    pub messages: Vec<Message>,
    pub reply: Result<String, String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Whether the deliberation produced a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutcomeStatus {
    Completed,
    Failed { reason: String },
}

/// The result of a deliberation.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub task: TaskId,
    pub council: CouncilId,
    pub status: OutcomeStatus,
    /// Best first.
    pub proposals: Vec<RankedProposal>,
    pub winner: Option<AgentId>,
    /// What put the winner first; `None` without a winner.
    pub decided_by: Option<Decision>,
    /// Judgements asked for and read.
    pub judging: Judging,
    /// Probability that the winner beats the runner-up (Bradley-Terry on combined scores).
    pub margin: Option<f64>,
    pub stop_reason: StopReason,
    pub rounds_run: u32,
    pub majority_answer: Option<String>,
    pub failed_agents: Vec<FailedAgent>,
    pub usage: Usage,
    pub transcript: Vec<CallRecord>,
}

/// Something worth telling a watcher while a deliberation runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    PhaseStarted {
        phase: Phase,
        round: u32,
        calls: usize,
    },
    AgentDone {
        agent: AgentId,
        phase: Phase,
        round: u32,
        ok: bool,
    },
    PhaseFinished {
        phase: Phase,
        round: u32,
    },
    ScoresReady,
}
