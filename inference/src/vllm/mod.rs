//! The [`Backend`] over OpenAI-compatible servers (vLLM): streamed chat and token completions,
//! usage and log-probs from the response, a bounded number of calls in flight per endpoint,
//! retries only where safe (connect errors, 429, 503) with jitter and `Retry-After`, a circuit
//! breaker per endpoint, first-token and idle timeouts on streams, and cancellation: dropping a
//! call's future drops its HTTP request.
//!
//! At start-up every endpoint is probed for what it serves beyond plain chat (`probe.rs`):
//! vLLM's forms, or llama.cpp's `llama-server` native ones; choice scoring and reply
//! constraints use the form found, and what no endpoint serves is refused before any request.
//!
//! There is no fallback anywhere: a call that cannot be answered is an error the caller sees.

pub mod caps;
pub mod llama;
pub mod policy;
mod probe;
mod score;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Semaphore;

use self::caps::{Capabilities, ScoringForm};
use self::policy::{Breaker, BreakerPolicy, RetryPolicy};
pub use self::probe::PROBE_HEADER;
use self::wire::Route;
use crate::backend::{Backend, BackendFuture, BackendLoad, Health, ModelInfo, ScoreFuture};
use crate::constraint::Constraint;
use crate::engine::tokenizer::strip_think;
use crate::error::{InferenceError, error_chain};
use crate::request::{FinishReason, GenerateRequest, GenerateResult, ScoreRequest, Timings, Usage};

/// A reply that broke the protocol (of a stream, or of one of the servers' own routes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(pub String);

/// A bearer key; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into().trim().to_owned())
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// How to reach the servers and how hard to try.
#[derive(Debug, Clone)]
pub struct VllmConfig {
    /// Base URLs (`http://host:8000`, with or without a trailing `/v1`); calls spread over the
    /// healthy ones.
    pub endpoints: Vec<String>,
    /// The served model name every call asks for.
    pub model: String,
    pub api_key: Option<ApiKey>,
    /// Calls in flight per endpoint, shared by everything using this backend.
    pub max_in_flight: usize,
    pub connect_timeout: Duration,
    /// The whole call, retries included (a caller with less time left cancels sooner by
    /// dropping the call).
    pub request_timeout: Duration,
    /// From sending a request to its first streamed token.
    pub first_token_timeout: Duration,
    /// Longest silence between two streamed chunks.
    pub idle_timeout: Duration,
    pub retry: RetryPolicy,
    pub breaker: BreakerPolicy,
}

impl VllmConfig {
    /// Defaults for everything but where the servers are and what they serve.
    pub fn new(endpoints: Vec<String>, model: impl Into<String>) -> Self {
        Self {
            endpoints,
            model: model.into(),
            api_key: None,
            max_in_flight: 64,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(300),
            first_token_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            breaker: BreakerPolicy::default(),
        }
    }

    fn validate(&self) -> Result<Vec<String>, VllmError> {
        let bad = |field: &'static str, reason: String| VllmError::Config { field, reason };
        if self.endpoints.is_empty() {
            return Err(bad("endpoints", "name at least one endpoint URL".into()));
        }
        if self.model.trim().is_empty() {
            return Err(bad("model", "must not be empty".into()));
        }
        if self.max_in_flight == 0 {
            return Err(bad("max_in_flight", "must be at least 1".into()));
        }
        for (field, value) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("first_token_timeout", self.first_token_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if value.is_zero() {
                return Err(bad(field, "must be longer than zero".into()));
            }
        }
        if self.breaker.failures == 0 {
            return Err(bad("breaker.failures", "must be at least 1".into()));
        }
        self.endpoints.iter().map(|e| base_url(e)).collect()
    }
}

/// Checks an endpoint URL and returns its base: `http(s)://host[:port][/prefix]` without a
/// trailing `/v1` or `/`.
pub fn normalise_endpoint(endpoint: &str) -> Result<String, VllmError> {
    base_url(endpoint)
}

fn base_url(endpoint: &str) -> Result<String, VllmError> {
    let bad = |reason: &str| VllmError::Config {
        field: "endpoints",
        reason: format!("{endpoint:?}: {reason}"),
    };
    let url = reqwest::Url::parse(endpoint.trim()).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "credentials do not belong in the URL; use the API key setting",
        ));
    }
    let text = url.as_str().trim_end_matches('/');
    Ok(text.strip_suffix("/v1").unwrap_or(text).to_owned())
}

/// Why the backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum VllmError {
    #[error("vllm config: {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("vllm endpoint {endpoint} is unreachable: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("vllm endpoint {endpoint} refused the model list: HTTP {status}: {message}")]
    Refused {
        endpoint: String,
        status: u16,
        message: String,
    },
    #[error(
        "vllm endpoint {endpoint} does not serve model {model:?}; it serves: {}",
        if .served.is_empty() { "nothing".to_owned() } else { .served.join(", ") }
    )]
    ModelNotServed {
        endpoint: String,
        model: String,
        served: Vec<String>,
    },
    #[error("vllm endpoint {endpoint}: {reason}")]
    Protocol { endpoint: String, reason: String },
}

/// One server.
#[derive(Debug)]
struct Endpoint {
    base: String,
    /// Calls in flight at most: `max_in_flight`, or fewer where the server runs fewer at once.
    capacity: usize,
    permits: Arc<Semaphore>,
    breaker: Mutex<Breaker>,
}

impl Endpoint {
    fn allows(&self, now: Instant) -> bool {
        self.breaker.lock().map(|b| b.allows(now)).unwrap_or(true)
    }

    fn record(&self, ok: bool, policy: BreakerPolicy) {
        if let Ok(mut b) = self.breaker.lock() {
            if ok {
                b.success();
            } else {
                b.failure(Instant::now(), policy);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    waiting: AtomicU64,
    running: AtomicU64,
    calls: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    generated_tokens: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    client: reqwest::Client,
    config: VllmConfig,
    endpoints: Vec<Endpoint>,
    info: ModelInfo,
    /// What every endpoint serves (found at start-up).
    caps: Capabilities,
    /// Tokens of choice texts already asked of the server.
    choice_cache: Mutex<HashMap<String, Vec<u32>>>,
    /// Whether the warning for a constraint left out of a request was given.
    warned_constraint: AtomicBool,
    counters: Counters,
    next: AtomicUsize,
    jitter: Mutex<crate::rng::Rng>,
}

/// The backend; cheap to clone.
#[derive(Debug, Clone)]
pub struct VllmBackend {
    inner: Arc<Inner>,
}

impl VllmBackend {
    /// Checks the configuration and that every endpoint serves the model, and finds out what
    /// every endpoint can serve beyond plain chat (logged: one line of what was found, a
    /// warning for each thing that cannot be served).
    pub async fn connect(config: VllmConfig) -> Result<Self, VllmError> {
        let bases = config.validate()?;
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            // Servers close idle keep-alive connections after 5 s (llama-server's cpp-httplib,
            // uvicorn under vLLM); a request sent on one as it closes fails with "connection
            // closed before message completed". Connections idle longer than this are not reused.
            .pool_idle_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| VllmError::Config {
                field: "endpoints",
                reason: format!("cannot build an HTTP client: {e}"),
            })?;
        let probe::Found {
            context_window,
            slots,
            caps,
        } = probe::start_up(&client, &bases, &config).await?;
        let endpoints = bases
            .iter()
            .zip(slots)
            .map(|(base, slots)| {
                // More calls than the server runs at once would only queue in the server,
                // under our first-token timeout.
                let capacity = slots.map_or(config.max_in_flight, |n| n.min(config.max_in_flight));
                Endpoint {
                    base: base.clone(),
                    capacity,
                    permits: Arc::new(Semaphore::new(capacity)),
                    breaker: Mutex::new(Breaker::default()),
                }
            })
            .collect();
        let info = ModelInfo {
            name: config.model.clone(),
            model_type: "vllm".to_owned(),
            context_window,
            vocab_size: 0,
            device: bases.join(", "),
        };
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                config,
                endpoints,
                info,
                caps,
                choice_cache: Mutex::new(HashMap::new()),
                warned_constraint: AtomicBool::new(false),
                counters: Counters::default(),
                next: AtomicUsize::new(0),
                jitter: Mutex::new(crate::rng::Rng::new(seed)),
            }),
        })
    }

    /// What the endpoints were found to serve at start-up.
    pub fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    /// Calls holding an endpoint permit now (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        self.inner
            .endpoints
            .iter()
            .map(|e| e.capacity - e.permits.available_permits())
            .sum()
    }
}

/// How one attempt failed.
#[derive(Debug)]
enum AttemptError {
    /// Safe to send again: nothing was generated (connect error, 429, 503).
    Retryable {
        error: InferenceError,
        retry_after: Option<Duration>,
    },
    /// Not to be sent again; `endpoint_fault` says whether it counts against the endpoint.
    Fatal {
        error: InferenceError,
        endpoint_fault: bool,
    },
}

impl Inner {
    async fn generate(&self, request: GenerateRequest) -> Result<GenerateResult, InferenceError> {
        let submitted = Instant::now();
        if request.top_logprobs.is_some() && !self.caps.logprob_tokens.usable() {
            return Err(InferenceError::Unsupported {
                endpoint: self.info.device.clone(),
                reason: format!(
                    "the request asks for log-probs, and the server's log-prob tokens carry no \
                     ids ({})",
                    self.caps.logprob_tokens.as_str()
                ),
            });
        }
        let (route, mut body) = wire::body(&self.config.model, &request, self.caps.structured);
        if self.caps.llama_tokenize {
            llama::sampling_fields(&mut body, &request.sampling);
        }
        if let Some(constraint) = &request.constraint
            && wire::constraint_field(constraint, self.caps.structured).is_none()
            && !self.warned_constraint.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                endpoints = %self.info.device,
                "a reply constraint ({constraint:?}) has no form this server honours \
                 ({}): it is not sent, and the reply is checked against it",
                self.caps.structured.as_str()
            );
        }
        let constraint = request.constraint.as_ref();
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let result = self
            .call(deadline, |endpoint| {
                self.attempt(endpoint, route, &body, constraint, submitted)
            })
            .await?;
        self.count(&result);
        Ok(result)
    }

    /// Runs `attempt` on a healthy endpoint under its call limit, retrying where safe, until
    /// it succeeds, fails for good, or `deadline` passes.
    async fn call<'a, T, F, Fut>(
        &'a self,
        deadline: tokio::time::Instant,
        attempt: F,
    ) -> Result<T, InferenceError>
    where
        F: Fn(&'a Endpoint) -> Fut,
        Fut: std::future::Future<Output = Result<T, AttemptError>>,
    {
        let mut retry = 0;
        loop {
            let endpoint = self.pick()?;
            self.counters.waiting.fetch_add(1, Ordering::Relaxed);
            let permit = tokio::time::timeout_at(deadline, endpoint.permits.acquire()).await;
            self.counters.waiting.fetch_sub(1, Ordering::Relaxed);
            let Ok(Ok(permit)) = permit else {
                return Err(timeout(&endpoint.base, "a free call slot"));
            };
            self.counters.running.fetch_add(1, Ordering::Relaxed);
            let outcome = tokio::time::timeout_at(deadline, attempt(endpoint)).await;
            self.counters.running.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
            let failure = match outcome {
                Err(_) => {
                    endpoint.record(false, self.config.breaker);
                    return Err(timeout(&endpoint.base, "the request deadline"));
                }
                Ok(Ok(value)) => {
                    endpoint.record(true, self.config.breaker);
                    return Ok(value);
                }
                Ok(Err(failure)) => failure,
            };
            let (error, retry_after) = match failure {
                AttemptError::Fatal {
                    error,
                    endpoint_fault,
                } => {
                    if endpoint_fault {
                        endpoint.record(false, self.config.breaker);
                    }
                    return Err(error);
                }
                AttemptError::Retryable { error, retry_after } => (error, retry_after),
            };
            endpoint.record(false, self.config.breaker);
            let unit = self.jitter.lock().map(|mut r| r.next_f64()).unwrap_or(0.5);
            let wait = (retry < self.config.retry.max_retries)
                .then(|| self.config.retry.wait(retry, retry_after, unit))
                .flatten();
            let Some(wait) = wait else { return Err(error) };
            if tokio::time::Instant::now() + wait >= deadline {
                return Err(error);
            }
            tracing::debug!(endpoint = %endpoint.base, retry, ?wait, %error, "retrying");
            tokio::time::sleep(wait).await;
            retry += 1;
        }
    }

    /// One JSON POST to `path`, not streamed, answered within the first-token timeout.
    async fn post_json(
        &self,
        endpoint: &Endpoint,
        path: &str,
        body: &Value,
    ) -> Result<Value, AttemptError> {
        let base = &endpoint.base;
        let answered_by = tokio::time::Instant::now() + self.config.first_token_timeout;
        let response = self
            .send(base, path, body, answered_by, "the response")
            .await?;
        let text = tokio::time::timeout(self.config.idle_timeout, response.text())
            .await
            .map_err(|_| fatal(timeout(base, "the response body"), true))?
            .map_err(|e| fatal(unavailable(base, error_chain(&e)), true))?;
        serde_json::from_str(&text).map_err(|e| {
            fatal(
                protocol(base, format!("the response is not JSON ({e})")),
                true,
            )
        })
    }

    /// POSTs `body` to `base + path` with the key, and waits for a 2xx status until `by`
    /// (`what` names the wait in the timeout error). A connect error may be retried; a non-2xx
    /// status is classified by [`status_error`].
    async fn send(
        &self,
        base: &str,
        path: &str,
        body: &Value,
        by: tokio::time::Instant,
        what: &str,
    ) -> Result<reqwest::Response, AttemptError> {
        let mut request = self.client.post(format!("{base}{path}")).json(body);
        if self.caps.llama_tokenize && body["stream"] == true {
            // llama-server closes the connection after a streamed answer although it says
            // keep-alive; a request sent on it meanwhile fails ("connection closed before
            // message completed"), so such a connection is not offered for reuse.
            request = request.header(reqwest::header::CONNECTION, "close");
        }
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key.expose());
        }
        let response = match tokio::time::timeout_at(by, request.send()).await {
            Err(_) => return Err(fatal(timeout(base, what), true)),
            Ok(Err(e)) if e.is_connect() => {
                return Err(AttemptError::Retryable {
                    error: unavailable(base, error_chain(&e)),
                    retry_after: None,
                });
            }
            Ok(Err(e)) => return Err(fatal(unavailable(base, error_chain(&e)), true)),
            Ok(Ok(response)) => response,
        };
        if !response.status().is_success() {
            return Err(status_error(base, response).await);
        }
        Ok(response)
    }

    /// POSTs `body` to `path` on a healthy endpoint, with the usual retries and limits.
    async fn post(
        &self,
        path: &str,
        body: &Value,
        deadline: tokio::time::Instant,
    ) -> Result<Value, InferenceError> {
        self.call(deadline, |endpoint| self.post_json(endpoint, path, body))
            .await
    }

    /// The least busy endpoint whose breaker lets calls through (round robin among equals).
    fn pick(&self) -> Result<&Endpoint, InferenceError> {
        let now = Instant::now();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.endpoints.len();
        (0..n)
            .map(|k| &self.endpoints[(start + k) % n])
            .filter(|e| e.allows(now))
            .max_by_key(|e| e.permits.available_permits())
            .ok_or_else(|| InferenceError::Unavailable {
                endpoint: self.info.device.clone(),
                reason: format!(
                    "every endpoint's circuit breaker is open after {} consecutive failures; \
                     retrying after {:?}",
                    self.config.breaker.failures, self.config.breaker.open_for
                ),
            })
    }

    fn count(&self, result: &GenerateResult) {
        let c = &self.counters;
        c.calls.fetch_add(1, Ordering::Relaxed);
        let u = result.usage;
        c.prompt_tokens
            .fetch_add(u.prompt_tokens as u64, Ordering::Relaxed);
        c.cached_tokens
            .fetch_add(u.cached_prompt_tokens as u64, Ordering::Relaxed);
        c.generated_tokens
            .fetch_add(u.completion_tokens as u64, Ordering::Relaxed);
    }

    /// One HTTP request, streamed to its end.
    async fn attempt(
        &self,
        endpoint: &Endpoint,
        route: Route,
        body: &Value,
        constraint: Option<&Constraint>,
        submitted: Instant,
    ) -> Result<GenerateResult, AttemptError> {
        let base = &endpoint.base;
        let first_token = tokio::time::Instant::now() + self.config.first_token_timeout;
        let response = self
            .send(base, route.path(), body, first_token, "the first token")
            .await?;
        let reply = self.read_stream(base, response, first_token).await?;
        let result = result(reply, submitted);
        if let Some(constraint) = constraint
            && let Err(reason) = constraint.check(&result.text)
        {
            let error = InferenceError::ConstraintViolated {
                endpoint: base.to_owned(),
                reason,
            };
            return Err(fatal(error, false));
        }
        Ok(result)
    }

    async fn read_stream(
        &self,
        base: &str,
        mut response: reqwest::Response,
        first_token: tokio::time::Instant,
    ) -> Result<StreamReply, AttemptError> {
        let mut reply = wire::Reply::default();
        let mut buffer = String::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut first_at = None;
        while !reply.done {
            let limit = match first_at {
                None => first_token,
                Some(_) => tokio::time::Instant::now() + self.config.idle_timeout,
            };
            let what = if first_at.is_none() {
                "the first token"
            } else {
                "the next streamed chunk (the server went idle)"
            };
            let chunk = match tokio::time::timeout_at(limit, response.chunk()).await {
                Err(_) => return Err(fatal(timeout(base, what), true)),
                Ok(Err(e)) => return Err(fatal(unavailable(base, error_chain(&e)), true)),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(bytes))) => bytes,
            };
            pending.extend_from_slice(&chunk);
            // Keep an incomplete UTF-8 sequence for the next chunk.
            let valid = match std::str::from_utf8(&pending) {
                Ok(text) => text.len(),
                Err(e) => e.valid_up_to(),
            };
            buffer.push_str(std::str::from_utf8(&pending[..valid]).unwrap_or_default());
            pending.drain(..valid);
            let before = reply.text.len();
            wire::feed(&mut buffer, &mut reply).map_err(|e| fatal(protocol(base, e.0), true))?;
            if first_at.is_none() && (reply.text.len() > before || reply.finish_reason.is_some()) {
                first_at = Some(Instant::now());
            }
        }
        if !reply.done && reply.finish_reason.is_none() {
            return Err(fatal(
                protocol(
                    base,
                    "the stream ended before the reply was finished".into(),
                ),
                true,
            ));
        }
        Ok(StreamReply { reply, first_at })
    }
}

/// A finished stream and when its first token came.
#[derive(Debug)]
struct StreamReply {
    reply: wire::Reply,
    first_at: Option<Instant>,
}

fn result(stream: StreamReply, submitted: Instant) -> GenerateResult {
    let StreamReply { reply, first_at } = stream;
    let finish_reason = match (reply.finish_reason.as_deref(), &reply.stop_reason) {
        (Some("length"), _) => FinishReason::Length,
        (_, Some(_)) => FinishReason::Stop,
        _ => FinishReason::Eos,
    };
    let usage = reply.usage.unwrap_or_default();
    let token_ids = reply.logprobs.iter().map(|l| l.token_id).collect();
    let logprobs = (!reply.logprobs.is_empty()).then_some(reply.logprobs);
    GenerateResult {
        text: strip_think(&reply.text),
        token_ids,
        finish_reason,
        usage: Usage {
            prompt_tokens: usage.prompt_tokens,
            cached_prompt_tokens: usage.cached_tokens,
            completion_tokens: usage.completion_tokens,
        },
        timings: Timings {
            queue: Duration::ZERO,
            first_token: first_at.map_or(Duration::ZERO, |t| t - submitted),
            total: submitted.elapsed(),
        },
        logprobs,
    }
}

fn fatal(error: InferenceError, endpoint_fault: bool) -> AttemptError {
    AttemptError::Fatal {
        error,
        endpoint_fault,
    }
}

fn timeout(endpoint: &str, what: &str) -> InferenceError {
    InferenceError::Timeout {
        endpoint: endpoint.to_owned(),
        what: what.to_owned(),
    }
}

fn unavailable(endpoint: &str, reason: String) -> InferenceError {
    InferenceError::Unavailable {
        endpoint: endpoint.to_owned(),
        reason,
    }
}

fn protocol(endpoint: &str, reason: String) -> InferenceError {
    InferenceError::Protocol {
        endpoint: endpoint.to_owned(),
        reason,
    }
}

/// A non-2xx answer: 429 and 503 may be retried (honouring `Retry-After`); other statuses
/// fail at once with the server's message.
async fn status_error(endpoint: &str, response: reqwest::Response) -> AttemptError {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(policy::parse_retry_after);
    let text = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<Value>(&text)
        .map(|body| wire::error_message(&body))
        .unwrap_or_else(|_| text.chars().take(500).collect());
    let error = InferenceError::Upstream {
        endpoint: endpoint.to_owned(),
        status,
        message,
    };
    match status {
        429 | 503 => AttemptError::Retryable { error, retry_after },
        // A client error is the request's fault, not the server's.
        400..=499 => fatal(error, false),
        _ => fatal(error, true),
    }
}

impl Backend for VllmBackend {
    fn generate(&self, request: GenerateRequest) -> BackendFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            request.validate()?;
            inner.generate(request).await
        })
    }

    fn score(&self, request: ScoreRequest) -> ScoreFuture {
        let inner = self.inner.clone();
        Box::pin(async move { inner.score(request).await })
    }

    fn scores_choices(&self) -> bool {
        self.inner.caps.scoring() != ScoringForm::Unavailable
    }

    fn health(&self) -> Health {
        let now = Instant::now();
        if self.inner.endpoints.iter().any(|e| e.allows(now)) {
            Health::Ready
        } else {
            Health::Unavailable {
                reason: format!(
                    "every vLLM endpoint's circuit breaker is open ({})",
                    self.inner.info.device
                ),
            }
        }
    }

    fn model_info(&self) -> &ModelInfo {
        &self.inner.info
    }

    fn load(&self) -> BackendLoad {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let calls = get(&c.calls);
        BackendLoad {
            waiting: get(&c.waiting),
            running: get(&c.running),
            steps: calls,
            batched_sequences: calls,
            prompt_tokens: get(&c.prompt_tokens),
            generated_tokens: get(&c.generated_tokens),
            prefix_cache: Some((get(&c.cached_tokens), get(&c.prompt_tokens))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalised_and_bad_ones_named() {
        assert_eq!(base_url("http://h:8000").expect("ok"), "http://h:8000");
        assert_eq!(base_url("http://h:8000/v1/").expect("ok"), "http://h:8000");
        assert_eq!(
            base_url("https://h/proxy/v1").expect("ok"),
            "https://h/proxy"
        );
        for bad in ["h:8000", "ftp://h", "http://user:pw@h:1", "not a url"] {
            let err = base_url(bad).expect_err(bad).to_string();
            assert!(err.contains("endpoints") && err.contains(bad), "{err}");
        }
    }

    #[test]
    fn config_errors_name_the_field_and_keys_never_print() {
        let mut config = VllmConfig::new(vec![], "m");
        assert!(
            config
                .validate()
                .expect_err("no endpoints")
                .to_string()
                .contains("endpoints")
        );
        config.endpoints = vec!["http://h:1".into()];
        config.max_in_flight = 0;
        assert!(
            config
                .validate()
                .expect_err("zero")
                .to_string()
                .contains("max_in_flight")
        );
        config.max_in_flight = 1;
        config.idle_timeout = Duration::ZERO;
        assert!(
            config
                .validate()
                .expect_err("zero")
                .to_string()
                .contains("idle_timeout")
        );
        config.api_key = Some(ApiKey::new("sk-secret"));
        assert!(!format!("{config:?}").contains("sk-secret"));
    }
}
