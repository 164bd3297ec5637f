//! Persisted form of councils (domain types carry no serialisation format), shared by every
//! store backend.

use council_councils::spec::{
    AgentSampling, DeliberationConfig, JudgeMode, Quorum, ScoringWeights, Visibility,
};
use council_councils::{AgentId, AgentSpec, CouncilId, CouncilSpec, Role};
use serde::{Deserialize, Serialize};

/// Persisted form of a council (domain types carry no serialisation format).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CouncilDto {
    id: String,
    role: String,
    agents: Vec<AgentDto>,
    config: ConfigDto,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AgentDto {
    id: String,
    role: String,
    persona: String,
    temperature: f32,
    top_p: f32,
    seed: u64,
    model_profile: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ConfigDto {
    rounds: u32,
    /// "all", "ring" or "sparse:N".
    visibility: String,
    weights: [f64; 4],
    /// "text" or "logprob".
    judge: String,
    early_stop: bool,
    token_budget: Option<u64>,
    max_tokens_per_call: u32,
    /// "majority" or "at_least:N".
    quorum: String,
}

impl From<&CouncilSpec> for CouncilDto {
    fn from(s: &CouncilSpec) -> Self {
        let c = &s.config;
        let w = c.weights;
        Self {
            id: s.id.to_string(),
            role: s.role.to_string(),
            agents: s
                .agents
                .iter()
                .map(|a| AgentDto {
                    id: a.id.to_string(),
                    role: a.role.to_string(),
                    persona: a.persona.clone(),
                    temperature: a.sampling.temperature,
                    top_p: a.sampling.top_p,
                    seed: a.sampling.seed,
                    model_profile: a.model_profile.clone(),
                })
                .collect(),
            config: ConfigDto {
                rounds: c.rounds,
                visibility: match c.visibility {
                    Visibility::All => "all".into(),
                    Visibility::Ring => "ring".into(),
                    Visibility::Sparse { peers } => format!("sparse:{peers}"),
                },
                weights: [w.peer_ranking, w.rubric, w.majority, w.checks],
                judge: match c.judge {
                    JudgeMode::Text => "text".into(),
                    JudgeMode::LogProb => "logprob".into(),
                },
                early_stop: c.early_stop,
                token_budget: c.token_budget,
                max_tokens_per_call: c.max_tokens_per_call,
                quorum: match c.quorum {
                    Quorum::Majority => "majority".into(),
                    Quorum::AtLeast(n) => format!("at_least:{n}"),
                },
            },
        }
    }
}

impl CouncilDto {
    pub fn into_spec(self) -> Result<CouncilSpec, String> {
        let c = &self.config;
        let visibility = match c.visibility.as_str() {
            "all" => Visibility::All,
            "ring" => Visibility::Ring,
            other => match other.strip_prefix("sparse:").and_then(|n| n.parse().ok()) {
                Some(peers) => Visibility::Sparse { peers },
                None => return Err(format!("visibility {other:?}")),
            },
        };
        let judge = match c.judge.as_str() {
            "text" => JudgeMode::Text,
            "logprob" => JudgeMode::LogProb,
            other => return Err(format!("judge {other:?}")),
        };
        let quorum = match c.quorum.as_str() {
            "majority" => Quorum::Majority,
            other => match other.strip_prefix("at_least:").and_then(|n| n.parse().ok()) {
                Some(n) => Quorum::AtLeast(n),
                None => return Err(format!("quorum {other:?}")),
            },
        };
        let [peer_ranking, rubric, majority, checks] = c.weights;
        let config = DeliberationConfig {
            rounds: c.rounds,
            visibility,
            weights: ScoringWeights {
                peer_ranking,
                rubric,
                majority,
                checks,
            },
            judge,
            early_stop: c.early_stop,
            token_budget: c.token_budget,
            max_tokens_per_call: c.max_tokens_per_call,
            quorum,
        };
        let agents = self
            .agents
            .into_iter()
            .map(|a| {
                Ok(AgentSpec {
                    id: AgentId::new(a.id).map_err(|e| e.to_string())?,
                    role: a
                        .role
                        .parse()
                        .map_err(|e: council_councils::RoleError| e.to_string())?,
                    persona: a.persona,
                    sampling: AgentSampling {
                        temperature: a.temperature,
                        top_p: a.top_p,
                        seed: a.seed,
                    },
                    model_profile: a.model_profile,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let role: Role = self
            .role
            .parse()
            .map_err(|e: council_councils::RoleError| e.to_string())?;
        CouncilSpec::new(
            CouncilId::new(self.id).map_err(|e| e.to_string())?,
            role,
            agents,
            config,
        )
        .map_err(|e| e.to_string())
    }
}
