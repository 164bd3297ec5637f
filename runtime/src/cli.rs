//! Command-line grammar of the `council` binary and its dispatch.

use crate::{deliberate, dev, generate, serve};

/// Councils of role agents that deliberate, score and rank, on one batched inference engine.
#[derive(Debug, clap::Parser)]
#[command(name = "council", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run one deliberation of a council on a task and print the ranked outcome.
    Deliberate(deliberate::DeliberateArgs),
    /// Serve the fleet.orchestrator.v1 gRPC API.
    Serve(serve::ServeArgs),
    /// Generate one chat completion with the in-process engine.
    Generate(generate::GenerateArgs),
    /// Developer tools: tiny models, engine benchmarks.
    #[command(subcommand)]
    Dev(dev::DevCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Deliberate(args) => deliberate::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Dev(command) => dev::run(command),
    }
}
