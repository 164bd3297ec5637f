//! `council eval`: batch evaluation of a council against single-agent, self-refine and
//! majority-vote baselines at matched compute, on generated suites or a user's task file.
//!
//! Many items run at once so the backend batches across them; each finished item × arm is
//! appended to `results.jsonl` at once, so an interrupted run (Ctrl-C, a crash) leaves a
//! consistent partial output that `--resume` completes without redoing anything. The summary,
//! report and plots are computed from the result lines alone.

pub mod arms;
pub mod game24;
pub mod item;
pub mod output;
pub mod plots;
pub mod record;
pub mod report;
pub mod stats;
pub mod suites;
pub mod summary;
pub mod tasks;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use council_councils::Role;
use council_inference::Backend;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::{Semaphore, mpsc};

use crate::model_source::ModelArgs;
use arms::{ArmRun, Metered, Plan, Target};
use item::EvalItem;
use output::{OutDir, Settings};
use record::{Arm, BudgetKind, ResultRecord};
use summary::{RunInfo, Summary};

#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A built-in suite: arithmetic, multistep, game24, last_letters, word_problems.
    #[arg(long, conflicts_with = "tasks", required_unless_present = "tasks")]
    pub suite: Option<String>,
    /// A JSONL task file (id, prompt, optional answer / answer_type / options / role / rubric /
    /// requirements).
    #[arg(long, value_name = "FILE")]
    pub tasks: Option<PathBuf>,
    /// Items to evaluate (the first N of the suite or the file).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Seed of the suite generator and of every sample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Arms to run, comma-separated: single, self_refine, majority, council.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "single,self_refine,majority,council"
    )]
    pub arms: Vec<String>,
    /// Council role for items that do not name one.
    #[arg(long, default_value = "DATA")]
    pub role: String,
    /// Agents in the council (and answers per wave of the majority vote).
    #[arg(long, default_value_t = 3)]
    pub agents: usize,
    /// Critique-and-revise rounds of the council.
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    /// Rounds of self-refine; defaults to --rounds.
    #[arg(long)]
    pub refine_rounds: Option<u32>,
    /// What the majority vote matches to the council: its tokens or its calls.
    #[arg(long, value_enum, default_value_t = VoteMatch::Tokens)]
    pub vote_match: VoteMatch,
    /// Most samples of one majority vote.
    #[arg(long, default_value_t = 64)]
    pub max_vote_samples: u64,
    #[arg(long, default_value_t = 256)]
    pub max_tokens_per_call: u32,
    /// How the council's peers judge each other: `logprob` (rankings and rubric scores read off
    /// log-probabilities) or `text` (written scores and ranking lines); see `deliberate --help`.
    #[arg(long, value_enum, default_value_t = crate::judge::Judge::Logprob)]
    pub judge: crate::judge::Judge,
    /// Items in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Backend calls in flight at once (below the engine's queue limit).
    #[arg(long, default_value_t = 128)]
    pub max_in_flight_calls: usize,
    /// Output directory (results.jsonl, summary.json, report.md, plots/, transcripts/).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Continue the run in --out: items × arms already there are not run again.
    #[arg(long)]
    pub resume: bool,
}

/// `--vote-match`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VoteMatch {
    Tokens,
    Calls,
}

/// The run was interrupted (Ctrl-C); its partial output is consistent and resumable.
#[derive(Debug, thiserror::Error)]
#[error("interrupted after {done} of {total} item × arm runs; rerun with --resume to finish")]
pub struct Interrupted {
    pub done: usize,
    pub total: usize,
}

/// Everything decided before the backend starts.
#[derive(Debug)]
struct Prepared {
    plan: Plan,
    items: Vec<EvalItem>,
    arms: Vec<Arm>,
    source: String,
}

fn prepare(args: &EvalArgs) -> anyhow::Result<Prepared> {
    let mut arms = args
        .arms
        .iter()
        .map(|a| a.trim().parse::<Arm>().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<Arm>>>()
        .context("--arms")?;
    arms.sort();
    arms.dedup();
    anyhow::ensure!(!arms.is_empty(), "--arms: name at least one arm");
    anyhow::ensure!(args.limit > 0, "--limit: must be at least 1");
    anyhow::ensure!(args.concurrency > 0, "--concurrency: must be at least 1");
    anyhow::ensure!(
        args.max_in_flight_calls > 0,
        "--max-in-flight-calls: must be at least 1"
    );
    let role: Role = args.role.parse().context("--role")?;
    let plan = Plan {
        role,
        agents: args.agents,
        rounds: args.rounds,
        refine_rounds: args.refine_rounds.unwrap_or(args.rounds),
        vote_match: match args.vote_match {
            VoteMatch::Tokens => BudgetKind::Tokens,
            VoteMatch::Calls => BudgetKind::Calls,
        },
        max_vote_samples: args.max_vote_samples,
        max_tokens_per_call: args.max_tokens_per_call,
        judge: args.judge.into(),
        seed: args.seed,
    };
    let (mut items, source) = match (&args.suite, &args.tasks) {
        (Some(name), _) => {
            let suite: suites::Suite = name
                .parse()
                .map_err(anyhow::Error::msg)
                .context("--suite")?;
            (
                suites::generate(suite, args.limit, args.seed),
                suite.to_string(),
            )
        }
        (None, Some(path)) => (tasks::load(path)?, path.display().to_string()),
        (None, None) => anyhow::bail!("name a --suite or a --tasks file"),
    };
    items.truncate(args.limit);
    // Every item must make a valid council and task before anything runs.
    for item in &items {
        plan.council(item)
            .and_then(|_| plan.task(item))
            .map_err(|e| anyhow::anyhow!("item {}: {e}", item.id))
            .context("--agents / --rounds / --max-tokens-per-call")?;
    }
    Ok(Prepared {
        plan,
        items,
        arms,
        source,
    })
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let prepared = prepare(&args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // A server is connected before the output directory is opened: one that cannot score
    // choices makes the run judge with text, and the settings must say so. (The engine always
    // scores; it still loads after the directory check.)
    let remote = match args.model.is_remote() {
        true => Some(args.model.start_backend(&runtime)?),
        false => None,
    };
    let mut prepared = prepared;
    if let Some((backend, _, _)) = &remote {
        prepared.plan.judge =
            crate::model_source::servable_judge(backend.as_ref(), prepared.plan.judge);
    }
    // The model's name (the settings of the output directory) is known before it loads.
    let model = match (&args.model.model_dir, args.model.is_remote()) {
        (Some(dir), false) => dir.display().to_string(),
        _ => args.model.model.clone(),
    };
    let settings = Settings {
        version: Settings::VERSION,
        source: prepared.source.clone(),
        seed: args.seed,
        model: model.clone(),
        backend: if args.model.is_remote() {
            "vllm"
        } else {
            "engine"
        }
        .to_owned(),
        role: prepared.plan.role.as_str().to_owned(),
        agents: prepared.plan.agents as u64,
        rounds: prepared.plan.rounds,
        refine_rounds: prepared.plan.refine_rounds,
        vote_match: prepared.plan.vote_match,
        max_vote_samples: prepared.plan.max_vote_samples,
        max_tokens_per_call: prepared.plan.max_tokens_per_call,
        judge: format!("{:?}", prepared.plan.judge).to_lowercase(),
    };
    let (mut out, existing) = OutDir::open(&args.out, &settings, args.resume)?;
    let (backend, _, _) = match remote {
        Some(started) => started,
        None => args.model.start_backend(&runtime)?,
    };
    let started = Instant::now();
    let shutdown = async {
        // Without a signal handler Ctrl-C would kill the process: never finish this branch then.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let job = Job {
        backend,
        prepared: &prepared,
        concurrency: args.concurrency,
        in_flight: Arc::new(Semaphore::new(args.max_in_flight_calls)),
    };
    let progress = runtime.block_on(job.run(&mut out, existing, shutdown))?;
    let info = RunInfo {
        model,
        backend: settings.backend.clone(),
        source: prepared.source.clone(),
        seed: args.seed,
        items: prepared.items.len() as u64,
        arms: prepared.arms.clone(),
        agents: prepared.plan.agents as u64,
        rounds: prepared.plan.rounds,
        refine_rounds: prepared.plan.refine_rounds,
        vote_match: prepared.plan.vote_match,
        max_tokens_per_call: prepared.plan.max_tokens_per_call,
        wall_time_s: started.elapsed().as_secs_f64(),
        complete: progress.done == progress.total,
    };
    let summary = write_summary(&out, &progress.records, info, args.seed)?;
    print_summary(&summary, &out);
    if progress.interrupted {
        return Err(Interrupted {
            done: progress.done,
            total: progress.total,
        }
        .into());
    }
    Ok(())
}

/// Writes summary.json, report.md and the plots from the result lines.
fn write_summary(
    out: &OutDir,
    records: &[ResultRecord],
    info: RunInfo,
    seed: u64,
) -> anyhow::Result<Summary> {
    out.sync()?;
    let summary = stats::summarize(records, info, seed);
    out.write("summary.json", &serde_json::to_string_pretty(&summary)?)?;
    out.write("report.md", &report::markdown(&summary))?;
    plots::write_plots(&summary, &out.root().join(plots::PLOTS_DIR))?;
    Ok(summary)
}

fn print_summary(summary: &Summary, out: &OutDir) {
    println!(
        "{:<12} {:>9} {:>8} {:>10} {:>10} {:>12}",
        "arm", "accuracy", "± se", "parse fail", "mean calls", "mean tokens"
    );
    let pct = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{:.1}%", v * 100.0));
    for a in &summary.arms {
        println!(
            "{:<12} {:>9} {:>8} {:>10} {:>10.1} {:>12.0}",
            a.arm.as_str(),
            pct(a.accuracy),
            pct(a.stderr),
            pct(a.parse_failure_rate),
            a.mean_calls,
            a.mean_tokens
        );
    }
    println!("report: {}", out.root().join("report.md").display());
}

/// What the run loop did.
#[derive(Debug)]
struct Progress {
    /// Every result line of the selected items and arms (earlier ones included).
    records: Vec<ResultRecord>,
    done: usize,
    total: usize,
    interrupted: bool,
}

/// The run loop's inputs.
struct Job<'a> {
    backend: Arc<dyn Backend>,
    prepared: &'a Prepared,
    concurrency: usize,
    in_flight: Arc<Semaphore>,
}

impl Job<'_> {
    async fn run(
        self,
        out: &mut OutDir,
        existing: Vec<ResultRecord>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<Progress> {
        let p = self.prepared;
        let selected: HashSet<(&str, Arm)> = p
            .items
            .iter()
            .flat_map(|i| p.arms.iter().map(move |&a| (i.id.as_str(), a)))
            .collect();
        // Earlier lines of this selection count; the last line of a pair wins.
        let mut done: BTreeMap<(String, Arm), ResultRecord> = BTreeMap::new();
        // The council's spend on an item sets the majority vote's budget, even when the
        // council is not among this invocation's arms.
        let spent: BTreeMap<String, Target> = existing
            .iter()
            .filter(|r| r.arm == Arm::Council)
            .map(|r| {
                let target = Target {
                    calls: r.calls,
                    tokens: Some(r.total_tokens()),
                };
                (r.item.clone(), target)
            })
            .collect();
        for r in existing {
            if selected.contains(&(r.item.as_str(), r.arm)) {
                done.insert((r.item.clone(), r.arm), r);
            }
        }
        let total = selected.len();
        let bar = progress_bar(total as u64, done.len() as u64);
        let (tx, mut rx) = mpsc::unbounded_channel::<ArmRun>();
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        for item in &p.items {
            let todo: Vec<Arm> = p
                .arms
                .iter()
                .copied()
                .filter(|&a| !done.contains_key(&(item.id.clone(), a)))
                .collect();
            if todo.is_empty() {
                continue;
            }
            let council = spent.get(&item.id).copied();
            let work = ItemWork {
                backend: self.backend.clone(),
                in_flight: self.in_flight.clone(),
                plan: p.plan.clone(),
                item: item.clone(),
                todo,
                council,
                tx: tx.clone(),
            };
            let permits = permits.clone();
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                work.run().await;
            });
        }
        drop(tx);
        tokio::pin!(shutdown);
        let mut interrupted = false;
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => { interrupted = true; break; }
                run = rx.recv() => match run {
                    Some(run) => {
                        let record = store(out, run)?;
                        done.insert((record.item.clone(), record.arm), record);
                        bar.inc(1);
                    }
                    None => break,
                },
            }
        }
        // Dropping the tasks cancels their backend requests; what already finished is kept.
        tasks.abort_all();
        while let Ok(run) = rx.try_recv() {
            let record = store(out, run)?;
            done.insert((record.item.clone(), record.arm), record);
        }
        bar.abandon();
        let done_count = done.len();
        Ok(Progress {
            records: done.into_values().collect(),
            done: done_count,
            total,
            interrupted,
        })
    }
}

/// Writes an arm's transcript, then its result line (so a line never names a missing file).
fn store(out: &mut OutDir, run: ArmRun) -> anyhow::Result<ResultRecord> {
    let mut record = run.record;
    record.transcript = Some(out.transcript(record.arm, &record.item, &run.transcript)?);
    out.append(&record)?;
    Ok(record)
}

fn progress_bar(total: u64, done: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{elapsed_precise} [{wide_bar}] {pos}/{len} item×arm runs · {per_sec} · ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_position(done);
    bar.reset_eta();
    bar
}

/// The arms still to run on one item.
struct ItemWork {
    backend: Arc<dyn Backend>,
    in_flight: Arc<Semaphore>,
    plan: Plan,
    item: EvalItem,
    todo: Vec<Arm>,
    /// The council's spend on this item from an earlier invocation, if it ran then.
    council: Option<Target>,
    tx: mpsc::UnboundedSender<ArmRun>,
}

impl ItemWork {
    fn meter(&self) -> Metered {
        Metered::new(self.backend.clone(), self.in_flight.clone())
    }

    fn wants(&self, arm: Arm) -> bool {
        self.todo.contains(&arm)
    }

    fn send(&self, run: ArmRun) {
        // The receiver is gone only when the run was interrupted: the result is not wanted.
        let _ = self.tx.send(run);
    }

    /// Runs the arms together (so the backend batches them); the majority vote waits for the
    /// council, whose spend it matches.
    async fn run(self) {
        let (plan, item) = (&self.plan, &self.item);
        let single = async {
            if self.wants(Arm::Single) {
                self.send(arms::single(self.meter(), plan, item).await);
            }
        };
        let refine = async {
            if self.wants(Arm::SelfRefine) {
                self.send(arms::self_refine(self.meter(), plan, item).await);
            }
        };
        let council_then_vote = async {
            let mut target = self.council;
            if self.wants(Arm::Council) {
                let run = arms::council(self.meter(), plan, item).await;
                target = Some(Target {
                    calls: run.record.calls,
                    tokens: Some(run.record.total_tokens()),
                });
                self.send(run);
            }
            if self.wants(Arm::Majority) {
                let target = target.unwrap_or(Target {
                    calls: plan.planned_council_calls(item),
                    tokens: None,
                });
                self.send(arms::majority(self.meter(), plan, item, target).await);
            }
        };
        tokio::join!(single, refine, council_then_vote);
    }
}
