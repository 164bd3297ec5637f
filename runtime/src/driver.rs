//! Runs deliberations against a `Backend`: every call of a phase is submitted at once, so the
//! engine batches them (and the calls of every other deliberation running at the same time).

use std::time::{Duration, SystemTime};

use council_councils::prompts::{Message, MessageRole};
use council_councils::{
    AgentId, CallError, CallKind, CallSampling, Completion, Deliberation, LlmCall, Outcome, Phase,
    Reply, Step, StepError,
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

/// What one submitted call came back with.
enum Answer {
    Done(Reply),
    /// The backend's queue was full: the call waits for room and goes again.
    Refused(u64),
}

/// Submits `call` and spawns the wait for its reply.
fn submit(backend: &dyn Backend, call: &LlmCall, tasks: &mut tokio::task::JoinSet<Answer>) {
    let id = call.id;
    let settle = move |result: Result<Completion, council_inference::InferenceError>| match result {
        Err(council_inference::InferenceError::Overloaded { .. }) => Answer::Refused(id),
        result => Answer::Done(Reply {
            call: id,
            result: result.map_err(call_error),
        }),
    };
    match &call.kind {
        CallKind::Generate => {
            let future = backend.generate(request(call));
            tasks.spawn(async move { settle(future.await.map(completion)) });
        }
        CallKind::ScoreChoices { choices } => {
            let prompt = Prompt::Chat(chat_messages(&call.messages));
            let future = backend.score(ScoreRequest::new(prompt, choices.clone()));
            tasks.spawn(async move { settle(future.await.map(scored)) });
        }
    }
}

/// How long a refused call waits before it is submitted again when no other call of its phase
/// came back meanwhile.
const REFUSED_WAIT: Duration = Duration::from_millis(50);

/// Answers every call of one phase concurrently, reporting each as it comes back. A phase
/// larger than the backend's queue does not fail: a call the backend refuses for lack of room
/// waits until another call comes back (or a moment passes) and is submitted again, so a large
/// council loses no judgement to admission. Dropping the returned future aborts the tasks,
/// which drops their backend futures and so cancels the requests.
async fn answer_all(
    backend: &dyn Backend,
    calls: Vec<LlmCall>,
    on_event: &mut (dyn FnMut(Event) + Send),
) -> Result<Vec<Reply>, DriverError> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut replies = Vec::with_capacity(calls.len());
    let mut waiting: std::collections::VecDeque<LlmCall> = std::collections::VecDeque::new();
    // The calls still without a reply.
    let mut by_id = std::collections::HashMap::new();
    for call in calls {
        submit(backend, &call, &mut tasks);
        by_id.insert(call.id, call);
    }
    while !tasks.is_empty() || !waiting.is_empty() {
        let joined = if tasks.is_empty() {
            // Everything in flight came back and the rest was refused: give the backend a
            // moment (its queue holds other callers' work) and try again.
            tokio::time::sleep(REFUSED_WAIT).await;
            None
        } else if waiting.is_empty() {
            tasks.join_next().await
        } else {
            tokio::select! {
                j = tasks.join_next() => j,
                () = tokio::time::sleep(REFUSED_WAIT) => None,
            }
        };
        if let Some(joined) = joined {
            match joined.map_err(|e| DriverError::Join(e.to_string()))? {
                Answer::Done(reply) => {
                    if let Some(call) = by_id.remove(&reply.call) {
                        on_event(Event::CallDone {
                            agent: call.agent,
                            phase: call.phase,
                            round: call.round,
                            ok: reply.result.is_ok(),
                        });
                    }
                    replies.push(reply);
                }
                Answer::Refused(id) => {
                    if let Some(call) = by_id.get(&id) {
                        waiting.push_back(call.clone());
                    }
                    continue;
                }
            }
        }
        // Room may have freed up: resubmit what waits, oldest first.
        for call in std::mem::take(&mut waiting) {
            submit(backend, &call, &mut tasks);
        }
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

/// A backend error as the deliberation sees it.
fn call_error(e: council_inference::InferenceError) -> CallError {
    CallError {
        message: e.to_string(),
        transient: e.is_transient(),
    }
}
