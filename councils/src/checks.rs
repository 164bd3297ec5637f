//! Checks run on final proposals in code. A check that cannot judge a proposal says so
//! (`Skipped`); a skipped check never counts as passed.

use crate::parse::extract_answer;
use crate::spec::Task;

/// What a check concluded about one proposal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckStatus {
    Passed,
    Failed { reason: String },
    Skipped { reason: String },
}

/// A check's verdict with its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub name: String,
    pub status: CheckStatus,
}

/// A pluggable check over a final proposal.
pub trait Check: std::fmt::Debug + Send + Sync {
    fn name(&self) -> &str;
    fn run(&self, task: &Task, proposal: &str) -> CheckStatus;
}

/// Passes when the proposal ends with a final answer in the task's declared format.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnswerFormatCheck;

impl Check for AnswerFormatCheck {
    fn name(&self) -> &str {
        "answer_format"
    }

    fn run(&self, task: &Task, proposal: &str) -> CheckStatus {
        match &task.answer_format {
            None => CheckStatus::Skipped {
                reason: "the task declares no answer format".into(),
            },
            Some(format) => match extract_answer(proposal, format) {
                Some(_) => CheckStatus::Passed,
                None => CheckStatus::Failed {
                    reason: format!("no final answer of the form {format:?}"),
                },
            },
        }
    }
}

/// Share of checks passed among those that ran; `None` when every check was skipped.
pub fn pass_rate(reports: &[CheckReport]) -> Option<f64> {
    let ran: Vec<&CheckReport> = reports
        .iter()
        .filter(|r| !matches!(r.status, CheckStatus::Skipped { .. }))
        .collect();
    if ran.is_empty() {
        return None;
    }
    let passed = ran
        .iter()
        .filter(|r| r.status == CheckStatus::Passed)
        .count();
    Some(passed as f64 / ran.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::TaskId;
    use crate::parse::AnswerFormat;

    #[test]
    fn skipped_never_counts_as_passed() {
        let mut task = Task::new(TaskId::new("t").expect("id"), "add numbers").expect("task");
        let skipped = AnswerFormatCheck.run(&task, "anything");
        assert!(matches!(skipped, CheckStatus::Skipped { .. }));
        let reports = vec![CheckReport {
            name: "answer_format".into(),
            status: skipped,
        }];
        assert_eq!(pass_rate(&reports), None);
        task.answer_format = Some(AnswerFormat::Integer);
        assert_eq!(
            AnswerFormatCheck.run(&task, "so\nANSWER: 42"),
            CheckStatus::Passed
        );
        assert!(matches!(
            AnswerFormatCheck.run(&task, "no idea"),
            CheckStatus::Failed { .. }
        ));
    }
}
