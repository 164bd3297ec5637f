//! `--judge`: how judges give their verdicts, the flag of `deliberate`, `eval` and
//! `dev bench-batching`, and the `councils.judge` key of `council serve`.

use council_councils::spec::JudgeMode;

/// `--judge`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
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
