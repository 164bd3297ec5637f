//! User task files: JSON Lines, one task per line, parsed strictly and validated as a whole
//! before anything runs (every bad line is reported with its number; nothing is half-loaded).
//!
//! ```json
//! {"id": "q1", "prompt": "What is 6 * 7?", "answer": "42", "answer_type": "integer"}
//! {"id": "pick", "prompt": "Best fit?", "answer": "B", "answer_type": "choice", "options": ["A", "B"]}
//! {"id": "design", "prompt": "Propose a retry policy.", "role": "DEV", "rubric": "safety; cost",
//!  "requirements": ["bounded retries"]}
//! ```
//! `answer_type` is `integer`, `number`, `text` or `choice` (with `options`); when only `answer`
//! is given the type is inferred (integer, else number, else text). A task without an answer
//! is free-form: it is judged by the council's own scores and margins.

use std::collections::HashSet;
use std::path::Path;

use council_councils::parse::{AnswerFormat, extract_answer};
use council_councils::{Role, Task, TaskId};
use serde::Deserialize;

use super::item::{EvalItem, Expected};

/// One line of a task file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskLine {
    id: String,
    prompt: String,
    #[serde(default)]
    answer: Option<String>,
    #[serde(default)]
    answer_type: Option<String>,
    #[serde(default)]
    options: Vec<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    rubric: String,
    #[serde(default)]
    requirements: Vec<String>,
}

/// A task file that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
pub enum TaskFileError {
    #[error("cannot read task file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("task file {path} has no tasks")]
    Empty { path: String },
    #[error("task file {path} is invalid:\n{}", .problems.join("\n"))]
    Invalid { path: String, problems: Vec<String> },
}

/// At most this many problems are listed.
const MAX_PROBLEMS: usize = 20;

/// Reads and validates a task file.
pub fn load(path: &Path) -> Result<Vec<EvalItem>, TaskFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TaskFileError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&text).map_err(|problems| {
        if problems.is_empty() {
            TaskFileError::Empty { path: shown }
        } else {
            TaskFileError::Invalid {
                path: shown,
                problems,
            }
        }
    })
}

/// Parses task lines; the error is the list of problems (empty: no tasks at all).
pub fn parse(text: &str) -> Result<Vec<EvalItem>, Vec<String>> {
    let mut items = Vec::new();
    let mut problems = Vec::new();
    let mut ids = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let checked = serde_json::from_str::<TaskLine>(line)
            .map_err(|e| e.to_string())
            .and_then(item);
        match checked {
            Ok(item) if !ids.insert(item.id.clone()) => {
                problems.push(format!("line {}: id: {:?} appears twice", n + 1, item.id));
            }
            Ok(item) => items.push(item),
            Err(reason) => problems.push(format!("line {}: {reason}", n + 1)),
        }
        if problems.len() >= MAX_PROBLEMS {
            problems.push("(further lines not checked)".to_owned());
            break;
        }
    }
    if problems.is_empty() && !items.is_empty() {
        Ok(items)
    } else {
        Err(problems)
    }
}

fn item(line: TaskLine) -> Result<EvalItem, String> {
    let id = TaskId::new(line.id.clone()).map_err(|e| format!("id: {e}"))?;
    if let Some(role) = &line.role {
        role.parse::<Role>().map_err(|e| format!("role: {e}"))?;
    }
    let format = answer_format(&line)?;
    let expected = match (&line.answer, &format) {
        (Some(answer), Some(format)) => Some(Expected::Exact {
            answer: canonical_answer(answer, format)?,
        }),
        _ => None,
    };
    // The council validates the same task again; checking here names the line.
    let mut task = Task::new(id, line.prompt.clone()).map_err(|e| e.to_string())?;
    task.rubric = line.rubric.clone();
    task.requirements = line.requirements.clone();
    task.validate().map_err(|e| e.to_string())?;
    Ok(EvalItem {
        id: line.id,
        suite: "tasks".to_owned(),
        prompt: line.prompt,
        answer_format: format,
        expected,
        role: line.role,
        rubric: line.rubric,
        requirements: line.requirements,
    })
}

fn answer_format(line: &TaskLine) -> Result<Option<AnswerFormat>, String> {
    let declared = match line.answer_type.as_deref() {
        None => None,
        Some("integer") => Some(AnswerFormat::Integer),
        Some("number") => Some(AnswerFormat::Number),
        Some("text") => Some(AnswerFormat::Text),
        Some("choice") if line.options.is_empty() => {
            return Err("options: a choice task needs options".to_owned());
        }
        Some("choice") => Some(AnswerFormat::Choice {
            options: line.options.clone(),
        }),
        Some(other) => {
            return Err(format!(
                "answer_type: {other:?} is not integer, number, text or choice"
            ));
        }
    };
    if !line.options.is_empty() && line.answer_type.as_deref() != Some("choice") {
        return Err("options: only a choice task has options".to_owned());
    }
    Ok(declared.or_else(|| line.answer.as_deref().map(inferred_format)))
}

/// The format an untyped answer reads as: integer, else number, else text.
fn inferred_format(answer: &str) -> AnswerFormat {
    let bare = answer.trim().replace(',', "");
    if bare.parse::<i64>().is_ok() {
        AnswerFormat::Integer
    } else if bare.parse::<f64>().is_ok_and(f64::is_finite) {
        AnswerFormat::Number
    } else {
        AnswerFormat::Text
    }
}

/// The expected answer as the extraction will produce it from a reply, so comparing is exact.
fn canonical_answer(answer: &str, format: &AnswerFormat) -> Result<String, String> {
    extract_answer(&format!("ANSWER: {answer}"), format)
        .ok_or_else(|| format!("answer: {answer:?} is not a valid {}", format_name(format)))
}

fn format_name(format: &AnswerFormat) -> &'static str {
    match format {
        AnswerFormat::Integer => "integer",
        AnswerFormat::Number => "number",
        AnswerFormat::Text => "text answer",
        AnswerFormat::Choice { .. } => "choice among the options",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_inferred_and_free_form_tasks_load() {
        let text = r#"
{"id": "q1", "prompt": "What is 6 * 7?", "answer": "42", "answer_type": "integer"}
{"id": "q2", "prompt": "Half of 7?", "answer": "3.50"}
{"id": "q3", "prompt": "Capital of France?", "answer": "Paris"}
{"id": "q4", "prompt": "Best?", "answer": "b", "answer_type": "choice", "options": ["A", "B"]}
{"id": "q5", "prompt": "Propose a retry policy.", "role": "DEV", "rubric": "safety; cost", "requirements": ["bounded"]}
{"id": "q6", "prompt": "Count the rs in strawberry.", "answer_type": "integer"}
"#;
        let items = parse(text).expect("valid file");
        assert_eq!(items.len(), 6);
        let expected: Vec<Option<String>> = items
            .iter()
            .map(|i| i.expected.as_ref().map(Expected::describe))
            .collect();
        assert_eq!(
            expected,
            vec![
                Some("42".to_owned()),
                Some("3.5".to_owned()),
                Some("paris".to_owned()),
                Some("B".to_owned()),
                None,
                None
            ]
        );
        assert_eq!(items[0].answer_format, Some(AnswerFormat::Integer));
        assert_eq!(items[1].answer_format, Some(AnswerFormat::Number));
        assert_eq!(items[2].answer_format, Some(AnswerFormat::Text));
        assert_eq!(items[4].answer_format, None);
        assert_eq!(items[4].role.as_deref(), Some("DEV"));
        assert_eq!(items[4].requirements, vec!["bounded".to_owned()]);
        assert_eq!(items[5].answer_format, Some(AnswerFormat::Integer));
        assert!(items.iter().all(|i| i.suite == "tasks"));
    }

    #[test]
    fn every_bad_line_is_named() {
        let text = [
            r#"{"id": "ok", "prompt": "fine"}"#,
            r#"{"id": "bad id!", "prompt": "x"}"#,
            r#"{"id": "a", "prompt": "   "}"#,
            r#"{"id": "b", "prompt": "x", "answer": "forty", "answer_type": "integer"}"#,
            r#"{"id": "c", "prompt": "x", "answer_type": "choice"}"#,
            r#"{"id": "d", "prompt": "x", "answer_type": "date"}"#,
            r#"{"id": "e", "prompt": "x", "role": "not a role"}"#,
            r#"{"id": "ok", "prompt": "again"}"#,
            r#"{"id": "f", "prompt": "x", "colour": "red"}"#,
            r#"not json"#,
            r#"{"id": "g", "prompt": "x", "answer": "C", "answer_type": "choice", "options": ["A", "B"]}"#,
        ]
        .join("\n");
        let problems = parse(&text).expect_err("invalid file");
        let expected_starts = [
            "line 2: id:",
            "line 3: description: empty",
            "line 4: answer: \"forty\" is not a valid integer",
            "line 5: options:",
            "line 6: answer_type:",
            "line 7: role:",
            "line 8: id: \"ok\" appears twice",
            "line 9: unknown field `colour`",
            "line 10: ",
            "line 11: answer: \"C\" is not a valid choice",
        ];
        assert_eq!(problems.len(), expected_starts.len(), "{problems:#?}");
        for (p, start) in problems.iter().zip(expected_starts) {
            assert!(p.starts_with(start), "{p:?} should start with {start:?}");
        }
    }

    #[test]
    fn an_empty_or_missing_file_is_an_error() {
        assert_eq!(parse("\n  \n").expect_err("no tasks"), Vec::<String>::new());
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.jsonl");
        std::fs::write(&empty, "\n").expect("write");
        assert!(matches!(load(&empty), Err(TaskFileError::Empty { .. })));
        let missing = dir.path().join("missing.jsonl");
        let err = load(&missing).expect_err("missing file");
        assert!(err.to_string().contains("missing.jsonl"), "{err}");
    }
}
