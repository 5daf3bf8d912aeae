//! `vectordb`: the admin CLI (docs/cli.md). One module per command in `commands/`: its arguments, its run, its human
//! and `--json` output.

mod commands;

use std::process::ExitCode;

use aura_cli::init_logging;
use aura_runtime::Settings;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "vectordb",
    version,
    about = "AURA360 vectordb admin: run the pipeline in-process, publish events, manage topics, search and inspect the \
             store; backlog (lag), export/replay and dead-letter replay, configuration check."
)]
struct Cli {
    #[command(subcommand)]
    command: commands::Command,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    aura_cli::release_freed_memory_promptly();
    init_logging(settings.log_format, "warn");
    match commands::run(cli.command, settings).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
