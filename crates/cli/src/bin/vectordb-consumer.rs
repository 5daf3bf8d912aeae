//! `vectordb-consumer`: mounts the enabled handlers on the Kafka consumer group (DESIGN §5).
//!
//! Configuration is the environment (and `.env`, `config/`); see the README. SIGTERM/SIGINT stop fetching, finish
//! in-flight events, commit and exit 0.

use std::process::ExitCode;

use aura_cli::consumer::{run, shutdown_signal};
use aura_cli::init_logging;
use aura_kafka::ConsumerOptions;
use aura_runtime::Settings;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "vectordb-consumer",
    version,
    about = "Runs the vectordb handlers on the Kafka consumer group KAFKA_GROUP_ID (MESSAGING_BACKEND=kafka); \
             idles in celery and disabled modes. Configured by environment variables (see README)."
)]
struct Cli {}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = Cli::parse();
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    init_logging(settings.log_format, "info");
    match run(settings, ConsumerOptions::default(), shutdown_signal()).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
