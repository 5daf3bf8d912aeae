//! `vectordb export`: a topic (or a range of it) to JSONL, one record per line with its Kafka coordinates, key,
//! headers and value bytes.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use aura_cli::progress::Progress;
use aura_runtime::Settings;

use super::range::RangeArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    range: RangeArgs,
    /// Stop after this many records (all partitions together), like the console consumer's `--max-messages`.
    #[arg(long, value_name = "N")]
    max_messages: Option<u64>,
    /// Output file, or `-` for standard output.
    #[arg(long, value_name = "FILE|-", default_value = "-")]
    out: PathBuf,
    /// Print the summary as JSON (on stderr when writing to standard output).
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args, settings: Settings) -> anyhow::Result<ExitCode> {
    let Args {
        range,
        max_messages,
        out,
        json,
    } = args;
    let range = range
        .range(&settings, max_messages)
        .context("give --topic (see --help)")?;
    let to_stdout = out.as_os_str() == "-";
    let writer: Box<dyn Write + Send> = if to_stdout {
        Box::new(std::io::stdout())
    } else {
        Box::new(
            std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?,
        )
    };
    let total = aura_cli::replay::records_in(&settings, &range).await;
    let progress = Arc::new(Progress::new("records exported", total, json));
    let bar = progress.clone();
    let summary = aura_cli::replay::export(&settings, range, writer, move |n| bar.set(n)).await?;
    progress.finish();
    if json {
        let line = serde_json::to_string(&summary)?;
        if to_stdout {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    } else {
        eprintln!(
            "exported {} record(s) of {} to {}",
            summary.records,
            summary.topic,
            out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
