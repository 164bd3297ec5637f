//! The vLLM backend against a test-only OpenAI-compatible server that misbehaves on demand
//! (`council_tests::openai_double`): the well-behaved path with usage, auth and thinking; the
//! start-up model check; every fault mode with its error or retry, no leaked call slots and
//! bounded time; the circuit breaker; several endpoints; cancellation; a council deliberation
//! and `council eval` end to end over the backend. Then the same backend against a stand-in of
//! llama.cpp's `llama-server` (`council_tests::llama_double`): what start-up detects, choice
//! scoring from next-token log-probs, constraints in its grammar form, and the refusal (and
//! the CLI's text judging) where a server has no scoring form at all.

use std::time::{Duration, Instant};

use council_councils::personas::default_council;
use council_councils::{Deliberation, OutcomeStatus, Role, Task, TaskId};
use council_inference::vllm::policy::{BreakerPolicy, RetryPolicy};
use council_inference::{
    ApiKey, Backend, ChatMessage, GenerateRequest, Health, InferenceError, VllmBackend, VllmConfig,
    VllmError,
};
use council_tests::openai_double::{Fault, OpenAiDouble};

const MODEL: &str = "Qwen/Qwen2.5-0.5B-Instruct";

/// Short timeouts and retries so fault tests end quickly.
fn config(urls: &[String]) -> VllmConfig {
    let mut config = VllmConfig::new(urls.to_vec(), MODEL);
    config.first_token_timeout = Duration::from_millis(500);
    config.idle_timeout = Duration::from_millis(500);
    config.request_timeout = Duration::from_secs(20);
    config.retry = RetryPolicy {
        max_retries: 3,
        base_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        max_retry_after: Duration::from_secs(5),
    };
    config
}

async fn backend(double: &OpenAiDouble) -> VllmBackend {
    VllmBackend::connect(config(&[double.url()]))
        .await
        .expect("connects")
}

fn ask(text: &str) -> GenerateRequest {
    GenerateRequest::chat(
        vec![ChatMessage::system("be brief"), ChatMessage::user(text)],
        32,
    )
}

/// Waits (bounded) until the double has no request in flight.
async fn settles(double: &OpenAiDouble) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while double.in_flight() > 0 {
        assert!(
            Instant::now() < deadline,
            "the server still holds a request"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn well_behaved_calls_carry_usage_auth_and_no_thinking() {
    let double = OpenAiDouble::start(&[MODEL, "other"]).await;
    let mut config = config(&[double.url()]);
    config.api_key = Some(ApiKey::new("sk-test-key"));
    assert!(!format!("{config:?}").contains("sk-test-key"));
    let backend = VllmBackend::connect(config).await.expect("connects");
    assert_eq!(backend.health(), Health::Ready);

    let result = backend
        .generate(ask("What is 6 * 7?"))
        .await
        .expect("answer");
    assert!(
        result.text.starts_with("Reply to: What is 6 * 7?"),
        "{}",
        result.text
    );
    assert!(result.text.ends_with("ANSWER: 42"));
    assert!(result.usage.prompt_tokens > 0);
    assert_eq!(
        result.usage.cached_prompt_tokens,
        result.usage.prompt_tokens / 2
    );
    assert_eq!(
        result.usage.completion_tokens,
        result.text.split_whitespace().count()
    );
    let body = double.bodies().last().cloned().expect("a body");
    assert_eq!(body["model"], MODEL);
    assert_eq!(body["stream"], true);
    assert_eq!(body["chat_template_kwargs"]["enable_thinking"], false);
    let headers = double.headers().last().cloned().expect("headers");
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "authorization" && v == "Bearer sk-test-key"),
        "{headers:?}"
    );

    // A thinking reply is stripped of its think block.
    let mut thinking = ask("think first");
    thinking.enable_thinking = true;
    let result = backend.generate(thinking).await.expect("answer");
    assert!(
        result.text.starts_with("Reply to: think first"),
        "{}",
        result.text
    );
    assert_eq!(backend.in_flight(), 0);
}

#[tokio::test]
async fn start_up_checks_the_model_list() {
    let double = OpenAiDouble::start(&["some/other-model", "third"]).await;
    let err = VllmBackend::connect(config(&[double.url()]))
        .await
        .expect_err("model not served");
    assert!(matches!(err, VllmError::ModelNotServed { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&double.url()) && text.contains("some/other-model"),
        "{text}"
    );

    let err = VllmBackend::connect(config(&["http://127.0.0.1:9".to_owned()]))
        .await
        .expect_err("nothing listens there");
    assert!(
        matches!(err, VllmError::Unreachable { .. }) && err.to_string().contains("127.0.0.1:9"),
        "{err}"
    );
    let err = VllmBackend::connect(config(&["ftp://h".to_owned()]))
        .await
        .expect_err("bad URL");
    assert!(err.to_string().contains("endpoints"), "{err}");
}

#[tokio::test]
async fn server_errors_fail_at_once_with_the_message() {
    let double = OpenAiDouble::start(&[MODEL]).await;
    let backend = backend(&double).await;
    double.push_faults([Fault::Status500]);
    let err = backend.generate(ask("x")).await.expect_err("500");
    assert!(
        matches!(err, InferenceError::Upstream { status: 500, .. })
            && err.to_string().contains("boom"),
        "{err}"
    );
    assert_eq!(double.requests(), 1, "a 500 is not retried");
    double.push_faults([Fault::BadRequest400]);
    let err = backend.generate(ask("x")).await.expect_err("400");
    assert!(err.to_string().contains("max_tokens is too large"), "{err}");
    assert_eq!(double.requests(), 2, "a 400 is not retried");
    double.push_faults([Fault::MalformedJson]);
    let err = backend.generate(ask("x")).await.expect_err("bad JSON");
    assert!(matches!(err, InferenceError::Protocol { .. }), "{err}");
    assert_eq!(backend.in_flight(), 0);
    // And the next call is fine.
    backend.generate(ask("x")).await.expect("recovered");
}

#[tokio::test]
async fn overload_is_retried_honouring_retry_after() {
    let double = OpenAiDouble::start(&[MODEL]).await;
    let backend = backend(&double).await;
    double.push_faults([Fault::TooManyRequests {
        retry_after_secs: 1,
    }]);
    let started = Instant::now();
    backend.generate(ask("x")).await.expect("retried");
    assert_eq!(double.requests(), 2);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was honoured"
    );

    double.push_faults([Fault::Unavailable503, Fault::Unavailable503]);
    backend.generate(ask("x")).await.expect("retried twice");
    assert_eq!(double.requests(), 5);

    // Asking for longer than we wait fails at once with the server's answer.
    double.push_faults([Fault::TooManyRequests {
        retry_after_secs: 60,
    }]);
    let err = backend
        .generate(ask("x"))
        .await
        .expect_err("too long a wait");
    assert!(
        matches!(err, InferenceError::Upstream { status: 429, .. }),
        "{err}"
    );
    assert_eq!(double.requests(), 6);

    // Retries are bounded: 1 + max_retries attempts.
    double.set_fault_always(Some(Fault::Unavailable503));
    let err = backend.generate(ask("x")).await.expect_err("always 503");
    assert!(
        matches!(err, InferenceError::Upstream { status: 503, .. }),
        "{err}"
    );
    assert_eq!(double.requests(), 10);
    assert_eq!(backend.in_flight(), 0);
}

#[tokio::test]
async fn hangs_and_stalls_time_out_and_free_their_slots() {
    let double = OpenAiDouble::start(&[MODEL]).await;
    let backend = backend(&double).await;
    double.push_faults([Fault::Hang]);
    let err = backend.generate(ask("x")).await.expect_err("hangs");
    assert!(
        matches!(&err, InferenceError::Timeout { what, .. } if what.contains("first token")),
        "{err}"
    );
    double.push_faults([Fault::StallMidStream { after_chunks: 2 }]);
    let err = backend.generate(ask("x")).await.expect_err("stalls");
    assert!(
        matches!(&err, InferenceError::Timeout { what, .. } if what.contains("idle")),
        "{err}"
    );
    assert_eq!(backend.in_flight(), 0);
    settles(&double).await;
}

#[tokio::test]
async fn the_breaker_stops_calls_to_a_failing_endpoint() {
    let sick = OpenAiDouble::start(&[MODEL]).await;
    let well = OpenAiDouble::start(&[MODEL]).await;
    let mut config = config(&[sick.url(), well.url()]);
    config.breaker = BreakerPolicy {
        failures: 2,
        open_for: Duration::from_secs(60),
    };
    let backend = VllmBackend::connect(config).await.expect("connects");
    sick.set_fault_always(Some(Fault::Status500));
    let mut failed = 0;
    for _ in 0..12 {
        if backend.generate(ask("x")).await.is_err() {
            failed += 1;
        }
    }
    assert_eq!(failed, 2, "two failures open the sick endpoint's breaker");
    assert_eq!(sick.requests(), 2, "then it gets no more work");
    assert_eq!(well.requests(), 10);
    assert_eq!(
        backend.health(),
        Health::Ready,
        "one endpoint is still healthy"
    );

    // With the only endpoint open, calls fail fast without reaching it.
    let lone = OpenAiDouble::start(&[MODEL]).await;
    let mut config = self::config(&[lone.url()]);
    config.breaker = BreakerPolicy {
        failures: 1,
        open_for: Duration::from_secs(60),
    };
    let backend = VllmBackend::connect(config).await.expect("connects");
    lone.push_faults([Fault::Status500]);
    backend.generate(ask("x")).await.expect_err("500");
    let err = backend.generate(ask("x")).await.expect_err("breaker open");
    assert!(matches!(err, InferenceError::Unavailable { .. }), "{err}");
    assert_eq!(lone.requests(), 1);
    assert!(matches!(backend.health(), Health::Unavailable { .. }));
}

#[tokio::test]
async fn calls_spread_over_healthy_endpoints_and_in_flight_is_bounded() {
    let a = OpenAiDouble::start(&[MODEL]).await;
    let b = OpenAiDouble::start(&[MODEL]).await;
    let backend = VllmBackend::connect(config(&[a.url(), b.url()]))
        .await
        .expect("connects");
    for _ in 0..10 {
        backend.generate(ask("x")).await.expect("answer");
    }
    assert!(
        a.requests() >= 3 && b.requests() >= 3,
        "{} / {}",
        a.requests(),
        b.requests()
    );

    let one = OpenAiDouble::start(&[MODEL]).await;
    let mut config = config(&[one.url()]);
    config.max_in_flight = 2;
    config.first_token_timeout = Duration::from_secs(30);
    let backend = VllmBackend::connect(config).await.expect("connects");
    one.set_fault_always(Some(Fault::Hang));
    let calls: Vec<_> = (0..5).map(|_| backend.generate(ask("x"))).collect();
    let handles: Vec<_> = calls.into_iter().map(tokio::spawn).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while one.in_flight() < 2 {
        assert!(Instant::now() < deadline, "calls never reached the server");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        one.max_in_flight(),
        2,
        "never more than max_in_flight at once"
    );
    assert_eq!(backend.in_flight(), 2);
    // Dropping the callers cancels the calls: the HTTP requests are aborted, the slots freed.
    for h in &handles {
        h.abort();
    }
    for h in handles {
        let _ = h.await;
    }
    assert_eq!(backend.in_flight(), 0);
    settles(&one).await;
}

#[tokio::test]
async fn a_council_deliberates_over_the_backend() {
    let double = OpenAiDouble::start(&[MODEL]).await;
    let backend = backend(&double).await;
    let council = default_council(&Role::Dev).expect("council");
    let config = council.config;
    let task = Task::new(
        TaskId::new("vllm-e2e").expect("id"),
        "Propose a retry policy.",
    )
    .expect("task");
    let deliberation = Deliberation::new(council, task, config, 5);
    let outcome = council_runtime::driver::run(&backend, deliberation)
        .await
        .expect("runs");
    assert_eq!(outcome.status, OutcomeStatus::Completed);
    assert_eq!(outcome.proposals.len(), 3);
    assert!(outcome.transcript.iter().all(|c| c.reply.is_ok()));
    assert_eq!(outcome.usage.failed_calls, 0);
    assert!(
        outcome
            .proposals
            .iter()
            .all(|p| p.scores.peer_ranking.is_some()),
        "the judges' rankings were read"
    );
    assert_eq!(double.requests() as u64, outcome.usage.calls);
    assert_eq!(backend.in_flight(), 0);
}

/// Runs the `council` command line in-process (it blocks on its own runtime).
async fn council(args: Vec<String>) -> anyhow::Result<()> {
    use clap::Parser;
    let cli = council_runtime::cli::Cli::try_parse_from(args)?;
    tokio::task::spawn_blocking(move || council_runtime::cli::run(cli)).await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_runs_over_the_backend_and_bad_settings_are_named() {
    let double = OpenAiDouble::start(&[MODEL]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("run");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "council",
            "eval",
            "--model",
            MODEL,
            "--suite",
            "arithmetic",
            "--limit",
            "2",
            "--rounds",
            "1",
            "--out",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.push(out.display().to_string());
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    council(args(&["--vllm-url", &double.url()]))
        .await
        .expect("eval over vLLM");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary"))
            .expect("JSON");
    assert_eq!(summary["run"]["backend"], "vllm");
    assert_eq!(summary["run"]["complete"], true);
    let results = std::fs::read_to_string(out.join("results.jsonl")).expect("results");
    let lines: Vec<serde_json::Value> = results
        .lines()
        .map(|l| serde_json::from_str(l).expect("line"))
        .collect();
    assert_eq!(lines.len(), 8, "2 items × 4 arms");
    for line in &lines {
        assert_eq!(line["status"]["state"], "ok", "{line}");
        assert_eq!(line["answer"], "42", "the double always answers 42: {line}");
        assert!(line["cached_prompt_tokens"].as_u64().is_some_and(|c| c > 0));
    }

    let err = council(args(&["--vllm-url", "ftp://nowhere", "--resume"]))
        .await
        .expect_err("bad URL");
    assert!(format!("{err:#}").contains("endpoints"), "{err:#}");
    let err = council(args(&[
        "--vllm-url",
        &double.url(),
        "--vllm-api-key-file",
        "/nonexistent/key",
        "--resume",
    ]))
    .await
    .expect_err("missing key file");
    assert!(
        format!("{err:#}").contains("--vllm-api-key-file"),
        "{err:#}"
    );
}

#[tokio::test]
async fn structured_output_is_sent_and_a_reply_that_ignores_it_is_an_error() {
    use council_inference::Constraint;
    let double = OpenAiDouble::start(&[MODEL]).await;
    let backend = backend(&double).await;
    let choice = |reply: &str| {
        double.set_reply(Some(reply.to_owned()));
        let mut request = ask("accept or reject?");
        request.constraint = Some(Constraint::Choice(vec!["accept".into(), "reject".into()]));
        backend.generate(request)
    };
    let ok = choice("accept").await.expect("honoured");
    assert_eq!(ok.text, "accept");
    let body = double.bodies().last().cloned().expect("body");
    assert_eq!(
        body["structured_outputs"],
        serde_json::json!({ "choice": ["accept", "reject"] })
    );
    assert!(
        body.get("guided_choice").is_none(),
        "never the ignored legacy keys"
    );
    let err = choice("maybe").await.expect_err("not honoured");
    assert!(
        matches!(&err, InferenceError::ConstraintViolated { reason, .. } if reason.contains("maybe")),
        "{err}"
    );
    let before = double.requests();

    let schema = serde_json::json!({
        "type": "object",
        "properties": { "score": { "type": "integer" } },
        "required": ["score"]
    });
    let json = |reply: &str| {
        double.set_reply(Some(reply.to_owned()));
        let mut request = ask("score it");
        request.constraint = Some(Constraint::JsonSchema(schema.clone()));
        backend.generate(request)
    };
    json("{\"score\": 7}").await.expect("valid JSON");
    let err = json("{\"grade\": 7}").await.expect_err("missing field");
    assert!(err.to_string().contains("score"), "{err}");
    assert_eq!(
        double.requests(),
        before + 2,
        "a violated constraint is not retried"
    );
    assert_eq!(backend.in_flight(), 0);

    // A bad constraint is refused before any request; the engine refuses constraints outright.
    let mut bad = ask("x");
    bad.constraint = Some(Constraint::Regex("(".into()));
    let err = backend.generate(bad.clone()).await.expect_err("bad regex");
    assert!(matches!(
        err,
        InferenceError::InvalidRequest {
            field: "constraint",
            ..
        }
    ));
    assert_eq!(double.requests(), before + 2);
    let model = council_tests::tiny_model(council_inference::tiny::TinyArch::Qwen2);
    let engine = council_tests::engine(model.path(), council_inference::EngineConfig::default());
    let mut constrained = ask("x");
    constrained.constraint = Some(Constraint::Choice(vec!["a".into()]));
    let err = engine
        .generate(constrained)
        .await
        .expect_err("engine refuses");
    assert!(
        matches!(&err, InferenceError::InvalidRequest { field: "constraint", reason } if reason.contains("vLLM")),
        "{err}"
    );
}

#[tokio::test]
async fn choices_are_scored_from_prompt_logprobs_and_the_log_prob_judge_works() {
    use council_councils::spec::JudgeMode;
    use council_inference::{Prompt, ScoreRequest};
    use council_tests::openai_double::double_tokens;
    let double = OpenAiDouble::start(&[MODEL]).await;
    let backend = backend(&double).await;
    let chat = vec![
        ChatMessage::system("Judge."),
        ChatMessage::user("Score it."),
    ];
    let scored = backend
        .score(ScoreRequest::new(
            Prompt::Chat(chat.clone()),
            vec!["7".into(), "10".into()],
        ))
        .await
        .expect("scores");
    // The double's log-prob at position p is -0.1 (p mod 7 + 1); its tokenizer is one token
    // per character, so the choices start right after the rendered prompt.
    let rendered = serde_json::json!({
        "messages": chat.iter().map(|m| serde_json::json!({"role": m.role.as_str(), "content": m.content})).collect::<Vec<_>>(),
        "add_generation_prompt": true,
    });
    let start = double_tokens(&rendered).len();
    let at = |p: usize| -0.1 * ((p % 7) as f64 + 1.0);
    let expected = [at(start), at(start) + at(start + 1)];
    for (got, want) in scored.logprobs.iter().zip(expected) {
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }
    assert_eq!(scored.usage.prompt_tokens, start);
    let completions = double
        .bodies()
        .into_iter()
        .filter(|b| b.get("prompt_logprobs").is_some())
        .count();
    assert_eq!(completions, 2, "one completions call per choice");

    // The councils' log-prob rubric judge runs over the backend.
    let mut council = default_council(&Role::Qa).expect("council");
    council.config.judge = JudgeMode::LogProb;
    council.config.rounds = 0;
    let config = council.config;
    let mut task =
        Task::new(TaskId::new("vllm-judge").expect("id"), "Test a login form.").expect("task");
    task.rubric = "coverage; clarity".into();
    let outcome =
        council_runtime::driver::run(&backend, Deliberation::new(council, task, config, 1))
            .await
            .expect("runs");
    assert_eq!(outcome.usage.failed_calls, 0);
    assert!(outcome.proposals.iter().all(|p| p.scores.rubric.is_some()));
}

/// A backend on one server at `url`.
async fn connect_to(url: String) -> VllmBackend {
    VllmBackend::connect(config(&[url]))
        .await
        .expect("connects")
}

/// The llama double's tokens of `chat` as llama-server tokenizes a chat prompt.
fn llama_prompt(chat: &[ChatMessage]) -> Vec<u32> {
    use council_tests::llama_double;
    let messages: Vec<serde_json::Value> = chat
        .iter()
        .map(|m| serde_json::json!({"role": m.role.as_str(), "content": m.content}))
        .collect();
    llama_double::tokenize(&llama_double::render(&messages, true), true)
}

/// The exact log-prob of `choice` after `prompt` under the llama double's model.
fn llama_score(prompt: &[u32], choice: &str) -> f64 {
    use council_tests::llama_double;
    let mut context = prompt.to_vec();
    let mut total = 0.0;
    for t in llama_double::tokenize(choice, false) {
        total += llama_double::logprob(&context, t);
        context.push(t);
    }
    total
}

/// One printable choice among the top next tokens the backend asks for after `prompt`, and
/// one outside them.
fn inside_and_outside_the_top(prompt: &[u32]) -> (String, String) {
    let n = council_inference::vllm::llama::TOP_LOGPROBS;
    let top = council_tests::llama_double::top(prompt, n);
    let printable = |t: &u32| (33..127).contains(t);
    let inside = top
        .iter()
        .copied()
        .find(printable)
        .expect("a printable top token");
    let outside = (33u32..127)
        .find(|t| !top.contains(t))
        .expect("a printable token outside the top");
    let text = |t: u32| char::from(u8::try_from(t).expect("ascii")).to_string();
    (text(inside), text(outside))
}

#[tokio::test]
async fn llama_server_is_detected_and_choices_are_scored_exactly_from_next_token_log_probs() {
    use council_inference::vllm::caps::{LogprobTokens, ScoringForm, StructuredForm};
    use council_inference::{Constraint, Prompt, ScoreRequest};
    use council_tests::llama_double::{Behaviour, LlamaDouble};
    let double = LlamaDouble::start(MODEL, Behaviour::default()).await;
    let backend = connect_to(double.url()).await;
    let caps = backend.capabilities();
    assert!(!caps.vllm_tokenize && !caps.prompt_logprobs, "{caps:?}");
    assert!(
        caps.llama_tokenize && caps.next_token_probs && caps.forced_logprob,
        "{caps:?}"
    );
    assert_eq!(caps.logprob_tokens, LogprobTokens::IdField);
    assert_eq!(caps.structured, StructuredForm::Grammar);
    assert_eq!(caps.scoring(), ScoringForm::NextTokenProbs { forced: true });
    assert!(backend.scores_choices());
    assert!(
        double.probes().iter().any(|p| p == "forced-token"),
        "{:?}",
        double.probes()
    );
    assert_eq!(double.work_requests(), 0, "start-up sent probes only");

    let chat = vec![
        ChatMessage::system("Judge."),
        ChatMessage::user("Score it."),
    ];
    let prompt = llama_prompt(&chat);
    let (inside, outside) = inside_and_outside_the_top(&prompt);
    let choices = vec![inside, outside, "10".to_owned()];
    let request = ScoreRequest::new(Prompt::Chat(chat), choices.clone());
    let scored = backend.score(request.clone()).await.expect("scores");
    for (choice, got) in choices.iter().zip(&scored.logprobs) {
        let want = llama_score(&prompt, choice);
        assert!((got - want).abs() < 1e-9, "{choice:?}: {got} vs {want}");
    }
    assert_eq!(scored.usage.prompt_tokens, prompt.len());
    // One call per distinct prefix (the prompt, and the prompt + "1"), each forcing one of
    // the choice tokens due there, and one more for each other token outside the top.
    let completions = double.posts("/completion");
    assert!(completions.iter().all(|b| b.get("logit_bias").is_some()));
    let top =
        council_tests::llama_double::top(&prompt, council_inference::vllm::llama::TOP_LOGPROBS);
    let mut first: Vec<u32> = choices
        .iter()
        .map(|c| council_tests::llama_double::tokenize(c, false)[0])
        .collect();
    first.sort_unstable();
    first.dedup();
    let extra = first[1..].iter().filter(|t| !top.contains(t)).count();
    assert!(
        extra >= 1 || !top.contains(&first[0]),
        "a token outside the top is scored"
    );
    assert_eq!(completions.len(), 2 + extra, "{completions:?}");
    assert!(double.posts("/v1/completions").is_empty(), "no vLLM form");
    // Choice tokens are asked once: a second scoring tokenizes only its prompt.
    let tokenized = double.posts("/tokenize").len();
    let again = backend.score(request).await.expect("scores again");
    assert_eq!(again.logprobs, scored.logprobs);
    assert_eq!(double.posts("/tokenize").len(), tokenized + 1);

    // A choice constraint goes as a grammar; a regex has no form there and is not sent, and
    // the reply is still checked.
    let mut constrained = ask("accept or reject?");
    constrained.constraint = Some(Constraint::Choice(vec!["accept".into(), "reject".into()]));
    let honoured = backend.generate(constrained).await.expect("honoured");
    assert_eq!(honoured.text, "accept");
    let last_chat = || {
        double
            .posts("/v1/chat/completions")
            .last()
            .cloned()
            .expect("a chat body")
    };
    let body = last_chat();
    assert_eq!(body["grammar"], r#"root ::= "accept" | "reject""#);
    assert!(body.get("structured_outputs").is_none());
    // Sampling in llama-server's terms: its default top-k 40 and min-p 0.05 turned off.
    assert_eq!(
        (body["top_k"].as_u64(), body["min_p"].as_f64()),
        (Some(0), Some(0.0))
    );
    assert_eq!(body["repeat_penalty"], 1.0);
    let mut regex = ask("digits?");
    regex.constraint = Some(Constraint::Regex("[0-9]+".into()));
    let err = backend.generate(regex).await.expect_err("checked");
    assert!(
        matches!(err, InferenceError::ConstraintViolated { .. }),
        "{err}"
    );
    let body = last_chat();
    assert!(body.get("grammar").is_none() && body.get("structured_outputs").is_none());

    // Log-probs carry the ids llama-server puts beside the token text.
    let mut with_logprobs = ask("hi");
    with_logprobs.top_logprobs = Some(2);
    let result = backend.generate(with_logprobs).await.expect("log-probs");
    let logprobs = result.logprobs.expect("log-probs");
    assert!(!logprobs.is_empty() && logprobs.iter().all(|l| l.top.len() == 2));
    assert_eq!(result.token_ids.len(), logprobs.len());
    assert_eq!(backend.in_flight(), 0);
}

#[tokio::test]
async fn without_logit_bias_a_choice_outside_the_top_log_probs_fails_and_is_not_guessed() {
    use council_inference::vllm::caps::ScoringForm;
    use council_inference::{Prompt, ScoreRequest};
    use council_tests::llama_double::{Behaviour, LlamaDouble};
    let behaviour = Behaviour {
        logit_bias: false,
        ..Behaviour::default()
    };
    let double = LlamaDouble::start(MODEL, behaviour).await;
    let backend = connect_to(double.url()).await;
    assert_eq!(
        backend.capabilities().scoring(),
        ScoringForm::NextTokenProbs { forced: false }
    );
    assert!(backend.scores_choices());
    let chat = vec![ChatMessage::user("Pick one.")];
    let prompt = llama_prompt(&chat);
    let (inside, outside) = inside_and_outside_the_top(&prompt);
    let scored = backend
        .score(ScoreRequest::new(
            Prompt::Chat(chat.clone()),
            vec![inside.clone()],
        ))
        .await
        .expect("a top token is read");
    assert!((scored.logprobs[0] - llama_score(&prompt, &inside)).abs() < 1e-9);
    let err = backend
        .score(ScoreRequest::new(Prompt::Chat(chat), vec![inside, outside]))
        .await
        .expect_err("not guessed");
    assert!(
        matches!(&err, InferenceError::Unsupported { reason, .. } if reason.contains("top 1024")),
        "{err}"
    );
    assert!(!err.is_transient(), "a retry would fail the same way");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_a_scoring_form_is_refused_at_once_and_the_cli_judges_with_text() {
    use council_inference::{Prompt, ScoreRequest};
    use council_tests::llama_double::{Behaviour, LlamaDouble};
    let behaviour = Behaviour {
        native: false,
        ..Behaviour::default()
    };
    let double = LlamaDouble::start(MODEL, behaviour).await;
    let backend = connect_to(double.url()).await;
    assert!(!backend.scores_choices(), "{:?}", backend.capabilities());
    let before = double.work_requests();
    let err = backend
        .score(ScoreRequest::new(
            Prompt::Chat(vec![ChatMessage::user("x")]),
            vec!["A".into()],
        ))
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, InferenceError::Unsupported { reason, .. } if reason.contains("cannot score choices")),
        "{err}"
    );
    assert!(!err.is_transient());
    assert_eq!(double.work_requests(), before, "nothing was sent");

    // `council eval` (log-prob judging by default) judges with text instead, and its
    // settings say so.
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("run");
    let args: Vec<String> = [
        "council",
        "eval",
        "--model",
        MODEL,
        "--suite",
        "arithmetic",
        "--limit",
        "1",
        "--rounds",
        "1",
        "--arms",
        "council",
        "--vllm-url",
        &double.url(),
        "--out",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([out.display().to_string()])
    .collect();
    council(args)
        .await
        .expect("eval over a server without scoring");
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).expect("run.json"))
            .expect("JSON");
    assert_eq!(settings["judge"], "text", "{settings}");
    let results = std::fs::read_to_string(out.join("results.jsonl")).expect("results");
    let line: serde_json::Value =
        serde_json::from_str(results.lines().next().expect("a line")).expect("JSON");
    assert_eq!(line["status"]["state"], "ok", "{line}");
    assert!(
        double.posts("/completion").is_empty(),
        "no scoring call was sent"
    );
}
