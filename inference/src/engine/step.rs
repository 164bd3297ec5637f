//! One step of the engine thread: the planned forward, a token sampled for every sequence
//! whose tokens are all computed, and the answers of those that finished.

use std::time::Instant;

use rayon::prelude::*;

use super::model::{self, Logits, SeqChunk};
use super::queue::Sequence;
use super::sampler;
use super::scheduler::Planned;
use super::tokenizer::ChatTokenizer;
use super::worker::Worker;
use crate::error::InferenceError;
use crate::request::FinishReason;
use std::sync::atomic::Ordering;

impl Worker {
    /// Runs the planned forward, samples where a sequence's tokens are all computed, and
    /// answers the sequences that finished.
    pub(super) fn step(&mut self, plan: &[Planned]) {
        let mut tokens = Vec::new();
        let mut rows = Vec::new();
        let mut prefill = 0;
        for p in plan {
            let seq = &self.sched.running[p.seq];
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
                let seq = &self.sched.running[p.seq];
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
            .forward(&tokens, &chunks, Logits::Rows(&rows), &self.sched.pool);
        drop(chunks);
        // Ids past the tokenizer's (a checkpoint's padding) decode to nothing: never sampled.
        let logits = match result.and_then(|l| {
            if l.dim(1)? > self.sched.limits.sample_vocab {
                l.narrow(1, 0, self.sched.limits.sample_vocab)
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
            let seq = &self.sched.running[p.seq];
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
        let row_of = self.sched.commit(plan);
        // Each sequence draws from its own row with its own RNG, so the rows are drawn in
        // parallel and the tokens depend neither on the batch nor on the thread.
        let drawn: Vec<Option<Result<u32, InferenceError>>> = self
            .sched
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
            let seq = &mut self.sched.running[i];
            seq.first_token.get_or_insert(now);
            self.counters
                .generated_tokens
                .fetch_add(1, Ordering::Relaxed);
            seq.history.push(token);
            if let Some(outcome) = finish(
                seq,
                token,
                &self.tokenizer,
                self.sched.limits.context_window,
            ) {
                finished.push((i, outcome));
            }
        }
        // `finished` is in index order: removing from the back keeps the other indices valid.
        for (i, outcome) in finished.into_iter().rev() {
            let seq = self.sched.retire(i);
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
            let seq = self.sched.retire(i);
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            let _ = seq
                .job
                .reply
                .send(Err(InferenceError::Model(error.to_owned())));
        }
    }
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
