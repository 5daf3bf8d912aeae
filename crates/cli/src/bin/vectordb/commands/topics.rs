//! `vectordb topics create`: the three aura360 topics and their `.dlq` topics.

use std::process::ExitCode;

use aura_runtime::Settings;
use clap::Subcommand;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: TopicsCommand,
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create the three aura360 topics and their `.dlq` topics; existing topics are left as they are.
    Create {
        #[arg(long, default_value_t = 3)]
        partitions: i32,
        #[arg(long, default_value_t = 1)]
        replication_factor: i32,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: Args, settings: Settings) -> anyhow::Result<ExitCode> {
    let TopicsCommand::Create {
        partitions,
        replication_factor,
        json,
    } = args.command;
    let names = aura_kafka::TopicNames::from_settings(&settings.kafka).all();
    let statuses =
        aura_kafka::create_topics(&settings.kafka, &names, partitions, replication_factor).await?;
    if json {
        println!("{}", serde_json::to_string(&statuses)?);
    } else {
        for status in statuses {
            println!("{:8} {}", status.status, status.topic);
        }
    }
    Ok(ExitCode::SUCCESS)
}
