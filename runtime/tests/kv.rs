//! The NATS JetStream key-value store against a private `nats-server -js`: compare-and-set,
//! caches kept in sync by watching, records shared, a server restart survived, memory storage
//! refused; and two `council serve` processes sharing councils and records through it.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{NatsServer, client, councils, eventually, serve_with, tiny_model};
use council_councils::personas::council_of;
use council_councils::{CouncilSpec, Role};
use council_proto::council::store::v1::DeliberationRecord;
use council_proto::fleet::orchestrator::v1 as pb;
use council_proto::fleet::orchestrator::v1::DeliberationStatus;
use council_runtime::store::{
    Claim, CouncilStore, Created, KvConfig, KvStore, StoreError, apply_default_councils,
};

fn config(nats: &NatsServer, prefix: &str) -> KvConfig {
    KvConfig {
        nats: council_runtime::nats::NatsConfig::plain(nats.url()),
        bucket_prefix: prefix.into(),
        retention: Duration::from_secs(7200),
    }
}

fn security(size: usize) -> CouncilSpec {
    council_of(&"SECURITY".parse().expect("role"), size).expect("spec")
}

async fn roles(store: &KvStore) -> Vec<String> {
    store
        .list()
        .await
        .map(|l| l.iter().map(|c| c.role.to_string()).collect())
        .unwrap_or_default()
}

fn record(task: &str, status: DeliberationStatus) -> DeliberationRecord {
    DeliberationRecord {
        task_id: task.into(),
        role: "DEV".into(),
        status: status as i32,
        created_at_ms: 1,
        updated_at_ms: 1,
        deadline_at_ms: i64::MAX / 2,
        instance_id: "test".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn two_stores_share_councils_and_records_with_compare_and_set() {
    let mut nats = NatsServer::start();
    let a = KvStore::open(&config(&nats, "t1")).await.expect("a opens");
    let b = KvStore::open(&config(&nats, "t1")).await.expect("b opens");
    assert_eq!(apply_default_councils(&a).await.expect("defaults"), 5);
    assert_eq!(
        apply_default_councils(&b).await.expect("defaults again"),
        0,
        "the other replica creates nothing: the defaults are there"
    );

    // Idempotent create across replicas; a different spec is refused.
    let custom = security(2);
    assert_eq!(
        a.create(custom.clone()).await.expect("create"),
        Created::New
    );
    assert_eq!(
        b.create(custom.clone()).await.expect("same"),
        Created::Unchanged
    );
    assert!(matches!(
        b.create(security(3)).await,
        Err(StoreError::AlreadyExists { .. })
    ));

    // A change through one is seen by the other (the watch keeps its cache in sync).
    a.delete(&Role::Data).await.expect("delete");
    eventually("b sees DATA deleted", || async {
        !roles(&b).await.contains(&"DATA".to_owned())
    })
    .await;
    assert!(matches!(
        b.delete(&Role::Data).await,
        Err(StoreError::NotFound { .. })
    ));

    // Compare-and-set: the writer with a stale view loses.
    let mut v2 = custom.clone();
    v2.config.rounds = 2;
    let mut v3 = custom.clone();
    v3.config.rounds = 3;
    a.replace(&custom, v2.clone()).await.expect("cas");
    assert!(matches!(
        b.replace(&custom, v3).await,
        Err(StoreError::Conflict { .. })
    ));
    eventually("b sees v2", || async {
        b.get(&v2.role).await.ok().flatten().as_ref() == Some(&v2)
    })
    .await;

    // Records: one claim wins; both read what the owner writes.
    let live = record("task:1.x", DeliberationStatus::InProgress);
    let Claim::Claimed {
        replaced: None,
        revision,
    } = a.claim(live.clone(), 10).await.expect("claim")
    else {
        panic!("a claims a new task")
    };
    assert_eq!(
        b.claim(record("task:1.x", DeliberationStatus::InProgress), 10)
            .await
            .expect("claim"),
        Claim::Existing(Box::new(live.clone()))
    );
    let mut done = live.clone();
    done.status = DeliberationStatus::Completed as i32;
    done.response = Some(pb::DeliberateResponse {
        task_id: "task:1.x".into(),
        winner_id: "dev-1".into(),
        ..Default::default()
    });
    // Every write is a compare-and-set on the revision: the owner's goes through, a write
    // from a stale revision (a replica whose run was taken over) does not.
    let heartbeat = a
        .write_record_at(live.clone(), revision)
        .await
        .expect("write")
        .expect("the owner writes");
    assert!(heartbeat > revision);
    assert_eq!(
        b.write_record_at(live.clone(), revision)
            .await
            .expect("write"),
        None,
        "a stale revision loses"
    );
    assert_eq!(
        b.write_record_at(live.clone(), 0).await.expect("write"),
        None,
        "revision 0 only creates"
    );
    a.write_record_at(done.clone(), heartbeat)
        .await
        .expect("update")
        .expect("the owner writes");
    let (read, at) = b.record_at("task:1.x").await.expect("read").expect("kept");
    assert_eq!(read, done);
    assert!(at > heartbeat);
    assert_eq!(b.record("never").await.expect("read"), None);
    // A failed task can be claimed again.
    let failed = record("retry-me", DeliberationStatus::Failed);
    a.write_record_at(failed.clone(), 0)
        .await
        .expect("write")
        .expect("created");
    assert!(
        matches!(
            b.claim(record("retry-me", DeliberationStatus::InProgress), 10)
                .await
                .expect("claim"),
            Claim::Claimed { replaced: Some(r), .. } if *r == failed
        ),
        "the failed record it replaced comes back"
    );

    // The NATS server goes away: calls say unavailable, health says why.
    nats.stop();
    eventually("a notices the disconnect", || async { a.health().is_err() }).await;
    assert!(matches!(
        a.list().await,
        Err(StoreError::Unavailable { .. })
    ));
    assert!(matches!(
        a.record("task:1.x").await,
        Err(StoreError::Unavailable { .. })
    ));

    // It comes back with everything (file storage), and the watches resume.
    nats.restart();
    eventually("a reconnects", || async { a.health().is_ok() }).await;
    assert_eq!(a.get(&v2.role).await.expect("get"), Some(v2.clone()));
    let mut v4 = v2.clone();
    v4.config.rounds = 4;
    eventually("b writes after the restart", || async {
        b.replace(&v2, v4.clone()).await.is_ok()
    })
    .await;
    eventually("a sees b's write", || async {
        a.get(&v4.role).await.ok().flatten().as_ref() == Some(&v4)
    })
    .await;
}

#[tokio::test]
async fn a_bucket_on_memory_storage_is_refused() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.expect("connects");
    let js = async_nats::jetstream::new(client);
    // Someone else's bucket, made on memory storage.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "KV_mem_councils".into(),
        subjects: vec!["$KV.mem_councils.>".into()],
        storage: async_nats::jetstream::stream::StorageType::Memory,
        allow_direct: true,
        allow_rollup: true,
        ..Default::default()
    })
    .await
    .expect("bucket");
    let err = KvStore::open(&config(&nats, "mem"))
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("memory storage"), "{err}");
}

#[tokio::test]
async fn two_server_processes_share_councils_and_records() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let model = tiny_model(dir.path());
    let url = nats.url();
    let args = [
        "--store",
        "nats",
        "--nats-url",
        url.as_str(),
        "--bucket-prefix",
        "shared",
    ];
    let one = serve_with(&model, &args, Stdio::inherit());
    let two = serve_with(&model, &args, Stdio::inherit());
    let list = |addr: String| async move { councils(&addr).await };

    client(&one.addr)
        .await
        .create_council(pb::CreateCouncilRequest {
            role: "SECURITY".into(),
            num_agents: 2,
            config: None,
        })
        .await
        .expect("create on one");
    eventually("two sees SECURITY", || {
        let addr = two.addr.clone();
        async move { list(addr).await.iter().any(|c| c.role == "SECURITY") }
    })
    .await;
    client(&two.addr)
        .await
        .register_agent(pb::RegisterAgentRequest {
            agent_id: "sec-extra".into(),
            role: "SECURITY".into(),
            ..Default::default()
        })
        .await
        .expect("register on two");
    eventually("one sees the new agent", || {
        let addr = one.addr.clone();
        async move {
            list(addr)
                .await
                .iter()
                .any(|c| c.role == "SECURITY" && c.agents.len() == 3)
        }
    })
    .await;

    // A deliberation run by one is readable through two.
    let response = client(&one.addr)
        .await
        .deliberate(pb::DeliberateRequest {
            task_id: "shared-task".into(),
            task_description: "Choose a cache eviction policy.".into(),
            role: "DEV".into(),
            constraints: None,
            rounds: 0,
            num_agents: 1,
            review_rounds: Some(0),
        })
        .await
        .expect("deliberates")
        .into_inner();
    let record = client(&two.addr)
        .await
        .get_deliberation_result(pb::GetDeliberationResultRequest {
            task_id: "shared-task".into(),
        })
        .await
        .expect("record on two")
        .into_inner();
    assert_eq!(record.status(), DeliberationStatus::Completed);
    assert_eq!(record.results, response.results);

    client(&two.addr)
        .await
        .delete_council(pb::DeleteCouncilRequest {
            role: "SECURITY".into(),
        })
        .await
        .expect("delete on two");
    eventually("one sees SECURITY gone", || {
        let addr = one.addr.clone();
        async move { !list(addr).await.iter().any(|c| c.role == "SECURITY") }
    })
    .await;
}
