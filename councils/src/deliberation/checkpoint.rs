//! Checkpoints of a deliberation between steps. The machine is deterministic, so its state is
//! fully described by its inputs plus the replies it has taken; a checkpoint stores the replies
//! (and a fingerprint of the inputs) in plain DTOs, and restoring replays them. Domain types
//! carry no serialisation format.

use serde::{Deserialize, Serialize};

use super::{CallError, Completion, Deliberation, LlmCall, Reply, Step, StepError};
use crate::rng::hash_str;
use crate::spec::{CouncilSpec, DeliberationConfig, Task};

/// Serialised form of one reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyDto {
    pub call: u64,
    pub text: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub choice_logprobs: Option<Vec<f64>>,
    pub error: Option<String>,
    /// The error would come again (absent in older checkpoints: transient).
    #[serde(default)]
    pub error_permanent: bool,
}

/// Everything needed to resume a deliberation, given the same council, task, config and seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// Hash of the inputs; restoring with other inputs is refused.
    pub fingerprint: u64,
    pub seed: u64,
    /// Replies given to each `step` after the first, in order.
    pub steps: Vec<Vec<ReplyDto>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("checkpoint version {0} is not supported (expected {CHECKPOINT_VERSION})")]
    Version(u32),
    #[error("checkpoint was taken with a different council, task, config or seed")]
    Mismatch,
    #[error("checkpoint does not replay: {0}")]
    Replay(#[from] StepError),
    #[error("checkpoint replays to a finished deliberation")]
    AlreadyDone,
}

pub const CHECKPOINT_VERSION: u32 = 1;

pub(crate) fn fingerprint(
    council: &CouncilSpec,
    task: &Task,
    config: &DeliberationConfig,
    seed: u64,
) -> u64 {
    hash_str(&format!(
        "{council:?}\u{0}{task:?}\u{0}{config:?}\u{0}{seed}"
    ))
}

impl From<&Reply> for ReplyDto {
    fn from(r: &Reply) -> Self {
        match &r.result {
            Ok(c) => ReplyDto {
                call: r.call,
                text: Some(c.text.clone()),
                prompt_tokens: c.prompt_tokens,
                completion_tokens: c.completion_tokens,
                choice_logprobs: c.choice_logprobs.clone(),
                error: None,
                error_permanent: false,
            },
            Err(e) => ReplyDto {
                call: r.call,
                text: None,
                prompt_tokens: 0,
                completion_tokens: 0,
                choice_logprobs: None,
                error: Some(e.message.clone()),
                error_permanent: !e.transient,
            },
        }
    }
}

impl From<&ReplyDto> for Reply {
    fn from(d: &ReplyDto) -> Self {
        let result = match (&d.error, &d.text) {
            (Some(e), _) => Err(CallError {
                message: e.clone(),
                transient: !d.error_permanent,
            }),
            (None, text) => Ok(Completion {
                text: text.clone().unwrap_or_default(),
                prompt_tokens: d.prompt_tokens,
                completion_tokens: d.completion_tokens,
                choice_logprobs: d.choice_logprobs.clone(),
            }),
        };
        Reply {
            call: d.call,
            result,
        }
    }
}

impl Deliberation {
    /// Rebuilds a deliberation from its inputs and a checkpoint, returning it with the calls it
    /// is waiting for (to be sent again). Checks added with `with_check` must be added again
    /// before the outcome; they do not change the calls.
    pub fn restore(
        council: CouncilSpec,
        task: Task,
        config: DeliberationConfig,
        checkpoint: &Checkpoint,
    ) -> Result<(Deliberation, Vec<LlmCall>), RestoreError> {
        if checkpoint.version != CHECKPOINT_VERSION {
            return Err(RestoreError::Version(checkpoint.version));
        }
        if fingerprint(&council, &task, &config, checkpoint.seed) != checkpoint.fingerprint {
            return Err(RestoreError::Mismatch);
        }
        let mut deliberation = Deliberation::new(council, task, config, checkpoint.seed);
        let mut step = deliberation.step(Vec::new())?;
        for replies in &checkpoint.steps {
            step = deliberation.step(replies.iter().map(Reply::from).collect())?;
        }
        match step {
            Step::Calls(calls) => Ok((deliberation, calls)),
            Step::Done(_) => Err(RestoreError::AlreadyDone),
        }
    }
}
