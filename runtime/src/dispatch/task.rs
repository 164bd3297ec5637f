//! The task message of `council.tasks.<role>`, schema `council.task.v1` (docs/DISPATCH.md):
//! parsed strictly (unknown fields are errors) and checked before anything runs, so that a bad
//! message is dead-lettered with a reason rather than retried.

use std::collections::BTreeMap;

use council_councils::TaskId;
use serde::Deserialize;

use crate::run::error::RunError;
use crate::run::{RequestParts, RunRequest};

/// The only schema version this build reads.
pub const TASK_SCHEMA: &str = "council.task.v1";

/// A task as published by an orchestrator.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskMessage {
    pub schema: String,
    pub task_id: String,
    /// The council (named by its role) that deliberates; may be omitted when the subject names
    /// it (`council.tasks.<role>`). `council` is accepted as a synonym.
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub council: Option<String>,
    pub description: String,
    #[serde(default)]
    pub constraints: Constraints,
    #[serde(default)]
    pub options: Options,
    /// Ids the orchestrator correlates by (`story_id`, `plan_id`, …), echoed in every event.
    #[serde(default)]
    pub correlation: BTreeMap<String, String>,
    /// Where the terminal event goes instead of the default completed / failed subject; it
    /// must be captured by the events stream.
    #[serde(default)]
    pub result_subject: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    #[serde(default)]
    pub rubric: String,
    #[serde(default)]
    pub requirements: Vec<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub timeout_seconds: i32,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// Critique-and-revise rounds (0..=10), 0 included; absent = the council's configured
    /// rounds (1 unless the council says otherwise).
    #[serde(default)]
    pub rounds: Option<i32>,
    /// Agents of the council that take part; absent or 0 = all.
    #[serde(default)]
    pub num_agents: i32,
}

/// Why a message cannot be a task (permanent: it is dead-lettered, never retried).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    #[error("oversized: {size} bytes exceed the limit of {limit}")]
    Oversized { size: usize, limit: usize },
    #[error("malformed JSON: {0}")]
    Malformed(String),
    #[error("schema-invalid: {0}")]
    Invalid(String),
}

impl TaskError {
    /// The DLQ reason class.
    pub fn class(&self) -> &'static str {
        match self {
            TaskError::Oversized { .. } => "oversized",
            TaskError::Malformed(_) => "malformed",
            TaskError::Invalid(_) => "schema_invalid",
        }
    }
}

/// A task that passed the schema checks, ready for the runner.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub message: TaskMessage,
    /// The council's role, from the body or the subject.
    pub role: String,
}

impl Task {
    pub fn id(&self) -> &str {
        &self.message.task_id
    }

    pub fn story_id(&self) -> Option<&str> {
        self.message.correlation.get("story_id").map(String::as_str)
    }

    /// The run request, checked by the rules (and with the field names) a gRPC caller's is.
    pub fn request(&self) -> Result<RunRequest, RunError> {
        let m = &self.message;
        RequestParts {
            task_id: m.task_id.clone(),
            description: m.description.clone(),
            role: self.role.clone(),
            rubric: m.constraints.rubric.clone(),
            requirements: m.constraints.requirements.clone(),
            metadata: m
                .constraints
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            num_agents: m.options.num_agents,
            rounds: m.options.rounds.map(|r| ("review_rounds", r)),
            timeout_seconds: m.constraints.timeout_seconds,
        }
        .check()
    }
}

/// What a dead-lettered message could still tell about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Salvaged {
    pub task_id: String,
    pub role: String,
    pub story_id: String,
    pub correlation: BTreeMap<String, String>,
}

/// The task id (and what else can be read) of a message that is not a valid task.
pub fn salvage(payload: &[u8]) -> Option<Salvaged> {
    /// Reads `task_id` alone, refusing a message that gives it twice (whose id is ambiguous).
    #[derive(Deserialize)]
    struct IdOnce {
        #[serde(rename = "task_id")]
        _task_id: serde_json::Value,
    }
    serde_json::from_slice::<IdOnce>(payload).ok()?;
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_owned);
    // Only an id that could name a task: anything else never reaches a header or a record.
    let task_id = text(value.get("task_id")).filter(|s| check_task_id(s).is_ok())?;
    let correlation: BTreeMap<String, String> = value
        .get("correlation")
        .and_then(|c| c.as_object())
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    Some(Salvaged {
        task_id,
        role: text(value.get("role"))
            .or_else(|| text(value.get("council")))
            .unwrap_or_default(),
        story_id: correlation.get("story_id").cloned().unwrap_or_default(),
        correlation,
    })
}

/// Whether `subject` can be published to: dot-separated non-empty tokens, no wildcard (`*`,
/// `>`), no whitespace or control characters, at most 256 bytes.
fn publish_subject(subject: &str) -> Result<(), &'static str> {
    if subject.is_empty() || subject.len() > 256 {
        return Err("must be 1..=256 bytes");
    }
    if subject.split('.').any(str::is_empty) {
        return Err("has an empty token");
    }
    if subject
        .chars()
        .any(|c| c == '*' || c == '>' || c.is_whitespace() || c.is_control())
    {
        return Err("is not a subject one can publish to (wildcards, whitespace)");
    }
    Ok(())
}

/// The one rule for task ids, of gRPC and NATS alike ([`TaskId`]): 1..=128 bytes of ASCII
/// letters, digits, `-`, `_`, `.`, `:`. Such an id is safe as a `Nats-Msg-Id` header, a KV key
/// and a file name. The reason quotes at most the id's first 40 characters.
pub fn check_task_id(id: &str) -> Result<(), String> {
    TaskId::new(id).map(|_| ()).map_err(|e| {
        let shown: String = id.chars().take(40).collect();
        let more = if shown.len() < id.len() { "…" } else { "" };
        format!(
            "task_id {shown:?}{more} ({} bytes) is invalid: {}",
            id.len(),
            e.reason
        )
    })
}

/// Parses and checks `payload` received on `subject`. `prefix` is the tasks subject prefix
/// (`council.tasks`); `captured` says whether a subject is captured by the events stream.
pub fn parse(
    payload: &[u8],
    subject: &str,
    prefix: &str,
    limit: usize,
    captured: impl Fn(&str) -> bool,
) -> Result<Task, TaskError> {
    if payload.len() > limit {
        return Err(TaskError::Oversized {
            size: payload.len(),
            limit,
        });
    }
    // Syntax first, so that "malformed" means not JSON at all.
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| TaskError::Malformed(e.to_string()))?;
    if !value.is_object() {
        return Err(TaskError::Invalid("a task is a JSON object".into()));
    }
    // Typed from the bytes, not from the parsed value: a key given twice (`task_id` "a" then
    // "b") is refused rather than silently read as its last value, which another reader of
    // the same message may take as its first.
    let message: TaskMessage =
        serde_json::from_slice(payload).map_err(|e| TaskError::Invalid(e.to_string()))?;
    let invalid = |s: String| Err(TaskError::Invalid(s));
    if message.schema != TASK_SCHEMA {
        return invalid(format!(
            "schema {:?} is not supported (this build reads {TASK_SCHEMA:?})",
            message.schema
        ));
    }
    if let Err(reason) = check_task_id(&message.task_id) {
        return invalid(reason);
    }
    let from_subject = subject
        .strip_prefix(prefix)
        .and_then(|s| s.strip_prefix('.'))
        .filter(|s| !s.is_empty() && !s.contains('.'));
    let role = match (&message.role, &message.council) {
        (Some(r), Some(c)) if r != c => {
            return invalid(format!("role {r:?} and council {c:?} disagree"));
        }
        (Some(r), _) | (None, Some(r)) => r.clone(),
        (None, None) => match from_subject {
            Some(s) => s.to_owned(),
            None => {
                return invalid(format!(
                    "no role: set \"role\" or publish on {prefix}.<role> (got {subject})"
                ));
            }
        },
    };
    if let Some(s) = from_subject
        && !s.eq_ignore_ascii_case(&role)
    {
        return invalid(format!(
            "role {role:?} differs from the subject's {s:?} ({subject})"
        ));
    }
    if let Some(rs) = &message.result_subject
        && let Err(reason) = publish_subject(rs)
    {
        return invalid(format!("result_subject {rs:?}: {reason}"));
    }
    if let Some(rs) = &message.result_subject
        && !captured(rs)
    {
        return invalid(format!(
            "result_subject {rs:?} is not captured by the events stream"
        ));
    }
    Ok(Task { message, role })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(json: &str, subject: &str) -> Result<Task, TaskError> {
        parse(json.as_bytes(), subject, "council.tasks", 4096, |s| {
            s.starts_with("orchestration.")
        })
    }

    const OK: &str = r#"{"schema":"council.task.v1","task_id":"T-1","description":"Add a cache",
        "constraints":{"rubric":"correctness","requirements":["tests"],"metadata":{"k":"v"},"timeout_seconds":30},
        "options":{"rounds":1,"num_agents":2},"correlation":{"story_id":"S-9"}}"#;

    #[test]
    fn a_full_task_becomes_the_run_request() {
        let t = p(OK, "council.tasks.DEV").expect("valid");
        assert_eq!(t.role, "DEV", "the role comes from the subject");
        assert_eq!(t.story_id(), Some("S-9"));
        let r = t.request().expect("checks");
        assert_eq!(
            (r.task_id(), r.role.as_str(), r.rounds, r.num_agents),
            ("T-1", "DEV", Some(1), Some(2))
        );
        // Rounds given (0 included) are exact; absent, the council's configured rounds.
        let zero = OK.replace("\"rounds\":1", "\"rounds\":0");
        let r = p(&zero, "council.tasks.DEV").expect("valid").request();
        assert_eq!(r.expect("checks").rounds, Some(0));
        let absent = OK.replace("\"rounds\":1,", "");
        let r = p(&absent, "council.tasks.DEV")
            .expect("valid")
            .request()
            .expect("checks");
        assert_eq!(r.rounds, None);
        assert_eq!(
            (r.task.rubric.as_str(), r.timeout, r.task.requirements.len()),
            ("correctness", Some(std::time::Duration::from_secs(30)), 1)
        );
        assert_eq!(r.task.metadata, vec![("k".to_owned(), "v".to_owned())]);
        // What the schema lets through but a run cannot take is the run core's error, with
        // the field a gRPC caller would see.
        let bad = OK.replace("\"rounds\":1", "\"rounds\":11");
        let e = p(&bad, "council.tasks.DEV")
            .expect("valid")
            .request()
            .expect_err("11 rounds");
        assert!(
            matches!(
                e,
                RunError::InvalidArgument {
                    field: "review_rounds",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn role_from_body_subject_or_council_and_they_must_agree() {
        let minimal = r#"{"schema":"council.task.v1","task_id":"a","description":"d","role":"QA"}"#;
        assert_eq!(p(minimal, "council.tasks.QA").expect("ok").role, "QA");
        let council =
            r#"{"schema":"council.task.v1","task_id":"a","description":"d","council":"QA"}"#;
        assert_eq!(p(council, "council.tasks.QA").expect("ok").role, "QA");
        for (json, subject, needle) in [
            (minimal, "council.tasks.DEV", "differs from the subject"),
            (
                r#"{"schema":"council.task.v1","task_id":"a","description":"d","role":"QA","council":"DEV"}"#,
                "council.tasks.QA",
                "disagree",
            ),
            (
                r#"{"schema":"council.task.v1","task_id":"a","description":"d"}"#,
                "council.tasks",
                "no role",
            ),
        ] {
            match p(json, subject) {
                Err(TaskError::Invalid(m)) => assert!(m.contains(needle), "{m}"),
                other => panic!("{json} on {subject}: {other:?}"),
            }
        }
    }

    #[test]
    fn every_bad_message_is_classified_with_a_reason() {
        let cases: [(&str, &str, &str); 9] = [
            ("{not json", "malformed", "key must be a string"),
            ("[1,2]", "schema_invalid", "JSON object"),
            (
                r#"{"schema":"council.task.v2","task_id":"a","description":"d","role":"DEV"}"#,
                "schema_invalid",
                "not supported",
            ),
            (
                r#"{"schema":"council.task.v1","description":"d","role":"DEV"}"#,
                "schema_invalid",
                "missing field `task_id`",
            ),
            (
                r#"{"schema":"council.task.v1","task_id":" ","description":"d","role":"DEV"}"#,
                "schema_invalid",
                "task_id \" \" (1 bytes) is invalid",
            ),
            (
                r#"{"schema":"council.task.v1","task_id":"","description":"d","role":"DEV"}"#,
                "schema_invalid",
                "is invalid: empty",
            ),
            (
                r#"{"schema":"council.task.v1","task_id":"T\r\nX-Evil: 1","description":"d","role":"DEV"}"#,
                "schema_invalid",
                "only ASCII letters",
            ),
            (
                r#"{"schema":"council.task.v1","task_id":"a","description":"d","role":"DEV","descripton":"typo"}"#,
                "schema_invalid",
                "unknown field `descripton`",
            ),
            (
                r#"{"schema":"council.task.v1","task_id":"a","description":"d","role":"DEV","result_subject":"elsewhere.x"}"#,
                "schema_invalid",
                "not captured",
            ),
        ];
        for (json, class, needle) in cases {
            let e = p(json, "council.tasks.DEV").expect_err(json);
            assert_eq!(e.class(), class, "{json}: {e}");
            assert!(e.to_string().contains(needle), "{json}: {e}");
        }
        // Keys given twice, and result subjects one cannot publish to.
        for (json, needle) in [
            (
                r#"{"schema":"council.task.v1","task_id":"a","task_id":"b","description":"d","role":"DEV"}"#,
                "duplicate field `task_id`",
            ),
            (
                r#"{"schema":"council.task.v1","task_id":"a","description":"d","role":"DEV","result_subject":"orchestration.>"}"#,
                "not a subject one can publish to",
            ),
            (
                r#"{"schema":"council.task.v1","task_id":"a","description":"d","role":"DEV","result_subject":"orchestration.*.done"}"#,
                "not a subject one can publish to",
            ),
            (
                r#"{"schema":"council.task.v1","task_id":"a","description":"d","role":"DEV","result_subject":"orchestration..x"}"#,
                "empty token",
            ),
            (
                r#"{"schema":"council.task.v1","task_id":"a","description":"d","role":"DEV","result_subject":"orchestration.a b"}"#,
                "not a subject one can publish to",
            ),
        ] {
            let e = p(json, "council.tasks.DEV").expect_err(json);
            assert_eq!(e.class(), "schema_invalid", "{json}: {e}");
            assert!(e.to_string().contains(needle), "{json}: {e}");
        }
        let ok = r#"{"schema":"council.task.v1","task_id":"a","description":"d","role":"DEV","result_subject":"orchestration.team-a.done"}"#;
        assert!(p(ok, "council.tasks.DEV").is_ok());
        let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(5000));
        let e = p(&big, "council.tasks.DEV").expect_err("too big");
        assert_eq!(e.class(), "oversized");
        assert!(e.to_string().contains("4096"), "{e}");
    }

    #[test]
    fn a_dead_letter_keeps_the_task_id_when_it_can_be_read() {
        let s = salvage(
            br#"{"task_id":"T-7","schema":"v9","role":"QA","correlation":{"story_id":"S","n":1}}"#,
        )
        .expect("readable");
        assert_eq!(
            (s.task_id.as_str(), s.role.as_str(), s.story_id.as_str()),
            ("T-7", "QA", "S")
        );
        assert_eq!(s.correlation.len(), 1, "non-string values are dropped");
        assert_eq!(salvage(b"{oops"), None);
        assert_eq!(salvage(br#"{"task_id":5}"#), None);
        assert_eq!(salvage(br#"{"task_id":"  "}"#), None);
        // An id no task may have is not salvaged: it never reaches a header or a record.
        assert_eq!(salvage(b"{\"task_id\":\"a\\r\\nb\"}"), None);
        assert_eq!(salvage(br#"{"task_id":"a b"}"#), None);
        // An id given twice is ambiguous: not salvaged.
        assert_eq!(salvage(br#"{"task_id":"a","task_id":"b"}"#), None);
        let long = format!("{{\"task_id\":\"{}\"}}", "x".repeat(129));
        assert_eq!(salvage(long.as_bytes()), None);
        let max = format!("{{\"task_id\":\"{}\"}}", "x".repeat(128));
        assert!(salvage(max.as_bytes()).is_some());
    }

    #[test]
    fn task_ids_follow_the_one_rule_and_reasons_stay_short() {
        for ok in ["T-1", "a", "story:42.task_7", &"x".repeat(128)] {
            assert_eq!(check_task_id(ok), Ok(()), "{ok}");
        }
        for bad in ["", " ", "a b", "T\r\n", "é", "x/y", &"x".repeat(129)] {
            assert!(check_task_id(bad).is_err(), "{bad:?}");
        }
        let huge = "\n".repeat(100_000);
        let reason = check_task_id(&huge).expect_err("bad");
        assert!(reason.len() < 200, "{reason}");
        assert!(reason.contains("100000 bytes"), "{reason}");
    }
}
