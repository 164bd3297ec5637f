//! The OpenAI-compatible wire format as vLLM speaks it: request bodies built from a
//! [`GenerateRequest`], streamed chunks (Server-Sent Events) folded into a reply, error bodies.
//! Pure functions over JSON and bytes.

use serde_json::{Value, json};

use super::ProtocolError;
use super::caps::{LogprobTokens, StructuredForm};
use crate::constraint::Constraint;
use crate::request::{GenerateRequest, Prompt, ScoreRequest, TokenLogprob, TopLogprob};

/// Which endpoint a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/v1/chat/completions` (chat prompts).
    Chat,
    /// `/v1/completions` (token prompts).
    Completions,
}

impl Route {
    pub fn path(self) -> &'static str {
        match self {
            Route::Chat => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
        }
    }
}

/// The streamed request body for `request` on `model`, its constraint in the server's
/// `structured` form (or left out where that form has none: see [`constraint_field`]).
pub fn body(model: &str, request: &GenerateRequest, structured: StructuredForm) -> (Route, Value) {
    let s = request.sampling;
    let mut body = json!({
        "model": model,
        "max_tokens": request.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "seed": s.seed,
        "n": 1,
        "stream": true,
        "stream_options": { "include_usage": true },
        // Token ids, not strings, in log-probs (a vLLM extension) so results carry ids.
        "return_tokens_as_token_ids": true,
    });
    let fields = body.as_object_mut();
    let Some(fields) = fields else {
        return (Route::Chat, body);
    };
    if s.top_k > 0 {
        fields.insert("top_k".into(), json!(s.top_k));
    }
    if s.repetition_penalty != 1.0 {
        fields.insert("repetition_penalty".into(), json!(s.repetition_penalty));
    }
    if !request.stop.is_empty() {
        fields.insert("stop".into(), json!(request.stop));
    }
    if !request.stop_token_ids.is_empty() {
        fields.insert("stop_token_ids".into(), json!(request.stop_token_ids));
    }
    if let Some((key, spec)) = request
        .constraint
        .as_ref()
        .and_then(|c| constraint_field(c, structured))
    {
        fields.insert(key.into(), spec);
    }
    let route = match &request.prompt {
        Prompt::Chat(messages) => {
            let messages: Vec<Value> = messages
                .iter()
                .map(|m| json!({ "role": m.role.as_str(), "content": m.content }))
                .collect();
            fields.insert("messages".into(), json!(messages));
            // Qwen3 thinks unless told not to; other templates ignore the flag.
            fields.insert(
                "chat_template_kwargs".into(),
                json!({ "enable_thinking": request.enable_thinking }),
            );
            if let Some(n) = request.top_logprobs {
                fields.insert("logprobs".into(), json!(true));
                fields.insert("top_logprobs".into(), json!(n));
            }
            Route::Chat
        }
        Prompt::Tokens(ids) => {
            fields.insert("prompt".into(), json!(ids));
            if let Some(n) = request.top_logprobs {
                fields.insert("logprobs".into(), json!(n));
            }
            Route::Completions
        }
    };
    (route, body)
}

/// The request field that carries `constraint` in the server's form: vLLM's
/// `structured_outputs` (its current key; the older `guided_*` keys are silently ignored by it
/// now), or llama-server's `grammar` / `json_schema`. `None` where the form has no way to say
/// it: the constraint is then not sent (never a field the server would silently ignore), and
/// the reply is still checked.
pub fn constraint_field(
    constraint: &Constraint,
    structured: StructuredForm,
) -> Option<(&'static str, Value)> {
    match (structured, constraint) {
        (StructuredForm::StructuredOutputs, Constraint::Choice(options)) => {
            Some(("structured_outputs", json!({ "choice": options })))
        }
        (StructuredForm::StructuredOutputs, Constraint::JsonSchema(schema)) => {
            Some(("structured_outputs", json!({ "json": schema })))
        }
        (StructuredForm::StructuredOutputs, Constraint::Regex(pattern)) => {
            Some(("structured_outputs", json!({ "regex": pattern })))
        }
        (StructuredForm::Grammar, Constraint::Choice(options)) => {
            Some(("grammar", json!(super::llama::choice_grammar(options))))
        }
        (StructuredForm::Grammar, Constraint::JsonSchema(schema)) => {
            Some(("json_schema", schema.clone()))
        }
        (StructuredForm::Grammar, Constraint::Regex(_)) | (StructuredForm::Ignored, _) => None,
    }
}

/// What the stream said so far.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Reply {
    pub text: String,
    pub finish_reason: Option<String>,
    /// The matched stop string or token (vLLM's `stop_reason`); `None` for end of sequence.
    pub stop_reason: Option<Value>,
    pub usage: Option<WireUsage>,
    pub logprobs: Vec<TokenLogprob>,
    pub chunks: usize,
    pub done: bool,
}

/// Token counts as the server reported them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WireUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

/// Splits Server-Sent Events out of `buffer`, leaving an incomplete event in it, and folds the
/// `data:` payloads into `reply`.
pub fn feed(buffer: &mut String, reply: &mut Reply) -> Result<(), ProtocolError> {
    while let Some(end) = buffer.find("\n\n") {
        let event: String = buffer.drain(..end + 2).collect();
        for line in event.lines() {
            let Some(data) = line.strip_prefix("data:") else {
                continue; // comments, event names and ids carry nothing we use
            };
            let data = data.trim();
            if data == "[DONE]" {
                reply.done = true;
                continue;
            }
            let chunk: Value = serde_json::from_str(data).map_err(|e| {
                ProtocolError(format!("a stream chunk is not JSON ({e}): {:.120}", data))
            })?;
            apply_chunk(&chunk, reply)?;
        }
    }
    Ok(())
}

fn apply_chunk(chunk: &Value, reply: &mut Reply) -> Result<(), ProtocolError> {
    if let Some(error) = chunk.get("error") {
        return Err(ProtocolError(format!(
            "the server reported an error mid-stream: {}",
            error_message(error)
        )));
    }
    reply.chunks += 1;
    if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
        reply.usage = Some(parse_usage(usage)?);
    }
    let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) else {
        return Ok(());
    };
    let piece = choice["delta"]["content"]
        .as_str()
        .or_else(|| choice["text"].as_str());
    if let Some(piece) = piece {
        reply.text.push_str(piece);
    }
    if let Some(reason) = choice["finish_reason"].as_str() {
        reply.finish_reason = Some(reason.to_owned());
        reply.stop_reason = choice.get("stop_reason").filter(|v| !v.is_null()).cloned();
    }
    reply.logprobs.extend(parse_logprobs(&choice["logprobs"])?);
    Ok(())
}

fn parse_usage(usage: &Value) -> Result<WireUsage, ProtocolError> {
    let count = |v: &Value| v.as_u64().map(|n| n as usize);
    Ok(WireUsage {
        prompt_tokens: count(&usage["prompt_tokens"])
            .ok_or_else(|| ProtocolError("usage without prompt_tokens".into()))?,
        completion_tokens: count(&usage["completion_tokens"])
            .ok_or_else(|| ProtocolError("usage without completion_tokens".into()))?,
        cached_tokens: count(&usage["prompt_tokens_details"]["cached_tokens"]).unwrap_or(0),
    })
}

/// Log-probs of a chat chunk (`content: [{token, logprob, top_logprobs}]`) or a completions
/// chunk (`tokens`, `token_logprobs`, `top_logprobs`), with ids from `token_id:N` tokens.
fn parse_logprobs(logprobs: &Value) -> Result<Vec<TokenLogprob>, ProtocolError> {
    if logprobs.is_null() {
        return Ok(Vec::new());
    }
    if let Some(content) = logprobs["content"].as_array() {
        return content.iter().map(chat_logprob).collect();
    }
    let (Some(tokens), Some(values)) = (
        logprobs["tokens"].as_array(),
        logprobs["token_logprobs"].as_array(),
    ) else {
        return Ok(Vec::new());
    };
    tokens
        .iter()
        .zip(values)
        .enumerate()
        .map(|(i, (token, value))| {
            let top = logprobs["top_logprobs"][i]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(t, lp)| top_logprob(t, lp))
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?
                .unwrap_or_default();
            Ok(TokenLogprob {
                token_id: token_id(token.as_str().unwrap_or_default())?,
                logprob: number(value)?,
                top,
            })
        })
        .collect()
}

fn chat_logprob(entry: &Value) -> Result<TokenLogprob, ProtocolError> {
    let top = entry["top_logprobs"]
        .as_array()
        .map(|alts| {
            alts.iter()
                .map(|a| {
                    Ok(TopLogprob {
                        token_id: entry_id(a)?,
                        logprob: number(&a["logprob"])?,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    Ok(TokenLogprob {
        token_id: entry_id(entry)?,
        logprob: number(&entry["logprob"])?,
        top,
    })
}

/// The token id of a chat log-prob entry: its `token_id:N` token (vLLM), else its numeric
/// `id` (llama-server names the token by text and adds the id).
fn entry_id(entry: &Value) -> Result<u32, ProtocolError> {
    let token = entry["token"].as_str().unwrap_or_default();
    if token.starts_with("token_id:") {
        return token_id(token);
    }
    match entry["id"].as_u64().and_then(|id| u32::try_from(id).ok()) {
        Some(id) => Ok(id),
        None => token_id(token),
    }
}

/// How the first log-prob entry of a non-streamed chat answer names its token.
pub fn logprob_tokens(answer: &Value) -> LogprobTokens {
    let entry = &answer["choices"][0]["logprobs"]["content"][0];
    match entry["token"].as_str() {
        _ if entry.is_null() => LogprobTokens::Absent,
        Some(token) if token.starts_with("token_id:") => LogprobTokens::TokenIds,
        _ if entry["id"].is_u64() => LogprobTokens::IdField,
        Some(_) => LogprobTokens::Text,
        None => LogprobTokens::Absent,
    }
}

/// The reply text of a non-streamed chat answer.
pub fn chat_text(answer: &Value) -> Option<&str> {
    answer["choices"][0]["message"]["content"].as_str()
}

fn top_logprob(token: &str, logprob: &Value) -> Result<TopLogprob, ProtocolError> {
    Ok(TopLogprob {
        token_id: token_id(token)?,
        logprob: number(logprob)?,
    })
}

fn token_id(token: &str) -> Result<u32, ProtocolError> {
    token
        .strip_prefix("token_id:")
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| {
            ProtocolError(format!(
                "log-prob token {token:?} is not `token_id:N` (is return_tokens_as_token_ids supported?)"
            ))
        })
}

fn number(value: &Value) -> Result<f32, ProtocolError> {
    value
        .as_f64()
        .map(|v| v as f32)
        .ok_or_else(|| ProtocolError(format!("log-prob {value} is not a number")))
}

/// The message of an OpenAI-style error body (`{"error": {"message": …}}`, `{"message": …}`,
/// `{"detail": …}`), or the body itself, shortened.
pub fn error_message(body: &Value) -> String {
    let message = body["error"]["message"]
        .as_str()
        .or_else(|| body["message"].as_str())
        .or_else(|| body["detail"].as_str())
        .or_else(|| body.as_str());
    match message {
        Some(m) => m.chars().take(500).collect(),
        None => body.to_string().chars().take(500).collect(),
    }
}

/// The model ids of a `/v1/models` body and, when the server says, the first one's context
/// window (vLLM's `max_model_len`).
pub fn models(body: &Value) -> Result<Vec<(String, Option<usize>)>, ProtocolError> {
    let data = body["data"]
        .as_array()
        .ok_or_else(|| ProtocolError("the model list has no `data` array".into()))?;
    Ok(data
        .iter()
        .filter_map(|m| {
            let id = m["id"].as_str()?.to_owned();
            Some((id, m["max_model_len"].as_u64().map(|n| n as usize)))
        })
        .collect())
}

/// `/tokenize` body for a scoring request's chat prompt, with the assistant turn opened.
pub fn tokenize_prompt(model: &str, request: &ScoreRequest) -> Value {
    let messages: Vec<Value> = match &request.prompt {
        Prompt::Chat(messages) => messages
            .iter()
            .map(|m| json!({ "role": m.role.as_str(), "content": m.content }))
            .collect(),
        Prompt::Tokens(_) => Vec::new(),
    };
    json!({
        "model": model,
        "messages": messages,
        "add_generation_prompt": true,
        "chat_template_kwargs": { "enable_thinking": request.enable_thinking },
    })
}

/// `/tokenize` body for a continuation's text (no special tokens added).
pub fn tokenize_text(model: &str, text: &str) -> Value {
    json!({ "model": model, "prompt": text, "add_special_tokens": false })
}

/// The token ids of a `/tokenize` answer.
pub fn tokens(answer: &Value) -> Result<Vec<u32>, ProtocolError> {
    answer["tokens"]
        .as_array()
        .ok_or_else(|| ProtocolError("the /tokenize answer has no `tokens` array".into()))?
        .iter()
        .map(|t| {
            t.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(|| ProtocolError(format!("token {t} is not a token id")))
        })
        .collect()
}

/// `/v1/completions` body that returns the log-prob of every prompt token and generates one.
pub fn prompt_logprobs_body(model: &str, sequence: &[u32]) -> Value {
    json!({
        "model": model,
        "prompt": sequence,
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": 0,
        "stream": false,
    })
}

/// The log-prob of each token of `sequence` after the first, from a completions answer's
/// `prompt_logprobs` (`[null, {"<id>": {"logprob": …}}, …]`); index i is token i's (0 for the
/// first, which has none).
pub fn prompt_logprobs(answer: &Value, sequence: &[u32]) -> Result<Vec<f64>, ProtocolError> {
    let entries = answer["choices"][0]["prompt_logprobs"]
        .as_array()
        .or_else(|| answer["prompt_logprobs"].as_array())
        .ok_or_else(|| {
            ProtocolError(
                "the answer has no prompt_logprobs (does the server support them?)".into(),
            )
        })?;
    if entries.len() != sequence.len() {
        return Err(ProtocolError(format!(
            "{} prompt log-probs for {} prompt tokens",
            entries.len(),
            sequence.len()
        )));
    }
    entries
        .iter()
        .zip(sequence)
        .enumerate()
        .map(|(i, (entry, id))| {
            if i == 0 {
                return Ok(0.0);
            }
            entry[id.to_string()]["logprob"].as_f64().ok_or_else(|| {
                ProtocolError(format!("no log-prob for prompt token {id} at position {i}"))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{ChatMessage, Sampling};

    #[test]
    fn chat_bodies_carry_sampling_stops_thinking_and_logprobs() {
        let mut request =
            GenerateRequest::chat(vec![ChatMessage::system("s"), ChatMessage::user("u")], 64)
                .with_sampling(Sampling {
                    temperature: 0.7,
                    top_k: 20,
                    top_p: 0.9,
                    repetition_penalty: 1.1,
                    seed: 9,
                });
        request.stop = vec!["END".into()];
        request.top_logprobs = Some(3);
        let (route, body) = body("m", &request, StructuredForm::StructuredOutputs);
        assert_eq!(route, Route::Chat);
        assert_eq!(body["model"], "m");
        assert_eq!(body["max_tokens"], 64);
        assert_eq!(body["seed"], 9);
        assert_eq!(body["top_k"], 20);
        assert_eq!(body["stop"], json!(["END"]));
        assert_eq!(body["messages"][1], json!({"role": "user", "content": "u"}));
        assert_eq!(body["chat_template_kwargs"]["enable_thinking"], false);
        assert_eq!(body["logprobs"], true);
        assert_eq!(body["top_logprobs"], 3);
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        let (route, body) = super::body(
            "m",
            &GenerateRequest::tokens(vec![1, 2], 4),
            StructuredForm::StructuredOutputs,
        );
        assert_eq!(route, Route::Completions);
        assert_eq!(body["prompt"], json!([1, 2]));
        assert!(body.get("messages").is_none() && body.get("top_k").is_none());
    }

    #[test]
    fn streams_fold_into_a_reply_across_split_events() {
        let events = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"}}]}\n\n",
            ": keep-alive\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\",\"stop_reason\":null}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n",
            "data: [DONE]\n\n"
        );
        let mut reply = Reply::default();
        let mut buffer = String::new();
        // Bytes arrive in arbitrary pieces.
        for piece in events.as_bytes().chunks(7) {
            buffer.push_str(std::str::from_utf8(piece).expect("ascii"));
            feed(&mut buffer, &mut reply).expect("valid stream");
        }
        assert_eq!(reply.text, "Hello");
        assert_eq!(reply.finish_reason.as_deref(), Some("stop"));
        assert_eq!(reply.stop_reason, None);
        assert!(reply.done);
        assert_eq!(
            reply.usage,
            Some(WireUsage {
                prompt_tokens: 7,
                completion_tokens: 2,
                cached_tokens: 4
            })
        );
    }

    #[test]
    fn bad_chunks_are_protocol_errors() {
        let mut reply = Reply::default();
        let mut buffer = "data: {not json\n\n".to_owned();
        assert!(feed(&mut buffer, &mut reply).is_err());
        let mut buffer = "data: {\"error\":{\"message\":\"oom\"}}\n\n".to_owned();
        let err = feed(&mut buffer, &mut Reply::default()).expect_err("error chunk");
        assert!(err.0.contains("oom"));
        let mut buffer =
            "data: {\"choices\":[],\"usage\":{\"completion_tokens\":1}}\n\n".to_owned();
        assert!(feed(&mut buffer, &mut Reply::default()).is_err());
    }

    #[test]
    fn logprobs_of_both_routes_parse_with_token_ids() {
        let chat = json!({"content": [{"token": "token_id:5", "logprob": -0.25,
            "top_logprobs": [{"token": "token_id:5", "logprob": -0.25}, {"token": "token_id:6", "logprob": -2.0}]}]});
        let parsed = parse_logprobs(&chat).expect("chat logprobs");
        assert_eq!(parsed[0].token_id, 5);
        assert_eq!(parsed[0].top[1].token_id, 6);
        let completion = json!({"tokens": ["token_id:7"], "token_logprobs": [-1.0],
            "top_logprobs": [{"token_id:7": -1.0}]});
        let parsed = parse_logprobs(&completion).expect("completion logprobs");
        assert_eq!((parsed[0].token_id, parsed[0].logprob), (7, -1.0));
        let strings = json!({"content": [{"token": "hello", "logprob": -1.0}]});
        assert!(parse_logprobs(&strings).is_err());
    }

    #[test]
    fn llama_server_logprobs_are_read_by_their_numeric_ids() {
        // llama-server names tokens by text and adds `id` (and `bytes`) to every entry.
        let llama = json!({"content": [{"id": 9906, "token": "Hello", "bytes": [72], "logprob": -0.5,
            "top_logprobs": [{"id": 9906, "token": "Hello", "bytes": [72], "logprob": -0.5},
                             {"id": 13347, "token": "Hi", "bytes": [72, 105], "logprob": -1.25}]}]});
        let parsed = parse_logprobs(&llama).expect("llama logprobs");
        assert_eq!((parsed[0].token_id, parsed[0].logprob), (9906, -0.5));
        assert_eq!(parsed[0].top[1].token_id, 13347);
        let answer = |entry: Value| json!({"choices": [{"logprobs": {"content": [entry]}}]});
        assert_eq!(
            logprob_tokens(&answer(json!({"token": "token_id:5", "logprob": -1.0}))),
            LogprobTokens::TokenIds
        );
        assert_eq!(
            logprob_tokens(&answer(json!({"id": 5, "token": "a", "logprob": -1.0}))),
            LogprobTokens::IdField
        );
        assert_eq!(
            logprob_tokens(&answer(json!({"token": "a", "logprob": -1.0}))),
            LogprobTokens::Text
        );
        assert_eq!(
            logprob_tokens(&json!({"choices": [{"message": {"content": "a"}}]})),
            LogprobTokens::Absent
        );
    }

    #[test]
    fn constraints_take_the_servers_form_or_are_left_out() {
        let choice = Constraint::Choice(vec!["accept".into(), "reject".into()]);
        let schema = Constraint::JsonSchema(json!({"type": "object"}));
        let regex = Constraint::Regex("[0-9]+".into());
        let vllm = StructuredForm::StructuredOutputs;
        assert_eq!(
            constraint_field(&choice, vllm),
            Some((
                "structured_outputs",
                json!({"choice": ["accept", "reject"]})
            ))
        );
        assert_eq!(
            constraint_field(&regex, vllm),
            Some(("structured_outputs", json!({"regex": "[0-9]+"})))
        );
        let llama = StructuredForm::Grammar;
        assert_eq!(
            constraint_field(&choice, llama),
            Some(("grammar", json!(r#"root ::= "accept" | "reject""#)))
        );
        assert_eq!(
            constraint_field(&schema, llama),
            Some(("json_schema", json!({"type": "object"})))
        );
        assert_eq!(constraint_field(&regex, llama), None);
        assert_eq!(constraint_field(&choice, StructuredForm::Ignored), None);
        let mut request = GenerateRequest::chat(vec![ChatMessage::user("u")], 4);
        request.constraint = Some(choice);
        let (_, sent) = body("m", &request, StructuredForm::Ignored);
        assert!(sent.get("structured_outputs").is_none() && sent.get("grammar").is_none());
    }

    #[test]
    fn error_bodies_and_model_lists_are_read() {
        assert_eq!(
            error_message(&json!({"error": {"message": "max_tokens is too large"}})),
            "max_tokens is too large"
        );
        assert_eq!(error_message(&json!({"detail": "Not Found"})), "Not Found");
        let list = json!({"data": [{"id": "a", "max_model_len": 4096}, {"id": "b"}]});
        assert_eq!(
            models(&list).expect("list"),
            vec![("a".to_owned(), Some(4096)), ("b".to_owned(), None)]
        );
        assert!(models(&json!({"object": "list"})).is_err());
    }
}
