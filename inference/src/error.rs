//! Typed errors at the inference boundary.

use std::path::PathBuf;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model file {path} is missing")]
    MissingFile { path: PathBuf },
    #[error("model file {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error(
        "unsupported model_type {model_type:?} in {path} (supported: qwen2, qwen3, llama, mistral)"
    )]
    UnsupportedModelType { model_type: String, path: PathBuf },
    #[error("unsupported GGUF architecture {arch:?} in {path} (supported: llama, qwen2, qwen3)")]
    UnsupportedArchitecture { arch: String, path: PathBuf },
    #[error(
        "tensor {tensor} in {path} has type {dtype}, which the engine does not load (supported: \
         F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)"
    )]
    UnsupportedTensorType {
        tensor: String,
        dtype: String,
        path: PathBuf,
    },
    #[error("unsupported model configuration in {path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error(
        "tokenizer and model disagree: the tokenizer has token ids up to {tokenizer_max_id} but the \
         model's vocab_size is {model_vocab}"
    )]
    VocabMismatch {
        tokenizer_max_id: u32,
        model_vocab: usize,
    },
    #[error(
        "model {repo} is not in the Hugging Face cache ({cache}) and the hub could not be reached: \
         {reason}. Point --model-dir at a local model directory, or make a tiny offline model with \
         `council dev tiny-model DIR --arch qwen2` and pass --model-dir DIR"
    )]
    HubUnavailable {
        repo: String,
        cache: PathBuf,
        reason: String,
    },
    #[error("model {repo}: {reason}")]
    Hub { repo: String, reason: String },
    #[error("cannot fetch {what}: {reason}")]
    Fetch { what: String, reason: String },
    #[error(
        "a GPU was asked for, but this binary was built without CUDA (rebuild with `--features cuda`)"
    )]
    CudaNotBuilt,
    #[error("engine configuration: {field} {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("device: {0}")]
    Device(String),
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl LoadError {
    /// A failed read of a model file: `MissingFile` when it is not there, else `Io`.
    pub fn reading(path: &std::path::Path, source: std::io::Error) -> Self {
        match source.kind() {
            std::io::ErrorKind::NotFound => LoadError::MissingFile {
                path: path.to_owned(),
            },
            _ => LoadError::Io {
                path: path.to_owned(),
                source,
            },
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("backend overloaded: {pending} requests already pending (limit {limit})")]
    Overloaded { pending: usize, limit: usize },
    #[error("prompt has {prompt_tokens} tokens; the context window holds {context_window}")]
    PromptTooLong {
        prompt_tokens: usize,
        context_window: usize,
    },
    #[error("invalid request: {field}: {reason}")]
    InvalidRequest { field: &'static str, reason: String },
    #[error("request cancelled")]
    Cancelled,
    #[error("the engine has stopped")]
    EngineStopped,
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("model execution failed: {0}")]
    Model(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("backend {endpoint} is unavailable: {reason}")]
    Unavailable { endpoint: String, reason: String },
    #[error("backend {endpoint} answered HTTP {status}: {message}")]
    Upstream {
        endpoint: String,
        status: u16,
        message: String,
    },
    #[error("backend {endpoint} timed out waiting for {what}")]
    Timeout { endpoint: String, what: String },
    #[error("backend {endpoint} ignored the reply constraint: {reason}")]
    ConstraintViolated { endpoint: String, reason: String },
    #[error("backend {endpoint} broke the protocol: {reason}")]
    Protocol { endpoint: String, reason: String },
    /// The server lacks what the request needs (found at start-up, or in its answer): the
    /// request is refused without being sent, or fails without a guess.
    #[error("backend {endpoint} cannot serve this request: {reason}")]
    Unsupported { endpoint: String, reason: String },
}

impl InferenceError {
    /// Whether the same request may succeed on another try (later, or on another replica):
    /// overload, an unreachable or failing server, a timeout, a stopped engine. A prompt that
    /// does not fit, an invalid request or a model that cannot run it fail the same way again.
    pub fn is_transient(&self) -> bool {
        match self {
            InferenceError::Overloaded { .. }
            | InferenceError::Cancelled
            | InferenceError::EngineStopped
            | InferenceError::Unavailable { .. }
            | InferenceError::Timeout { .. }
            | InferenceError::Protocol { .. } => true,
            InferenceError::Upstream { status, .. } => {
                *status >= 500 || *status == 408 || *status == 429
            }
            InferenceError::PromptTooLong { .. }
            | InferenceError::InvalidRequest { .. }
            | InferenceError::Load(_)
            | InferenceError::Model(_)
            | InferenceError::Tokenizer(_)
            | InferenceError::ConstraintViolated { .. }
            | InferenceError::Unsupported { .. } => false,
        }
    }
}

/// An error and all its sources ("error sending request: connection refused"): the top level
/// alone often hides the cause.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl From<candle_core::Error> for InferenceError {
    fn from(e: candle_core::Error) -> Self {
        InferenceError::Model(e.to_string())
    }
}
