//! Upstream's `Orchestrate`: the role's council deliberates, its best `k` proposals go to an
//! ARCHITECT agent, which chooses the one to implement with its reasons (a real model call,
//! where upstream's choice was a heuristic). The architect's ranking orders the candidates;
//! when it cannot be read, the council's order stands and the response says so.

use std::collections::HashMap;
use std::time::Instant;

use council_councils::parse::parse_ranking;
use council_councils::personas::default_council;
use council_councils::{CallSampling, Role, Task, prompts, rng};
use council_proto::fleet::orchestrator::v1 as pb;

use crate::driver;
use crate::run::Runner;
use crate::run::error::{RunError, invalid};

/// Candidates the architect chooses among unless `options.custom_params["architect_k"]` says
/// otherwise (upstream's `architect_rubric` k).
pub const DEFAULT_K: usize = 3;

/// Longest architect reasoning kept in the response's tags, in characters.
const MAX_REASONS: usize = 2000;

/// The deliberation an `OrchestrateRequest` asks for, and its `k`.
pub fn deliberation_request(
    req: &pb::OrchestrateRequest,
) -> Result<(pb::DeliberateRequest, usize), RunError> {
    let options = req.options.clone().unwrap_or_default();
    let k = match options.custom_params.get("architect_k") {
        None => DEFAULT_K,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|k| (1..=16).contains(k))
            .ok_or_else(|| {
                invalid(
                    "options.custom_params.architect_k",
                    format!("{v:?} is not a number in 1..=16"),
                )
            })?,
    };
    let mut constraints = req.constraints.clone();
    if let Some(c) = constraints.as_mut() {
        for (key, value) in [
            ("case_id", &req.case_id),
            ("story_id", &req.story_id),
            ("plan_id", &req.plan_id),
        ] {
            if !value.is_empty() {
                c.metadata.insert(key.to_owned(), value.clone());
            }
        }
    }
    Ok((
        pb::DeliberateRequest {
            task_id: req.task_id.clone(),
            task_description: req.task_description.clone(),
            role: req.role.clone(),
            constraints,
            // 0: the council's configured rounds.
            rounds: options.deliberation_rounds,
            num_agents: 0,
            review_rounds: None,
        },
        k,
    ))
}

/// Runs an orchestration: the `response` to the deliberation of `task`, then the architect's
/// choice.
pub async fn choose(
    runner: &Runner,
    task: &Task,
    response: pb::DeliberateResponse,
    k: usize,
    started: Instant,
) -> Result<pb::OrchestrateResponse, RunError> {
    let mut candidates: Vec<pb::DeliberationResult> =
        response.results.into_iter().take(k).collect();
    let mut tags: HashMap<String, String> = response
        .metadata
        .as_ref()
        .map(|m| m.tags.clone())
        .unwrap_or_default();
    tags.insert("candidates".into(), candidates.len().to_string());
    if candidates.len() >= 2 {
        let architect = architect(runner).await?;
        tags.insert("architect_id".into(), architect.id.to_string());
        let labels: Vec<String> = (0..candidates.len())
            .map(|i| ((b'A' + i as u8) as char).to_string())
            .collect();
        let texts: Vec<String> = candidates
            .iter()
            .map(|c| c.proposal.clone().unwrap_or_default().content)
            .collect();
        let quoted: Vec<(String, &str)> = labels
            .iter()
            .cloned()
            .zip(texts.iter().map(String::as_str))
            .collect();
        let messages = prompts::select(&architect, task, &quoted);
        let sampling = CallSampling {
            temperature: 0.2,
            top_p: 0.95,
            seed: rng::mix(&[rng::hash_str(&response.task_id), 0x0a4c_8173]),
            max_tokens: 512,
        };
        let reply = runner
            .backend()
            .generate(driver::chat_request(&messages, sampling))
            .await;
        let names: Vec<String> = labels.iter().map(|l| format!("Proposal {l}")).collect();
        match reply {
            Ok(r) => {
                let reasons: String = r.text.trim().chars().take(MAX_REASONS).collect();
                tags.insert("architect_reasons".into(), reasons);
                match parse_ranking(&r.text, &names) {
                    Some(order) => {
                        tags.insert("architect_choice".into(), "parsed".into());
                        candidates = order
                            .into_iter()
                            .filter_map(|i| candidates.get(i).cloned())
                            .collect();
                    }
                    None => {
                        tags.insert(
                            "architect_choice".into(),
                            "unparsed: the council's order stands".into(),
                        );
                    }
                }
            }
            Err(e) => {
                // The council's choice is still an answer; the response says the architect's
                // call failed rather than failing the orchestration.
                tags.insert(
                    "architect_choice".into(),
                    format!("failed: {e}; the council's order stands"),
                );
            }
        }
    } else {
        tags.insert(
            "architect_choice".into(),
            "skipped: fewer than two candidates".into(),
        );
    }
    for (i, c) in candidates.iter_mut().enumerate() {
        c.rank = i as i32 + 1;
    }
    let mut rest = candidates.into_iter();
    let winner = rest.next().ok_or_else(|| RunError::DeliberationFailed {
        reason: "the council produced no proposal".into(),
        retryable: false,
    })?;
    let duration = started.elapsed();
    runner.metrics().orchestrated(duration);
    let mut metadata = response.metadata.unwrap_or_default();
    metadata.tags = tags;
    Ok(pb::OrchestrateResponse {
        winner: Some(winner),
        candidates: rest.collect(),
        execution_id: metadata.execution_id.clone(),
        duration_ms: duration.as_millis() as i64,
        metadata: Some(metadata),
    })
}

/// The first agent of the ARCHITECT council (the default architect when there is none).
async fn architect(runner: &Runner) -> Result<council_councils::AgentSpec, RunError> {
    let council = match runner.store().get(&Role::Architect).await? {
        Some(c) => c,
        None => default_council(&Role::Architect)
            .map_err(|e| RunError::FailedPrecondition(format!("no architect to choose: {e}")))?,
    };
    council
        .agents
        .into_iter()
        .next()
        .ok_or_else(|| RunError::FailedPrecondition("the ARCHITECT council has no agent".into()))
}
