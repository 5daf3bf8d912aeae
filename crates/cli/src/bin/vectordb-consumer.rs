//! `vectordb-consumer`: mounts the enabled handlers on the Kafka consumer group (docs/design.md §3).
//!
//! Configuration is the environment (and `.env`, `config/`); see docs/configuration.md. SIGTERM/SIGINT stop fetching, finish
//! in-flight events, commit and exit 0.

use std::process::ExitCode;

use aura_cli::consumer::run;
use aura_cli::init_logging;
use aura_cli::signal::shutdown_signal;
use aura_kafka::ConsumerOptions;
use aura_runtime::Settings;
use aura_runtime::settings::Process;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "vectordb-consumer",
    version,
    about = "Runs the vectordb handlers on the Kafka consumer group KAFKA_GROUP_ID (MESSAGING_BACKEND=kafka); \
             in celery mode forwards Kafka's backlog as Celery tasks (--no-drain: idles); idles when disabled. Configured by environment variables (see docs/configuration.md)."
)]
struct Cli {
    /// With MESSAGING_BACKEND=celery: do not forward Kafka's backlog as Celery tasks (same as
    /// KAFKA_DRAIN_TO_CELERY=false); the backlog then waits in Kafka until switching back.
    #[arg(long)]
    no_drain: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut settings = match Settings::load_for(Process::Consumer) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    if cli.no_drain {
        settings.kafka.drain_to_celery = false;
    }
    aura_cli::release_freed_memory_promptly();
    init_logging(settings.log_format, "info");
    aura_cli::announce_configuration(&settings);
    let options = ConsumerOptions::from(&settings);
    match run(settings, options, shutdown_signal()).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
