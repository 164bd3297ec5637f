//! Runs deliberations against a `Backend`: every call of a phase is submitted at once, so the
//! engine batches them (and the calls of every other deliberation running at the same time).

use std::time::SystemTime;

use council_councils::prompts::{Message, MessageRole};
use council_councils::{
    AgentId, CallKind, CallSampling, Completion, Deliberation, LlmCall, Outcome, Phase, Reply,
    Step, StepError,
};
use council_inference::{
    Backend, ChatMessage, GenerateRequest, Prompt, Sampling, ScoreRequest, ScoreResult,
};

/// The driver could not finish a deliberation (a protocol bug, never a model failure: failed
/// calls are data inside the outcome).
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("deliberation protocol: {0}")]
    Protocol(#[from] StepError),
    #[error("a backend task panicked or was aborted: {0}")]
    Join(String),
}

fn request(call: &LlmCall) -> GenerateRequest {
    chat_request(&call.messages, call.sampling)
}

/// The councils' messages as the backend's chat messages.
fn chat_messages(messages: &[Message]) -> Vec<ChatMessage> {
    messages
        .iter()
        .map(|m| match m.role {
            MessageRole::System => ChatMessage::system(m.content.clone()),
            MessageRole::User => ChatMessage::user(m.content.clone()),
        })
        .collect()
}

/// The backend request of one chat call of the councils' vocabulary.
pub fn chat_request(messages: &[Message], sampling: CallSampling) -> GenerateRequest {
    GenerateRequest::chat(chat_messages(messages), sampling.max_tokens as usize).with_sampling(
        Sampling {
            temperature: sampling.temperature,
            top_k: 0,
            top_p: sampling.top_p,
            repetition_penalty: 1.0,
            seed: sampling.seed,
        },
    )
}

fn completion(result: council_inference::GenerateResult) -> Completion {
    Completion {
        text: result.text,
        prompt_tokens: result.usage.prompt_tokens as u64,
        completion_tokens: result.usage.completion_tokens as u64,
        choice_logprobs: None,
    }
}

fn scored(result: ScoreResult) -> Completion {
    Completion {
        text: String::new(),
        prompt_tokens: result.usage.prompt_tokens as u64,
        completion_tokens: 0,
        choice_logprobs: Some(result.logprobs),
    }
}

/// What a watcher of a running deliberation hears, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A phase's replies were taken: the deliberation can resume from here.
    Checkpoint(Box<council_councils::checkpoint::Checkpoint>),
    /// The calls of a phase were submitted.
    PhaseStarted {
        phase: Phase,
        round: u32,
        calls: usize,
    },
    /// One call of the current phase came back.
    CallDone {
        agent: AgentId,
        phase: Phase,
        round: u32,
        ok: bool,
    },
}

/// Answers every call of one phase concurrently, reporting each as it comes back. Dropping the
/// returned future aborts the tasks, which drops their backend futures and so cancels the
/// requests.
async fn answer_all(
    backend: &dyn Backend,
    calls: Vec<LlmCall>,
    on_event: &mut (dyn FnMut(Event) + Send),
) -> Result<Vec<Reply>, DriverError> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut replies = Vec::with_capacity(calls.len());
    let mut callers = std::collections::HashMap::new();
    for call in calls {
        callers.insert(call.id, (call.agent.clone(), call.phase, call.round));
        match call.kind {
            CallKind::Generate => {
                let future = backend.generate(request(&call));
                tasks.spawn(async move {
                    Reply {
                        call: call.id,
                        result: future.await.map(completion).map_err(|e| e.to_string()),
                    }
                });
            }
            CallKind::ScoreChoices { ref choices } => {
                let prompt = Prompt::Chat(chat_messages(&call.messages));
                let scoring = ScoreRequest::new(prompt, choices.clone());
                let future = backend.score(scoring);
                tasks.spawn(async move {
                    Reply {
                        call: call.id,
                        result: future.await.map(scored).map_err(|e| e.to_string()),
                    }
                });
            }
        }
    }
    let mut report = |reply: &Reply| {
        if let Some((agent, phase, round)) = callers.remove(&reply.call) {
            on_event(Event::CallDone {
                agent,
                phase,
                round,
                ok: reply.result.is_ok(),
            });
        }
    };
    for reply in &replies {
        report(reply);
    }
    while let Some(joined) = tasks.join_next().await {
        let reply = joined.map_err(|e| DriverError::Join(e.to_string()))?;
        report(&reply);
        replies.push(reply);
    }
    Ok(replies)
}

/// When each phase of a deliberation finished, by (phase, round).
pub type Timeline = Vec<(Phase, u32, SystemTime)>;

/// Drives `deliberation` to its outcome on `backend`.
pub async fn run(
    backend: &dyn Backend,
    deliberation: Deliberation,
) -> Result<Outcome, DriverError> {
    run_timed(backend, deliberation, &mut |_| {})
        .await
        .map(|(outcome, _)| outcome)
}

/// Like [`run`], also recording when each phase finished (for proposal timestamps) and telling
/// `on_event` what happens as it happens.
pub async fn run_timed(
    backend: &dyn Backend,
    deliberation: Deliberation,
    on_event: &mut (dyn FnMut(Event) + Send),
) -> Result<(Outcome, Timeline), DriverError> {
    run_timed_from(backend, deliberation, None, on_event).await
}

/// Like [`run_timed`], for a deliberation restored from a checkpoint with the calls it was
/// waiting for (`pending`, from `Deliberation::restore`).
pub async fn run_timed_from(
    backend: &dyn Backend,
    mut deliberation: Deliberation,
    mut pending: Option<Vec<LlmCall>>,
    on_event: &mut (dyn FnMut(Event) + Send),
) -> Result<(Outcome, Timeline), DriverError> {
    let mut replies = Vec::new();
    let mut timeline = Timeline::new();
    let mut first = pending.is_none();
    loop {
        let calls = match pending.take() {
            Some(calls) => calls,
            None => match deliberation.step(std::mem::take(&mut replies))? {
                Step::Done(outcome) => return Ok((*outcome, timeline)),
                Step::Calls(calls) => {
                    if !first {
                        on_event(Event::Checkpoint(Box::new(deliberation.checkpoint())));
                    }
                    first = false;
                    calls
                }
            },
        };
        let phase = calls.first().map(|c| (c.phase, c.round));
        if let Some((phase, round)) = phase {
            on_event(Event::PhaseStarted {
                phase,
                round,
                calls: calls.len(),
            });
        }
        replies = answer_all(backend, calls, on_event).await?;
        if let Some((phase, round)) = phase {
            timeline.push((phase, round, SystemTime::now()));
        }
    }
}
