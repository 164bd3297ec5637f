//! `council dev bench-batching`: what continuous batching and prefix reuse buy a council, each
//! against its baseline measured in the same run on the same weights.
//!
//! - **prefix**: three requests sharing a long prefix, submitted together, on an engine with the
//!   prefix cache and on one without: prompt tokens computed and wall time.
//! - **round**: a council round (three prompts sharing a prefix, N new tokens each) submitted
//!   together against the same three requests one after another, on the same engine.
//! - **deliberation**: a whole deliberation (DEV council, 1 review round) driven as the runtime
//!   drives it (its calls in flight together) against the same calls made one at a time on the
//!   same engine; with the prompt tokens computed and served from cache per deliberation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use council_inference::{
    Backend, BackendFuture, BackendLoad, EngineHandle, EngineStats, GenerateRequest,
    GenerateResult, Health, ModelInfo, ScoreFuture, ScoreRequest,
};
use tokio::sync::Semaphore;

use super::deliberate::DeliberateArgs;
use crate::judge::Judge;
use crate::model_source::ModelArgs;

#[derive(Debug, clap::Args)]
pub struct BenchBatchingArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Scenarios to run (comma separated): prefix, round, deliberation.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "prefix,round,deliberation"
    )]
    pub scenarios: Vec<String>,
    /// Tokens the requests of the prefix and round scenarios share.
    #[arg(long, default_value_t = 512)]
    pub prefix_tokens: usize,
    /// Tokens of each request's own after the shared prefix.
    #[arg(long, default_value_t = 32)]
    pub own_tokens: usize,
    /// Tokens each request of the round scenario generates.
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Most tokens per call of the deliberation scenario.
    #[arg(long, default_value_t = 64)]
    pub max_tokens_per_call: u32,
    /// How the deliberation scenario's peers judge (as `deliberate --judge`).
    #[arg(long, value_enum, default_value_t = Judge::Logprob)]
    pub judge: Judge,
}

/// A prompt of exactly `n` token ids inside the tokenizer's ordinary vocabulary.
fn tokens(n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7 + salt * 13) % 200 + 32) as u32)
        .collect()
}

/// Three requests: the shared prefix, then `own` tokens of each.
fn council_round(args: &BenchBatchingArgs, new_tokens: usize) -> Vec<GenerateRequest> {
    (0..3)
        .map(|agent| {
            let mut prompt = tokens(args.prefix_tokens, 0);
            prompt.extend(tokens(args.own_tokens, agent + 1));
            GenerateRequest::tokens(prompt, new_tokens)
        })
        .collect()
}

/// Prompt tokens computed and served from cache between two snapshots.
fn prompt_delta(before: EngineStats, after: EngineStats) -> (u64, u64) {
    (
        after.prompt_tokens - before.prompt_tokens,
        after.cached_prompt_tokens - before.cached_prompt_tokens,
    )
}

async fn together(
    backend: &dyn Backend,
    requests: &[GenerateRequest],
) -> anyhow::Result<(Duration, Vec<GenerateResult>)> {
    let start = Instant::now();
    let futures: Vec<_> = requests
        .iter()
        .map(|r| backend.generate(r.clone()))
        .collect();
    let mut out = Vec::new();
    for f in futures {
        out.push(f.await?);
    }
    Ok((start.elapsed(), out))
}

async fn one_after_another(
    backend: &dyn Backend,
    requests: &[GenerateRequest],
) -> anyhow::Result<(Duration, Vec<GenerateResult>)> {
    let start = Instant::now();
    let mut out = Vec::new();
    for r in requests {
        out.push(backend.generate(r.clone()).await?);
    }
    Ok((start.elapsed(), out))
}

/// A backend that lets one call through at a time: the calls of a deliberation as upstream
/// made them, one after another, on the same engine.
#[derive(Debug)]
struct OneAtATime {
    inner: EngineHandle,
    gate: Arc<Semaphore>,
}

impl Backend for OneAtATime {
    fn generate(&self, request: GenerateRequest) -> BackendFuture {
        let (inner, gate) = (self.inner.clone(), self.gate.clone());
        Box::pin(async move {
            let _turn = gate
                .acquire_owned()
                .await
                .map_err(|_| council_inference::InferenceError::EngineStopped)?;
            inner.generate(request).await
        })
    }

    fn score(&self, request: ScoreRequest) -> ScoreFuture {
        let (inner, gate) = (self.inner.clone(), self.gate.clone());
        Box::pin(async move {
            let _turn = gate
                .acquire_owned()
                .await
                .map_err(|_| council_inference::InferenceError::EngineStopped)?;
            inner.score(request).await
        })
    }

    fn health(&self) -> Health {
        self.inner.health()
    }

    fn model_info(&self) -> &ModelInfo {
        self.inner.model_info()
    }

    fn load(&self) -> BackendLoad {
        self.inner.load()
    }
}

/// A fresh engine (nothing cached), warmed up on tokens no scenario uses: every measurement
/// starts from the same state.
fn start(
    model: &ModelArgs,
    prefix_cache: bool,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<EngineHandle> {
    let mut model = model.clone();
    model.no_prefix_cache = !prefix_cache;
    let engine = model.start_engine()?;
    let warm_up: Vec<GenerateRequest> = (0..model.max_batch.min(3))
        .map(|i| GenerateRequest::tokens(tokens(64, 90 + i), 2))
        .collect();
    runtime.block_on(together(&engine, &warm_up))?;
    Ok(engine)
}

pub fn run(args: BenchBatchingArgs) -> anyhow::Result<()> {
    for s in &args.scenarios {
        anyhow::ensure!(
            ["prefix", "round", "deliberation"].contains(&s.as_str()),
            "--scenarios: unknown scenario {s:?} (prefix, round, deliberation)"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let prefix_cache = !args.model.no_prefix_cache;
    let info = start(&args.model, prefix_cache, &runtime)?
        .model_info()
        .clone();
    println!(
        "model: {} ({}, {}); max batch {}, step budget {} tokens, prefix cache {}; every \
         measurement on a fresh engine",
        info.name,
        info.model_type,
        info.device,
        args.model.max_batch,
        args.model.max_step_tokens,
        if prefix_cache { "on" } else { "off" }
    );
    let wants = |s: &str| args.scenarios.iter().any(|x| x == s);
    if wants("prefix") {
        prefix(&args, &runtime)?;
    }
    if wants("round") {
        round(&args, &runtime, prefix_cache)?;
    }
    if wants("deliberation") {
        deliberation(&args, &runtime, prefix_cache)?;
    }
    Ok(())
}

fn prefix(args: &BenchBatchingArgs, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let requests = council_round(args, 1);
    let without = start(&args.model, false, runtime)?;
    let before = without.stats();
    let (plain_wall, _) = runtime.block_on(together(&without, &requests))?;
    let (plain_computed, _) = prompt_delta(before, without.stats());
    drop(without);
    let engine = &start(&args.model, true, runtime)?;
    let before = engine.stats();
    let (wall, results) = runtime.block_on(together(engine, &requests))?;
    let (computed, cached) = prompt_delta(before, engine.stats());
    let reported: usize = results.iter().map(|r| r.usage.cached_prompt_tokens).sum();
    println!(
        "prefix reuse, 3 requests sharing {} tokens (+{} own), submitted together:",
        args.prefix_tokens, args.own_tokens
    );
    println!("| prefix cache | prompt tokens computed | served from cache | wall s |");
    println!("|---|---|---|---|");
    println!(
        "| off | {plain_computed} | 0 | {:.3} |",
        plain_wall.as_secs_f64()
    );
    println!("| on | {computed} | {cached} | {:.3} |", wall.as_secs_f64());
    println!(
        "-> {:.1}% fewer prompt tokens computed, {:.2}x faster (usage reports {reported} cached)",
        100.0 * (1.0 - computed as f64 / plain_computed as f64),
        plain_wall.as_secs_f64() / wall.as_secs_f64()
    );
    Ok(())
}

fn round(
    args: &BenchBatchingArgs,
    runtime: &tokio::runtime::Runtime,
    prefix_cache: bool,
) -> anyhow::Result<()> {
    let requests = council_round(args, args.new_tokens);
    let engine = start(&args.model, prefix_cache, runtime)?;
    let (serial, serial_out) = runtime.block_on(one_after_another(&engine, &requests))?;
    drop(engine);
    let engine = start(&args.model, prefix_cache, runtime)?;
    let (batched, batched_out) = runtime.block_on(together(&engine, &requests))?;
    let generated =
        |out: &[GenerateResult]| -> usize { out.iter().map(|r| r.usage.completion_tokens).sum() };
    anyhow::ensure!(
        generated(&serial_out) == 3 * args.new_tokens
            && generated(&batched_out) == 3 * args.new_tokens,
        "a request stopped early; the comparison needs full-length generations"
    );
    println!(
        "council round, 3 requests sharing {} tokens, {} new tokens each:",
        args.prefix_tokens, args.new_tokens
    );
    println!("| submitted | wall s | generated tok/s |");
    println!("|---|---|---|");
    for (name, wall) in [("one after another", serial), ("together", batched)] {
        println!(
            "| {name} | {:.3} | {:.1} |",
            wall.as_secs_f64(),
            (3 * args.new_tokens) as f64 / wall.as_secs_f64()
        );
    }
    println!(
        "-> together is {:.2}x faster",
        serial.as_secs_f64() / batched.as_secs_f64()
    );
    Ok(())
}

fn deliberation(
    args: &BenchBatchingArgs,
    runtime: &tokio::runtime::Runtime,
    prefix_cache: bool,
) -> anyhow::Result<()> {
    let build = |seed: u64| {
        super::deliberate::build(&DeliberateArgs {
            model: args.model.clone(),
            task: "Design a retry policy for a flaky upstream payment service.".into(),
            role: "DEV".into(),
            rounds: 1,
            agents: 3,
            rubric: String::new(),
            requirements: Vec::new(),
            answer_format: None,
            visibility: "all".into(),
            token_budget: None,
            max_tokens_per_call: args.max_tokens_per_call,
            judge: args.judge,
            seed,
            json: false,
        })
    };
    println!(
        "deliberation, DEV council of 3, 1 review round, at most {} tokens per call, {:?} judge:",
        args.max_tokens_per_call, args.judge
    );
    println!(
        "| calls | wall s | backend calls | prompt tokens computed | served from cache | generated | judgements read |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut walls = Vec::new();
    for one_at_a_time in [true, false] {
        let engine = start(&args.model, prefix_cache, runtime)?;
        let serial = OneAtATime {
            inner: engine.clone(),
            gate: Arc::new(Semaphore::new(1)),
        };
        let (name, backend): (&str, &dyn Backend) = if one_at_a_time {
            ("one at a time", &serial)
        } else {
            ("batched", &engine)
        };
        let deliberation = build(0)?;
        let before = engine.stats();
        let start = Instant::now();
        let outcome = runtime.block_on(crate::driver::run(backend, deliberation))?;
        let wall = start.elapsed();
        let after = engine.stats();
        let (computed, cached) = prompt_delta(before, after);
        anyhow::ensure!(
            matches!(outcome.status, council_councils::OutcomeStatus::Completed),
            "the {name} deliberation failed: {:?}",
            outcome.status
        );
        println!(
            "| {name} | {:.3} | {} | {computed} | {cached} | {} | {} / {} |",
            wall.as_secs_f64(),
            outcome.usage.calls,
            after.generated_tokens - before.generated_tokens,
            outcome.judging.read(),
            outcome.judging.asked()
        );
        walls.push(wall);
    }
    println!(
        "-> batched is {:.2}x faster",
        walls[0].as_secs_f64() / walls[1].as_secs_f64()
    );
    Ok(())
}
