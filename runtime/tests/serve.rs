//! `council serve` as a process: councils and records survive a SIGKILL (and the interrupted
//! deliberation is not left in progress), SIGTERM drains and exits 0, bad config exits non-zero
//! naming the field, logs can be JSON with secrets redacted.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Served, client, councils, serve_with, tiny_model};

use council_proto::fleet::orchestrator::v1 as pb;
use council_proto::fleet::orchestrator::v1::DeliberationStatus;
use tonic::Code;

fn serve(model: &str, data: &str, extra: &[&str]) -> Served {
    let mut args = vec!["--data-dir", data];
    args.extend_from_slice(extra);
    serve_with(model, &args, Stdio::inherit())
}

async fn roles(addr: &str) -> Vec<String> {
    councils(addr).await.into_iter().map(|c| c.role).collect()
}

fn request(task_id: &str, rounds: i32, num_agents: i32) -> pb::DeliberateRequest {
    pb::DeliberateRequest {
        task_id: task_id.into(),
        task_description: "Pick a retry policy for a flaky upstream.".into(),
        role: "DEV".into(),
        constraints: None,
        rounds,
        num_agents,
        review_rounds: Some(rounds),
    }
}

async fn record(addr: &str, task: &str) -> pb::GetDeliberationResultResponse {
    client(addr)
        .await
        .get_deliberation_result(pb::GetDeliberationResultRequest {
            task_id: task.into(),
        })
        .await
        .expect("record")
        .into_inner()
}

async fn wait_in_progress(addr: &str, task: &str) {
    let mut c = client(addr).await;
    for _ in 0..600 {
        let r = c
            .get_deliberation_result(pb::GetDeliberationResultRequest {
                task_id: task.into(),
            })
            .await;
        if r.is_ok_and(|r| r.into_inner().status() == DeliberationStatus::InProgress) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{task} never started");
}

#[tokio::test]
async fn councils_and_records_survive_sigkill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = tiny_model(dir.path());
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");

    let first = serve(&model, data, &[]);
    assert_eq!(
        roles(&first.addr).await,
        vec!["DEV", "QA", "ARCHITECT", "DEVOPS", "DATA"]
    );
    let created = client(&first.addr)
        .await
        .create_council(pb::CreateCouncilRequest {
            role: "SECURITY".into(),
            num_agents: 2,
            config: None,
        })
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.agents_created, 2);
    client(&first.addr)
        .await
        .delete_council(pb::DeleteCouncilRequest {
            role: "DATA".into(),
        })
        .await
        .expect("delete");
    let done = client(&first.addr)
        .await
        .deliberate(request("done", 0, 1))
        .await
        .expect("deliberates")
        .into_inner();
    // A long deliberation is running when the process dies.
    let addr = first.addr.clone();
    let running = tokio::spawn(async move {
        client(&addr)
            .await
            .deliberate(request("interrupted", 10, 3))
            .await
    });
    wait_in_progress(&first.addr, "interrupted").await;
    drop(first); // SIGKILL: no shutdown path runs.
    assert!(running.await.expect("joined").is_err());

    let second = serve(&model, data, &[]);
    // The API-created council is there; the deleted default is restored only as a default.
    assert_eq!(
        roles(&second.addr).await,
        vec!["DEV", "QA", "ARCHITECT", "DEVOPS", "DATA", "SECURITY"]
    );
    let kept = record(&second.addr, "done").await;
    assert_eq!(kept.status(), DeliberationStatus::Completed);
    assert_eq!(kept.results, done.results);
    assert_eq!(kept.winner_id, done.winner_id);
    let interrupted = record(&second.addr, "interrupted").await;
    assert_eq!(interrupted.status(), DeliberationStatus::Failed);
    assert!(
        interrupted.error_message.contains("interrupted"),
        "{interrupted:?}"
    );
    let tags = interrupted.metadata.expect("metadata").tags;
    assert_eq!(tags.get("retryable").map(String::as_str), Some("true"));
    // And it can run again.
    let rerun = client(&second.addr)
        .await
        .deliberate(request("interrupted", 0, 1))
        .await
        .expect("reruns")
        .into_inner();
    assert_eq!(rerun.results.len(), 1);
}

#[tokio::test]
async fn sigterm_drains_then_exits_zero() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = tiny_model(dir.path());
    let data = dir.path().join("data");
    let data_str = data.to_str().expect("utf-8");
    let mut served = serve(&model, data_str, &["--grace-secs", "0"]);
    let addr = served.addr.clone();
    let running =
        tokio::spawn(async move { client(&addr).await.deliberate(request("cut", 10, 3)).await });
    wait_in_progress(&served.addr, "cut").await;
    let killed = Command::new("kill")
        .args(["-TERM", &served.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let err = running.await.expect("joined").expect_err("cut short");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let mut status = None;
    for _ in 0..300 {
        if let Some(s) = served.child.try_wait().expect("wait") {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = status.expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    // The store was released and its record says what happened.
    let store = council_runtime::store::FileStore::open(&data).expect("reopens");
    use council_runtime::store::CouncilStore;
    let record = store.record("cut").await.expect("reads").expect("kept");
    assert_eq!(record.status, DeliberationStatus::Failed as i32);
    assert!(record.retryable);
    assert!(record.error_message.contains("shutting down"), "{record:?}");
}

/// A client whose runtime stopped answering (it never acknowledges the server's goodbye) holds
/// its connection open: the drained process still exits, after a bounded linger.
#[tokio::test]
async fn a_client_that_stopped_answering_does_not_keep_the_process_alive() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = tiny_model(dir.path());
    let data = dir.path().join("data");
    let mut served = serve(
        &model,
        data.to_str().expect("utf-8"),
        &["--grace-secs", "0"],
    );
    let addr = served.addr.clone();
    let (connected_tx, connected_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let held = runtime.block_on(async {
            let mut c = client(&addr).await;
            c.get_status(pb::GetStatusRequest {
                include_stats: false,
            })
            .await
            .expect("status");
            c
        });
        let _ = connected_tx.send(());
        // This runtime never runs again: the connection stays open and unanswered.
        std::thread::sleep(Duration::from_secs(300));
        drop(held);
    });
    connected_rx.recv().expect("connected");
    let killed = Command::new("kill")
        .args(["-TERM", &served.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let mut status = None;
    for _ in 0..600 {
        if let Some(s) = served.child.try_wait().expect("wait") {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = status.expect("exits although a client keeps its connection");
    assert!(status.success(), "{status:?}");
}

/// SIGTERM the moment the address is printed, before any request: the handlers are in place
/// by then, so the process drains and exits cleanly rather than dying by the signal's default
/// action (the handlers used to be installed only when the server first polled them).
#[test]
fn sigterm_right_after_the_port_opens_drains_cleanly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = tiny_model(dir.path());
    let data = dir.path().join("data");
    for _ in 0..3 {
        let mut served = serve(
            &model,
            data.to_str().expect("utf-8"),
            &["--grace-secs", "0"],
        );
        let killed = Command::new("kill")
            .args(["-TERM", &served.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(killed.success());
        let status = served.child.wait().expect("wait");
        assert!(status.success(), "{status:?}");
    }
}

#[test]
fn invalid_config_exits_non_zero_naming_the_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("council.toml");
    std::fs::write(&file, "[limits]\nmax_concurrent = 4\nburst = 2\n").expect("write");
    let file = file.to_str().expect("utf-8");
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 4] = [
        (&["--max-concurrent", "0"], &[], "limits.max_concurrent"),
        (&[], &[("COUNCIL_LISTEN", "localhost")], "server.listen"),
        (&["--config", file], &[], "burst"),
        (&["--tls-cert", "/nonexistent.pem"], &[], "server.tls_key"),
    ];
    for (args, env, field) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_council"))
            .arg("serve")
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} {env:?} was accepted");
        assert!(stderr.contains(field), "{field} not named in {stderr}");
    }
}

#[tokio::test]
async fn json_logs_show_the_effective_config_without_secrets() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = tiny_model(dir.path());
    let data = dir.path().join("data");
    let token = "s3cret-token-0123456789";
    let mut served = serve_with(
        &model,
        &[
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--log-format",
            "json",
            "--auth-token",
            token,
        ],
        Stdio::piped(),
    );
    roles_unauthenticated(&served.addr).await;
    let _ = served.child.kill();
    let _ = served.child.wait();
    let mut stderr = String::new();
    served
        .child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("reads");
    assert!(!stderr.contains(token), "the token leaked: {stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let config = lines
        .iter()
        .find(|l| l["fields"]["message"] == "effective config")
        .expect("the effective config is logged");
    let shown = config["fields"]["config"].as_str().expect("config text");
    assert!(shown.contains("<redacted>"), "{shown}");
    assert!(lines.iter().any(|l| l["level"] == "INFO"));
}

/// With auth on, the API refuses a call without a token.
async fn roles_unauthenticated(addr: &str) {
    let err = client(addr)
        .await
        .list_councils(pb::ListCouncilsRequest::default())
        .await
        .expect_err("needs a token");
    assert_eq!(err.code(), Code::Unauthenticated);
}
