//! The in-process candle engine: one OS thread owns the model and the KV cache; a cloneable
//! [`EngineHandle`] submits requests to it over a bounded channel and implements [`Backend`].
//!
//! Every step the thread admits waiting requests into free KV slots (first come, first
//! served), runs one ragged forward over all running sequences (new prompts are prefilled in
//! the same forward as the decode tokens of older ones), samples one token per sequence, and
//! answers the sequences that finished. A request whose caller went away is dropped before
//! the next step.

pub mod cache;
pub mod config;
pub mod loader;
pub mod model;
pub mod sampler;
pub mod tokenizer;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::DType;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use self::cache::{KvPool, SlotId};
use self::loader::{DeviceChoice, LoadedModel, ModelFiles};
use self::model::{Logits, QwenModel, SeqChunk};
use self::sampler::Sampler;
use self::tokenizer::ChatTokenizer;
use crate::backend::{Backend, BackendFuture, BackendLoad, Health, ModelInfo, ScoreFuture};
use crate::error::{InferenceError, LoadError};
use crate::request::{
    FinishReason, GenerateRequest, GenerateResult, Prompt, ScoreRequest, ScoreResult, Timings,
    TokenLogprob, Usage,
};

/// Limits of one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Sequences decoded together (KV slots).
    pub max_batch: usize,
    /// Tokens one sequence may hold (prompt plus generation); capped by the model's window.
    pub max_seq_len: usize,
    /// Requests accepted but not finished (running plus waiting); beyond it, `Overloaded`.
    pub max_pending: usize,
    pub device: DeviceChoice,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            max_seq_len: 4096,
            max_pending: 256,
            device: DeviceChoice::Cpu,
        }
    }
}

impl EngineConfig {
    fn validate(&self) -> Result<(), LoadError> {
        for (field, value) in [
            ("max_batch", self.max_batch),
            ("max_seq_len", self.max_seq_len),
            ("max_pending", self.max_pending),
        ] {
            if value == 0 {
                return Err(LoadError::InvalidConfig {
                    field,
                    reason: "must be at least 1".into(),
                });
            }
        }
        Ok(())
    }
}

/// Counters the engine thread keeps; read them through [`EngineHandle::stats`].
#[derive(Debug, Default)]
struct Counters {
    steps: AtomicU64,
    /// Sequences in each forward pass, summed over passes (batch size = this / steps).
    batched: AtomicU64,
    /// Sequences in the latest forward pass.
    running: AtomicU64,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    finished: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
}

/// A snapshot of what the engine has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Forward passes run.
    pub steps: u64,
    /// Prompt tokens prefilled.
    pub prompt_tokens: u64,
    /// Tokens sampled, over all requests, finished or not.
    pub generated_tokens: u64,
    pub finished: u64,
    /// Requests dropped because their caller went away (waiting or running).
    pub cancelled: u64,
    pub failed: u64,
}

/// A request on its way to, or inside, the engine thread.
#[derive(Debug)]
struct Job {
    prompt: Vec<u32>,
    request: GenerateRequest,
    reply: oneshot::Sender<Result<GenerateResult, InferenceError>>,
    submitted: Instant,
    _permit: OwnedSemaphorePermit,
}

/// Choices to score after one prompt, on their way to the engine thread.
#[derive(Debug)]
struct ScoreJob {
    prompt: Vec<u32>,
    /// Token ids of each choice.
    choices: Vec<Vec<u32>>,
    /// Log-probabilities found so far, one per scored choice.
    scores: Vec<f64>,
    reply: oneshot::Sender<Result<ScoreResult, InferenceError>>,
    _permit: OwnedSemaphorePermit,
}

/// What the engine thread is asked to do.
#[derive(Debug)]
enum Command {
    Generate(Job),
    Score(ScoreJob),
}

/// The in-process engine.
#[derive(Debug)]
pub struct Engine;

impl Engine {
    /// Loads the model in `dir` and starts the engine thread.
    pub fn load_dir(dir: &Path, config: EngineConfig) -> Result<EngineHandle, LoadError> {
        let files = ModelFiles::from_dir(dir)?;
        Self::load(&files, &dir.display().to_string(), config)
    }

    /// Loads `files` and starts the engine thread.
    pub fn load(
        files: &ModelFiles,
        name: &str,
        config: EngineConfig,
    ) -> Result<EngineHandle, LoadError> {
        config.validate()?;
        let device = config.device.open()?;
        let loaded = loader::load(files, name, &device, DType::F32)?;
        Self::start(loaded, config)
    }

    /// Starts the engine thread on an already loaded model.
    pub fn start(loaded: LoadedModel, config: EngineConfig) -> Result<EngineHandle, LoadError> {
        config.validate()?;
        let LoadedModel {
            model,
            tokenizer,
            name,
        } = loaded;
        let context_window = config
            .max_seq_len
            .min(model.config().max_position_embeddings);
        let info = ModelInfo {
            name,
            model_type: model.config().arch.as_str().to_owned(),
            context_window,
            vocab_size: model.config().vocab_size,
            device: format!("{:?}", model.device()),
        };
        let pool = KvPool::new(
            model.kv_shape(),
            config.max_batch,
            context_window,
            model.dtype(),
            model.device().clone(),
        );
        let (tx, rx) = mpsc::channel(config.max_pending);
        let tokenizer = Arc::new(tokenizer);
        let counters = Arc::new(Counters::default());
        let worker = Worker {
            counters: counters.clone(),
            model,
            pool,
            tokenizer: tokenizer.clone(),
            rx,
            scoring: VecDeque::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            context_window,
        };
        std::thread::Builder::new()
            .name("council-engine".into())
            .spawn(move || worker.run())
            .map_err(|e| LoadError::Device(format!("cannot start the engine thread: {e}")))?;
        Ok(EngineHandle {
            inner: Arc::new(HandleInner {
                tx,
                permits: Arc::new(Semaphore::new(config.max_pending)),
                max_pending: config.max_pending,
                tokenizer,
                info,
                counters,
            }),
        })
    }
}

#[derive(Debug)]
struct HandleInner {
    tx: mpsc::Sender<Command>,
    permits: Arc<Semaphore>,
    max_pending: usize,
    tokenizer: Arc<ChatTokenizer>,
    info: ModelInfo,
    counters: Arc<Counters>,
}

/// Cloneable handle to a running engine. The engine stops when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    inner: Arc<HandleInner>,
}

impl EngineHandle {
    pub fn stats(&self) -> EngineStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EngineStats {
            steps: get(&c.steps),
            prompt_tokens: get(&c.prompt_tokens),
            generated_tokens: get(&c.generated_tokens),
            finished: get(&c.finished),
            cancelled: get(&c.cancelled),
            failed: get(&c.failed),
        }
    }

    pub fn tokenizer(&self) -> &ChatTokenizer {
        &self.inner.tokenizer
    }

    /// Tokenizes the prompt of `request` as the engine will.
    pub fn prompt_tokens(&self, request: &GenerateRequest) -> Result<Vec<u32>, InferenceError> {
        match &request.prompt {
            Prompt::Chat(messages) => self
                .inner
                .tokenizer
                .encode_chat(messages, request.enable_thinking),
            Prompt::Tokens(tokens) => {
                let vocab = self.inner.info.vocab_size;
                if let Some(bad) = tokens.iter().find(|t| **t as usize >= vocab) {
                    return Err(InferenceError::InvalidRequest {
                        field: "prompt",
                        reason: format!("token id {bad} is outside the vocabulary of {vocab}"),
                    });
                }
                Ok(tokens.clone())
            }
        }
    }

    fn submit(
        &self,
        request: GenerateRequest,
    ) -> Result<oneshot::Receiver<Result<GenerateResult, InferenceError>>, InferenceError> {
        let submitted = Instant::now();
        request.validate()?;
        if request.constraint.is_some() {
            return Err(InferenceError::InvalidRequest {
                field: "constraint",
                reason: "the in-process engine cannot constrain its output (structured output \
                         needs a vLLM backend)"
                    .into(),
            });
        }
        let prompt = self.prompt_tokens(&request)?;
        let window = self.inner.info.context_window;
        if prompt.len() > window {
            return Err(InferenceError::PromptTooLong {
                prompt_tokens: prompt.len(),
                context_window: window,
            });
        }
        let permit = self.permit()?;
        let (reply, rx) = oneshot::channel();
        let job = Job {
            prompt,
            request,
            reply,
            submitted,
            _permit: permit,
        };
        self.send(Command::Generate(job))?;
        Ok(rx)
    }

    fn permit(&self) -> Result<OwnedSemaphorePermit, InferenceError> {
        self.inner
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| InferenceError::Overloaded {
                pending: self.inner.max_pending - self.inner.permits.available_permits(),
                limit: self.inner.max_pending,
            })
    }

    fn send(&self, command: Command) -> Result<(), InferenceError> {
        self.inner.tx.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => InferenceError::Overloaded {
                pending: self.inner.max_pending,
                limit: self.inner.max_pending,
            },
            mpsc::error::TrySendError::Closed(_) => InferenceError::EngineStopped,
        })
    }

    /// Tokenizes and checks a scoring request, then queues it.
    fn submit_score(
        &self,
        request: ScoreRequest,
    ) -> Result<oneshot::Receiver<Result<ScoreResult, InferenceError>>, InferenceError> {
        request.validate()?;
        let mut as_generation = GenerateRequest::new(request.prompt.clone(), 1);
        as_generation.enable_thinking = request.enable_thinking;
        let prompt = self.prompt_tokens(&as_generation)?;
        let choices = request
            .choices
            .iter()
            .map(|c| self.inner.tokenizer.encode(c))
            .collect::<Result<Vec<_>, _>>()?;
        if choices.iter().any(Vec::is_empty) {
            return Err(InferenceError::InvalidRequest {
                field: "choices",
                reason: "a choice encodes to no tokens".into(),
            });
        }
        let longest = prompt.len() + choices.iter().map(Vec::len).max().unwrap_or(0);
        let window = self.inner.info.context_window;
        if longest > window {
            return Err(InferenceError::PromptTooLong {
                prompt_tokens: longest,
                context_window: window,
            });
        }
        let permit = self.permit()?;
        let (reply, rx) = oneshot::channel();
        self.send(Command::Score(ScoreJob {
            prompt,
            scores: Vec::with_capacity(choices.len()),
            choices,
            reply,
            _permit: permit,
        }))?;
        Ok(rx)
    }
}

impl Backend for EngineHandle {
    fn generate(&self, request: GenerateRequest) -> BackendFuture {
        // Admission happens now, not at first poll, so overload is reported at once.
        let submitted = self.submit(request);
        Box::pin(async move {
            let rx = submitted?;
            rx.await.map_err(|_| InferenceError::EngineStopped)?
        })
    }

    fn score(&self, request: ScoreRequest) -> ScoreFuture {
        let submitted = self.submit_score(request);
        Box::pin(async move {
            let rx = submitted?;
            rx.await.map_err(|_| InferenceError::EngineStopped)?
        })
    }

    fn health(&self) -> Health {
        if self.inner.tx.is_closed() {
            Health::Unavailable {
                reason: "the engine thread has stopped".into(),
            }
        } else {
            Health::Ready
        }
    }

    fn model_info(&self) -> &ModelInfo {
        &self.inner.info
    }

    fn load(&self) -> BackendLoad {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let in_engine = self
            .inner
            .max_pending
            .saturating_sub(self.inner.permits.available_permits()) as u64;
        let running = get(&c.running).min(in_engine);
        BackendLoad {
            waiting: in_engine - running,
            running,
            steps: get(&c.steps),
            batched_sequences: get(&c.batched),
            prompt_tokens: get(&c.prompt_tokens),
            generated_tokens: get(&c.generated_tokens),
            prefix_cache: None,
        }
    }
}

/// A request that holds a KV slot.
#[derive(Debug)]
struct Sequence {
    job: Job,
    slot: SlotId,
    sampler: Sampler,
    /// Prompt followed by generated tokens.
    history: Vec<u32>,
    /// Tokens whose KV is in the slot.
    cached: usize,
    logprobs: Option<Vec<TokenLogprob>>,
    admitted: Instant,
    first_token: Option<Instant>,
}

type ReplySender = oneshot::Sender<Result<GenerateResult, InferenceError>>;

impl Sequence {
    fn generated(&self) -> &[u32] {
        &self.history[self.job.prompt.len()..]
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
            ..
        } = self;
        let prompt_tokens = job.prompt.len();
        let token_ids = history.split_off(prompt_tokens);
        let submitted = job.submitted;
        let result = outcome.map(|(finish_reason, text)| GenerateResult {
            text,
            usage: Usage {
                prompt_tokens,
                cached_prompt_tokens: 0,
                completion_tokens: token_ids.len(),
            },
            token_ids,
            finish_reason,
            timings: Timings {
                queue: admitted - submitted,
                first_token: first_token.unwrap_or(now) - submitted,
                total: now - submitted,
            },
            logprobs,
        });
        (job.reply, result)
    }
}

/// The engine thread's state: it alone touches the model and the cache.
#[derive(Debug)]
struct Worker {
    model: QwenModel,
    pool: KvPool,
    tokenizer: Arc<ChatTokenizer>,
    rx: mpsc::Receiver<Command>,
    /// Scoring requests, served ahead of generation admissions (each is one forward).
    scoring: VecDeque<ScoreJob>,
    waiting: VecDeque<Job>,
    running: Vec<Sequence>,
    context_window: usize,
    counters: Arc<Counters>,
}

impl Worker {
    fn run(mut self) {
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
            self.score_next();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
        }
        tracing::info!("engine stopped: every handle is gone");
    }

    fn take(&mut self, command: Command) {
        match command {
            Command::Generate(job) => self.waiting.push_back(job),
            Command::Score(job) => self.scoring.push_back(job),
        }
    }

    /// Scores as many choices of the first scoring request as there are free KV slots, all in
    /// one forward (each choice after its own copy of the prompt); answers it when all are done.
    fn score_next(&mut self) {
        self.scoring.retain(|job| !job.reply.is_closed());
        let Some(job) = self.scoring.front_mut() else {
            return;
        };
        let free = self.pool.free_slots();
        let left = &job.choices[job.scores.len()..];
        // With two slots or more the prompt is prefilled once and its KV copied to each
        // choice; with one, each choice runs after its own copy of the prompt.
        let batch = match free {
            0 => return,
            1 => &left[..1],
            _ => &left[..left.len().min(free - 1)],
        };
        let (outcome, prefilled) = if free == 1 {
            let tokens = job.prompt.len() + batch[0].len();
            let scores = score_batch(&self.model, &mut self.pool, &job.prompt, batch);
            (scores, tokens)
        } else {
            let tails: usize = batch.iter().map(|c| c.len() - 1).sum();
            let scores = score_shared(&self.model, &mut self.pool, &job.prompt, batch);
            (scores, job.prompt.len() + tails)
        };
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        self.counters
            .batched
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.counters
            .prompt_tokens
            .fetch_add(prefilled as u64, Ordering::Relaxed);
        let failed = match outcome {
            Ok(scores) => {
                job.scores.extend(scores);
                None
            }
            Err(e) => Some(e),
        };
        if failed.is_none() && job.scores.len() < job.choices.len() {
            return;
        }
        let Some(job) = self.scoring.pop_front() else {
            return;
        };
        let result = match failed {
            Some(e) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                Err(InferenceError::Model(e.to_string()))
            }
            None => {
                self.counters.finished.fetch_add(1, Ordering::Relaxed);
                Ok(ScoreResult {
                    usage: Usage {
                        prompt_tokens: job.prompt.len(),
                        cached_prompt_tokens: 0,
                        completion_tokens: 0,
                    },
                    logprobs: job.scores,
                })
            }
        };
        let _ = job.reply.send(result);
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len() + self.running.len();
        self.waiting.retain(|job| !job.reply.is_closed());
        let pool = &mut self.pool;
        self.running.retain(|seq| {
            let keep = !seq.job.reply.is_closed();
            if !keep {
                pool.release(seq.slot);
            }
            keep
        });
        let dropped = before - self.waiting.len() - self.running.len();
        self.counters
            .cancelled
            .fetch_add(dropped as u64, Ordering::Relaxed);
    }

    fn admit(&mut self) {
        while self.pool.free_slots() > 0 {
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            let slot = match self.pool.allocate() {
                Ok(Some(slot)) => slot,
                Ok(None) => {
                    self.waiting.push_front(job);
                    break;
                }
                Err(e) => {
                    let _ = job.reply.send(Err(InferenceError::Model(format!(
                        "KV allocation failed: {e}"
                    ))));
                    continue;
                }
            };
            self.running.push(Sequence {
                sampler: Sampler::new(job.request.sampling),
                history: job.prompt.clone(),
                cached: 0,
                logprobs: job.request.top_logprobs.map(|_| Vec::new()),
                slot,
                admitted: Instant::now(),
                first_token: None,
                job,
            });
        }
    }

    fn step(&mut self) {
        let mut tokens = Vec::new();
        let chunks: Vec<SeqChunk> = self
            .running
            .iter()
            .map(|seq| {
                let new = &seq.history[seq.cached..];
                tokens.extend_from_slice(new);
                SeqChunk {
                    slot: seq.slot,
                    start: seq.cached,
                    len: new.len(),
                }
            })
            .collect();
        let prefill: usize = chunks.iter().filter(|c| c.start == 0).map(|c| c.len).sum();
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        let rows = chunks.len() as u64;
        self.counters.batched.fetch_add(rows, Ordering::Relaxed);
        self.counters.running.store(rows, Ordering::Relaxed);
        self.counters
            .prompt_tokens
            .fetch_add(prefill as u64, Ordering::Relaxed);
        let logits = match self
            .model
            .forward(&tokens, &chunks, Logits::Last, &self.pool)
        {
            Ok(logits) => logits,
            Err(e) => {
                tracing::error!(error = %e, "forward failed; failing the batch");
                self.counters
                    .failed
                    .fetch_add(self.running.len() as u64, Ordering::Relaxed);
                for seq in self.running.drain(..) {
                    self.pool.release(seq.slot);
                    let _ = seq
                        .job
                        .reply
                        .send(Err(InferenceError::Model(e.to_string())));
                }
                return;
            }
        };
        let now = Instant::now();
        let mut finished = Vec::new();
        for (i, seq) in self.running.iter_mut().enumerate() {
            seq.cached = seq.history.len();
            let row = match model::logits_row(&logits, i) {
                Ok(row) => row,
                Err(e) => {
                    finished.push((i, Err(InferenceError::Model(e.to_string()))));
                    continue;
                }
            };
            let token = seq.sampler.sample(&row, &seq.history);
            if let (Some(lps), Some(top)) = (seq.logprobs.as_mut(), seq.job.request.top_logprobs) {
                lps.push(sampler::token_logprob(&row, token, top));
            }
            seq.first_token.get_or_insert(now);
            self.counters
                .generated_tokens
                .fetch_add(1, Ordering::Relaxed);
            seq.history.push(token);
            if let Some(outcome) = finish(seq, token, &self.tokenizer, self.context_window) {
                finished.push((i, outcome));
            }
        }
        for (i, outcome) in finished.into_iter().rev() {
            let seq = self.running.swap_remove(i);
            self.pool.release(seq.slot);
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

/// Full-sequence logits `[tokens, vocab]` of one token sequence, computed directly on a model
/// with a private one-slot cache (no engine thread). For parity checks and scoring tools.
pub fn sequence_logits(model: &QwenModel, tokens: &[u32]) -> candle_core::Result<Vec<Vec<f32>>> {
    let mut pool = KvPool::new(
        model.kv_shape(),
        1,
        tokens.len(),
        model.dtype(),
        model.device().clone(),
    );
    let slot = pool
        .allocate()?
        .ok_or_else(|| candle_core::Error::Msg("no KV slot".into()))?;
    let chunk = SeqChunk {
        slot,
        start: 0,
        len: tokens.len(),
    };
    model
        .forward(tokens, &[chunk], Logits::All, &pool)?
        .to_vec2::<f32>()
}

/// Log-probability of each choice after `prompt`: one forward over `prompt + choice` per
/// choice, each in a slot of its own, keeping only the rows that predict the choice's tokens.
fn score_batch(
    model: &QwenModel,
    pool: &mut KvPool,
    prompt: &[u32],
    choices: &[Vec<u32>],
) -> candle_core::Result<Vec<f64>> {
    let mut slots = Vec::with_capacity(choices.len());
    for _ in choices {
        match pool.allocate()? {
            Some(slot) => slots.push(slot),
            None => break,
        }
    }
    let result = score_in_slots(model, pool, prompt, &choices[..slots.len()], &slots);
    for slot in slots {
        pool.release(slot);
    }
    result
}

fn score_in_slots(
    model: &QwenModel,
    pool: &KvPool,
    prompt: &[u32],
    choices: &[Vec<u32>],
    slots: &[SlotId],
) -> candle_core::Result<Vec<f64>> {
    let mut tokens = Vec::new();
    let mut chunks = Vec::with_capacity(choices.len());
    let mut rows = Vec::new();
    for (choice, &slot) in choices.iter().zip(slots) {
        let offset = tokens.len() as u32;
        tokens.extend_from_slice(prompt);
        tokens.extend_from_slice(choice);
        // Row p predicts token p + 1: the choice's tokens are predicted by the rows from the
        // prompt's last token to the choice's second-to-last.
        let first = offset + prompt.len() as u32 - 1;
        rows.extend(first..first + choice.len() as u32);
        chunks.push(SeqChunk {
            slot,
            start: 0,
            len: prompt.len() + choice.len(),
        });
    }
    let logits = model.forward(&tokens, &chunks, Logits::Rows(&rows), pool)?;
    let mut row = 0;
    let mut scores = Vec::with_capacity(choices.len());
    for choice in choices {
        let mut total = 0.0;
        for &token in choice {
            let values = model::logits_row(&logits, row)?;
            total += f64::from(sampler::token_logprob(&values, token, 0).logprob);
            row += 1;
        }
        scores.push(total);
    }
    Ok(scores)
}

/// Log-probability of each choice after `prompt`, the prompt prefilled once: its last row
/// scores every choice's first token; its KV is copied into a slot per choice, and one forward
/// over the choices' remaining tokens scores the rest. Needs `choices.len() + 1` free slots.
fn score_shared(
    model: &QwenModel,
    pool: &mut KvPool,
    prompt: &[u32],
    choices: &[Vec<u32>],
) -> candle_core::Result<Vec<f64>> {
    let mut slots = Vec::with_capacity(choices.len() + 1);
    for _ in 0..=choices.len() {
        match pool.allocate()? {
            Some(slot) => slots.push(slot),
            None => break,
        }
    }
    let result = match slots.split_first() {
        Some((&prompt_slot, choice_slots)) if !choice_slots.is_empty() => {
            let choices = &choices[..choice_slots.len()];
            shared_in_slots(model, pool, prompt, choices, prompt_slot, choice_slots)
        }
        _ => Err(candle_core::Error::Msg("no KV slots to score in".into())),
    };
    for slot in slots {
        pool.release(slot);
    }
    result
}

fn shared_in_slots(
    model: &QwenModel,
    pool: &KvPool,
    prompt: &[u32],
    choices: &[Vec<u32>],
    prompt_slot: SlotId,
    choice_slots: &[SlotId],
) -> candle_core::Result<Vec<f64>> {
    let whole = SeqChunk {
        slot: prompt_slot,
        start: 0,
        len: prompt.len(),
    };
    let last = [prompt.len() as u32 - 1];
    let first = model.forward(prompt, &[whole], Logits::Rows(&last), pool)?;
    let first = model::logits_row(&first, 0)?;
    // Each choice's tokens but the last: their rows predict the choice's tokens after the first.
    let mut tokens = Vec::new();
    let mut chunks = Vec::new();
    for (choice, &slot) in choices.iter().zip(choice_slots) {
        if choice.len() < 2 {
            continue;
        }
        pool.copy_prefix(prompt_slot, slot, prompt.len())?;
        tokens.extend_from_slice(&choice[..choice.len() - 1]);
        chunks.push(SeqChunk {
            slot,
            start: prompt.len(),
            len: choice.len() - 1,
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
    Ok(scores)
}
