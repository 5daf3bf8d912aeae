//! `vectordb pipeline`: the whole chain in-process on a JSONL file, into the configured store.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use aura_cli::pipeline::{self, PipelineOptions};
use aura_cli::{ModelCheck, configured_registry, wired};
use aura_runtime::Settings;
use aura_runtime::store::Durability;

#[derive(clap::Args)]
pub struct Args {
    /// JSONL file of events, or `-` for standard input.
    #[arg(long, value_name = "FILE|-")]
    events: PathBuf,
    /// Events in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args, settings: Settings) -> anyhow::Result<ExitCode> {
    let Args {
        events,
        concurrency,
        json,
    } = args;
    let registry = configured_registry(&settings)?;
    // A bulk load acknowledges nothing: flush per batch of lines instead of per write (re-runs are idempotent).
    let wired = wired(&settings, Durability::OnFlush, ModelCheck::Refuse).await?;
    let (ctx, embedder) = (wired.context, wired.embedder);
    let input: Box<dyn BufRead> = if events.as_os_str() == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        let file = std::fs::File::open(&events)
            .with_context(|| format!("opening {}", events.display()))?;
        Box::new(BufReader::new(file))
    };
    let options = PipelineOptions {
        concurrency: concurrency.max(1),
        ..PipelineOptions::default()
    };
    let show_progress = !json && std::io::stderr().is_terminal();
    let summary = pipeline::run(input, registry, ctx, &options, |s| {
        if show_progress {
            eprint!(
                "\r{} events read, {} points written, {} dead letters",
                s.events_in, s.points_written, s.dead_letter_count
            );
            let _ = std::io::stderr().flush();
        }
    })
    .await?;
    let mut summary = summary;
    summary.embedding = Some(pipeline::EmbeddingReport::new(&settings, embedder.stats()));
    if show_progress {
        eprintln!();
    }
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", pipeline::render(&summary));
    }
    if summary.processed_nothing() {
        eprintln!("error: no event could be processed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
