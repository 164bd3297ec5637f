//! The engine's scheduler: plain planning over the queue of waiting requests, the running
//! sequences and the KV pool's blocks, with no model in it.
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
//!
//! The step ([`super::step`]) runs the plan and hands it back through [`Scheduler::commit`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::Counters;
use super::cache::KvPool;
use super::queue::{Job, Sequence};
use crate::error::InferenceError;

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

/// New tokens of one running sequence in the planned forward.
#[derive(Debug, Clone, Copy)]
pub(super) struct Planned {
    /// Index into `running`.
    pub(super) seq: usize,
    pub(super) len: usize,
}

/// The waiting and running generation requests and the KV pool they share.
#[derive(Debug)]
pub(super) struct Scheduler {
    pub(super) pool: KvPool,
    pub(super) limits: Limits,
    counters: Arc<Counters>,
    pub(super) waiting: VecDeque<Sequence>,
    /// In admission order (oldest first).
    pub(super) running: Vec<Sequence>,
}

impl Scheduler {
    pub(super) fn new(pool: KvPool, limits: Limits, counters: Arc<Counters>) -> Self {
        Self {
            pool,
            limits,
            counters,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    /// Whether nothing waits or runs.
    pub(super) fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Queues a submitted request behind those waiting.
    pub(super) fn submit(&mut self, job: Job) {
        self.waiting.push_back(Sequence::new(job));
    }

    /// Drops every request whose caller has gone, releasing its KV.
    pub(super) fn drop_cancelled(&mut self) {
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
    pub(super) fn schedule(&mut self, admit: bool) -> Vec<Planned> {
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

    /// Takes back a plan after its forward ran: the planned tokens' KV is computed. Returns,
    /// for each running sequence, the row of the forward's logits it samples its next token
    /// from (`None` for one still computing its prompt or not in the plan).
    pub(super) fn commit(&mut self, plan: &[Planned]) -> Vec<Option<usize>> {
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
        row_of
    }

    /// Removes running sequence `i`, finished or failed, releasing its KV.
    pub(super) fn retire(&mut self, i: usize) -> Sequence {
        let mut seq = self.running.remove(i);
        seq.evict(&mut self.pool);
        seq
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use tokio::sync::{Semaphore, oneshot};

    use super::*;
    use crate::engine::cache::KvShape;
    use crate::request::{GenerateRequest, GenerateResult};

    type Reply = oneshot::Receiver<Result<GenerateResult, InferenceError>>;

    /// Prompts end with `MARK + id`, so a sequence is known by its last prompt token.
    const MARK: u32 = 1000;
    /// The token every simulated step samples.
    const SAMPLED: u32 = 7;

    struct Harness {
        sched: Scheduler,
        counters: Arc<Counters>,
        permits: Arc<Semaphore>,
        /// Replies kept open (a dropped one cancels its request).
        kept: Vec<Reply>,
    }

    impl Harness {
        /// A scheduler over a pool of `blocks` blocks of 4 tokens (one layer, one head of
        /// width 1: bookkeeping only), `max_batch` sequences and `budget` tokens a step.
        fn new(blocks: usize, prefix_cache: bool, max_batch: usize, budget: usize) -> Self {
            let shape = KvShape {
                layers: 1,
                kv_heads: 1,
                head_dim: 1,
            };
            let pool =
                KvPool::new(shape, blocks, 4, DType::F32, Device::Cpu, prefix_cache).expect("pool");
            let limits = Limits {
                max_batch,
                max_step_tokens: budget,
                context_window: 1 << 20,
                max_bypass: 2,
                sample_vocab: 2048,
            };
            let counters = Arc::new(Counters::default());
            Self {
                sched: Scheduler::new(pool, limits, counters.clone()),
                counters,
                permits: Arc::new(Semaphore::new(64)),
                kept: Vec::new(),
            }
        }

        /// Submits request `id` with `shared` leading tokens common to every request and
        /// `own` more of its own (the last is `MARK + id`).
        fn submit(&mut self, id: u32, shared: usize, own: usize) -> Reply {
            let mut prompt: Vec<u32> = (0..shared as u32).map(|t| t % 500).collect();
            prompt.extend((1..own as u32).map(|t| 500 + (id * 37 + t) % 400));
            prompt.push(MARK + id);
            let (reply, rx) = oneshot::channel();
            self.sched.submit(Job {
                request: GenerateRequest::tokens(prompt.clone(), 64),
                prompt,
                reply,
                submitted: Instant::now(),
                _permit: self.permits.clone().try_acquire_owned().expect("permit"),
            });
            rx
        }

        /// Plans a step, as `(id, tokens)` per planned sequence, and plays it: the planned
        /// KV is computed and every sequence whose tokens are all computed samples a token.
        fn step(&mut self, admit: bool) -> Vec<(u32, usize)> {
            let plan = self.sched.schedule(admit);
            let shown = plan
                .iter()
                .map(|p| (id(&self.sched.running[p.seq]), p.len))
                .collect();
            let rows = self.sched.commit(&plan);
            for (seq, row) in self.sched.running.iter_mut().zip(rows) {
                if row.is_some() {
                    seq.history.push(SAMPLED);
                }
            }
            shown
        }

        fn running(&self) -> Vec<u32> {
            self.sched.running.iter().map(id).collect()
        }

        fn waiting(&self) -> Vec<u32> {
            self.sched.waiting.iter().map(id).collect()
        }

        /// Finishes running request `id`, releasing its blocks.
        fn finish(&mut self, which: u32) {
            let i = self.running().iter().position(|&r| r == which);
            self.sched.retire(i.expect("running"));
        }
    }

    fn id(seq: &Sequence) -> u32 {
        seq.job.prompt.last().copied().expect("prompt") - MARK
    }

    #[test]
    fn decodes_go_first_then_prompt_chunks_oldest_first_within_the_budget() {
        let mut h = Harness::new(64, false, 8, 8);
        let _a = h.submit(1, 0, 3);
        let _b = h.submit(2, 0, 20);
        // A's whole prompt, then B's first chunk with what is left of the budget.
        assert_eq!(h.step(true), [(1, 3), (2, 5)]);
        // A decodes; B's prompt goes on in chunks of what is left.
        assert_eq!(h.step(true), [(1, 1), (2, 7)]);
        assert_eq!(h.step(true), [(1, 1), (2, 7)]);
        assert_eq!(h.step(true), [(1, 1), (2, 1)]);
        // Both decode now; a new request's prompt is cut to the budget left after them.
        let _c = h.submit(3, 0, 30);
        assert_eq!(h.step(true), [(1, 1), (2, 1), (3, 6)]);
    }

    #[test]
    fn admissions_keep_arrival_order_within_the_batch_limit() {
        let mut h = Harness::new(64, false, 2, 64);
        let _r: Vec<Reply> = (1..=3).map(|i| h.submit(i, 0, 4)).collect();
        assert_eq!(h.step(true), [(1, 4), (2, 4)]);
        assert_eq!(h.waiting(), [3]);
        // Without admissions (scoring waits for blocks) nothing new starts.
        h.finish(1);
        assert_eq!(h.step(false), [(2, 1)]);
        assert_eq!(h.step(true), [(2, 1), (3, 4)]);
        assert!(h.sched.waiting.is_empty());
    }

    /// A wants 6 blocks, B 10 (more than are left), C, D and E one each, from a pool of 14.
    fn bypass(max_bypass: u32) -> Harness {
        let mut h = Harness::new(14, false, 8, 64);
        h.sched.limits.max_bypass = max_bypass;
        for (id, own) in [(1, 23), (2, 40), (3, 3), (4, 3), (5, 3)] {
            let reply = h.submit(id, 0, own);
            h.kept.push(reply);
        }
        h.step(true);
        h
    }

    #[test]
    fn a_request_that_does_not_fit_is_passed_a_bounded_number_of_times() {
        let h = bypass(2);
        // C and D pass B; then B has used its two passes and E, which would fit, waits
        // behind it.
        assert_eq!(h.running(), [1, 3, 4]);
        assert_eq!(h.waiting(), [2, 5]);
        assert_eq!(h.sched.waiting[0].bypassed, 2);
        // The bound is what holds E back.
        assert_eq!(bypass(10).running(), [1, 3, 4, 5]);
    }

    #[test]
    fn the_youngest_is_preempted_when_the_pool_runs_dry_and_is_recomputed_first() {
        // Two one-block prompts in a pool of 4 blocks: at 9 tokens each needs a third.
        let mut h = Harness::new(4, false, 8, 64);
        let _a = h.submit(1, 0, 4);
        let _b = h.submit(2, 0, 4);
        assert_eq!(h.step(true), [(1, 4), (2, 4)]);
        for _ in 0..4 {
            assert_eq!(h.step(true), [(1, 1), (2, 1)]);
        }
        // A (oldest) needs a block: B gives its two back and goes first in the queue, with
        // the tokens it generated.
        assert_eq!(h.step(true), [(1, 1)]);
        assert_eq!(h.counters.preempted.load(Ordering::Relaxed), 1);
        assert_eq!(h.waiting(), [2]);
        let b = &h.sched.waiting[0];
        assert_eq!((b.history.len(), b.cached, b.decoding), (9, 0, false));
        assert!(b.table.is_empty());
        assert_eq!(h.sched.pool.available(), 1);
        // When A is done, B is readmitted and recomputes all 9 tokens before it decodes on.
        h.finish(1);
        assert_eq!(h.step(true), [(2, 9)]);
        assert_eq!(h.step(true), [(2, 1)]);
    }

    #[test]
    fn a_request_that_shares_a_prefix_with_a_prompt_being_computed_waits_for_it() {
        for prefix_cache in [true, false] {
            let mut h = Harness::new(64, prefix_cache, 8, 24);
            let _a = h.submit(1, 16, 1);
            let _b = h.submit(2, 16, 1);
            let _c = h.submit(3, 0, 2);
            if prefix_cache {
                // B waits for A's 4 shared blocks instead of computing them too; waiting on
                // a sibling is not being passed over, so C's admission costs B nothing.
                assert_eq!(h.step(true), [(1, 17), (3, 2)]);
                assert_eq!(h.sched.waiting[0].bypassed, 0);
                assert_eq!(h.step(true), [(1, 1), (3, 1), (2, 1)]);
                assert_eq!(h.counters.cached_tokens.load(Ordering::Relaxed), 16);
            } else {
                // With nothing to share, B starts at once on what is left of the budget.
                assert_eq!(h.step(true), [(1, 17), (2, 7)]);
            }
        }
    }

    #[test]
    fn a_request_larger_than_the_whole_pool_fails_with_the_numbers() {
        let mut h = Harness::new(2, false, 8, 64);
        let mut reply = h.submit(1, 0, 20);
        assert!(h.step(true).is_empty());
        assert!(h.sched.is_idle());
        let err = reply
            .try_recv()
            .expect("answered")
            .expect_err("cannot fit")
            .to_string();
        assert!(err.contains("needs 5 KV blocks; the pool has 2"), "{err}");
        assert_eq!(h.counters.failed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn cancelled_requests_are_dropped_and_give_their_blocks_back() {
        let mut h = Harness::new(16, false, 8, 64);
        let a = h.submit(1, 0, 10);
        let b = h.submit(2, 0, 10);
        let _c = h.submit(3, 0, 10);
        h.sched.limits.max_batch = 1;
        h.step(true);
        assert_eq!((h.running(), h.waiting()), (vec![1], vec![2, 3]));
        assert_eq!(h.sched.pool.available(), 13);
        drop(a);
        drop(b);
        h.sched.drop_cancelled();
        assert_eq!((h.running(), h.waiting()), (vec![], vec![3]));
        assert_eq!(h.sched.pool.available(), 16);
        assert_eq!(h.counters.cancelled.load(Ordering::Relaxed), 2);
    }
}
