//! `council deliberate`: one deliberation of a default council on the in-process engine,
//! printed as a ranked table or as JSON.

use anyhow::Context;
use council_councils::checks::CheckStatus;
use council_councils::outcome::Decision;
use council_councils::parse::AnswerFormat;
use council_councils::personas::council_of;
use council_councils::spec::{DeliberationConfig, JudgeMode, Visibility};
use council_councils::{Deliberation, Outcome, OutcomeStatus, Role, Task, TaskId};
use serde_json::json;

use crate::model_source::ModelArgs;

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

/// `--judge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Judge {
    Text,
    Logprob,
}

impl From<Judge> for JudgeMode {
    fn from(judge: Judge) -> Self {
        match judge {
            Judge::Text => JudgeMode::Text,
            Judge::Logprob => JudgeMode::LogProb,
        }
    }
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

fn check_json(status: &CheckStatus) -> serde_json::Value {
    match status {
        CheckStatus::Passed => json!({ "status": "passed" }),
        CheckStatus::Failed { reason } => json!({ "status": "failed", "reason": reason }),
        CheckStatus::Skipped { reason } => json!({ "status": "skipped", "reason": reason }),
    }
}

/// The outcome as JSON (a view for people and scripts; not a storage format).
pub fn outcome_json(o: &Outcome) -> serde_json::Value {
    let status = match &o.status {
        OutcomeStatus::Completed => json!({ "state": "completed" }),
        OutcomeStatus::Failed { reason } => json!({ "state": "failed", "reason": reason }),
    };
    json!({
        "task_id": o.task.as_str(),
        "council_id": o.council.as_str(),
        "status": status,
        "winner": o.winner.as_ref().map(|w| w.as_str()),
        "decided_by": o.decided_by.map(|d| d.as_str()),
        "margin": o.margin,
        "judging": {
            "rankings_asked": o.judging.rankings_asked,
            "rankings_read": o.judging.rankings_read,
            "scores_asked": o.judging.scores_asked,
            "scores_read": o.judging.scores_read,
        },
        "stop_reason": format!("{:?}", o.stop_reason),
        "rounds_run": o.rounds_run,
        "majority_answer": o.majority_answer,
        "usage": {
            "calls": o.usage.calls,
            "failed_calls": o.usage.failed_calls,
            "failed_judgements": o.usage.failed_judgements,
            "prompt_tokens": o.usage.prompt_tokens,
            "completion_tokens": o.usage.completion_tokens,
        },
        "failed_agents": o.failed_agents.iter().map(|f| json!({
            "agent": f.agent.as_str(), "phase": f.phase.as_str(), "round": f.round, "reason": f.reason,
        })).collect::<Vec<_>>(),
        "proposals": o.proposals.iter().map(|p| json!({
            "rank": p.rank,
            "agent": p.agent.as_str(),
            "role": p.role.as_str(),
            "score": p.score,
            "scores": {
                "peer_ranking": p.scores.peer_ranking,
                "condorcet": p.scores.condorcet,
                "rubric": p.scores.rubric,
                "majority": p.scores.majority,
                "checks": p.scores.checks,
            },
            "answer": p.answer,
            "checks": p.checks.iter().map(|c| json!({ "name": c.name, "result": check_json(&c.status) })).collect::<Vec<_>>(),
            "content": p.content,
            "revisions": p.revisions,
        })).collect::<Vec<_>>(),
        "transcript": o.transcript.iter().map(|r| json!({
            "call": r.call,
            "agent": r.agent.as_str(),
            "phase": r.phase.as_str(),
            "round": r.round,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "reply": match &r.reply { Ok(t) => json!({ "text": t }), Err(e) => json!({ "error": e }) },
        })).collect::<Vec<_>>(),
    })
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
