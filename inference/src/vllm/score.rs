//! Choice scoring ([`crate::Backend::score`]) in the form the server was found to serve at
//! start-up: vLLM's `prompt_logprobs`, or llama-server's next-token `n_probs`; with neither,
//! a refusal before any request. Each choice's score is the sum of its tokens' log-probs after
//! the prompt (with the assistant turn opened), exactly; a token whose log-prob the server
//! does not report fails the call, never a guess.

use std::collections::{BTreeMap, BTreeSet};

use super::caps::ScoringForm;
use super::wire::Route;
use super::{Inner, llama, protocol, wire};
use crate::error::InferenceError;
use crate::request::{Prompt, ScoreRequest, ScoreResult, Usage};

/// Choice texts whose tokens are remembered ("A", "1".."10" come back all the time).
const CHOICE_CACHE: usize = 4096;

impl Inner {
    pub(super) async fn score(&self, request: ScoreRequest) -> Result<ScoreResult, InferenceError> {
        request.validate()?;
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        match self.caps.scoring() {
            ScoringForm::PromptLogprobs => self.score_prompt_logprobs(&request, deadline).await,
            ScoringForm::NextTokenProbs { forced } => {
                self.score_next_tokens(&request, forced, deadline).await
            }
            ScoringForm::Unavailable => Err(InferenceError::Unsupported {
                endpoint: self.info.device.clone(),
                reason: "the server cannot score choices: at start-up it served neither vLLM's \
                         /tokenize + prompt_logprobs nor llama-server's /tokenize + /completion \
                         n_probs (judge with text instead)"
                    .to_owned(),
            }),
        }
    }

    /// vLLM: the prompt and each choice are tokenized by the server (`/tokenize`), then each
    /// `prompt + choice` is sent to `/v1/completions` with `prompt_logprobs`, and the log-probs
    /// of the choice's tokens are summed. The server's prefix cache computes the shared prompt
    /// once.
    async fn score_prompt_logprobs(
        &self,
        request: &ScoreRequest,
        deadline: tokio::time::Instant,
    ) -> Result<ScoreResult, InferenceError> {
        let prompt = match &request.prompt {
            Prompt::Tokens(ids) => ids.clone(),
            Prompt::Chat(_) => {
                let body = wire::tokenize_prompt(&self.config.model, request);
                let answer = self.post("/tokenize", &body, deadline).await?;
                wire::tokens(&answer).map_err(|e| protocol(&self.info.device, e.0))?
            }
        };
        let mut scores = Vec::with_capacity(request.choices.len());
        for choice in &request.choices {
            let ids = self.choice_tokens(choice, deadline).await?;
            let mut sequence = prompt.clone();
            sequence.extend_from_slice(&ids);
            let body = wire::prompt_logprobs_body(&self.config.model, &sequence);
            let answer = self
                .post(Route::Completions.path(), &body, deadline)
                .await?;
            let logprobs = wire::prompt_logprobs(&answer, &sequence)
                .map_err(|e| protocol(&self.info.device, e.0))?;
            scores.push(logprobs[prompt.len()..].iter().sum());
        }
        Ok(scored(scores, prompt.len()))
    }

    /// llama-server: the chat prompt is rendered (`/apply-template`) and tokenized as the
    /// server tokenizes a chat prompt (`/tokenize`, special tokens on), each choice without
    /// special tokens. Then one `/completion` per distinct prefix of the choices' tokens
    /// (prompt + prefix, one token, the top `n_probs` log-probs): for "1".."10" that is the
    /// prompt alone, plus "1" when "10" is two tokens. Where `logit_bias` forcing was confirmed
    /// (`forced`), that token is one of the choice tokens due there: its reported log-prob is
    /// the unbiased one whatever its rank, and a forced choice token is never one llama-server
    /// leaves out (it reports nothing for a sampled token that is part of a UTF-8 character).
    /// A choice token outside the top log-probs gets a forced call of its own; without
    /// forcing, the call fails.
    async fn score_next_tokens(
        &self,
        request: &ScoreRequest,
        forced: bool,
        deadline: tokio::time::Instant,
    ) -> Result<ScoreResult, InferenceError> {
        let endpoint = &self.info.device;
        let prompt = match &request.prompt {
            Prompt::Tokens(ids) => ids.clone(),
            Prompt::Chat(_) => {
                let body = llama::apply_template_body(request);
                let answer = self.post("/apply-template", &body, deadline).await?;
                let text = llama::template_prompt(&answer).map_err(|e| protocol(endpoint, e.0))?;
                let answer = self
                    .post("/tokenize", &llama::tokenize_body(&text, true), deadline)
                    .await?;
                llama::tokens(&answer).map_err(|e| protocol(endpoint, e.0))?
            }
        };
        let mut choices = Vec::with_capacity(request.choices.len());
        for choice in &request.choices {
            choices.push(self.choice_tokens(choice, deadline).await?);
        }
        // The tokens each prefix must be followed by.
        let mut needed: BTreeMap<&[u32], BTreeSet<u32>> = BTreeMap::new();
        for ids in &choices {
            for i in 0..ids.len() {
                needed.entry(&ids[..i]).or_default().insert(ids[i]);
            }
        }
        let mut logprob: BTreeMap<(&[u32], u32), f64> = BTreeMap::new();
        for (prefix, tokens) in &needed {
            let mut sequence = prompt.clone();
            sequence.extend_from_slice(prefix);
            let top_n = llama::TOP_LOGPROBS.max(tokens.len());
            let first = tokens.first().copied().filter(|_| forced);
            let next = self.next_token(&sequence, top_n, first, deadline).await?;
            for &id in tokens {
                let value = match next.logprob_of(id) {
                    Some(value) => value,
                    None if forced => self.forced_logprob(&sequence, id, deadline).await?,
                    None => {
                        return Err(InferenceError::Unsupported {
                            endpoint: endpoint.clone(),
                            reason: format!(
                                "token {id} of a choice is not among the server's top {top_n} \
                                 next-token log-probs, and forcing it with logit_bias was not \
                                 confirmed at start-up: its score would be a guess"
                            ),
                        });
                    }
                };
                logprob.insert((prefix, id), value);
            }
        }
        let scores = choices
            .iter()
            .map(|ids| {
                (0..ids.len())
                    .map(|i| logprob.get(&(&ids[..i], ids[i])).copied().unwrap_or(0.0))
                    .sum()
            })
            .collect();
        Ok(scored(scores, prompt.len()))
    }

    /// The log-prob of `id` after `sequence`, made the sampled token by `logit_bias`.
    async fn forced_logprob(
        &self,
        sequence: &[u32],
        id: u32,
        deadline: tokio::time::Instant,
    ) -> Result<f64, InferenceError> {
        let next = self.next_token(sequence, 1, Some(id), deadline).await?;
        Ok(next.logprob)
    }

    /// One `/completion` of one token after `sequence` with the top `top_n` log-probs;
    /// `force` must come back as the sampled token.
    async fn next_token(
        &self,
        sequence: &[u32],
        top_n: usize,
        force: Option<u32>,
        deadline: tokio::time::Instant,
    ) -> Result<llama::NextToken, InferenceError> {
        let body = llama::next_token_body(sequence, top_n, force);
        let answer = self.post("/completion", &body, deadline).await?;
        let unsupported = |reason: String| InferenceError::Unsupported {
            endpoint: self.info.device.clone(),
            reason,
        };
        if answer.get("completion_probabilities").is_none() {
            // Deterministic for this prompt: asking again gets the same.
            return Err(unsupported(format!(
                "the server sent no log-probs for the token after this prompt (llama-server \
                 leaves them out when the sampled token, here {:?}, is part of a UTF-8 \
                 character)",
                answer["content"].as_str().unwrap_or_default()
            )));
        }
        let next = llama::next_token(&answer).map_err(|e| protocol(&self.info.device, e.0))?;
        match force {
            Some(id) if next.id != id => Err(unsupported(format!(
                "logit_bias did not force token {id} (the server sampled {}): its log-prob \
                 cannot be read",
                next.id
            ))),
            _ => Ok(next),
        }
    }

    /// A choice's tokens (no special tokens), asked of the server once per text.
    async fn choice_tokens(
        &self,
        choice: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<u32>, InferenceError> {
        if let Some(ids) = self
            .choice_cache
            .lock()
            .ok()
            .and_then(|cache| cache.get(choice).cloned())
        {
            return Ok(ids);
        }
        let ids = match self.caps.scoring() {
            ScoringForm::PromptLogprobs => {
                let body = wire::tokenize_text(&self.config.model, choice);
                let answer = self.post("/tokenize", &body, deadline).await?;
                wire::tokens(&answer)
            }
            _ => {
                let body = llama::tokenize_body(choice, false);
                let answer = self.post("/tokenize", &body, deadline).await?;
                llama::tokens(&answer)
            }
        }
        .map_err(|e| protocol(&self.info.device, e.0))?;
        if ids.is_empty() {
            return Err(protocol(
                &self.info.device,
                format!("the choice {choice:?} tokenized to no tokens"),
            ));
        }
        if let Ok(mut cache) = self.choice_cache.lock() {
            if cache.len() >= CHOICE_CACHE {
                cache.clear();
            }
            cache.insert(choice.to_owned(), ids.clone());
        }
        Ok(ids)
    }
}

fn scored(logprobs: Vec<f64>, prompt_tokens: usize) -> ScoreResult {
    ScoreResult {
        logprobs,
        usage: Usage {
            prompt_tokens,
            cached_prompt_tokens: 0,
            completion_tokens: 0,
        },
    }
}
