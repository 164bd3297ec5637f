//! A test-only stand-in for llama.cpp's `llama-server`, answering in its shapes (as its
//! `tools/server` code does) rather than vLLM's: the vLLM backend's start-up detection and its
//! llama-server scoring path are tested against it.
//!
//! What it serves, like llama-server:
//! - `GET /v1/models` (`owned_by: "llamacpp"`, no `max_model_len`), `GET /health`.
//! - `POST /tokenize`: `{"content", "add_special", "parse_special"}` → `{"tokens": [..]}`; a body
//!   without `content` (vLLM's `prompt` / `messages`) gets `{"tokens": []}`. The tokenizer is
//!   one token per byte (id = byte value); `add_special` puts [`BOS`] first.
//! - `POST /apply-template`: chat messages → `{"prompt": ..}` in ChatML, the assistant turn
//!   opened unless `add_generation_prompt` is false.
//! - `POST /completion`: a prompt of token ids (or text), one greedy token, and with `n_probs`
//!   its `completion_probabilities` (`id`, `token`, `bytes`, `logprob`, `top_logprobs`), the
//!   log-probs being those of [`logprob`] before `logit_bias`, which only changes what is
//!   sampled (unless [`Behaviour::logit_bias`] is off: then it is ignored).
//! - `POST /v1/chat/completions` (streamed or not): honours `grammar` (an alternation of
//!   literals: the first one is the reply), ignores `structured_outputs`, names log-prob
//!   tokens by text with an `id` beside them.
//! - `POST /v1/completions`: a text reply; `prompt_logprobs` is ignored (llama-server has none).
//!
//! With [`Behaviour::native`] off it stands for a plain OpenAI-compatible server: the native
//! routes (`/tokenize`, `/apply-template`, `/completion`) answer 404.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use council_inference::vllm::PROBE_HEADER;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The beginning-of-sequence token `add_special` puts first.
pub const BOS: u32 = 1;

/// Tokens of the double's vocabulary: the 256 byte tokens its tokenizer makes, and more that
/// only the model's distribution has, so a byte token can rank far down the list.
pub const VOCAB: u32 = 4096;

/// How the double behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Behaviour {
    /// Serve the native routes (`/tokenize`, `/apply-template`, `/completion`).
    pub native: bool,
    /// Let `logit_bias` change the sampled token of `/completion`.
    pub logit_bias: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            native: true,
            logit_bias: true,
        }
    }
}

/// The double; dropping it shuts the server down.
pub struct LlamaDouble {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl fmt::Debug for LlamaDouble {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlamaDouble")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Shared {
    model: String,
    behaviour: Behaviour,
    /// (path, body) of every POST that is not a probe.
    posts: Mutex<Vec<(String, Value)>>,
    /// (path, probe name) of every probe.
    probes: Mutex<Vec<(String, String)>>,
}

impl Shared {
    fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a POST and parses its body.
    fn receive(
        &self,
        path: &str,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<Value, Box<Response>> {
        let parsed = serde_json::from_slice::<Value>(body);
        match headers.get(PROBE_HEADER) {
            Some(name) => Self::lock(&self.probes).push((
                path.to_owned(),
                String::from_utf8_lossy(name.as_bytes()).into_owned(),
            )),
            None => Self::lock(&self.posts).push((
                path.to_owned(),
                parsed.as_ref().cloned().unwrap_or(Value::Null),
            )),
        }
        parsed.map_err(|e| {
            Box::new(error(
                StatusCode::BAD_REQUEST,
                &format!("invalid JSON: {e}"),
            ))
        })
    }
}

impl LlamaDouble {
    /// Binds `127.0.0.1:0` and serves `model` on the current tokio runtime.
    ///
    /// # Panics
    /// If the loopback port cannot be bound.
    pub async fn start(model: &str, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the llama double binds 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let (shutdown, mut shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            model: model.to_owned(),
            behaviour,
            posts: Mutex::new(Vec::new()),
            probes: Mutex::new(Vec::new()),
        });
        let router = Router::new()
            .route("/v1/models", get(models))
            .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
            .route("/tokenize", post(tokenize_handler))
            .route("/apply-template", post(apply_template))
            .route("/completion", post(completion))
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .with_state(Arc::clone(&shared));
        tokio::spawn(async move {
            let stop = async move {
                let _ = shutdown_rx.wait_for(|stop| *stop).await;
            };
            if let Err(e) = axum::serve(listener, router)
                .with_graceful_shutdown(stop)
                .await
            {
                eprintln!("llama double stopped: {e}");
            }
        });
        Self {
            addr,
            shared,
            shutdown,
        }
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bodies of the POSTs to `path` that were not probes, in order.
    pub fn posts(&self, path: &str) -> Vec<Value> {
        Shared::lock(&self.shared.posts)
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, body)| body.clone())
            .collect()
    }

    /// Every POST that was not a probe.
    pub fn work_requests(&self) -> usize {
        Shared::lock(&self.shared.posts).len()
    }

    /// The names of the probes received, in order.
    pub fn probes(&self) -> Vec<String> {
        Shared::lock(&self.shared.probes)
            .iter()
            .map(|(_, name)| name.clone())
            .collect()
    }
}

impl Drop for LlamaDouble {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// The double's tokenizer: one token per byte, [`BOS`] first when `add_special`.
pub fn tokenize(text: &str, add_special: bool) -> Vec<u32> {
    let mut tokens: Vec<u32> = Vec::with_capacity(text.len() + 1);
    if add_special {
        tokens.push(BOS);
    }
    tokens.extend(text.bytes().map(u32::from));
    tokens
}

/// The double's chat template (ChatML), the assistant turn opened when `generation_prompt`.
pub fn render(messages: &[Value], generation_prompt: bool) -> String {
    let mut text: String = messages
        .iter()
        .map(|m| {
            format!(
                "<|im_start|>{}\n{}<|im_end|>\n",
                m["role"].as_str().unwrap_or_default(),
                m["content"].as_str().unwrap_or_default()
            )
        })
        .collect();
    if generation_prompt {
        text.push_str("<|im_start|>assistant\n");
    }
    text
}

/// The double model's logit of `token` after `context`: a fixed pseudo-random pattern.
fn logit(context: &[u32], token: u32) -> f64 {
    let last = u64::from(context.last().copied().unwrap_or(0));
    let mixed = u64::from(token) * 31 + context.len() as u64 * 7 + last * 13;
    -((mixed % 97) as f64) / 8.0
}

/// The double model's log-prob of `token` after `context` (a softmax over [`VOCAB`]).
pub fn logprob(context: &[u32], token: u32) -> f64 {
    logprobs(context)[token as usize]
}

/// The double model's log-prob of every token after `context`, by id.
fn logprobs(context: &[u32]) -> Vec<f64> {
    let logits: Vec<f64> = (0..VOCAB).map(|t| logit(context, t)).collect();
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
    logits.iter().map(|l| l - max - sum.ln()).collect()
}

/// The `n` most likely tokens after `context`, most likely first (ties by lower id).
pub fn top(context: &[u32], n: usize) -> Vec<u32> {
    let mut tokens: Vec<u32> = (0..VOCAB).collect();
    tokens.sort_by(|&a, &b| {
        logit(context, b)
            .total_cmp(&logit(context, a))
            .then(a.cmp(&b))
    });
    tokens.truncate(n);
    tokens
}

struct Json(Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            self.0.to_string(),
        )
            .into_response()
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = json!({"error": {"code": status.as_u16(), "message": message, "type": "invalid_request_error"}});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "File Not Found")
}

async fn models(State(shared): State<Arc<Shared>>) -> Json {
    Json(json!({
        "models": [{"name": shared.model, "model": shared.model, "type": "model"}],
        "object": "list",
        "data": [{"id": shared.model, "object": "model", "created": 0, "owned_by": "llamacpp",
                  "meta": {"vocab_type": 2, "n_vocab": VOCAB, "n_ctx_train": 8192}}],
    }))
}

async fn tokenize_handler(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = match shared.receive("/tokenize", &headers, &body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    if !shared.behaviour.native {
        return not_found();
    }
    let tokens = match request["content"].as_str() {
        Some(content) => tokenize(content, request["add_special"].as_bool().unwrap_or(false)),
        None => Vec::new(),
    };
    Json(json!({ "tokens": tokens })).into_response()
}

async fn apply_template(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = match shared.receive("/apply-template", &headers, &body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    if !shared.behaviour.native {
        return not_found();
    }
    let Some(messages) = request["messages"].as_array() else {
        return error(StatusCode::BAD_REQUEST, "'messages' is required");
    };
    let generation_prompt = request["add_generation_prompt"].as_bool().unwrap_or(true);
    Json(json!({ "prompt": render(messages, generation_prompt) })).into_response()
}

/// One log-prob entry as llama-server writes it.
fn entry(id: u32, logprob: f64) -> Value {
    let byte = u8::try_from(id).unwrap_or(b'?');
    json!({
        "id": id,
        "token": String::from_utf8_lossy(&[byte]),
        "bytes": [byte],
        "logprob": logprob,
    })
}

async fn completion(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = match shared.receive("/completion", &headers, &body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    if !shared.behaviour.native {
        return not_found();
    }
    let context: Vec<u32> = match &request["prompt"] {
        Value::String(text) => tokenize(text, true),
        Value::Array(items) if items.iter().all(Value::is_u64) => items
            .iter()
            .filter_map(Value::as_u64)
            .filter_map(|t| u32::try_from(t).ok())
            .collect(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "\"prompt\" must be a string or tokens",
            );
        }
    };
    if context.is_empty() {
        return error(StatusCode::BAD_REQUEST, "\"prompt\" must not be empty");
    }
    let forced = request["logit_bias"][0][0]
        .as_u64()
        .and_then(|t| u32::try_from(t).ok())
        .filter(|_| shared.behaviour.logit_bias);
    let sampled = forced.unwrap_or_else(|| top(&context, 1)[0]);
    let n_probs = request["n_probs"].as_u64().unwrap_or(0);
    let mut answer = json!({
        "index": 0,
        "content": String::from_utf8_lossy(&[u8::try_from(sampled).unwrap_or(b'?')]),
        "tokens": [],
        "id_slot": 0,
        "stop": true,
        "model": shared.model,
        "tokens_predicted": 1,
        "tokens_evaluated": context.len(),
        "stop_type": "limit",
        "stopping_word": "",
        "tokens_cached": 0,
    });
    if n_probs > 0 {
        let n = usize::try_from(n_probs).unwrap_or(usize::MAX);
        let all = logprobs(&context);
        let top_logprobs: Vec<Value> = top(&context, n)
            .into_iter()
            .map(|t| entry(t, all[t as usize]))
            .collect();
        let mut probs = entry(sampled, all[sampled as usize]);
        probs["top_logprobs"] = json!(top_logprobs);
        answer["completion_probabilities"] = json!([probs]);
    }
    Json(answer).into_response()
}

/// The reply of a chat request: the first literal of a `grammar`, else a fixed text.
fn chat_reply(request: &Value) -> String {
    if let Some(grammar) = request["grammar"].as_str()
        && let Some(rule) = grammar.strip_prefix("root ::= ")
    {
        let first = rule.split(" | ").next().unwrap_or_default();
        return first
            .trim_matches('"')
            .replace("\\\"", "\"")
            .replace("\\n", "\n")
            .replace("\\\\", "\\");
    }
    if request.get("json_schema").is_some() {
        return "{}".to_owned();
    }
    let last_user = request["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default();
    let head: String = last_user.chars().take(40).collect();
    format!("Reply to: {head}\nFINAL RANKING: Proposal A > Proposal B\nANSWER: 42")
}

async fn chat(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let request = match shared.receive("/v1/chat/completions", &headers, &body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let reply = chat_reply(&request);
    let max_tokens = request["max_tokens"].as_u64().unwrap_or(u64::MAX);
    // One "token" per word (with its following space).
    let mut words: Vec<String> = reply.split_inclusive(' ').map(str::to_owned).collect();
    words.truncate(usize::try_from(max_tokens).unwrap_or(usize::MAX));
    let logprobs = request["logprobs"].as_bool() == Some(true);
    let top_n = request["top_logprobs"].as_u64().unwrap_or(0);
    let logprob_of = |k: usize| -> Value {
        let id = u32::try_from(k % 200 + 32).unwrap_or(32);
        let mut e = entry(id, -0.5);
        e["token"] = json!(words[k]);
        e["top_logprobs"] = json!(
            (0..top_n)
                .map(|i| entry(id + u32::try_from(i).unwrap_or(0), -0.5 - i as f64))
                .collect::<Vec<_>>()
        );
        e
    };
    let usage = json!({"completion_tokens": words.len(), "prompt_tokens": 12, "total_tokens": 12 + words.len()});
    let model = shared.model.clone();
    if request["stream"].as_bool() != Some(true) {
        let content: String = words.concat();
        let lp = logprobs
            .then(|| json!({"content": (0..words.len()).map(logprob_of).collect::<Vec<_>>()}));
        return Json(json!({
            "choices": [{"finish_reason": "stop", "index": 0,
                         "message": {"role": "assistant", "content": content}, "logprobs": lp}],
            "created": 0, "model": model, "object": "chat.completion",
            "id": "chatcmpl-llama", "usage": usage,
        }))
        .into_response();
    }
    let mut events = String::new();
    for (k, word) in words.iter().enumerate() {
        let mut choice = json!({"finish_reason": null, "index": 0, "delta": {"content": word}});
        if logprobs {
            choice["logprobs"] = json!({"content": [logprob_of(k)]});
        }
        let chunk = json!({"choices": [choice], "created": 0, "id": "chatcmpl-llama",
                           "model": model, "object": "chat.completion.chunk"});
        events.push_str(&format!("data: {chunk}\n\n"));
    }
    // As llama-server streams the end: a finish chunk, then the usage in a chunk of its own.
    let last = json!({"choices": [{"finish_reason": "stop", "index": 0, "delta": {}}],
                      "created": 0, "id": "chatcmpl-llama", "model": model,
                      "object": "chat.completion.chunk"});
    let usage = json!({"choices": [], "created": 0, "id": "chatcmpl-llama", "model": model,
                       "object": "chat.completion.chunk", "usage": usage});
    events.push_str(&format!(
        "data: {last}\n\ndata: {usage}\n\ndata: [DONE]\n\n"
    ));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from(events),
    )
        .into_response()
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(response) = shared.receive("/v1/completions", &headers, &body) {
        return *response;
    }
    Json(json!({
        "choices": [{"text": "Hello", "index": 0, "logprobs": null, "finish_reason": "length"}],
        "created": 0, "model": shared.model, "object": "text_completion", "id": "cmpl-llama",
        "usage": {"completion_tokens": 1, "prompt_tokens": 4, "total_tokens": 5},
    }))
    .into_response()
}
