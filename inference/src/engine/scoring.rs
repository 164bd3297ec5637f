//! Choice scoring on the engine thread: the log-probability of each choice after one prompt,
//! in two forwards (the prompt once, then every choice's tail after a share of the prompt's
//! KV), ahead of generation admissions.

use std::sync::atomic::Ordering;

use super::cache::{BlockId, KvPool, ROOT};
use super::model::{self, Logits, QwenModel, SeqChunk};
use super::queue::ScoreJob;
use super::sampler;
use super::worker::Worker;
use crate::error::InferenceError;
use crate::request::{ScoreResult, Usage};

impl Worker {
    /// Scores as many choices of the first scoring request as the pool has blocks for, in two
    /// forwards (the prompt once, then every choice's tail after a share of the prompt's KV);
    /// answers it when all are done. Returns whether a request waits for blocks (then no new
    /// generation is admitted, so that running ones finish and free theirs).
    pub(super) fn score_next(&mut self) -> bool {
        self.scoring.retain(|job| !job.reply.is_closed());
        let Some(job) = self.scoring.front_mut() else {
            return false;
        };
        let outcome = score_some(&self.model, &mut self.sched.pool, job);
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
            Err(ScoreWait::NoRoom) if !self.sched.running.is_empty() => return true,
            Err(ScoreWait::NoRoom) => {
                let total = self.sched.pool.total_blocks();
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
