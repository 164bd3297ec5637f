//! `--judge`: how judges give their verdicts, the flag of `deliberate`, `eval` and
//! `dev bench-batching`.

use council_councils::spec::JudgeMode;

/// `--judge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Judge {
    Text,
    Logprob,
}

impl From<Judge> for JudgeMode {
    fn from(judge: Judge) -> Self {
        match judge {
            Judge::Text => JudgeMode::Text,
            Judge::Logprob => JudgeMode::LogProb,
        }
    }
}
