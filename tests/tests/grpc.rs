//! The gRPC service end to end on 127.0.0.1:0 with a tiny generated model and a file store.

use std::sync::Arc;
use std::time::Duration;

use council_inference::EngineConfig;
use council_inference::tiny::TinyArch;
use council_proto::fleet::orchestrator::v1 as pb;
use council_proto::fleet::orchestrator::v1::orchestrator_service_client::OrchestratorServiceClient;
use council_runtime::service::{self, Limits};
use council_runtime::store::{FileStore, apply_default_councils};
use council_tests::{engine, tiny_model};
use tonic::Code;
use tonic::transport::Channel;

struct Server {
    client: OrchestratorServiceClient<Channel>,
    channel: Channel,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
    engine: council_inference::EngineHandle,
    _model: tempfile::TempDir,
    _data: tempfile::TempDir,
}

async fn start(limits: Limits) -> Server {
    let model = tiny_model(TinyArch::Qwen2);
    let data = tempfile::tempdir().expect("data dir");
    let store = FileStore::open(data.path()).expect("store");
    apply_default_councils(&store).expect("defaults");
    let backend = engine(model.path(), EngineConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let engine_handle = backend.clone();
    let done = tokio::spawn(service::serve(
        listener,
        Arc::new(backend),
        Arc::new(store),
        limits,
        async move {
            let _ = stopped.await;
        },
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    Server {
        client: OrchestratorServiceClient::new(channel.clone()),
        channel,
        stop: Some(stop),
        done,
        engine: engine_handle,
        _model: model,
        _data: data,
    }
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
    }
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
            .all(|c| c.agents.len() == 3 && c.num_agents == 3)
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
    assert!(
        !suite.all_passed,
        "policy, lint and dry-run did not run: the suite cannot pass"
    );
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

    // The same task id deliberates the same way.
    let again = c
        .deliberate(request("task-1", "DEV", 1))
        .await
        .expect("again")
        .into_inner();
    let contents = |r: &pb::DeliberateResponse| {
        r.results
            .iter()
            .map(|x| x.proposal.as_ref().map(|p| p.content.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(contents(&again), contents(&response));

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
    assert_eq!(status.stats.expect("stats").total_deliberations, 2);

    // Health: serving now, not serving once shutdown starts.
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
    let check = |svc: &str| tonic_health::pb::HealthCheckRequest {
        service: svc.into(),
    };
    let serving = health
        .check(check("fleet.orchestrator.v1.OrchestratorService"))
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        serving.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    if let Some(stop) = s.stop.take() {
        let _ = stop.send(());
    }
    tokio::time::timeout(Duration::from_secs(30), &mut s.done)
        .await
        .expect("stops")
        .expect("task")
        .expect("clean exit");
}

#[tokio::test]
async fn bad_requests_get_precise_codes_before_any_llm_call() {
    let mut s = start(Limits::default()).await;
    let c = &mut s.client;
    let cases: Vec<(pb::DeliberateRequest, Code, &str)> = vec![
        (
            pb::DeliberateRequest {
                task_id: String::new(),
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
    ];
    for (req, code, needle) in cases {
        let err = c.deliberate(req).await.expect_err(needle);
        assert_eq!(err.code(), code, "{needle}: {err:?}");
        assert!(
            err.message().contains(needle),
            "{needle} not named in {:?}",
            err.message()
        );
    }
    let status = c
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
    let err = first.await.expect("joined").expect_err("deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
}
