//! The [`Backend`] trait: the only way the rest of the system reaches a model.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::error::InferenceError;
use crate::request::{GenerateRequest, GenerateResult, ScoreRequest, ScoreResult};

/// The future of one submitted request. Dropping it cancels the request: the backend stops
/// spending compute on it by its next step.
pub type BackendFuture =
    Pin<Box<dyn Future<Output = Result<GenerateResult, InferenceError>> + Send>>;

/// The future of one scoring request; dropping it cancels the request.
pub type ScoreFuture = Pin<Box<dyn Future<Output = Result<ScoreResult, InferenceError>> + Send>>;

/// Whether a backend can take work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    Ready,
    /// Cannot take work now; may recover (a remote server down, a breaker open).
    Unavailable {
        reason: String,
    },
    /// Will never take work again (the engine thread ended): the process must be restarted.
    Stopped {
        reason: String,
    },
}

impl Health {
    /// Why it cannot take work, if it cannot.
    pub fn problem(&self) -> Option<&str> {
        match self {
            Health::Ready => None,
            Health::Unavailable { reason } | Health::Stopped { reason } => Some(reason),
        }
    }
}

/// What model a backend serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Where the model came from: a repo id or a directory.
    pub name: String,
    pub model_type: String,
    pub context_window: usize,
    pub vocab_size: usize,
    pub device: String,
}

/// An inference backend: in-process engine or remote server, all alike to callers.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Submits a request. Validation errors, overload and prompt-too-long come back from the
    /// future without any model compute.
    fn generate(&self, request: GenerateRequest) -> BackendFuture;

    /// Scores candidate continuations of one prompt (log-prob judging): each choice's total
    /// log-probability, without sampling.
    fn score(&self, request: ScoreRequest) -> ScoreFuture;

    /// Whether [`Backend::score`] can be served at all. A remote server found at start-up to
    /// lack every form of choice scoring says no, and then `score` fails at once without a
    /// request; callers use this to judge with text instead.
    fn scores_choices(&self) -> bool {
        true
    }

    fn health(&self) -> Health;

    fn model_info(&self) -> &ModelInfo;

    /// How busy the backend is, and what it has done since it started (for metrics).
    fn load(&self) -> BackendLoad;
}

/// A snapshot of a backend's queue and work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendLoad {
    /// Requests accepted and waiting for a place in the batch.
    pub waiting: u64,
    /// Requests in the batch now.
    pub running: u64,
    /// Forward passes (or server round trips) run.
    pub steps: u64,
    /// Sequences per forward pass, summed over passes: mean batch size = this / steps.
    pub batched_sequences: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// (hits, lookups) of the prefix cache, for a backend that has one.
    pub prefix_cache: Option<(u64, u64)>,
}
