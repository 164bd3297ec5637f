//! The in-process candle engine: one OS thread owns the model and the KV cache; a cloneable
//! [`EngineHandle`] submits requests to it over a bounded channel and implements [`Backend`].
//!
//! The thread ([`worker`]) batches continuously: every step it runs one ragged forward over
//! the decode tokens of running sequences and chunks of new prompts, under a token budget,
//! with the KV of every sequence in a bounded pool of paged blocks ([`cache`]) that shares
//! common prompt prefixes between requests. A request whose caller went away is dropped
//! before the next step.

mod attention;
pub mod cache;
pub mod chat_template;
pub mod config;
pub mod diagnostics;
pub mod gguf;
mod kernel;
pub mod loader;
pub mod model;
pub mod quant;
mod queue;
pub mod sampler;
mod scheduler;
mod scoring;
mod step;
pub mod tokenizer;
mod worker;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::DType;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use self::cache::KvPool;
pub use self::diagnostics::sequence_logits;
use self::loader::{DeviceChoice, LoadedModel, ModelFiles};
pub use self::quant::Quantization;
use self::queue::{Command, Job, ScoreJob};
use self::scheduler::Limits;
use self::tokenizer::ChatTokenizer;
use self::worker::Worker;
use crate::backend::{Backend, BackendFuture, BackendLoad, Health, ModelInfo, ScoreFuture};
use crate::error::{InferenceError, LoadError};
use crate::request::{GenerateRequest, GenerateResult, Prompt, ScoreRequest, ScoreResult};

/// How much memory the KV cache may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvBudget {
    /// Room for `max_batch` sequences of the whole context window, capped at
    /// [`AUTO_KV_TOKENS`] tokens, and never less than one window.
    #[default]
    Auto,
    Tokens(usize),
    Bytes(u64),
}

/// The most tokens an automatically sized KV cache holds.
pub const AUTO_KV_TOKENS: usize = 32_768;

impl KvBudget {
    /// Parses `16384` (tokens) or a byte size with a unit: `512MiB`, `2GiB`, `300MB`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(digits);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a token count or a size like 512MiB"))?;
        let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "tokens" => {
                let tokens =
                    usize::try_from(number).map_err(|_| format!("{text:?} is too large"))?;
                return Ok(Self::Tokens(tokens));
            }
            "b" => 1,
            "kb" => 1_000,
            "kib" => 1 << 10,
            "mb" => 1_000_000,
            "mib" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown unit {other:?} in {text:?} (use tokens, or B, KB, KiB, MB, MiB, GB, GiB)"
                ));
            }
        };
        number
            .checked_mul(scale)
            .map(Self::Bytes)
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

/// Limits of one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Sequences in one forward.
    pub max_batch: usize,
    /// Tokens one sequence may hold (prompt plus generation); capped by the model's window.
    pub max_seq_len: usize,
    /// Requests accepted but not finished (running plus waiting); beyond it, `Overloaded`.
    pub max_pending: usize,
    pub device: DeviceChoice,
    /// Size of the KV pool.
    pub kv_cache: KvBudget,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Tokens one forward computes at most (decode tokens plus prefill chunks).
    pub max_step_tokens: usize,
    /// Share the KV of common prompt prefixes between requests.
    pub prefix_cache: bool,
    /// Times a waiting request may be passed by later, smaller ones before it blocks
    /// admissions until it fits.
    pub max_bypass: u32,
    /// How the linear layers' weights are held (Q8_0 on the CPU only).
    pub quantization: Quantization,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            max_seq_len: 4096,
            max_pending: 256,
            device: DeviceChoice::Cpu,
            kv_cache: KvBudget::Auto,
            block_size: 16,
            max_step_tokens: 512,
            prefix_cache: true,
            max_bypass: 16,
            quantization: Quantization::None,
        }
    }
}

impl EngineConfig {
    fn validate(&self) -> Result<(), LoadError> {
        for (field, value) in [
            ("max_batch", self.max_batch),
            ("max_seq_len", self.max_seq_len),
            ("max_pending", self.max_pending),
            ("block_size", self.block_size),
            ("max_step_tokens", self.max_step_tokens),
        ] {
            if value == 0 {
                return Err(LoadError::InvalidConfig {
                    field,
                    reason: "must be at least 1".into(),
                });
            }
        }
        if self.max_step_tokens < self.max_batch {
            return Err(LoadError::InvalidConfig {
                field: "max_step_tokens",
                reason: format!(
                    "is {}, less than max_batch {}: every running sequence needs a token per step",
                    self.max_step_tokens, self.max_batch
                ),
            });
        }
        Ok(())
    }

    /// Blocks of the KV pool for a model whose tokens take `bytes_per_token` and whose
    /// sequences hold at most `window` tokens. The pool always holds one whole window and a
    /// block more (so a lone sequence, or a scoring request, always fits).
    fn kv_blocks(&self, window: usize, bytes_per_token: usize) -> Result<usize, LoadError> {
        let tokens = match self.kv_cache {
            KvBudget::Auto => (self.max_batch * window).min(AUTO_KV_TOKENS),
            KvBudget::Tokens(tokens) => tokens,
            KvBudget::Bytes(bytes) => (bytes / bytes_per_token.max(1) as u64) as usize,
        };
        let blocks = tokens / self.block_size;
        let least = window.div_ceil(self.block_size) + 1;
        if blocks >= least {
            return Ok(blocks);
        }
        if self.kv_cache == KvBudget::Auto {
            return Ok(least);
        }
        Err(LoadError::InvalidConfig {
            field: "kv_cache",
            reason: format!(
                "holds {} tokens; one sequence of the {window}-token window needs {} \
                 ({} bytes per token); raise it or lower max_seq_len",
                blocks * self.block_size,
                least * self.block_size,
                bytes_per_token
            ),
        })
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
    /// Prompt tokens whose KV came from the prefix cache.
    cached_tokens: AtomicU64,
    finished: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
    preempted: AtomicU64,
    prefix_hits: AtomicU64,
    prefix_lookups: AtomicU64,
    prefix_evictions: AtomicU64,
}

/// A snapshot of what the engine has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Forward passes run.
    pub steps: u64,
    /// Prompt tokens computed (prefilled).
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prefix cache instead of computed.
    pub cached_prompt_tokens: u64,
    /// Tokens sampled, over all requests, finished or not.
    pub generated_tokens: u64,
    pub finished: u64,
    /// Requests dropped because their caller went away (waiting or running).
    pub cancelled: u64,
    pub failed: u64,
    /// Times a running sequence was sent back to the queue because the KV pool ran dry.
    pub preempted: u64,
    /// Cached blocks dropped to make room.
    pub prefix_evictions: u64,
}

/// The type the engine computes in on `device`: bf16 on a GPU (its tensor cores' type, half
/// the memory), f32 on the CPU.
pub fn dtype_on(device: &candle_core::Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
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
        let loaded = loader::load_as(files, name, &device, dtype_on(&device), config.quantization)?;
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
        if model.quantization() != config.quantization {
            return Err(LoadError::InvalidConfig {
                field: "quantization",
                reason: format!(
                    "is {}, but the model was loaded with {} weights",
                    config.quantization,
                    model.quantization()
                ),
            });
        }
        let window = config
            .max_seq_len
            .min(model.config().max_position_embeddings);
        let (shape, dtype) = (model.kv_shape(), model.dtype());
        let blocks = config.kv_blocks(window, shape.bytes_per_token(dtype))?;
        let pool = KvPool::new(
            shape,
            blocks,
            config.block_size,
            dtype,
            model.device().clone(),
            config.prefix_cache,
        )
        .map_err(|e| LoadError::Device(format!("cannot allocate the KV cache: {e}")))?;
        tracing::info!(
            blocks,
            block_size = config.block_size,
            tokens = pool.capacity_tokens(),
            mib = (pool.capacity_tokens() * pool.bytes_per_token()) >> 20,
            prefix_cache = config.prefix_cache,
            "KV cache allocated"
        );
        let info = ModelInfo {
            name,
            model_type: model.config().arch.as_str().to_owned(),
            context_window: window,
            vocab_size: model.config().vocab_size,
            device: format!("{:?}", model.device()),
        };
        let (tx, rx) = mpsc::channel(config.max_pending);
        let tokenizer = Arc::new(tokenizer);
        let counters = Arc::new(Counters::default());
        let limits = Limits {
            max_batch: config.max_batch,
            max_step_tokens: config.max_step_tokens,
            context_window: window,
            max_bypass: config.max_bypass,
            sample_vocab: tokenizer.id_bound().min(info.vocab_size),
        };
        let worker = Worker::new(model, pool, tokenizer.clone(), rx, counters.clone(), limits);
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
            cached_prompt_tokens: get(&c.cached_tokens),
            generated_tokens: get(&c.generated_tokens),
            finished: get(&c.finished),
            cancelled: get(&c.cancelled),
            failed: get(&c.failed),
            preempted: get(&c.preempted),
            prefix_evictions: get(&c.prefix_evictions),
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
            cached_prompt: None,
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
            Health::Stopped {
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
            prefix_cache: Some((get(&c.prefix_hits), get(&c.prefix_lookups))),
        }
    }
}
