//! The engine thread: the scheduler that turns everything submitted into forward passes.
//!
//! Every step it plans one ragged forward under a token budget:
//! 1. every running sequence that is decoding gets its one token;
//! 2. sequences still prefilling get the next chunk of their prompt, oldest first, as far as
//!    the budget goes (so a long prompt never stalls the decodes of others);
//! 3. waiting requests are admitted first come, first served while the batch has room, the
//!    budget has tokens and the KV pool has blocks (their cached prefix costs nothing). A
//!    request that does not fit may be passed by later ones only a bounded number of times;
//!    after that nothing is admitted before it (aging, so nothing starves).
//!
//! When a sequence needs a KV block and none is left, the youngest running sequence is
//! preempted: its blocks are released (its full blocks stay in the prefix cache) and it goes
//! back to the front of the queue with its tokens so far, to be recomputed when it is
//! readmitted. Its sampler state is kept, so its output is the one it would have produced.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rayon::prelude::*;
use tokio::sync::{mpsc, oneshot};

use super::cache::{BlockId, EntryId, KvPool, ROOT};
use super::model::{self, Logits, QwenModel, SeqChunk};
use super::sampler::{self, Sampler};
use super::tokenizer::ChatTokenizer;
use super::{Command, Counters, Job, ScoreJob};
use crate::error::InferenceError;
use crate::request::{FinishReason, GenerateResult, ScoreResult, Timings, TokenLogprob, Usage};

type ReplySender = oneshot::Sender<Result<GenerateResult, InferenceError>>;

/// Scheduling limits of the engine thread.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Sequences in one forward.
    pub max_batch: usize,
    /// Tokens in one forward (decode tokens plus prefill chunks).
    pub max_step_tokens: usize,
    /// Tokens one sequence may hold.
    pub context_window: usize,
    /// Times a waiting request may be passed by later ones before it blocks admissions.
    pub max_bypass: u32,
    /// Token ids that may be sampled: those the tokenizer can decode.
    pub sample_vocab: usize,
}

/// What became of a waiting request at an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    Admitted,
    /// A running sequence is computing a prefix they share; it starts once that is cached.
    AwaitsSibling,
    /// Too few tokens left in the step's budget, or blocks in the pool.
    NoRoom,
}

/// Whole blocks of `size` tokens at the start of `a` and `b` that are the same (compared a
/// block at a time, as slices).
fn shared_blocks(a: &[u32], b: &[u32], size: usize) -> usize {
    a.chunks_exact(size)
        .zip(b.chunks_exact(size))
        .take_while(|(x, y)| x == y)
        .count()
}

/// A generation request inside the engine, waiting or running.
#[derive(Debug)]
struct Sequence {
    job: Job,
    sampler: Sampler,
    /// Prompt followed by generated tokens.
    history: Vec<u32>,
    /// The blocks holding this sequence's KV.
    table: Vec<BlockId>,
    /// Tokens of `history` whose KV is in `table`.
    cached: usize,
    /// Blocks of `table` registered in the prefix cache, and the entry of the last one.
    registered: usize,
    entry: EntryId,
    logprobs: Option<Vec<TokenLogprob>>,
    /// Prompt tokens served from the prefix cache at first admission.
    cached_prompt: usize,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    /// Times later requests were admitted before this one while it waited.
    bypassed: u32,
    /// Whether it waits, at the last admission, for a running sequence to compute a prefix
    /// they share (waiting for that is not being passed over).
    awaits_sibling: bool,
    /// Whether its last token was sampled here, so that its next step is a decode (false
    /// while its prompt, or its tokens after a preemption, are being computed).
    decoding: bool,
}

impl Sequence {
    fn new(job: Job) -> Self {
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

    fn generated(&self) -> &[u32] {
        &self.history[self.job.prompt.len()..]
    }

    /// Releases its KV; it will be recomputed from its tokens if it runs again.
    fn evict(&mut self, pool: &mut KvPool) {
        pool.release_all(&mut self.table);
        self.decoding = false;
        self.cached = 0;
        self.registered = 0;
        self.entry = ROOT;
    }

    /// Registers the full blocks whose KV is computed in the prefix cache.
    fn register_blocks(&mut self, pool: &mut KvPool) {
        let size = pool.block_size();
        while (self.registered + 1) * size <= self.cached {
            let at = self.registered * size;
            let block = self.table[self.registered];
            self.entry = pool.register(block, self.entry, &self.history[at..at + size]);
            self.registered += 1;
        }
    }

    /// Consumes a finished sequence into its reply channel and what to send on it.
    fn into_result(
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

/// New tokens of one running sequence in the planned forward.
#[derive(Debug, Clone, Copy)]
struct Planned {
    /// Index into `running`.
    seq: usize,
    len: usize,
}

/// The engine thread's state: it alone touches the model and the cache.
#[derive(Debug)]
pub(super) struct Worker {
    model: QwenModel,
    pool: KvPool,
    tokenizer: Arc<ChatTokenizer>,
    rx: mpsc::Receiver<Command>,
    counters: Arc<Counters>,
    limits: Limits,
    /// Scoring requests, served ahead of generation admissions.
    scoring: VecDeque<ScoreJob>,
    waiting: VecDeque<Sequence>,
    /// In admission order (oldest first).
    running: Vec<Sequence>,
}

impl Worker {
    pub fn new(
        model: QwenModel,
        pool: KvPool,
        tokenizer: Arc<ChatTokenizer>,
        rx: mpsc::Receiver<Command>,
        counters: Arc<Counters>,
        limits: Limits,
    ) -> Self {
        Self {
            model,
            pool,
            tokenizer,
            rx,
            counters,
            limits,
            scoring: VecDeque::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    pub fn run(mut self) {
        let _span = tracing::info_span!("engine").entered();
        loop {
            if self.running.is_empty() && self.waiting.is_empty() && self.scoring.is_empty() {
                match self.rx.blocking_recv() {
                    Some(command) => self.take(command),
                    None => break,
                }
            }
            while let Ok(command) = self.rx.try_recv() {
                self.take(command);
            }
            self.drop_cancelled();
            let scoring_waits = self.score_next();
            let plan = self.schedule(!scoring_waits);
            if !plan.is_empty() {
                self.step(&plan);
            }
            self.publish();
        }
        tracing::info!("engine stopped: every handle is gone");
    }

    fn take(&mut self, command: Command) {
        match command {
            Command::Generate(job) => self.waiting.push_back(Sequence::new(job)),
            Command::Score(job) => self.scoring.push_back(job),
        }
    }

    /// Copies what the scheduler knows into the counters the handles read.
    fn publish(&self) {
        let c = &self.counters;
        c.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        let stats = self.pool.prefix_stats();
        c.prefix_hits.store(stats.hits, Ordering::Relaxed);
        c.prefix_lookups.store(stats.lookups, Ordering::Relaxed);
        c.prefix_evictions.store(stats.evictions, Ordering::Relaxed);
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len() + self.running.len();
        let pool = &mut self.pool;
        let mut keep = |seq: &mut Sequence| {
            if seq.job.reply.is_closed() {
                seq.evict(pool);
                false
            } else {
                true
            }
        };
        self.waiting.retain_mut(&mut keep);
        self.running.retain_mut(&mut keep);
        let dropped = before - self.waiting.len() - self.running.len();
        self.counters
            .cancelled
            .fetch_add(dropped as u64, Ordering::Relaxed);
    }

    /// Plans the next forward: which running sequences compute how many tokens. Allocates the
    /// blocks they need, preempting the youngest sequences when the pool runs dry, and admits
    /// waiting requests if `admit`.
    fn schedule(&mut self, admit: bool) -> Vec<Planned> {
        let mut budget = self.limits.max_step_tokens;
        let mut plan = Vec::new();
        // Decodes first (the model takes decode chunks before prompt chunks), then prefill
        // chunks, each oldest first.
        for decoding in [true, false] {
            let mut i = 0;
            while i < self.running.len() && budget > 0 {
                let seq = &self.running[i];
                let remaining = seq.history.len() - seq.cached;
                if seq.decoding != decoding || plan.iter().any(|p: &Planned| p.seq == i) {
                    i += 1;
                    continue;
                }
                let len = remaining.min(budget);
                if self.grow(i, len, &mut plan) {
                    plan.push(Planned { seq: i, len });
                    budget -= len;
                    i += 1;
                }
                // Otherwise sequence i was itself preempted; the one now at i is next.
            }
        }
        if admit {
            self.admit(&mut budget, &mut plan);
        }
        plan
    }

    /// Gives running sequence `i` the blocks for `len` more tokens, preempting younger
    /// sequences (and finally `i` itself) if the pool has too few. Returns whether `i` runs.
    fn grow(&mut self, i: usize, len: usize, plan: &mut Vec<Planned>) -> bool {
        loop {
            let seq = &self.running[i];
            let need = self
                .pool
                .blocks_for(seq.cached + len)
                .saturating_sub(seq.table.len());
            if need <= self.pool.available() {
                let seq = &mut self.running[i];
                for _ in 0..need {
                    // `available` counted these blocks, so allocation cannot fail.
                    if let Some(block) = self.pool.allocate() {
                        seq.table.push(block);
                    }
                }
                return true;
            }
            let victim = self.running.len() - 1;
            self.preempt(victim, plan);
            if victim == i {
                return false;
            }
        }
    }

    /// Sends running sequence `i` back to the front of the queue, releasing its KV.
    fn preempt(&mut self, i: usize, plan: &mut Vec<Planned>) {
        let mut seq = self.running.remove(i);
        plan.retain(|p| p.seq != i);
        for p in plan.iter_mut() {
            if p.seq > i {
                p.seq -= 1;
            }
        }
        tracing::debug!(
            tokens = seq.history.len(),
            "KV pool exhausted: preempting the youngest sequence"
        );
        seq.register_blocks(&mut self.pool);
        seq.evict(&mut self.pool);
        self.counters.preempted.fetch_add(1, Ordering::Relaxed);
        self.waiting.push_front(seq);
    }

    /// Admits waiting requests in arrival order while the batch, the budget and the pool have
    /// room. A request that does not fit is passed over at most `max_bypass` times; one that
    /// waits for a running sibling to compute their shared prefix is passed without counting.
    fn admit(&mut self, budget: &mut usize, plan: &mut Vec<Planned>) {
        let mut i = 0;
        while i < self.waiting.len() && *budget > 0 && self.running.len() < self.limits.max_batch {
            match self.try_admit(i, budget, plan) {
                Admission::Admitted => {
                    for skipped in self.waiting.iter_mut().take(i) {
                        if !skipped.awaits_sibling {
                            skipped.bypassed += 1;
                        }
                    }
                    // From the front again: one that was passed may have used up its passes.
                    i = 0;
                    continue;
                }
                Admission::AwaitsSibling => {}
                Admission::NoRoom => {
                    if self.waiting[i].bypassed >= self.limits.max_bypass {
                        break;
                    }
                }
            }
            i += 1;
        }
        if self.running.is_empty() && !self.waiting.is_empty() && plan.is_empty() {
            // Nothing runs and the first request cannot start: it never will.
            if let Some(seq) = self.waiting.pop_front() {
                let needed = self.pool.blocks_for(seq.history.len());
                let total = self.pool.total_blocks();
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                let _ = seq.job.reply.send(Err(InferenceError::Model(format!(
                    "the request needs {needed} KV blocks; the pool has {total}"
                ))));
            }
        }
    }

    /// Admits waiting request `i` if its first chunk fits; takes its cached prefix. A request
    /// that shares more full blocks with a running sequence still computing its prompt than
    /// the prefix cache holds yet waits for them (requests submitted together share their
    /// common prefix instead of each computing it).
    fn try_admit(&mut self, i: usize, budget: &mut usize, plan: &mut Vec<Planned>) -> Admission {
        let seq = &self.waiting[i];
        let size = self.pool.block_size();
        // At least the last token is computed, for the logits to sample from.
        let cacheable = (seq.history.len() - 1) / size;
        let from_sibling = self
            .running
            .iter()
            .filter(|r| !r.decoding)
            .map(|r| shared_blocks(&r.history, &seq.history, size))
            .max()
            .unwrap_or(0)
            .min(cacheable);
        let awaits_sibling = from_sibling > 0
            && self.pool.prefix_cache_enabled()
            && self.pool.cached_blocks(&seq.history, cacheable) < from_sibling;
        self.waiting[i].awaits_sibling = awaits_sibling;
        if awaits_sibling {
            return Admission::AwaitsSibling;
        }
        let seq = &self.waiting[i];
        let (prefix, entry) = self.pool.lookup(&seq.history, cacheable);
        let cached = prefix.len() * size;
        let seq = &self.waiting[i];
        let len = (seq.history.len() - cached).min(*budget);
        let need = self.pool.blocks_for(cached + len) - prefix.len();
        // Keep a block per running sequence for its next decode, so that admitting does not
        // preempt at once.
        let reserve = self.running.len();
        if need + reserve > self.pool.available() {
            let mut prefix = prefix;
            self.pool.release_all(&mut prefix);
            return Admission::NoRoom;
        }
        let Some(mut seq) = self.waiting.remove(i) else {
            return Admission::NoRoom;
        };
        seq.table = prefix;
        seq.cached = cached;
        seq.registered = seq.table.len();
        seq.entry = entry;
        for _ in 0..need {
            if let Some(block) = self.pool.allocate() {
                seq.table.push(block);
            }
        }
        if seq.admitted.is_none() {
            seq.admitted = Some(Instant::now());
            seq.cached_prompt = cached.min(seq.job.prompt.len());
        }
        self.counters
            .cached_tokens
            .fetch_add(cached as u64, Ordering::Relaxed);
        self.running.push(seq);
        plan.push(Planned {
            seq: self.running.len() - 1,
            len,
        });
        *budget -= len;
        Admission::Admitted
    }

    /// Runs the planned forward, samples where a sequence's tokens are all computed, and
    /// answers the sequences that finished.
    fn step(&mut self, plan: &[Planned]) {
        let mut tokens = Vec::new();
        let mut rows = Vec::new();
        let mut prefill = 0;
        for p in plan {
            let seq = &self.running[p.seq];
            tokens.extend_from_slice(&seq.history[seq.cached..seq.cached + p.len]);
            if seq.cached + p.len == seq.history.len() {
                rows.push(tokens.len() as u32 - 1);
            }
            if !seq.decoding {
                prefill += p.len;
            }
        }
        let chunks: Vec<SeqChunk> = plan
            .iter()
            .map(|p| {
                let seq = &self.running[p.seq];
                SeqChunk {
                    table: &seq.table,
                    start: seq.cached,
                    len: p.len,
                    decode: seq.decoding,
                }
            })
            .collect();
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        self.counters
            .batched
            .fetch_add(plan.len() as u64, Ordering::Relaxed);
        self.counters
            .prompt_tokens
            .fetch_add(prefill as u64, Ordering::Relaxed);
        let result = self
            .model
            .forward(&tokens, &chunks, Logits::Rows(&rows), &self.pool);
        drop(chunks);
        // Ids past the tokenizer's (a checkpoint's padding) decode to nothing: never sampled.
        let logits = match result.and_then(|l| {
            if l.dim(1)? > self.limits.sample_vocab {
                l.narrow(1, 0, self.limits.sample_vocab)
            } else {
                Ok(l)
            }
        }) {
            Ok(logits) => logits,
            Err(e) => return self.fail_planned(plan, &e.to_string()),
        };
        // Greedy rows with nothing else to compute take their token from an argmax on the
        // device: one id per row crosses to the host instead of a row of logits.
        let plain_greedy = |seq: &Sequence| {
            let request = &seq.job.request;
            request.sampling.is_greedy()
                && request.sampling.repetition_penalty == 1.0
                && request.top_logprobs.is_none()
        };
        let argmax = if plan.iter().any(|p| {
            let seq = &self.running[p.seq];
            seq.cached + p.len == seq.history.len() && plain_greedy(seq)
        }) {
            match logits
                .argmax(candle_core::D::Minus1)
                .and_then(|t| t.to_vec1::<u32>())
            {
                Ok(ids) => Some(ids),
                Err(e) => return self.fail_planned(plan, &e.to_string()),
            }
        } else {
            None
        };
        let now = Instant::now();
        // Which running sequences take a token this step, and from which row of the logits.
        let mut row_of: Vec<Option<usize>> = vec![None; self.running.len()];
        let mut row = 0;
        for p in plan {
            let seq = &mut self.running[p.seq];
            seq.cached += p.len;
            seq.register_blocks(&mut self.pool);
            if seq.cached < seq.history.len() {
                continue;
            }
            row_of[p.seq] = Some(row);
            row += 1;
            seq.decoding = true;
        }
        // Each sequence draws from its own row with its own RNG, so the rows are drawn in
        // parallel and the tokens depend neither on the batch nor on the thread.
        let drawn: Vec<Option<Result<u32, InferenceError>>> = self
            .running
            .par_iter_mut()
            .zip(row_of.par_iter())
            .map(|(seq, row)| {
                let row = (*row)?;
                if let Some(ids) = argmax.as_ref().filter(|_| plain_greedy(seq)) {
                    return Some(Ok(ids[row]));
                }
                Some(
                    model::logits_row(&logits, row)
                        .map(|values| {
                            let token = seq.sampler.sample(&values, &seq.history);
                            if let (Some(lps), Some(top)) =
                                (seq.logprobs.as_mut(), seq.job.request.top_logprobs)
                            {
                                lps.push(sampler::token_logprob(&values, token, top));
                            }
                            token
                        })
                        .map_err(|e| InferenceError::Model(e.to_string())),
                )
            })
            .collect();
        let mut finished = Vec::new();
        for (i, drawn) in drawn.into_iter().enumerate() {
            let token = match drawn {
                None => continue,
                Some(Ok(token)) => token,
                Some(Err(e)) => {
                    finished.push((i, Err(e)));
                    continue;
                }
            };
            let seq = &mut self.running[i];
            seq.first_token.get_or_insert(now);
            self.counters
                .generated_tokens
                .fetch_add(1, Ordering::Relaxed);
            seq.history.push(token);
            if let Some(outcome) = finish(seq, token, &self.tokenizer, self.limits.context_window) {
                finished.push((i, outcome));
            }
        }
        // `finished` is in index order: removing from the back keeps the other indices valid.
        for (i, outcome) in finished.into_iter().rev() {
            let mut seq = self.running.remove(i);
            seq.evict(&mut self.pool);
            let counter = if outcome.is_ok() {
                &self.counters.finished
            } else {
                &self.counters.failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let (reply, result) = seq.into_result(outcome, now);
            let _ = reply.send(result);
        }
    }

    /// A forward failed: every sequence in it fails with `error`.
    fn fail_planned(&mut self, plan: &[Planned], error: &str) {
        tracing::error!(error, "forward failed; failing the batch");
        let mut planned: Vec<usize> = plan.iter().map(|p| p.seq).collect();
        planned.sort_unstable();
        for i in planned.into_iter().rev() {
            let mut seq = self.running.remove(i);
            seq.evict(&mut self.pool);
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            let _ = seq
                .job
                .reply
                .send(Err(InferenceError::Model(error.to_owned())));
        }
    }

    /// Scores as many choices of the first scoring request as the pool has blocks for, in two
    /// forwards (the prompt once, then every choice's tail after a share of the prompt's KV);
    /// answers it when all are done. Returns whether a request waits for blocks (then no new
    /// generation is admitted, so that running ones finish and free theirs).
    fn score_next(&mut self) -> bool {
        self.scoring.retain(|job| !job.reply.is_closed());
        let Some(job) = self.scoring.front_mut() else {
            return false;
        };
        let outcome = score_some(&self.model, &mut self.pool, job);
        let (done, waits) = match outcome {
            Ok(Scored { computed, cached }) => {
                self.counters.steps.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .prompt_tokens
                    .fetch_add(computed as u64, Ordering::Relaxed);
                self.counters
                    .cached_tokens
                    .fetch_add(cached as u64, Ordering::Relaxed);
                (None, false)
            }
            Err(ScoreWait::NoRoom) if !self.running.is_empty() => return true,
            Err(ScoreWait::NoRoom) => {
                let total = self.pool.total_blocks();
                let error = format!("scoring needs more KV blocks than the pool's {total}");
                (Some(InferenceError::Model(error)), false)
            }
            Err(ScoreWait::Failed(e)) => (Some(InferenceError::Model(e.to_string())), false),
        };
        let finished = done.is_some() || job.scores.len() == job.choices.len();
        if !finished {
            return waits;
        }
        let Some(job) = self.scoring.pop_front() else {
            return waits;
        };
        let result = match done {
            Some(e) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
            None => {
                self.counters.finished.fetch_add(1, Ordering::Relaxed);
                Ok(ScoreResult {
                    usage: Usage {
                        prompt_tokens: job.prompt.len(),
                        cached_prompt_tokens: job.cached_prompt.unwrap_or(0),
                        completion_tokens: 0,
                    },
                    logprobs: job.scores,
                })
            }
        };
        let _ = job.reply.send(result);
        waits
    }
}

/// Why scoring made no progress.
#[derive(Debug)]
enum ScoreWait {
    /// Not even one choice fits in the blocks available now.
    NoRoom,
    Failed(candle_core::Error),
}

/// Prompt tokens a scoring pass computed and took from cache.
#[derive(Debug)]
struct Scored {
    computed: usize,
    cached: usize,
}

/// Scores the next choices of `job` that fit in the pool, appending to `job.scores`.
fn score_some(
    model: &QwenModel,
    pool: &mut KvPool,
    job: &mut ScoreJob,
) -> Result<Scored, ScoreWait> {
    let size = pool.block_size();
    let prompt = &job.prompt;
    let full = prompt.len() / size;
    let (mut table, _) = pool.lookup(prompt, (prompt.len() - 1) / size);
    let matched = table.len() * size;
    let prompt_need = pool.blocks_for(prompt.len()) - table.len();
    // Blocks a choice needs beyond the prompt's full blocks, which it shares: a copy of the
    // prompt's partial last block and room for its own tokens but the last.
    let choice_need = |c: &Vec<u32>| {
        if c.len() < 2 {
            0
        } else {
            pool.blocks_for(prompt.len() + c.len() - 1) - full
        }
    };
    let mut take = 0;
    let mut need = prompt_need;
    for choice in &job.choices[job.scores.len()..] {
        if need + choice_need(choice) > pool.available() {
            break;
        }
        need += choice_need(choice);
        take += 1;
    }
    if take == 0 {
        pool.release_all(&mut table);
        return Err(ScoreWait::NoRoom);
    }
    for _ in 0..prompt_need {
        if let Some(block) = pool.allocate() {
            table.push(block);
        }
    }
    let choices = &job.choices[job.scores.len()..job.scores.len() + take];
    let mut tables = Vec::with_capacity(choices.len());
    let outcome = score_choices(model, pool, prompt, &table, matched, choices, &mut tables);
    for mut t in tables {
        pool.release_all(&mut t);
    }
    // The prompt's full blocks are registered so that the next group of choices, or the next
    // judge call on the same text, finds them.
    let mut entry = ROOT;
    for (b, chunk) in table.iter().zip(prompt.chunks_exact(size)) {
        entry = pool.register(*b, entry, chunk);
    }
    pool.release_all(&mut table);
    let (scores, tails) = outcome.map_err(ScoreWait::Failed)?;
    job.scores.extend(scores);
    job.cached_prompt.get_or_insert(matched);
    Ok(Scored {
        computed: prompt.len() - matched + tails,
        cached: matched,
    })
}

/// Prefills `prompt` from position `matched` into `table`, then each choice's tail in a table
/// of its own (pushed onto `tables`, for the caller to release). Returns each choice's
/// log-probability and the number of tail tokens computed.
fn score_choices(
    model: &QwenModel,
    pool: &mut KvPool,
    prompt: &[u32],
    table: &[BlockId],
    matched: usize,
    choices: &[Vec<u32>],
    tables: &mut Vec<Vec<BlockId>>,
) -> candle_core::Result<(Vec<f64>, usize)> {
    let size = pool.block_size();
    let full = prompt.len() / size;
    let whole = SeqChunk {
        table,
        start: matched,
        len: prompt.len() - matched,
        decode: false,
    };
    let last = [whole.len as u32 - 1];
    let first = model.forward(&prompt[matched..], &[whole], Logits::Rows(&last), pool)?;
    let first = model::logits_row(&first, 0)?;
    // Each choice's tokens but the last: their rows predict the choice's tokens after the first.
    for choice in choices {
        if choice.len() < 2 {
            continue;
        }
        let mut own: Vec<BlockId> = Vec::new();
        for &b in &table[..full] {
            pool.share(b);
            own.push(b);
        }
        let needed = pool.blocks_for(prompt.len() + choice.len() - 1);
        while own.len() < needed {
            match pool.allocate() {
                Some(block) => own.push(block),
                None => {
                    pool.release_all(&mut own);
                    candle_core::bail!("KV pool ran dry while scoring");
                }
            }
        }
        tables.push(own);
        if !prompt.len().is_multiple_of(size) {
            pool.copy_block(
                table[full],
                tables[tables.len() - 1][full],
                prompt.len() % size,
            )?;
        }
    }
    let mut tokens = Vec::new();
    let mut chunks = Vec::new();
    let mut scored = tables.iter();
    for choice in choices.iter().filter(|c| c.len() >= 2) {
        let own = scored
            .next()
            .ok_or_else(|| candle_core::Error::Msg("missing choice table".into()))?;
        tokens.extend_from_slice(&choice[..choice.len() - 1]);
        chunks.push(SeqChunk {
            table: own,
            start: prompt.len(),
            len: choice.len() - 1,
            decode: false,
        });
    }
    let tails = if chunks.is_empty() {
        None
    } else {
        Some(model.forward(&tokens, &chunks, Logits::All, pool)?)
    };
    let mut row = 0;
    let mut scores = Vec::with_capacity(choices.len());
    for choice in choices {
        let mut total = f64::from(sampler::token_logprob(&first, choice[0], 0).logprob);
        for &token in &choice[1..] {
            let logits = tails
                .as_ref()
                .ok_or_else(|| candle_core::Error::Msg("missing choice rows".into()))?;
            let values = model::logits_row(logits, row)?;
            total += f64::from(sampler::token_logprob(&values, token, 0).logprob);
            row += 1;
        }
        scores.push(total);
    }
    Ok((scores, tokens.len()))
}
/// Why `seq` is done after producing `token`, with its final text; `None` to keep going.
fn finish(
    seq: &Sequence,
    token: u32,
    tokenizer: &ChatTokenizer,
    window: usize,
) -> Option<Result<(FinishReason, String), InferenceError>> {
    let generated = seq.generated();
    let request = &seq.job.request;
    let without_last = &generated[..generated.len() - 1];
    if tokenizer.eos_ids().contains(&token) {
        return Some(
            tokenizer
                .decode(without_last)
                .map(|t| (FinishReason::Eos, t)),
        );
    }
    if request.stop_token_ids.contains(&token) {
        return Some(
            tokenizer
                .decode(without_last)
                .map(|t| (FinishReason::Stop, t)),
        );
    }
    let at_limit = generated.len() >= request.max_new_tokens || seq.history.len() > window;
    if request.stop.is_empty() && !at_limit {
        return None;
    }
    let text = match tokenizer.decode(generated) {
        Ok(text) => text,
        Err(e) => return Some(Err(e)),
    };
    let first_stop = request
        .stop
        .iter()
        .filter_map(|s| text.find(s.as_str()))
        .min();
    match first_stop {
        Some(cut) => Some(Ok((FinishReason::Stop, text[..cut].to_owned()))),
        None if at_limit => Some(Ok((FinishReason::Length, text))),
        None => None,
    }
}
