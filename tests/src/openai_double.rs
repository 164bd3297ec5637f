//! A test-only OpenAI-compatible HTTP server (the subset vLLM serves) that misbehaves on demand.
//!
//! The vLLM backend's tests start one on `127.0.0.1:0`, point the client at [`OpenAiDouble::url`],
//! and script failures with [`Fault`]s. It lives here, under `tests/`, because a double of an
//! external service is no part of any production crate.
//!
//! Routes:
//! - `GET /v1/models`: the configured model names.
//! - `GET /health`: 200 with an empty body (vLLM's readiness probe).
//! - `POST /v1/chat/completions` and `POST /v1/completions`: deterministic replies computed from the
//!   request (see [`OpenAiDouble::set_reply`]), streamed as Server-Sent Events when `stream` is true.
//!
//! Faults apply to the two generation routes only; `/v1/models` and `/health` always behave.
//! A request naming a model that is not configured gets vLLM's 404; one without `model` is
//! served by the first configured model. A reply constraint sent as vLLM's
//! `structured_outputs.choice` is honoured (the first option) unless a reply is scripted.
//!
//! The capability probes a backend sends at start-up (marked with the
//! [`council_inference::vllm::PROBE_HEADER`] header) are answered like any request but take no
//! fault and are not counted in [`OpenAiDouble::requests`] or recorded in
//! [`OpenAiDouble::bodies`]: tests count the calls of the work they do
//! ([`OpenAiDouble::probes`] counts the probes).
//!
//! Every request runs in its own task (one per connection, as hyper serves HTTP/1), so a hung
//! request never blocks another. When a client drops the connection of a hung or stalled request,
//! hyper notices the EOF (it watches the socket while a response is pending or streaming) and drops
//! the handler future or the response body; [`OpenAiDouble::in_flight`] then goes back down. That
//! needs the request body to have been read in full (it always is here: handlers take the whole
//! body first) and the client to close the socket, not merely stop reading.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use council_inference::vllm::PROBE_HEADER;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

/// A misbehaviour of the next generation request (see [`OpenAiDouble::push_faults`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 500 with `{"error":{"message":"boom","type":"internal"}}`.
    Status500,
    /// 429 with a `Retry-After: {retry_after_secs}` header.
    TooManyRequests {
        /// The value of the `Retry-After` header, in seconds.
        retry_after_secs: u64,
    },
    /// 503 without `Retry-After`.
    Unavailable503,
    /// 400 with `{"error":{"message":"max_tokens is too large: 99999", ..}}`.
    BadRequest400,
    /// Accepts the request and never sends the response headers (until the double is dropped).
    Hang,
    /// Streamed: sends the first `after_chunks` SSE events, then nothing, the connection kept open
    /// (never `[DONE]`, whatever `after_chunks` is). Not streamed: sends 200 headers and a body
    /// that never arrives.
    StallMidStream {
        /// How many `data:` events go out before the stall.
        after_chunks: usize,
    },
    /// Not streamed: 200 with a body that is not JSON. Streamed: one good chunk, then a `data:`
    /// line that is not JSON, then `data: [DONE]`.
    MalformedJson,
    /// A normal answer whose `"model"` is the requested model with `-wrong` appended.
    WrongModel,
}

/// The test double; dropping it shuts the server down (and releases hung requests).
pub struct OpenAiDouble {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl fmt::Debug for OpenAiDouble {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiDouble")
            .field("addr", &self.addr)
            .field("requests", &self.requests())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl OpenAiDouble {
    /// Binds `127.0.0.1:0` and serves `models` on the current tokio runtime.
    ///
    /// # Panics
    /// If the loopback port cannot be bound.
    pub async fn start(models: &[&str]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the OpenAI double binds 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            state: Mutex::new(Script {
                models: owned(models),
                ..Script::default()
            }),
            requests: AtomicUsize::new(0),
            probes: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            shutdown: shutdown_rx.clone(),
        });
        let router = Router::new()
            .route("/v1/models", get(list_models))
            .route("/health", get(|| async { StatusCode::OK }))
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/completions", post(completions))
            .route("/tokenize", post(tokenize))
            .with_state(Arc::clone(&shared));
        tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(shut_down(shutdown_rx))
                .await;
            if let Err(error) = served {
                eprintln!("OpenAI double stopped: {error}");
            }
        });
        Self {
            addr,
            shared,
            shutdown,
        }
    }

    /// The base URL, `http://127.0.0.1:PORT` (no `/v1`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues faults: each generation request takes the next one (FIFO); once the queue is empty,
    /// requests behave. A fault set by [`Self::set_fault_always`] takes precedence.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.script().faults.extend(faults);
    }

    /// Gives every generation request `fault`; `None` goes back to the queue (or to behaving).
    pub fn set_fault_always(&self, fault: Option<Fault>) {
        self.shared.script().always = fault;
    }

    /// Replaces the served model names.
    pub fn set_models(&self, models: &[&str]) {
        self.shared.script().models = owned(models);
    }

    /// `Some(text)` makes every reply `text` (no thinking prefix); `None` goes back to the
    /// generated `Reply to: ..` text.
    pub fn set_reply(&self, text: Option<String>) {
        self.shared.script().reply = text;
    }

    /// Waits `delay` before each SSE event of a streamed reply (zero by default), so a client's
    /// time to first token and inter-chunk gaps are not zero.
    pub fn set_chunk_delay(&self, delay: Duration) {
        self.shared.script().chunk_delay = delay;
    }

    /// Chat and completion requests received (not `/v1/models`, not start-up probes),
    /// faulted ones included.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Start-up probes received on the generation routes.
    pub fn probes(&self) -> usize {
        self.shared.probes.load(Ordering::SeqCst)
    }

    /// Generation requests being served: the handler has started and neither finished nor been
    /// dropped; a streamed reply counts until its body ends or is dropped. A client that drops a
    /// hung or stalled request is seen once hyper reads the EOF, shortly after, not at once.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// The high-water mark of [`Self::in_flight`].
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// The generation request bodies received, in order (a body that is not JSON is kept as a
    /// JSON string of its text).
    pub fn bodies(&self) -> Vec<Value> {
        self.shared.script().bodies.clone()
    }

    /// The headers of the generation requests, in order (names lowercase), same indices as
    /// [`Self::bodies`].
    pub fn headers(&self) -> Vec<Vec<(String, String)>> {
        self.shared.script().headers.clone()
    }
}

impl Drop for OpenAiDouble {
    fn drop(&mut self) {
        // Stops accepting, releases hung and stalled requests, then lets connections close.
        self.shutdown.send_replace(true);
    }
}

/// What the handlers share with the test.
#[derive(Debug)]
struct Shared {
    state: Mutex<Script>,
    requests: AtomicUsize,
    probes: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    shutdown: watch::Receiver<bool>,
}

/// What the test scripted, and what the double recorded.
#[derive(Debug, Default)]
struct Script {
    models: Vec<String>,
    reply: Option<String>,
    faults: VecDeque<Fault>,
    always: Option<Fault>,
    chunk_delay: Duration,
    bodies: Vec<Value>,
    headers: Vec<Vec<(String, String)>>,
}

impl Shared {
    fn script(&self) -> MutexGuard<'_, Script> {
        // A test that panicked while holding the lock has failed already; keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a generation request and takes its fault (a probe is only counted).
    fn receive(
        &self,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> (Result<Value, ApiError>, Option<Fault>) {
        let parsed = serde_json::from_slice::<Value>(body);
        if headers.contains_key(PROBE_HEADER) {
            self.probes.fetch_add(1, Ordering::SeqCst);
            let parsed =
                parsed.map_err(|error| bad_request(&format!("invalid JSON body: {error}")));
            return (parsed, None);
        }
        let recorded = match &parsed {
            Ok(value) => value.clone(),
            Err(_) => Value::String(String::from_utf8_lossy(body).into_owned()),
        };
        let headers = headers
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), value)
            })
            .collect();
        let mut script = self.script();
        script.bodies.push(recorded);
        script.headers.push(headers);
        self.requests.fetch_add(1, Ordering::SeqCst);
        let fault = match &script.always {
            Some(fault) => Some(fault.clone()),
            None => script.faults.pop_front(),
        };
        let parsed = parsed.map_err(|error| bad_request(&format!("invalid JSON body: {error}")));
        (parsed, fault)
    }

    /// Resolves the requested model: vLLM answers 404 for a model it does not serve.
    fn model(&self, request: &Value) -> Result<String, ApiError> {
        let models = self.script().models.clone();
        match request.get("model").and_then(Value::as_str) {
            Some(model) if models.iter().any(|served| served == model) => Ok(model.to_owned()),
            Some(model) => Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!("The model `{model}` does not exist."),
                kind: "NotFoundError",
            }),
            None => models
                .first()
                .cloned()
                .ok_or_else(|| bad_request("no model is served")),
        }
    }
}

/// Counts a request in flight until dropped (the handler returned, hyper dropped it, or the
/// streamed body it was moved into ended or was dropped).
#[derive(Debug)]
struct InFlight(Arc<Shared>);

impl InFlight {
    fn enter(shared: &Arc<Shared>) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(Arc::clone(shared))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn shut_down(mut shutdown: watch::Receiver<bool>) {
    // An error means the sender is gone, which is a shutdown as well.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn list_models(State(shared): State<Arc<Shared>>) -> Response {
    let data: Vec<Value> = shared
        .script()
        .models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "vllm"}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(&shared, &headers, &body, Generation::chat).await
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(&shared, &headers, &body, Generation::completion).await
}

/// A generation route: record the request, apply its fault, build and send the reply.
async fn generate(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    body: &Bytes,
    build: fn(&Shared, &Value) -> Result<Generation, ApiError>,
) -> Response {
    let guard = InFlight::enter(shared);
    let (request, fault) = shared.receive(headers, body);
    if let Some(response) = early_fault(shared, fault.as_ref()).await {
        return response;
    }
    match request.and_then(|request| build(shared, &request)) {
        Ok(generation) => generation.respond(shared, fault, guard),
        Err(error) => error.into_response(),
    }
}

/// The faults that answer (or hang) before the request is looked at.
async fn early_fault(shared: &Shared, fault: Option<&Fault>) -> Option<Response> {
    let response = match fault? {
        Fault::Status500 => error_response(StatusCode::INTERNAL_SERVER_ERROR, "boom", "internal"),
        Fault::TooManyRequests { retry_after_secs } => (
            [(header::RETRY_AFTER, retry_after_secs.to_string())],
            error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "rate limited",
                "rate_limit_exceeded",
            ),
        )
            .into_response(),
        Fault::Unavailable503 => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "service unavailable",
            "unavailable",
        ),
        Fault::BadRequest400 => bad_request("max_tokens is too large: 99999").into_response(),
        Fault::Hang => {
            // Never answers; the client's timeout or disconnect (or the double's drop) ends it.
            shut_down(shared.shutdown.clone()).await;
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting down",
                "unavailable",
            )
        }
        Fault::StallMidStream { .. } | Fault::MalformedJson | Fault::WrongModel => return None,
    };
    Some(response)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Chat,
    Completion,
}

/// One reply, computed from a request, ready to be rendered whole or as chunks.
#[derive(Debug)]
struct Generation {
    route: Route,
    id: String,
    model: String,
    /// The reply split after each whitespace run: one piece per word, concatenating to the reply.
    pieces: Vec<String>,
    /// Completions with `echo`: the prompt text, put before the reply.
    echo: String,
    usage: Value,
    stream: bool,
    include_usage: bool,
    /// Chat: `top_logprobs` when `logprobs` is true; completions: the `logprobs` count.
    logprobs: Option<usize>,
    prompt_logprobs: Option<Value>,
    chunk_delay: Duration,
}

impl Generation {
    fn chat(shared: &Shared, request: &Value) -> Result<Self, ApiError> {
        let model = shared.model(request)?;
        let messages = request
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| bad_request("messages must be a list"))?;
        let contents: Vec<String> = messages.iter().map(message_text).collect();
        let last_user = messages
            .iter()
            .rposition(|message| message.get("role").and_then(Value::as_str) == Some("user"))
            .map_or("", |index| contents[index].as_str());
        let thinking = request
            .pointer("/chat_template_kwargs/enable_thinking")
            .and_then(Value::as_bool)
            == Some(true);
        let prefix = if thinking {
            "<think>pondering</think>"
        } else {
            ""
        };
        let prompt_chars = contents
            .iter()
            .map(|text| text.chars().count())
            .sum::<usize>();
        let logprobs = (request.get("logprobs").and_then(Value::as_bool) == Some(true))
            .then(|| count(request, "top_logprobs"));
        Ok(Self::new(
            shared,
            request,
            Route::Chat,
            model,
            format!("{prefix}{}", generated(last_user)),
            (prompt_chars / 4).max(1),
            logprobs,
        ))
    }

    fn completion(shared: &Shared, request: &Value) -> Result<Self, ApiError> {
        let model = shared.model(request)?;
        let prompt = Prompt::parse(request.get("prompt"))?;
        let logprobs = request
            .get("logprobs")
            .and_then(Value::as_u64)
            .map(as_usize);
        let mut generation = Self::new(
            shared,
            request,
            Route::Completion,
            model,
            generated(&prompt.text),
            prompt.token_count(),
            logprobs,
        );
        if request.get("echo").and_then(Value::as_bool) == Some(true) {
            generation.echo = prompt.text.clone();
        }
        if request.get("prompt_logprobs").is_some_and(|n| !n.is_null()) {
            generation.prompt_logprobs = Some(prompt.logprobs());
        }
        Ok(generation)
    }

    fn new(
        shared: &Shared,
        request: &Value,
        route: Route,
        model: String,
        generated: String,
        prompt_tokens: usize,
        logprobs: Option<usize>,
    ) -> Self {
        let (reply, chunk_delay) = {
            let script = shared.script();
            (script.reply.clone(), script.chunk_delay)
        };
        // vLLM honours a choice constraint; a scripted reply stands for a server that does not.
        let honoured = request
            .pointer("/structured_outputs/choice/0")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let reply = reply.or(honoured).unwrap_or(generated);
        let pieces = pieces(&reply);
        let prefix = match route {
            Route::Chat => "chatcmpl",
            Route::Completion => "cmpl",
        };
        Self {
            route,
            id: format!("{prefix}-double-{}", shared.requests.load(Ordering::SeqCst)),
            model,
            usage: json!({
                "prompt_tokens": prompt_tokens,
                "completion_tokens": pieces.len(),
                "total_tokens": prompt_tokens + pieces.len(),
                "prompt_tokens_details": {"cached_tokens": prompt_tokens / 2},
            }),
            pieces,
            echo: String::new(),
            stream: request.get("stream").and_then(Value::as_bool) == Some(true),
            include_usage: request
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                == Some(true),
            logprobs,
            prompt_logprobs: None,
            chunk_delay,
        }
    }

    /// Renders the reply as `fault` (one that answers) says.
    fn respond(mut self, shared: &Shared, fault: Option<Fault>, guard: InFlight) -> Response {
        if fault == Some(Fault::WrongModel) {
            self.model.push_str("-wrong");
        }
        let stall = match fault {
            Some(Fault::StallMidStream { after_chunks }) => Some(after_chunks),
            _ => None,
        };
        let malformed = fault == Some(Fault::MalformedJson);
        if !self.stream {
            if stall.is_some() {
                let events = Events {
                    items: Vec::new(),
                    stall: true,
                    delay: Duration::ZERO,
                };
                let body = events.into_body(shared.shutdown.clone(), guard);
                return json_body_response(StatusCode::OK, body);
            }
            if malformed {
                return json_body_response(StatusCode::OK, Body::from("{\"id\": oops, not json"));
            }
            return json_response(StatusCode::OK, &self.whole());
        }
        let mut items = self.events();
        if malformed {
            items.truncate(1);
            items.push("data: {\"choices\": [oops, not json\n\n".to_owned());
            items.push("data: [DONE]\n\n".to_owned());
        }
        if let Some(after_chunks) = stall {
            // Never `[DONE]`: a stall is a stall however many chunks came first.
            items.truncate(after_chunks.min(items.len().saturating_sub(1)));
        }
        let events = Events {
            items,
            stall: stall.is_some(),
            delay: self.chunk_delay,
        };
        let body = events.into_body(shared.shutdown.clone(), guard);
        (
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response()
    }

    fn reply(&self) -> String {
        self.pieces.concat()
    }

    /// The non-streamed `chat.completion` or `text_completion` object.
    fn whole(&self) -> Value {
        let choice = match self.route {
            Route::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": self.reply()},
                "logprobs": self.logprobs.map(|top| {
                    json!({"content": self.chat_logprobs(0..self.pieces.len(), top)})
                }),
                "finish_reason": "stop",
            }),
            Route::Completion => json!({
                "index": 0,
                "text": format!("{}{}", self.echo, self.reply()),
                "logprobs": self
                    .logprobs
                    .map(|top| self.completion_logprobs(0..self.pieces.len(), top)),
                "finish_reason": "stop",
                "prompt_logprobs": self.prompt_logprobs,
            }),
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": now(),
            "model": self.model,
            "choices": [choice],
            "usage": self.usage,
        })
    }

    /// The SSE events of a streamed reply, `[DONE]` included.
    fn events(&self) -> Vec<String> {
        let last = self.pieces.len().saturating_sub(1);
        let mut events: Vec<String> = (0..=last)
            .map(|index| self.chunk(index, index == last))
            .collect();
        if self.include_usage {
            let usage = self.frame(json!([]), Some(&self.usage));
            events.push(format!("data: {usage}\n\n"));
        }
        events.push("data: [DONE]\n\n".to_owned());
        events
    }

    /// The content chunk of piece `index` (or the one empty chunk of an empty reply).
    fn chunk(&self, index: usize, last: bool) -> String {
        let piece = self.pieces.get(index).map_or("", String::as_str);
        let finish = if last { json!("stop") } else { Value::Null };
        let choice = match self.route {
            Route::Chat => {
                let delta = if index == 0 {
                    json!({"role": "assistant", "content": piece})
                } else {
                    json!({"content": piece})
                };
                let logprobs = self
                    .logprobs
                    .filter(|_| !piece.is_empty())
                    .map(|top| json!({"content": self.chat_logprobs(index..index + 1, top)}));
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Route::Completion => {
                let echo = if index == 0 { self.echo.as_str() } else { "" };
                let logprobs = self
                    .logprobs
                    .filter(|_| !piece.is_empty())
                    .map(|top| self.completion_logprobs(index..index + 1, top));
                let mut choice = json!({
                    "index": 0,
                    "text": format!("{echo}{piece}"),
                    "logprobs": logprobs,
                    "finish_reason": finish,
                });
                if index == 0 && self.prompt_logprobs.is_some() {
                    choice["prompt_logprobs"] = json!(self.prompt_logprobs);
                }
                choice
            }
        };
        format!("data: {}\n\n", self.frame(json!([choice]), None))
    }

    fn frame(&self, choices: Value, usage: Option<&Value>) -> Value {
        let mut frame = json!({
            "id": self.id,
            "object": self.object(true),
            "created": now(),
            "model": self.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            frame["usage"] = usage.clone();
        }
        frame
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.route, chunk) {
            (Route::Chat, false) => "chat.completion",
            (Route::Chat, true) => "chat.completion.chunk",
            (Route::Completion, _) => "text_completion",
        }
    }

    /// Chat `logprobs.content` entries of the pieces in `range`, `top` alternatives each.
    fn chat_logprobs(&self, range: Range<usize>, top: usize) -> Vec<Value> {
        range
            .map(|k| {
                let alternatives: Vec<Value> = (0..top)
                    .map(|i| json!({"token": token_name(k + i), "logprob": logprob(i)}))
                    .collect();
                json!({"token": token_name(k), "logprob": logprob(0), "top_logprobs": alternatives})
            })
            .collect()
    }

    /// Completions-style `logprobs` (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`,
    /// offsets in chars) of the pieces in `range`.
    fn completion_logprobs(&self, range: Range<usize>, top: usize) -> Value {
        let chars = |pieces: &[String]| pieces.iter().map(|p| p.chars().count()).sum::<usize>();
        let mut offset = self.echo.chars().count() + chars(&self.pieces[..range.start]);
        let mut text_offset = Vec::new();
        for piece in &self.pieces[range.clone()] {
            text_offset.push(offset);
            offset += piece.chars().count();
        }
        json!({
            "tokens": range.clone().map(token_name).collect::<Vec<_>>(),
            "token_logprobs": range.clone().map(|_| logprob(0)).collect::<Vec<_>>(),
            "top_logprobs": range
                .map(|k| {
                    (0..top)
                        .map(|i| (token_name(k + i), json!(logprob(i))))
                        .collect::<serde_json::Map<_, _>>()
                })
                .collect::<Vec<_>>(),
            "text_offset": text_offset,
        })
    }
}

/// A completions prompt: text, or token ids (then `text` is their decoded form).
#[derive(Debug)]
struct Prompt {
    text: String,
    tokens: Option<Vec<u64>>,
}

impl Prompt {
    fn parse(prompt: Option<&Value>) -> Result<Self, ApiError> {
        match prompt {
            Some(Value::String(text)) => Ok(Self {
                text: text.clone(),
                tokens: None,
            }),
            Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_u64) => {
                let tokens: Vec<u64> = items.iter().filter_map(Value::as_u64).collect();
                Ok(Self {
                    text: tokens.iter().map(|&id| decoded(id)).collect(),
                    tokens: Some(tokens),
                })
            }
            // A batch of one (`["text"]` or `[[1, 2]]`); larger batches are not served.
            Some(Value::Array(items)) if items.len() == 1 => Self::parse(items.first()),
            _ => Err(bad_request(
                "prompt must be a string, a list of token ids, or a one-item list of either",
            )),
        }
    }

    fn token_count(&self) -> usize {
        match &self.tokens {
            Some(tokens) => tokens.len(),
            None => (self.text.chars().count() / 4).max(1),
        }
    }

    /// vLLM's `prompt_logprobs`: `null` for the first token, then `{"id": {logprob, rank,
    /// decoded_token}}` per token. A text prompt is one token per char (id = code point).
    fn logprobs(&self) -> Value {
        let tokens: Vec<(u64, String)> = match &self.tokens {
            Some(tokens) => tokens.iter().map(|&id| (id, decoded(id))).collect(),
            None => self
                .text
                .chars()
                .map(|c| (u64::from(c), c.to_string()))
                .collect(),
        };
        let entries: Vec<Value> = tokens
            .iter()
            .enumerate()
            .map(|(position, (id, text))| {
                if position == 0 {
                    return Value::Null;
                }
                let mut entry = serde_json::Map::new();
                entry.insert(
                    id.to_string(),
                    json!({
                        "logprob": prompt_logprob(position),
                        "rank": 1,
                        "decoded_token": text,
                    }),
                );
                Value::Object(entry)
            })
            .collect();
        Value::Array(entries)
    }
}

/// The SSE events of one streamed reply and how they go out.
#[derive(Debug)]
struct Events {
    items: Vec<String>,
    /// Keep the body open after the last item instead of ending it.
    stall: bool,
    delay: Duration,
}

impl Events {
    /// A body fed by a task of its own, so each event is written (and flushed by hyper) as it is
    /// sent; `guard` lives in the body, so the request stays in flight until the body ends or
    /// hyper drops it.
    fn into_body(self, mut shutdown: watch::Receiver<bool>, guard: InFlight) -> Body {
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        tokio::spawn(async move {
            for item in self.items {
                if !self.delay.is_zero() {
                    tokio::time::sleep(self.delay).await;
                }
                if tx.send(Bytes::from(item)).await.is_err() {
                    return; // the client went away
                }
            }
            if self.stall {
                tokio::select! {
                    () = tx.closed() => {}
                    _ = shutdown.wait_for(|stop| *stop) => {}
                }
            }
        });
        let stream = ReceiverStream::new(rx).map(move |item| {
            let _in_flight = &guard;
            Ok::<_, Infallible>(item)
        });
        Body::from_stream(stream)
    }
}

/// The text of a message's `content`: a string, or the `text` of its parts.
fn message_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// The well-behaved reply to a prompt.
fn generated(prompt: &str) -> String {
    let head: String = prompt.chars().take(40).collect();
    format!("Reply to: {head}\nFINAL RANKING: Proposal A > Proposal B\nANSWER: 42")
}

/// Splits `reply` after each whitespace run: one piece per whitespace-separated word, each with
/// the whitespace that follows it (leading whitespace joins the first piece), so the pieces
/// concatenate back to `reply`.
fn pieces(reply: &str) -> Vec<String> {
    let mut pieces: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    for c in reply.chars() {
        if c.is_whitespace() {
            in_word = false;
        } else {
            if !in_word && current.chars().any(|c| !c.is_whitespace()) {
                pieces.push(std::mem::take(&mut current));
            }
            in_word = true;
        }
        current.push(c);
    }
    if current.chars().any(|c| !c.is_whitespace()) {
        pieces.push(current);
    } else if let Some(last) = pieces.last_mut() {
        last.push_str(&current);
    }
    pieces
}

fn token_name(k: usize) -> String {
    format!("token_id:{k}")
}

/// The log-prob of the `i`-th alternative of a generated token: -0.5, -1.5, ...
fn logprob(i: usize) -> f64 {
    -0.5 - i as f64
}

/// The log-prob of the prompt token at `position`: -0.1 × (position % 7 + 1).
fn prompt_logprob(position: usize) -> f64 {
    -((position % 7 + 1) as f64) / 10.0
}

fn decoded(id: u64) -> String {
    format!("<{id}>")
}

fn count(request: &Value, field: &str) -> usize {
    request
        .get(field)
        .and_then(Value::as_u64)
        .map_or(0, as_usize)
}

fn as_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

fn owned(models: &[&str]) -> Vec<String> {
    models.iter().map(|&model| model.to_owned()).collect()
}

fn json_body_response(status: StatusCode, body: Body) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `POST /tokenize` as vLLM answers it (`{"tokens": [..], "count": n, "max_model_len": ..}`),
/// with the double's own tokenizer: see [`double_tokens`].
async fn tokenize(body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "the body is not JSON",
            "invalid_request",
        );
    };
    let tokens = double_tokens(&request);
    json_response(
        StatusCode::OK,
        &json!({"tokens": tokens, "count": tokens.len(), "max_model_len": 4096}),
    )
}

/// The double's tokenizer: one token per character (its code point), of `prompt`, or of
/// `messages` rendered as `role: content\n` lines followed by `assistant: ` when
/// `add_generation_prompt` is true. Tests use it to know where a scored choice starts.
pub fn double_tokens(request: &Value) -> Vec<u32> {
    let text = match (request["prompt"].as_str(), request["messages"].as_array()) {
        (Some(prompt), _) => prompt.to_owned(),
        (None, Some(messages)) => {
            let mut text: String = messages
                .iter()
                .map(|m| {
                    format!(
                        "{}: {}\n",
                        m["role"].as_str().unwrap_or_default(),
                        m["content"].as_str().unwrap_or_default()
                    )
                })
                .collect();
            if request["add_generation_prompt"].as_bool().unwrap_or(false) {
                text.push_str("assistant: ");
            }
            text
        }
        (None, None) => String::new(),
    };
    text.chars().map(u32::from).collect()
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    json_body_response(status, Body::from(value.to_string()))
}

fn error_response(status: StatusCode, message: &str, kind: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "code": status.as_u16()}});
    json_response(status, &body)
}

fn bad_request(message: &str) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        message: message.to_owned(),
        kind: "BadRequestError",
    }
}

/// A refused request, answered in OpenAI's `{"error": {..}}` shape.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self.status, &self.message, self.kind)
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::time::Instant;

    use super::*;

    const MODEL: &str = "Qwen/Qwen3-0.6B";
    const SYSTEM: &str = "You are terse.";

    fn chat_body(user: &str) -> Value {
        json!({
            "model": MODEL,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": user},
            ],
            "max_tokens": 64,
        })
    }

    fn expected_reply(user: &str) -> String {
        let head: String = user.chars().take(40).collect();
        format!("Reply to: {head}\nFINAL RANKING: Proposal A > Proposal B\nANSWER: 42")
    }

    async fn post(double: &OpenAiDouble, path: &str, body: &Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}{path}", double.url()))
            .json(body)
            .send()
            .await
            .expect("the double answers")
    }

    async fn chat(double: &OpenAiDouble, body: &Value) -> reqwest::Response {
        post(double, "/v1/chat/completions", body).await
    }

    /// The `data:` payloads of an SSE body, in order.
    fn sse_data(text: &str) -> Vec<String> {
        text.split("\n\n")
            .filter(|event| !event.is_empty())
            .map(|event| {
                event
                    .strip_prefix("data: ")
                    .expect("every event is a data line")
                    .to_owned()
            })
            .collect()
    }

    /// Polls `condition` for up to 2 s (the double offers no event for a dropped connection).
    async fn eventually(condition: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if condition() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        condition()
    }

    async fn eventually_async<F: Future<Output = bool>>(condition: impl Fn() -> F) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if condition().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn lists_the_configured_models_and_refuses_others() {
        let double = OpenAiDouble::start(&[MODEL, "other"]).await;
        let url = format!("{}/v1/models", double.url());
        let listed: Value = reqwest::get(&url)
            .await
            .expect("models")
            .json()
            .await
            .expect("json");
        assert_eq!(listed["object"], "list");
        let ids: Vec<&str> = listed["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|model| model["id"].as_str().expect("id"))
            .collect();
        assert_eq!(ids, [MODEL, "other"]);
        assert_eq!(listed["data"][0]["object"], "model");

        double.set_models(&["renamed"]);
        let listed: Value = reqwest::get(&url)
            .await
            .expect("models")
            .json()
            .await
            .expect("json");
        assert_eq!(listed["data"][0]["id"], "renamed");
        assert_eq!(listed["data"].as_array().map(Vec::len), Some(1));

        let refused = chat(&double, &chat_body("hi")).await;
        assert_eq!(refused.status(), StatusCode::NOT_FOUND);
        assert_eq!(double.requests(), 1, "model listings are not counted");
    }

    #[tokio::test]
    async fn answers_a_chat_request_with_its_reply_usage_and_logprobs() {
        let double = OpenAiDouble::start(&[MODEL]).await;
        let user = "Write a function that adds two numbers, in Rust please.";
        let mut body = chat_body(user);
        body["logprobs"] = json!(true);
        body["top_logprobs"] = json!(1);
        let response = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", double.url()))
            .bearer_auth("secret")
            .json(&body)
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::OK);
        let answer: Value = response.json().await.expect("json");
        let reply = expected_reply(user);
        assert_eq!(answer["object"], "chat.completion");
        assert_eq!(answer["model"], MODEL);
        assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
        assert_eq!(answer["choices"][0]["message"]["content"], reply.as_str());
        assert_eq!(answer["choices"][0]["finish_reason"], "stop");

        let words = reply.split_whitespace().count();
        let prompt_tokens = (SYSTEM.chars().count() + user.chars().count()) / 4;
        let usage = &answer["usage"];
        assert_eq!(usage["prompt_tokens"], prompt_tokens);
        assert_eq!(usage["completion_tokens"], words);
        assert_eq!(usage["total_tokens"], prompt_tokens + words);
        assert_eq!(
            usage["prompt_tokens_details"]["cached_tokens"],
            prompt_tokens / 2
        );

        let logprobs = answer["choices"][0]["logprobs"]["content"]
            .as_array()
            .expect("logprobs.content");
        assert_eq!(logprobs.len(), words);
        assert_eq!(logprobs[3]["token"], "token_id:3");
        assert_eq!(logprobs[3]["logprob"], -0.5);
        assert_eq!(
            logprobs[3]["top_logprobs"],
            json!([{"token": "token_id:3", "logprob": -0.5}])
        );

        assert_eq!(double.bodies(), vec![body]);
        let headers = double.headers();
        assert!(headers[0].contains(&("authorization".to_owned(), "Bearer secret".to_owned())));

        let mut thinking = chat_body(user);
        thinking["chat_template_kwargs"] = json!({"enable_thinking": true});
        let answer: Value = chat(&double, &thinking).await.json().await.expect("json");
        let content = answer["choices"][0]["message"]["content"]
            .as_str()
            .expect("content");
        assert_eq!(content, format!("<think>pondering</think>{reply}"));

        double.set_reply(Some("scripted answer".to_owned()));
        let answer: Value = chat(&double, &thinking).await.json().await.expect("json");
        assert_eq!(
            answer["choices"][0]["message"]["content"],
            "scripted answer"
        );
        assert_eq!(answer["usage"]["completion_tokens"], 2);
        assert_eq!(double.in_flight(), 0);
    }

    #[tokio::test]
    async fn streams_the_same_reply_as_sse_ending_with_usage_and_done() {
        let double = OpenAiDouble::start(&[MODEL]).await;
        let user = "Summarise the proposals.";
        let whole: Value = chat(&double, &chat_body(user))
            .await
            .json()
            .await
            .expect("json");

        let mut body = chat_body(user);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let response = chat(&double, &body).await;
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response.headers()[header::CONTENT_TYPE]
            .to_str()
            .expect("ascii");
        assert_eq!(content_type, "text/event-stream");
        let data = sse_data(&response.text().await.expect("body"));

        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|payload| serde_json::from_str(payload).expect("a chunk is JSON"))
            .collect();
        let (usage_chunk, content_chunks) = chunks.split_last().expect("chunks");
        let reply = expected_reply(user);
        assert_eq!(content_chunks.len(), reply.split_whitespace().count());
        assert_eq!(content_chunks[0]["object"], "chat.completion.chunk");
        assert_eq!(
            content_chunks[0]["choices"][0]["delta"]["role"],
            "assistant"
        );
        assert!(
            content_chunks[1]["choices"][0]["delta"]
                .get("role")
                .is_none()
        );
        let text: String = content_chunks
            .iter()
            .map(|chunk| {
                chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .expect("content")
            })
            .collect();
        assert_eq!(text, reply);
        assert_eq!(
            text,
            whole["choices"][0]["message"]["content"]
                .as_str()
                .expect("content")
        );
        assert_eq!(
            content_chunks[0]["choices"][0]["delta"]["content"],
            "Reply "
        );
        let finishes: Vec<&Value> = content_chunks
            .iter()
            .map(|chunk| &chunk["choices"][0]["finish_reason"])
            .collect();
        assert!(
            finishes[..finishes.len() - 1]
                .iter()
                .all(|finish| finish.is_null())
        );
        assert_eq!(finishes.last().copied(), Some(&json!("stop")));
        assert_eq!(usage_chunk["choices"], json!([]));
        assert_eq!(usage_chunk["usage"], whole["usage"]);

        // Without `include_usage`, no usage chunk.
        body["stream_options"] = json!({"include_usage": false});
        let data = sse_data(&chat(&double, &body).await.text().await.expect("body"));
        assert_eq!(data.len(), reply.split_whitespace().count() + 1);
        assert!(eventually(|| double.in_flight() == 0).await);
    }

    #[tokio::test]
    async fn scores_a_token_prompt_with_prompt_logprobs() {
        let double = OpenAiDouble::start(&[MODEL]).await;
        let body = json!({
            "model": MODEL,
            "prompt": [11, 12, 13, 14],
            "max_tokens": 1,
            "echo": true,
            "prompt_logprobs": 1,
        });
        let answer: Value = post(&double, "/v1/completions", &body)
            .await
            .json()
            .await
            .expect("json");
        assert_eq!(answer["object"], "text_completion");
        let choice = &answer["choices"][0];
        let text = choice["text"].as_str().expect("text");
        assert!(
            text.starts_with("<11><12><13><14>Reply to: <11><12><13><14>\n"),
            "{text}"
        );
        let prompt_logprobs = choice["prompt_logprobs"]
            .as_array()
            .expect("prompt_logprobs");
        assert_eq!(prompt_logprobs.len(), 4);
        assert!(prompt_logprobs[0].is_null());
        assert_eq!(
            prompt_logprobs[1],
            json!({"12": {"logprob": -0.2, "rank": 1, "decoded_token": "<12>"}})
        );
        assert_eq!(prompt_logprobs[3]["14"]["logprob"], -0.4);
        assert_eq!(answer["usage"]["prompt_tokens"], 4);
        assert_eq!(answer["usage"]["prompt_tokens_details"]["cached_tokens"], 2);

        let streamed = json!({"model": MODEL, "prompt": "Once upon a time", "stream": true});
        let response = post(&double, "/v1/completions", &streamed).await;
        let data = sse_data(&response.text().await.expect("body"));
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let text: String = data[..data.len() - 1]
            .iter()
            .map(|payload| {
                let chunk: Value = serde_json::from_str(payload).expect("JSON");
                chunk["choices"][0]["text"]
                    .as_str()
                    .expect("text")
                    .to_owned()
            })
            .collect();
        assert_eq!(text, expected_reply("Once upon a time"));
    }

    #[tokio::test]
    async fn faults_are_taken_in_order_then_requests_behave() {
        let double = OpenAiDouble::start(&[MODEL]).await;
        double.push_faults([
            Fault::Status500,
            Fault::TooManyRequests {
                retry_after_secs: 7,
            },
            Fault::Unavailable503,
            Fault::BadRequest400,
        ]);
        let body = chat_body("hello");

        let first = chat(&double, &body).await;
        assert_eq!(first.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let error: Value = first.json().await.expect("json");
        assert_eq!(error["error"]["message"], "boom");
        assert_eq!(error["error"]["type"], "internal");

        let second = chat(&double, &body).await;
        assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(second.headers()[header::RETRY_AFTER], "7");

        let third = chat(&double, &body).await;
        assert_eq!(third.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(third.headers().get(header::RETRY_AFTER).is_none());

        let fourth = chat(&double, &body).await;
        assert_eq!(fourth.status(), StatusCode::BAD_REQUEST);
        let error: Value = fourth.json().await.expect("json");
        assert_eq!(error["error"]["message"], "max_tokens is too large: 99999");

        for _ in 0..2 {
            assert_eq!(chat(&double, &body).await.status(), StatusCode::OK);
        }
        assert_eq!(double.requests(), 6);
        assert_eq!(double.bodies().len(), 6);
    }

    #[tokio::test]
    async fn a_fault_set_always_overrides_the_queue_until_cleared() {
        let double = OpenAiDouble::start(&[MODEL]).await;
        double.push_faults([Fault::Status500]);
        double.set_fault_always(Some(Fault::WrongModel));
        for _ in 0..2 {
            let answer: Value = chat(&double, &chat_body("hi"))
                .await
                .json()
                .await
                .expect("json");
            assert_eq!(answer["model"], format!("{MODEL}-wrong"));
        }
        double.set_fault_always(None);
        let queued = chat(&double, &chat_body("hi")).await;
        assert_eq!(queued.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let answer: Value = chat(&double, &chat_body("hi"))
            .await
            .json()
            .await
            .expect("json");
        assert_eq!(answer["model"], MODEL);
    }

    #[tokio::test]
    async fn a_hung_request_blocks_no_other_and_leaves_when_dropped() {
        let double = OpenAiDouble::start(&[MODEL]).await;
        double.push_faults([Fault::Hang]);
        let client = reqwest::Client::new();
        let hung = tokio::spawn(
            client
                .post(format!("{}/v1/chat/completions", double.url()))
                .json(&chat_body("hang"))
                .timeout(Duration::from_millis(300))
                .send(),
        );
        // The hung request must take the fault before the well-behaved one arrives.
        assert!(eventually(|| double.in_flight() == 1).await);

        let answered = chat(&double, &chat_body("meanwhile")).await;
        assert_eq!(answered.status(), StatusCode::OK);
        assert_eq!(double.max_in_flight(), 2);

        let outcome = hung.await.expect("the hung request's task");
        assert!(
            outcome.is_err_and(|error| error.is_timeout()),
            "no answer within 300 ms"
        );
        assert!(
            eventually(|| double.in_flight() == 0).await,
            "hyper drops the hung handler once the client closes the connection"
        );
    }

    #[tokio::test]
    async fn a_stalled_stream_sends_its_chunks_then_nothing_and_leaves_when_dropped() {
        let double = OpenAiDouble::start(&[MODEL]).await;
        double.push_faults([Fault::StallMidStream { after_chunks: 2 }]);
        let mut body = chat_body("stall");
        body["stream"] = json!(true);
        let mut response = chat(&double, &body).await;
        assert_eq!(response.status(), StatusCode::OK);

        let mut received = String::new();
        while !(received.ends_with("\n\n") && sse_data(&received).len() >= 2) {
            match response.chunk().await {
                Ok(Some(bytes)) => received.push_str(&String::from_utf8_lossy(&bytes)),
                other => panic!("the stream ended before its chunks: {other:?}"),
            }
        }
        let next = tokio::time::timeout(Duration::from_millis(300), response.chunk()).await;
        assert!(next.is_err(), "nothing after the stall: {next:?}");
        let data = sse_data(&received);
        assert_eq!(data.len(), 2, "{received}");
        assert!(!data.contains(&"[DONE]".to_owned()));
        assert_eq!(double.in_flight(), 1, "a stalled stream is still in flight");
        drop(response);
        assert!(eventually(|| double.in_flight() == 0).await);

        // Not streamed: headers, then a body that never comes.
        double.push_faults([Fault::StallMidStream { after_chunks: 0 }]);
        let response = chat(&double, &chat_body("stall")).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = tokio::time::timeout(Duration::from_millis(300), response.bytes()).await;
        assert!(body.is_err(), "the body never completes");
        assert!(eventually(|| double.in_flight() == 0).await);
    }

    #[tokio::test]
    async fn malformed_json_comes_whole_or_as_one_bad_event() {
        let double = OpenAiDouble::start(&[MODEL]).await;
        double.push_faults([Fault::MalformedJson, Fault::MalformedJson]);
        let response = chat(&double, &chat_body("hi")).await;
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.text().await.expect("body");
        assert!(serde_json::from_str::<Value>(&text).is_err());

        let mut body = chat_body("hi");
        body["stream"] = json!(true);
        let data = sse_data(&chat(&double, &body).await.text().await.expect("body"));
        assert_eq!(data.len(), 3);
        assert!(serde_json::from_str::<Value>(&data[0]).is_ok());
        assert!(serde_json::from_str::<Value>(&data[1]).is_err());
        assert_eq!(data[2], "[DONE]");
    }

    #[tokio::test]
    async fn dropping_the_double_releases_hung_requests_and_stops_serving() {
        let double = OpenAiDouble::start(&[MODEL]).await;
        double.set_fault_always(Some(Fault::Hang));
        let url = format!("{}/v1/chat/completions", double.url());
        let hung = tokio::spawn(
            reqwest::Client::new()
                .post(&url)
                .json(&chat_body("x"))
                .send(),
        );
        assert!(eventually(|| double.in_flight() == 1).await);
        let shared = Arc::clone(&double.shared);
        drop(double);

        let released = hung.await.expect("task").expect("an answer after the drop");
        assert_eq!(released.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(eventually(|| shared.in_flight.load(Ordering::SeqCst) == 0).await);
        let refused = eventually_async(|| async {
            reqwest::Client::new()
                .post(&url)
                .json(&chat_body("x"))
                .send()
                .await
                .is_err()
        });
        assert!(refused.await, "the listener is closed");
    }
}
