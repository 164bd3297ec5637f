//! What an evaluation runs on: items with a prompt, a declared answer format and, where known,
//! how to tell a correct answer.

use council_councils::parse::AnswerFormat;
use serde::{Deserialize, Serialize};

/// One evaluation item (a generated suite item or a line of a user's task file).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalItem {
    /// Unique within a run; a valid `TaskId` (ASCII letters, digits, `-_.:`), used in file names.
    pub id: String,
    /// The suite it came from ("arithmetic", …) or "tasks" for a user file.
    pub suite: String,
    /// The task text shown to every agent.
    pub prompt: String,
    /// The final-answer form every proposal must end with; `None` for free-form tasks.
    pub answer_format: Option<AnswerFormat>,
    /// How to tell a correct answer; `None` when the item has no known answer (free-form).
    pub expected: Option<Expected>,
    /// Council role for this item; `None` takes the run's `--role`.
    pub role: Option<String>,
    pub rubric: String,
    pub requirements: Vec<String>,
}

/// How a final answer is judged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Expected {
    /// The canonical answer, in the form `council_councils::parse::extract_answer` returns for
    /// the item's answer format (e.g. "42", "3.5", "ebl").
    Exact { answer: String },
    /// Game of 24: any arithmetic expression using each of these four numbers exactly once
    /// (with + - * / and parentheses) whose value is exactly 24.
    Game24 { numbers: [u32; 4] },
}

impl Expected {
    /// Whether an extracted answer is correct.
    pub fn is_correct(&self, answer: &str) -> bool {
        match self {
            Expected::Exact { answer: expected } => answer == expected,
            Expected::Game24 { numbers } => super::game24::verify(numbers, answer).is_ok(),
        }
    }

    /// A short description for reports ("42", "24 from 4 7 8 8").
    pub fn describe(&self) -> String {
        match self {
            Expected::Exact { answer } => answer.clone(),
            Expected::Game24 { numbers } => format!(
                "24 from {} {} {} {}",
                numbers[0], numbers[1], numbers[2], numbers[3]
            ),
        }
    }
}
