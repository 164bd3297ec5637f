//! The engine's scheduler and KV cache: prefix reuse across requests, chunked prefill under a
//! token budget, preemption when the KV pool runs dry, first-come-first-served admission with
//! bounded bypassing, and the KV budget's validation. Every scheduling choice is checked
//! against the tokens the same requests get on a roomy, plain engine.

use std::sync::Arc;
use std::time::Instant;

use council_inference::tiny::TinyArch;
use council_inference::{
    Backend, EngineConfig, GenerateRequest, KvBudget, LoadError, Prompt, ScoreRequest,
};
use council_tests::{all_at_once, engine, load_f32, one_by_one, prompt, tiny_model, token_ids};

/// A plain engine: one sequence at a time, no prefix cache, whole prompts in one step.
fn plain() -> EngineConfig {
    EngineConfig {
        max_batch: 1,
        prefix_cache: false,
        max_step_tokens: 4096,
        ..EngineConfig::default()
    }
}

/// `shared` tokens common to every request, then a few of the request's own.
fn sharing(shared: usize, own: usize, count: u32, new: usize) -> Vec<GenerateRequest> {
    let common = prompt(shared, 1);
    (0..count)
        .map(|i| {
            let mut tokens = common.clone();
            tokens.extend(prompt(own, 10 + i));
            GenerateRequest::tokens(tokens, new)
        })
        .collect()
}

#[tokio::test]
async fn a_shared_prefix_is_computed_once_and_reused_after_its_request_finished() {
    let dir = tiny_model(TinyArch::Qwen2);
    let requests = sharing(200, 7, 3, 6);
    let expected = one_by_one(&engine(dir.path(), plain()), &requests).await;

    let cached = engine(dir.path(), EngineConfig::default());
    // One after another: each later request finds the earlier one's blocks, though the
    // request that computed them has finished.
    let got = one_by_one(&cached, &requests).await;
    assert_eq!(token_ids(&got), token_ids(&expected));
    assert_eq!(got[0].usage.cached_prompt_tokens, 0);
    // 200 shared tokens are 12 whole blocks of 16 (192 tokens).
    for r in &got[1..] {
        assert_eq!(r.usage.cached_prompt_tokens, 192);
        assert_eq!(r.usage.prompt_tokens, 207);
    }
    let stats = cached.stats();
    assert_eq!(stats.cached_prompt_tokens, 2 * 192);
    assert_eq!(stats.prompt_tokens, 3 * 207 - 2 * 192);
    let load = cached.load();
    let (hits, lookups) = load
        .prefix_cache
        .expect("the engine reports its prefix cache");
    assert_eq!(hits, 2 * 12);
    assert!(lookups >= hits);

    // Without the prefix cache every prompt is computed whole.
    let uncached = engine(
        dir.path(),
        EngineConfig {
            prefix_cache: false,
            ..EngineConfig::default()
        },
    );
    let got = one_by_one(&uncached, &requests).await;
    assert_eq!(token_ids(&got), token_ids(&expected));
    assert!(got.iter().all(|r| r.usage.cached_prompt_tokens == 0));
    assert_eq!(uncached.stats().prompt_tokens, 3 * 207);
}

#[tokio::test]
async fn requests_submitted_together_share_the_prefix_of_the_first() {
    let dir = tiny_model(TinyArch::Qwen3);
    let requests = sharing(100, 5, 3, 8);
    let expected = one_by_one(&engine(dir.path(), plain()), &requests).await;
    // A step budget smaller than the shared prefix: the first request's prompt takes several
    // steps, and the others, admitted once its blocks are registered, reuse what is there.
    let handle = engine(
        dir.path(),
        EngineConfig {
            max_step_tokens: 48,
            ..EngineConfig::default()
        },
    );
    let got = all_at_once(&handle, &requests).await;
    assert_eq!(token_ids(&got), token_ids(&expected));
    let stats = handle.stats();
    // The later two wait for the first one's 6 shared blocks rather than computing them.
    assert_eq!(stats.prompt_tokens, 105 + 2 * (105 - 96));
    assert_eq!(
        stats.prompt_tokens + stats.cached_prompt_tokens,
        3 * 105,
        "every prompt token is computed or cached, once"
    );
}

#[tokio::test]
async fn requests_admitted_in_one_step_wait_for_the_prefix_a_sibling_is_computing() {
    let dir = tiny_model(TinyArch::Qwen2);
    // Three requests sharing 100 tokens (6 whole blocks of 16) and one unrelated request.
    let mut requests = sharing(100, 5, 3, 8);
    requests.insert(1, GenerateRequest::tokens(prompt(30, 77), 8));
    let expected = one_by_one(&engine(dir.path(), plain()), &requests).await;
    // A budget that takes every prompt in one step: without waiting, all three would compute
    // the shared prefix side by side.
    let handle = engine(
        dir.path(),
        EngineConfig {
            max_step_tokens: 4096,
            ..EngineConfig::default()
        },
    );
    let got = all_at_once(&handle, &requests).await;
    assert_eq!(token_ids(&got), token_ids(&expected));
    let cached: Vec<usize> = got.iter().map(|r| r.usage.cached_prompt_tokens).collect();
    assert_eq!(
        cached,
        [0, 0, 96, 96],
        "the later siblings take the first one's blocks"
    );
    let stats = handle.stats();
    assert_eq!(stats.prompt_tokens, 105 + 30 + 2 * (105 - 96));
    assert_eq!(stats.cached_prompt_tokens, 2 * 96);

    // Without the prefix cache nobody waits and everything is computed.
    let uncached = engine(
        dir.path(),
        EngineConfig {
            max_step_tokens: 4096,
            prefix_cache: false,
            ..EngineConfig::default()
        },
    );
    let got = all_at_once(&uncached, &requests).await;
    assert_eq!(token_ids(&got), token_ids(&expected));
    assert_eq!(uncached.stats().prompt_tokens, 3 * 105 + 30);
}

#[tokio::test]
async fn long_prompts_are_prefilled_in_chunks_beside_running_decodes() {
    let dir = tiny_model(TinyArch::Qwen2);
    let short = GenerateRequest::tokens(prompt(4, 3), 40);
    let long = GenerateRequest::tokens(prompt(300, 4), 5);
    let requests = [short, long];
    let expected = one_by_one(&engine(dir.path(), plain()), &requests).await;
    let handle = engine(
        dir.path(),
        EngineConfig {
            max_step_tokens: 32,
            prefix_cache: false,
            ..EngineConfig::default()
        },
    );
    let got = all_at_once(&handle, &requests).await;
    assert_eq!(token_ids(&got), token_ids(&expected));
    let stats = handle.stats();
    // 300 prompt tokens at most 31 a step beside the short one's decode token: 10 steps or more.
    assert!(stats.steps >= 10, "{} steps", stats.steps);
    // The short request kept decoding while the long prompt was prefilled: both together take
    // fewer steps than one after the other.
    let alone_steps = 1 + 40 + 300usize.div_ceil(32) as u64 + 5;
    assert!(
        stats.steps < alone_steps,
        "{} steps, as many as running them one after another ({alone_steps})",
        stats.steps
    );
}

#[tokio::test]
async fn a_dry_kv_pool_preempts_and_recomputes_without_changing_any_output() {
    let dir = tiny_model(TinyArch::Qwen2);
    let requests: Vec<GenerateRequest> = (0..4)
        .map(|i| GenerateRequest::tokens(prompt(20 + i, i as u32), 40))
        .collect();
    let expected = one_by_one(&engine(dir.path(), plain()), &requests).await;
    assert!(
        expected.iter().all(|r| r.token_ids.len() == 40),
        "precondition: every request runs its full length"
    );
    // Room for one 64-token window and a block: 5 blocks of 16 for four sequences that each
    // grow to 60 tokens (4 blocks).
    let handle = engine(
        dir.path(),
        EngineConfig {
            max_batch: 4,
            max_seq_len: 64,
            kv_cache: KvBudget::Tokens(80),
            ..EngineConfig::default()
        },
    );
    let got = all_at_once(&handle, &requests).await;
    assert_eq!(token_ids(&got), token_ids(&expected));
    let stats = handle.stats();
    assert!(stats.preempted > 0, "the pool never ran dry: {stats:?}");
    assert_eq!(stats.finished, 4);
    assert_eq!(stats.failed, 0);
}

/// Completion instants of A (long, running), B (large, does not fit while A runs), then small
/// C and D, submitted in that order to an engine that lets a waiting request be passed
/// `max_bypass` times.
async fn completions(max_bypass: u32) -> [Instant; 4] {
    let dir = tiny_model(TinyArch::Qwen2);
    let handle = Arc::new(engine(
        dir.path(),
        EngineConfig {
            max_batch: 4,
            max_seq_len: 128,
            kv_cache: KvBudget::Tokens(224),
            prefix_cache: false,
            max_bypass,
            ..EngineConfig::default()
        },
    ));
    let a = GenerateRequest::tokens(prompt(100, 1), 24);
    let b = GenerateRequest::tokens(prompt(100, 2), 4);
    let c = GenerateRequest::tokens(prompt(5, 3), 3);
    let d = GenerateRequest::tokens(prompt(5, 4), 3);
    let tasks: Vec<_> = [a, b, c, d]
        .into_iter()
        .map(|r| {
            let future = handle.generate(r);
            tokio::spawn(async move {
                future.await.expect("generates");
                Instant::now()
            })
        })
        .collect();
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.expect("task"));
    }
    [done[0], done[1], done[2], done[3]]
}

#[tokio::test]
async fn waiting_requests_are_passed_only_a_bounded_number_of_times() {
    // Strict first come, first served: the small ones wait behind B, which waits for A.
    let [a, _, c, d] = completions(0).await;
    assert!(c > a && d > a, "a small request passed the waiting one");
    // One pass allowed: C passes B and finishes while A runs; D may not.
    let [a, _, c, d] = completions(1).await;
    assert!(c < a, "C did not pass B");
    assert!(d > a, "D passed B after B's one pass was used");
    // Plenty allowed: both small ones finish while A runs.
    let [a, _, c, d] = completions(16).await;
    assert!(c < a && d < a, "small requests waited behind B");
}

#[tokio::test]
async fn scoring_shares_cached_prompts_and_reports_them() {
    let dir = tiny_model(TinyArch::Qwen2);
    let handle = engine(dir.path(), EngineConfig::default());
    let choices = vec!["1".into(), "2".into(), "10".into()];
    let request = ScoreRequest::new(Prompt::Tokens(prompt(70, 5)), choices);
    let first = handle.score(request.clone()).await.expect("scores");
    let second = handle.score(request).await.expect("scores again");
    assert_eq!(first.usage.cached_prompt_tokens, 0);
    // 70 tokens hold 4 whole blocks of 16; at least the last token is always computed.
    assert_eq!(second.usage.cached_prompt_tokens, 64);
    for (a, b) in first.logprobs.iter().zip(&second.logprobs) {
        assert!(
            (a - b).abs() < 1e-4,
            "cached prompt changed a score: {a} vs {b}"
        );
    }
}

#[test]
fn kv_budgets_parse_and_a_pool_too_small_for_one_window_is_refused() {
    assert_eq!(KvBudget::parse("16384"), Ok(KvBudget::Tokens(16384)));
    assert_eq!(KvBudget::parse("auto"), Ok(KvBudget::Auto));
    assert_eq!(KvBudget::parse("2GiB"), Ok(KvBudget::Bytes(2 << 30)));
    assert_eq!(KvBudget::parse("300MB"), Ok(KvBudget::Bytes(300_000_000)));
    for bad in ["", "lots", "12 parsecs", "-5", "99999999999999999999GiB"] {
        assert!(KvBudget::parse(bad).is_err(), "{bad:?} parsed");
    }
    let dir = tiny_model(TinyArch::Qwen2);
    let too_small = council_inference::Engine::load_dir(
        dir.path(),
        EngineConfig {
            max_seq_len: 256,
            kv_cache: KvBudget::Tokens(100),
            ..EngineConfig::default()
        },
    );
    match too_small {
        Err(LoadError::InvalidConfig { field, reason }) => {
            assert_eq!(field, "kv_cache");
            assert!(reason.contains("256-token window"), "{reason}");
        }
        other => panic!("a 100-token pool for a 256-token window: {other:?}"),
    }
    let bad_budget = council_inference::Engine::load_dir(
        dir.path(),
        EngineConfig {
            max_batch: 16,
            max_step_tokens: 8,
            ..EngineConfig::default()
        },
    );
    assert!(matches!(
        bad_budget,
        Err(LoadError::InvalidConfig {
            field: "max_step_tokens",
            ..
        })
    ));
}

#[tokio::test]
async fn device_argmax_and_host_sampling_pick_the_same_greedy_tokens() {
    let dir = tiny_model(TinyArch::Qwen3);
    let handle = engine(dir.path(), EngineConfig::default());
    let plain = GenerateRequest::tokens(prompt(30, 9), 24);
    // Asking for log-probs sends the row to the host sampler; the plain request takes the
    // device argmax. Together in one batch and apart, they agree.
    let mut with_logprobs = plain.clone();
    with_logprobs.top_logprobs = Some(3);
    let alone = handle.generate(plain.clone()).await.expect("generates");
    let (a, b) = tokio::join!(handle.generate(plain), handle.generate(with_logprobs));
    let (a, b) = (a.expect("generates"), b.expect("generates"));
    assert_eq!(a.token_ids, alone.token_ids);
    assert_eq!(b.token_ids, alone.token_ids);
    let logprobs = b.logprobs.expect("log-probs were asked for");
    assert_eq!(logprobs.len(), b.token_ids.len());
    for (lp, &token) in logprobs.iter().zip(&b.token_ids) {
        assert_eq!(lp.token_id, token);
        assert!(
            lp.top.iter().all(|t| t.logprob <= lp.logprob + 1e-6),
            "greedy token is not the top one"
        );
    }
}

#[tokio::test]
async fn ids_past_the_tokenizers_padding_are_never_sampled() {
    use council_inference::engine::sequence_logits;
    use council_inference::tiny::TinyModelSpec;

    // A vocabulary padded well past the tokenizer's, as real checkpoints pad theirs.
    let dir = council_tests::tiny_model_with(TinyModelSpec {
        padded_vocab: Some(2048),
        ..TinyModelSpec::new(TinyArch::Qwen2)
    });
    let loaded = load_f32(dir.path());
    let bound = loaded.tokenizer.id_bound();
    assert!(bound < 2048, "precondition: the model is padded");
    // Precondition: left alone, the model's greedy choice is a padding id for some prompt.
    let padded_choice = (0..20)
        .map(|salt| prompt(12, salt))
        .find(|p| {
            let logits = sequence_logits(&loaded.model, p).expect("forward");
            let last = logits.last().expect("a row");
            council_inference::engine::sampler::argmax(last) as usize >= bound
        })
        .expect("no prompt makes the padded model prefer a padding id");
    let usable_argmax = {
        let logits = sequence_logits(&loaded.model, &padded_choice).expect("forward");
        council_inference::engine::sampler::argmax(&logits.last().expect("a row")[..bound])
    };
    let handle = engine(dir.path(), EngineConfig::default());
    let greedy = handle
        .generate(GenerateRequest::tokens(padded_choice.clone(), 16))
        .await
        .expect("generates");
    assert_eq!(greedy.token_ids[0], usable_argmax);
    let sampled = handle
        .generate(
            GenerateRequest::tokens(padded_choice, 32)
                .with_sampling(council_inference::Sampling::with_temperature(1.5, 7)),
        )
        .await
        .expect("generates");
    for r in [&greedy, &sampled] {
        assert!(
            r.token_ids.iter().all(|&t| (t as usize) < bound),
            "sampled a padding id: {:?}",
            r.token_ids
        );
    }
}
