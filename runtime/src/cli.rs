//! Command-line grammar of the `council` binary and its dispatch.

use crate::{dev, generate};

/// Councils of role agents that deliberate, score and rank, on one batched inference engine.
#[derive(Debug, clap::Parser)]
#[command(name = "council", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Generate one chat completion with the in-process engine.
    Generate(generate::GenerateArgs),
    /// Developer tools: tiny models, engine benchmarks.
    #[command(subcommand)]
    Dev(dev::DevCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Dev(command) => dev::run(command),
    }
}
