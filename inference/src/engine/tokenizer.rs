//! Tokenizer and Qwen ChatML chat template.
//!
//! Template control tokens are inserted by id, and message text is encoded with special-token
//! matching switched off, so text that spells `<|im_start|>` can never become a control token.

use std::collections::BTreeSet;
use std::path::Path;

use tokenizers::Tokenizer;

use super::config::Arch;
use crate::error::{InferenceError, LoadError};
use crate::request::ChatMessage;

pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";
const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// A loaded tokenizer with the ids the chat template and the stop logic need.
#[derive(Debug, Clone)]
pub struct ChatTokenizer {
    inner: Tokenizer,
    im_start: u32,
    im_end: u32,
    arch: Arch,
    eos_ids: BTreeSet<u32>,
    id_bound: usize,
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` and checks it against the model's vocabulary size.
    pub fn from_file(
        path: &Path,
        arch: Arch,
        model_vocab: usize,
        eos_ids: impl IntoIterator<Item = u32>,
    ) -> Result<Self, LoadError> {
        if !path.exists() {
            return Err(LoadError::MissingFile {
                path: path.to_owned(),
            });
        }
        let malformed = |reason: String| LoadError::Malformed {
            path: path.to_owned(),
            reason,
        };
        let mut inner = Tokenizer::from_file(path).map_err(|e| malformed(e.to_string()))?;
        // Text given to `encode` is data: special tokens inside it are encoded as plain text.
        inner.set_encode_special_tokens(true);
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| malformed(format!("the ChatML token {token} is missing")))
        };
        let im_start = id(IM_START)?;
        let im_end = id(IM_END)?;
        let max_id = inner.get_vocab(true).values().copied().max().unwrap_or(0);
        if max_id as usize >= model_vocab {
            return Err(LoadError::VocabMismatch {
                tokenizer_max_id: max_id,
                model_vocab,
            });
        }
        let mut eos_ids: BTreeSet<u32> = eos_ids.into_iter().collect();
        // ChatML turns end with <|im_end|>; a chat model that emits it is done.
        eos_ids.insert(im_end);
        if let Some(eot) = inner.token_to_id(END_OF_TEXT) {
            eos_ids.insert(eot);
        }
        Ok(Self {
            inner,
            im_start,
            im_end,
            arch,
            eos_ids,
            id_bound: max_id as usize + 1,
        })
    }

    /// One past the largest token id the tokenizer knows: ids from here to the model's
    /// vocabulary size (checkpoints pad theirs) decode to nothing and are never sampled.
    pub fn id_bound(&self) -> usize {
        self.id_bound
    }

    /// Adds the id of `token` (as `tokenizer_config.json` names it) to the end-of-sequence ids.
    pub fn with_eos_token(mut self, token: &str) -> Self {
        if let Some(id) = self.inner.token_to_id(token) {
            self.eos_ids.insert(id);
        }
        self
    }

    pub fn eos_ids(&self) -> &BTreeSet<u32> {
        &self.eos_ids
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, InferenceError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The id of a vocabulary or added token.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Renders messages as ChatML and opens an assistant turn. For Qwen3 without `thinking` the
    /// turn starts with an empty think block, which is how Qwen3 templates switch thinking off.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        thinking: bool,
    ) -> Result<Vec<u32>, InferenceError> {
        let newline = self.encode("\n")?;
        let mut ids = Vec::new();
        for m in messages {
            ids.push(self.im_start);
            ids.extend(self.encode(&format!("{}\n{}", m.role.as_str(), m.content))?);
            ids.push(self.im_end);
            ids.extend(&newline);
        }
        ids.push(self.im_start);
        let opening = match self.arch {
            Arch::Qwen3 if !thinking => format!("assistant\n{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"),
            _ => "assistant\n".to_owned(),
        };
        // The think markers are added (non-special) tokens: they must be matched here.
        let encoding = self
            .inner
            .encode_fast(opening.as_str(), false)
            .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
        ids.extend(encoding.get_ids());
        Ok(ids)
    }

    /// Decodes generated tokens to user-facing text: special tokens dropped, think blocks removed.
    pub fn decode(&self, ids: &[u32]) -> Result<String, InferenceError> {
        let text = self
            .inner
            .decode(ids, true)
            .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
        Ok(strip_think(&text))
    }
}

/// Removes `<think>…</think>` blocks (and an unterminated trailing one) and the whitespace that
/// follows a block.
pub fn strip_think(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find(THINK_OPEN) {
        out.push_str(&rest[..open]);
        match rest[open..].find(THINK_CLOSE) {
            Some(close) => rest = rest[open + close + THINK_CLOSE.len()..].trim_start(),
            None => {
                rest = "";
                break;
            }
        }
    }
    out.push_str(rest);
    // A reply that opens with a closing tag (the opening one was in the prompt) also drops it.
    match out.find(THINK_CLOSE) {
        Some(close) if !out[..close].contains(THINK_OPEN) && out[..close].trim().is_empty() => {
            out[close + THINK_CLOSE.len()..].trim_start().to_owned()
        }
        _ => out,
    }
}

#[cfg(test)]
mod tests {
    use super::strip_think;

    #[test]
    fn think_blocks_are_stripped() {
        assert_eq!(
            strip_think("<think>\nhmm\n</think>\n\nAnswer: 4"),
            "Answer: 4"
        );
        assert_eq!(strip_think("A <think>x</think> B"), "A B");
        assert_eq!(strip_think("no thinking here"), "no thinking here");
        assert_eq!(strip_think("start <think>never closed"), "start ");
        assert_eq!(strip_think("</think>\n\nfinal"), "final");
    }
}
