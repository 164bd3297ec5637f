//! What an OpenAI-compatible server was found to serve at start-up ([`Capabilities`]), and the
//! forms the backend uses because of it: how choices are scored ([`ScoringForm`]), how reply
//! constraints are sent ([`StructuredForm`]), how log-prob tokens are named
//! ([`LogprobTokens`]). Pure values; the requests that find them out are in `probe.rs`.

/// How a server names the token of each log-prob entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogprobTokens {
    /// No log-probs came back at all.
    Absent,
    /// Only the token's text: no id can be had, so log-probs cannot be served.
    Text,
    /// A numeric `id` beside the text (llama-server).
    IdField,
    /// `token_id:N` (vLLM with `return_tokens_as_token_ids`).
    TokenIds,
}

impl LogprobTokens {
    /// Whether results can carry token ids.
    pub fn usable(self) -> bool {
        self >= LogprobTokens::IdField
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LogprobTokens::Absent => "absent",
            LogprobTokens::Text => "text only",
            LogprobTokens::IdField => "numeric id",
            LogprobTokens::TokenIds => "token_id:N",
        }
    }
}

/// How a reply constraint reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StructuredForm {
    /// vLLM's `structured_outputs` (`choice`, `regex`, `json`).
    StructuredOutputs,
    /// llama-server's `grammar` (GBNF; a choice becomes an alternation of literals) and
    /// `json_schema`; a regex has no form there.
    Grammar,
    /// The server honours neither: constraints are not sent (and replies are still checked).
    Ignored,
}

impl StructuredForm {
    pub fn as_str(self) -> &'static str {
        match self {
            StructuredForm::StructuredOutputs => "structured_outputs",
            StructuredForm::Grammar => "grammar/json_schema",
            StructuredForm::Ignored => "ignored",
        }
    }
}

/// How [`crate::Backend::score`] is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringForm {
    /// vLLM: `/tokenize` with `messages` / `prompt`, then `/v1/completions` with
    /// `prompt_logprobs`, one call per choice.
    PromptLogprobs,
    /// llama-server: `/apply-template` and `/tokenize` with `content`, then `/completion` with
    /// `n_probs` and one generated token, one call per distinct prefix of the choices' tokens.
    /// `forced`: a token outside the top `n_probs` can be made the sampled one with
    /// `logit_bias` and still be reported with its unbiased log-prob (checked at start-up).
    NextTokenProbs { forced: bool },
    /// Neither form: scoring is refused at once.
    Unavailable,
}

impl ScoringForm {
    pub fn as_str(self) -> &'static str {
        match self {
            ScoringForm::PromptLogprobs => "prompt_logprobs",
            ScoringForm::NextTokenProbs { forced: true } => "next-token n_probs (+ logit_bias)",
            ScoringForm::NextTokenProbs { forced: false } => "next-token n_probs (top-N only)",
            ScoringForm::Unavailable => "unavailable",
        }
    }
}

/// What one server (or, combined, every endpoint) was found to serve, each found with a
/// real request at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// vLLM's `/tokenize` answers tokens for `prompt` and for `messages`.
    pub vllm_tokenize: bool,
    /// `/v1/completions` answers `prompt_logprobs` for every prompt token.
    pub prompt_logprobs: bool,
    pub logprob_tokens: LogprobTokens,
    /// llama-server's `/apply-template` and `/tokenize` with `content` answer (then generation
    /// bodies also carry its sampling terms: `top_k`, `min_p`, `repeat_penalty`).
    pub llama_tokenize: bool,
    /// llama-server's `/completion` answers `completion_probabilities` with token ids.
    pub next_token_probs: bool,
    /// A `logit_bias`-forced token is reported with its unbiased log-prob.
    pub forced_logprob: bool,
    pub structured: StructuredForm,
    /// What could not be served, and why (for the start-up warnings).
    pub gaps: Vec<String>,
}

impl Default for Capabilities {
    /// Nothing served (what a probe starts from).
    fn default() -> Self {
        Self {
            vllm_tokenize: false,
            prompt_logprobs: false,
            logprob_tokens: LogprobTokens::Absent,
            llama_tokenize: false,
            next_token_probs: false,
            forced_logprob: false,
            structured: StructuredForm::Ignored,
            gaps: Vec::new(),
        }
    }
}

impl Capabilities {
    /// Everything vLLM serves (for a backend built without probing, e.g. in unit tests).
    pub fn vllm() -> Self {
        Self {
            vllm_tokenize: true,
            prompt_logprobs: true,
            logprob_tokens: LogprobTokens::TokenIds,
            structured: StructuredForm::StructuredOutputs,
            ..Self::default()
        }
    }

    pub fn scoring(&self) -> ScoringForm {
        if self.vllm_tokenize && self.prompt_logprobs {
            ScoringForm::PromptLogprobs
        } else if self.llama_tokenize && self.next_token_probs {
            ScoringForm::NextTokenProbs {
                forced: self.forced_logprob,
            }
        } else {
            ScoringForm::Unavailable
        }
    }

    /// What every one of several endpoints serves (a call may go to any of them).
    pub fn both(self, other: Capabilities) -> Capabilities {
        let mut gaps = self.gaps;
        gaps.extend(other.gaps);
        Capabilities {
            vllm_tokenize: self.vllm_tokenize && other.vllm_tokenize,
            prompt_logprobs: self.prompt_logprobs && other.prompt_logprobs,
            logprob_tokens: self.logprob_tokens.min(other.logprob_tokens),
            llama_tokenize: self.llama_tokenize && other.llama_tokenize,
            next_token_probs: self.next_token_probs && other.next_token_probs,
            forced_logprob: self.forced_logprob && other.forced_logprob,
            structured: if self.structured == other.structured {
                self.structured
            } else {
                StructuredForm::Ignored
            },
            gaps,
        }
    }

    /// One line of what was found, for the start-up log.
    pub fn summary(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        format!(
            "choice scoring: {}; vLLM /tokenize: {}; prompt_logprobs: {}; log-prob tokens: {}; \
             llama-server /tokenize+/apply-template: {}; /completion n_probs: {}; \
             forced-token log-prob: {}; structured outputs: {}",
            self.scoring().as_str(),
            yes(self.vllm_tokenize),
            yes(self.prompt_logprobs),
            self.logprob_tokens.as_str(),
            yes(self.llama_tokenize),
            yes(self.next_token_probs),
            yes(self.forced_logprob),
            self.structured.as_str(),
        )
    }

    /// The consequences worth a warning: what callers will be refused or lose.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        match self.scoring() {
            ScoringForm::Unavailable => warnings.push(
                "the server cannot score choices (neither vLLM's /tokenize + prompt_logprobs \
                 nor llama-server's /tokenize + /completion n_probs): log-prob judging is \
                 refused; judge with text"
                    .to_owned(),
            ),
            ScoringForm::NextTokenProbs { forced: false } => warnings.push(
                "choice scoring reads the top-N next-token log-probs only (logit_bias forcing \
                 was not confirmed): a choice token outside them fails its judgement"
                    .to_owned(),
            ),
            _ => {}
        }
        if !self.logprob_tokens.usable() {
            warnings.push(format!(
                "generated-token log-probs carry no token ids ({}): requests asking for \
                 log-probs are refused",
                self.logprob_tokens.as_str()
            ));
        }
        match self.structured {
            StructuredForm::Ignored => warnings.push(
                "the server ignores reply constraints (structured outputs): they are not sent, \
                 and a reply that breaks one is still an error"
                    .to_owned(),
            ),
            StructuredForm::Grammar => warnings.push(
                "reply constraints go as llama-server's grammar / json_schema; a regex \
                 constraint has no such form and is not sent (the reply is still checked)"
                    .to_owned(),
            ),
            StructuredForm::StructuredOutputs => {}
        }
        warnings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama() -> Capabilities {
        Capabilities {
            logprob_tokens: LogprobTokens::IdField,
            llama_tokenize: true,
            next_token_probs: true,
            forced_logprob: true,
            structured: StructuredForm::Grammar,
            gaps: vec!["no prompt_logprobs".into()],
            ..Capabilities::default()
        }
    }

    #[test]
    fn the_scoring_form_follows_what_was_found() {
        assert_eq!(Capabilities::vllm().scoring(), ScoringForm::PromptLogprobs);
        assert_eq!(
            llama().scoring(),
            ScoringForm::NextTokenProbs { forced: true }
        );
        assert_eq!(Capabilities::default().scoring(), ScoringForm::Unavailable);
        let half = Capabilities {
            vllm_tokenize: true,
            ..Capabilities::default()
        };
        assert_eq!(half.scoring(), ScoringForm::Unavailable);
        assert!(Capabilities::vllm().warnings().is_empty());
        let warnings = Capabilities::default().warnings().join("\n");
        assert!(warnings.contains("cannot score choices"), "{warnings}");
        assert!(warnings.contains("ignores reply constraints"), "{warnings}");
    }

    #[test]
    fn several_endpoints_serve_what_all_of_them_serve() {
        let mixed = Capabilities::vllm().both(llama());
        assert_eq!(mixed.scoring(), ScoringForm::Unavailable);
        assert_eq!(mixed.logprob_tokens, LogprobTokens::IdField);
        assert!(mixed.logprob_tokens.usable());
        assert_eq!(mixed.structured, StructuredForm::Ignored);
        assert_eq!(mixed.gaps, vec!["no prompt_logprobs".to_owned()]);
        assert_eq!(llama().both(llama()).scoring(), llama().scoring());
        assert!(!LogprobTokens::Text.usable());
    }
}
