//! The outcome of a run as the stored (and answered) `DeliberateResponse`, and records as
//! `GetDeliberationResult` answers.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use council_councils::CouncilSpec;
use council_councils::checks::{CheckReport, CheckStatus};
use council_councils::outcome::{Outcome, Phase, RankedProposal, StopReason};
use council_proto::council::store::v1::DeliberationRecord;
use council_proto::fleet::orchestrator::v1 as pb;

use crate::driver::Timeline;

pub fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn stop_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::RoundsCompleted => "rounds_completed",
        StopReason::Consensus => "consensus",
        StopReason::StableMajority => "stable_majority",
        StopReason::Converged => "converged",
        StopReason::BudgetExhausted => "budget_exhausted",
        StopReason::QuorumLost => "quorum_lost",
    }
}

fn check_result(r: &CheckReport) -> pb::CheckResult {
    let (passed, status, message) = match &r.status {
        CheckStatus::Passed => (true, "passed", String::new()),
        CheckStatus::Failed { reason } => (false, "failed", reason.clone()),
        CheckStatus::Skipped { reason } => (false, "skipped", reason.clone()),
    };
    pb::CheckResult {
        check_type: r.name.clone(),
        passed,
        score: if passed { 1.0 } else { 0.0 },
        message,
        details: HashMap::from([("status".to_owned(), status.to_owned())]),
    }
}

/// The checks as upstream's `CheckSuite`. Policy, lint and dry-run do not run on this service:
/// they are left unset (absent = not run, which no client can read as a failed check with zero
/// errors). `all_passed` means no check that ran failed; the checks that ran, or were skipped,
/// are in `additional_checks` with `details["status"]` = passed / failed / skipped.
fn check_suite(p: &RankedProposal) -> pb::CheckSuite {
    let additional: Vec<pb::CheckResult> = p.checks.iter().map(check_result).collect();
    pb::CheckSuite {
        policy: None,
        lint: None,
        dryrun: None,
        all_passed: !p
            .checks
            .iter()
            .any(|c| matches!(c.status, CheckStatus::Failed { .. })),
        additional_checks: additional,
    }
}

fn created_at(p: &RankedProposal, timeline: &Timeline) -> i64 {
    let phase = if p.round == 0 {
        Phase::Propose
    } else {
        Phase::Revise
    };
    timeline
        .iter()
        .find(|(ph, r, _)| *ph == phase && *r == p.round)
        .map_or(0, |(_, _, t)| millis(*t))
}

pub fn result(p: &RankedProposal, timeline: &Timeline) -> pb::DeliberationResult {
    pb::DeliberationResult {
        proposal: Some(pb::Proposal {
            author_id: p.agent.to_string(),
            author_role: p.role.to_string(),
            content: p.content.clone(),
            created_at_ms: created_at(p, timeline),
            revisions: p.revisions.clone(),
        }),
        checks: Some(check_suite(p)),
        score: p.score,
        rank: p.rank as i32,
        method_scores: Some(pb::MethodScores {
            peer_ranking: p.scores.peer_ranking,
            condorcet: p.scores.condorcet,
            rubric: p.scores.rubric,
            majority: p.scores.majority,
            checks: p.scores.checks,
        }),
        answer: p.answer.clone().unwrap_or_default(),
    }
}

pub fn summary(o: &Outcome) -> pb::DeliberationSummary {
    pb::DeliberationSummary {
        margin: o.margin.unwrap_or(0.0),
        stop_reason: stop_reason(o.stop_reason).to_owned(),
        rounds_run: o.rounds_run as i32,
        majority_answer: o.majority_answer.clone().unwrap_or_default(),
        calls: o.usage.calls as i64,
        failed_calls: o.usage.failed_calls as i64,
        failed_judgements: o.usage.failed_judgements as i64,
        rankings_asked: o.judging.rankings_asked as i64,
        rankings_read: o.judging.rankings_read as i64,
        scores_asked: o.judging.scores_asked as i64,
        scores_read: o.judging.scores_read as i64,
        decided_by: o
            .decided_by
            .map(|d| d.as_str().to_owned())
            .unwrap_or_default(),
        prompt_tokens: o.usage.prompt_tokens as i64,
        completion_tokens: o.usage.completion_tokens as i64,
        failed_agents: o
            .failed_agents
            .iter()
            .map(|f| pb::FailedAgent {
                agent_id: f.agent.to_string(),
                phase: f.phase.as_str().to_owned(),
                round: f.round as i32,
                reason: f.reason.clone(),
            })
            .collect(),
    }
}

/// The response of a completed deliberation.
pub fn response(
    task_id: &str,
    outcome: &Outcome,
    timeline: &Timeline,
    duration: Duration,
    seed: u64,
) -> pb::DeliberateResponse {
    pb::DeliberateResponse {
        task_id: task_id.to_owned(),
        results: outcome
            .proposals
            .iter()
            .map(|p| result(p, timeline))
            .collect(),
        winner_id: outcome
            .winner
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        duration_ms: duration.as_millis() as i64,
        metadata: Some(pb::OrchestratorMetadata {
            orchestrator_version: env!("CARGO_PKG_VERSION").to_owned(),
            timestamp_ms: millis(SystemTime::now()),
            execution_id: format!("{}-{seed:016x}", outcome.task),
            tags: HashMap::from([
                ("council_id".to_owned(), outcome.council.to_string()),
                ("seed".to_owned(), format!("{seed:016x}")),
            ]),
        }),
        summary: Some(summary(outcome)),
    }
}

/// A stored record as `GetDeliberationResult` answers it.
pub fn record_result(record: DeliberationRecord) -> pb::GetDeliberationResultResponse {
    let response = record.response.unwrap_or_default();
    let mut metadata = response.metadata.unwrap_or_default();
    metadata
        .tags
        .insert("created_at_ms".into(), record.created_at_ms.to_string());
    metadata
        .tags
        .insert("updated_at_ms".into(), record.updated_at_ms.to_string());
    metadata.tags.insert("role".into(), record.role);
    metadata.tags.insert("instance".into(), record.instance_id);
    if !record.error_message.is_empty() {
        metadata
            .tags
            .insert("retryable".into(), record.retryable.to_string());
    }
    pb::GetDeliberationResultResponse {
        task_id: record.task_id,
        status: record.status,
        results: response.results,
        winner_id: response.winner_id,
        duration_ms: if response.duration_ms > 0 {
            response.duration_ms
        } else {
            (record.updated_at_ms - record.created_at_ms).max(0)
        },
        error_message: record.error_message,
        metadata: Some(metadata),
    }
}

/// `busy`: a deliberation of this council is running.
pub fn council_info(
    c: &CouncilSpec,
    include_agents: bool,
    model: &str,
    busy: bool,
) -> pb::CouncilInfo {
    let status = if busy { "busy" } else { "ready" };
    pb::CouncilInfo {
        council_id: c.id.to_string(),
        role: c.role.to_string(),
        num_agents: c.agents.len() as i32,
        agents: if include_agents {
            c.agents
                .iter()
                .map(|a| pb::AgentInfo {
                    agent_id: a.id.to_string(),
                    role: a.role.to_string(),
                    status: status.into(),
                    capabilities: Some(pb::AgentCapabilities {
                        supported_tasks: vec!["deliberate".into()],
                        model_profile: a.model_profile.clone(),
                        max_concurrent_tasks: 0,
                        languages: Vec::new(),
                    }),
                })
                .collect()
        } else {
            Vec::new()
        },
        status: status.into(),
        model: model.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use council_councils::AgentId;

    fn proposal(checks: Vec<CheckStatus>) -> RankedProposal {
        RankedProposal {
            agent: AgentId::new("dev-1").expect("id"),
            role: "DEV".parse().expect("role"),
            content: "c".into(),
            revisions: Vec::new(),
            rank: 1,
            score: 0.5,
            scores: Default::default(),
            answer: None,
            checks: checks
                .into_iter()
                .enumerate()
                .map(|(i, status)| CheckReport {
                    name: format!("check-{i}"),
                    status,
                })
                .collect(),
            round: 0,
        }
    }

    /// Checks that did not run are absent; `all_passed` is false only when a check that ran
    /// failed.
    #[test]
    fn the_check_suite_says_what_ran_and_what_failed() {
        let skipped = || CheckStatus::Skipped {
            reason: "no answer".into(),
        };
        for (checks, all_passed) in [
            (vec![], true),
            (vec![skipped()], true),
            (vec![CheckStatus::Passed, skipped()], true),
            (
                vec![
                    CheckStatus::Passed,
                    CheckStatus::Failed {
                        reason: "wrong".into(),
                    },
                ],
                false,
            ),
        ] {
            let n = checks.len();
            let suite = check_suite(&proposal(checks));
            assert!(suite.policy.is_none() && suite.lint.is_none() && suite.dryrun.is_none());
            assert_eq!(suite.all_passed, all_passed);
            assert_eq!(suite.additional_checks.len(), n);
        }
    }
}
