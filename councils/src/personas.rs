//! Who each role is and what it looks for in a review, and the default councils built from them.

use crate::ids::{AgentId, CouncilId};
use crate::role::Role;
use crate::spec::{AgentSampling, AgentSpec, CouncilSpec, DeliberationConfig, SpecError};

/// A role's standing brief: who it is, and what it checks when it reviews a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleBrief {
    pub identity: &'static str,
    pub review_focus: &'static str,
    /// Three angles that make agents of one council think differently.
    pub angles: [&'static str; 3],
}

pub fn brief(role: &Role) -> RoleBrief {
    match role {
        Role::Dev => RoleBrief {
            identity: "a software developer who ships working, readable code",
            review_focus: "whether the code would compile and run, handles edge cases and errors, and is simple enough to maintain",
            angles: [
                "You favour the smallest change that fully solves the problem.",
                "You think first about failure modes: bad input, partial failure, concurrency.",
                "You care about the next reader: names, structure and tests that explain the code.",
            ],
        },
        Role::Qa => RoleBrief {
            identity: "a quality engineer who finds what breaks before users do",
            review_focus: "missing test cases, unverifiable claims, untested error paths and whether acceptance criteria can actually be checked",
            angles: [
                "You hunt for boundary values and malformed input.",
                "You ask how each claim would be verified automatically.",
                "You think about regressions: what existing behaviour could this change break?",
            ],
        },
        Role::Architect => RoleBrief {
            identity: "a software architect who shapes systems that stay changeable",
            review_focus: "module boundaries, ownership of state, coupling, failure isolation and whether the design fits the stated constraints",
            angles: [
                "You weigh every dependency and every shared piece of state.",
                "You look for the simplest structure that will survive the next two requirements.",
                "You check the design against scale, latency and cost constraints.",
            ],
        },
        Role::Devops => RoleBrief {
            identity: "an operations engineer who runs services in production",
            review_focus: "deployability, configuration, observability, rollback, resource limits and what happens during restarts and upgrades",
            angles: [
                "You plan for the 3 a.m. incident: logs, metrics and a safe rollback.",
                "You look for anything that breaks during a rolling update or a restart.",
                "You watch resource usage, limits and cost.",
            ],
        },
        Role::Data => RoleBrief {
            identity: "a data engineer who keeps numbers trustworthy",
            review_focus: "data correctness, validation, schema evolution, lineage, and what is lost or duplicated when a step fails",
            angles: [
                "You trace every number back to its source.",
                "You ask what happens to data on retries, duplicates and partial failures.",
                "You check schemas, types and units at every boundary.",
            ],
        },
        Role::Custom(_) => RoleBrief {
            identity: "a specialist in this council's field",
            review_focus: "correctness, completeness against the requirements, risks, and clarity",
            angles: [
                "You favour precise, verifiable statements.",
                "You look for what could go wrong.",
                "You check every requirement is met.",
            ],
        },
    }
}

/// Temperatures of the three default agents: one careful, two exploring.
const DEFAULT_TEMPERATURES: [f32; 3] = [0.3, 0.7, 0.9];

/// The default council of `role`: three agents that differ by angle, temperature and seed.
pub fn default_council(role: &Role) -> Result<CouncilSpec, SpecError> {
    council_of(role, 3)
}

/// A council of `size` agents of `role`; angles and temperatures cycle, seeds count from 1.
pub fn council_of(role: &Role, size: usize) -> Result<CouncilSpec, SpecError> {
    let b = brief(role);
    let lower = role.as_str().to_ascii_lowercase();
    let agents = (0..size)
        .map(|i| {
            let id =
                AgentId::new(format!("{lower}-{}", i + 1)).map_err(|e| SpecError::Invalid {
                    field: "agents.id",
                    reason: e.to_string(),
                })?;
            Ok(AgentSpec {
                id,
                role: role.clone(),
                persona: b.angles[i % b.angles.len()].to_owned(),
                sampling: AgentSampling {
                    temperature: DEFAULT_TEMPERATURES[i % DEFAULT_TEMPERATURES.len()],
                    top_p: 0.95,
                    seed: 1 + i as u64,
                },
                model_profile: "default".to_owned(),
            })
        })
        .collect::<Result<Vec<_>, SpecError>>()?;
    let id = CouncilId::new(format!("council-{lower}")).map_err(|e| SpecError::Invalid {
        field: "id",
        reason: e.to_string(),
    })?;
    CouncilSpec::new(id, role.clone(), agents, DeliberationConfig::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_role_has_a_distinct_brief_and_a_default_council() {
        let briefs: Vec<RoleBrief> = Role::BUILT_IN.iter().map(brief).collect();
        for (i, a) in briefs.iter().enumerate() {
            for b in &briefs[i + 1..] {
                assert_ne!(a.identity, b.identity);
                assert_ne!(a.review_focus, b.review_focus);
            }
        }
        for role in Role::BUILT_IN {
            let council = default_council(&role).expect("valid default council");
            assert_eq!(council.agents.len(), 3);
            let seeds: Vec<u64> = council.agents.iter().map(|a| a.sampling.seed).collect();
            assert_eq!(seeds, vec![1, 2, 3]);
            assert!(council.agents.iter().all(|a| a.role == role));
        }
    }
}
