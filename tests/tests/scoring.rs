//! Log-prob scoring of candidate continuations on the engine: each choice's log-probability
//! equals the sum computed from full-sequence logits of an independent forward, does not depend
//! on how many choices share a forward or on other work in flight, bad requests are refused,
//! and the councils' log-prob rubric judge works end to end on it.

use council_councils::personas::default_council;
use council_councils::spec::JudgeMode;
use council_councils::{Deliberation, OutcomeStatus, Phase, Role, Task, TaskId};
use council_inference::engine::sequence_logits;
use council_inference::tiny::TinyArch;
use council_inference::{
    Backend, ChatMessage, EngineConfig, GenerateRequest, InferenceError, Prompt, ScoreRequest,
};
use council_tests::{engine, prompt, tiny_model};

/// log softmax(row)[token], in f64.
fn logprob(row: &[f32], token: u32) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
    row[token as usize] as f64 - max - sum.ln()
}

#[tokio::test]
async fn choice_logprobs_match_an_independent_forward() {
    let dir = tiny_model(TinyArch::Qwen2);
    let loaded = council_tests::load_f32(dir.path());
    let choices: Vec<String> = ["7", "10", "the answer", "a"].map(str::to_owned).to_vec();
    let base = prompt(20, 3);
    let wide = engine(dir.path(), EngineConfig::default());
    // Each choice in a request of its own, on an engine that never shares a prompt's KV.
    let narrow = engine(
        dir.path(),
        EngineConfig {
            max_batch: 1,
            prefix_cache: false,
            ..EngineConfig::default()
        },
    );
    let request = ScoreRequest::new(Prompt::Tokens(base.clone()), choices.clone());
    let scored = wide.score(request).await.expect("scores");
    let mut one_by_one = Vec::new();
    for choice in &choices {
        let alone = ScoreRequest::new(Prompt::Tokens(base.clone()), vec![choice.clone()]);
        one_by_one.extend(narrow.score(alone).await.expect("scores").logprobs);
    }
    assert_eq!(scored.logprobs.len(), choices.len());
    // In one request the prompt is prefilled once and shared by every choice; alone, each
    // choice pays for the whole prompt.
    let encoded: Vec<Vec<u32>> = choices
        .iter()
        .map(|c| loaded.tokenizer.encode(c).expect("encodes"))
        .collect();
    let tails: usize = encoded.iter().map(|ids| ids.len() - 1).sum();
    assert_eq!(wide.stats().prompt_tokens as usize, base.len() + tails);
    let whole: usize = encoded.iter().map(|ids| base.len() + ids.len() - 1).sum();
    assert_eq!(narrow.stats().prompt_tokens as usize, whole);
    assert_eq!(scored.usage.prompt_tokens, base.len());
    for (i, choice) in choices.iter().enumerate() {
        let ids = loaded.tokenizer.encode(choice).expect("encodes");
        let mut sequence = base.clone();
        sequence.extend_from_slice(&ids);
        let logits = sequence_logits(&loaded.model, &sequence).expect("forward");
        let expected: f64 = ids
            .iter()
            .enumerate()
            .map(|(j, &t)| logprob(&logits[base.len() + j - 1], t))
            .sum();
        let got = scored.logprobs[i];
        assert!(got < 0.0, "{choice}: {got}");
        assert!(
            (got - expected).abs() < 1e-3,
            "{choice}: {got} vs {expected}"
        );
        assert!(
            (one_by_one[i] - got).abs() < 1e-4,
            "{choice}: batched {got} vs alone {}",
            one_by_one[i]
        );
    }
}

#[tokio::test]
async fn scoring_beside_generation_changes_neither() {
    let dir = tiny_model(TinyArch::Qwen3);
    let handle = engine(dir.path(), EngineConfig::default());
    let chat = vec![
        ChatMessage::system("Judge."),
        ChatMessage::user("Score it from 1 to 10."),
    ];
    let generate = GenerateRequest::chat(chat.clone(), 12);
    let score = ScoreRequest::new(
        Prompt::Chat(chat),
        (1..=10).map(|v| v.to_string()).collect(),
    );
    let alone = handle.generate(generate.clone()).await.expect("generates");
    let scored_alone = handle.score(score.clone()).await.expect("scores");
    let (together, scored) = tokio::join!(handle.generate(generate), handle.score(score));
    assert_eq!(together.expect("generates").token_ids, alone.token_ids);
    let scored = scored.expect("scores");
    for (a, b) in scored.logprobs.iter().zip(&scored_alone.logprobs) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    assert!(scored.logprobs.iter().all(|lp| lp.is_finite() && *lp < 0.0));
}

#[tokio::test]
async fn bad_scoring_requests_are_refused() {
    let dir = tiny_model(TinyArch::Qwen2);
    let handle = engine(
        dir.path(),
        EngineConfig {
            max_seq_len: 32,
            ..EngineConfig::default()
        },
    );
    let tokens = Prompt::Tokens(prompt(8, 1));
    for (request, field) in [
        (ScoreRequest::new(tokens.clone(), vec![]), "choices"),
        (
            ScoreRequest::new(tokens.clone(), vec![String::new()]),
            "choices",
        ),
        (
            ScoreRequest::new(Prompt::Tokens(vec![]), vec!["1".into()]),
            "prompt",
        ),
        (
            ScoreRequest::new(Prompt::Tokens(vec![u32::MAX]), vec!["1".into()]),
            "prompt",
        ),
    ] {
        let err = handle.score(request).await.expect_err(field);
        assert!(
            matches!(&err, InferenceError::InvalidRequest { field: f, .. } if *f == field),
            "{field}: {err}"
        );
    }
    let long = ScoreRequest::new(Prompt::Tokens(prompt(31, 2)), vec!["a long choice".into()]);
    let err = handle.score(long).await.expect_err("too long");
    assert!(matches!(err, InferenceError::PromptTooLong { .. }), "{err}");
}

#[tokio::test]
async fn the_log_prob_judge_scores_proposals_on_the_engine() {
    let dir = tiny_model(TinyArch::Qwen2);
    let handle = engine(dir.path(), EngineConfig::default());
    let mut council = default_council(&Role::Qa).expect("council");
    council.config.judge = JudgeMode::LogProb;
    council.config.max_tokens_per_call = 16;
    council.config.rounds = 0;
    let config = council.config;
    let mut task = Task::new(
        TaskId::new("logprob-judge").expect("id"),
        "Test a login form.",
    )
    .expect("task");
    task.rubric = "coverage; clarity".into();
    let outcome =
        council_runtime::driver::run(&handle, Deliberation::new(council, task, config, 3))
            .await
            .expect("runs");
    assert_eq!(outcome.status, OutcomeStatus::Completed);
    let judged = outcome
        .transcript
        .iter()
        .filter(|c| {
            c.phase == Phase::Score
                && c.messages
                    .iter()
                    .any(|m| m.content.contains("Reply with the number only"))
        })
        .collect::<Vec<_>>();
    // 3 judges × 2 peers × 2 criteria choice calls, every one answered.
    assert_eq!(judged.len(), 12);
    assert!(judged.iter().all(|c| c.reply.is_ok()), "{judged:?}");
    for p in &outcome.proposals {
        let rubric = p
            .scores
            .rubric
            .expect("every proposal has a log-prob rubric score");
        assert!((0.0..=1.0).contains(&rubric), "{rubric}");
    }
}
