//! The tokenizer and the chat prompt: the model's own Jinja chat template when it ships one
//! ([`super::chat_template`]), else ChatML.
//!
//! Message text is data: a special token spelled inside it (`<|im_start|>`) stays text and
//! never becomes a control token. Text given to [`ChatTokenizer::encode`] is encoded with
//! special-token matching off; a rendered template is encoded with it on, except over the
//! spans that are message text whenever a message spells a special token (otherwise the
//! whole prompt is encoded in one go, exactly as transformers' `apply_chat_template` does).

use std::collections::BTreeSet;
use std::path::Path;

use tokenizers::Tokenizer;

use super::chat_template::ChatTemplate;
use super::config::Arch;
use crate::error::{InferenceError, LoadError};
use crate::request::ChatMessage;

pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";
const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// How chat messages become a prompt.
#[derive(Debug)]
enum Template {
    /// The model's own template.
    Jinja(Box<ChatTemplate>),
    /// The fallback for models without one: ChatML, control tokens inserted by id.
    ChatMl { im_start: u32, im_end: u32 },
}

/// A loaded tokenizer with its chat template and the ids the stop logic needs.
#[derive(Debug, Clone)]
pub struct ChatTokenizer {
    /// Special-token matching off: text is data.
    inner: Tokenizer,
    /// Special-token matching on: for a rendered template's own markup.
    markup: Tokenizer,
    template: std::sync::Arc<Template>,
    /// The text of every special token, to find message text that spells one.
    specials: Vec<String>,
    arch: Arch,
    eos_ids: BTreeSet<u32>,
    id_bound: usize,
}

/// The chat template to render, with the special tokens it may name.
#[derive(Debug, Clone, Default)]
pub struct TemplateSource {
    pub template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` and checks it against the model's vocabulary size.
    pub fn from_file(
        path: &Path,
        arch: Arch,
        model_vocab: usize,
        eos_ids: impl IntoIterator<Item = u32>,
        template: TemplateSource,
    ) -> Result<Self, LoadError> {
        if !path.exists() {
            return Err(LoadError::MissingFile {
                path: path.to_owned(),
            });
        }
        let inner = Tokenizer::from_file(path).map_err(|e| LoadError::Malformed {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::new(inner, path, arch, model_vocab, eos_ids, template)
    }

    /// Wraps `inner` (read from `path`, named in errors) with its chat template.
    pub fn new(
        mut inner: Tokenizer,
        path: &Path,
        arch: Arch,
        model_vocab: usize,
        eos_ids: impl IntoIterator<Item = u32>,
        source: TemplateSource,
    ) -> Result<Self, LoadError> {
        let malformed = |reason: String| LoadError::Malformed {
            path: path.to_owned(),
            reason,
        };
        let mut markup = inner.clone();
        markup.set_encode_special_tokens(false);
        // Text given to `encode` is data: special tokens inside it are encoded as plain text.
        inner.set_encode_special_tokens(true);
        let max_id = inner.get_vocab(true).values().copied().max().unwrap_or(0);
        if max_id as usize >= model_vocab {
            return Err(LoadError::VocabMismatch {
                tokenizer_max_id: max_id,
                model_vocab,
            });
        }
        let template = match source.template.as_deref() {
            Some(text) => Template::Jinja(Box::new(
                ChatTemplate::new(
                    text,
                    source.bos_token.as_deref().unwrap_or(""),
                    source.eos_token.as_deref().unwrap_or(""),
                )
                .map_err(|e| malformed(e.to_string()))?,
            )),
            None => {
                let id = |token: &str| {
                    inner.token_to_id(token).ok_or_else(|| {
                        malformed(format!(
                            "the model has no chat template, and the ChatML token {token} of \
                             the fallback is missing"
                        ))
                    })
                };
                Template::ChatMl {
                    im_start: id(IM_START)?,
                    im_end: id(IM_END)?,
                }
            }
        };
        let mut specials: Vec<String> = inner
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special)
            .map(|t| t.content.clone())
            .collect();
        specials.sort();
        let mut eos_ids: BTreeSet<u32> = eos_ids.into_iter().collect();
        // A chat model that closes its turn is done, whatever its files list as EOS.
        for token in [IM_END, END_OF_TEXT]
            .into_iter()
            .chain(source.eos_token.as_deref())
        {
            if let Some(id) = inner.token_to_id(token) {
                eos_ids.insert(id);
            }
        }
        Ok(Self {
            inner,
            markup,
            template: std::sync::Arc::new(template),
            specials,
            arch,
            eos_ids,
            id_bound: max_id as usize + 1,
        })
    }

    /// Whether prompts are rendered by the model's own template (else by ChatML).
    pub fn has_model_template(&self) -> bool {
        matches!(*self.template, Template::Jinja(_))
    }

    /// One past the largest token id the tokenizer knows: ids from here to the model's
    /// vocabulary size (checkpoints pad theirs) decode to nothing and are never sampled.
    pub fn id_bound(&self) -> usize {
        self.id_bound
    }

    pub fn eos_ids(&self) -> &BTreeSet<u32> {
        &self.eos_ids
    }

    /// Encodes `text` as data: special tokens spelled in it stay text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, InferenceError> {
        self.encode_with(&self.inner, text)
    }

    /// The id of a vocabulary or added token.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The prompt of `messages`, with an assistant turn opened: the model's template with
    /// `add_generation_prompt` (and `enable_thinking` = `thinking`), else ChatML, where a Qwen3
    /// turn without `thinking` starts with an empty think block, as Qwen3's template does.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        thinking: bool,
    ) -> Result<Vec<u32>, InferenceError> {
        match &*self.template {
            Template::Jinja(template) => {
                let text = render(template, messages, true, thinking)?;
                self.encode_rendered(&text, messages)
            }
            Template::ChatMl { im_start, im_end } => {
                self.encode_chat_ml(messages, thinking, *im_start, *im_end)
            }
        }
    }

    /// The prompt text the model's template renders (`None` for the ChatML fallback).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        thinking: bool,
    ) -> Option<Result<String, InferenceError>> {
        match &*self.template {
            Template::Jinja(t) => Some(render(t, messages, add_generation_prompt, thinking)),
            Template::ChatMl { .. } => None,
        }
    }

    /// Encodes a rendered template: the template's markup with special tokens recognised,
    /// message text as data.
    pub fn encode_rendered(
        &self,
        text: &str,
        messages: &[ChatMessage],
    ) -> Result<Vec<u32>, InferenceError> {
        let spells_special =
            |m: &ChatMessage| self.specials.iter().any(|s| m.content.contains(s.as_str()));
        if !messages.iter().any(spells_special) {
            return self.encode_with(&self.markup, text);
        }
        // Cut the rendered text at the messages that spell a special token, found in order.
        let mut ids = Vec::new();
        let mut at = 0;
        for m in messages.iter().filter(|m| spells_special(m)) {
            let Some(found) = text[at..].find(m.content.as_str()) else {
                return Err(InferenceError::InvalidRequest {
                    field: "messages",
                    reason: "a message spells a special token and the chat template changes \
                             its text, so it cannot be kept as plain text"
                        .into(),
                });
            };
            ids.extend(self.encode_with(&self.markup, &text[at..at + found])?);
            ids.extend(self.encode(&m.content)?);
            at += found + m.content.len();
        }
        ids.extend(self.encode_with(&self.markup, &text[at..])?);
        Ok(ids)
    }

    fn encode_with(&self, tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, InferenceError> {
        let encoding = tokenizer
            .encode_fast(text, false)
            .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    fn encode_chat_ml(
        &self,
        messages: &[ChatMessage],
        thinking: bool,
        im_start: u32,
        im_end: u32,
    ) -> Result<Vec<u32>, InferenceError> {
        let newline = self.encode("\n")?;
        let mut ids = Vec::new();
        for m in messages {
            ids.push(im_start);
            ids.extend(self.encode(&format!("{}\n{}", m.role.as_str(), m.content))?);
            ids.push(im_end);
            ids.extend(&newline);
        }
        ids.push(im_start);
        let opening = match self.arch {
            Arch::Qwen3 if !thinking => format!("assistant\n{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"),
            _ => "assistant\n".to_owned(),
        };
        // The think markers are added (non-special) tokens: they must be matched here.
        ids.extend(self.encode_with(&self.inner, &opening)?);
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

/// The template's text for `messages`; a template that refuses them (`raise_exception`) is the
/// request's fault.
fn render(
    template: &ChatTemplate,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    thinking: bool,
) -> Result<String, InferenceError> {
    template
        .render(messages, add_generation_prompt, thinking)
        .map_err(|e| InferenceError::InvalidRequest {
            field: "messages",
            reason: e.to_string(),
        })
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
