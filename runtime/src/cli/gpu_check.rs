//! `council dev gpu-check`: the engine on a device against the CPU f32 engine, on generated
//! models (a Qwen2 and a Qwen3), with one PASS or FAIL line per check and its figures:
//!
//! - **logits**: every position of three prompts, the device's logits against the CPU's f32
//!   logits (`diagnostics::logit_drift`): mean |Δ| within 4 % of the reference logits' spread,
//!   mean KL(f32 ‖ device) under 0.01 nats, the same top token at 90 % of the positions or
//!   more. These are the bounds a faithful rounding of every weight to 8 significant bits
//!   stays within on these models (Q8_0 blocks on the CPU: 1.7–2.2 % of the spread, KL
//!   0.002–0.004 nats); bf16 keeps 8 bits of mantissa, so a correct bf16 path meets them too,
//!   and a wrong layout, transposition or kernel misses them by far.
//! - **batch invariance**: greedy tokens of the three prompts run together equal those run
//!   one at a time on the device, token for token.
//! - **scoring**: log-prob scores of 15 choices after each prompt on the device against the
//!   CPU f32 engine's: within 0.2 nats on average and 0.5 at most (a choice of several tokens
//!   adds up the rounding of each), the same best choice after every prompt.
//!
//! With `--cuda N` the device is that GPU, in bf16 (a build with `--features cuda`). Without
//! it, the "device" is the CPU engine with `--quantize` weights, which runs every check where
//! no GPU is (CI does). The exit status is non-zero when any check fails.

use std::path::PathBuf;
use std::time::Instant;

use super::bench_prompt;
use council_inference::engine::diagnostics::{LogitDrift, logit_drift, logits_on};
use council_inference::engine::loader::{DeviceChoice, ModelFiles};
use council_inference::tiny::{self, TinyArch, TinyModelSpec, TinyShape};
use council_inference::{
    Backend, Engine, EngineConfig, EngineHandle, GenerateRequest, Prompt, Quantization,
    ScoreRequest,
};

#[derive(Debug, clap::Args)]
pub struct GpuCheckArgs {
    /// The CUDA GPU under test (bf16; needs a build with `--features cuda`).
    #[arg(long, value_name = "ORDINAL")]
    pub cuda: Option<usize>,
    /// Without --cuda: the CPU engine with these weights stands in for the device.
    #[arg(long, value_name = "q8_0", default_value = "q8_0", value_parser = Quantization::parse)]
    pub quantize: Quantization,
    /// Where the generated models are written (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Multiplies every tolerance (0 leaves none: every inexact comparison then fails).
    #[arg(long, default_value_t = 1.0)]
    pub tolerance_scale: f64,
}

/// What runs under test.
#[derive(Debug, Clone, Copy)]
struct UnderTest {
    device: DeviceChoice,
    quantization: Quantization,
}

impl UnderTest {
    fn label(&self) -> String {
        match self.device {
            DeviceChoice::Cuda(n) => format!("cuda:{n} bf16"),
            DeviceChoice::Cpu => format!("cpu {}", self.quantization),
        }
    }

    fn engine(&self, files: &ModelFiles) -> anyhow::Result<EngineHandle> {
        Ok(Engine::load(
            files,
            "gpu-check",
            EngineConfig {
                device: self.device,
                quantization: self.quantization,
                ..EngineConfig::default()
            },
        )?)
    }
}

/// Three prompts of different lengths inside the tiny tokenizer's ordinary vocabulary.
fn prompts() -> [Vec<u32>; 3] {
    [
        bench_prompt(7, 1),
        bench_prompt(33, 2),
        bench_prompt(100, 3),
    ]
}

/// A directory of our own, removed when the check ends however it ends.
#[derive(Debug)]
struct Scratch(Option<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One check's verdict and what it measured.
#[derive(Debug)]
struct Verdict {
    name: String,
    passed: bool,
    figures: String,
}

impl Verdict {
    fn print(&self) {
        let mark = if self.passed { "PASS" } else { "FAIL" };
        println!("{mark} {}: {}", self.name, self.figures);
    }
}

/// Whether `drift` is within the logits tolerances scaled by `scale`.
fn logits_pass(drift: &LogitDrift, scale: f64) -> bool {
    drift.mean_abs <= 0.04 * scale * drift.mean_spread
        && drift.mean_kl <= 0.01 * scale
        && drift.same_top as f64 >= (1.0 - 0.1 * scale.min(10.0)) * drift.positions as f64
}

fn check_logits(
    arch: &str,
    files: &ModelFiles,
    under: UnderTest,
    scale: f64,
) -> anyhow::Result<Verdict> {
    let exact = logits_on(files, DeviceChoice::Cpu, Quantization::None, &prompts())?;
    let approx = logits_on(files, under.device, under.quantization, &prompts())?;
    let d = logit_drift(&exact, &approx).map_err(anyhow::Error::msg)?;
    Ok(Verdict {
        name: format!("{arch} logits ({} against cpu f32)", under.label()),
        passed: logits_pass(&d, scale),
        figures: format!(
            "{} positions of 3 prompts: max |d| {:.4}, mean |d| {:.4} ({:.2} % of the spread \
             {:.3}; bound {:.2} %), same top token at {} ({:.1} %), mean KL {:.5} nats \
             (bound {:.5})",
            d.positions,
            d.max_abs,
            d.mean_abs,
            100.0 * d.mean_abs / d.mean_spread,
            d.mean_spread,
            4.0 * scale,
            d.same_top,
            100.0 * d.same_top as f64 / d.positions as f64,
            d.mean_kl,
            0.01 * scale
        ),
    })
}

async fn check_batching(arch: &str, engine: &EngineHandle, label: &str) -> anyhow::Result<Verdict> {
    let request = |p: &Vec<u32>| GenerateRequest::tokens(p.clone(), 16);
    let mut alone = Vec::new();
    for p in prompts() {
        alone.push(engine.generate(request(&p)).await?.token_ids);
    }
    let together: Vec<_> = prompts()
        .iter()
        .map(|p| engine.generate(request(p)))
        .collect();
    let mut batched = Vec::new();
    for f in together {
        batched.push(f.await?.token_ids);
    }
    let same = alone.iter().zip(&batched).filter(|(a, b)| a == b).count();
    let tokens: usize = alone.iter().map(Vec::len).sum();
    Ok(Verdict {
        name: format!("{arch} batch invariance ({label})"),
        passed: same == alone.len() && tokens > 0,
        figures: format!(
            "greedy tokens of 3 prompts run together equal those run alone for {same} of 3 \
             ({tokens} tokens)"
        ),
    })
}

async fn check_scoring(
    arch: &str,
    tested: &EngineHandle,
    reference: &EngineHandle,
    label: &str,
    scale: f64,
) -> anyhow::Result<Verdict> {
    let choices: Vec<String> = ["A", "B", "C", "yes", "no"]
        .into_iter()
        .map(str::to_owned)
        .chain((1..=10).map(|v| v.to_string()))
        .collect();
    let (mut worst, mut total, mut scored, mut same_best, mut asked) = (0f64, 0f64, 0, 0, 0);
    for p in prompts() {
        let request = ScoreRequest::new(Prompt::Tokens(p), choices.clone());
        let a = reference.score(request.clone()).await?.logprobs;
        let b = tested.score(request).await?.logprobs;
        anyhow::ensure!(a.len() == b.len(), "{} scores against {}", a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            worst = worst.max((x - y).abs());
            total += (x - y).abs();
            scored += 1;
        }
        let best = |v: &[f64]| {
            v.iter()
                .enumerate()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .map(|(i, _)| i)
        };
        same_best += usize::from(best(&a) == best(&b));
        asked += 1;
    }
    let mean = total / f64::from(scored.max(1));
    let (mean_bound, max_bound) = (0.2 * scale, 0.5 * scale);
    Ok(Verdict {
        name: format!("{arch} scoring ({label} against cpu f32)"),
        passed: mean <= mean_bound && worst <= max_bound && same_best == asked,
        figures: format!(
            "{} choices after each of 3 prompts: mean |d log-prob| {mean:.5} nats (bound \
             {mean_bound:.3}), max {worst:.5} (bound {max_bound:.3}), the same best choice for \
             {same_best} of {asked}",
            choices.len()
        ),
    })
}

pub fn run(args: GpuCheckArgs) -> anyhow::Result<()> {
    let under = match args.cuda {
        Some(n) => UnderTest {
            device: DeviceChoice::Cuda(n),
            quantization: Quantization::None,
        },
        None => UnderTest {
            device: DeviceChoice::Cpu,
            quantization: args.quantize,
        },
    };
    anyhow::ensure!(
        args.cuda.is_some() || under.quantization != Quantization::None,
        "without --cuda the CPU engine stands in for the device: name a --quantize other than \
         none, or the check compares f32 with itself"
    );
    anyhow::ensure!(
        args.tolerance_scale.is_finite() && args.tolerance_scale >= 0.0,
        "--tolerance-scale must be a finite number >= 0"
    );
    let work = match &args.work_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("council-gpu-check-{}", std::process::id())),
    };
    let _scratch = Scratch(args.work_dir.is_none().then(|| work.clone()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let start = Instant::now();
    let mut verdicts = Vec::new();
    for (arch, name) in [(TinyArch::Qwen2, "qwen2"), (TinyArch::Qwen3, "qwen3")] {
        let dir = work.join(name);
        tiny::write_tiny_model(
            &dir,
            &TinyModelSpec {
                arch,
                shape: TinyShape::Tiny,
                seed: 0,
                shard_bytes: None,
                padded_vocab: None,
            },
        )?;
        let files = ModelFiles::from_dir(&dir)?;
        let verdict = check_logits(name, &files, under, args.tolerance_scale)?;
        verdict.print();
        verdicts.push(verdict);
        let tested = under.engine(&files)?;
        let reference = UnderTest {
            device: DeviceChoice::Cpu,
            quantization: Quantization::None,
        }
        .engine(&files)?;
        for verdict in runtime.block_on(async {
            Ok::<_, anyhow::Error>([
                check_batching(name, &tested, &under.label()).await?,
                check_scoring(
                    name,
                    &tested,
                    &reference,
                    &under.label(),
                    args.tolerance_scale,
                )
                .await?,
            ])
        })? {
            verdict.print();
            verdicts.push(verdict);
        }
    }
    let passed = verdicts.iter().filter(|v| v.passed).count();
    println!(
        "gpu-check: {passed} of {} checks passed on {} in {:.1} s",
        verdicts.len(),
        under.label(),
        start.elapsed().as_secs_f64()
    );
    anyhow::ensure!(
        passed == verdicts.len(),
        "{} check(s) failed",
        verdicts.len() - passed
    );
    Ok(())
}
