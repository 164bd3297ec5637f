//! The gRPC service end to end on 127.0.0.1:0 with a tiny generated model and a file store:
//! every RPC, every error code, health, auth, reflection, metrics, streaming, cancellation and
//! the shutdown drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use council_councils::spec::JudgeMode;
use council_councils::{CouncilSpec, Role};
use council_inference::tiny::TinyArch;
use council_inference::{
    Backend, BackendFuture, BackendLoad, EngineConfig, EngineHandle, GenerateRequest, Health,
    ModelInfo,
};
use council_proto::council::store::v1::DeliberationRecord;
use council_proto::fleet::orchestrator::v1 as pb;
use council_proto::fleet::orchestrator::v1::DeliberationStatus;
use council_proto::fleet::orchestrator::v1::orchestrator_service_client::OrchestratorServiceClient;
use council_runtime::cli::server::{self, Options};
use council_runtime::run::Limits;
use council_runtime::service::LIVENESS_SERVICE;
use council_runtime::store::{
    Claim, CouncilStore, Created, FileStore, StoreError, Versioned, apply_default_councils,
};
use council_tests::{engine, tiny_model};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// The engine, with a switch that makes it report itself unhealthy (a test double).
#[derive(Debug)]
struct Switchable {
    inner: EngineHandle,
    sick: Arc<AtomicBool>,
    /// Reports the backend stopped for good.
    gone: Arc<AtomicBool>,
    /// Choice-scoring (log-prob judging) requests seen.
    scored: Arc<AtomicUsize>,
    /// Whether it says it can score choices (a server without any scoring form says no).
    scores_choices: bool,
}

impl Backend for Switchable {
    fn generate(&self, request: GenerateRequest) -> BackendFuture {
        self.inner.generate(request)
    }
    fn score(&self, request: council_inference::ScoreRequest) -> council_inference::ScoreFuture {
        self.scored.fetch_add(1, Ordering::SeqCst);
        self.inner.score(request)
    }
    fn scores_choices(&self) -> bool {
        self.scores_choices
    }
    fn health(&self) -> Health {
        if self.gone.load(Ordering::SeqCst) {
            Health::Stopped {
                reason: "switched off for good by the test".into(),
            }
        } else if self.sick.load(Ordering::SeqCst) {
            Health::Unavailable {
                reason: "switched off by the test".into(),
            }
        } else {
            self.inner.health()
        }
    }
    fn model_info(&self) -> &ModelInfo {
        self.inner.model_info()
    }
    fn load(&self) -> BackendLoad {
        self.inner.load()
    }
}

/// The file store, with a switch that makes every call fail as unreachable (a test double).
#[derive(Debug)]
struct Flaky {
    inner: FileStore,
    down: Arc<AtomicBool>,
}

impl Flaky {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable {
                store: "flaky".into(),
                reason: "switched off by the test".into(),
            })
        } else {
            Ok(())
        }
    }
}

#[tonic::async_trait]
impl CouncilStore for Flaky {
    async fn list(&self) -> Result<Vec<CouncilSpec>, StoreError> {
        self.check()?;
        self.inner.list().await
    }
    async fn get(&self, role: &Role) -> Result<Option<CouncilSpec>, StoreError> {
        self.check()?;
        self.inner.get(role).await
    }
    async fn create(&self, spec: CouncilSpec) -> Result<Created, StoreError> {
        self.check()?;
        self.inner.create(spec).await
    }
    async fn delete(&self, role: &Role) -> Result<CouncilSpec, StoreError> {
        self.check()?;
        self.inner.delete(role).await
    }
    async fn replace(&self, expected: &CouncilSpec, new: CouncilSpec) -> Result<(), StoreError> {
        self.check()?;
        self.inner.replace(expected, new).await
    }
    async fn record_at(&self, task_id: &str) -> Result<Option<Versioned>, StoreError> {
        self.check()?;
        self.inner.record_at(task_id).await
    }
    async fn claim(&self, record: DeliberationRecord, now_ms: i64) -> Result<Claim, StoreError> {
        self.check()?;
        self.inner.claim(record, now_ms).await
    }
    async fn write_record_at(
        &self,
        record: DeliberationRecord,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        self.check()?;
        self.inner.write_record_at(record, revision).await
    }
    async fn write_checkpoint(&self, task_id: &str, checkpoint: Vec<u8>) -> Result<(), StoreError> {
        self.check()?;
        self.inner.write_checkpoint(task_id, checkpoint).await
    }
    async fn read_checkpoint(&self, task_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.check()?;
        self.inner.read_checkpoint(task_id).await
    }
    async fn purge_records(&self, before_ms: i64) -> Result<usize, StoreError> {
        self.check()?;
        self.inner.purge_records(before_ms).await
    }
    fn health(&self) -> Result<(), String> {
        self.check().map_err(|e| e.to_string())
    }
}

struct Server {
    client: OrchestratorServiceClient<Channel>,
    channel: Channel,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
    engine: EngineHandle,
    sick: Arc<AtomicBool>,
    gone: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    scored: Arc<AtomicUsize>,
    metrics: SocketAddr,
    _model: tempfile::TempDir,
    _data: tempfile::TempDir,
}

impl Server {
    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    async fn stopped(&mut self) {
        self.shutdown();
        tokio::time::timeout(Duration::from_secs(60), &mut self.done)
            .await
            .expect("stops")
            .expect("task")
            .expect("clean exit");
    }

    async fn record(&self, task: &str) -> Result<pb::GetDeliberationResultResponse, tonic::Status> {
        self.client
            .clone()
            .get_deliberation_result(pb::GetDeliberationResultRequest {
                task_id: task.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Polls the record of `task` until `done` says so (bounded).
    async fn wait_record(
        &self,
        task: &str,
        done: impl Fn(&pb::GetDeliberationResultResponse) -> bool,
    ) -> pb::GetDeliberationResultResponse {
        let mut last = None;
        for _ in 0..600 {
            match self.record(task).await {
                Ok(r) if done(&r) => return r,
                Ok(r) => last = Some(format!("{:?} {:?}", r.status(), r.error_message)),
                Err(e) => last = Some(format!("no record: {e}")),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the record of {task} never reached the expected state in 30 s; last seen: {last:?}"
        );
    }

    async fn health(&self) -> ServingStatus {
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "fleet.orchestrator.v1.OrchestratorService".into(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status()
    }

    async fn wait_health(&self, want: ServingStatus) {
        for _ in 0..100 {
            if self.health().await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("health never became {want:?}");
    }
}

async fn start(limits: Limits) -> Server {
    start_with(Options::new(limits)).await
}

async fn start_with(options: Options) -> Server {
    start_scoring(options, true).await
}

async fn start_scoring(mut options: Options, scores_choices: bool) -> Server {
    let model = tiny_model(TinyArch::Qwen2);
    let data = tempfile::tempdir().expect("data dir");
    let store = FileStore::open(data.path()).expect("store");
    apply_default_councils(&store).await.expect("defaults");
    let down = Arc::new(AtomicBool::new(false));
    let store = Flaky {
        inner: store,
        down: down.clone(),
    };
    let engine_handle = engine(model.path(), EngineConfig::default());
    let sick = Arc::new(AtomicBool::new(false));
    let gone = Arc::new(AtomicBool::new(false));
    let scored = Arc::new(AtomicUsize::new(0));
    let backend = Switchable {
        inner: engine_handle.clone(),
        sick: sick.clone(),
        gone: gone.clone(),
        scored: scored.clone(),
        scores_choices,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind metrics");
    let metrics_addr = metrics.local_addr().expect("metrics addr");
    options.metrics = Some(metrics);
    let token = options.auth_token.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(server::serve(
        listener,
        Arc::new(backend),
        Arc::new(store),
        options,
        async move {
            let _ = stopped.await;
        },
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    let client = OrchestratorServiceClient::new(channel.clone());
    let server = Server {
        client,
        channel,
        stop: Some(stop),
        done,
        engine: engine_handle,
        sick,
        gone,
        down,
        scored,
        metrics: metrics_addr,
        _model: model,
        _data: data,
    };
    if token.is_none() {
        server.wait_health(ServingStatus::Serving).await;
    }
    server
}

fn request(task_id: &str, role: &str, rounds: i32) -> pb::DeliberateRequest {
    pb::DeliberateRequest {
        task_id: task_id.into(),
        task_description: "Name one risk of retrying forever.".into(),
        role: role.into(),
        constraints: Some(pb::TaskConstraints {
            rubric: "correctness; clarity".into(),
            requirements: vec!["mention backoff".into()],
            metadata: Default::default(),
            max_iterations: 0,
            timeout_seconds: 0,
        }),
        rounds,
        num_agents: 3,
        review_rounds: Some(rounds),
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("writes");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("reads");
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, response)
}

#[tokio::test]
async fn deliberate_and_manage_councils_over_grpc() {
    let mut s = start(Limits::default()).await;
    let c = &mut s.client;

    let listed = c
        .list_councils(pb::ListCouncilsRequest {
            role_filter: String::new(),
            include_agents: true,
        })
        .await
        .expect("list")
        .into_inner();
    let roles: Vec<&str> = listed.councils.iter().map(|c| c.role.as_str()).collect();
    assert_eq!(roles, vec!["DEV", "QA", "ARCHITECT", "DEVOPS", "DATA"]);
    assert!(
        listed
            .councils
            .iter()
            .all(|c| c.agents.len() == 3 && c.num_agents == 3 && c.status == "ready")
    );

    let response = c
        .deliberate(request("task-1", "dev", 1))
        .await
        .expect("deliberates")
        .into_inner();
    assert_eq!(response.task_id, "task-1");
    assert_eq!(response.results.len(), 3);
    let ranks: Vec<i32> = response.results.iter().map(|r| r.rank).collect();
    assert_eq!(ranks, vec![1, 2, 3]);
    let winner = response.results[0].proposal.as_ref().expect("proposal");
    assert_eq!(response.winner_id, winner.author_id);
    assert!(winner.created_at_ms > 0 && !winner.content.is_empty());
    let suite = response.results[0].checks.as_ref().expect("checks");
    // Checks that did not run are absent, and absence fails no gate: `all_passed` says no
    // check that ran failed. (Before: lint read {passed: false, error_count: 0} and
    // all_passed was false for every proposal.)
    assert!(
        suite.policy.is_none() && suite.lint.is_none() && suite.dryrun.is_none(),
        "{suite:?}"
    );
    assert!(suite.all_passed, "{suite:?}");
    assert!(
        suite
            .additional_checks
            .iter()
            .all(|c| !c.passed && c.details.get("status").map(String::as_str) == Some("skipped"))
    );
    let summary = response.summary.as_ref().expect("summary");
    assert!(
        summary.calls >= 9 && summary.prompt_tokens > 0,
        "{summary:?}"
    );
    assert!(response.metadata.as_ref().expect("metadata").timestamp_ms > 0);

    // The record holds the same result.
    let record = s.record("task-1").await.expect("record");
    assert_eq!(record.status(), DeliberationStatus::Completed);
    assert_eq!(record.winner_id, response.winner_id);
    assert_eq!(record.results, response.results);
    assert!(record.error_message.is_empty());

    // The same task id again is answered from its record: nothing runs twice.
    let steps = s.engine.stats().steps;
    let again = s
        .client
        .deliberate(request("task-1", "DEV", 1))
        .await
        .expect("again")
        .into_inner();
    assert_eq!(again, response);
    assert_eq!(s.engine.stats().steps, steps, "no model work for a repeat");
    let c = &mut s.client;

    // Councils: idempotent create, conflicting create, delete, not found.
    let create = |rounds: i32| pb::CreateCouncilRequest {
        role: "SECURITY".into(),
        num_agents: 2,
        config: Some(pb::CouncilConfig {
            deliberation_rounds: rounds,
            enable_peer_review: true,
            model_profile: String::new(),
            custom_params: Default::default(),
            agent_type: String::new(),
        }),
    };
    let made = c
        .create_council(create(2))
        .await
        .expect("create")
        .into_inner();
    assert_eq!((made.agents_created, made.agent_ids.len()), (2, 2));
    let same = c
        .create_council(create(2))
        .await
        .expect("idempotent")
        .into_inner();
    assert_eq!(same.agents_created, 0);
    assert_eq!(
        c.create_council(create(3))
            .await
            .expect_err("conflict")
            .code(),
        Code::AlreadyExists
    );
    let deleted = c
        .delete_council(pb::DeleteCouncilRequest {
            role: "SECURITY".into(),
        })
        .await
        .expect("delete")
        .into_inner();
    assert!(deleted.success && deleted.agents_removed == 2);
    assert_eq!(
        c.delete_council(pb::DeleteCouncilRequest {
            role: "SECURITY".into()
        })
        .await
        .expect_err("gone")
        .code(),
        Code::NotFound
    );

    let status = c
        .get_status(pb::GetStatusRequest {
            include_stats: true,
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.status, "SERVING");
    let stats = status.stats.expect("stats");
    assert_eq!(stats.total_deliberations, 1);
    assert!(stats.avg_deliberation_time_ms > 0.0);
    // Real counts: one DEV deliberation, no orchestration (before: the agents of each
    // council, and orchestrations mirroring deliberations).
    assert_eq!(
        stats.role_counts,
        std::collections::HashMap::from([("DEV".to_owned(), 1)])
    );
    assert_eq!(stats.total_orchestrations, 0);
    let performance = c
        .get_metrics(pb::GetMetricsRequest {
            metric_type: "performance".into(),
            time_range_ms: 0,
        })
        .await
        .expect("metrics")
        .into_inner()
        .performance
        .expect("performance");
    assert!(performance.avg_deliberation_ms > 0.0);
    assert_eq!(performance.avg_orchestration_ms, 0.0);

    // Health: serving now, not serving once shutdown starts.
    assert_eq!(s.health().await, ServingStatus::Serving);
    s.stopped().await;
}

#[tokio::test]
async fn bad_requests_get_precise_codes_before_any_llm_call() {
    let mut s = start(Limits::default()).await;
    let c = &mut s.client;
    let cases: Vec<(pb::DeliberateRequest, Code, &str)> = vec![
        (
            pb::DeliberateRequest {
                task_id: "a b".into(),
                ..request("x", "DEV", 1)
            },
            Code::InvalidArgument,
            "task_id",
        ),
        (
            pb::DeliberateRequest {
                task_description: " ".into(),
                ..request("x", "DEV", 1)
            },
            Code::InvalidArgument,
            "task_description",
        ),
        (request("x", "9-bad role", 1), Code::InvalidArgument, "role"),
        (request("x", "SECURITY", 1), Code::NotFound, "SECURITY"),
        (request("x", "DEV", 11), Code::InvalidArgument, "rounds"),
        (request("x", "DEV", -1), Code::InvalidArgument, "rounds"),
        (
            pb::DeliberateRequest {
                num_agents: 4,
                review_rounds: None,
                ..request("x", "DEV", 1)
            },
            Code::InvalidArgument,
            "num_agents",
        ),
        (
            pb::DeliberateRequest {
                task_description: "x".repeat(40_000),
                ..request("x", "DEV", 1)
            },
            Code::InvalidArgument,
            "task_description",
        ),
        (
            pb::DeliberateRequest {
                constraints: Some(pb::TaskConstraints {
                    timeout_seconds: -1,
                    ..Default::default()
                }),
                ..request("x", "DEV", 1)
            },
            Code::InvalidArgument,
            "timeout_seconds",
        ),
    ];
    for (req, code, needle) in cases {
        let err = c.deliberate(req.clone()).await.expect_err(needle);
        assert_eq!(err.code(), code, "{needle}: {err:?}");
        assert!(
            err.message().contains(needle),
            "{needle} not named in {:?}",
            err.message()
        );
        // The stream refuses the same way, before sending anything.
        let err = c.stream_deliberation(req).await.expect_err(needle);
        assert_eq!(err.code(), code, "stream {needle}: {err:?}");
    }
    // Nothing was recorded for refused requests.
    assert_eq!(
        s.record("x").await.expect_err("none").code(),
        Code::NotFound
    );
    let bad_id = s.record("../etc").await.expect_err("invalid id");
    assert_eq!(bad_id.code(), Code::InvalidArgument);
    assert!(bad_id.message().contains("task_id"), "{}", bad_id.message());
    assert_eq!(s.engine.stats().steps, 0, "no LLM call for bad input");
    let status = s
        .client
        .get_status(pb::GetStatusRequest {
            include_stats: true,
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.stats.expect("stats").total_deliberations, 0);
}

#[tokio::test]
async fn overload_and_deadlines_have_their_codes() {
    let mut s = start(Limits {
        max_concurrent: 1,
        ..Limits::default()
    })
    .await;
    let mut long = request("long", "DEV", 3);
    long.constraints
        .as_mut()
        .expect("constraints")
        .timeout_seconds = 1;
    let mut busy = s.client.clone();
    let first = tokio::spawn(async move { busy.deliberate(long).await });
    // Once the engine is working, the first deliberation holds the only slot (it takes the slot
    // before its first LLM call): the next one is refused at once.
    while s.engine.stats().steps == 0 {
        assert!(
            !first.is_finished(),
            "the first deliberation ended before it reached the engine"
        );
        tokio::task::yield_now().await;
    }
    let refused = s
        .client
        .deliberate(request("second", "QA", 0))
        .await
        .expect_err("overloaded");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("limit 1"),
        "{}",
        refused.message()
    );
    // A second call for a task that is running is refused too, and names the task.
    let dup = s
        .client
        .deliberate(request("long", "DEV", 3))
        .await
        .expect_err("busy");
    assert!(
        matches!(dup.code(), Code::ResourceExhausted | Code::Aborted),
        "{dup:?}"
    );
    let err = first.await.expect("joined").expect_err("deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let record = s
        .wait_record("long", |r| r.status() != DeliberationStatus::InProgress)
        .await;
    assert_eq!(record.status(), DeliberationStatus::Timeout);
    assert!(record.error_message.contains("deadline"), "{record:?}");
    // The refused task left no record.
    assert_eq!(
        s.record("second").await.expect_err("none").code(),
        Code::NotFound
    );

    // The client's own grpc-timeout bounds the deliberation the same way: the server answers
    // DEADLINE_EXCEEDED itself and records TIMEOUT (not a cancellation).
    let mut timed = tonic::Request::new(request("client-deadline", "DEV", 3));
    timed.set_timeout(Duration::from_millis(1500));
    let err = s.client.deliberate(timed).await.expect_err("deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let record = s
        .wait_record("client-deadline", |r| {
            r.status() != DeliberationStatus::InProgress
        })
        .await;
    assert_eq!(record.status(), DeliberationStatus::Timeout, "{record:?}");
    // A timed-out task may be run again.
    let mut retry = request("client-deadline", "DEV", 0);
    retry.num_agents = 1;
    s.client.deliberate(retry).await.expect("retry runs");
}

#[tokio::test]
async fn stream_delivers_ordered_progress_then_the_result() {
    let s = start(Limits::default()).await;
    let mut stream = s
        .client
        .clone()
        .stream_deliberation(request("streamed", "DEV", 1))
        .await
        .expect("stream opens")
        .into_inner();
    let mut updates = Vec::new();
    while let Some(update) = stream.message().await.expect("no error") {
        updates.push(update);
    }
    let last = updates.last().expect("updates").clone();
    assert_eq!(last.status, "complete");
    assert_eq!(last.progress_percent, 100);
    let response = last.response.expect("final response");
    assert_eq!(response.results.len(), 3);
    assert_eq!(last.partial_result.as_ref(), response.results.first());
    assert_eq!(last.current_agent, response.winner_id);
    // Progress only rises, and phases come in protocol order.
    let percents: Vec<i32> = updates.iter().map(|u| u.progress_percent).collect();
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "{percents:?}");
    assert!(percents[..percents.len() - 1].iter().all(|p| *p < 100));
    let mut phases: Vec<&str> = updates.iter().map(|u| u.status.as_str()).collect();
    phases.dedup();
    assert_eq!(
        phases,
        vec![
            "generating",
            "reviewing",
            "generating",
            "scoring",
            "complete"
        ],
        "propose, critique, revise, score"
    );
    // Every agent is reported by name as its call comes back, in the first phase too.
    let propose_agents: Vec<&str> = updates
        .iter()
        .take_while(|u| u.status == "generating")
        .filter(|u| !u.current_agent.is_empty())
        .map(|u| u.current_agent.as_str())
        .collect();
    assert_eq!(
        propose_agents.len(),
        3,
        "{:#?}",
        updates
            .iter()
            .map(|u| (&u.status, u.progress_percent, &u.current_step))
            .collect::<Vec<_>>()
    );
    let record = s.record("streamed").await.expect("record");
    assert_eq!(record.status(), DeliberationStatus::Completed);
    assert_eq!(record.results, response.results);

    // Streaming a finished task again gives its result at once.
    let mut again = s
        .client
        .clone()
        .stream_deliberation(request("streamed", "DEV", 1))
        .await
        .expect("stream opens")
        .into_inner();
    let only = again.message().await.expect("ok").expect("one update");
    assert_eq!(only.status, "complete");
    assert_eq!(only.response.expect("response").results, response.results);
    assert!(again.message().await.expect("ok").is_none());
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_deliberation() {
    let s = start(Limits::default()).await;
    let mut stream = s
        .client
        .clone()
        .stream_deliberation(request("abandoned", "DEV", 10))
        .await
        .expect("stream opens")
        .into_inner();
    // Wait until the model is working on it, then hang up.
    stream.message().await.expect("ok").expect("first update");
    drop(stream);
    let record = s
        .wait_record("abandoned", |r| {
            r.status() != DeliberationStatus::InProgress
        })
        .await;
    assert_eq!(record.status(), DeliberationStatus::Failed);
    assert!(
        record.error_message.contains("cancelled by the client"),
        "{record:?}"
    );
    let tags = record.metadata.expect("metadata").tags;
    assert_eq!(tags.get("retryable").map(String::as_str), Some("true"));
    // Its backend requests were dropped too; the engine goes idle.
    for _ in 0..200 {
        let load = s.engine.load();
        if load.running == 0 && load.waiting == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let load = s.engine.load();
    assert_eq!((load.running, load.waiting), (0, 0), "{load:?}");
    assert!(s.engine.stats().cancelled > 0, "{:?}", s.engine.stats());

    // A unary call cancelled by its client ends the same way.
    let mut client = s.client.clone();
    let call = tokio::spawn(async move { client.deliberate(request("hung-up", "QA", 10)).await });
    s.wait_record("hung-up", |r| r.status() == DeliberationStatus::InProgress)
        .await;
    call.abort();
    let record = s
        .wait_record("hung-up", |r| r.status() != DeliberationStatus::InProgress)
        .await;
    assert!(
        record.error_message.contains("cancelled by the client"),
        "{record:?}"
    );
}

#[tokio::test]
async fn agents_register_and_unregister() {
    let s = start(Limits::default()).await;
    let mut c = s.client.clone();
    let register = |id: &str, role: &str, persona: &str| pb::RegisterAgentRequest {
        agent_id: id.into(),
        role: role.into(),
        capabilities: Some(pb::AgentCapabilities {
            supported_tasks: vec!["deliberate".into()],
            model_profile: "default".into(),
            max_concurrent_tasks: 0,
            languages: vec![],
        }),
        endpoint: String::new(),
        metadata: [("persona".to_owned(), persona.to_owned())].into(),
    };
    let made = c
        .register_agent(register("dev-extra", "DEV", "You distrust shared state."))
        .await
        .expect("registers")
        .into_inner();
    assert!(made.success && !made.council_id.is_empty(), "{made:?}");
    let dev = |c: &mut OrchestratorServiceClient<Channel>| {
        let mut c = c.clone();
        async move {
            c.list_councils(pb::ListCouncilsRequest {
                role_filter: "DEV".into(),
                include_agents: true,
            })
            .await
            .expect("list")
            .into_inner()
            .councils
            .remove(0)
        }
    };
    let council = dev(&mut c).await;
    assert_eq!(council.council_id, made.council_id);
    let ids: Vec<&str> = council.agents.iter().map(|a| a.agent_id.as_str()).collect();
    assert_eq!(ids, vec!["dev-1", "dev-2", "dev-3", "dev-extra"]);
    // The same registration again is fine and changes nothing.
    let again = c
        .register_agent(register("dev-extra", "DEV", "You distrust shared state."))
        .await
        .expect("idempotent")
        .into_inner();
    assert!(again.success && again.message.contains("already"));
    assert_eq!(dev(&mut c).await.agents.len(), 4);
    // A deliberation now hears all four.
    let mut all = request("four", "DEV", 0);
    all.num_agents = 0;
    let response = c.deliberate(all).await.expect("deliberates").into_inner();
    assert_eq!(response.results.len(), 4);

    let code = |r: Result<tonic::Response<pb::RegisterAgentResponse>, tonic::Status>| {
        r.expect_err("refused").code()
    };
    assert_eq!(
        code(
            c.register_agent(register("dev-extra", "DEV", "Another angle."))
                .await
        ),
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.register_agent(register("sec-1", "SECURITY", "x")).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.register_agent(register("bad id!", "DEV", "x")).await),
        Code::InvalidArgument
    );
    let mut remote = register("remote", "DEV", "x");
    remote.endpoint = "http://elsewhere:1234".into();
    let err = c.register_agent(remote).await.expect_err("endpoint");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("endpoint"), "{}", err.message());

    let unregister = |id: &str, role: &str| pb::UnregisterAgentRequest {
        agent_id: id.into(),
        role: role.into(),
    };
    let gone = c
        .unregister_agent(unregister("dev-extra", "DEV"))
        .await
        .expect("unregisters")
        .into_inner();
    assert!(gone.success);
    assert_eq!(dev(&mut c).await.agents.len(), 3);
    assert_eq!(
        c.unregister_agent(unregister("dev-extra", "DEV"))
            .await
            .expect_err("unknown")
            .code(),
        Code::NotFound
    );
    c.create_council(pb::CreateCouncilRequest {
        role: "SOLO".into(),
        num_agents: 1,
        config: None,
    })
    .await
    .expect("create");
    let last = c
        .unregister_agent(unregister("solo-1", "SOLO"))
        .await
        .expect_err("last member");
    assert_eq!(last.code(), Code::FailedPrecondition, "{last:?}");
}

#[tokio::test]
async fn metrics_over_grpc_and_prometheus() {
    let s = start(Limits::default()).await;
    let mut c = s.client.clone();
    c.deliberate(request("measured", "DEV", 0))
        .await
        .expect("deliberates");
    let all = c
        .get_metrics(pb::GetMetricsRequest {
            metric_type: String::new(),
            time_range_ms: 0,
        })
        .await
        .expect("metrics")
        .into_inner();
    let perf = all.performance.expect("performance");
    assert!(perf.p50_latency_ms > 0.0 && perf.p50_latency_ms <= perf.p99_latency_ms);
    assert!(
        (perf.avg_deliberation_ms - perf.p50_latency_ms).abs() < 1e-6,
        "one sample"
    );
    let agents = all.agents.expect("agents");
    assert_eq!(agents.total_agents, 15);
    assert_eq!(agents.active_agents, 0);
    assert_eq!(agents.agents_per_role.get("QA"), Some(&3));
    assert!(agents.avg_agent_response_time_ms > 0.0);
    let councils = all.councils.expect("councils");
    assert_eq!(councils.total_councils, 5);
    let dev = councils
        .health_per_council
        .values()
        .find(|h| h.success_rate > 0.0)
        .expect("the DEV council has a success");
    assert_eq!(
        (dev.success_rate, dev.available_agents, dev.busy_agents),
        (1.0, 3, 0)
    );

    let only = c
        .get_metrics(pb::GetMetricsRequest {
            metric_type: "agents".into(),
            time_range_ms: 60_000,
        })
        .await
        .expect("metrics")
        .into_inner();
    assert!(only.agents.is_some() && only.performance.is_none() && only.councils.is_none());
    for (metric_type, range, field) in [("bogus", 0, "metric_type"), ("", -5, "time_range_ms")] {
        let err = c
            .get_metrics(pb::GetMetricsRequest {
                metric_type: metric_type.into(),
                time_range_ms: range,
            })
            .await
            .expect_err("invalid");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(field), "{}", err.message());
    }

    let (code, body) = http_get(s.metrics, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    for line in [
        "council_deliberations_total{outcome=\"completed\"} 1",
        "council_deliberations_in_flight 0",
        "council_deliberation_duration_seconds_count 1",
        "council_backend_queue_depth 0",
    ] {
        assert!(body.contains(line), "missing {line:?} in\n{body}");
    }
    assert!(body.contains("council_tokens_total{kind=\"prompt\"}"));
    assert_eq!(http_get(s.metrics, "/readyz").await.0, 200);
    assert_eq!(http_get(s.metrics, "/healthz").await.0, 200);
}

#[tokio::test]
async fn health_follows_the_backend_and_the_shutdown() {
    let mut s = start(Limits::default()).await;
    s.sick.store(true, Ordering::SeqCst);
    s.wait_health(ServingStatus::NotServing).await;
    assert_eq!(http_get(s.metrics, "/readyz").await.0, 503);
    let status = s
        .client
        .get_status(pb::GetStatusRequest {
            include_stats: false,
        })
        .await
        .expect("status")
        .into_inner();
    assert!(status.status.starts_with("NOT_SERVING"), "{status:?}");
    s.sick.store(false, Ordering::SeqCst);
    s.wait_health(ServingStatus::Serving).await;
    s.shutdown();
    s.wait_health(ServingStatus::NotServing).await;
    s.stopped().await;
}

#[tokio::test]
async fn an_unreachable_store_is_unavailable() {
    let s = start(Limits::default()).await;
    let mut c = s.client.clone();
    s.down.store(true, Ordering::SeqCst);
    let list = c
        .list_councils(pb::ListCouncilsRequest::default())
        .await
        .expect_err("down");
    assert_eq!(list.code(), Code::Unavailable, "{list:?}");
    let deliberate = c
        .deliberate(request("t", "DEV", 0))
        .await
        .expect_err("down");
    assert_eq!(deliberate.code(), Code::Unavailable, "{deliberate:?}");
    assert_eq!(
        s.record("t").await.expect_err("down").code(),
        Code::Unavailable
    );
    s.down.store(false, Ordering::SeqCst);
    c.list_councils(pb::ListCouncilsRequest::default())
        .await
        .expect("back");
}

#[tokio::test]
async fn bearer_auth_guards_the_api_but_not_probes() {
    let token = "0123456789abcdef-test-token";
    let mut options = Options::new(Limits::default());
    options.auth_token = Some(token.into());
    let s = start_with(options).await;
    // Probes and reflection need no token.
    s.wait_health(ServingStatus::Serving).await;
    let list = || pb::ListCouncilsRequest::default();
    let mut c = s.client.clone();
    let none = c.list_councils(list()).await.expect_err("no token");
    assert_eq!(none.code(), Code::Unauthenticated);
    for presented in [
        "Bearer wrong-token-of-some-length",
        "Bearer ",
        token,
        "Basic abc",
    ] {
        let mut r = tonic::Request::new(list());
        r.metadata_mut()
            .insert("authorization", presented.parse().expect("ascii"));
        let err = c.list_councils(r).await.expect_err(presented);
        assert_eq!(err.code(), Code::Unauthenticated, "{presented}");
    }
    let mut r = tonic::Request::new(list());
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    let ok = c.list_councils(r).await.expect("authorised").into_inner();
    assert_eq!(ok.councils.len(), 5);
    assert!(
        reflected_services(&s.channel)
            .await
            .expect("reflection on")
            .contains(&"fleet.orchestrator.v1.OrchestratorService".to_owned())
    );
}

/// The body of a reflection `ListServices` call over protocol `$v` (`v1` or `v1alpha`, whose
/// generated types differ only by module).
macro_rules! list_services {
    ($v:ident, $channel:expr) => {{
        use tonic_reflection::pb::$v::ServerReflectionRequest;
        use tonic_reflection::pb::$v::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$v::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$v::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new($channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream_once(request))
            .await?
            .into_inner();
        let response = responses.message().await?.expect("one response");
        match response.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                Ok(list.service.into_iter().map(|s| s.name).collect())
            }
            other => panic!("unexpected reflection response {other:?}"),
        }
    }};
}

async fn reflected_services(channel: &Channel) -> Result<Vec<String>, tonic::Status> {
    list_services!(v1, channel)
}

/// The services listed by reflection's older `v1alpha` protocol.
async fn reflected_services_v1alpha(channel: &Channel) -> Result<Vec<String>, tonic::Status> {
    list_services!(v1alpha, channel)
}

/// Reflection answers both protocols: v1 and v1alpha (grpcurl's fallback and Python grpcio's
/// reflection client ask v1alpha). (Before: v1alpha was UNIMPLEMENTED.)
#[tokio::test]
async fn reflection_answers_v1_and_v1alpha() {
    let s = start(Limits::default()).await;
    for services in [
        reflected_services(&s.channel).await.expect("v1"),
        reflected_services_v1alpha(&s.channel)
            .await
            .expect("v1alpha"),
    ] {
        assert!(
            services.contains(&"fleet.orchestrator.v1.OrchestratorService".to_owned()),
            "{services:?}"
        );
    }
}

fn tokio_stream_once<T: Send + 'static>(
    item: T,
) -> impl tonic::codegen::tokio_stream::Stream<Item = T> + Send + 'static {
    tonic::codegen::tokio_stream::iter([item])
}

#[tokio::test]
async fn reflection_can_be_switched_off() {
    let mut options = Options::new(Limits::default());
    options.reflection = false;
    let s = start_with(options).await;
    let err = reflected_services(&s.channel).await.expect_err("off");
    assert_eq!(err.code(), Code::Unimplemented);
    let err = reflected_services_v1alpha(&s.channel)
        .await
        .expect_err("off");
    assert_eq!(err.code(), Code::Unimplemented);
}

#[tokio::test]
async fn shutdown_lets_running_deliberations_finish_within_the_grace_period() {
    // A grace period far longer than the deliberation, so a loaded machine (CI's two cores
    // running other test binaries) cannot turn "finishes within the grace" into a timeout.
    let mut options = Options::new(Limits::default());
    options.grace = Duration::from_secs(300);
    let mut s = start_with(options).await;
    let mut client = s.client.clone();
    let call = tokio::spawn(async move { client.deliberate(request("graceful", "DEV", 1)).await });
    s.wait_record("graceful", |r| r.status() == DeliberationStatus::InProgress)
        .await;
    s.shutdown();
    s.wait_health(ServingStatus::NotServing).await;
    // New work is refused while draining.
    let refused = s
        .client
        .deliberate(request("late", "QA", 0))
        .await
        .expect_err("draining");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let response = call
        .await
        .expect("joined")
        .expect("finished in grace")
        .into_inner();
    assert_eq!(response.results.len(), 3);
    s.stopped().await;
}

#[tokio::test]
async fn shutdown_fails_what_outlives_the_grace_period_as_retryable() {
    let mut options = Options::new(Limits::default());
    options.grace = Duration::ZERO;
    let mut s = start_with(options).await;
    let mut client = s.client.clone();
    let call = tokio::spawn(async move { client.deliberate(request("cut", "DEV", 10)).await });
    s.wait_record("cut", |r| r.status() == DeliberationStatus::InProgress)
        .await;
    let record_reader = s.client.clone();
    s.stopped().await;
    let err = call.await.expect("joined").expect_err("cut short");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("shutting down"), "{}", err.message());
    drop(record_reader);
    // The record says so (read from the store the server used).
    let store = s._data.path().to_owned();
    let reopened = FileStore::open(&store).expect("the server released its store");
    let record = reopened.record("cut").await.expect("reads").expect("kept");
    assert_eq!(record.status, DeliberationStatus::Failed as i32);
    assert!(record.retryable);
    assert!(record.error_message.contains("shutting down"), "{record:?}");
}

/// The store is unreachable at the moment a deliberation finishes: the final record write is
/// retried until the store is back, so the record says COMPLETED and asking again returns the
/// stored result without running anything. (Before: the failed write was only logged, the
/// record stayed live, and the next Deliberate with the id was refused as already running,
/// then ran the council again once the record read as interrupted.)
#[tokio::test]
async fn a_failed_final_write_is_retried_and_nothing_runs_twice() {
    let s = start(Limits::default()).await;
    let mut c = s.client.clone();
    let mut stream = c
        .stream_deliberation(request("final-write-1", "DEV", 1))
        .await
        .expect("stream opens")
        .into_inner();
    let mut last = None;
    while let Some(update) = stream.message().await.expect("no error") {
        if update.status == "scoring" && !s.down.load(Ordering::SeqCst) {
            // The last phase: the run ends (and writes its record) while the store is away.
            s.down.store(true, Ordering::SeqCst);
            let down = s.down.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                down.store(false, Ordering::SeqCst);
            });
        }
        last = Some(update);
    }
    let first = last
        .and_then(|u| u.response)
        .expect("the stream ends with the response");
    let record = s
        .wait_record("final-write-1", |r| {
            !s.down.load(Ordering::SeqCst) && r.status != 0
        })
        .await;
    assert_eq!(record.status(), DeliberationStatus::Completed, "{record:?}");
    let again = c
        .deliberate(request("final-write-1", "DEV", 1))
        .await
        .expect("the stored result")
        .into_inner();
    assert_eq!(again.winner_id, first.winner_id);
    let stats = c
        .get_status(pb::GetStatusRequest {
            include_stats: true,
        })
        .await
        .expect("status")
        .into_inner()
        .stats
        .expect("stats");
    assert_eq!(stats.total_deliberations, 1, "it ran once");
}

/// The backend stops for good (its engine thread ended): readiness and liveness both say
/// NOT_SERVING, and `/healthz` fails, so the orchestrator restarts the pod. A backend that is
/// only unavailable (a remote server down) leaves liveness alone.
#[tokio::test]
async fn liveness_fails_only_when_the_backend_is_gone_for_good() {
    let s = start(Limits::default()).await;
    let liveness = || async {
        let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
        health
            .check(tonic_health::pb::HealthCheckRequest {
                service: LIVENESS_SERVICE.into(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status()
    };
    s.wait_health(ServingStatus::Serving).await;
    s.sick.store(true, Ordering::SeqCst);
    s.wait_health(ServingStatus::NotServing).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(liveness().await, ServingStatus::Serving, "only unavailable");
    assert_eq!(http_get(s.metrics, "/healthz").await.0, 200);
    s.sick.store(false, Ordering::SeqCst);
    s.gone.store(true, Ordering::SeqCst);
    let mut alive = liveness().await;
    for _ in 0..100 {
        if alive == ServingStatus::NotServing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        alive = liveness().await;
    }
    assert_eq!(alive, ServingStatus::NotServing);
    assert_eq!(s.health().await, ServingStatus::NotServing);
    assert_eq!(http_get(s.metrics, "/healthz").await.0, 503);
}

/// `councils.judge`: log-prob judging by default (the judgements a small model can give), text
/// when configured or when the backend cannot score choices; either way the deliberation
/// completes with every proposal ranked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_judge_decides_how_verdicts_are_given() {
    for (judge, can_score, scores) in [
        (None, true, true),
        (Some(JudgeMode::Text), true, false),
        (None, false, false),
    ] {
        let mut options = Options::new(Limits::default());
        if let Some(judge) = judge {
            options.judge = judge;
        }
        let mut server = start_scoring(options, can_score).await;
        let response = server
            .client
            .clone()
            .deliberate(request(
                &format!("task-judge-{can_score}-{scores}"),
                "DEV",
                1,
            ))
            .await
            .expect("deliberates")
            .into_inner();
        assert_eq!(response.results.len(), 3, "{judge:?} {can_score}");
        assert!(!response.winner_id.is_empty(), "{judge:?} {can_score}");
        let scored = server.scored.load(Ordering::SeqCst);
        assert_eq!(
            scored > 0,
            scores,
            "{judge:?}, backend scores: {can_score}: {scored} choice-scoring calls"
        );
        server.stopped().await;
    }
}

/// Upstream's defaults: `task_id` is optional (one of upstream's form, `task-<uuid>`, is made
/// and returned), and an unset `rounds` takes the council's configured rounds (the default
/// councils: 1); `review_rounds` (ours) asks for 0 explicitly. (Before: an empty id was refused
/// and an unset `rounds` meant no review at all.)
#[tokio::test]
async fn upstream_defaults_for_task_id_and_rounds() {
    let s = start(Limits::default()).await;
    let mut c = s.client.clone();
    let made = c
        .deliberate(pb::DeliberateRequest {
            task_id: String::new(),
            review_rounds: Some(0),
            ..request("ignored", "DEV", 0)
        })
        .await
        .expect("an id is made")
        .into_inner();
    let id = made.task_id.clone();
    let uuid = id.strip_prefix("task-").expect("task-<uuid>");
    assert_eq!(uuid.len(), 36, "{id}");
    assert!(
        uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-'),
        "{id}"
    );
    let record = s.record(&id).await.expect("its record");
    assert_eq!(record.status(), DeliberationStatus::Completed);
    // A fixed id, so the (seeded) run is the same every time.
    let summary = c
        .deliberate(pb::DeliberateRequest {
            review_rounds: None,
            ..request("defaults-1", "DEV", 0)
        })
        .await
        .expect("runs")
        .into_inner()
        .summary
        .expect("summary");
    assert_eq!(
        (summary.rounds_run, summary.stop_reason.as_str()),
        (1, "rounds_completed"),
        "the council's configured round ran: {summary:?}"
    );
    let zero = c
        .deliberate(pb::DeliberateRequest {
            review_rounds: Some(0),
            ..request("explicit-zero", "DEV", 0)
        })
        .await
        .expect("runs")
        .into_inner()
        .summary
        .expect("summary");
    assert_eq!(zero.rounds_run, 0, "{zero:?}");
    let refused = c
        .deliberate(pb::DeliberateRequest {
            review_rounds: Some(11),
            ..request("too-many", "DEV", 0)
        })
        .await
        .expect_err("out of range");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("review_rounds"), "{refused:?}");
}

/// A body that does not decode as the RPC's request type is the client's error:
/// INVALID_ARGUMENT with the decode error, not INTERNAL. (Before: "failed to decode", INTERNAL.)
#[tokio::test]
async fn a_body_that_does_not_decode_is_invalid_argument() {
    let s = start(Limits::default()).await;
    let mut grpc = tonic::client::Grpc::new(s.channel.clone());
    grpc.ready().await.expect("ready");
    // Field 1 as a varint where Deliberate's field 1 (task_id) is a string.
    let wrong = pb::GetStatusRequest {
        include_stats: true,
    };
    let codec = tonic_prost::ProstCodec::<pb::GetStatusRequest, pb::DeliberateResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/fleet.orchestrator.v1.OrchestratorService/Deliberate",
    );
    let err = grpc
        .unary(tonic::Request::new(wrong), path, codec)
        .await
        .expect_err("does not decode");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("does not decode"), "{err:?}");
    assert_eq!(s.engine.stats().steps, 0);
}

/// Orchestrate: the role's council deliberates, its best k go to an ARCHITECT agent whose own
/// model call orders them; winner rank 1, candidates ranked after it, the architect's reasons
/// and whether its ranking could be read in the tags; counted as an orchestration. The three
/// RPCs that need upstream's planning and context services answer UNIMPLEMENTED saying so.
/// (Before: every one of these RPCs was UNIMPLEMENTED with an empty message.)
#[tokio::test]
async fn orchestrate_has_an_architect_choose_and_the_rest_say_why_not() {
    let s = start(Limits::default()).await;
    let mut c = s.client.clone();
    let orch_1 = || pb::OrchestrateRequest {
        task_id: "orch-1".into(),
        task_description: "Name one risk of retrying forever.".into(),
        role: "DEV".into(),
        options: Some(pb::OrchestratorOptions {
            custom_params: std::collections::HashMap::from([(
                "architect_k".to_owned(),
                "2".to_owned(),
            )]),
            ..Default::default()
        }),
        story_id: "S-1".into(),
        ..Default::default()
    };
    let finished_before = s.engine.stats().finished;
    let response = c
        .orchestrate(orch_1())
        .await
        .expect("orchestrates")
        .into_inner();
    let winner = response.winner.expect("a winner");
    assert_eq!(winner.rank, 1);
    assert_eq!(response.candidates.len(), 1, "k = 2");
    assert_eq!(response.candidates[0].rank, 2);
    let tags = response.metadata.expect("metadata").tags;
    assert_eq!(tags.get("candidates").map(String::as_str), Some("2"));
    assert!(
        tags.get("architect_id")
            .is_some_and(|a| a.starts_with("architect")),
        "{tags:?}"
    );
    let choice = tags.get("architect_choice").cloned().unwrap_or_default();
    assert!(
        choice == "parsed" || choice.starts_with("unparsed"),
        "{tags:?}"
    );
    assert!(tags.contains_key("architect_reasons"), "{tags:?}");
    assert!(s.engine.stats().finished > finished_before + 3);
    // Again: the deliberation is answered from its record, so the only engine work is the
    // architect's own call, and the same prompt and seed choose the same winner.
    let before = s.engine.stats().finished;
    let again = c
        .orchestrate(orch_1())
        .await
        .expect("orchestrates again")
        .into_inner();
    assert_eq!(s.engine.stats().finished - before, 1, "one architect call");
    assert_eq!(again.winner, Some(winner));
    let status = c
        .get_status(pb::GetStatusRequest {
            include_stats: true,
        })
        .await
        .expect("status")
        .into_inner()
        .stats
        .expect("stats");
    assert_eq!(status.total_orchestrations, 2);
    assert!(status.total_deliberations >= 1);
    let bad_k = c
        .orchestrate(pb::OrchestrateRequest {
            task_id: "orch-2".into(),
            task_description: "x".into(),
            role: "DEV".into(),
            options: Some(pb::OrchestratorOptions {
                custom_params: std::collections::HashMap::from([(
                    "architect_k".to_owned(),
                    "0".to_owned(),
                )]),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("k 0");
    assert_eq!(bad_k.code(), Code::InvalidArgument);

    let planning = c
        .process_planning_event(pb::PlanningEventRequest::default())
        .await
        .expect_err("not here");
    let derive = c
        .derive_subtasks(pb::DeriveSubtasksRequest::default())
        .await
        .expect_err("not here");
    let context = c
        .get_task_context(pb::GetTaskContextRequest::default())
        .await
        .expect_err("not here");
    for (err, service) in [
        (planning, "planning service"),
        (derive, "planning service"),
        (context, "context service"),
    ] {
        assert_eq!(err.code(), Code::Unimplemented);
        assert!(err.message().contains(service), "{err:?}");
    }
}

/// DeliberateForBacklogReview: accepted and answered at once with the deliberation id (made
/// when empty), the council runs in the background, and GetDeliberationResult serves it.
/// (Before: UNIMPLEMENTED.)
#[tokio::test]
async fn backlog_review_answers_at_once_and_runs_in_the_background() {
    let s = start(Limits::default()).await;
    let mut c = s.client.clone();
    let accepted = c
        .deliberate_for_backlog_review(pb::DeliberateRequest {
            task_id: String::new(),
            ..request("ignored", "QA", 1)
        })
        .await
        .expect("accepted")
        .into_inner();
    let id = accepted.task_id.clone();
    assert!(id.starts_with("task-"), "{id}");
    assert!(
        accepted.results.is_empty(),
        "answered before the council ran"
    );
    let tags = accepted.metadata.expect("metadata").tags;
    assert_eq!(tags.get("deliberation_id"), Some(&id));
    assert_eq!(tags.get("status").map(String::as_str), Some("IN_PROGRESS"));
    // The made id is random, and so is the seed: a random model's empty replies may cost the
    // quorum, so this run ends completed or failed; either way it ends, in the background.
    let ended = s
        .wait_record(&id, |r| r.status() != DeliberationStatus::InProgress)
        .await;
    assert!(
        matches!(
            ended.status(),
            DeliberationStatus::Completed | DeliberationStatus::Failed
        ),
        "{ended:?}"
    );
    // With an id whose seed deliberates to the end (fixed, so the run is the same every time).
    let id = "task-backlog-review-fixed";
    let accepted = c
        .deliberate_for_backlog_review(request(id, "QA", 1))
        .await
        .expect("accepted")
        .into_inner();
    assert!(accepted.results.is_empty(), "answered before it ran");
    let done = s
        .wait_record(id, |r| r.status() == DeliberationStatus::Completed)
        .await;
    assert!((1..=3).contains(&done.results.len()), "{done:?}");
    assert_eq!(
        done.results[0]
            .proposal
            .as_ref()
            .map(|p| p.author_id.as_str()),
        Some(done.winner_id.as_str())
    );
    // Asked again once done: the stored result.
    let again = c
        .deliberate_for_backlog_review(request(id, "QA", 1))
        .await
        .expect("done")
        .into_inner();
    assert_eq!(again.winner_id, done.winner_id);
}
