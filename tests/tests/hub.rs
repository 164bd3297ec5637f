//! `--model ORG/NAME` resolution through the Hugging Face cache. One test in its own binary,
//! because it sets process-wide environment variables.

use council_inference::LoadError;
use council_inference::engine::loader::{HubModel, resolve_hub_model};
use council_inference::tiny::TinyArch;
use council_tests::tiny_model;

#[tokio::test]
async fn cached_models_resolve_offline_and_missing_ones_say_what_to_do() {
    let cache = tempfile::tempdir().expect("cache dir");
    // The layout huggingface_hub writes: refs/<branch> holds the commit, snapshots/<commit>/ the files.
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.path().join("models--tiny-org--tiny-qwen");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).expect("snapshot dir");
    std::fs::create_dir_all(repo.join("refs")).expect("refs dir");
    std::fs::write(repo.join("refs").join("main"), commit).expect("ref");
    let model = tiny_model(TinyArch::Qwen2);
    for entry in std::fs::read_dir(model.path()).expect("model dir") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, snapshot.join(path.file_name().expect("name"))).expect("copy");
    }

    // SAFETY of the test: this binary runs this one test only, so nothing reads the environment concurrently.
    unsafe_env(cache.path());

    let hub: HubModel = "tiny-org/tiny-qwen".parse().expect("ref");
    let files = resolve_hub_model(&hub, None)
        .await
        .expect("resolves from the cache without network");
    assert_eq!(files.location(), snapshot);
    council_inference::Engine::load(&files, &hub.to_string(), Default::default()).expect("loads");

    // One GGUF file of the repo, and only that file.
    council_inference::tiny_gguf::write_gguf(
        model.path(),
        &snapshot.join("model-q8_0.gguf"),
        candle_core::quantized::GgmlDType::Q8_0,
    )
    .expect("GGUF written");
    let gguf = resolve_hub_model(&hub, Some("model-q8_0.gguf"))
        .await
        .expect("the GGUF file resolves from the cache");
    assert_eq!(
        gguf,
        council_inference::engine::loader::ModelFiles::Gguf(snapshot.join("model-q8_0.gguf"))
    );
    council_inference::Engine::load(&gguf, "gguf", Default::default()).expect("GGUF loads");
    for bad in ["../x.gguf", "/abs.gguf", "model.safetensors", ""] {
        assert!(
            matches!(
                resolve_hub_model(&hub, Some(bad)).await,
                Err(LoadError::InvalidConfig { .. })
            ),
            "{bad:?} should be refused"
        );
    }

    let missing: HubModel = "nobody/not-cached@main".parse().expect("ref");
    let err = resolve_hub_model(&missing, None)
        .await
        .expect_err("not cached, hub unreachable");
    let message = err.to_string();
    assert!(matches!(err, LoadError::HubUnavailable { .. }), "{err:?}");
    for needle in ["nobody/not-cached", "--model-dir", "council dev tiny-model"] {
        assert!(
            message.contains(needle),
            "error should mention {needle:?}: {message}"
        );
    }
}

/// Points the hub cache at `cache` and the hub at a closed local port, so no test reaches the
/// internet.
fn unsafe_env(cache: &std::path::Path) {
    // Rust 2024 marks set_var unsafe because of concurrent readers; see the caller's note.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("HF_HUB_CACHE", cache);
        std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
        std::env::remove_var("HF_HUB_OFFLINE");
    }
}
