//! What a deliberation is made of: agents, councils, tasks and the deliberation config, each
//! validated on construction so the state machine never sees a bad one.

use crate::ids::{AgentId, CouncilId, TaskId};
use crate::parse::AnswerFormat;
use crate::role::Role;

/// Sampling of one agent's calls. `temperature == 0` is greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AgentSampling {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

/// One member of a council.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSpec {
    pub id: AgentId,
    pub role: Role,
    /// The agent's angle on its role, in its own words; shown to the agent only.
    pub persona: String,
    pub sampling: AgentSampling,
    /// Which model profile serves this agent (the runtime maps profiles to backends).
    pub model_profile: String,
}

/// Why a spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// A council: agents of one role and its default deliberation config.
#[derive(Debug, Clone, PartialEq)]
pub struct CouncilSpec {
    pub id: CouncilId,
    pub role: Role,
    pub agents: Vec<AgentSpec>,
    pub config: DeliberationConfig,
}

impl CouncilSpec {
    pub const MAX_AGENTS: usize = 16;

    pub fn new(
        id: CouncilId,
        role: Role,
        agents: Vec<AgentSpec>,
        config: DeliberationConfig,
    ) -> Result<Self, SpecError> {
        if agents.is_empty() || agents.len() > Self::MAX_AGENTS {
            return Err(invalid(
                "agents",
                format!("need 1..={} agents, got {}", Self::MAX_AGENTS, agents.len()),
            ));
        }
        for (i, a) in agents.iter().enumerate() {
            if agents[..i].iter().any(|b| b.id == a.id) {
                return Err(invalid(
                    "agents",
                    format!("agent id {} appears twice", a.id),
                ));
            }
            if !(a.sampling.temperature.is_finite() && a.sampling.temperature >= 0.0) {
                return Err(invalid(
                    "agents.sampling.temperature",
                    format!("{} for {}", a.sampling.temperature, a.id),
                ));
            }
            if !(a.sampling.top_p > 0.0 && a.sampling.top_p <= 1.0) {
                return Err(invalid(
                    "agents.sampling.top_p",
                    format!("{} for {}", a.sampling.top_p, a.id),
                ));
            }
        }
        config.validate()?;
        Ok(Self {
            id,
            role,
            agents,
            config,
        })
    }
}

/// What the council is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: TaskId,
    pub description: String,
    /// Free-text rubric; each non-empty line (or `;`-separated item) is a criterion.
    pub rubric: String,
    pub requirements: Vec<String>,
    pub metadata: Vec<(String, String)>,
    /// When set, every proposal must end with a final answer of this form.
    pub answer_format: Option<AnswerFormat>,
}

impl Task {
    pub const MAX_DESCRIPTION: usize = 32 * 1024;
    pub const MAX_RUBRIC: usize = 8 * 1024;
    pub const MAX_REQUIREMENTS: usize = 32;
    pub const MAX_REQUIREMENT: usize = 1024;

    pub fn new(id: TaskId, description: impl Into<String>) -> Result<Self, SpecError> {
        let task = Self {
            id,
            description: description.into(),
            rubric: String::new(),
            requirements: Vec::new(),
            metadata: Vec::new(),
            answer_format: None,
        };
        task.validate()?;
        Ok(task)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        if self.description.trim().is_empty() {
            return Err(invalid("description", "empty"));
        }
        if self.description.len() > Self::MAX_DESCRIPTION {
            return Err(invalid(
                "description",
                format!(
                    "{} bytes, limit {}",
                    self.description.len(),
                    Self::MAX_DESCRIPTION
                ),
            ));
        }
        if self.rubric.len() > Self::MAX_RUBRIC {
            return Err(invalid(
                "rubric",
                format!("{} bytes, limit {}", self.rubric.len(), Self::MAX_RUBRIC),
            ));
        }
        if self.requirements.len() > Self::MAX_REQUIREMENTS {
            return Err(invalid(
                "requirements",
                format!(
                    "{} items, limit {}",
                    self.requirements.len(),
                    Self::MAX_REQUIREMENTS
                ),
            ));
        }
        if let Some(r) = self
            .requirements
            .iter()
            .find(|r| r.len() > Self::MAX_REQUIREMENT || r.trim().is_empty())
        {
            return Err(invalid(
                "requirements",
                format!(
                    "an item is empty or over {} bytes: {:.40}",
                    Self::MAX_REQUIREMENT,
                    r
                ),
            ));
        }
        Ok(())
    }

    /// Rubric criteria: lines or `;`-separated items of the rubric, trimmed of list markers.
    pub fn criteria(&self) -> Vec<String> {
        self.rubric
            .split(['\n', ';'])
            .map(|c| c.trim().trim_start_matches(['-', '*', '•']).trim())
            .map(|c| c.split(':').next().unwrap_or(c).trim().to_owned())
            .filter(|c| !c.is_empty())
            .take(8)
            .collect()
    }
}

/// Which peers' proposals a reviewer sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// Every other agent's proposal.
    All,
    /// The next agent's proposal only (agent i reviews agent i+1).
    Ring,
    /// `peers` other proposals, chosen per reviewer and round from the seeded RNG.
    Sparse { peers: usize },
}

/// Weights of the scoring methods; methods that did not run are left out and the rest renormalised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoringWeights {
    pub peer_ranking: f64,
    pub rubric: f64,
    pub majority: f64,
    pub checks: f64,
}

impl Default for ScoringWeights {
    fn default() -> Self {
        Self {
            peer_ranking: 0.4,
            rubric: 0.3,
            majority: 0.2,
            checks: 0.1,
        }
    }
}

/// How rubric criteria are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JudgeMode {
    /// Scores written in the reply and parsed.
    Text,
    /// Expected value of the log-probabilities of "1".."10" (needs a backend that scores choices).
    LogProb,
}

/// How many agents must still be working for the deliberation to go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quorum {
    /// More than half of the council.
    Majority,
    AtLeast(usize),
}

impl Quorum {
    pub fn required(self, agents: usize) -> usize {
        match self {
            Quorum::Majority => agents / 2 + 1,
            Quorum::AtLeast(n) => n.min(agents),
        }
    }
}

/// How one deliberation runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeliberationConfig {
    /// Critique-and-revise rounds, honoured exactly unless an early stop fires.
    pub rounds: u32,
    pub visibility: Visibility,
    pub weights: ScoringWeights,
    pub judge: JudgeMode,
    /// Stop rounds early when every agent gives the same final answer (answer tasks) or no
    /// revision changed any proposal.
    pub early_stop: bool,
    /// Total tokens (prompt + completion) the deliberation may spend; `None` for no limit.
    pub token_budget: Option<u64>,
    pub max_tokens_per_call: u32,
    pub quorum: Quorum,
}

impl DeliberationConfig {
    pub const MAX_ROUNDS: u32 = 10;

    pub fn validate(&self) -> Result<(), SpecError> {
        if self.rounds > Self::MAX_ROUNDS {
            return Err(invalid(
                "rounds",
                format!("{} (0..={})", self.rounds, Self::MAX_ROUNDS),
            ));
        }
        if self.max_tokens_per_call == 0 {
            return Err(invalid("max_tokens_per_call", "must be at least 1"));
        }
        if let Visibility::Sparse { peers: 0 } = self.visibility {
            return Err(invalid(
                "visibility",
                "sparse visibility needs at least one peer",
            ));
        }
        let w = self.weights;
        let all = [w.peer_ranking, w.rubric, w.majority, w.checks];
        if all.iter().any(|x| !x.is_finite() || *x < 0.0) || all.iter().sum::<f64>() <= 0.0 {
            return Err(invalid(
                "weights",
                "weights must be finite, >= 0, and not all 0",
            ));
        }
        if let Quorum::AtLeast(0) = self.quorum {
            return Err(invalid("quorum", "must be at least 1"));
        }
        Ok(())
    }
}

impl Default for DeliberationConfig {
    fn default() -> Self {
        Self {
            rounds: 1,
            visibility: Visibility::All,
            weights: ScoringWeights::default(),
            judge: JudgeMode::Text,
            early_stop: true,
            token_budget: None,
            max_tokens_per_call: 512,
            quorum: Quorum::Majority,
        }
    }
}
