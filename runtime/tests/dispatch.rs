//! Task dispatch over NATS JetStream, end to end: `council serve --dispatch` processes against a
//! private `nats-server -js`, tasks published to `council.tasks.<role>`, events read back from
//! `ORCHESTRATOR_EVENTS` and dead letters from `COUNCIL_DLQ`. The oracle of every test, as in
//! NATS's own chaos tests: each published task id ends with exactly one result or one dead
//! letter.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::{NatsServer, Served, client, serve_with, tiny_model};
use council_proto::fleet::orchestrator::v1 as pb;
use council_proto::fleet::orchestrator::v1::DeliberationStatus;
use serde_json::{Value, json};

/// One test's world: a NATS server, a tiny model, and a client to publish and read with.
struct World {
    nats: NatsServer,
    /// What workers connect to (`nats://…`, or `tls://…`).
    url: String,
    dir: tempfile::TempDir,
    model: String,
    js: jetstream::Context,
}

impl World {
    async fn new(nats: NatsServer, client_user: Option<(&str, &str)>) -> Self {
        let mut options = async_nats::ConnectOptions::new();
        if let Some((user, password)) = client_user {
            options = options.user_and_password(user.into(), password.into());
        }
        let url = nats.url();
        Self::connect(nats, url, tempfile::tempdir().expect("temp dir"), options).await
    }

    async fn connect(
        nats: NatsServer,
        url: String,
        dir: tempfile::TempDir,
        options: async_nats::ConnectOptions,
    ) -> Self {
        let model = tiny_model(dir.path());
        council_runtime::install_crypto_provider();
        let client = options
            .retry_on_initial_connect()
            .connect(&url)
            .await
            .expect("test client connects");
        Self {
            nats,
            url,
            dir,
            model,
            js: jetstream::new(client),
        }
    }

    /// A config file for a worker: NATS store and dispatch with short test timings.
    fn config(&self, name: &str, dispatch_extra: &str) -> PathBuf {
        self.config_with(name, "[store]\nkind = \"nats\"", dispatch_extra)
    }

    /// A config file for a worker with `store` as its `[store]` section.
    fn config_with(&self, name: &str, store: &str, dispatch_extra: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.toml"));
        let mut dispatch: Vec<String> = dispatch_extra.lines().map(str::to_owned).collect();
        for default in [
            "ack_wait_secs = 4",
            "max_deliver = 3",
            "nak_delay_ms = 200",
            "max_nak_delay_secs = 1",
            "max_task_bytes = 4096",
        ] {
            let key = default.split(' ').next().unwrap_or_default();
            if !dispatch_extra.contains(&format!("{key} =")) {
                dispatch.push(default.to_owned());
            }
        }
        let text = format!(
            "{store}\n[nats]\nurl = \"{}\"\n[dispatch]\nenabled = true\n{}\n",
            self.url,
            dispatch.join("\n")
        );
        std::fs::write(&path, text).expect("writes config");
        path
    }

    /// A worker process; its log goes to `<name>.log` in the test's directory.
    fn worker(&self, name: &str, dispatch_extra: &str, extra: &[&str]) -> Served {
        let config = self.config(name, dispatch_extra);
        let log = std::fs::File::create(self.log_path(name)).expect("log file");
        let mut args = vec!["--config", config.to_str().expect("utf-8")];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--log-format", "json"]);
        serve_with(&self.model, &args, Stdio::from(log))
    }

    /// A worker whose store is a file store in `data` (a single replica).
    fn file_worker(&self, name: &str, data: &std::path::Path, extra: &[&str]) -> Served {
        let store = format!(
            "[store]\nkind = \"file\"\ndata_dir = \"{}\"",
            data.display()
        );
        let config = self.config_with(name, &store, "");
        let log = std::fs::File::create(self.log_path(name)).expect("log file");
        let mut args = vec!["--config", config.to_str().expect("utf-8")];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--log-format", "json"]);
        serve_with(&self.model, &args, Stdio::from(log))
    }

    /// Runs a worker that must refuse to start; returns its stderr.
    fn refused(&self, name: &str, dispatch_extra: &str) -> String {
        let config = self.config(name, dispatch_extra);
        let out = Command::new(env!("CARGO_BIN_EXE_council"))
            .args([
                "serve",
                "--model-dir",
                &self.model,
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--metrics-listen", "off", "--config"])
            .arg(&config)
            .output()
            .expect("runs");
        assert!(!out.status.success(), "{name}: started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    async fn publish(&self, subject: &str, body: Vec<u8>) {
        self.js
            .publish(subject.to_owned(), body.into())
            .await
            .expect("publish")
            .await
            .expect("the tasks stream took it");
    }

    async fn publish_task(&self, task: &Value) {
        let role = task["role"].as_str().unwrap_or("DEV");
        self.publish(
            &format!("council.tasks.{role}"),
            serde_json::to_vec(task).expect("json"),
        )
        .await;
    }

    /// Every message of `stream`, as (subject, Nats-Msg-Id, JSON body).
    async fn messages(&self, stream: &str) -> Vec<(String, String, Value)> {
        let Ok(mut s) = self.js.get_stream(stream).await else {
            return Vec::new();
        };
        let Ok(info) = s.info().await else {
            return Vec::new();
        };
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let mut out = Vec::new();
        for seq in first.max(1)..=last {
            if let Ok(m) = s.get_raw_message(seq).await {
                let id = m
                    .headers
                    .get("Nats-Msg-Id")
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                let body = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
                out.push((m.subject.to_string(), id, body));
            }
        }
        out
    }

    /// The terminal events (completed or failed) of `task_id`.
    async fn events_of(&self, task_id: &str) -> Vec<Value> {
        self.messages("ORCHESTRATOR_EVENTS")
            .await
            .into_iter()
            .filter(|(subject, _, body)| {
                subject != "orchestration.deliberation.progress" && body["task_id"] == task_id
            })
            .map(|(_, _, body)| body)
            .collect()
    }

    async fn dead_letters(&self) -> Vec<Value> {
        self.messages("COUNCIL_DLQ")
            .await
            .into_iter()
            .map(|(_, _, body)| body)
            .collect()
    }

    /// Waits (up to `within`) until `task_id` has a terminal event.
    async fn wait_event(&self, task_id: &str, within: Duration) -> Value {
        let start = Instant::now();
        loop {
            if let Some(e) = self.events_of(task_id).await.into_iter().next() {
                return e;
            }
            assert!(
                start.elapsed() < within,
                "no event for {task_id} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the consumer has nothing pending, unacked or waiting for redelivery.
    async fn wait_settled(&self, within: Duration) {
        let start = Instant::now();
        loop {
            let s = self.js.get_stream("COUNCIL_TASKS").await.expect("stream");
            let info = s
                .consumer_info("council-workers")
                .await
                .expect("consumer info");
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return;
            }
            assert!(
                start.elapsed() < within,
                "consumer not settled within {within:?}: {} pending, {} unacked",
                info.num_pending,
                info.num_ack_pending
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn task(id: &str, rounds: i32, agents: i32) -> Value {
    json!({
        "schema": "council.task.v1",
        "task_id": id,
        "role": "DEV",
        "description": "Pick a retry policy for a flaky upstream service.",
        "options": {"rounds": rounds, "num_agents": agents},
        "correlation": {"story_id": format!("story-{id}")},
    })
}

/// Deliberations a worker finished since it started (any outcome).
async fn deliberations_run(addr: &str) -> i64 {
    client(addr)
        .await
        .get_status(pb::GetStatusRequest {
            include_stats: true,
        })
        .await
        .expect("status")
        .into_inner()
        .stats
        .map_or(0, |s| s.total_deliberations)
}

async fn record_status(addr: &str, task: &str) -> Option<DeliberationStatus> {
    client(addr)
        .await
        .get_deliberation_result(pb::GetDeliberationResultRequest {
            task_id: task.into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status())
}

async fn wait_status(addr: &str, task: &str, status: DeliberationStatus, within: Duration) {
    let start = Instant::now();
    while record_status(addr, task).await != Some(status) {
        assert!(start.elapsed() < within, "{task} never reached {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the worker's readiness (`grpc.health.v1`, service "") turns NOT_SERVING within
/// `within`.
async fn not_serving_within(addr: &str, within: Duration) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connects"),
    );
    let start = Instant::now();
    while start.elapsed() < within {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status();
        if status == ServingStatus::NotServing {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn is_iso8601_utc(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z'
        && s.bytes()
            .enumerate()
            .all(|(i, c)| [4, 7, 10, 13, 16, 19, 23].contains(&i) || c.is_ascii_digit())
}

fn sigterm(child: &std::process::Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "SIGTERM sent");
}

/// Waits for the process to exit, without blocking the test's runtime (its client
/// connections must be able to close for the server's graceful stop).
async fn wait_exit(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if start.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const LONG: Duration = Duration::from_secs(180);

/// 1. A task in, exactly one completed event out with the fields upstream consumers read;
/// progress events when asked for; the message acked.
#[tokio::test]
async fn a_task_in_one_completed_event_out() {
    let w = World::new(NatsServer::start(), None).await;
    let worker = w.worker(
        "w",
        "progress_subject = \"orchestration.deliberation.progress\"",
        &[],
    );
    w.publish_task(&task("happy-1", 1, 2)).await;
    let event = w.wait_event("happy-1", LONG).await;
    w.wait_settled(LONG).await;

    assert_eq!(event["schema"], "council.event.v1");
    assert_eq!(event["event_type"], "deliberation.completed");
    assert_eq!(event["task_id"], "happy-1");
    assert_eq!(event["story_id"], "story-happy-1");
    assert_eq!(event["role"], "DEV");
    assert_eq!(event["correlation"]["story_id"], "story-happy-1");
    assert!(
        is_iso8601_utc(event["timestamp"].as_str().unwrap_or("")),
        "{}",
        event["timestamp"]
    );
    let decisions = event["decisions"].as_array().expect("decisions");
    assert_eq!(decisions.len(), 2, "one decision per proposal");
    let winners: Vec<&Value> = decisions.iter().filter(|d| d["winner"] == true).collect();
    assert_eq!(winners.len(), 1);
    assert_eq!(decisions[0]["rank"], 1);
    let outcome = &event["outcome"];
    assert_eq!(outcome["winner_id"], winners[0]["author_id"]);
    assert_eq!(outcome["rounds_run"], 1);
    assert!(outcome["prompt_tokens"].as_i64().unwrap_or(0) > 0);
    assert_eq!(event["delivery"], 1);

    let all = w.messages("ORCHESTRATOR_EVENTS").await;
    let terminal: Vec<_> = all
        .iter()
        .filter(|(s, _, _)| s == "orchestration.deliberation.completed")
        .collect();
    assert_eq!(terminal.len(), 1, "exactly one completed event");
    assert_eq!(
        terminal[0].1, "happy-1",
        "published with Nats-Msg-Id = task id"
    );
    let progress: Vec<_> = all
        .iter()
        .filter(|(s, _, _)| s == "orchestration.deliberation.progress")
        .collect();
    assert!(
        progress.len() >= 4,
        "progress events for each phase: {}",
        progress.len()
    );
    assert!(
        progress.iter().all(
            |(_, _, b)| b["task_id"] == "happy-1" && b["event_type"] == "deliberation.progress"
        )
    );
    assert!(w.dead_letters().await.is_empty());
    assert_eq!(deliberations_run(&worker.addr).await, 1);
}

/// 2. The same task published twice, then again after its result was out: one result, and
/// the council ran once.
#[tokio::test]
async fn a_task_delivered_three_times_runs_once() {
    let w = World::new(NatsServer::start(), None).await;
    let worker = w.worker("w", "in_flight = 2", &[]);
    let t = task("dup-1", 0, 2);
    w.publish_task(&t).await;
    w.publish_task(&t).await;
    w.wait_event("dup-1", LONG).await;
    w.wait_settled(LONG).await;
    // Long after: a redelivery past any duplicate window looks just like this.
    w.publish_task(&t).await;
    w.wait_settled(LONG).await;

    assert_eq!(w.events_of("dup-1").await.len(), 1, "one result");
    assert_eq!(
        deliberations_run(&worker.addr).await,
        1,
        "the council ran once"
    );
    assert!(w.dead_letters().await.is_empty());
    let log = w.log("w");
    assert!(
        log.matches("duplicate delivery").count()
            + log.matches("redelivered while running").count()
            + log.matches("completed before").count()
            >= 2,
        "both copies were recognised: {log}"
    );
}

/// 3. The worker is killed (SIGKILL) after it published the result and before its ack
/// reached JetStream: after redelivery, still exactly one result, and no second run.
#[tokio::test]
async fn killed_between_publish_and_ack_still_one_result() {
    // The first worker may not ack: its user cannot publish to the ack subjects.
    let auth = r#"
authorization {
  users = [
    { user: "admin", password: "admin-pass" }
    { user: "noack", password: "noack-pass", permissions: { publish: { deny: ["$JS.ACK.>"] } } }
  ]
}
"#;
    let w = World::new(
        NatsServer::start_with_config(auth),
        Some(("admin", "admin-pass")),
    )
    .await;
    let password = w.dir.path().join("noack.password");
    std::fs::write(&password, "noack-pass\n").expect("password file");
    let admin_password = w.dir.path().join("admin.password");
    std::fs::write(&admin_password, "admin-pass\n").expect("password file");

    // Room for redeliveries: the first worker's acks never land, so each delivery counts.
    let settings = "max_deliver = 20\nack_wait_secs = 5";
    let mut first = w.worker(
        "first",
        settings,
        &[
            "--nats-user",
            "noack",
            "--nats-password-file",
            password.to_str().expect("utf-8"),
        ],
    );
    w.publish_task(&task("crash-1", 0, 2)).await;
    // The event is out; the ack that follows cannot land. Kill it now.
    w.wait_event("crash-1", LONG).await;
    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reaped");

    let second = w.worker(
        "second",
        settings,
        &[
            "--nats-user",
            "admin",
            "--nats-password-file",
            admin_password.to_str().expect("utf-8"),
        ],
    );
    w.wait_settled(LONG).await;
    assert_eq!(w.events_of("crash-1").await.len(), 1, "exactly one result");
    assert_eq!(
        deliberations_run(&second.addr).await,
        0,
        "the redelivered task did not run again"
    );
    // Recognised either by the record's published mark or, when the kill came before the
    // mark, by the completed record (the stream drops the re-published copy).
    let log = w.log("second");
    assert!(
        log.contains("duplicate delivery") || log.contains("completed before"),
        "{log}"
    );
    assert!(w.dead_letters().await.is_empty());
}

/// 4. nats-server restarts in the middle of a deliberation: readiness drops while it is
/// away, the worker reconnects and the result arrives, once.
#[tokio::test]
async fn nats_restart_mid_deliberation() {
    let mut w = World::new(NatsServer::start(), None).await;
    let worker = w.worker("w", "", &[]);
    w.publish_task(&task("restart-1", 1, 3)).await;
    wait_status(
        &worker.addr,
        "restart-1",
        DeliberationStatus::InProgress,
        LONG,
    )
    .await;
    w.nats.stop();
    assert!(
        not_serving_within(&worker.addr, Duration::from_secs(20)).await,
        "readiness did not drop with NATS away"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    w.nats.restart();

    let event = w.wait_event("restart-1", LONG).await;
    assert_eq!(event["event_type"], "deliberation.completed");
    w.wait_settled(LONG).await;
    assert_eq!(w.events_of("restart-1").await.len(), 1, "once");
    assert_eq!(deliberations_run(&worker.addr).await, 1);
}

/// 5. Malformed JSON, a schema-invalid task, an oversized one and one for an unknown council:
/// one dead letter each with its reason, no retries, and the worker keeps serving.
#[tokio::test]
async fn bad_messages_are_dead_lettered_once() {
    let w = World::new(NatsServer::start(), None).await;
    let worker = w.worker("w", "", &[]);
    w.publish(
        "council.tasks.DEV",
        b"{\"schema\": \"council.task.v1\", oops".to_vec(),
    )
    .await;
    w.publish(
        "council.tasks.DEV",
        serde_json::to_vec(
            &json!({"schema": "council.task.v1", "task_id": "no-description", "role": "DEV"}),
        )
        .expect("json"),
    )
    .await;
    let mut big = task("too-big", 0, 1);
    big["description"] = Value::String("x".repeat(5000));
    w.publish_task(&big).await;
    let mut unknown = task("no-council", 0, 1);
    unknown["role"] = Value::String("NOPE".into());
    w.publish_task(&unknown).await;
    w.publish_task(&task("good-after", 0, 1)).await;

    w.wait_event("good-after", LONG).await;
    w.wait_settled(LONG).await;
    let letters = w.dead_letters().await;
    let mut by_class: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for l in &letters {
        by_class
            .entry(l["reason_class"].as_str().unwrap_or("").to_owned())
            .or_default()
            .push(l);
    }
    assert_eq!(letters.len(), 4, "one dead letter each: {letters:#?}");
    for class in [
        "malformed",
        "schema_invalid",
        "oversized",
        "unknown_council",
    ] {
        let l = by_class
            .get(class)
            .unwrap_or_else(|| panic!("{class}: {letters:#?}"));
        assert_eq!(l.len(), 1, "{class}");
        assert_eq!(l[0]["deliveries"], 1, "{class}: not retried");
        assert!(!l[0]["reason"].as_str().unwrap_or("").is_empty());
        assert!(!l[0]["original_base64"].as_str().unwrap_or("").is_empty());
        assert_eq!(
            l[0]["original_subject"],
            format!(
                "council.tasks.{}",
                if class == "unknown_council" {
                    "NOPE"
                } else {
                    "DEV"
                }
            )
        );
    }
    assert!(
        by_class["schema_invalid"][0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("missing field `description`")
    );
    assert_eq!(by_class["schema_invalid"][0]["task_id"], "no-description");
    // Tasks whose id could be read also get their failed event, once.
    for id in ["no-description", "no-council", "too-big"] {
        let events = w.events_of(id).await;
        assert_eq!(events.len(), 1, "{id}: {events:#?}");
        assert_eq!(events[0]["event_type"], "deliberation.failed");
    }
    assert_eq!(
        w.events_of("good-after").await[0]["event_type"],
        "deliberation.completed"
    );
    assert_eq!(
        deliberations_run(&worker.addr).await,
        1,
        "only the good task ran"
    );
}

/// 6. Two worker processes on the same durable pull consumer under a stream of tasks: no
/// "already bound" errors, every task exactly one result, the work split between them.
#[tokio::test]
async fn two_workers_split_the_work() {
    let w = World::new(NatsServer::start(), None).await;
    let one = w.worker("one", "in_flight = 2", &[]);
    let two = w.worker("two", "in_flight = 2", &[]);
    let ids: Vec<String> = (0..8).map(|i| format!("pair-{i}")).collect();
    for id in &ids {
        w.publish_task(&task(id, 0, 1)).await;
    }
    for id in &ids {
        w.wait_event(id, LONG).await;
    }
    w.wait_settled(LONG).await;
    for id in &ids {
        let events = w.events_of(id).await;
        assert_eq!(events.len(), 1, "{id}");
        assert_eq!(events[0]["event_type"], "deliberation.completed");
    }
    let (a, b) = (
        deliberations_run(&one.addr).await,
        deliberations_run(&two.addr).await,
    );
    assert_eq!(a + b, 8, "each task ran once ({a} + {b})");
    assert!(a > 0 && b > 0, "both workers took tasks ({a}, {b})");
    for name in ["one", "two"] {
        assert!(!w.log(name).contains("already bound"), "{}", w.log(name));
    }
}

/// 7. SIGTERM during a deliberation with a short grace period: the worker hands the task back
/// (nak without delay), exits cleanly, and the other replica resumes it from the checkpoint
/// and delivers the one result.
#[tokio::test]
async fn sigterm_hands_the_task_over() {
    let w = World::new(NatsServer::start(), None).await;
    let settings = "ack_wait_secs = 60\nprogress_subject = \"orchestration.deliberation.progress\"";
    let mut leaving = w.worker("leaving", settings, &["--grace-secs", "1"]);
    w.publish_task(&task("handover-1", 1, 3)).await;
    // Wait until the proposals are in (the critique phase started): there is a checkpoint.
    let start = Instant::now();
    while !w
        .messages("ORCHESTRATOR_EVENTS")
        .await
        .iter()
        .any(|(_, _, b)| b["task_id"] == "handover-1" && b["status"] == "reviewing")
    {
        assert!(start.elapsed() < LONG, "the critique phase never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let staying = w.worker("staying", settings, &[]);
    sigterm(&leaving.child);
    let status = wait_exit(&mut leaving.child, Duration::from_secs(60)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "clean exit: {status:?}\n{}",
        w.log("leaving")
    );
    assert!(
        w.log("leaving")
            .contains("handing the task to another replica"),
        "{}",
        w.log("leaving")
    );
    let event = w.wait_event("handover-1", LONG).await;
    assert_eq!(event["event_type"], "deliberation.completed");
    // Delivery 2 may land in the leaving worker's last open pull request, which hands it
    // back again at once; a later delivery reaches the staying worker.
    assert!(
        event["delivery"].as_u64().unwrap_or(0) >= 2,
        "a redelivery produced it: {event}"
    );
    w.wait_settled(LONG).await;
    assert_eq!(w.events_of("handover-1").await.len(), 1);
    assert_eq!(deliberations_run(&staying.addr).await, 1);
    let log = w.log("staying");
    assert!(
        log.contains("resuming the task from its checkpoint"),
        "the proposals made before SIGTERM were not made again: {log}"
    );
}

/// A worker killed (SIGKILL) mid-deliberation: its record's heartbeat stops, and the other
/// replica, given the redelivery, waits for the record to go silent, takes the task over and
/// delivers the one result.
#[tokio::test]
async fn killed_mid_deliberation_another_replica_takes_over() {
    let w = World::new(NatsServer::start(), None).await;
    let mut dying = w.worker("dying", "", &["--heartbeat-secs", "1"]);
    w.publish_task(&task("takeover-1", 1, 3)).await;
    wait_status(
        &dying.addr,
        "takeover-1",
        DeliberationStatus::InProgress,
        LONG,
    )
    .await;
    let taking = w.worker("taking", "", &["--heartbeat-secs", "1"]);
    dying.child.kill().expect("SIGKILL");
    dying.child.wait().expect("reaped");
    let event = w.wait_event("takeover-1", LONG).await;
    assert_eq!(event["event_type"], "deliberation.completed");
    w.wait_settled(LONG).await;
    assert_eq!(w.events_of("takeover-1").await.len(), 1);
    assert_eq!(deliberations_run(&taking.addr).await, 1);
    assert!(w.dead_letters().await.is_empty());
}

/// Every deliberation slot taken by a gRPC caller: a dispatched task waits for a slot while
/// holding its delivery, instead of spending deliveries on retries, and then runs.
#[tokio::test]
async fn a_full_replica_holds_the_task_until_a_slot_frees() {
    let w = World::new(NatsServer::start(), None).await;
    let worker = w.worker("w", "in_flight = 1", &["--max-concurrent", "1"]);
    let addr = worker.addr.clone();
    let grpc = tokio::spawn(async move {
        client(&addr)
            .await
            .deliberate(pb::DeliberateRequest {
                task_id: "grpc-long".into(),
                task_description: "Design a cache for a slow upstream.".into(),
                role: "DEV".into(),
                constraints: None,
                rounds: 1,
                num_agents: 3,
                review_rounds: None,
            })
            .await
    });
    wait_status(
        &worker.addr,
        "grpc-long",
        DeliberationStatus::InProgress,
        LONG,
    )
    .await;
    w.publish_task(&task("queued-1", 0, 1)).await;
    let event = w.wait_event("queued-1", LONG).await;
    assert!(
        grpc.await.expect("joined").is_ok(),
        "the gRPC deliberation completed"
    );
    assert_eq!(event["event_type"], "deliberation.completed");
    assert_eq!(event["delivery"], 1, "waited without a redelivery");
    w.wait_settled(LONG).await;
    assert!(
        w.log("w").contains("no free deliberation slot"),
        "{}",
        w.log("w")
    );
    assert!(w.dead_letters().await.is_empty());
}

/// A completed record whose event was never marked published (the process died between the
/// two), redelivered past the duplicate window: the worker searches the events stream, finds
/// the event and does not publish a second one; when the event is not there, it publishes it.
/// Nothing runs again either way.
#[tokio::test]
async fn past_the_duplicate_window_the_events_stream_is_searched() {
    use council_runtime::store::{CouncilStore, KvConfig, KvStore};
    let w = World::new(NatsServer::start(), None).await;
    let worker = w.worker("w", "duplicate_window_secs = 1", &[]);
    let store = KvStore::open(&KvConfig {
        nats: council_runtime::nats::NatsConfig::plain(w.nats.url()),
        bucket_prefix: "council".into(),
        retention: Duration::from_secs(7 * 24 * 3600),
    })
    .await
    .expect("the worker's store");
    let earlier = council_runtime::store::now_ms() - 10_000;
    for id in ["window-out", "window-lost"] {
        store
            .write_record_at(
                council_proto::council::store::v1::DeliberationRecord {
                    task_id: id.into(),
                    role: "DEV".into(),
                    status: DeliberationStatus::Completed as i32,
                    created_at_ms: earlier - 1000,
                    updated_at_ms: earlier,
                    deadline_at_ms: earlier + 60_000,
                    instance_id: "a-process-that-died".into(),
                    response: Some(pb::DeliberateResponse {
                        task_id: id.into(),
                        winner_id: "dev-1".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                0,
            )
            .await
            .expect("record written")
            .expect("a new record");
    }
    // The dead process had published the event of one of them.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "window-out");
    w.js.publish_with_headers(
        "orchestration.deliberation.completed",
        headers,
        serde_json::to_vec(
            &json!({"event_type": "deliberation.completed", "task_id": "window-out"}),
        )
        .expect("json")
        .into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    w.publish_task(&task("window-out", 0, 1)).await;
    w.publish_task(&task("window-lost", 0, 1)).await;
    w.wait_event("window-lost", LONG).await;
    w.wait_settled(LONG).await;
    assert_eq!(
        w.events_of("window-out").await.len(),
        1,
        "not published twice"
    );
    let lost = w.events_of("window-lost").await;
    assert_eq!(lost.len(), 1, "the missing event was published");
    assert_eq!(
        lost[0]["outcome"]["winner_id"], "dev-1",
        "from the stored response"
    );
    assert_eq!(
        deliberations_run(&worker.addr).await,
        0,
        "nothing ran again"
    );
    assert!(
        w.log("w").contains("its event is in the stream already"),
        "{}",
        w.log("w")
    );
    for id in ["window-out", "window-lost"] {
        let r = store.record(id).await.expect("read").expect("record");
        assert!(r.published_at_ms > 0, "{id} marked published");
    }
}

/// A failure that another try cannot change (every prompt is longer than the engine's
/// sequences, so the quorum is lost the same way each time) is dead-lettered on its first
/// delivery with one failed event: it is not retried `max_deliver` times.
#[tokio::test]
async fn a_deterministic_failure_is_dead_lettered_at_once() {
    let w = World::new(NatsServer::start(), None).await;
    // Sequences of 8 tokens cannot hold any prompt: every engine call fails, permanently.
    let worker = w.worker("w", "", &["--max-seq-len", "8"]);
    w.publish_task(&task("doomed-1", 0, 2)).await;
    let event = w.wait_event("doomed-1", LONG).await;
    w.wait_settled(LONG).await;
    assert_eq!(event["event_type"], "deliberation.failed");
    assert_eq!(event["error"]["code"], "failed");
    assert_eq!(event["error"]["attempts"], 1);
    let letters = w.dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0]["task_id"], "doomed-1");
    assert_eq!(letters[0]["reason_class"], "failed");
    assert_eq!(letters[0]["deliveries"], 1);
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("agents still working"),
        "{}",
        letters[0]["reason"]
    );
    assert_eq!(w.events_of("doomed-1").await.len(), 1);
    assert_eq!(deliberations_run(&worker.addr).await, 1, "ran once");
    assert!(!w.log("w").contains("transient failure; retrying later"));
}

/// A worker authenticates with a token file or an nkey seed file (the server knows only the
/// public key), serves a task either way, and never logs the secret; a wrong token is refused
/// at start naming NATS.
#[tokio::test]
async fn token_and_nkey_authentication() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let auth = format!(
        "authorization {{\n  users = [\n    {{ user: \"admin\", password: \"admin-pass\" }}\n    {{ nkey: \"{}\" }}\n  ]\n}}\n",
        user.public_key()
    );
    let w = World::new(
        NatsServer::start_with_config(&auth),
        Some(("admin", "admin-pass")),
    )
    .await;
    let seed_file = w.dir.path().join("worker.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).expect("seed file");
    let worker = w.worker(
        "nkey",
        "",
        &["--nats-nkey-seed-file", seed_file.to_str().expect("utf-8")],
    );
    w.publish_task(&task("nkey-1", 0, 1)).await;
    assert_eq!(
        w.wait_event("nkey-1", LONG).await["event_type"],
        "deliberation.completed"
    );
    w.wait_settled(LONG).await;
    drop(worker);
    let log = w.log("nkey");
    assert!(!log.contains(&seed), "the seed is never logged");
    assert!(log.contains("\\\"auth\\\":\\\"nkey\\\""), "{log}");

    // A token the server does not know: start-up fails and says where.
    let token = w.dir.path().join("token");
    std::fs::write(&token, "not-the-token-at-all\n").expect("token file");
    let config = w.config("token", "");
    let out = Command::new(env!("CARGO_BIN_EXE_council"))
        .args(["serve", "--model-dir", &w.model, "--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "off", "--config"])
        .arg(&config)
        .arg("--nats-token-file")
        .arg(&token)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nats.url") && err.to_lowercase().contains("authorization"),
        "{err}"
    );
    assert!(!err.contains("not-the-token-at-all"), "{err}");
}

/// NATS over TLS with a private CA: the worker verifies the server against `nats.tls_ca` and
/// serves a task; without the CA it refuses to start, saying why.
#[tokio::test]
async fn tls_to_nats_with_a_private_ca() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).expect("ca").pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().expect("key");
    let server_cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("params")
        .signed_by(&server_key, &issuer)
        .expect("signed");
    let (ca, cert, key) = (
        dir.path().join("ca.pem"),
        dir.path().join("server.pem"),
        dir.path().join("server-key.pem"),
    );
    std::fs::write(&ca, &ca_pem).expect("ca");
    std::fs::write(&cert, server_cert.pem()).expect("cert");
    std::fs::write(&key, server_key.serialize_pem()).expect("key");
    let nats = NatsServer::start_with_config(&format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n}}\n",
        cert.to_str().expect("utf-8"),
        key.to_str().expect("utf-8")
    ));
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let options = async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(ca.clone());
    let w = World::connect(nats, url, dir, options).await;

    let worker = w.worker("tls", "", &["--nats-tls-ca", ca.to_str().expect("utf-8")]);
    w.publish_task(&task("tls-1", 0, 1)).await;
    assert_eq!(
        w.wait_event("tls-1", LONG).await["event_type"],
        "deliberation.completed"
    );
    w.wait_settled(LONG).await;
    drop(worker);

    let err = w.refused("untrusted", "");
    assert!(err.contains("nats.url"), "{err}");
}

/// Start-up refuses a consumer configured otherwise and a stream on memory storage, naming
/// what differs; with matching settings it starts again (idempotent).
#[tokio::test]
async fn startup_checks_streams_and_consumer() {
    let w = World::new(NatsServer::start(), None).await;
    let first = w.worker("first", "", &[]);
    drop(first);
    // Same settings again: fine.
    drop(w.worker("again", "", &[]));
    // Different ack_wait: refused with the difference named.
    let err = w.refused("differs", "ack_wait_secs = 9");
    assert!(
        err.contains("council-workers") && err.contains("ack_wait"),
        "{err}"
    );

    w.js.create_stream(jetstream::stream::Config {
        name: "MEMDLQ".into(),
        subjects: vec!["memdlq.tasks".into()],
        storage: jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .expect("memory stream");
    let err = w.refused(
        "memory",
        "dlq_stream = \"MEMDLQ\"\ndlq_subject = \"memdlq.tasks\"",
    );
    assert!(
        err.contains("MEMDLQ") && err.contains("memory storage"),
        "{err}"
    );
}

// ---- Hostile input and the last delivery (each fails on the code before its fix) ----

/// Waits until `pred` holds for the dead letters, returning them.
async fn wait_letters(w: &World, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let letters = w.dead_letters().await;
        if pred(&letters) {
            return letters;
        }
        assert!(
            start.elapsed() < LONG,
            "{what}: dead letters {letters:#?}\n{}",
            w.log("w")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Task ids that no header, key or file name may carry (CR/LF, spaces, 129 bytes, non-ASCII)
/// are refused when the message is read: a dead letter each, no event under such an id, no
/// panic, and the worker goes on with the next task. (Before: a CR/LF id reached the
/// `Nats-Msg-Id` header of its failed event and panicked the worker, leaving the delivery held
/// by in-progress acks forever.)
#[tokio::test]
async fn hostile_task_ids_are_dead_lettered_without_a_panic() {
    let w = World::new(NatsServer::start(), None).await;
    let worker = w.worker("w", "", &[]);
    let long = "x".repeat(129);
    let hostile = ["evil\r\nNats-Msg-Id: other", "a b", long.as_str(), "tâche"];
    for id in hostile {
        w.publish_task(&task(id, 0, 1)).await;
    }
    w.publish_task(&task("good-after-hostile", 0, 1)).await;
    w.wait_event("good-after-hostile", LONG).await;
    w.wait_settled(LONG).await;
    let letters = w.dead_letters().await;
    assert_eq!(letters.len(), hostile.len(), "{letters:#?}");
    for l in &letters {
        assert_eq!(l["reason_class"], "schema_invalid", "{l}");
        assert!(
            l["task_id"].is_null(),
            "an invalid id is not echoed as one: {l}"
        );
        assert!(
            l["reason"].as_str().unwrap_or("").contains("task_id"),
            "{l}"
        );
    }
    let events = w.messages("ORCHESTRATOR_EVENTS").await;
    assert!(
        events.iter().all(|(_, id, _)| id == "good-after-hostile"),
        "only the good task has an event: {events:#?}"
    );
    let log = w.log("w");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(deliberations_run(&worker.addr).await, 1);
}

/// A task far larger than the limit, so large that a dead letter holding all of it in base64
/// would exceed the server's `max_payload`: it is dead-lettered anyway, with as much of the
/// original as fits and its size. (Before: the dead letter could not be published, every
/// delivery was naked, and after the last one nothing was left.)
#[tokio::test]
async fn an_oversized_task_is_dead_lettered_with_what_fits() {
    let w = World::new(NatsServer::start(), None).await;
    let _worker = w.worker("w", "", &[]);
    let mut big = task("huge-1", 0, 1);
    big["description"] = Value::String("y".repeat(900_000));
    let size = serde_json::to_vec(&big).expect("json").len();
    w.publish_task(&big).await;
    let letters = wait_letters(&w, "the oversized task", |l| !l.is_empty()).await;
    w.wait_settled(LONG).await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    let l = &letters[0];
    assert_eq!(l["reason_class"], "oversized");
    assert_eq!(l["task_id"], "huge-1");
    assert_eq!(l["deliveries"], 1);
    assert_eq!(l["original_bytes"], size);
    assert_eq!(l["original_truncated"], true);
    let kept = l["original_base64"].as_str().unwrap_or("").len() / 4 * 3;
    assert!(kept > 500_000 && kept < size, "kept {kept} of {size} bytes");
    // Its id could be read and no task holds it: one failed event too.
    let events = w.events_of("huge-1").await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["error"]["code"], "oversized");
}

/// A malformed message that carries the id of a task being deliberated gets its dead letter,
/// but neither takes the task's result nor marks its record: the task completes and its one
/// event says so. (Before: the malformed message's failed event took the id's `Nats-Msg-Id`
/// first, the real completion was dropped as a duplicate, and the stream said "failed".)
#[tokio::test]
async fn a_bad_message_never_takes_a_running_tasks_result() {
    let w = World::new(NatsServer::start(), None).await;
    let worker = w.worker("w", "", &[]);
    w.publish_task(&task("contested-1", 1, 3)).await;
    wait_status(
        &worker.addr,
        "contested-1",
        DeliberationStatus::InProgress,
        LONG,
    )
    .await;
    // Same id, no description: not a valid task.
    w.publish(
        "council.tasks.DEV",
        serde_json::to_vec(
            &json!({"schema": "council.task.v1", "task_id": "contested-1", "role": "DEV"}),
        )
        .expect("json"),
    )
    .await;
    let event = w.wait_event("contested-1", LONG).await;
    w.wait_settled(LONG).await;
    assert_eq!(event["event_type"], "deliberation.completed", "{event}");
    assert_eq!(w.events_of("contested-1").await.len(), 1);
    let letters = w.dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0]["reason_class"], "schema_invalid");
    assert_eq!(letters[0]["task_id"], "contested-1");
    assert_eq!(
        record_status(&worker.addr, "contested-1").await,
        Some(DeliberationStatus::Completed)
    );
}

/// The task's record cannot be read on any delivery (a directory where its file should be):
/// the first deliveries are retried; the last one waits it out in place for two ack waits and
/// then ends in a dead letter that says why. (Before: the last delivery was naked like the
/// others, and the task vanished with no event and no dead letter.)
#[tokio::test]
async fn the_last_delivery_ends_in_a_dead_letter_not_silence() {
    let w = World::new(NatsServer::start(), None).await;
    let data = w.dir.path().join("data");
    let _worker = w.file_worker("w", &data, &[]);
    std::fs::create_dir_all(data.join("records/t-unreadable-1.pb/x")).expect("a directory");
    w.publish_task(&task("unreadable-1", 0, 1)).await;
    let letters = wait_letters(&w, "the unreadable task", |l| !l.is_empty()).await;
    w.wait_settled(LONG).await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    let l = &letters[0];
    assert_eq!(l["reason_class"], "retries_exhausted");
    assert_eq!(l["task_id"], "unreadable-1");
    assert_eq!(l["deliveries"], 3);
    let reason = l["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("cannot read the task's record") && reason.contains("delivery 3 of 3"),
        "{reason}"
    );
    let events = w.events_of("unreadable-1").await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["error"]["code"], "retries_exhausted");
    assert!(w.log("w").contains("last delivery: retrying in place"));
}

/// A record that can never be read (not a record at all) is not retried: the task is
/// dead-lettered on its first delivery.
#[tokio::test]
async fn a_corrupt_record_is_dead_lettered_at_once() {
    let w = World::new(NatsServer::start(), None).await;
    let data = w.dir.path().join("data");
    let worker = w.file_worker("w", &data, &[]);
    std::fs::write(
        data.join("records/t-corrupt-1.pb"),
        b"\xff\xff\xff not protobuf",
    )
    .expect("garbage");
    w.publish_task(&task("corrupt-1", 0, 1)).await;
    let letters = wait_letters(&w, "the corrupt record", |l| !l.is_empty()).await;
    w.wait_settled(LONG).await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0]["reason_class"], "failed");
    assert_eq!(letters[0]["deliveries"], 1, "not retried");
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("cannot be read"),
        "{}",
        letters[0]["reason"]
    );
    assert_eq!(deliberations_run(&worker.addr).await, 0);
}

/// An events stream that refuses the completed event (its messages are limited to 300
/// bytes): the refusal would come again, so the task is dead-lettered at once saying so, and
/// its outcome stays in the record for GetDeliberationResult.
#[tokio::test]
async fn an_event_the_stream_refuses_is_dead_lettered_at_once() {
    let w = World::new(NatsServer::start(), None).await;
    w.js.create_stream(jetstream::stream::Config {
        name: "ORCHESTRATOR_EVENTS".into(),
        subjects: vec!["orchestration.>".into()],
        max_message_size: 300,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .expect("a small events stream");
    let worker = w.worker("w", "", &[]);
    w.publish_task(&task("too-wordy-1", 0, 2)).await;
    let letters = wait_letters(&w, "the refused event", |l| !l.is_empty()).await;
    w.wait_settled(LONG).await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0]["reason_class"], "event_refused");
    assert_eq!(letters[0]["deliveries"], 1);
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("deliberation.completed"),
        "{}",
        letters[0]["reason"]
    );
    assert_eq!(
        record_status(&worker.addr, "too-wordy-1").await,
        Some(DeliberationStatus::Completed)
    );
    assert_eq!(deliberations_run(&worker.addr).await, 1);
}

/// Another replica takes over a running task's record (as when it judged this run dead): the
/// first replica's heartbeats are compare-and-set on the revision it claimed, so they fail,
/// it stops its run and writes nothing more; when the usurper goes silent, the task is taken
/// back and completes once. (Before: heartbeats were unconditional puts that overwrote the
/// other replica's record.)
#[tokio::test]
async fn a_replica_whose_run_was_taken_over_stops_writing() {
    use council_runtime::store::{CouncilStore, KvConfig, KvStore};
    let w = World::new(NatsServer::start(), None).await;
    let worker = w.worker("w", "", &["--heartbeat-secs", "1"]);
    w.publish_task(&task("usurped-1", 1, 3)).await;
    wait_status(
        &worker.addr,
        "usurped-1",
        DeliberationStatus::InProgress,
        LONG,
    )
    .await;
    let store = KvStore::open(&KvConfig {
        nats: council_runtime::nats::NatsConfig::plain(w.nats.url()),
        bucket_prefix: "council".into(),
        retention: Duration::from_secs(7 * 24 * 3600),
    })
    .await
    .expect("the worker's store");
    // The usurper claims the record and keeps it alive for a few heartbeats, each a
    // compare-and-set: any write in between by the first replica makes one fail.
    let (mut record, mut revision) = loop {
        let (mut r, at) = store
            .record_at("usurped-1")
            .await
            .expect("read")
            .expect("a record");
        r.instance_id = "usurper".into();
        r.updated_at_ms = council_runtime::store::now_ms();
        // The first replica may heartbeat between the read and the claim: read again.
        if let Some(next) = store.write_record_at(r.clone(), at).await.expect("write") {
            break (r, next);
        }
    };
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        record.updated_at_ms = council_runtime::store::now_ms();
        revision = store
            .write_record_at(record.clone(), revision)
            .await
            .expect("write")
            .unwrap_or_else(|| {
                panic!(
                    "the first replica wrote the usurper's record\n{}",
                    w.log("w")
                )
            });
    }
    assert!(
        w.log("w").contains("taken over by another replica"),
        "{}",
        w.log("w")
    );
    // The usurper goes silent: the first replica takes the task back and completes it once.
    let event = w.wait_event("usurped-1", LONG).await;
    assert_eq!(event["event_type"], "deliberation.completed");
    w.wait_settled(LONG).await;
    assert_eq!(w.events_of("usurped-1").await.len(), 1);
    assert!(w.dead_letters().await.is_empty());
}

/// Publishes `body` on `subject`, retrying through a NATS restart.
async fn publish_until_taken(w: &World, subject: &str, body: Vec<u8>) {
    let start = Instant::now();
    loop {
        let sent = async {
            w.js.publish(subject.to_owned(), body.clone().into())
                .await?
                .await
        }
        .await;
        match sent {
            Ok(_) => return,
            Err(e) => {
                assert!(start.elapsed() < LONG, "cannot publish: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The soak: a few hundred messages (valid tasks, duplicates of them, malformed JSON,
/// schema-invalid tasks, CR/LF ids, oversized bodies) to two replicas, one of which is killed
/// with SIGKILL and replaced, while the NATS server is restarted once. Then the count: exactly
/// one completed event per valid task id, exactly one dead letter per bad message, a failed
/// event only for a bad message whose id is readable and free, and nothing pending.
#[tokio::test]
async fn soak_every_message_ends_exactly_once() {
    let mut w = World::new(NatsServer::start(), None).await;
    let settings = "in_flight = 4\nmax_deliver = 6";
    let mut a = w.worker("a", settings, &["--heartbeat-secs", "1"]);
    let _b = w.worker("b", settings, &["--heartbeat-secs", "1"]);
    const VALID: usize = 240;
    let mut bad: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut failed_ids = Vec::new();
    for i in 0..15 {
        bad.push((
            "malformed",
            format!("{{\"task_id\": \"m-{i}\", oops").into_bytes(),
        ));
        let id = format!("invalid-{i}");
        let mut t = task(&id, 0, 1);
        t.as_object_mut().expect("object").remove("description");
        bad.push(("schema_invalid", serde_json::to_vec(&t).expect("json")));
        failed_ids.push(id);
        let crlf = task(&format!("crlf-{i}\r\nNats-Msg-Id: soak-{i}"), 0, 1);
        bad.push(("schema_invalid", serde_json::to_vec(&crlf).expect("json")));
    }
    for i in 0..8 {
        let id = format!("big-{i}");
        let mut t = task(&id, 0, 1);
        t["description"] = Value::String("z".repeat(5000 + i * 20_000));
        bad.push(("oversized", serde_json::to_vec(&t).expect("json")));
        failed_ids.push(id);
    }
    let mut bad_iter = bad.iter();
    for i in 0..VALID {
        let body = serde_json::to_vec(&task(&format!("soak-{i}"), 0, 1)).expect("json");
        publish_until_taken(&w, "council.tasks.DEV", body.clone()).await;
        if i % 4 == 0 {
            // A duplicate of a valid task: the same id again.
            let dup = serde_json::to_vec(&task(&format!("soak-{}", i / 2), 0, 1)).expect("json");
            publish_until_taken(&w, "council.tasks.DEV", dup).await;
        }
        if i % 2 == 0
            && let Some((_, body)) = bad_iter.next()
        {
            publish_until_taken(&w, "council.tasks.DEV", body.clone()).await;
        }
        if i == VALID / 3 {
            a.child.kill().expect("SIGKILL");
            a.child.wait().expect("reaped");
            a = w.worker("a2", settings, &["--heartbeat-secs", "1"]);
        }
        if i == 2 * VALID / 3 {
            w.nats.stop();
            tokio::time::sleep(Duration::from_secs(1)).await;
            w.nats.restart();
        }
    }
    for (_, body) in bad_iter {
        publish_until_taken(&w, "council.tasks.DEV", body.clone()).await;
    }

    // Every valid id answered, every bad message dead-lettered, nothing pending.
    let start = Instant::now();
    loop {
        let done = {
            let events = w.messages("ORCHESTRATOR_EVENTS").await;
            let answered: std::collections::BTreeSet<String> = events
                .iter()
                .filter_map(|(_, _, b)| b["task_id"].as_str().map(str::to_owned))
                .collect();
            (0..VALID).all(|i| answered.contains(&format!("soak-{i}")))
                && w.dead_letters().await.len() >= bad.len()
        };
        if done {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "not every message ended\n{}\n{}",
            w.log("a2"),
            w.log("b")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    w.wait_settled(LONG).await;
    // Let any late duplicate arrive before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let events = w.messages("ORCHESTRATOR_EVENTS").await;
    let mut per_id: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for (_, _, body) in &events {
        if let Some(id) = body["task_id"].as_str() {
            per_id.entry(id.to_owned()).or_default().push(body);
        }
    }
    for i in 0..VALID {
        let id = format!("soak-{i}");
        let got = per_id.get(&id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(got.len(), 1, "{id}: {got:#?}");
        assert_eq!(got[0]["event_type"], "deliberation.completed", "{id}");
    }
    for id in &failed_ids {
        let got = per_id.get(id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(got.len(), 1, "{id}: {got:#?}");
        assert_eq!(got[0]["event_type"], "deliberation.failed", "{id}");
    }
    assert_eq!(
        per_id.len(),
        VALID + failed_ids.len(),
        "no other id has an event: {:?}",
        per_id.keys().collect::<Vec<_>>()
    );
    let letters = w.dead_letters().await;
    let mut by_sequence: BTreeMap<u64, usize> = BTreeMap::new();
    let mut by_class: BTreeMap<String, usize> = BTreeMap::new();
    for l in &letters {
        *by_sequence
            .entry(l["original_stream_sequence"].as_u64().unwrap_or(0))
            .or_default() += 1;
        *by_class
            .entry(l["reason_class"].as_str().unwrap_or("").to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        letters.len(),
        bad.len(),
        "one dead letter per bad message: {by_class:?}"
    );
    assert!(by_sequence.values().all(|n| *n == 1), "{by_sequence:?}");
    let mut want: BTreeMap<String, usize> = BTreeMap::new();
    for (class, _) in &bad {
        *want.entry((*class).to_owned()).or_default() += 1;
    }
    assert_eq!(by_class, want);
    for log in [w.log("a2"), w.log("b")] {
        assert!(!log.contains("panicked"), "{log}");
    }
}

/// An OpenAI-compatible server that lists the model and then fails every completion with 503
/// (a test double of a sick vLLM); returns its base URL. It serves on the test's runtime, which
/// must have worker threads to spare while the test blocks on starting a worker.
async fn sick_vllm() -> String {
    use axum::routing::{get, post};
    let models = json!({"object": "list", "data": [
        {"id": council_runtime::model_source::DEFAULT_MODEL, "object": "model", "max_model_len": 4096}
    ]});
    let app = axum::Router::new()
        .route(
            "/v1/models",
            get(move || {
                let body = models.to_string();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        body,
                    )
                }
            }),
        )
        .route(
            "/v1/chat/completions",
            post(|| async {
                (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    json!({"error": {"message": "sick on purpose"}}).to_string(),
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// A replica whose backend is unhealthy (a vLLM server failing every call, its circuit breaker
/// open) stops pulling: a task published meanwhile stays in the stream for a healthy replica
/// instead of burning its deliveries here. (Before: the pull loop never looked at the backend.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_replica_pulls_nothing() {
    let w = World::new(NatsServer::start(), None).await;
    let url = sick_vllm().await;
    let config = w.config("w", "max_deliver = 10");
    let log = std::fs::File::create(w.log_path("w")).expect("log file");
    let worker = common::serve_args(
        &[
            "--vllm-url",
            &url,
            "--config",
            config.to_str().expect("utf-8"),
            "--log-format",
            "json",
        ],
        Stdio::from(log),
    );
    w.publish_task(&task("sick-first", 0, 3)).await;
    // Its failures open the breaker; readiness follows.
    assert!(
        not_serving_within(&worker.addr, Duration::from_secs(60)).await,
        "the breaker never opened\n{}",
        w.log("w")
    );
    w.publish_task(&task("sick-second", 0, 1)).await;
    // Well inside the breaker's 10 s: nothing is pulled.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ran_second = w
        .log("w")
        .lines()
        .any(|l| l.contains("deliberation finished") && l.contains("\"task_id\":\"sick-second\""));
    assert!(
        !ran_second,
        "the unhealthy replica ran the new task\n{}",
        w.log("w")
    );
    assert!(
        w.log("w")
            .contains("not pulling tasks until the backend and the store are healthy"),
        "{}",
        w.log("w")
    );
    assert!(w.events_of("sick-second").await.is_empty());
}

/// DeliberateForBacklogReview on a replica with dispatch: answered at once over gRPC, and the
/// background deliberation's completed event lands on the events stream as a dispatched
/// task's does (one, under the task id).
#[tokio::test]
async fn backlog_review_results_are_published_to_jetstream() {
    let w = World::new(NatsServer::start(), None).await;
    let worker = w.worker("w", "", &[]);
    let accepted = client(&worker.addr)
        .await
        .deliberate_for_backlog_review(pb::DeliberateRequest {
            task_id: "backlog-1".into(),
            task_description: "Review the backlog item: retries for the payment client.".into(),
            role: "ARCHITECT".into(),
            constraints: Some(pb::TaskConstraints {
                metadata: [("story_id".to_owned(), "S-9".to_owned())].into(),
                ..Default::default()
            }),
            rounds: 0,
            num_agents: 2,
            review_rounds: Some(0),
        })
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(accepted.task_id, "backlog-1");
    let event = w.wait_event("backlog-1", LONG).await;
    assert_eq!(event["event_type"], "deliberation.completed");
    assert_eq!(event["story_id"], "S-9");
    assert_eq!(event["role"], "ARCHITECT");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(w.events_of("backlog-1").await.len(), 1);
    assert_eq!(
        record_status(&worker.addr, "backlog-1").await,
        Some(DeliberationStatus::Completed)
    );
}
