//! The non-LLM hot path of one deliberation (3 agents, 2 rounds): building every prompt,
//! parsing every reply and aggregating the scores, with scripted replies and no model.

use council_councils::personas::council_of;
use council_councils::spec::DeliberationConfig;
use council_councils::{Completion, Deliberation, LlmCall, Phase, Reply, Role, Step, Task, TaskId};
use criterion::{Criterion, criterion_group, criterion_main};

fn labels(call: &LlmCall) -> Vec<String> {
    call.messages
        .iter()
        .flat_map(|m| m.content.lines())
        .filter_map(|l| l.strip_prefix("«PEER TEXT» Proposal "))
        .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
        .collect()
}

/// A realistic reply of a few hundred words per call.
fn reply(call: &LlmCall) -> Reply {
    let body = "Use exponential backoff with full jitter, cap the delay at 60 s, and stop after 8 attempts. ".repeat(12);
    let text = match call.phase {
        Phase::Propose | Phase::Revise => format!("{body}\nANSWER: 8"),
        Phase::Critique => labels(call)
            .iter()
            .map(|l| format!("Proposal {l}:\n{body}\n"))
            .collect(),
        Phase::Score => {
            let ls = labels(call);
            let mut out: String = ls
                .iter()
                .map(|l| format!("Proposal {l}:\ncorrectness: 7\nclarity: 6\n"))
                .collect();
            out.push_str("FINAL RANKING: ");
            out.push_str(
                &ls.iter()
                    .map(|l| format!("Proposal {l}"))
                    .collect::<Vec<_>>()
                    .join(" > "),
            );
            out
        }
    };
    Reply {
        call: call.id,
        result: Ok(Completion {
            text,
            prompt_tokens: 500,
            completion_tokens: 300,
            choice_logprobs: None,
        }),
    }
}

fn one_deliberation() -> usize {
    let config = DeliberationConfig {
        rounds: 2,
        early_stop: false,
        ..Default::default()
    };
    let mut council = council_of(&Role::Dev, 3).expect("council");
    council.config = config;
    let mut task = Task::new(
        TaskId::new("bench").expect("id"),
        "Design a retry policy for a flaky job queue.",
    )
    .expect("task");
    task.rubric = "correctness\nclarity".into();
    let mut d = Deliberation::new(council, task, config, 1);
    let mut replies = Vec::new();
    loop {
        match d.step(replies).expect("protocol") {
            Step::Done(outcome) => return outcome.proposals.len(),
            Step::Calls(calls) => replies = calls.iter().map(reply).collect(),
        }
    }
}

fn deliberation_benches(c: &mut Criterion) {
    assert_eq!(one_deliberation(), 3);
    c.bench_function("deliberation_3_agents_2_rounds_no_llm", |b| {
        b.iter(one_deliberation)
    });
}

criterion_group!(benches, deliberation_benches);
criterion_main!(benches);
