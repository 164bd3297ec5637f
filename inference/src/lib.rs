//! LLM inference for council: the [`Backend`] trait the rest of the system talks to, the
//! request/response vocabulary, the in-process candle engine that runs Qwen models, and the
//! client of OpenAI-compatible servers (vLLM).
//!
//! This crate knows nothing about councils, gRPC, NATS or configuration files: it takes
//! generation requests and returns generation results.

pub mod backend;
pub mod constraint;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod request;
pub mod rng;
pub mod tiny;
pub mod tiny_gguf;
pub mod vllm;

pub use backend::{Backend, BackendFuture, BackendLoad, Health, ModelInfo, ScoreFuture};
pub use constraint::Constraint;
pub use engine::{Engine, EngineConfig, EngineHandle, EngineStats, KvBudget, Quantization};
pub use error::{InferenceError, LoadError};
pub use request::{
    ChatMessage, ChatRole, FinishReason, GenerateRequest, GenerateResult, Prompt, Sampling,
    ScoreRequest, ScoreResult, Timings, TokenLogprob, TopLogprob, Usage,
};
pub use vllm::{ApiKey, VllmBackend, VllmConfig, VllmError};
