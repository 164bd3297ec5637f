//! `council eval` as a process on a tiny generated model. Random weights score about zero, so
//! these tests check structure and accounting, not quality: every arm runs and is accounted for,
//! the arms share their first answers (seed discipline), files, plots and report are written,
//! the same seed gives the same results, Ctrl-C leaves a consistent partial output that
//! `--resume` finishes without redoing anything, and bad input fails before any model work.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn council() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_council"));
    command
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HUB_OFFLINE", "1");
    command
}

fn run(args: &[&str]) -> Output {
    council().args(args).output().expect("council runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn tiny_model(dir: &Path) -> String {
    let model = dir.join("model");
    let model = model.to_str().expect("utf-8").to_owned();
    let made = run(&["dev", "tiny-model", &model]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    model
}

/// `eval` arguments shared by the tests: short calls so a tiny model finishes quickly.
fn eval_args<'a>(model: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "eval",
        "--model-dir",
        model,
        "--out",
        out,
        "--agents",
        "3",
        "--rounds",
        "1",
        "--max-tokens-per-call",
        "24",
    ];
    args.extend_from_slice(extra);
    args
}

fn lines(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("results.jsonl"))
        .expect("results.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect()
}

fn json_file(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("file")).expect("JSON")
}

fn by_pair(lines: &[Value]) -> BTreeMap<(String, String), Value> {
    let mut pairs = BTreeMap::new();
    for l in lines {
        let key = (
            l["item"].as_str().expect("item").to_owned(),
            l["arm"].as_str().expect("arm").to_owned(),
        );
        assert!(
            pairs.insert(key.clone(), l.clone()).is_none(),
            "{key:?} twice"
        );
    }
    pairs
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// The reply texts of a transcript's calls of `phase` at round 0, in order.
fn propose_replies(calls: &[Value]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c["phase"] == "propose")
        .map(|c| c["reply"]["text"].as_str().unwrap_or("<failed>").to_owned())
        .collect()
}

#[test]
fn all_arms_run_and_are_accounted_for() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = tiny_model(dir.path());
    let out = dir.path().join("run");
    let out_str = out.to_str().expect("utf-8");
    let args = eval_args(&model, out_str, &["--suite", "arithmetic", "--limit", "3"]);
    let done = run(&args);
    assert!(done.status.success(), "{}", text(&done.stderr));
    let stdout = text(&done.stdout);
    for arm in ["single", "self_refine", "majority", "council"] {
        assert!(stdout.contains(arm), "{stdout}");
    }

    let lines = lines(&out);
    assert_eq!(lines.len(), 12, "3 items × 4 arms");
    let pairs = by_pair(&lines);
    let items: BTreeSet<&str> = pairs.keys().map(|(i, _)| i.as_str()).collect();
    assert_eq!(items.len(), 3);
    // Random weights often write nothing usable: such a run fails (and counts as wrong), but
    // most runs must get through for this test to mean anything.
    let ok = lines
        .iter()
        .filter(|l| l["status"]["state"] == "ok")
        .count();
    assert!(
        ok * 2 >= lines.len(),
        "only {ok} of {} runs completed",
        lines.len()
    );
    for ((item, arm), line) in &pairs {
        match line["status"]["state"].as_str() {
            Some("ok") => {
                assert!(line["correct"].is_boolean(), "arithmetic is scored: {line}");
                assert_eq!(
                    line["parse_failed"].as_bool(),
                    Some(line["answer"].is_null()),
                    "{line}"
                );
            }
            Some("failed") => {
                assert_eq!(
                    line["correct"], false,
                    "a failed run counts as wrong: {line}"
                );
                assert_eq!(line["parse_failed"], false, "{line}");
                assert!(
                    line["status"]["reason"]
                        .as_str()
                        .is_some_and(|r| !r.is_empty())
                );
            }
            other => panic!("unexpected status {other:?}: {line}"),
        }
        assert!(u(&line["prompt_tokens"]) > 0 && u(&line["completion_tokens"]) > 0);
        let transcript = out.join(line["transcript"].as_str().expect("transcript path"));
        assert!(transcript.is_file(), "{item} {arm}: {transcript:?}");
    }

    for item in &items {
        let get = |arm: &str| &pairs[&(item.to_string(), arm.to_owned())];
        let (single, refine, vote, council) = (
            get("single"),
            get("self_refine"),
            get("majority"),
            get("council"),
        );
        assert_eq!(u(&single["calls"]), 1);
        if refine["status"]["state"] == "ok" {
            assert_eq!(u(&refine["calls"]), 3, "propose + critique + revise");
            assert_eq!(refine["rounds"].as_array().map(Vec::len), Some(2));
        }

        // The council's calls are the ones in its transcript; the vote matched its tokens.
        let council_t = json_file(&out.join(council["transcript"].as_str().expect("path")));
        let council_calls = council_t["transcript"].as_array().expect("calls");
        assert_eq!(u(&council["calls"]), council_calls.len() as u64);
        let council_tokens = u(&council["prompt_tokens"]) + u(&council["completion_tokens"]);
        let budget = &vote["budget"];
        assert_eq!(budget["matched"], "tokens");
        assert_eq!(u(&budget["target_calls"]), u(&council["calls"]));
        assert_eq!(u(&budget["target_tokens"]), council_tokens);
        assert_eq!(u(&budget["samples"]), u(&vote["calls"]));
        let vote_tokens = u(&vote["prompt_tokens"]) + u(&vote["completion_tokens"]);
        assert!(
            vote_tokens >= council_tokens || u(&budget["samples"]) == 64,
            "the vote spends at least the council's tokens: {vote_tokens} < {council_tokens}"
        );

        // Seed discipline: the arms' first answers are the council's first proposals.
        let council_first = propose_replies(council_calls);
        let transcript = |line: &Value| {
            json_file(&out.join(line["transcript"].as_str().expect("path")))["calls"]
                .as_array()
                .expect("calls")
                .clone()
        };
        assert_eq!(council_first.len(), 3);
        assert_eq!(propose_replies(&transcript(single)), council_first[..1]);
        assert_eq!(propose_replies(&transcript(refine)), council_first[..1]);
        assert_eq!(
            u(&refine["calls"]),
            transcript(refine).len() as u64,
            "every self-refine call is in its transcript"
        );
        assert_eq!(propose_replies(&transcript(vote))[..3], council_first[..]);
    }

    let summary = json_file(&out.join("summary.json"));
    assert_eq!(summary["run"]["complete"], true);
    let arms = summary["arms"].as_array().expect("arms");
    assert_eq!(arms.len(), 4);
    for a in arms {
        let name = a["arm"].as_str().expect("arm");
        assert_eq!(u(&a["runs"]), 3);
        assert_eq!(u(&a["scored"]), 3);
        let calls: u64 = lines
            .iter()
            .filter(|l| l["arm"] == name)
            .map(|l| u(&l["calls"]))
            .sum();
        assert_eq!(u(&a["calls"]), calls, "{name}");
    }
    let report = std::fs::read_to_string(out.join("report.md")).expect("report");
    assert!(report.contains("council") && report.contains("plots/accuracy.svg"));
    assert!(!report.contains("INCOMPLETE"));
    for plot in ["accuracy", "rounds", "tokens"] {
        let svg = std::fs::read_to_string(out.join(format!("plots/{plot}.svg"))).expect("plot");
        assert!(
            svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
            "{plot}"
        );
    }

    // Same seed, same model: the same answers and the same accounting. Latency and the prompt
    // tokens served from the prefix cache depend on what else was in flight (which blocks were
    // still cached, which requests were admitted together), not on the seed; every other field,
    // prompt tokens included, must match.
    let again = dir.path().join("again");
    let again_str = again.to_str().expect("utf-8");
    let args = eval_args(
        &model,
        again_str,
        &["--suite", "arithmetic", "--limit", "3"],
    );
    assert!(run(&args).status.success());
    let strip = |mut v: Value| {
        let fields = v.as_object_mut().expect("object");
        fields.remove("latency_ms");
        fields.remove("cached_prompt_tokens");
        v
    };
    let first: BTreeMap<_, _> = pairs.into_iter().map(|(k, v)| (k, strip(v))).collect();
    let second: BTreeMap<_, _> = by_pair(&lines_of(&again))
        .into_iter()
        .map(|(k, v)| (k, strip(v)))
        .collect();
    assert_eq!(first, second);
}

fn lines_of(out: &Path) -> Vec<Value> {
    lines(out)
}

fn wait_for_lines(out: &Path, at_least: usize, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let n = std::fs::read_to_string(out.join("results.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if n >= at_least {
            return;
        }
        assert!(
            child.try_wait().expect("wait").is_none(),
            "eval ended early"
        );
        assert!(Instant::now() < deadline, "no results after 300 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ctrl_c_leaves_a_consistent_partial_run_that_resume_finishes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = tiny_model(dir.path());
    let out = dir.path().join("run");
    let out_str = out.to_str().expect("utf-8");
    let common = [
        "--suite",
        "word_problems",
        "--limit",
        "4",
        "--concurrency",
        "1",
    ];
    let mut child = council()
        .args(eval_args(&model, out_str, &common))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    wait_for_lines(&out, 2, &mut child);
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    let stopped = child.wait_with_output().expect("exits");
    assert_eq!(
        stopped.status.code(),
        Some(130),
        "{}",
        text(&stopped.stderr)
    );
    assert!(text(&stopped.stderr).contains("--resume"));

    let partial = std::fs::read_to_string(out.join("results.jsonl")).expect("results");
    let first_lines = lines(&out);
    assert!(
        first_lines.len() >= 2 && first_lines.len() < 16,
        "{}",
        first_lines.len()
    );
    assert!(partial.ends_with('\n'), "no torn line");
    let summary = json_file(&out.join("summary.json"));
    assert_eq!(summary["run"]["complete"], false);
    let runs: u64 = summary["arms"]
        .as_array()
        .expect("arms")
        .iter()
        .map(|a| u(&a["runs"]))
        .sum();
    assert_eq!(
        runs,
        first_lines.len() as u64,
        "the summary counts what is on disk"
    );
    let report = std::fs::read_to_string(out.join("report.md")).expect("report");
    assert!(report.contains("INCOMPLETE"));

    // The directory is not overwritten by accident, nor continued with other settings.
    let refused = run(&eval_args(&model, out_str, &common));
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("--resume"),
        "{}",
        text(&refused.stderr)
    );
    let mut other_seed = common.to_vec();
    other_seed.extend(["--resume", "--seed", "9"]);
    let refused = run(&eval_args(&model, out_str, &other_seed));
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("seed"),
        "{}",
        text(&refused.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("results.jsonl")).expect("results"),
        partial,
        "refused runs change nothing"
    );

    // A torn line (a crash mid-write) is cut off and redone, never counted.
    let torn = format!("{partial}{{\"item\": \"word_prob");
    std::fs::write(out.join("results.jsonl"), torn).expect("tear");
    let mut resume = common.to_vec();
    resume.push("--resume");
    let resumed = run(&eval_args(&model, out_str, &resume));
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    let all = std::fs::read_to_string(out.join("results.jsonl")).expect("results");
    assert!(
        all.starts_with(&partial),
        "earlier lines are kept as they were"
    );
    let pairs = by_pair(&lines(&out));
    assert_eq!(pairs.len(), 16, "every item × arm exactly once");
    assert_eq!(
        json_file(&out.join("summary.json"))["run"]["complete"],
        true
    );
}

#[test]
fn task_files_with_free_form_tasks_are_judged_by_the_council() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = tiny_model(dir.path());
    let tasks = dir.path().join("tasks.jsonl");
    std::fs::write(
        &tasks,
        concat!(
            r#"{"id": "sum", "prompt": "What is 2 + 2?", "answer": "4"}"#,
            "\n",
            r#"{"id": "design", "prompt": "Propose a retry policy.", "role": "DEV", "rubric": "safety; cost"}"#,
            "\n"
        ),
    )
    .expect("tasks");
    let out = dir.path().join("run");
    let out_str = out.to_str().expect("utf-8");
    let tasks_str = tasks.to_str().expect("utf-8");
    let extra = [
        "--tasks",
        tasks_str,
        "--arms",
        "council,majority,single",
        "--judge",
        "logprob",
    ];
    let done = run(&eval_args(&model, out_str, &extra));
    assert!(done.status.success(), "{}", text(&done.stderr));
    let pairs = by_pair(&lines(&out));
    assert_eq!(pairs.len(), 6);
    let get = |item: &str, arm: &str| &pairs[&(item.to_owned(), arm.to_owned())];
    assert_eq!(get("sum", "council")["expected"], "4");
    assert!(get("sum", "council")["correct"].is_boolean());
    let free = get("design", "council");
    assert!(free["expected"].is_null() && free["correct"].is_null());
    assert!(
        free["score"].is_number() && free["margin"].is_number(),
        "{free}"
    );
    // The log-prob judge scored the rubric ("safety; cost") of every peer's proposal.
    let transcript = json_file(&out.join(free["transcript"].as_str().expect("path")));
    let proposals = transcript["proposals"].as_array().expect("proposals");
    assert!(
        proposals.iter().all(|p| p["scores"]["rubric"].is_number()),
        "{proposals:?}"
    );
    assert_eq!(get("design", "majority")["status"]["state"], "skipped");
    assert_eq!(u(&get("design", "majority")["calls"]), 0);
    assert!(get("design", "single")["correct"].is_null());
    let summary = json_file(&out.join("summary.json"));
    let council = summary["arms"]
        .as_array()
        .expect("arms")
        .iter()
        .find(|a| a["arm"] == "council")
        .expect("council arm")
        .clone();
    assert_eq!(u(&council["scored"]), 1);
    assert!(council["mean_margin"].is_number());
}

#[test]
fn bad_input_fails_before_any_model_work() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("never");
    let out_str = out.to_str().expect("utf-8");
    let bad_tasks = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad_tasks,
        "{\"id\": \"ok\", \"prompt\": \"fine\"}\n{\"id\": \"x\"}\n",
    )
    .expect("write");
    let bad_tasks = bad_tasks.to_str().expect("utf-8");
    // No model exists at all: these must fail on the arguments alone.
    let model = dir.path().join("no-model");
    let model = model.to_str().expect("utf-8");
    for (extra, expected) in [
        (vec!["--suite", "poetry"], "--suite"),
        (vec!["--suite", "game24", "--arms", "single,best"], "--arms"),
        (vec!["--suite", "game24", "--limit", "0"], "--limit"),
        (vec!["--suite", "game24", "--role", "no role"], "--role"),
        (vec!["--suite", "game24", "--agents", "0"], "--agents"),
        (vec!["--tasks", bad_tasks], "line 2"),
        (
            vec!["--tasks", "/nonexistent/tasks.jsonl"],
            "/nonexistent/tasks.jsonl",
        ),
    ] {
        let mut args = vec!["eval", "--model-dir", model, "--out", out_str];
        args.extend_from_slice(&extra);
        let out = run(&args);
        assert!(!out.status.success(), "{extra:?}");
        let err = text(&out.stderr);
        assert!(err.contains(expected), "{extra:?}: {err}");
    }
    assert!(!out.exists(), "nothing was written");
}
