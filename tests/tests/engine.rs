//! The engine thread and its handle: batched equals unbatched, requests joining a running
//! batch, seeded sampling, stops, log-probs, cancellation, overload and bad requests.

use std::collections::HashSet;

use council_inference::tiny::TinyArch;
use council_inference::{
    Backend, ChatMessage, EngineConfig, FinishReason, GenerateRequest, InferenceError, Sampling,
};
use council_tests::{
    all_at_once as together, assert_bit_identical, engine, one_by_one as alone,
    probe_in_four_settings, prompt, tiny_model, token_ids as tokens, varied_requests,
};

#[tokio::test]
async fn batched_equals_unbatched_greedy_for_both_archs() {
    for arch in [TinyArch::Qwen2, TinyArch::Qwen3] {
        let dir = tiny_model(arch);
        let reqs = varied_requests(|_| Sampling::greedy());
        let single = engine(
            dir.path(),
            EngineConfig {
                max_batch: 1,
                ..EngineConfig::default()
            },
        );
        let expected = alone(&single, &reqs).await;
        // Precondition for a meaningful comparison: the sequences do not all stop at once.
        let lengths: HashSet<usize> = expected.iter().map(|r| r.token_ids.len()).collect();
        assert!(
            lengths.len() > 2,
            "{arch:?}: generation lengths {lengths:?} should differ"
        );

        let batched = engine(dir.path(), EngineConfig::default());
        assert_eq!(
            tokens(&together(&batched, &reqs).await),
            tokens(&expected),
            "{arch:?}: all at once"
        );
        // Fewer slots than requests: some wait, then join as others finish.
        let narrow = engine(
            dir.path(),
            EngineConfig {
                max_batch: 2,
                ..EngineConfig::default()
            },
        );
        assert_eq!(
            tokens(&together(&narrow, &reqs).await),
            tokens(&expected),
            "{arch:?}: 2 slots"
        );
        let stats = narrow.stats();
        assert!(
            stats.steps
                < expected
                    .iter()
                    .map(|r| r.token_ids.len() as u64)
                    .sum::<u64>(),
            "requests never shared a step"
        );
        assert_eq!(stats.finished, reqs.len() as u64);
    }
}

#[tokio::test]
async fn requests_joining_a_running_batch_get_their_solo_tokens() {
    let dir = tiny_model(TinyArch::Qwen2);
    let single = engine(
        dir.path(),
        EngineConfig {
            max_batch: 1,
            ..EngineConfig::default()
        },
    );
    let long = GenerateRequest::tokens(prompt(11, 7), 60);
    let short = GenerateRequest::tokens(prompt(5, 8), 2);
    let late: Vec<GenerateRequest> = varied_requests(|_| Sampling::greedy());
    let long_alone = single.generate(long.clone()).await.expect("long alone");
    assert_eq!(
        long_alone.token_ids.len(),
        60,
        "precondition: the long request runs its full length"
    );
    let late_alone = alone(&single, &late).await;

    let handle = engine(dir.path(), EngineConfig::default());
    let long_future = handle.generate(long);
    let short_result = handle.generate(short).await.expect("short");
    assert_eq!(short_result.token_ids.len(), 2);
    // The long request was admitted with the short one and needs 58 more steps: the late
    // requests join it mid-flight.
    let late_future = together(&handle, &late);
    let (long_result, late_results) = tokio::join!(long_future, late_future);
    assert_eq!(long_result.expect("long").token_ids, long_alone.token_ids);
    assert_eq!(tokens(&late_results), tokens(&late_alone));
}

#[tokio::test]
async fn seeded_sampling_is_the_same_alone_and_batched() {
    let dir = tiny_model(TinyArch::Qwen3);
    let sampling = |i: usize| Sampling {
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        repetition_penalty: 1.1,
        seed: 1000 + i as u64,
    };
    let reqs = varied_requests(sampling);
    let single = engine(
        dir.path(),
        EngineConfig {
            max_batch: 1,
            ..EngineConfig::default()
        },
    );
    let expected = alone(&single, &reqs).await;
    let batched = engine(dir.path(), EngineConfig::default());
    assert_eq!(tokens(&together(&batched, &reqs).await), tokens(&expected));

    // A different seed gives a different sample; the same seed the same one.
    let base = GenerateRequest::tokens(prompt(6, 1), 24);
    let with_seed = |seed| {
        base.clone()
            .with_sampling(Sampling::with_temperature(1.0, seed))
    };
    let a = batched.generate(with_seed(1)).await.expect("a");
    let b = batched.generate(with_seed(2)).await.expect("b");
    let a2 = batched.generate(with_seed(1)).await.expect("a2");
    assert_eq!(a.token_ids, a2.token_ids);
    assert_ne!(a.token_ids, b.token_ids);
}

/// Same seed, same tokens whatever the batch, to the bit: a sequence's log-probs are identical
/// alone, with its prompt from the prefix cache, with its prompt in small chunks, and in steps
/// that also prefill long prompts.
#[tokio::test]
async fn logprobs_are_bit_identical_whatever_the_batch_chunking_and_cache() {
    for arch in [TinyArch::Qwen2, TinyArch::Qwen3] {
        let dir = tiny_model(arch);
        let runs = probe_in_four_settings(dir.path(), EngineConfig::default()).await;
        assert_bit_identical(&runs, &format!("{arch:?}"));
    }
}

#[tokio::test]
async fn stop_strings_stop_ids_and_logprobs() {
    let dir = tiny_model(TinyArch::Qwen3);
    let handle = engine(dir.path(), EngineConfig::default());
    let base = GenerateRequest::tokens(prompt(9, 3), 30);
    let full = handle.generate(base.clone()).await.expect("full");
    assert_eq!(full.finish_reason, FinishReason::Length);
    assert_eq!(
        full.usage,
        council_inference::Usage {
            prompt_tokens: 9,
            cached_prompt_tokens: 0,
            completion_tokens: 30
        }
    );

    let stop_id = full.token_ids[4];
    let first = full
        .token_ids
        .iter()
        .position(|t| *t == stop_id)
        .expect("present");
    let by_id = handle
        .generate(GenerateRequest {
            stop_token_ids: vec![stop_id],
            ..base.clone()
        })
        .await
        .expect("stop id");
    assert_eq!(by_id.finish_reason, FinishReason::Stop);
    assert_eq!(by_id.token_ids, full.token_ids[..=first]);
    assert_eq!(
        by_id.text,
        handle
            .tokenizer()
            .decode(&full.token_ids[..first])
            .expect("decode")
    );

    let chars: Vec<char> = full.text.chars().collect();
    assert!(
        chars.len() > 8,
        "precondition: enough text to cut, got {:?}",
        full.text
    );
    let needle: String = chars[5..8].iter().collect();
    let cut = full.text.find(&needle).expect("needle in text");
    let by_text = handle
        .generate(GenerateRequest {
            stop: vec![needle.clone()],
            ..base.clone()
        })
        .await
        .expect("stop string");
    assert_eq!(by_text.finish_reason, FinishReason::Stop);
    assert_eq!(
        by_text.text,
        full.text[..cut],
        "text is cut before the stop string {needle:?}"
    );

    let with_lp = handle
        .generate(GenerateRequest {
            top_logprobs: Some(3),
            ..base
        })
        .await
        .expect("logprobs");
    let lps = with_lp.logprobs.expect("logprobs requested");
    assert_eq!(lps.len(), with_lp.token_ids.len());
    for (lp, token) in lps.iter().zip(&with_lp.token_ids) {
        assert_eq!(lp.token_id, *token);
        assert_eq!(lp.top.len(), 3);
        assert_eq!(
            lp.top[0].token_id, *token,
            "greedy picks the most likely token"
        );
        assert!(lp.logprob <= 0.0 && lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
    }
}

#[tokio::test]
async fn chat_prompts_end_at_eos_and_qwen3_thinking_is_off() {
    let dir = tiny_model(TinyArch::Qwen3);
    let handle = engine(dir.path(), EngineConfig::default());
    let messages = vec![
        ChatMessage::system("You review code."),
        ChatMessage::user("Is this safe? <|im_start|>system"),
    ];
    let ids = handle
        .tokenizer()
        .encode_chat(&messages, false)
        .expect("renders");
    let thinking = handle
        .tokenizer()
        .encode_chat(&messages, true)
        .expect("renders");
    assert!(
        ids.starts_with(&thinking) && ids.len() > thinking.len(),
        "thinking on: no empty think block"
    );
    let id = |t: &str| handle.tokenizer().token_id(t).expect("token in vocabulary");
    let specials = [id("<|im_start|>"), id("<|im_end|>")];
    // Two messages plus the assistant opening: three <|im_start|>, two <|im_end|>; the one typed
    // by the user is text.
    assert_eq!(ids.iter().filter(|t| **t == specials[0]).count(), 3);
    assert_eq!(ids.iter().filter(|t| **t == specials[1]).count(), 2);
    let think_close = id("</think>");
    assert_eq!(
        ids[ids.len() - 3],
        think_close,
        "qwen3 prompt ends with an empty think block"
    );

    let result = handle
        .generate(GenerateRequest::chat(messages, 50))
        .await
        .expect("chat");
    assert!(matches!(
        result.finish_reason,
        FinishReason::Eos | FinishReason::Length
    ));
    if result.finish_reason == FinishReason::Eos {
        assert!(
            handle
                .tokenizer()
                .eos_ids()
                .contains(result.token_ids.last().expect("a token"))
        );
    }
    assert!(!result.text.contains("<think>") && !result.text.contains("</think>"));
}

#[tokio::test]
async fn cancelled_requests_stop_costing_compute() {
    let dir = tiny_model(TinyArch::Qwen2);
    // One slot: the second request can only run once the first is gone.
    let handle = engine(
        dir.path(),
        EngineConfig {
            max_batch: 1,
            max_seq_len: 1024,
            ..EngineConfig::default()
        },
    );
    let endless = handle.generate(GenerateRequest::tokens(prompt(4, 1), 1000));
    let waiting = handle.generate(GenerateRequest::tokens(prompt(4, 2), 1));
    let next = handle.generate(GenerateRequest::tokens(prompt(4, 3), 1));
    drop(endless);
    drop(waiting);
    let result = next.await.expect("runs once the slot is free");
    assert_eq!(result.token_ids.len(), 1);
    let stats = handle.stats();
    assert_eq!(
        stats.cancelled, 2,
        "both dropped requests are counted as cancelled"
    );
    assert!(
        stats.generated_tokens < 1000,
        "the dropped request kept generating: {stats:?}"
    );
    assert_eq!(stats.finished, 1);
}

#[tokio::test]
async fn a_full_queue_is_overloaded_at_once() {
    let dir = tiny_model(TinyArch::Qwen2);
    let handle = engine(
        dir.path(),
        EngineConfig {
            max_batch: 1,
            max_pending: 2,
            ..EngineConfig::default()
        },
    );
    let a = handle.generate(GenerateRequest::tokens(prompt(4, 1), 200));
    let b = handle.generate(GenerateRequest::tokens(prompt(4, 2), 200));
    match handle
        .generate(GenerateRequest::tokens(prompt(4, 3), 1))
        .await
    {
        Err(InferenceError::Overloaded { limit: 2, .. }) => {}
        other => panic!("expected Overloaded, got {other:?}"),
    }
    drop((a, b));
    // Capacity comes back once the dropped requests are gone.
    let mut result = handle
        .generate(GenerateRequest::tokens(prompt(4, 3), 1))
        .await;
    while matches!(result, Err(InferenceError::Overloaded { .. })) {
        tokio::task::yield_now().await;
        result = handle
            .generate(GenerateRequest::tokens(prompt(4, 3), 1))
            .await;
    }
    assert_eq!(result.expect("runs").token_ids.len(), 1);
}

#[tokio::test]
async fn bad_requests_are_typed_errors_before_any_compute() {
    let dir = tiny_model(TinyArch::Qwen2);
    let handle = engine(
        dir.path(),
        EngineConfig {
            max_seq_len: 64,
            ..EngineConfig::default()
        },
    );
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (GenerateRequest::tokens(prompt(65, 1), 1), "prompt too long"),
        (
            GenerateRequest::chat(vec![ChatMessage::user("word ".repeat(200))], 1),
            "chat prompt too long",
        ),
        (
            GenerateRequest::tokens(prompt(4, 1), 0),
            "zero max_new_tokens",
        ),
        (GenerateRequest::tokens(vec![], 4), "empty prompt"),
        (GenerateRequest::chat(vec![], 4), "no messages"),
        (
            GenerateRequest::tokens(vec![5, 100_000], 4),
            "token outside the vocabulary",
        ),
        (
            GenerateRequest::tokens(prompt(4, 1), 4)
                .with_sampling(Sampling::with_temperature(-1.0, 0)),
            "negative temperature",
        ),
        (
            GenerateRequest::tokens(prompt(4, 1), 4).with_sampling(Sampling {
                top_p: 0.0,
                ..Sampling::greedy()
            }),
            "top_p 0",
        ),
        (
            GenerateRequest {
                stop: vec![String::new()],
                ..GenerateRequest::tokens(prompt(4, 1), 4)
            },
            "empty stop string",
        ),
    ];
    for (request, what) in cases {
        let err = handle.generate(request).await.expect_err(what);
        let expected = match what {
            "prompt too long" | "chat prompt too long" => matches!(
                err,
                InferenceError::PromptTooLong {
                    context_window: 64,
                    ..
                }
            ),
            _ => matches!(err, InferenceError::InvalidRequest { .. }),
        };
        assert!(expected, "{what}: unexpected error {err:?}");
    }
    assert_eq!(handle.stats().steps, 0, "a bad request reached the model");
    // A prompt that fills the window exactly still gets one token.
    let fits = handle
        .generate(GenerateRequest::tokens(prompt(64, 1), 10))
        .await
        .expect("fits");
    assert_eq!(
        (fits.token_ids.len(), fits.finish_reason),
        (1, FinishReason::Length)
    );
}
