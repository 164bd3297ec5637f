//! `council dev bench-dispatch`: tasks per second through NATS JetStream → deliberation →
//! result event, and publish-to-result latency, with 1, 2, … `council serve --dispatch` worker
//! processes; against the same deliberations driven directly on an in-process engine in the same
//! run (same model, same concurrency per worker). Needs a running `nats-server -js`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_stream::StreamExt;

use super::bench_service::{drive, summary};
use crate::model_source::ModelArgs;
use crate::run::metrics::quantile;

#[derive(Debug, clap::Args)]
pub struct BenchDispatchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The NATS server (with JetStream) the workers and the bench use.
    #[arg(long, value_name = "URL")]
    pub nats_url: String,
    /// Worker process counts to measure (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub workers: Vec<usize>,
    /// Tasks in flight per worker (`dispatch.in_flight`).
    #[arg(long, default_value_t = 4)]
    pub in_flight: usize,
    /// Tasks per measurement, all published at once.
    #[arg(long, default_value_t = 32)]
    pub tasks: usize,
    #[arg(long, default_value_t = 1)]
    pub rounds: i32,
    #[arg(long, default_value_t = 3)]
    pub agents: i32,
}

fn task_json(args: &BenchDispatchArgs, i: usize) -> serde_json::Value {
    serde_json::json!({
        "schema": "council.task.v1",
        "task_id": format!("bench-{i}"),
        "role": "DEV",
        "description": format!("Propose a retry policy for upstream service number {i}."),
        "options": {"rounds": args.rounds, "num_agents": args.agents},
    })
}

struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `n` workers on their own streams (names from `run`); returns once all listen.
fn start_workers(
    args: &BenchDispatchArgs,
    run: &str,
    n: usize,
    dir: &std::path::Path,
) -> anyhow::Result<Workers> {
    let config = dir.join(format!("{run}.toml"));
    std::fs::write(
        &config,
        format!(
            "[limits]\nmax_concurrent = {in_flight}\n[store]\nkind = \"nats\"\nbucket_prefix = \"{run}\"\n\
             [nats]\nurl = \"{url}\"\n[dispatch]\nenabled = true\nin_flight = {in_flight}\n\
             tasks_stream = \"{run}_TASKS\"\ntasks_prefix = \"{run}.tasks\"\n\
             events_stream = \"{run}_EVENTS\"\nevents_subjects = \"{run}.events.>\"\n\
             completed_subject = \"{run}.events.completed\"\nfailed_subject = \"{run}.events.failed\"\n\
             dlq_stream = \"{run}_DLQ\"\ndlq_subject = \"{run}.dlq\"\n",
            in_flight = args.in_flight,
            url = args.nats_url,
        ),
    )?;
    let exe = std::env::current_exe()?;
    let mut workers = Workers(Vec::new());
    for _ in 0..n {
        let mut command = Command::new(&exe);
        command.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
        ]);
        command.arg("--config").arg(&config);
        match &args.model.model_dir {
            Some(d) => command.arg("--model-dir").arg(d),
            None => command.arg("--model").arg(&args.model.model),
        };
        command
            .arg("--max-batch")
            .arg(args.model.max_batch.to_string())
            .arg("--max-seq-len")
            .arg(args.model.max_seq_len.to_string());
        if let Some(c) = args.model.cuda {
            command.arg("--cuda").arg(c.to_string());
        }
        let mut child = command
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a worker")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("worker stdout")?).read_line(&mut line)?;
        workers.0.push(child);
        anyhow::ensure!(
            line.starts_with("listening on"),
            "a worker did not start: {line:?}"
        );
    }
    Ok(workers)
}

/// (wall, latencies ms) of `args.tasks` tasks published at once through `n` workers.
async fn through_nats(
    args: &BenchDispatchArgs,
    run: &str,
    n: usize,
    dir: &std::path::Path,
) -> anyhow::Result<(Duration, Vec<f64>)> {
    let _workers = start_workers(args, run, n, dir)?;
    let client = async_nats::connect(&args.nats_url).await?;
    let mut results = client.subscribe(format!("{run}.events.>")).await?;
    let js = async_nats::jetstream::new(client.clone());
    let mut published = HashMap::new();
    let start = Instant::now();
    for i in 0..args.tasks {
        let body = serde_json::to_vec(&task_json(args, i))?;
        published.insert(format!("bench-{i}"), Instant::now());
        js.publish(format!("{run}.tasks.DEV"), body.into())
            .await?
            .await?;
    }
    let mut latencies = Vec::new();
    while latencies.len() < args.tasks {
        let m = tokio::time::timeout(Duration::from_secs(900), results.next())
            .await
            .context("no result within 15 minutes")?
            .context("subscription ended")?;
        let event: serde_json::Value = serde_json::from_slice(&m.payload)?;
        anyhow::ensure!(
            event["event_type"] == "deliberation.completed",
            "a task failed: {event}"
        );
        let id = event["task_id"].as_str().unwrap_or_default();
        if let Some(t) = published.remove(id) {
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Ok((start.elapsed(), latencies))
}

pub fn run(args: BenchDispatchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile_dir()?;
    let args = Arc::new(args);
    let stamp = crate::store::now_ms();
    let result = runtime.block_on(async {
        // Baseline: the same deliberations on an in-process engine, one worker's concurrency.
        let direct = {
            let engine = args.model.start_engine()?;
            let backend: Arc<dyn council_inference::Backend> = Arc::new(engine);
            let a = args.clone();
            let (wall, mut lat) = drive(args.tasks, args.in_flight, move |i| {
                let b = backend.clone();
                let body = serde_json::to_vec(&task_json(&a, i)).unwrap_or_default();
                let req = crate::dispatch::task::parse(&body, "direct.DEV", "direct", 1 << 20, |_| true)
                    .map(|t| t.request());
                async move {
                    let req = req?.map_err(anyhow::Error::msg)?;
                    // The judge the served workers run with (`councils.judge`'s default).
                    let judge = crate::config::RawCouncils::default().judge().into();
                    super::bench_service::direct(b.as_ref(), req, judge).await
                }
            })
            .await?;
            summary(wall, &mut lat)
        };
        println!(
            "{} tasks per measurement, {} agents, {} round(s), {} in flight per worker; latency = publish to result event",
            args.tasks, args.agents, args.rounds, args.in_flight
        );
        println!("| path | tasks/s | ratio to direct | p50 ms | p99 ms |");
        println!("|---|---|---|---|---|");
        println!(
            "| direct, in-process (baseline) | {:.2} | 1.000 | {:.0} | {:.0} |",
            direct.0, direct.1, direct.2
        );
        for &n in &args.workers {
            let run = format!("bench{stamp}w{n}");
            let (wall, mut lat) = through_nats(&args, &run, n, &dir).await?;
            let tps = lat.len() as f64 / wall.as_secs_f64();
            println!(
                "| NATS, {n} worker process{} | {tps:.2} | {:.3} | {:.0} | {:.0} |",
                if n == 1 { "" } else { "es" },
                tps / direct.0,
                quantile(&mut lat, 0.50),
                quantile(&mut lat, 0.99)
            );
        }
        Ok::<_, anyhow::Error>(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("council-bench-dispatch-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
