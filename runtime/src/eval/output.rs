//! The output directory of an evaluation run: `run.json` (the settings, checked on resume),
//! `results.jsonl` (one line per item × arm, appended as each finishes), `transcripts/`,
//! `summary.json`, `report.md` and `plots/`.
//!
//! A line is written whole or not at all as far as a reader is concerned: a torn last line (the
//! process died mid-write) is cut off on resume, and any other unreadable line is an error,
//! never silently dropped. Every other file is replaced atomically.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::record::{Arm, BudgetKind, ResultRecord};

/// The settings that decide a run's numbers; a resumed run must have the same ones.
/// (`--limit`, `--arms` and `--concurrency` may change between invocations.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub version: u32,
    pub source: String,
    pub seed: u64,
    pub model: String,
    pub backend: String,
    pub role: String,
    pub agents: u64,
    pub rounds: u32,
    pub refine_rounds: u32,
    pub vote_match: BudgetKind,
    pub max_vote_samples: u64,
    pub max_tokens_per_call: u32,
    /// The council's rubric judge ("text" or "logprob").
    #[serde(default)]
    pub judge: String,
}

impl Settings {
    pub const VERSION: u32 = 1;

    /// Names of the fields that differ from `other`.
    fn differences(&self, other: &Settings) -> Vec<String> {
        let (a, b) = (
            serde_json::to_value(self).unwrap_or_default(),
            serde_json::to_value(other).unwrap_or_default(),
        );
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return vec!["settings".to_owned()];
        };
        a.iter()
            .filter(|(k, v)| b.get(k.as_str()) != Some(v))
            .map(|(k, v)| {
                format!(
                    "{k}: {} now, {} in the directory",
                    v,
                    b.get(k.as_str()).unwrap_or(&serde_json::Value::Null)
                )
            })
            .collect()
    }
}

/// Why the output directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} already holds results of a run; pass --resume to continue it, or choose another --out"
    )]
    NotEmpty { path: String },
    #[error("{path} is not the output of this run (settings differ: {}); choose another --out", .differences.join("; "))]
    OtherRun {
        path: String,
        differences: Vec<String>,
    },
    #[error("{path} line {line} is not a result line ({reason}); fix or remove it")]
    Corrupt {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// An open output directory.
#[derive(Debug)]
pub struct OutDir {
    root: PathBuf,
    results: File,
}

impl OutDir {
    /// Opens `root` for a run with `settings`, returning the result lines already there.
    /// Without `resume`, a directory holding results is refused; with it, its settings must
    /// match.
    pub fn open(
        root: &Path,
        settings: &Settings,
        resume: bool,
    ) -> Result<(Self, Vec<ResultRecord>), OutputError> {
        std::fs::create_dir_all(root).map_err(io(root))?;
        let results_path = root.join("results.jsonl");
        let settings_path = root.join("run.json");
        let has_results = std::fs::metadata(&results_path).is_ok_and(|m| m.len() > 0);
        if has_results && !resume {
            return Err(OutputError::NotEmpty {
                path: root.display().to_string(),
            });
        }
        if let Ok(text) = std::fs::read_to_string(&settings_path) {
            let previous: Settings =
                serde_json::from_str(&text).map_err(|e| OutputError::Corrupt {
                    path: settings_path.display().to_string(),
                    line: e.line(),
                    reason: e.to_string(),
                })?;
            let differences = settings.differences(&previous);
            if !differences.is_empty() {
                return Err(OutputError::OtherRun {
                    path: root.display().to_string(),
                    differences,
                });
            }
        }
        let existing = if has_results {
            read_results(&results_path)?
        } else {
            Vec::new()
        };
        write_atomic(&settings_path, &to_json(settings, "run settings")?)?;
        let results = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&results_path)
            .map_err(io(&results_path))?;
        let dir = Self {
            root: root.to_owned(),
            results,
        };
        Ok((dir, existing))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Appends one result line in a single write.
    pub fn append(&mut self, record: &ResultRecord) -> Result<(), OutputError> {
        let mut line = serde_json::to_string(record).map_err(|source| OutputError::Encode {
            what: "a result line",
            source,
        })?;
        line.push('\n');
        let path = self.root.join("results.jsonl");
        self.results.write_all(line.as_bytes()).map_err(io(&path))
    }

    /// Writes an arm's transcript and returns its path relative to the root.
    pub fn transcript(
        &self,
        arm: Arm,
        item: &str,
        transcript: &serde_json::Value,
    ) -> Result<String, OutputError> {
        let relative = format!("transcripts/{}/{item}.json", arm.as_str());
        let path = self.root.join(&relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        write_atomic(&path, &to_json(transcript, "a transcript")?)?;
        Ok(relative)
    }

    /// Writes a file under the root atomically.
    pub fn write(&self, relative: &str, contents: &str) -> Result<PathBuf, OutputError> {
        let path = self.root.join(relative);
        write_atomic(&path, contents)?;
        Ok(path)
    }

    /// Flushes the results file to disk.
    pub fn sync(&self) -> Result<(), OutputError> {
        self.results
            .sync_all()
            .map_err(io(&self.root.join("results.jsonl")))
    }
}

fn to_json<T: Serialize>(value: &T, what: &'static str) -> Result<String, OutputError> {
    serde_json::to_string_pretty(value).map_err(|source| OutputError::Encode { what, source })
}

/// Replaces `path` with `contents`: temp file, then rename.
fn write_atomic(path: &Path, contents: &str) -> Result<(), OutputError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Reads the result lines. A torn last line (the process died while writing it: no newline)
/// is cut off the file; a whole line that does not parse is corruption and an error.
pub fn read_results(path: &Path) -> Result<Vec<ResultRecord>, OutputError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let mut records = Vec::new();
    let mut kept = 0;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        if !line.ends_with('\n') {
            break; // only the last piece can lack its newline
        }
        kept += line.len();
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(line.trim_end()).map_err(|e| OutputError::Corrupt {
            path: path.display().to_string(),
            line: n + 1,
            reason: e.to_string(),
        })?;
        records.push(record);
    }
    if kept < text.len() {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io(path))?;
        file.set_len(kept as u64).map_err(io(path))?;
    }
    Ok(records)
}
