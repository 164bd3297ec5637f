//! Shared helpers of the end-to-end tests: tiny generated models and engines on them.

pub mod openai_double;

use std::path::Path;

use council_inference::tiny::{self, TinyArch, TinyModelSpec};
use council_inference::{Engine, EngineConfig, EngineHandle};
use tempfile::TempDir;

/// A fresh tiny model directory of `arch` (seed 0, the seed the parity fixtures use).
pub fn tiny_model(arch: TinyArch) -> TempDir {
    tiny_model_with(TinyModelSpec::new(arch))
}

pub fn tiny_model_with(spec: TinyModelSpec) -> TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    tiny::write_tiny_model(dir.path(), &spec).expect("tiny model is written");
    dir
}

/// Starts an engine on the model in `dir`.
pub fn engine(dir: &Path, config: EngineConfig) -> EngineHandle {
    Engine::load_dir(dir, config).expect("tiny model loads")
}

/// Token prompts of distinct lengths and contents, inside the ordinary vocabulary.
pub fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 31 + salt * 17) % 250 + 3)
        .collect()
}
