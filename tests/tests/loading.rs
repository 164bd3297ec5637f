//! Loading models from disk: every way a model directory can be wrong is a clear typed error,
//! and sharded checkpoints load to the same model as single-file ones.

use std::path::Path;

use council_inference::engine::loader::{self, HfFiles, ModelFiles};
use council_inference::engine::sequence_logits;
use council_inference::tiny::{TinyArch, TinyModelSpec};
use council_inference::{Engine, EngineConfig, LoadError};
use council_tests::{prompt, tiny_model, tiny_model_with};

fn load(dir: &Path) -> Result<loader::LoadedModel, LoadError> {
    let files = ModelFiles::from_dir(dir)?;
    loader::load(
        &files,
        "test",
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    edit(&mut json);
    std::fs::write(path, json.to_string()).expect("write");
}

fn expect_err(dir: &Path, what: &str) -> LoadError {
    match load(dir) {
        Ok(_) => panic!("{what}: loaded a broken model"),
        Err(e) => {
            // Every error names what is wrong in words a user can act on.
            assert!(!e.to_string().is_empty());
            e
        }
    }
}

#[test]
fn missing_files_are_named() {
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        let dir = tiny_model(TinyArch::Qwen2);
        std::fs::remove_file(dir.path().join(file)).expect("remove");
        match expect_err(dir.path(), file) {
            LoadError::MissingFile { path } => {
                assert!(path.ends_with(file), "{file}: named {path:?}")
            }
            other => panic!("{file}: expected MissingFile, got {other:?}"),
        }
    }
    let err = expect_err(Path::new("/nonexistent/model/dir"), "no dir");
    assert!(matches!(err, LoadError::MissingFile { .. }), "{err:?}");
}

#[test]
fn malformed_files_are_typed_errors() {
    for (file, content) in [
        ("config.json", "{ this is not json"),
        ("tokenizer.json", "{\"version\": 7}"),
        ("model.safetensors", "truncated"),
        ("generation_config.json", "[1, 2"),
        ("tokenizer_config.json", "nope"),
    ] {
        let dir = tiny_model(TinyArch::Qwen3);
        std::fs::write(dir.path().join(file), content).expect("write");
        match expect_err(dir.path(), file) {
            LoadError::Malformed { path, reason } => {
                assert!(path.ends_with(file), "{file}: named {path:?}");
                assert!(!reason.is_empty());
            }
            other => panic!("{file}: expected Malformed, got {other:?}"),
        }
    }
}

#[test]
fn unknown_model_type_is_refused() {
    let dir = tiny_model(TinyArch::Qwen2);
    edit_json(&dir.path().join("config.json"), |c| {
        c["model_type"] = "gpt_neox".into()
    });
    match expect_err(dir.path(), "gpt_neox") {
        LoadError::UnsupportedModelType { model_type, .. } => assert_eq!(model_type, "gpt_neox"),
        other => panic!("expected UnsupportedModelType, got {other:?}"),
    }
}

#[test]
fn tokenizer_larger_than_the_model_vocab_is_refused() {
    let dir = tiny_model(TinyArch::Qwen2);
    edit_json(&dir.path().join("config.json"), |c| {
        c["vocab_size"] = 300.into()
    });
    match expect_err(dir.path(), "vocab") {
        LoadError::VocabMismatch {
            tokenizer_max_id,
            model_vocab,
        } => {
            assert_eq!(model_vocab, 300);
            assert!(tokenizer_max_id >= 300);
        }
        other => panic!("expected VocabMismatch, got {other:?}"),
    }
}

#[test]
fn weights_that_do_not_fit_the_config_are_refused() {
    let dir = tiny_model(TinyArch::Qwen2);
    edit_json(&dir.path().join("config.json"), |c| {
        c["num_hidden_layers"] = 3.into()
    });
    match expect_err(dir.path(), "layers") {
        LoadError::Malformed { reason, .. } => assert!(reason.contains("layers.2"), "{reason}"),
        other => panic!("expected Malformed, got {other:?}"),
    }
    let dir = tiny_model(TinyArch::Qwen2);
    edit_json(&dir.path().join("config.json"), |c| {
        c["intermediate_size"] = 100.into()
    });
    assert!(matches!(
        expect_err(dir.path(), "shape"),
        LoadError::Malformed { .. }
    ));
}

#[test]
fn sharded_weights_load_to_the_same_model() {
    let single = tiny_model(TinyArch::Qwen3);
    let sharded = tiny_model_with(TinyModelSpec {
        shard_bytes: Some(100_000),
        ..TinyModelSpec::new(TinyArch::Qwen3)
    });
    let files = HfFiles::from_dir(sharded.path()).expect("complete");
    assert!(
        files.weights.len() > 2,
        "expected several shards, got {:?}",
        files.weights
    );
    let tokens = prompt(12, 4);
    let a = sequence_logits(&load(single.path()).expect("single").model, &tokens).expect("forward");
    let b =
        sequence_logits(&load(sharded.path()).expect("sharded").model, &tokens).expect("forward");
    assert_eq!(a, b);

    // An index naming a shard that is not there.
    std::fs::remove_file(&files.weights[1]).expect("remove shard");
    match expect_err(sharded.path(), "missing shard") {
        LoadError::MissingFile { path } => assert_eq!(path, files.weights[1]),
        other => panic!("expected MissingFile, got {other:?}"),
    }
}

#[test]
fn generation_is_reproducible_across_fresh_directories() {
    // Same seed, same bytes: tiny models are deterministic on every machine.
    let a = tiny_model(TinyArch::Qwen2);
    let b = tiny_model(TinyArch::Qwen2);
    for file in ["model.safetensors", "tokenizer.json", "config.json"] {
        let read = |d: &Path| std::fs::read(d.join(file)).expect("read");
        assert!(
            read(a.path()) == read(b.path()),
            "{file} differs between two generations"
        );
    }
    let c = tiny_model_with(TinyModelSpec {
        seed: 1,
        ..TinyModelSpec::new(TinyArch::Qwen2)
    });
    assert_ne!(
        std::fs::read(a.path().join("model.safetensors")).ok(),
        std::fs::read(c.path().join("model.safetensors")).ok()
    );
}

#[test]
fn engine_config_must_be_positive() {
    let dir = tiny_model(TinyArch::Qwen2);
    let err = Engine::load_dir(
        dir.path(),
        EngineConfig {
            max_batch: 0,
            ..EngineConfig::default()
        },
    )
    .expect_err("max_batch 0");
    assert!(
        matches!(
            err,
            LoadError::InvalidConfig {
                field: "max_batch",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn bf16_checkpoints_load_and_run_in_f32() {
    // Real Qwen checkpoints ship bf16 weights; the loader converts them tensor by tensor.
    let dir = tiny_model(TinyArch::Qwen2);
    let path = dir.path().join("model.safetensors");
    let f32_logits =
        sequence_logits(&load(dir.path()).expect("f32").model, &prompt(10, 2)).expect("forward");
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).expect("read");
    let bf16: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(name, t)| (name, t.to_dtype(candle_core::DType::BF16).expect("to bf16")))
        .collect();
    candle_core::safetensors::save(&bf16, &path).expect("write bf16");
    let bf16_logits =
        sequence_logits(&load(dir.path()).expect("bf16").model, &prompt(10, 2)).expect("forward");
    let max_diff = f32_logits
        .iter()
        .flatten()
        .zip(bf16_logits.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        max_diff > 0.0,
        "bf16 rounding should change the logits a little"
    );
    assert!(
        max_diff < 0.5,
        "bf16 weights changed the logits by {max_diff}"
    );
}
