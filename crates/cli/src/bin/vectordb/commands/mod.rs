//! The commands of `vectordb`, one module each (as cargo's `commands/`): `Args` (its flags) and `run`.

use std::process::ExitCode;

use aura_runtime::Settings;
use clap::Subcommand;

pub mod check;
pub mod export;
pub mod lag;
pub mod model;
pub mod pipeline;
pub mod publish;
mod range;
pub mod replay;
pub mod search;
pub mod stats;
pub mod topics;

#[derive(Subcommand)]
pub enum Command {
    /// Run the whole chain in-process on JSONL events (one event per line) into the configured store.
    Pipeline(pipeline::Args),
    /// Semantic search in one user's points.
    Search(search::Args),
    /// Collection, point count and vector size.
    Stats(stats::Args),
    /// Kafka topic administration.
    Topics(topics::Args),
    /// Send events through the configured backend (MESSAGING_BACKEND): many from a JSONL file, or one from flags.
    Publish(publish::Args),
    /// Backlog: the Kafka group's committed offset, end offset and lag per topic/partition, and Celery queue depths
    /// (waiting, dead letters, parked).
    Lag(lag::Args),
    /// Copy a topic (or a partition/offset range of it) to JSONL, one record per line with its Kafka coordinates,
    /// key, headers and value bytes.
    Export(export::Args),
    /// Replay records into the handlers, Kafka or Celery: a topic range, an export file, or dead letters
    /// (`--topic <topic>.dlq --to kafka` sends them back to their source topic; `--celery-dlq QUEUE` moves
    /// `<queue>.dlq` back onto its queue). Safe to re-run: point ids derive from event ids, duplicates overwrite.
    Replay(replay::Args),
    /// Validate the configuration and reach every dependency it names (Kafka, Redis, Qdrant, the embedder);
    /// print what the processes would do, and a fix for each failure. Exit 1 if anything failed.
    Check(check::Args),
    /// The local embedding model (EMBEDDING_PROVIDER=local).
    Model(model::Args),
}

pub async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Pipeline(args) => pipeline::run(args, settings).await,
        Command::Search(args) => search::run(args, settings).await,
        Command::Stats(args) => stats::run(args, settings).await,
        Command::Topics(args) => topics::run(args, settings).await,
        Command::Publish(args) => publish::run(args, settings).await,
        Command::Lag(args) => lag::run(args, settings).await,
        Command::Export(args) => export::run(args, settings).await,
        Command::Replay(args) => replay::run(args, settings).await,
        Command::Check(args) => check::run(args, settings).await,
        Command::Model(args) => model::run(args, settings).await,
    }
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

/// Prints `report` as one line of JSON or as `render` writes it, and exits 0 when it is `ok`, else 1.
fn print_report<R: serde::Serialize>(
    report: &R,
    json: bool,
    render: impl Fn(&R) -> String,
    ok: bool,
) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        print!("{}", render(report));
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
