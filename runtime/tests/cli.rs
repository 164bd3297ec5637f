//! The `council` binary end to end: make a tiny model, generate with it, and fail clearly.

use std::process::{Command, Output};

fn council(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_council"))
        .args(args)
        // No test reaches the internet: the hub is a closed local port, the cache a private dir.
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env(
            "HF_HUB_CACHE",
            std::env::temp_dir().join("council-cli-test-empty-hub-cache"),
        )
        .output()
        .expect("council runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn tiny_model_then_generate_end_to_end() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = dir.path().join("tiny");
    let model = model.to_str().expect("utf-8 path");
    for arch in ["qwen2", "qwen3"] {
        let made = council(&["dev", "tiny-model", model, "--arch", arch]);
        assert!(
            made.status.success(),
            "tiny-model failed: {}",
            stderr(&made)
        );

        let generate = [
            "generate",
            "--model-dir",
            model,
            "--max-new-tokens",
            "12",
            "--json",
            "Hello, council.",
        ];
        let out = council(&generate);
        assert!(out.status.success(), "generate failed: {}", stderr(&out));
        let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON result");
        let completion = result["usage"]["completion_tokens"]
            .as_u64()
            .expect("usage");
        assert!((1..=12).contains(&completion), "{result}");
        assert_eq!(
            result["token_ids"].as_array().map(Vec::len),
            Some(completion as usize)
        );
        assert!(
            result["usage"]["prompt_tokens"]
                .as_u64()
                .expect("prompt tokens")
                > 5
        );

        // Same command, same output: greedy generation is deterministic.
        let again = council(&generate);
        let again: serde_json::Value = serde_json::from_slice(&again.stdout).expect("JSON result");
        assert_eq!(again["token_ids"], result["token_ids"]);
    }
}

#[test]
fn bad_model_sources_fail_with_a_clear_message() {
    let out = council(&["generate", "--model-dir", "/nonexistent/model", "hi"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/model"),
        "{}",
        stderr(&out)
    );

    let out = council(&["generate", "--model", "nobody/nothing", "hi"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    for needle in ["nobody/nothing", "--model-dir", "council dev tiny-model"] {
        assert!(err.contains(needle), "missing {needle:?} in: {err}");
    }

    let out = council(&["generate", "--model", "not-a-repo-ref", "hi"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("ORG/NAME"), "{}", stderr(&out));

    let dir = tempfile::tempdir().expect("temp dir");
    let model = dir.path().to_str().expect("utf-8");
    assert!(council(&["dev", "tiny-model", model]).status.success());
    let out = council(&[
        "generate",
        "--model-dir",
        model,
        "--max-new-tokens",
        "0",
        "hi",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("max_new_tokens"), "{}", stderr(&out));

    // A GPU asked of a CPU-only build is a clear error, not a silent fallback to CPU.
    if !cfg!(feature = "cuda") {
        let out = council(&["generate", "--model-dir", model, "--cuda", "0", "hi"]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("without CUDA"), "{}", stderr(&out));
    }
}
