//! Shared helpers of the end-to-end tests: tiny generated models and engines on them.

pub mod openai_double;

use std::path::Path;

use council_inference::engine::loader::{self, LoadedModel, ModelFiles};
use council_inference::tiny::{self, TinyArch, TinyModelSpec};
use council_inference::{
    Backend, Engine, EngineConfig, EngineHandle, GenerateRequest, GenerateResult, Sampling,
};
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

/// Prompt lengths and generation lengths that differ on purpose.
const SHAPES: [(usize, usize); 5] = [(3, 20), (17, 5), (40, 12), (9, 30), (1, 8)];

/// Five token requests of different prompt and generation lengths, request `i` sampled as
/// `sampling(i)` says.
pub fn varied_requests(sampling: impl Fn(usize) -> Sampling) -> Vec<GenerateRequest> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, &(len, new))| {
            GenerateRequest::tokens(prompt(len, i as u32), new).with_sampling(sampling(i))
        })
        .collect()
}

/// Loads the model in `dir` on the CPU in f32, without an engine (for independent forwards).
pub fn load_f32(dir: &Path) -> LoadedModel {
    let files = ModelFiles::from_dir(dir).expect("model dir");
    loader::load(
        &files,
        "tiny",
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .expect("loads")
}

/// Each request after the previous one finished.
pub async fn one_by_one(
    handle: &impl Backend,
    requests: &[GenerateRequest],
) -> Vec<GenerateResult> {
    let mut out = Vec::new();
    for r in requests {
        out.push(handle.generate(r.clone()).await.expect("generates alone"));
    }
    out
}

/// Every request submitted before any is awaited, so the engine may batch them.
pub async fn all_at_once(
    handle: &impl Backend,
    requests: &[GenerateRequest],
) -> Vec<GenerateResult> {
    let futures: Vec<_> = requests
        .iter()
        .map(|r| handle.generate(r.clone()))
        .collect();
    let mut out = Vec::new();
    for f in futures {
        out.push(f.await.expect("generates in a batch"));
    }
    out
}

/// The generated token ids of each result.
pub fn token_ids(results: &[GenerateResult]) -> Vec<Vec<u32>> {
    results.iter().map(|r| r.token_ids.clone()).collect()
}
