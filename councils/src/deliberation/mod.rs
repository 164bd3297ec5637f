//! The deliberation state machine. It never awaits and never performs I/O: `step` takes the
//! replies to the calls it handed out last time and returns the next batch of calls, or the
//! outcome. All calls of a phase come out together so a driver can batch them.
//!
//! Phases: propose → (critique → revise) × rounds → score. An agent whose call fails drops
//! out (recorded); the deliberation goes on while a quorum of agents is still working.

pub mod checkpoint;
mod judging;
mod labels;

use std::collections::BTreeMap;

use self::judging::Judgements;
use self::labels::{label, split_sections};
use crate::aggregate;
use crate::checks::{AnswerFormatCheck, Check};
use crate::outcome::{
    CallRecord, FailedAgent, Outcome, OutcomeStatus, Phase, Progress, StopReason, Usage,
};
use crate::parse::extract_answer;
use crate::prompts::{self, Message};
use crate::rng::{SplitMix, mix};
use crate::spec::{CouncilSpec, DeliberationConfig, Task, Visibility};

/// Sampling of one call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallSampling {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub max_tokens: u32,
}

/// What kind of answer a call wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallKind {
    /// Free text.
    Generate,
    /// The log-probability of each choice as the continuation (one prefill, no sampling).
    ScoreChoices { choices: Vec<String> },
}

/// One LLM call the driver must make.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmCall {
    pub id: u64,
    pub agent: crate::ids::AgentId,
    pub phase: Phase,
    pub round: u32,
    pub messages: Vec<Message>,
    pub sampling: CallSampling,
    pub kind: CallKind,
}

/// A successful call's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// For `ScoreChoices`: one log-probability per choice, in order.
    pub choice_logprobs: Option<Vec<f64>>,
}

/// The answer to one call: a completion or the reason it failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub call: u64,
    pub result: Result<Completion, CallError>,
}

/// Why a call got no reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    pub message: String,
    /// Another try may succeed (overload, a server down); `false` when the same call would
    /// fail the same way (e.g. a prompt longer than the context window).
    pub transient: bool,
}

impl CallError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            transient: true,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            transient: false,
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A bare message is a transient error: retrying is the safe default.
impl From<&str> for CallError {
    fn from(message: &str) -> Self {
        Self::transient(message)
    }
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Calls(Vec<LlmCall>),
    Done(Box<Outcome>),
}

/// The driver broke the protocol (a bug in the caller, not a deliberation outcome).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    #[error("reply to unknown call {0}")]
    UnknownCall(u64),
    #[error("call {0} answered twice")]
    Duplicate(u64),
    #[error("{0} pending calls got no reply")]
    Missing(usize),
    #[error("the deliberation is already done")]
    Finished,
}

#[derive(Debug, Clone)]
struct AgentState {
    proposal: Option<String>,
    revisions: Vec<String>,
    /// Round in which the current proposal was written.
    round: u32,
    failed: bool,
}

/// What a pending call is for.
#[derive(Debug, Clone)]
enum CallMeta {
    Propose,
    /// `labels[i]` is shown for author `authors[i]`.
    Critique {
        labels: Vec<String>,
        authors: Vec<usize>,
    },
    Revise,
    Score {
        labels: Vec<String>,
        authors: Vec<usize>,
    },
    Choice {
        author: usize,
        criterion: usize,
    },
    /// One presentation order of a log-prob ranking: the i-th choice (label) is shown for
    /// `authors[i]`.
    Rank {
        authors: Vec<usize>,
    },
}

impl CallMeta {
    fn is_judgement(&self) -> bool {
        matches!(
            self,
            CallMeta::Score { .. } | CallMeta::Choice { .. } | CallMeta::Rank { .. }
        )
    }
}

#[derive(Debug, Clone)]
struct Pending {
    agent: usize,
    phase: Phase,
    round: u32,
    meta: CallMeta,
    messages: Vec<Message>,
}

/// A call about to be emitted: agent index, messages, what it is for, what it wants back.
type NewCall = (usize, Vec<Message>, CallMeta, CallKind);

/// One deliberation in progress.
#[derive(Debug)]
pub struct Deliberation {
    council: CouncilSpec,
    task: Task,
    config: DeliberationConfig,
    seed: u64,
    checks: Vec<Box<dyn Check>>,
    criteria: Vec<String>,
    agents: Vec<AgentState>,
    /// Critiques received by each author in the current round.
    critiques: Vec<Vec<String>>,
    judgements: Judgements,
    pending: BTreeMap<u64, Pending>,
    next_call: u64,
    round: u32,
    phase: Phase,
    started: bool,
    done: bool,
    stop_reason: Option<StopReason>,
    failed: Vec<FailedAgent>,
    usage: Usage,
    transcript: Vec<CallRecord>,
    progress: Vec<Progress>,
    /// Replies taken by each step after the first: the whole state, for checkpoints.
    history: Vec<Vec<checkpoint::ReplyDto>>,
    fingerprint: u64,
    /// The absolute-majority answer at the previous round boundary, if there was one.
    last_majority: Option<String>,
}

const DEFAULT_CRITERIA: [&str; 3] = ["correctness", "completeness", "clarity"];
impl Deliberation {
    /// A deliberation of `task` by `council` under `config`; `seed` fixes every shuffle.
    pub fn new(council: CouncilSpec, task: Task, config: DeliberationConfig, seed: u64) -> Self {
        let mut criteria = task.criteria();
        if criteria.is_empty() {
            criteria = DEFAULT_CRITERIA.iter().map(|c| (*c).to_owned()).collect();
        }
        let n = council.agents.len();
        let fingerprint = checkpoint::fingerprint(&council, &task, &config, seed);
        Self {
            history: Vec::new(),
            fingerprint,
            last_majority: None,
            council,
            task,
            config,
            seed,
            checks: vec![Box::new(AnswerFormatCheck)],
            criteria,
            agents: vec![
                AgentState {
                    proposal: None,
                    revisions: Vec::new(),
                    round: 0,
                    failed: false
                };
                n
            ],
            critiques: vec![Vec::new(); n],
            judgements: Judgements::default(),
            pending: BTreeMap::new(),
            next_call: 0,
            round: 0,
            phase: Phase::Propose,
            started: false,
            done: false,
            stop_reason: None,
            failed: Vec::new(),
            usage: Usage::default(),
            transcript: Vec::new(),
            progress: Vec::new(),
        }
    }

    /// Adds a check run on every final proposal.
    pub fn with_check(mut self, check: Box<dyn Check>) -> Self {
        self.checks.push(check);
        self
    }

    /// The state between steps, for persisting and resuming later.
    pub fn checkpoint(&self) -> checkpoint::Checkpoint {
        checkpoint::Checkpoint {
            version: checkpoint::CHECKPOINT_VERSION,
            fingerprint: self.fingerprint,
            seed: self.seed,
            steps: self.history.clone(),
        }
    }

    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// Progress events since the last call.
    pub fn drain_progress(&mut self) -> Vec<Progress> {
        std::mem::take(&mut self.progress)
    }

    /// Feeds the replies to the last batch and returns what comes next. The first call takes
    /// no replies.
    pub fn step(&mut self, replies: Vec<Reply>) -> Result<Step, StepError> {
        if self.done {
            return Err(StepError::Finished);
        }
        let recorded: Vec<checkpoint::ReplyDto> = replies.iter().map(Into::into).collect();
        self.accept(replies)?;
        if self.started {
            self.history.push(recorded);
        }
        if !self.started {
            self.started = true;
            let calls = self.propose_calls();
            return Ok(self.emit(Phase::Propose, 0, calls));
        }
        self.progress.push(Progress::PhaseFinished {
            phase: self.phase,
            round: self.round,
        });
        self.advance()
    }

    fn accept(&mut self, replies: Vec<Reply>) -> Result<(), StepError> {
        let mut seen = std::collections::BTreeSet::new();
        for r in &replies {
            if !self.pending.contains_key(&r.call) {
                return Err(StepError::UnknownCall(r.call));
            }
            if !seen.insert(r.call) {
                return Err(StepError::Duplicate(r.call));
            }
        }
        if seen.len() != self.pending.len() {
            return Err(StepError::Missing(self.pending.len() - seen.len()));
        }
        let mut replies = replies;
        replies.sort_by_key(|r| r.call);
        for reply in replies {
            if let Some(pending) = self.pending.remove(&reply.call) {
                self.apply(reply, pending);
            }
        }
        Ok(())
    }

    fn apply(&mut self, reply: Reply, p: Pending) {
        let agent_id = self.council.agents[p.agent].id.clone();
        self.usage.calls += 1;
        let (text, record_reply) = match &reply.result {
            Ok(c) => {
                self.usage.prompt_tokens += c.prompt_tokens;
                self.usage.completion_tokens += c.completion_tokens;
                (Some(c), Ok(c.text.clone()))
            }
            Err(e) => {
                self.usage.failed_calls += 1;
                if p.meta.is_judgement() {
                    self.usage.failed_judgements += 1;
                }
                (None, Err(e.message.clone()))
            }
        };
        let (prompt_tokens, completion_tokens) =
            text.map_or((0, 0), |c| (c.prompt_tokens, c.completion_tokens));
        self.transcript.push(CallRecord {
            call: reply.call,
            agent: agent_id.clone(),
            phase: p.phase,
            round: p.round,
            messages: p.messages.clone(),
            reply: record_reply,
            prompt_tokens,
            completion_tokens,
        });
        // An empty text reply is as useless as an error.
        let usable = text.filter(|c| {
            !c.text.trim().is_empty()
                || matches!(p.meta, CallMeta::Choice { .. } | CallMeta::Rank { .. })
        });
        self.progress.push(Progress::AgentDone {
            agent: agent_id,
            phase: p.phase,
            round: p.round,
            ok: usable.is_some(),
        });
        let Some(c) = usable else {
            self.count_unread(p.agent, &p.meta);
            let (reason, backend) = match reply.result {
                Err(e) => (e.message, e.transient),
                Ok(_) => ("empty reply".to_owned(), false),
            };
            self.fail_agent(p.agent, p.phase, p.round, reason, backend, &p.meta);
            return;
        };
        let a = p.agent;
        match p.meta {
            CallMeta::Propose => {
                self.agents[a].proposal = Some(c.text.trim().to_owned());
                self.agents[a].round = 0;
            }
            CallMeta::Critique { labels, authors } => {
                let sections = split_sections(&c.text, &labels);
                // A review without per-proposal headings still reaches every author it covered.
                let whole = sections
                    .iter()
                    .all(Option::is_none)
                    .then(|| c.text.trim().to_owned());
                for (section, author) in sections.into_iter().zip(authors) {
                    if let Some(s) = section.or_else(|| whole.clone()) {
                        self.critiques[author].push(s);
                    }
                }
            }
            CallMeta::Revise => {
                // An unchanged proposal is not a revision (and counts towards convergence).
                let state = &mut self.agents[a];
                let text = c.text.trim();
                if state.proposal.as_deref() != Some(text) {
                    if let Some(old) = state.proposal.replace(text.to_owned()) {
                        state.revisions.push(old);
                    }
                    state.round = p.round;
                }
            }
            CallMeta::Score { labels, authors } => self.apply_score(a, &c.text, &labels, &authors),
            CallMeta::Choice { author, criterion } => {
                self.apply_choice(author, criterion, c.choice_logprobs.as_deref());
            }
            CallMeta::Rank { authors } => self.apply_rank(a, authors, c.choice_logprobs.as_deref()),
        }
    }

    fn fail_agent(
        &mut self,
        agent: usize,
        phase: Phase,
        round: u32,
        reason: String,
        backend: bool,
        meta: &CallMeta,
    ) {
        // A judge that fails only loses its vote; its own proposal is finished and still ranks.
        if meta.is_judgement() {
            return;
        }
        if !self.agents[agent].failed {
            self.agents[agent].failed = true;
            self.failed.push(FailedAgent {
                agent: self.council.agents[agent].id.clone(),
                phase,
                round,
                reason,
                backend,
            });
        }
    }

    fn working(&self) -> Vec<usize> {
        (0..self.agents.len())
            .filter(|&i| !self.agents[i].failed && self.agents[i].proposal.is_some())
            .collect()
    }

    fn quorum_holds(&self) -> bool {
        self.working().len() >= self.config.quorum.required(self.council.agents.len())
    }

    fn budget_left(&self) -> Option<u64> {
        self.config
            .token_budget
            .map(|b| b.saturating_sub(self.usage.total_tokens()))
    }

    /// Decides the next phase after the current one finished.
    fn advance(&mut self) -> Result<Step, StepError> {
        if !self.quorum_holds() {
            self.stop_reason = Some(StopReason::QuorumLost);
            return Ok(self.finish());
        }
        let next_round = match self.phase {
            Phase::Propose => Some(1),
            Phase::Critique => {
                let calls = self.revise_calls();
                if !calls.is_empty() {
                    return Ok(self.emit(Phase::Revise, self.round, calls));
                }
                self.after_round(false)
            }
            Phase::Revise => {
                let changed = self
                    .agents
                    .iter()
                    .any(|a| a.round == self.round && !a.failed);
                self.after_round(changed)
            }
            Phase::Score => return Ok(self.finish()),
        };
        if let Some(round) = next_round
            && self.stop_reason.is_none()
        {
            if let Some(reason) = self.early_stop(round) {
                self.stop_reason = Some(reason);
            } else {
                self.round = round;
                let calls = self.critique_calls();
                if !calls.is_empty() {
                    return Ok(self.emit(Phase::Critique, round, calls));
                }
                self.stop_reason = Some(StopReason::Converged);
            }
        }
        self.score_or_finish()
    }

    /// After a round's revisions: the next round to run, if any.
    fn after_round(&mut self, changed: bool) -> Option<u32> {
        if self.config.early_stop && !changed {
            self.stop_reason = Some(StopReason::Converged);
            return None;
        }
        Some(self.round + 1)
    }

    /// Whether round `round` should not start.
    fn early_stop(&mut self, round: u32) -> Option<StopReason> {
        if round > self.config.rounds {
            return Some(StopReason::RoundsCompleted);
        }
        if self.budget_left() == Some(0) {
            return Some(StopReason::BudgetExhausted);
        }
        let working = self.working();
        if working.len() < 2 {
            return Some(StopReason::RoundsCompleted);
        }
        if self.config.early_stop
            && let Some(format) = &self.task.answer_format
        {
            let answers: Vec<Option<String>> = working
                .iter()
                .map(|&i| {
                    self.agents[i]
                        .proposal
                        .as_deref()
                        .and_then(|p| extract_answer(p, format))
                })
                .collect();
            if answers.iter().all(Option::is_some) && answers.windows(2).all(|w| w[0] == w[1]) {
                return Some(StopReason::Consensus);
            }
            let majority = aggregate::majority_vote(&answers);
            let absolute = majority
                .winner
                .filter(|_| majority.votes * 2 > working.len());
            let stable = absolute.is_some() && absolute == self.last_majority;
            self.last_majority = absolute;
            if stable {
                return Some(StopReason::StableMajority);
            }
        }
        None
    }

    fn score_or_finish(&mut self) -> Result<Step, StepError> {
        if self.stop_reason.is_none() {
            self.stop_reason = Some(StopReason::RoundsCompleted);
        }
        if self.budget_left() == Some(0) {
            self.stop_reason = Some(StopReason::BudgetExhausted);
            return Ok(self.finish());
        }
        let calls = self.score_calls();
        if calls.is_empty() {
            return Ok(self.finish());
        }
        Ok(self.emit(Phase::Score, self.round, calls))
    }

    fn emit(&mut self, phase: Phase, round: u32, calls: Vec<NewCall>) -> Step {
        self.phase = phase;
        let mut out = Vec::with_capacity(calls.len());
        for (agent, messages, meta, kind) in calls {
            let id = self.next_call;
            self.next_call += 1;
            let spec = &self.council.agents[agent];
            let max_tokens = match self.budget_left() {
                Some(left) => self
                    .config
                    .max_tokens_per_call
                    .min(left.min(u64::from(u32::MAX)) as u32)
                    .max(1),
                None => self.config.max_tokens_per_call,
            };
            let (temperature, max_tokens) = match (&kind, phase) {
                // Judging is deterministic: greedy, and short.
                (CallKind::ScoreChoices { .. }, _) => (0.0, 1),
                (_, Phase::Score) => (0.0, max_tokens),
                _ => (spec.sampling.temperature, max_tokens),
            };
            let sampling = CallSampling {
                temperature,
                top_p: spec.sampling.top_p,
                seed: mix(&[
                    self.seed,
                    spec.sampling.seed,
                    u64::from(round),
                    phase as u64,
                ]),
                max_tokens,
            };
            self.pending.insert(
                id,
                Pending {
                    agent,
                    phase,
                    round,
                    meta,
                    messages: messages.clone(),
                },
            );
            out.push(LlmCall {
                id,
                agent: spec.id.clone(),
                phase,
                round,
                messages,
                sampling,
                kind,
            });
        }
        self.progress.push(Progress::PhaseStarted {
            phase,
            round,
            calls: out.len(),
        });
        Step::Calls(out)
    }

    fn propose_calls(&self) -> Vec<NewCall> {
        (0..self.council.agents.len())
            .map(|i| {
                (
                    i,
                    prompts::propose(&self.council.agents[i], &self.task),
                    CallMeta::Propose,
                    CallKind::Generate,
                )
            })
            .collect()
    }

    /// The peers `reviewer` sees this round, with labels shuffled for this reviewer.
    fn visible_peers(&self, reviewer: usize, round: u32, tag: u64) -> (Vec<String>, Vec<usize>) {
        let working = self.working();
        let others: Vec<usize> = working.iter().copied().filter(|&a| a != reviewer).collect();
        let mut rng = SplitMix::new(mix(&[self.seed, tag, u64::from(round), reviewer as u64]));
        let mut peers = match self.config.visibility {
            Visibility::All => others,
            Visibility::Ring => {
                let pos = working.iter().position(|&a| a == reviewer).unwrap_or(0);
                let next = working[(pos + 1) % working.len()];
                if next == reviewer {
                    Vec::new()
                } else {
                    vec![next]
                }
            }
            Visibility::Sparse { peers } => {
                let mut others = others;
                rng.shuffle(&mut others);
                others.truncate(peers);
                others
            }
        };
        rng.shuffle(&mut peers);
        let labels = (0..peers.len()).map(label).collect();
        (labels, peers)
    }

    /// (label, current proposal) of each author, for quoting in a prompt.
    fn labelled<'a>(&'a self, labels: &[String], authors: &[usize]) -> Vec<(String, &'a str)> {
        labels
            .iter()
            .zip(authors)
            .map(|(l, &a)| {
                (
                    l.clone(),
                    self.agents[a].proposal.as_deref().unwrap_or_default(),
                )
            })
            .collect()
    }

    fn critique_calls(&mut self) -> Vec<NewCall> {
        self.critiques = vec![Vec::new(); self.agents.len()];
        let mut calls = Vec::new();
        for reviewer in self.working() {
            let (labels, authors) = self.visible_peers(reviewer, self.round, 1);
            if authors.is_empty() {
                continue;
            }
            let peers = self.labelled(&labels, &authors);
            let messages = prompts::critique(
                &self.council.agents[reviewer],
                &self.task,
                &peers,
                self.round,
            );
            calls.push((
                reviewer,
                messages,
                CallMeta::Critique { labels, authors },
                CallKind::Generate,
            ));
        }
        calls
    }

    fn revise_calls(&mut self) -> Vec<NewCall> {
        let mut calls = Vec::new();
        for author in self.working() {
            if self.critiques[author].is_empty() {
                continue;
            }
            // Reviewers are anonymous and their order is shuffled per author.
            let mut order: Vec<usize> = (0..self.critiques[author].len()).collect();
            SplitMix::new(mix(&[self.seed, 2, u64::from(self.round), author as u64]))
                .shuffle(&mut order);
            let critiques: Vec<&str> = order
                .iter()
                .map(|&i| self.critiques[author][i].as_str())
                .collect();
            let own = self.agents[author].proposal.as_deref().unwrap_or_default();
            let messages = prompts::revise(
                &self.council.agents[author],
                &self.task,
                own,
                &critiques,
                self.round,
            );
            calls.push((author, messages, CallMeta::Revise, CallKind::Generate));
        }
        calls
    }

    fn finish(&mut self) -> Step {
        self.done = true;
        self.progress.push(Progress::ScoresReady);
        Step::Done(Box::new(self.outcome()))
    }

    fn outcome(&self) -> Outcome {
        let stop_reason = self.stop_reason.unwrap_or(StopReason::RoundsCompleted);
        let base = Outcome {
            task: self.task.id.clone(),
            council: self.council.id.clone(),
            status: OutcomeStatus::Completed,
            proposals: Vec::new(),
            winner: None,
            decided_by: None,
            judging: self.judgements.ballots().1,
            margin: None,
            stop_reason,
            rounds_run: self.rounds_run(),
            majority_answer: None,
            failed_agents: self.failed.clone(),
            usage: self.usage,
            transcript: self.transcript.clone(),
        };
        if stop_reason == StopReason::QuorumLost {
            let reason = format!(
                "{} of {} agents still working; quorum needs {}",
                self.working().len(),
                self.council.agents.len(),
                self.config.quorum.required(self.council.agents.len())
            );
            return Outcome {
                status: OutcomeStatus::Failed { reason },
                ..base
            };
        }
        self.ranked(base)
    }

    fn rounds_run(&self) -> u32 {
        self.transcript
            .iter()
            .filter(|r| r.phase == Phase::Revise || r.phase == Phase::Critique)
            .map(|r| r.round)
            .max()
            .unwrap_or(0)
    }
}
