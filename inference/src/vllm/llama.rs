//! llama.cpp's `llama-server` native wire forms that choice scoring needs where vLLM's are
//! missing: `/apply-template` (chat messages → prompt text), `/tokenize` with `content`, and
//! `/completion` with `n_probs` (the top-N log-probs of one generated token, each with its id),
//! plus GBNF grammars for reply constraints. Pure functions over JSON.
//!
//! Why one generated token is exact: without `post_sampling_probs`, llama-server computes the
//! probabilities from a softmax of the raw logits over the whole vocabulary, before any sampler
//! (`logit_bias` included) runs, and reports the sampled token's own log-prob from that full
//! list whatever its rank.

use serde_json::{Value, json};

use super::ProtocolError;
use crate::request::{Prompt, Sampling, ScoreRequest};

/// Top log-probs asked per position when scoring. A small model's next-token distribution
/// after a judging prompt often ranks the answer tokens in the hundreds (SmolLM2-135M ranked
/// "1".."9" from 34th to 920th), and every token outside the list costs a forced request; a
/// thousand entries is a 60 kB answer and computes nothing more (llama-server sorts the full
/// vocabulary's softmax either way).
pub const TOP_LOGPROBS: usize = 1024;

/// A bias that makes one token the greedy choice whatever the logits (it changes what is
/// sampled, not the reported log-probs).
const FORCE_BIAS: f64 = 1.0e4;

/// `/apply-template` body for a scoring request's chat prompt, with the assistant turn opened.
pub fn apply_template_body(request: &ScoreRequest) -> Value {
    let messages: Vec<Value> = match &request.prompt {
        Prompt::Chat(messages) => messages
            .iter()
            .map(|m| json!({ "role": m.role.as_str(), "content": m.content }))
            .collect(),
        Prompt::Tokens(_) => Vec::new(),
    };
    json!({
        "messages": messages,
        "add_generation_prompt": true,
        "chat_template_kwargs": { "enable_thinking": request.enable_thinking },
    })
}

/// The rendered prompt of an `/apply-template` answer.
pub fn template_prompt(answer: &Value) -> Result<String, ProtocolError> {
    match answer["prompt"].as_str() {
        Some(prompt) if !prompt.is_empty() => Ok(prompt.to_owned()),
        _ => Err(ProtocolError(
            "the /apply-template answer has no `prompt` text".into(),
        )),
    }
}

/// `/tokenize` body for `text`. `special`: add the model's special tokens (BOS) and parse
/// special-token text, as llama-server does for a chat prompt; off for a choice, which is
/// plain text continuing the prompt.
pub fn tokenize_body(text: &str, special: bool) -> Value {
    json!({ "content": text, "add_special": special, "parse_special": special })
}

/// The token ids of a `/tokenize` answer: plain ids, or `{"id", "piece"}` objects.
pub fn tokens(answer: &Value) -> Result<Vec<u32>, ProtocolError> {
    answer["tokens"]
        .as_array()
        .ok_or_else(|| ProtocolError("the /tokenize answer has no `tokens` array".into()))?
        .iter()
        .map(|t| {
            t.as_u64()
                .or_else(|| t["id"].as_u64())
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(|| ProtocolError(format!("token {t} is not a token id")))
        })
        .collect()
}

/// `/completion` body that evaluates `prompt` and generates one greedy token, reporting the
/// top `n_probs` pre-sampling log-probs; `force` makes that token the sampled one.
pub fn next_token_body(prompt: &[u32], n_probs: usize, force: Option<u32>) -> Value {
    let mut body = json!({
        "prompt": prompt,
        "n_predict": 1,
        "n_probs": n_probs,
        "post_sampling_probs": false,
        "temperature": 0.0,
        "cache_prompt": true,
        "stream": false,
    });
    if let Some(id) = force {
        body["logit_bias"] = json!([[id, FORCE_BIAS]]);
    }
    body
}

/// The generated token of a `/completion` answer and the top log-probs at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct NextToken {
    pub id: u32,
    pub logprob: f64,
    /// (token id, log-prob), most likely first.
    pub top: Vec<(u32, f64)>,
}

impl NextToken {
    /// The log-prob of `id` at this position, if the answer holds it.
    pub fn logprob_of(&self, id: u32) -> Option<f64> {
        if self.id == id {
            return Some(self.logprob);
        }
        self.top.iter().find(|(t, _)| *t == id).map(|(_, lp)| *lp)
    }
}

/// Reads `completion_probabilities[0]` (`{id, logprob, top_logprobs: [{id, logprob}]}`).
/// Post-sampling probabilities (`prob`, `top_probs`) are refused: they are not the model's.
pub fn next_token(answer: &Value) -> Result<NextToken, ProtocolError> {
    let entry = answer["completion_probabilities"]
        .as_array()
        .and_then(|p| p.first())
        .ok_or_else(|| {
            ProtocolError(
                "the /completion answer has no `completion_probabilities` (does the server \
                 support n_probs?)"
                    .into(),
            )
        })?;
    if entry.get("top_probs").is_some() || entry.get("prob").is_some() {
        return Err(ProtocolError(
            "the server sent post-sampling probabilities, not log-probs".into(),
        ));
    }
    let id_of = |v: &Value| {
        v["id"]
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| ProtocolError(format!("log-prob entry {v:.80} has no token id")))
    };
    let logprob_of = |v: &Value| {
        v["logprob"]
            .as_f64()
            .ok_or_else(|| ProtocolError(format!("log-prob entry {v:.80} has no log-prob")))
    };
    let top = entry["top_logprobs"]
        .as_array()
        .map(|top| {
            top.iter()
                .map(|t| Ok((id_of(t)?, logprob_of(t)?)))
                .collect::<Result<Vec<_>, ProtocolError>>()
        })
        .transpose()?
        .unwrap_or_default();
    Ok(NextToken {
        id: id_of(entry)?,
        logprob: logprob_of(entry)?,
        top,
    })
}

/// Puts `sampling` in llama-server's terms on a chat or completions body: its sampler chain
/// applies `top_k` 40 and `min_p` 0.05 unless told otherwise, and it reads `repeat_penalty`
/// (an OpenAI-style `repetition_penalty` is silently ignored). `top_k` 0 turns top-k off there
/// as in [`Sampling`].
pub fn sampling_fields(body: &mut Value, sampling: &Sampling) {
    let Some(fields) = body.as_object_mut() else {
        return;
    };
    fields.insert("top_k".into(), json!(sampling.top_k));
    fields.insert("min_p".into(), json!(0.0));
    fields.remove("repetition_penalty");
    fields.insert("repeat_penalty".into(), json!(sampling.repetition_penalty));
}

/// A GBNF grammar whose only sentences are `options`.
pub fn choice_grammar(options: &[String]) -> String {
    let literals: Vec<String> = options.iter().map(|o| gbnf_literal(o)).collect();
    format!("root ::= {}", literals.join(" | "))
}

/// `text` as a GBNF string literal.
fn gbnf_literal(text: &str) -> String {
    let mut literal = String::with_capacity(text.len() + 2);
    literal.push('"');
    for c in text.chars() {
        match c {
            '"' => literal.push_str("\\\""),
            '\\' => literal.push_str("\\\\"),
            '\n' => literal.push_str("\\n"),
            '\r' => literal.push_str("\\r"),
            '\t' => literal.push_str("\\t"),
            c if c.is_control() => literal.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => literal.push(c),
        }
    }
    literal.push('"');
    literal
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::ChatMessage;

    #[test]
    fn tokenize_answers_parse_with_or_without_pieces() {
        assert_eq!(
            tokens(&json!({"tokens": [1, 22, 333]})).expect("ids"),
            vec![1, 22, 333]
        );
        let pieces = json!({"tokens": [{"id": 198, "piece": [195]}, {"id": 17, "piece": "x"}]});
        assert_eq!(tokens(&pieces).expect("pieces"), vec![198, 17]);
        assert!(tokens(&json!({"tokens": ["a"]})).is_err());
        assert!(tokens(&json!({"count": 1})).is_err());
        assert_eq!(
            tokenize_body("A", false),
            json!({"content": "A", "add_special": false, "parse_special": false})
        );
    }

    #[test]
    fn templates_are_asked_with_the_assistant_turn_opened() {
        let request = ScoreRequest::new(
            Prompt::Chat(vec![ChatMessage::system("s"), ChatMessage::user("u")]),
            vec!["A".into()],
        );
        let body = apply_template_body(&request);
        assert_eq!(body["messages"][1], json!({"role": "user", "content": "u"}));
        assert_eq!(body["add_generation_prompt"], true);
        assert_eq!(body["chat_template_kwargs"]["enable_thinking"], false);
        let rendered = json!({"prompt": "<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"});
        assert!(
            template_prompt(&rendered)
                .expect("prompt")
                .ends_with("assistant\n")
        );
        assert!(template_prompt(&json!({"prompt": ""})).is_err());
    }

    #[test]
    fn completion_probabilities_parse_and_look_up_tokens() {
        // As llama-server answers `/completion` with `n_probs: 2` (fields it adds trimmed).
        let answer = json!({
            "content": "A",
            "stop": true,
            "completion_probabilities": [{
                "id": 32, "token": "A", "bytes": [65], "logprob": -0.25,
                "top_logprobs": [
                    {"id": 32, "token": "A", "bytes": [65], "logprob": -0.25},
                    {"id": 33, "token": "B", "bytes": [66], "logprob": -1.75}
                ]
            }]
        });
        let next = next_token(&answer).expect("probabilities");
        assert_eq!((next.id, next.logprob), (32, -0.25));
        assert_eq!(next.logprob_of(33), Some(-1.75));
        assert_eq!(next.logprob_of(34), None);
        let post = json!({"completion_probabilities": [{"id": 1, "prob": 0.5, "top_probs": []}]});
        assert!(
            next_token(&post)
                .expect_err("post-sampling")
                .0
                .contains("post-sampling")
        );
        assert!(next_token(&json!({"content": "A"})).is_err());
        let body = next_token_body(&[5, 6], 20, Some(33));
        assert_eq!(body["prompt"], json!([5, 6]));
        assert_eq!(
            (body["n_predict"].as_u64(), body["n_probs"].as_u64()),
            (Some(1), Some(20))
        );
        assert_eq!(body["logit_bias"][0][0], 33);
        assert!(next_token_body(&[5], 1, None).get("logit_bias").is_none());
    }

    #[test]
    fn sampling_is_put_in_llama_servers_terms() {
        let mut body = json!({"temperature": 0.7, "repetition_penalty": 1.1});
        let sampling = Sampling {
            repetition_penalty: 1.1,
            ..Sampling::with_temperature(0.7, 3)
        };
        sampling_fields(&mut body, &sampling);
        assert_eq!(body["top_k"], 0);
        assert_eq!(body["min_p"], 0.0);
        assert!(body.get("repetition_penalty").is_none());
        assert!((body["repeat_penalty"].as_f64().expect("set") - 1.1).abs() < 1e-6);
    }

    #[test]
    fn choices_become_gbnf_alternations_of_escaped_literals() {
        assert_eq!(
            choice_grammar(&["accept".into(), "reject".into()]),
            r#"root ::= "accept" | "reject""#
        );
        assert_eq!(
            choice_grammar(&["say \"hi\"\\\n".into()]),
            r#"root ::= "say \"hi\"\\\n""#
        );
    }
}
