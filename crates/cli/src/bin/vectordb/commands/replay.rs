//! `vectordb replay`: records into the handlers, Kafka or Celery, from a topic range, an export file, or dead letters.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use aura_cli::progress::Progress;
use aura_runtime::Settings;

use super::range::RangeArgs;
use super::report_failures;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    range: RangeArgs,
    /// An export (or a JSONL of events) instead of a topic; `-` for standard input.
    #[arg(long, value_name = "FILE|-", conflicts_with_all = ["topic", "celery_dlq"])]
    file: Option<PathBuf>,
    /// Move every entry of `<QUEUE>.dlq` back onto the queue its task came from.
    #[arg(long, value_name = "QUEUE", conflicts_with_all = ["topic", "to"])]
    celery_dlq: Option<String>,
    /// Where the records go.
    #[arg(long, value_enum, required_unless_present = "celery_dlq")]
    to: Option<aura_cli::replay::Target>,
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args, settings: Settings) -> anyhow::Result<ExitCode> {
    let Args {
        range,
        file,
        celery_dlq,
        to,
        json,
    } = args;
    let topic_range = range.range(&settings, None);
    let total = match (&celery_dlq, &file) {
        (Some(_), _) => None,
        (None, Some(path)) if path.as_os_str() != "-" => aura_cli::replay::lines_in(path),
        (None, Some(_)) => None,
        (None, None) => match &topic_range {
            Some(range) => aura_cli::replay::records_in(&settings, range).await,
            None => None,
        },
    };
    let bar = Progress::new("replayed", total, json);
    let progress = |n: u64| bar.set(n);
    let summary = match (celery_dlq, file, to) {
        (Some(queue), _, _) => {
            aura_cli::replay::replay_celery_dead_letters(&settings, &queue, |n| progress(n as u64))
                .await?
        }
        (None, Some(path), Some(to)) => {
            let input: Box<dyn BufRead + Send> = if path.as_os_str() == "-" {
                Box::new(BufReader::new(std::io::stdin()))
            } else {
                Box::new(BufReader::new(
                    std::fs::File::open(&path)
                        .with_context(|| format!("opening {}", path.display()))?,
                ))
            };
            let source = aura_cli::replay::Source::File(input);
            aura_cli::replay::replay(&settings, source, to, progress).await?
        }
        (None, None, Some(to)) => {
            let range = topic_range.context("give --topic, --file or --celery-dlq (see --help)")?;
            let source = aura_cli::replay::Source::Topic(range);
            aura_cli::replay::replay(&settings, source, to, progress).await?
        }
        (None, _, None) => anyhow::bail!("give --to handlers|kafka|celery"),
    };
    bar.finish();
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "replayed {} of {} record(s){}",
            summary.replayed,
            summary.read,
            summary
                .to
                .map(|t| format!(" to {}", format!("{t:?}").to_lowercase()))
                .unwrap_or_default()
        );
        if let Some(points) = summary.collection_points {
            println!("points in the collection: {points}");
        }
    }
    Ok(report_failures(&summary.failed, !json))
}
