//! What the engine thread is asked to do, and a generation request inside it: a [`Job`] as
//! submitted, a [`Sequence`] while it waits or runs.

use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::cache::{BlockId, EntryId, KvPool, ROOT};
use super::sampler::Sampler;
use crate::error::InferenceError;
use crate::request::{
    FinishReason, GenerateRequest, GenerateResult, ScoreResult, Timings, TokenLogprob, Usage,
};

pub(super) type ReplySender = oneshot::Sender<Result<GenerateResult, InferenceError>>;

/// A request on its way to, or inside, the engine thread.
#[derive(Debug)]
pub(super) struct Job {
    pub(super) prompt: Vec<u32>,
    pub(super) request: GenerateRequest,
    pub(super) reply: oneshot::Sender<Result<GenerateResult, InferenceError>>,
    pub(super) submitted: Instant,
    pub(super) _permit: OwnedSemaphorePermit,
}

/// Choices to score after one prompt, on their way to the engine thread.
#[derive(Debug)]
pub(super) struct ScoreJob {
    pub(super) prompt: Vec<u32>,
    /// Token ids of each choice.
    pub(super) choices: Vec<Vec<u32>>,
    /// Log-probabilities found so far, one per scored choice.
    pub(super) scores: Vec<f64>,
    /// Prompt tokens the first pass took from the prefix cache.
    pub(super) cached_prompt: Option<usize>,
    pub(super) reply: oneshot::Sender<Result<ScoreResult, InferenceError>>,
    pub(super) _permit: OwnedSemaphorePermit,
}

/// What the engine thread is asked to do.
#[derive(Debug)]
pub(super) enum Command {
    Generate(Job),
    Score(ScoreJob),
}

/// A generation request inside the engine, waiting or running.
#[derive(Debug)]
pub(super) struct Sequence {
    pub(super) job: Job,
    pub(super) sampler: Sampler,
    /// Prompt followed by generated tokens.
    pub(super) history: Vec<u32>,
    /// The blocks holding this sequence's KV.
    pub(super) table: Vec<BlockId>,
    /// Tokens of `history` whose KV is in `table`.
    pub(super) cached: usize,
    /// Blocks of `table` registered in the prefix cache, and the entry of the last one.
    pub(super) registered: usize,
    pub(super) entry: EntryId,
    pub(super) logprobs: Option<Vec<TokenLogprob>>,
    /// Prompt tokens served from the prefix cache at first admission.
    pub(super) cached_prompt: usize,
    pub(super) admitted: Option<Instant>,
    pub(super) first_token: Option<Instant>,
    /// Times later requests were admitted before this one while it waited.
    pub(super) bypassed: u32,
    /// Whether it waits, at the last admission, for a running sequence to compute a prefix
    /// they share (waiting for that is not being passed over).
    pub(super) awaits_sibling: bool,
    /// Whether its last token was sampled here, so that its next step is a decode (false
    /// while its prompt, or its tokens after a preemption, are being computed).
    pub(super) decoding: bool,
}

impl Sequence {
    pub(super) fn new(job: Job) -> Self {
        Self {
            sampler: Sampler::new(job.request.sampling),
            history: job.prompt.clone(),
            table: Vec::new(),
            cached: 0,
            registered: 0,
            entry: ROOT,
            logprobs: job.request.top_logprobs.map(|_| Vec::new()),
            cached_prompt: 0,
            admitted: None,
            first_token: None,
            bypassed: 0,
            awaits_sibling: false,
            decoding: false,
            job,
        }
    }

    pub(super) fn generated(&self) -> &[u32] {
        &self.history[self.job.prompt.len()..]
    }

    /// Releases its KV; it will be recomputed from its tokens if it runs again.
    pub(super) fn evict(&mut self, pool: &mut KvPool) {
        pool.release_all(&mut self.table);
        self.decoding = false;
        self.cached = 0;
        self.registered = 0;
        self.entry = ROOT;
    }

    /// Registers the full blocks whose KV is computed in the prefix cache.
    pub(super) fn register_blocks(&mut self, pool: &mut KvPool) {
        let size = pool.block_size();
        while (self.registered + 1) * size <= self.cached {
            let at = self.registered * size;
            let block = self.table[self.registered];
            self.entry = pool.register(block, self.entry, &self.history[at..at + size]);
            self.registered += 1;
        }
    }

    /// Consumes a finished sequence into its reply channel and what to send on it.
    pub(super) fn into_result(
        self,
        outcome: Result<(FinishReason, String), InferenceError>,
        now: Instant,
    ) -> (ReplySender, Result<GenerateResult, InferenceError>) {
        let Sequence {
            job,
            mut history,
            admitted,
            first_token,
            logprobs,
            cached_prompt,
            ..
        } = self;
        let prompt_tokens = job.prompt.len();
        let token_ids = history.split_off(prompt_tokens);
        let submitted = job.submitted;
        let result = outcome.map(|(finish_reason, text)| GenerateResult {
            text,
            usage: Usage {
                prompt_tokens,
                cached_prompt_tokens: cached_prompt,
                completion_tokens: token_ids.len(),
            },
            token_ids,
            finish_reason,
            timings: Timings {
                queue: admitted.unwrap_or(now) - submitted,
                first_token: first_token.unwrap_or(now) - submitted,
                total: now - submitted,
            },
            logprobs,
        });
        (job.reply, result)
    }
}
