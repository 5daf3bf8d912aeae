//! `vectordb`: the admin CLI (DESIGN §10).

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use aura_cli::pipeline::{self, PipelineOptions};
use aura_cli::{configured_registry, handler_context, init_logging};
use aura_runtime::Settings;
use aura_runtime::store::Durability;
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "vectordb",
    version,
    about = "AURA360 vectordb admin: run the pipeline in-process, search and inspect the store."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole chain in-process on JSONL events (one event per line) into the configured store.
    Pipeline {
        /// JSONL file of events, or `-` for standard input.
        #[arg(long, value_name = "FILE|-")]
        events: PathBuf,
        /// Events in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Semantic search in one user's points.
    Search {
        #[arg(long)]
        user: String,
        #[arg(long)]
        text: String,
        #[arg(long, default_value_t = 5)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Collection, point count and vector size.
    Stats {
        #[arg(long)]
        json: bool,
    },
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
    init_logging(settings.log_format, "warn");
    match run(cli.command, settings).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Pipeline {
            events,
            concurrency,
            json,
        } => {
            let registry = configured_registry(&settings)?;
            // A bulk load acknowledges nothing: flush per batch of lines instead of per write (re-runs are idempotent).
            let ctx = handler_context(&settings, Durability::OnFlush).await?;
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
        Command::Search {
            user,
            text,
            limit,
            json,
        } => {
            let ctx = handler_context(&settings, Durability::EveryWrite).await?;
            let embeddings = ctx
                .embedder
                .embed(std::slice::from_ref(&text))
                .await
                .context("embedding the query")?;
            let vector = embeddings
                .vectors
                .into_iter()
                .next()
                .context("the embedder returned no vector")?;
            let hits = ctx.store.search(vector, Some(&user), limit).await?;
            if json {
                let hits: Vec<_> = hits
                    .iter()
                    .map(|h| json!({"id": h.id, "score": h.score, "payload": h.payload}))
                    .collect();
                println!("{}", serde_json::to_string(&hits)?);
            } else if hits.is_empty() {
                println!("no points for user {user}");
            } else {
                for hit in hits {
                    let text = hit
                        .payload
                        .get("text")
                        .and_then(|t| t.as_str())
                        .unwrap_or("");
                    let created = hit
                        .payload
                        .get("created_at")
                        .map(|c| c.to_string())
                        .unwrap_or_default();
                    let owner = hit
                        .payload
                        .get("user_id")
                        .and_then(|u| u.as_str())
                        .unwrap_or("?");
                    println!(
                        "{:.4}  user={owner}  created_at={created}  {text}",
                        hit.score
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats { json } => {
            let ctx = handler_context(&settings, Durability::EveryWrite).await?;
            let info = ctx.store.info().await?;
            let location = match &settings.qdrant.url {
                Some(url) => url.clone(),
                None => settings.qdrant.path.display().to_string(),
            };
            if json {
                let stats = json!({
                    "collection": info.name, "points": info.points, "vector_size": info.dimension,
                    "distance": format!("{:?}", info.distance).to_lowercase(), "engine": info.engine, "location": location,
                });
                println!("{stats}");
            } else {
                println!("collection:  {}", info.name);
                println!("points:      {}", info.points);
                println!("vector size: {}", info.dimension);
                println!("distance:    {:?}", info.distance);
                println!("engine:      {} ({location})", info.engine);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
