//! The four arms, run on one item against one backend: a single agent, self-refine, a majority
//! vote of independent samples with the council's budget, and the council itself.
//!
//! Seed discipline: the first answer of every arm is the call the council makes for its first
//! agent's proposal (same prompt, same sampling, same seed), and the majority vote's first
//! `agents` samples are the council's round-0 proposals. So the arms differ only in what they
//! do after the first answers, and the comparison measures that.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use council_councils::aggregate::majority_vote;
use council_councils::outcome::{CallRecord, Outcome};
use council_councils::parse::extract_answer;
use council_councils::personas::council_of;
use council_councils::prompts::{self, Message};
use council_councils::rng::{hash_str, mix};
use council_councils::spec::{AgentSpec, CouncilSpec, JudgeMode};
use council_councils::{CallSampling, Deliberation, OutcomeStatus, Phase, Role, Task, TaskId};
use council_inference::{
    Backend, BackendFuture, BackendLoad, GenerateRequest, GenerateResult, Health, InferenceError,
    ModelInfo, ScoreFuture, ScoreRequest, ScoreResult,
};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::item::EvalItem;
use super::record::{Arm, Budget, BudgetKind, Pool, ResultRecord, RoundAnswer, RunStatus};
use crate::driver;

/// How every arm is set up for a run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The council role of items that do not name one.
    pub role: Role,
    pub agents: usize,
    pub rounds: u32,
    pub refine_rounds: u32,
    pub vote_match: BudgetKind,
    /// Upper bound on the samples of one majority vote.
    pub max_vote_samples: u64,
    pub max_tokens_per_call: u32,
    /// How the council judges rubric criteria.
    pub judge: JudgeMode,
    pub seed: u64,
}

impl Plan {
    /// The council of an item, with the run's rounds and token cap.
    pub fn council(&self, item: &EvalItem) -> Result<CouncilSpec, String> {
        let role = match &item.role {
            Some(r) => r.parse().map_err(|e| format!("role: {e}"))?,
            None => self.role.clone(),
        };
        let mut council = council_of(&role, self.agents).map_err(|e| e.to_string())?;
        council.config.rounds = self.rounds;
        council.config.max_tokens_per_call = self.max_tokens_per_call;
        council.config.judge = self.judge;
        council.config.validate().map_err(|e| e.to_string())?;
        Ok(council)
    }

    pub fn task(&self, item: &EvalItem) -> Result<Task, String> {
        let id = TaskId::new(item.id.clone()).map_err(|e| format!("id: {e}"))?;
        let mut task = Task::new(id, item.prompt.clone()).map_err(|e| e.to_string())?;
        task.rubric = item.rubric.clone();
        task.requirements = item.requirements.clone();
        task.answer_format = item.answer_format.clone();
        task.validate().map_err(|e| e.to_string())?;
        Ok(task)
    }

    /// The item's seed: every arm draws from it, and the council runs with it.
    pub fn item_seed(&self, item: &EvalItem) -> u64 {
        mix(&[self.seed, hash_str(&item.id)])
    }

    /// Calls a council makes on an item when every round runs and every agent answers: a
    /// proposal, a critique and a revision per round, then the judging: with the text judge
    /// one written ranking per judge; with the log-prob judge, per judge two ranking choices
    /// (when it has two peers or more) and one scoring choice per peer and criterion.
    pub fn planned_council_calls(&self, item: &EvalItem) -> u64 {
        let agents = self.agents as u64;
        if agents < 2 {
            return agents;
        }
        let judging = match self.judge {
            JudgeMode::Text => agents,
            JudgeMode::LogProb => {
                let criteria = self.task(item).map_or(0, |t| t.criteria().len());
                // A task without a rubric is judged on the three default criteria.
                let criteria = if criteria == 0 { 3 } else { criteria } as u64;
                let rankings = if agents >= 3 { 2 * agents } else { 0 };
                rankings + agents * (agents - 1) * criteria
            }
        };
        agents * (1 + 2 * u64::from(self.rounds)) + judging
    }

    /// Sampling of `agent`'s call, exactly as the council seeds it.
    fn sampling(
        &self,
        item_seed: u64,
        agent: &AgentSpec,
        round: u32,
        phase: Phase,
    ) -> CallSampling {
        CallSampling {
            temperature: agent.sampling.temperature,
            top_p: agent.sampling.top_p,
            seed: mix(&[
                item_seed,
                agent.sampling.seed,
                u64::from(round),
                phase as u64,
            ]),
            max_tokens: self.max_tokens_per_call,
        }
    }
}

/// What one arm produced on one item: its result line (without the transcript path, which the
/// writer fills in) and the transcript to store.
#[derive(Debug)]
pub struct ArmRun {
    pub record: ResultRecord,
    pub transcript: Value,
}

/// Backend usage of one arm run, counted as the backend reported it.
#[derive(Debug, Default)]
struct Tally {
    calls: AtomicU64,
    failed: AtomicU64,
    prompt: AtomicU64,
    cached: AtomicU64,
    completion: AtomicU64,
}

/// A backend that counts what one arm run spends, and bounds the calls of the whole evaluation
/// in flight (an engine refuses work past its queue limit instead of waiting).
#[derive(Debug)]
pub struct Metered {
    inner: Arc<dyn Backend>,
    in_flight: Arc<Semaphore>,
    tally: Arc<Tally>,
}

impl Metered {
    pub fn new(inner: Arc<dyn Backend>, in_flight: Arc<Semaphore>) -> Self {
        Self {
            inner,
            in_flight,
            tally: Arc::default(),
        }
    }

    fn fill(&self, record: &mut ResultRecord) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let t = &self.tally;
        record.calls = get(&t.calls);
        record.failed_calls = get(&t.failed);
        record.prompt_tokens = get(&t.prompt);
        record.cached_prompt_tokens = get(&t.cached);
        record.completion_tokens = get(&t.completion);
    }

    fn total_tokens(&self) -> u64 {
        self.tally.prompt.load(Ordering::Relaxed) + self.tally.completion.load(Ordering::Relaxed)
    }
}

/// Tokens one backend call reported: prompt, cached prompt, completion.
type Spend = (usize, usize, usize);

impl Metered {
    /// Runs `call` on the inner backend under the in-flight bound, counting what it spent.
    fn metered<T: Send + 'static>(
        &self,
        call: impl FnOnce(
            &dyn Backend,
        ) -> Pin<Box<dyn Future<Output = Result<T, InferenceError>> + Send>>
        + Send
        + 'static,
        spent: fn(&T) -> Spend,
    ) -> Pin<Box<dyn Future<Output = Result<T, InferenceError>> + Send>> {
        let (inner, permits, tally) = (
            self.inner.clone(),
            self.in_flight.clone(),
            self.tally.clone(),
        );
        Box::pin(async move {
            // A closed semaphore never happens (it is never closed); treat it as no limit.
            let _permit = permits.acquire_owned().await.ok();
            let result = call(inner.as_ref()).await;
            tally.calls.fetch_add(1, Ordering::Relaxed);
            match &result {
                Ok(value) => {
                    let (prompt, cached, completion) = spent(value);
                    tally.prompt.fetch_add(prompt as u64, Ordering::Relaxed);
                    tally.cached.fetch_add(cached as u64, Ordering::Relaxed);
                    tally
                        .completion
                        .fetch_add(completion as u64, Ordering::Relaxed);
                }
                Err(_) => {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            result
        })
    }
}

impl Backend for Metered {
    fn generate(&self, request: GenerateRequest) -> BackendFuture {
        self.metered(
            move |backend| backend.generate(request),
            |r: &GenerateResult| {
                let u = r.usage;
                (u.prompt_tokens, u.cached_prompt_tokens, u.completion_tokens)
            },
        )
    }

    fn score(&self, request: ScoreRequest) -> ScoreFuture {
        self.metered(
            move |backend| backend.score(request),
            |r: &ScoreResult| (r.usage.prompt_tokens, r.usage.cached_prompt_tokens, 0),
        )
    }

    fn health(&self) -> Health {
        self.inner.health()
    }

    fn model_info(&self) -> &ModelInfo {
        self.inner.model_info()
    }

    fn load(&self) -> BackendLoad {
        self.inner.load()
    }
}

/// The transcript of an arm's calls, as they happened.
#[derive(Debug, Default)]
struct Log(Vec<Value>);

impl Log {
    fn push(
        &mut self,
        phase: Phase,
        round: u32,
        messages: &[Message],
        reply: &Result<String, String>,
    ) {
        let messages: Vec<Value> = messages
            .iter()
            .map(
                |m| json!({ "role": format!("{:?}", m.role).to_lowercase(), "content": m.content }),
            )
            .collect();
        let reply = match reply {
            Ok(text) => json!({ "text": text }),
            Err(e) => json!({ "error": e }),
        };
        self.0.push(json!({
            "phase": phase.as_str(), "round": round, "messages": messages, "reply": reply,
        }));
    }
}

/// One chat call: the raw reply text, or why it failed.
async fn call(
    backend: &dyn Backend,
    messages: &[Message],
    sampling: CallSampling,
) -> Result<String, String> {
    backend
        .generate(driver::chat_request(messages, sampling))
        .await
        .map(|r| r.text)
        .map_err(|e| e.to_string())
}

/// A reply an agent can go on with: an empty one is a failure, as in a deliberation.
fn usable_reply(reply: &Result<String, String>) -> Result<String, String> {
    match reply {
        Ok(text) if text.trim().is_empty() => Err("empty reply".to_owned()),
        Ok(text) => Ok(text.trim().to_owned()),
        Err(e) => Err(e.clone()),
    }
}

/// A fresh result line for `arm` on `item`; the arm fills in what it learnt.
fn blank(item: &EvalItem, arm: Arm) -> ResultRecord {
    ResultRecord {
        item: item.id.clone(),
        suite: item.suite.clone(),
        arm,
        status: RunStatus::Ok,
        expected: item.expected.as_ref().map(|e| e.describe()),
        answer: None,
        correct: None,
        parse_failed: false,
        rounds: Vec::new(),
        pool: None,
        consensus: None,
        calls: 0,
        failed_calls: 0,
        prompt_tokens: 0,
        cached_prompt_tokens: 0,
        completion_tokens: 0,
        latency_ms: 0,
        budget: None,
        score: None,
        margin: None,
        transcript: None,
    }
}

/// The extracted answer of a proposal, when the item declares a format.
fn answer_of(item: &EvalItem, text: &str) -> Option<String> {
    extract_answer(text, item.answer_format.as_ref()?)
}

fn correct(item: &EvalItem, answer: Option<&str>) -> Option<bool> {
    item.expected
        .as_ref()
        .map(|e| answer.is_some_and(|a| e.is_correct(a)))
}

fn round_answer(item: &EvalItem, round: u32, answer: Option<String>) -> RoundAnswer {
    RoundAnswer {
        round,
        correct: correct(item, answer.as_deref()),
        answer,
    }
}

/// Sets the final answer of a completed run, or marks it failed (counted wrong when scored).
fn conclude(item: &EvalItem, record: &mut ResultRecord, outcome: Result<Option<String>, String>) {
    match outcome {
        Ok(answer) => {
            record.parse_failed = item.answer_format.is_some() && answer.is_none();
            record.correct = correct(item, answer.as_deref());
            record.answer = answer;
        }
        Err(reason) => {
            record.correct = item.expected.as_ref().map(|_| false);
            record.status = RunStatus::Failed { reason };
        }
    }
}

fn finish(meter: &Metered, mut record: ResultRecord, started: Instant, log: Value) -> ArmRun {
    meter.fill(&mut record);
    record.latency_ms = started.elapsed().as_millis() as u64;
    ArmRun {
        record,
        transcript: log,
    }
}

/// A run that could not start (a bad item for this arm): failed, nothing spent.
fn refused(item: &EvalItem, arm: Arm, reason: String) -> ArmRun {
    let mut record = blank(item, arm);
    conclude(item, &mut record, Err(reason));
    ArmRun {
        record,
        transcript: json!({ "calls": [] }),
    }
}

/// One agent answers once: the council's first proposal call, alone.
pub async fn single(meter: Metered, plan: &Plan, item: &EvalItem) -> ArmRun {
    let (council, task) = match (plan.council(item), plan.task(item)) {
        (Ok(c), Ok(t)) => (c, t),
        (Err(e), _) | (_, Err(e)) => return refused(item, Arm::Single, e),
    };
    let started = Instant::now();
    let agent = &council.agents[0];
    let messages = prompts::propose(agent, &task);
    let sampling = plan.sampling(plan.item_seed(item), agent, 0, Phase::Propose);
    let reply = call(&meter, &messages, sampling).await;
    let mut log = Log::default();
    log.push(Phase::Propose, 0, &messages, &reply);
    let mut record = blank(item, Arm::Single);
    let answer = usable_reply(&reply).map(|text| answer_of(item, &text));
    if let Ok(a) = &answer {
        record.rounds = vec![round_answer(item, 0, a.clone())];
    }
    conclude(item, &mut record, answer);
    finish(&meter, record, started, json!({ "calls": log.0 }))
}

/// One agent answers, then critiques and revises its own answer for `refine_rounds` rounds.
pub async fn self_refine(meter: Metered, plan: &Plan, item: &EvalItem) -> ArmRun {
    let (council, task) = match (plan.council(item), plan.task(item)) {
        (Ok(c), Ok(t)) => (c, t),
        (Err(e), _) | (_, Err(e)) => return refused(item, Arm::SelfRefine, e),
    };
    let started = Instant::now();
    let agent = &council.agents[0];
    let seed = plan.item_seed(item);
    let mut log = Log::default();
    let mut record = blank(item, Arm::SelfRefine);
    let outcome = refine_rounds(
        &meter,
        plan,
        item,
        agent,
        &task,
        seed,
        &mut log,
        &mut record,
    )
    .await;
    conclude(
        item,
        &mut record,
        outcome.map(|text| answer_of(item, &text)),
    );
    finish(&meter, record, started, json!({ "calls": log.0 }))
}

/// The self-refine loop; returns the last proposal, or why it stopped.
#[allow(clippy::too_many_arguments)]
async fn refine_rounds(
    backend: &dyn Backend,
    plan: &Plan,
    item: &EvalItem,
    agent: &AgentSpec,
    task: &Task,
    seed: u64,
    log: &mut Log,
    record: &mut ResultRecord,
) -> Result<String, String> {
    let messages = prompts::propose(agent, task);
    let reply = call(
        backend,
        &messages,
        plan.sampling(seed, agent, 0, Phase::Propose),
    )
    .await;
    log.push(Phase::Propose, 0, &messages, &reply);
    let mut own = usable_reply(&reply)?;
    record
        .rounds
        .push(round_answer(item, 0, answer_of(item, &own)));
    for round in 1..=plan.refine_rounds {
        let messages = prompts::self_critique(agent, task, &own, round);
        let sampling = plan.sampling(seed, agent, round, Phase::Critique);
        let reply = call(backend, &messages, sampling).await;
        log.push(Phase::Critique, round, &messages, &reply);
        let critique = usable_reply(&reply)?;
        let messages = prompts::revise(agent, task, &own, &[critique.as_str()], round);
        let sampling = plan.sampling(seed, agent, round, Phase::Revise);
        let reply = call(backend, &messages, sampling).await;
        log.push(Phase::Revise, round, &messages, &reply);
        own = usable_reply(&reply)?;
        record
            .rounds
            .push(round_answer(item, round, answer_of(item, &own)));
    }
    Ok(own)
}

/// The compute a majority vote must match on an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub calls: u64,
    /// `None` when the council arm did not run on the item (then calls are matched).
    pub tokens: Option<u64>,
}

/// Independent answers by the council's agents (their personas and temperatures, in turn),
/// majority vote over the parsed answers; as many samples as match the council's budget.
pub async fn majority(meter: Metered, plan: &Plan, item: &EvalItem, target: Target) -> ArmRun {
    if item.answer_format.is_none() {
        let mut record = blank(item, Arm::Majority);
        record.status = RunStatus::Skipped {
            reason: "the task declares no answer format: there is nothing to vote on".to_owned(),
        };
        return ArmRun {
            record,
            transcript: json!({ "calls": [] }),
        };
    }
    let (council, task) = match (plan.council(item), plan.task(item)) {
        (Ok(c), Ok(t)) => (c, t),
        (Err(e), _) | (_, Err(e)) => return refused(item, Arm::Majority, e),
    };
    let started = Instant::now();
    let matched = match (plan.vote_match, target.tokens) {
        (BudgetKind::Tokens, Some(_)) => BudgetKind::Tokens,
        _ => BudgetKind::Calls,
    };
    let cap = plan.max_vote_samples.max(1);
    let first_wave = match matched {
        BudgetKind::Calls => target.calls.clamp(1, cap),
        BudgetKind::Tokens => (council.agents.len() as u64).min(cap),
    };
    let sampler = Sampler {
        backend: &meter,
        plan,
        council: &council,
        task: &task,
        seed: plan.item_seed(item),
    };
    let mut replies = sampler.wave(0, first_wave).await;
    if let (BudgetKind::Tokens, Some(tokens)) = (matched, target.tokens) {
        let spent = meter.total_tokens();
        let drawn = replies.len() as u64;
        if spent < tokens && drawn < cap && spent > 0 {
            // The mean cost of a sample so far sizes one more wave to reach the target.
            let more = (tokens - spent)
                .div_ceil(spent.div_ceil(drawn))
                .min(cap - drawn);
            replies.extend(sampler.wave(drawn, more).await);
        }
    }
    let mut record = blank(item, Arm::Majority);
    record.budget = Some(Budget {
        matched,
        target_calls: target.calls,
        target_tokens: target.tokens,
        samples: replies.len() as u64,
    });
    let mut log = Log::default();
    for (messages, reply) in &replies {
        log.push(Phase::Propose, 0, messages, reply);
    }
    let answers: Vec<Option<String>> = replies
        .iter()
        .filter_map(|(_, r)| usable_reply(r).ok())
        .map(|text| answer_of(item, &text))
        .collect();
    let outcome = if answers.is_empty() {
        Err(format!("all {} samples failed", replies.len()))
    } else {
        let any = some_correct(item, answers.iter().map(Option::as_deref));
        record.pool = any.map(|any| Pool {
            first: any,
            last: any,
        });
        let vote = majority_vote(&answers);
        record.consensus = Some(answers.iter().all(|a| a.is_some() && *a == vote.winner));
        record.rounds = vec![round_answer(item, 0, vote.winner.clone())];
        Ok(vote.winner)
    };
    conclude(item, &mut record, outcome);
    finish(&meter, record, started, json!({ "calls": log.0 }))
}

/// Draws independent first answers.
struct Sampler<'a> {
    backend: &'a dyn Backend,
    plan: &'a Plan,
    council: &'a CouncilSpec,
    task: &'a Task,
    seed: u64,
}

impl Sampler<'_> {
    /// Samples `from..from + count`, all submitted at once. Sample i is agent i mod n's answer;
    /// the first n are exactly the council's round-0 proposals.
    async fn wave(&self, from: u64, count: u64) -> Vec<(Vec<Message>, Result<String, String>)> {
        let n = self.council.agents.len() as u64;
        let calls = (from..from + count).map(|i| {
            let agent = &self.council.agents[(i % n) as usize];
            let mut sampling = self.plan.sampling(self.seed, agent, 0, Phase::Propose);
            if i >= n {
                sampling.seed = mix(&[sampling.seed, i / n]);
            }
            let messages = prompts::propose(agent, self.task);
            async move {
                let reply = call(self.backend, &messages, sampling).await;
                (messages, reply)
            }
        });
        // Awaited together, so the requests batch; results keep their order.
        futures_util::future::join_all(calls).await
    }
}

/// The council deliberates; its answer is the winner's.
pub async fn council(meter: Metered, plan: &Plan, item: &EvalItem) -> ArmRun {
    let (council, task) = match (plan.council(item), plan.task(item)) {
        (Ok(c), Ok(t)) => (c, t),
        (Err(e), _) | (_, Err(e)) => return refused(item, Arm::Council, e),
    };
    let started = Instant::now();
    let config = council.config;
    let deliberation = Deliberation::new(council, task, config, plan.item_seed(item));
    let mut record = blank(item, Arm::Council);
    let (outcome, transcript) = match driver::run(&meter, deliberation).await {
        Ok(outcome) => {
            let transcript = crate::outcome_json::outcome_json(&outcome);
            (council_outcome(item, &outcome, &mut record), transcript)
        }
        Err(e) => (Err(e.to_string()), json!({ "error": e.to_string() })),
    };
    conclude(item, &mut record, outcome);
    finish(&meter, record, started, transcript)
}

/// Reads the council's answer, consensus, scores and per-round answers off its outcome.
fn council_outcome(
    item: &EvalItem,
    outcome: &Outcome,
    record: &mut ResultRecord,
) -> Result<Option<String>, String> {
    if let OutcomeStatus::Failed { reason } = &outcome.status {
        return Err(reason.clone());
    }
    let winner = outcome
        .proposals
        .first()
        .ok_or("the council produced no proposal")?;
    record.score = Some(winner.score);
    record.margin = outcome.margin;
    if item.answer_format.is_some() {
        let answers: Vec<&Option<String>> = outcome.proposals.iter().map(|p| &p.answer).collect();
        record.consensus = Some(answers.iter().all(|a| a.is_some() && **a == *answers[0]));
        record.rounds = council_rounds(item, outcome);
        let first = outcome
            .transcript
            .iter()
            .filter(|r| r.phase == Phase::Propose)
            .filter_map(usable)
            .map(|text| answer_of(item, text));
        let first = some_correct(item, first.collect::<Vec<_>>().iter().map(Option::as_deref));
        let last = some_correct(item, answers.iter().map(|a| a.as_deref()));
        if let (Some(first), Some(last)) = (first, last) {
            record.pool = Some(Pool { first, last });
        }
    }
    Ok(winner.answer.clone())
}

/// Whether one of `answers` is right; `None` when the item has no expected answer.
fn some_correct<'a>(
    item: &EvalItem,
    mut answers: impl Iterator<Item = Option<&'a str>>,
) -> Option<bool> {
    let expected = item.expected.as_ref()?;
    Some(answers.any(|a| a.is_some_and(|a| expected.is_correct(a))))
}

/// The plurality answer of the council's proposals after each round.
fn council_rounds(item: &EvalItem, outcome: &Outcome) -> Vec<RoundAnswer> {
    let mut current: Vec<(&str, &str)> = Vec::new();
    let mut rounds = Vec::new();
    for round in 0..=outcome.rounds_run {
        let phase = if round == 0 {
            Phase::Propose
        } else {
            Phase::Revise
        };
        for r in outcome
            .transcript
            .iter()
            .filter(|r| r.phase == phase && r.round == round)
        {
            if let Some(text) = usable(r) {
                match current
                    .iter_mut()
                    .find(|(agent, _)| *agent == r.agent.as_str())
                {
                    Some(entry) => entry.1 = text,
                    None => current.push((r.agent.as_str(), text)),
                }
            }
        }
        let dropped = |agent: &str| {
            outcome
                .failed_agents
                .iter()
                .any(|f| f.agent.as_str() == agent && f.round <= round)
        };
        let answers: Vec<Option<String>> = current
            .iter()
            .filter(|(agent, _)| !dropped(agent))
            .map(|(_, text)| answer_of(item, text))
            .collect();
        rounds.push(round_answer(item, round, majority_vote(&answers).winner));
    }
    rounds
}

fn usable(record: &CallRecord) -> Option<&str> {
    record
        .reply
        .as_deref()
        .ok()
        .map(str::trim)
        .filter(|t| !t.is_empty())
}
