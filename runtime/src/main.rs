//! The `council` binary: parses arguments, installs tracing, calls the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = council_runtime::cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli.default_log_filter()));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        council_runtime::cli::LogFormat::Text => logs.init(),
        council_runtime::cli::LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    match council_runtime::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<council_runtime::eval::Interrupted>() => {
            // The conventional status of a process stopped by SIGINT.
            eprintln!("{e}");
            std::process::ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
