//! The request and result vocabulary of every backend: what to generate and what came out.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::InferenceError;

/// Who speaks a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatRole {
    System,
    User,
    Assistant,
}

impl ChatRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ChatRole::System => "system",
            ChatRole::User => "user",
            ChatRole::Assistant => "assistant",
        }
    }
}

/// One message of a chat prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: ChatRole,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: ChatRole::System,
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: ChatRole::User,
            content: content.into(),
        }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: ChatRole::Assistant,
            content: content.into(),
        }
    }
}

/// What the model is conditioned on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prompt {
    /// Chat messages, rendered with the model's chat template; generation starts an assistant turn.
    Chat(Vec<ChatMessage>),
    /// Raw token ids, fed as they are.
    Tokens(Vec<u32>),
}

/// How the next token is chosen. `temperature == 0` means greedy (argmax).
///
/// Every request carries its own seed: the same request with the same seed yields the same
/// tokens whether it runs alone or in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set whose probability reaches `top_p`; 1.0 disables.
    pub top_p: f32,
    /// HF-style repetition penalty over prompt and generated tokens; 1.0 disables.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Sampling {
    pub const fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    pub const fn with_temperature(temperature: f32, seed: u64) -> Self {
        Self {
            temperature,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn validate(&self) -> Result<(), InferenceError> {
        let bad =
            |field: &'static str, reason: String| InferenceError::InvalidRequest { field, reason };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(bad(
                "temperature",
                format!("must be finite and >= 0, got {}", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad(
                "top_p",
                format!("must be in (0, 1], got {}", self.top_p),
            ));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(bad(
                "repetition_penalty",
                format!("must be finite and > 0, got {}", self.repetition_penalty),
            ));
        }
        Ok(())
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Self::greedy()
    }
}

/// One generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    /// Generation stops when the decoded text contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    /// Generation stops when one of these tokens is produced (it is not part of the text).
    pub stop_token_ids: Vec<u32>,
    /// When set, every generated token comes with its log-probability and the `n` most likely
    /// alternatives.
    pub top_logprobs: Option<usize>,
    /// Let thinking models (Qwen3) think before answering. Off by default: the prompt opens the
    /// assistant turn with an empty think block. Think blocks are stripped from the text either way.
    #[serde(default)]
    pub enable_thinking: bool,
    /// A required form of the reply (structured output). A backend that cannot enforce it
    /// refuses the request; one that can still has the reply checked, and a reply that breaks
    /// it is an error, never a result.
    #[serde(default)]
    pub constraint: Option<crate::constraint::Constraint>,
}

impl GenerateRequest {
    pub fn new(prompt: Prompt, max_new_tokens: usize) -> Self {
        Self {
            prompt,
            sampling: Sampling::greedy(),
            max_new_tokens,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            top_logprobs: None,
            enable_thinking: false,
            constraint: None,
        }
    }

    pub fn chat(messages: Vec<ChatMessage>, max_new_tokens: usize) -> Self {
        Self::new(Prompt::Chat(messages), max_new_tokens)
    }

    pub fn tokens(tokens: Vec<u32>, max_new_tokens: usize) -> Self {
        Self::new(Prompt::Tokens(tokens), max_new_tokens)
    }

    pub fn with_sampling(mut self, sampling: Sampling) -> Self {
        self.sampling = sampling;
        self
    }

    /// Checks what can be checked without a tokenizer.
    pub fn validate(&self) -> Result<(), InferenceError> {
        if self.max_new_tokens == 0 {
            return Err(InferenceError::InvalidRequest {
                field: "max_new_tokens",
                reason: "must be at least 1".into(),
            });
        }
        match &self.prompt {
            Prompt::Chat(messages) if messages.is_empty() => {
                return Err(InferenceError::InvalidRequest {
                    field: "prompt",
                    reason: "chat prompt has no messages".into(),
                });
            }
            Prompt::Tokens(tokens) if tokens.is_empty() => {
                return Err(InferenceError::InvalidRequest {
                    field: "prompt",
                    reason: "token prompt is empty".into(),
                });
            }
            _ => {}
        }
        if let Some(constraint) = &self.constraint {
            constraint.validate()?;
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(InferenceError::InvalidRequest {
                field: "stop",
                reason: "stop strings must not be empty".into(),
            });
        }
        self.sampling.validate()
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// A stop string or stop token id was produced.
    Stop,
    /// `max_new_tokens` or the context window was reached.
    Length,
    /// The caller went away.
    Cancelled,
}

/// Token accounting of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from cache instead of being computed.
    pub cached_prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Where the time of one request went, measured from submission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// Submission until the engine started computing the request.
    pub queue: Duration,
    /// Submission until the first generated token.
    pub first_token: Duration,
    /// Submission until the result.
    pub total: Duration,
}

/// A likely alternative token at one position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token_id: u32,
    pub logprob: f32,
}

/// Log-probability of one generated token under the model, with its top alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    pub top: Vec<TopLogprob>,
}

/// What came out of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateResult {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    /// Present when the request asked for `top_logprobs`.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// Candidate continuations of one prompt to score: e.g. "1".."10" after a judging prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRequest {
    /// A chat prompt is rendered with the assistant turn opened, so a choice is what the
    /// assistant would say first.
    pub prompt: Prompt,
    pub choices: Vec<String>,
    #[serde(default)]
    pub enable_thinking: bool,
}

impl ScoreRequest {
    pub const MAX_CHOICES: usize = 64;

    pub fn new(prompt: Prompt, choices: Vec<String>) -> Self {
        Self {
            prompt,
            choices,
            enable_thinking: false,
        }
    }

    /// Checks what can be checked without a tokenizer.
    pub fn validate(&self) -> Result<(), InferenceError> {
        let bad = |field: &'static str, reason: &str| InferenceError::InvalidRequest {
            field,
            reason: reason.to_owned(),
        };
        match &self.prompt {
            Prompt::Chat(m) if m.is_empty() => {
                return Err(bad("prompt", "chat prompt has no messages"));
            }
            Prompt::Tokens(t) if t.is_empty() => {
                return Err(bad("prompt", "token prompt is empty"));
            }
            _ => {}
        }
        if self.choices.is_empty() || self.choices.len() > Self::MAX_CHOICES {
            return Err(bad("choices", "need 1..=64 choices"));
        }
        if self.choices.iter().any(String::is_empty) {
            return Err(bad("choices", "a choice must not be empty"));
        }
        Ok(())
    }
}

/// The log-probability of each choice as the continuation of the prompt (the sum over its
/// tokens), in the order given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreResult {
    pub logprobs: Vec<f64>,
    /// Prompt tokens of one choice's sequence (prompt plus the longest choice is what ran).
    pub usage: Usage,
}
