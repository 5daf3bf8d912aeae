//! `vectordb lag`: the Kafka group's position per topic/partition and the Celery queue depths.

use std::process::ExitCode;

use aura_runtime::Settings;

#[derive(clap::Args)]
pub struct Args {
    /// Consumer group (default: KAFKA_GROUP_ID).
    #[arg(long)]
    group: Option<String>,
    /// Only Kafka.
    #[arg(long, conflicts_with = "celery")]
    kafka: bool,
    /// Only Celery.
    #[arg(long)]
    celery: bool,
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args, settings: Settings) -> anyhow::Result<ExitCode> {
    let Args {
        group,
        kafka,
        celery,
        json,
    } = args;
    let group = group.unwrap_or_else(|| settings.kafka.group_id.clone());
    let (want_kafka, want_celery) = match (kafka, celery) {
        (false, false) => (true, true),
        other => other,
    };
    let report = aura_cli::lag::lag_report(&settings, &group, want_kafka, want_celery).await?;
    super::print_report(&report, json, aura_cli::lag::render_lag, !report.failed())
}
