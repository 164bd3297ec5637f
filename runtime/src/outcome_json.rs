//! An outcome as JSON: `council deliberate --json` and the eval's council transcripts.

use council_councils::checks::CheckStatus;
use council_councils::{Outcome, OutcomeStatus};
use serde_json::json;

fn check_json(status: &CheckStatus) -> serde_json::Value {
    match status {
        CheckStatus::Passed => json!({ "status": "passed" }),
        CheckStatus::Failed { reason } => json!({ "status": "failed", "reason": reason }),
        CheckStatus::Skipped { reason } => json!({ "status": "skipped", "reason": reason }),
    }
}

/// The outcome as JSON (a view for people and scripts; not a storage format).
pub fn outcome_json(o: &Outcome) -> serde_json::Value {
    let status = match &o.status {
        OutcomeStatus::Completed => json!({ "state": "completed" }),
        OutcomeStatus::Failed { reason } => json!({ "state": "failed", "reason": reason }),
    };
    json!({
        "task_id": o.task.as_str(),
        "council_id": o.council.as_str(),
        "status": status,
        "winner": o.winner.as_ref().map(|w| w.as_str()),
        "decided_by": o.decided_by.map(|d| d.as_str()),
        "margin": o.margin,
        "judging": {
            "rankings_asked": o.judging.rankings_asked,
            "rankings_read": o.judging.rankings_read,
            "scores_asked": o.judging.scores_asked,
            "scores_read": o.judging.scores_read,
        },
        "stop_reason": format!("{:?}", o.stop_reason),
        "rounds_run": o.rounds_run,
        "majority_answer": o.majority_answer,
        "usage": {
            "calls": o.usage.calls,
            "failed_calls": o.usage.failed_calls,
            "failed_judgements": o.usage.failed_judgements,
            "prompt_tokens": o.usage.prompt_tokens,
            "completion_tokens": o.usage.completion_tokens,
        },
        "failed_agents": o.failed_agents.iter().map(|f| json!({
            "agent": f.agent.as_str(), "phase": f.phase.as_str(), "round": f.round, "reason": f.reason,
        })).collect::<Vec<_>>(),
        "proposals": o.proposals.iter().map(|p| json!({
            "rank": p.rank,
            "agent": p.agent.as_str(),
            "role": p.role.as_str(),
            "score": p.score,
            "scores": {
                "peer_ranking": p.scores.peer_ranking,
                "condorcet": p.scores.condorcet,
                "rubric": p.scores.rubric,
                "majority": p.scores.majority,
                "checks": p.scores.checks,
            },
            "answer": p.answer,
            "checks": p.checks.iter().map(|c| json!({ "name": c.name, "result": check_json(&c.status) })).collect::<Vec<_>>(),
            "content": p.content,
            "revisions": p.revisions,
        })).collect::<Vec<_>>(),
        "transcript": o.transcript.iter().map(|r| json!({
            "call": r.call,
            "agent": r.agent.as_str(),
            "phase": r.phase.as_str(),
            "round": r.round,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "reply": match &r.reply { Ok(t) => json!({ "text": t }), Err(e) => json!({ "error": e }) },
        })).collect::<Vec<_>>(),
    })
}
