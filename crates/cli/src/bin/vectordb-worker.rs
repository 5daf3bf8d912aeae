//! `vectordb-worker`: mounts the enabled handlers on Celery queues over Redis, next to (or instead of) Python
//! Celery workers (docs/design.md §2, §3).
//!
//! Configuration is the environment (and `.env`, `config/`); see docs/configuration.md. SIGTERM/SIGINT stop fetching, finish
//! in-flight tasks, put back the ones not started, and exit 0.

use std::process::ExitCode;

use aura_cli::signal::shutdown_signal;
use aura_cli::{init_logging, worker};
use aura_runtime::Settings;
use aura_runtime::settings::Process;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "vectordb-worker",
    version,
    about = "Runs the vectordb handlers as a Celery worker on CELERY_QUEUES (BROKER_URL, RESULT_BACKEND); \
             compatible with Python Celery 5 producers, workers, Flower and `celery inspect`. Configured by \
             environment variables (see docs/configuration.md)."
)]
struct Cli {}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = Cli::parse();
    let settings = match Settings::load_for(Process::Worker) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    aura_cli::release_freed_memory_promptly();
    init_logging(settings.log_format, "info");
    aura_cli::announce_configuration(&settings);
    match worker::run(settings, shutdown_signal()).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
