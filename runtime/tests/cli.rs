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

    // Every command that loads a model says the same (resolving a hub model must not run
    // inside the command's own async runtime).
    let out_dir = tempfile::tempdir().expect("temp dir");
    let out_dir = out_dir.path().join("eval");
    let eval = [
        "eval",
        "--model",
        "nobody/nothing",
        "--suite",
        "arithmetic",
        "--limit",
        "1",
        "--out",
        out_dir.to_str().expect("utf-8"),
    ];
    for args in [
        &["deliberate", "--model", "nobody/nothing", "hi"][..],
        &eval[..],
    ] {
        let out = council(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        for needle in ["nobody/nothing", "--model-dir"] {
            assert!(
                err.contains(needle),
                "{args:?}: missing {needle:?} in: {err}"
            );
        }
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

#[test]
fn quantized_generation_end_to_end_and_bad_quantize_values() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = dir.path().to_str().expect("utf-8");
    assert!(council(&["dev", "tiny-model", model]).status.success());
    let generate = |quantize: &str| {
        let out = council(&[
            "generate",
            "--model-dir",
            model,
            "--quantize",
            quantize,
            "--max-new-tokens",
            "8",
            "--json",
            "Hello, council.",
        ]);
        assert!(out.status.success(), "{quantize}: {}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON result")
    };
    let q8 = generate("q8_0");
    let completion = q8["usage"]["completion_tokens"].as_u64().expect("usage");
    assert!((1..=8).contains(&completion), "{q8}");
    // Deterministic under greedy, like the f32 engine.
    assert_eq!(generate("q8_0")["token_ids"], q8["token_ids"]);
    assert!(generate("none")["token_ids"].is_array());

    let out = council(&["generate", "--model-dir", model, "--quantize", "q4_k", "hi"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("q4_k") && err.contains("none, q8_0"), "{err}");

    // The measurement of what q8_0 costs in accuracy and saves in memory.
    let out = council(&[
        "dev",
        "quant-error",
        "--model-dir",
        model,
        "--prompt-tokens",
        "16",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "0.266x",
        "over 16 positions",
        "same top token at",
        "mean KL(f32 || q8_0)",
    ] {
        assert!(report.contains(needle), "missing {needle:?} in: {report}");
    }
    for (args, needle) in [
        (["--quantize", "none"], "compares f32 with itself"),
        (["--prompt-tokens", "0"], "prompt_tokens must be at least 1"),
    ] {
        let out = council(&[&["dev", "quant-error", "--model-dir", model][..], &args[..]].concat());
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }

    for args in [
        &[
            "generate",
            "--model-dir",
            model,
            "--quantize",
            "q8_0",
            "--cuda",
            "0",
            "hi",
        ][..],
        &[
            "generate",
            "--vllm-url",
            "http://127.0.0.1:9",
            "--quantize",
            "q8_0",
            "hi",
        ][..],
    ] {
        let out = council(args);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr(&out).contains("--quantize"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn dev_bench_measures_and_refuses_batches_that_would_run_in_waves() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = dir.path().to_str().expect("utf-8");
    assert!(council(&["dev", "tiny-model", model]).status.success());
    let bench = |extra: &[&str]| {
        let base = [
            "dev",
            "bench",
            "--model-dir",
            model,
            "--prompt-tokens",
            "8",
            "--new-tokens",
            "4",
        ];
        council(&[&base[..], extra].concat())
    };
    let out = bench(&["--batch", "1,3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "prefill: 8 tokens",
        "decode batch 1: 3 tokens",
        "decode batch 3: 9 tokens",
    ] {
        assert!(report.contains(needle), "missing {needle:?} in: {report}");
    }
    // More requests than the engine runs at once would decode in waves: refused, not mismeasured.
    let out = bench(&[
        "--max-batch",
        "2",
        "--max-step-tokens",
        "64",
        "--batch",
        "1,3",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--batch 3 is more than --max-batch 2"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn deliberate_end_to_end_on_a_tiny_model() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = dir.path().to_str().expect("utf-8");
    assert!(council(&["dev", "tiny-model", model]).status.success());
    let args = [
        "deliberate",
        "--model-dir",
        model,
        "--role",
        "DEV",
        "--rounds",
        "2",
        "--max-tokens-per-call",
        "64",
        "--seed",
        "3",
        "--json",
        "Propose a retry policy for a flaky job queue.",
    ];
    let out = council(&args);
    assert!(out.status.success(), "deliberate failed: {}", stderr(&out));
    let o: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON outcome");
    assert_eq!(o["status"]["state"], "completed", "{o}");
    let proposals = o["proposals"].as_array().expect("proposals");
    assert!(proposals.len() >= 2, "{o}");
    let ranks: Vec<u64> = proposals
        .iter()
        .map(|p| p["rank"].as_u64().expect("rank"))
        .collect();
    assert_eq!(ranks, (1..=proposals.len() as u64).collect::<Vec<_>>());
    assert_eq!(o["winner"], proposals[0]["agent"]);
    assert!(
        proposals
            .iter()
            .all(|p| p["content"].as_str().is_some_and(|c| !c.trim().is_empty()))
    );

    // Usage accounting adds up over the transcript.
    let transcript = o["transcript"].as_array().expect("transcript");
    assert_eq!(o["usage"]["calls"].as_u64(), Some(transcript.len() as u64));
    let sum = |key: &str| {
        transcript
            .iter()
            .map(|r| r[key].as_u64().expect("tokens"))
            .sum::<u64>()
    };
    assert_eq!(
        o["usage"]["prompt_tokens"].as_u64(),
        Some(sum("prompt_tokens"))
    );
    assert_eq!(
        o["usage"]["completion_tokens"].as_u64(),
        Some(sum("completion_tokens"))
    );
    assert!(
        transcript
            .iter()
            .all(|r| r["completion_tokens"].as_u64().expect("n") <= 64)
    );
    let phases: std::collections::BTreeSet<&str> = transcript
        .iter()
        .filter_map(|r| r["phase"].as_str())
        .collect();
    assert!(
        phases.contains("propose") && phases.contains("critique"),
        "{phases:?}"
    );

    // Same seed, same model: the same outcome, byte for byte.
    let again = council(&args);
    assert_eq!(
        again.stdout, out.stdout,
        "deliberation is not deterministic"
    );

    // Bad arguments are named before any model loads.
    for (flag, value) in [
        ("--role", "9bad"),
        ("--rounds", "99"),
        ("--visibility", "sideways"),
        ("--agents", "0"),
    ] {
        let mut bad: Vec<&str> = vec!["deliberate", "--model-dir", model, "task"];
        bad.extend([flag, value]);
        let out = council(&bad);
        assert!(!out.status.success(), "{flag} {value} accepted");
        let err = stderr(&out);
        assert!(
            err.contains(flag.trim_start_matches("--")) || err.contains(value),
            "{flag}: {err}"
        );
    }
}

/// `--vllm-url` is honoured where a command can use a server (`generate` goes to it: here a
/// closed port, so it fails naming the endpoint) and refused by name where a command runs the
/// in-process engine (`dev bench`, the `bench-*` commands). (Before: silently ignored; the
/// commands ran or measured the local default model.)
#[test]
fn vllm_url_is_honoured_or_refused_by_name() {
    let url = "http://127.0.0.1:9";
    let generate = council(&["generate", "--vllm-url", url, "--max-new-tokens", "4", "Hi"]);
    assert!(!generate.status.success(), "generated without the server");
    assert!(
        stderr(&generate).contains("127.0.0.1:9"),
        "{}",
        stderr(&generate)
    );
    for command in [
        vec!["dev", "bench", "--vllm-url", url],
        vec!["dev", "bench-batching", "--vllm-url", url],
        vec!["dev", "bench-service", "--vllm-url", url],
    ] {
        let out = council(&command);
        assert!(!out.status.success(), "{command:?} ran");
        assert!(
            stderr(&out).contains("--vllm-url: this command runs the in-process engine"),
            "{command:?}: {}",
            stderr(&out)
        );
    }
}

/// `council dev gpu-check` runs every check where no GPU is, with the q8_0 CPU engine standing
/// in for the device: six PASS lines; with no tolerance left the inexact comparisons FAIL and
/// the exit status says so; a GPU this build cannot use, or nothing to compare, is refused.
#[test]
fn gpu_check_passes_on_the_cpu_stand_in_and_fails_when_it_should() {
    let dir = tempfile::tempdir().expect("temp dir");
    let work = dir.path().to_str().expect("utf-8 path");
    let out = council(&["dev", "gpu-check", "--work-dir", work]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", stderr(&out));
    for check in ["logits", "batch invariance", "scoring"] {
        for arch in ["qwen2", "qwen3"] {
            let line = format!("PASS {arch} {check} (cpu q8_0");
            assert!(stdout.contains(&line), "no {line:?} in {stdout}");
        }
    }
    assert!(
        stdout.contains("gpu-check: 6 of 6 checks passed on cpu q8_0"),
        "{stdout}"
    );

    let strict = council(&[
        "dev",
        "gpu-check",
        "--work-dir",
        work,
        "--tolerance-scale",
        "0",
    ]);
    let stdout = String::from_utf8_lossy(&strict.stdout).into_owned();
    assert!(!strict.status.success(), "{stdout}");
    // Logits and scores move under q8_0; greedy tokens batched and alone stay equal.
    assert_eq!(stdout.matches("FAIL ").count(), 4, "{stdout}");
    assert_eq!(
        stdout.matches("PASS ").count(),
        2,
        "batch invariance is exact: {stdout}"
    );
    assert!(
        stderr(&strict).contains("4 check(s) failed"),
        "{}",
        stderr(&strict)
    );

    let itself = council(&["dev", "gpu-check", "--quantize", "none"]);
    assert!(!itself.status.success());
    assert!(
        stderr(&itself).contains("compares f32 with itself"),
        "{}",
        stderr(&itself)
    );
    #[cfg(not(feature = "cuda"))]
    {
        let gpu = council(&["dev", "gpu-check", "--cuda", "0", "--work-dir", work]);
        assert!(!gpu.status.success());
        assert!(
            stderr(&gpu).to_lowercase().contains("cuda"),
            "{}",
            stderr(&gpu)
        );
    }
}
