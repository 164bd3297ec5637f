//! Start-up checks of one server: that it serves the model (`GET /v1/models`), and what it can
//! serve beyond plain chat ([`Capabilities`]), each found with a small real request rather than
//! assumed from the server's name: vLLM's `/tokenize` forms and `prompt_logprobs`, how log-prob
//! tokens are named, llama-server's `/apply-template`, `/tokenize` and `/completion` `n_probs`
//! (and whether a `logit_bias`-forced token keeps its unbiased log-prob), and which form of
//! structured output is honoured.
//!
//! A probe answered with an error status or an unexpected shape means "not served" (the reason
//! is kept for the start-up warning); a probe that gets no answer at all fails start-up, as
//! the server is not answering.

use serde_json::{Value, json};

use super::caps::{Capabilities, LogprobTokens, StructuredForm};
use super::wire::Route;
use super::{VllmConfig, VllmError, llama, wire};
use crate::error::error_chain;
use crate::request::{ChatMessage, Prompt, ScoreRequest};

/// The header that marks a probe, so server logs (and test doubles) tell probes from work.
pub const PROBE_HEADER: &str = "x-council-probe";

/// What a constrained probe asks for: a word the model would not answer "Say hello." with.
const PROBE_WORD: &str = "council";

/// Top log-probs asked of llama-server's `/completion` probe.
const PROBE_TOP: usize = 8;

/// What start-up found on the endpoints.
pub(super) struct Found {
    /// The largest context window a model list names (0 when none does).
    pub context_window: usize,
    /// Per endpoint, in order: how many requests the server runs at once, where it says.
    pub slots: Vec<Option<usize>>,
    /// What every endpoint serves.
    pub caps: Capabilities,
}

/// Checks the model list of every endpoint and probes what it serves; logs one line of what
/// was found, a warning per thing that cannot be served, and the reasons.
pub(super) async fn start_up(
    client: &reqwest::Client,
    bases: &[String],
    config: &VllmConfig,
) -> Result<Found, VllmError> {
    let mut context_window = 0;
    let mut slots = Vec::with_capacity(bases.len());
    let mut found: Option<Capabilities> = None;
    for base in bases {
        let window = check_model(client, base, config).await?;
        context_window = context_window.max(window.unwrap_or(0));
        let caps = capabilities(client, base, config).await?;
        let p = Prober {
            client,
            base,
            config,
        };
        let n = if caps.llama_tokenize {
            p.total_slots().await?
        } else {
            None
        };
        if let Some(n) = n.filter(|n| *n < config.max_in_flight) {
            tracing::info!(
                endpoint = %base,
                "llama-server runs {n} requests at once (--parallel): at most {n} calls go to it \
                 at a time"
            );
        }
        slots.push(n);
        found = Some(match found {
            None => caps,
            Some(earlier) => earlier.both(caps),
        });
    }
    let caps = found.unwrap_or_default();
    let endpoints = bases.join(", ");
    tracing::info!(%endpoints, "server capabilities: {}", caps.summary());
    for warning in caps.warnings() {
        tracing::warn!(%endpoints, "{warning}");
    }
    if !caps.gaps.is_empty() {
        tracing::info!(%endpoints, "not served: {}", caps.gaps.join("; "));
    }
    Ok(Found {
        context_window,
        slots,
        caps,
    })
}

/// `GET /v1/models` on one endpoint; the model's context window when the server says.
async fn check_model(
    client: &reqwest::Client,
    base: &str,
    config: &VllmConfig,
) -> Result<Option<usize>, VllmError> {
    let url = format!("{base}/v1/models");
    let mut request = client.get(&url).timeout(config.first_token_timeout);
    if let Some(key) = &config.api_key {
        request = request.bearer_auth(key.expose());
    }
    let response = request.send().await.map_err(|e| VllmError::Unreachable {
        endpoint: base.to_owned(),
        reason: error_chain(&e),
    })?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| VllmError::Protocol {
        endpoint: base.to_owned(),
        reason: format!("the model list is not JSON: {e}"),
    })?;
    if !status.is_success() {
        return Err(VllmError::Refused {
            endpoint: base.to_owned(),
            status: status.as_u16(),
            message: wire::error_message(&body),
        });
    }
    let models = wire::models(&body).map_err(|e| VllmError::Protocol {
        endpoint: base.to_owned(),
        reason: e.0,
    })?;
    match models.iter().find(|(id, _)| *id == config.model) {
        Some((_, window)) => Ok(*window),
        None => Err(VllmError::ModelNotServed {
            endpoint: base.to_owned(),
            model: config.model.clone(),
            served: models.into_iter().map(|(id, _)| id).collect(),
        }),
    }
}

/// Finds out what the server at `base` serves.
async fn capabilities(
    client: &reqwest::Client,
    base: &str,
    config: &VllmConfig,
) -> Result<Capabilities, VllmError> {
    let p = Prober {
        client,
        base,
        config,
    };
    let mut caps = Capabilities::default();
    let hello = ScoreRequest::new(
        Prompt::Chat(vec![ChatMessage::user("Say hello.")]),
        vec![PROBE_WORD.to_owned()],
    );
    vllm_forms(&p, &hello, &mut caps).await?;
    caps.logprob_tokens = logprob_tokens(&p, &mut caps.gaps).await?;
    if !(caps.vllm_tokenize && caps.prompt_logprobs) {
        llama_forms(&p, &hello, &mut caps).await?;
    }
    caps.structured = structured(&p, &mut caps.gaps).await?;
    Ok(caps)
}

/// vLLM's `/tokenize` (`prompt` and `messages`) and `/v1/completions` `prompt_logprobs`.
async fn vllm_forms(
    p: &Prober<'_>,
    request: &ScoreRequest,
    caps: &mut Capabilities,
) -> Result<(), VllmError> {
    let model = p.config.model.as_str();
    let text = p
        .post(
            "/tokenize",
            "tokenize-prompt",
            &wire::tokenize_text(model, "Hello"),
        )
        .await?
        .and_then(|a| some_tokens(wire::tokens(&a)));
    let chat = p
        .post(
            "/tokenize",
            "tokenize-messages",
            &wire::tokenize_prompt(model, request),
        )
        .await?
        .and_then(|a| some_tokens(wire::tokens(&a)));
    let sequence = match (text, chat) {
        (Ok(_), Ok(sequence)) => sequence,
        (Err(reason), _) | (_, Err(reason)) => {
            caps.gaps
                .push(format!("vLLM /tokenize (prompt / messages): {reason}"));
            return Ok(());
        }
    };
    caps.vllm_tokenize = true;
    let body = wire::prompt_logprobs_body(model, &sequence);
    let answer = p
        .post(Route::Completions.path(), "prompt-logprobs", &body)
        .await?
        .and_then(|a| wire::prompt_logprobs(&a, &sequence).map_err(|e| e.0));
    match answer {
        Ok(_) => caps.prompt_logprobs = true,
        Err(reason) => caps.gaps.push(format!("prompt_logprobs: {reason}")),
    }
    Ok(())
}

/// How a chat answer's log-probs name their tokens.
async fn logprob_tokens(
    p: &Prober<'_>,
    gaps: &mut Vec<String>,
) -> Result<LogprobTokens, VllmError> {
    let mut body = p.chat(1);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(1);
    body["return_tokens_as_token_ids"] = json!(true);
    let found = match p.post(Route::Chat.path(), "logprobs", &body).await? {
        Ok(answer) => wire::logprob_tokens(&answer),
        Err(reason) => {
            gaps.push(format!("chat log-probs: {reason}"));
            return Ok(LogprobTokens::Absent);
        }
    };
    if !found.usable() {
        gaps.push(format!("chat log-probs: tokens come as {}", found.as_str()));
    }
    Ok(found)
}

/// llama-server's `/apply-template`, `/tokenize` with `content`, and `/completion` with
/// `n_probs`, with and without a `logit_bias`-forced token.
async fn llama_forms(
    p: &Prober<'_>,
    request: &ScoreRequest,
    caps: &mut Capabilities,
) -> Result<(), VllmError> {
    let prompt = p
        .post(
            "/apply-template",
            "apply-template",
            &llama::apply_template_body(request),
        )
        .await?
        .and_then(|a| llama::template_prompt(&a).map_err(|e| e.0));
    let prompt = match prompt {
        Ok(prompt) => prompt,
        Err(reason) => {
            caps.gaps
                .push(format!("llama-server /apply-template: {reason}"));
            return Ok(());
        }
    };
    let ids = p
        .post(
            "/tokenize",
            "tokenize-content",
            &llama::tokenize_body(&prompt, true),
        )
        .await?
        .and_then(|a| some_tokens(llama::tokens(&a)));
    let ids = match ids {
        Ok(ids) => ids,
        Err(reason) => {
            caps.gaps
                .push(format!("llama-server /tokenize (content): {reason}"));
            return Ok(());
        }
    };
    caps.llama_tokenize = true;
    let next = p
        .post(
            "/completion",
            "next-token-probs",
            &llama::next_token_body(&ids, PROBE_TOP, None),
        )
        .await?
        .and_then(|a| llama::next_token(&a).map_err(|e| e.0));
    let next = match next {
        Ok(next) if !next.top.is_empty() => next,
        Ok(_) => {
            caps.gaps
                .push("llama-server /completion: no top log-probs for n_probs".into());
            return Ok(());
        }
        Err(reason) => {
            caps.gaps
                .push(format!("llama-server /completion: {reason}"));
            return Ok(());
        }
    };
    caps.next_token_probs = true;
    // Force the least likely of the top tokens: its reported log-prob must be the unbiased one.
    let candidate = next
        .top
        .iter()
        .rev()
        .find(|(id, lp)| *id != next.id && *lp < -0.5)
        .copied();
    let Some((id, expected)) = candidate else {
        caps.gaps
            .push("logit_bias forcing: no top token to check it with".into());
        return Ok(());
    };
    let forced = p
        .post(
            "/completion",
            "forced-token",
            &llama::next_token_body(&ids, 1, Some(id)),
        )
        .await?
        .and_then(|a| llama::next_token(&a).map_err(|e| e.0));
    match forced {
        Ok(f) if f.id == id && (f.logprob - expected).abs() < 0.05 => caps.forced_logprob = true,
        Ok(f) => caps.gaps.push(format!(
            "logit_bias forcing: token {id} (log-prob {expected:.3}) came back as token {} \
             with log-prob {:.3}",
            f.id, f.logprob
        )),
        Err(reason) => caps.gaps.push(format!("logit_bias forcing: {reason}")),
    }
    Ok(())
}

/// Which constraint form the server honours: a reply of exactly the one allowed word.
async fn structured(p: &Prober<'_>, gaps: &mut Vec<String>) -> Result<StructuredForm, VllmError> {
    let forms = [
        (
            StructuredForm::StructuredOutputs,
            "structured_outputs",
            json!({ "choice": [PROBE_WORD] }),
        ),
        (
            StructuredForm::Grammar,
            "grammar",
            json!(llama::choice_grammar(&[PROBE_WORD.to_owned()])),
        ),
    ];
    for (form, key, spec) in forms {
        let mut body = p.chat(8);
        body[key] = spec;
        match p.post(Route::Chat.path(), key, &body).await? {
            Ok(answer) => match wire::chat_text(&answer).map(str::trim) {
                Some(PROBE_WORD) => return Ok(form),
                reply => gaps.push(format!(
                    "{key}: ignored (only {PROBE_WORD:?} was allowed; the reply was {:.60?})",
                    reply.unwrap_or_default()
                )),
            },
            Err(reason) => gaps.push(format!("{key}: {reason}")),
        }
    }
    Ok(StructuredForm::Ignored)
}

fn some_tokens(tokens: Result<Vec<u32>, super::ProtocolError>) -> Result<Vec<u32>, String> {
    match tokens {
        Ok(tokens) if !tokens.is_empty() => Ok(tokens),
        Ok(_) => Err("answered no tokens".into()),
        Err(e) => Err(e.0),
    }
}

/// One server being probed.
struct Prober<'a> {
    client: &'a reqwest::Client,
    base: &'a str,
    config: &'a VllmConfig,
}

impl Prober<'_> {
    /// llama-server's slot count (`GET /props` → `total_slots`), where it answers.
    async fn total_slots(&self) -> Result<Option<usize>, VllmError> {
        let mut request = self
            .client
            .get(format!("{}/props", self.base))
            .header(PROBE_HEADER, "props")
            .timeout(self.config.first_token_timeout);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key.expose());
        }
        let response = request.send().await.map_err(|e| VllmError::Unreachable {
            endpoint: self.base.to_owned(),
            reason: format!("probing props (/props): {}", error_chain(&e)),
        })?;
        if !response.status().is_success() {
            return Ok(None);
        }
        let props: Value = response.json().await.unwrap_or(Value::Null);
        Ok(props["total_slots"]
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| *n > 0))
    }

    /// A greedy, non-streamed "Say hello." chat body of `max_tokens`.
    fn chat(&self, max_tokens: usize) -> Value {
        json!({
            "model": self.config.model,
            "messages": [{ "role": "user", "content": "Say hello." }],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": false,
            "chat_template_kwargs": { "enable_thinking": false },
        })
    }

    /// POSTs a probe; `Ok(Err(reason))` when the server answered but not with a JSON success.
    async fn post(
        &self,
        path: &str,
        what: &str,
        body: &Value,
    ) -> Result<Result<Value, String>, VllmError> {
        let mut request = self
            .client
            .post(format!("{}{path}", self.base))
            .header(PROBE_HEADER, what)
            .timeout(self.config.first_token_timeout)
            .json(body);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key.expose());
        }
        let failed = |e: reqwest::Error| VllmError::Unreachable {
            endpoint: self.base.to_owned(),
            reason: format!("probing {what} ({path}): {}", error_chain(&e)),
        };
        let response = request.send().await.map_err(failed)?;
        let status = response.status();
        let text = response.text().await.map_err(failed)?;
        let parsed = serde_json::from_str::<Value>(&text);
        if !status.is_success() {
            let message = parsed
                .map(|body| wire::error_message(&body))
                .unwrap_or_else(|_| text.chars().take(200).collect());
            return Ok(Err(format!(
                "{path} answered HTTP {}: {message}",
                status.as_u16()
            )));
        }
        Ok(parsed.map_err(|e| format!("{path} answered a body that is not JSON ({e})")))
    }
}
