//! Command-line grammar of the `council` binary and its dispatch.

pub mod bench_batching;
pub mod bench_dispatch;
pub mod bench_service;
pub mod deliberate;
pub mod dev;
pub mod generate;
pub mod gpu_check;
pub mod health;
pub mod serve;
pub mod server;

use crate::eval;

/// Councils of role agents that deliberate, score and rank, on one batched inference engine.
#[derive(Debug, clap::Parser)]
#[command(name = "council", version, about)]
pub struct Cli {
    /// Log lines as text or as JSON objects (one per line); the filter comes from RUST_LOG.
    #[arg(long, global = true, env = "COUNCIL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Cli {
    /// The log filter when RUST_LOG is unset: a service logs its life, a CLI only warnings and
    /// the download of a model (minutes on a fresh machine, so it says what it is doing).
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Serve(_) => "info",
            // What a remote server was found to serve is one line at start-up.
            _ => "warn,council_inference::fetch=info,council_inference::vllm=info",
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run one deliberation of a council on a task and print the ranked outcome.
    Deliberate(deliberate::DeliberateArgs),
    /// Evaluate a council against single-agent, self-refine and majority-vote baselines.
    Eval(Box<eval::EvalArgs>),
    /// Serve the fleet.orchestrator.v1 gRPC API.
    #[command(mut_args = crate::config::with_default)]
    Serve(Box<serve::ServeArgs>),
    /// Generate one chat completion with the in-process engine.
    Generate(generate::GenerateArgs),
    /// Ask a running `council serve` for its gRPC health; exit 0 only when SERVING.
    Health(health::HealthArgs),
    /// Developer tools: tiny models, engine benchmarks.
    #[command(subcommand)]
    Dev(dev::DevCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Deliberate(args) => deliberate::run(args),
        Command::Eval(args) => eval::run(*args),
        Command::Generate(args) => generate::run(args),
        Command::Health(args) => health::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Dev(command) => dev::run(command),
    }
}

/// A prompt of exactly `n` token ids that stays inside the tokenizer's ordinary vocabulary.
pub fn bench_prompt(n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7 + salt * 13) % 200 + 32) as u32)
        .collect()
}
