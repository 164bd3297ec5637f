//! Deliberations driven on the real engine: many at once batch together in the engine and end
//! exactly as they do alone.

use council_councils::personas::council_of;
use council_councils::spec::{DeliberationConfig, JudgeMode};
use council_councils::{Deliberation, Outcome, OutcomeStatus, Role, Task, TaskId};
use council_inference::EngineConfig;
use council_inference::tiny::TinyArch;
use council_runtime::driver;
use council_tests::{engine, tiny_model};

fn deliberation(role: Role, seed: u64) -> Deliberation {
    let config = DeliberationConfig {
        rounds: 1,
        max_tokens_per_call: 24,
        early_stop: false,
        ..Default::default()
    };
    let mut council = council_of(&role, 3).expect("council");
    council.config = config;
    let task = Task::new(
        TaskId::new(format!("t-{seed}")).expect("id"),
        "Name one risk of retrying forever.",
    )
    .expect("task");
    Deliberation::new(council, task, config, seed)
}

fn cases() -> Vec<(Role, u64)> {
    vec![(Role::Dev, 1), (Role::Qa, 2), (Role::Architect, 3)]
}

#[tokio::test]
async fn concurrent_deliberations_batch_and_match_their_solo_runs() {
    let dir = tiny_model(TinyArch::Qwen3);
    let solo_engine = engine(dir.path(), EngineConfig::default());
    let mut solo: Vec<Outcome> = Vec::new();
    for (role, seed) in cases() {
        solo.push(
            driver::run(&solo_engine, deliberation(role, seed))
                .await
                .expect("runs"),
        );
    }
    let solo_steps = solo_engine.stats().steps;

    let shared = engine(dir.path(), EngineConfig::default());
    let runs: Vec<_> = cases()
        .into_iter()
        .map(|(role, seed)| driver::run(&shared, deliberation(role, seed)))
        .collect();
    let (a, b, c) = {
        let mut it = runs.into_iter();
        let (Some(a), Some(b), Some(c)) = (it.next(), it.next(), it.next()) else {
            panic!("three runs")
        };
        tokio::join!(a, b, c)
    };
    let together = vec![a.expect("a"), b.expect("b"), c.expect("c")];
    assert_eq!(
        together, solo,
        "a deliberation's outcome depends on what ran beside it"
    );
    for o in &together {
        assert_eq!(o.status, OutcomeStatus::Completed);
        assert!(o.usage.calls >= 9 && o.usage.prompt_tokens > 0);
    }
    let stats = shared.stats();
    assert!(
        stats.steps < solo_steps,
        "concurrent deliberations did not share forward passes ({} steps vs {} alone)",
        stats.steps,
        solo_steps
    );
}

#[tokio::test]
async fn dropping_a_deliberation_cancels_its_requests() {
    let dir = tiny_model(TinyArch::Qwen2);
    let handle = engine(
        dir.path(),
        EngineConfig {
            max_batch: 1,
            ..EngineConfig::default()
        },
    );
    let config = DeliberationConfig {
        rounds: 1,
        max_tokens_per_call: 900,
        ..Default::default()
    };
    let mut council = council_of(&Role::Dev, 3).expect("council");
    council.config = config;
    let task = Task::new(TaskId::new("drop").expect("id"), "Write at length.").expect("task");
    let mut run = Box::pin(driver::run(
        &handle,
        Deliberation::new(council, task, config, 1),
    ));
    // Poll the driver exactly once (it submits the propose phase), then drop it.
    tokio::select! {
        biased;
        _ = &mut run => panic!("a deliberation finished in one poll"),
        () = std::future::ready(()) => {}
    }
    drop(run);
    let probe = council_inference::Backend::generate(
        &handle,
        council_inference::GenerateRequest::tokens(vec![5, 6, 7], 1),
    );
    probe.await.expect("the engine is free again");
    let stats = handle.stats();
    assert!(stats.cancelled >= 1, "{stats:?}");
    assert!(
        stats.generated_tokens < 900,
        "abandoned requests kept generating: {stats:?}"
    );
}

/// A phase larger than the engine's queue (a council of 6 with log-prob judging issues
/// 6 × 5 × criteria choice calls; the queue holds 4): refused calls wait for room and go
/// again, so nothing fails and no judgement is dropped, and the outcome is the one an engine
/// with room to spare gives. (Before: admission refused every call past the queue at once,
/// and the council lost agents and votes.)
#[tokio::test]
async fn a_phase_larger_than_the_engine_queue_waits_for_room() {
    let dir = tiny_model(TinyArch::Qwen3);
    let config = DeliberationConfig {
        rounds: 1,
        max_tokens_per_call: 24,
        early_stop: false,
        judge: JudgeMode::LogProb,
        ..Default::default()
    };
    let run = |max_pending| {
        let handle = engine(
            dir.path(),
            EngineConfig {
                max_pending,
                ..EngineConfig::default()
            },
        );
        let mut council = council_of(&Role::Dev, 6).expect("council");
        council.config = config;
        let task =
            Task::new(TaskId::new("big-phase").expect("id"), "Name one risk.").expect("task");
        async move {
            driver::run(&handle, Deliberation::new(council, task, config, 7))
                .await
                .expect("runs")
        }
    };
    let small = run(4).await;
    // The random model may reply with nothing (an agent fails for that), but no call fails.
    assert!(
        small.failed_agents.iter().all(|f| !f.backend),
        "{:#?}",
        small.failed_agents
    );
    assert_eq!(small.usage.failed_calls, 0, "{:?}", small.failed_agents);
    assert_eq!(small.usage.failed_judgements, 0);
    assert!(small.usage.calls > 4 * 4, "{} calls", small.usage.calls);
    assert_eq!(small, run(1024).await, "waiting changed the outcome");
}
