//! `council deliberate`: one deliberation of a default council on the in-process engine,
//! printed as a ranked table or as JSON.

use anyhow::Context;
use council_councils::outcome::Decision;
use council_councils::parse::AnswerFormat;
use council_councils::personas::council_of;
use council_councils::spec::{DeliberationConfig, JudgeMode, Visibility};
use council_councils::{Deliberation, Outcome, OutcomeStatus, Role, Task, TaskId};

use crate::judge::Judge;
use crate::model_source::ModelArgs;
use crate::outcome_json::outcome_json;

#[derive(Debug, Clone, clap::Args)]
pub struct DeliberateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The task to deliberate on.
    pub task: String,
    /// Council role: DEV, QA, ARCHITECT, DEVOPS, DATA, or a custom role name.
    #[arg(long, default_value = "DEV")]
    pub role: String,
    /// Critique-and-revise rounds.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Agents in the council.
    #[arg(long, default_value_t = 3)]
    pub agents: usize,
    /// Rubric; each line or `;`-separated item is a criterion.
    #[arg(long, default_value = "")]
    pub rubric: String,
    /// A requirement (repeatable).
    #[arg(long = "requirement")]
    pub requirements: Vec<String>,
    /// Declared answer format: integer, number or text.
    #[arg(long)]
    pub answer_format: Option<String>,
    /// Who sees whose proposal: all, ring, or sparse:N.
    #[arg(long, default_value = "all")]
    pub visibility: String,
    /// Token budget of the whole deliberation.
    #[arg(long)]
    pub token_budget: Option<u64>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens_per_call: u32,
    /// How the peers judge each other. `logprob`: each judge's ranking is read off the
    /// log-probabilities of the proposals' letters (asked in two opposite orders) and each
    /// rubric score is the expected value of the log-probabilities of "1".."10"; one prefill
    /// per judgement, nothing to parse, so a small model's judgements are all usable. `text`:
    /// scores and a ranking line written in the reply, with reasons; needs a model that
    /// follows the format.
    #[arg(long, value_enum, default_value_t = Judge::Logprob)]
    pub judge: Judge,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

fn visibility(s: &str) -> anyhow::Result<Visibility> {
    match s {
        "all" => Ok(Visibility::All),
        "ring" => Ok(Visibility::Ring),
        _ => match s.strip_prefix("sparse:").map(str::parse) {
            Some(Ok(peers)) => Ok(Visibility::Sparse { peers }),
            _ => anyhow::bail!("--visibility {s:?}: expected all, ring or sparse:N"),
        },
    }
}

fn answer_format(s: &str) -> anyhow::Result<AnswerFormat> {
    match s {
        "integer" => Ok(AnswerFormat::Integer),
        "number" => Ok(AnswerFormat::Number),
        "text" => Ok(AnswerFormat::Text),
        _ => anyhow::bail!("--answer-format {s:?}: expected integer, number or text"),
    }
}

/// Builds the deliberation the arguments describe; every bad value is named before any model loads.
pub fn build(args: &DeliberateArgs) -> anyhow::Result<Deliberation> {
    let role: Role = args.role.parse().context("--role")?;
    let mut council = council_of(&role, args.agents).context("--agents")?;
    let config = DeliberationConfig {
        rounds: args.rounds,
        visibility: visibility(&args.visibility)?,
        token_budget: args.token_budget,
        max_tokens_per_call: args.max_tokens_per_call,
        judge: args.judge.into(),
        ..council.config
    };
    config.validate().context("deliberation config")?;
    council.config = config;
    let mut task = Task::new(
        TaskId::new(format!("cli-{}", args.seed))?,
        args.task.clone(),
    )
    .context("task")?;
    task.rubric = args.rubric.clone();
    task.requirements = args.requirements.clone();
    task.answer_format = args
        .answer_format
        .as_deref()
        .map(answer_format)
        .transpose()?;
    task.validate().context("task")?;
    Ok(Deliberation::new(council, task, config, args.seed))
}

pub fn run(args: DeliberateArgs) -> anyhow::Result<()> {
    let deliberation = build(&args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (backend, _, _) = args.model.start_backend(&runtime)?;
    // A server that cannot score choices judges with text (warned in `servable_judge`).
    let (args, deliberation) =
        match crate::model_source::servable_judge(backend.as_ref(), args.judge.into()) {
            JudgeMode::Text if args.judge == Judge::Logprob => {
                let args = DeliberateArgs {
                    judge: Judge::Text,
                    ..args
                };
                let deliberation = build(&args)?;
                (args, deliberation)
            }
            _ => (args, deliberation),
        };
    let outcome = runtime.block_on(crate::driver::run(backend.as_ref(), deliberation))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome_json(&outcome))?);
    } else {
        print_table(&outcome);
    }
    match &outcome.status {
        OutcomeStatus::Completed => Ok(()),
        OutcomeStatus::Failed { reason } => anyhow::bail!("deliberation failed: {reason}"),
    }
}

fn fmt_score(s: Option<f64>) -> String {
    s.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
}

fn print_table(o: &Outcome) {
    println!(
        "task {} · council {} · stop: {:?} after {} round(s)",
        o.task, o.council, o.stop_reason, o.rounds_run
    );
    println!(
        "{:<5} {:<12} {:>6} {:>6} {:>6} {:>6} {:>6}  first line",
        "rank", "agent", "score", "peers", "rubric", "major", "checks"
    );
    for p in &o.proposals {
        let first = p
            .content
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default();
        let first: String = first.chars().take(60).collect();
        println!(
            "{:<5} {:<12} {:>6.3} {:>6} {:>6} {:>6} {:>6}  {first}",
            p.rank,
            p.agent.as_str(),
            p.score,
            fmt_score(p.scores.peer_ranking),
            fmt_score(p.scores.rubric),
            fmt_score(p.scores.majority),
            fmt_score(p.scores.checks),
        );
    }
    for f in &o.failed_agents {
        println!(
            "failed: {} in {} round {}: {}",
            f.agent,
            f.phase.as_str(),
            f.round,
            f.reason
        );
    }
    let j = o.judging;
    if j.asked() > 0 {
        println!(
            "judging: {} of {} peer rankings and {} of {} rubric scores read",
            j.rankings_read, j.rankings_asked, j.scores_read, j.scores_asked
        );
    }
    if o.decided_by == Some(Decision::TieBreak) {
        println!(
            "note: the judges did not separate the first two proposals; the order between them is the deterministic tie-break"
        );
    }
    match (&o.winner, o.margin) {
        (Some(w), Some(m)) => {
            println!("winner: {w} (margin: wins over the runner-up with p = {m:.2})")
        }
        _ => println!("no winner"),
    }
    println!(
        "usage: {} calls ({} failed), {} prompt + {} completion tokens",
        o.usage.calls, o.usage.failed_calls, o.usage.prompt_tokens, o.usage.completion_tokens
    );
}
