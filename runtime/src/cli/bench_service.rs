//! `council dev bench-service`: Deliberate throughput and latency through the whole service
//! (gRPC, validation, persisted records) against the same deliberations driven directly on the
//! same engine in the same run, at several client concurrencies. The ratio is the service's
//! overhead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use council_councils::Role;
use council_councils::personas::default_council;
use council_proto::fleet::orchestrator::v1 as pb;
use council_proto::fleet::orchestrator::v1::orchestrator_service_client::OrchestratorServiceClient;

use super::server::{self, Options};
use crate::judge::Judge;
use crate::model_source::ModelArgs;
use crate::run::{self, Limits};
use crate::store::{FileStore, apply_default_councils};

#[derive(Debug, clap::Args)]
pub struct BenchServiceArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Client concurrencies to measure (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub concurrency: Vec<usize>,
    /// Deliberations per concurrency level and path.
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Critique-and-revise rounds of each deliberation.
    #[arg(long, default_value_t = 1)]
    pub rounds: i32,
    /// Agents of each deliberation (from the DEV council).
    #[arg(long, default_value_t = 3)]
    pub agents: i32,
    /// How judges give verdicts, on both paths (the service's `councils.judge`).
    #[arg(long, value_enum, default_value_t = Judge::Logprob)]
    pub judge: Judge,
}

/// The `i`-th deliberation of a level. Both paths run the same ids, hence the same seeds and the
/// same work; the service starts each level with no records, so nothing is served from one.
fn request(args: &BenchServiceArgs, level: usize, i: usize) -> pb::DeliberateRequest {
    pb::DeliberateRequest {
        task_id: format!("bench-{level}-{i}"),
        task_description: format!("Propose a retry policy for upstream service number {i}."),
        role: "DEV".into(),
        constraints: None,
        rounds: args.rounds,
        num_agents: args.agents,
        review_rounds: Some(args.rounds),
    }
}

/// The deliberation the run core would run for `req` with the default DEV council, driven on
/// `backend` without the run core (the baseline both service benches compare against).
pub(crate) async fn direct(
    backend: &dyn council_inference::Backend,
    req: crate::run::RunRequest,
    judge: council_councils::spec::JudgeMode,
) -> anyhow::Result<()> {
    let council = run::council_for(
        default_council(&Role::Dev)?,
        req.num_agents,
        req.rounds,
        judge,
    )
    .map_err(anyhow::Error::msg)?;
    let (deliberation, _) = run::deliberation(council, req.task);
    crate::driver::run(backend, deliberation).await?;
    Ok(())
}

/// (wall time, per-request latencies) of `n` requests, `concurrency` at a time.
pub(crate) async fn drive<F, Fut>(
    n: usize,
    concurrency: usize,
    call: F,
) -> anyhow::Result<(Duration, Vec<f64>)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let call = Arc::new(call);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (call, next) = (call.clone(), next.clone());
        workers.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let t = Instant::now();
                call(i).await?;
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        });
    }
    let mut all = Vec::new();
    while let Some(done) = workers.join_next().await {
        all.extend(done??);
    }
    Ok((start.elapsed(), all))
}

pub(crate) fn summary(wall: Duration, latencies: &mut [f64]) -> (f64, f64, f64) {
    let rps = latencies.len() as f64 / wall.as_secs_f64();
    let p50 = run::metrics::quantile(latencies, 0.50);
    let p99 = run::metrics::quantile(latencies, 0.99);
    (rps, p50, p99)
}

pub fn run(args: BenchServiceArgs) -> anyhow::Result<()> {
    let engine = args.model.start_engine()?;
    let backend: Arc<dyn council_inference::Backend> = Arc::new(engine);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let data = std::env::temp_dir().join(format!("council-bench-service-{}", std::process::id()));
    let args = Arc::new(args);
    let result = runtime.block_on(async {
        let store = Arc::new(FileStore::open(&data)?);
        apply_default_councils(store.as_ref()).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let max = args.concurrency.iter().copied().max().unwrap_or(1);
        let mut options = Options::new(Limits {
            max_concurrent: max,
            ..Limits::default()
        });
        options.judge = args.judge.into();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(server::serve(listener, backend.clone(), store, options, async {
            let _ = stopped.await;
        }));
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        println!(
            "model: {}; {} deliberations per level, {} agents, {} round(s)",
            backend.model_info().name,
            args.requests,
            args.agents,
            args.rounds
        );
        println!("| clients | direct deliberations/s | service deliberations/s | service/direct | direct p50 / p99 ms | service p50 / p99 ms |");
        println!("|---|---|---|---|---|---|");
        for (level, &c) in args.concurrency.iter().enumerate() {
            let (b, a) = (backend.clone(), args.clone());
            let (wall, mut lat) = drive(args.requests, c, move |i| {
                let (b, req, judge) = (b.clone(), request(&a, level, i), a.judge);
                async move {
                    let req = crate::service::wire::run_request(&req)
                        .map_err(anyhow::Error::msg)?;
                    direct(b.as_ref(), req, judge.into()).await
                }
            })
            .await?;
            let direct = summary(wall, &mut lat);
            let (ch, a) = (channel.clone(), args.clone());
            let (wall, mut lat) = drive(args.requests, c, move |i| {
                let mut client = OrchestratorServiceClient::new(ch.clone());
                let req = request(&a, level, i);
                async move {
                    client.deliberate(req).await?;
                    Ok(())
                }
            })
            .await?;
            let served = summary(wall, &mut lat);
            println!(
                "| {c} | {:.2} | {:.2} | {:.3} | {:.0} / {:.0} | {:.0} / {:.0} |",
                direct.0,
                served.0,
                served.0 / direct.0,
                direct.1,
                direct.2,
                served.1,
                served.2
            );
        }
        let _ = stop.send(());
        server.await??;
        Ok::<_, anyhow::Error>(())
    });
    let _ = std::fs::remove_dir_all(&data);
    result
}
