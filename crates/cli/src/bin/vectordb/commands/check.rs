//! `vectordb check`: the configuration as the processes read it, and every dependency it names, reached.

use std::process::ExitCode;

use aura_runtime::Settings;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args, settings: Settings) -> anyhow::Result<ExitCode> {
    let report = aura_cli::check::check(&settings).await?;
    super::print_report(&report, args.json, aura_cli::check::render, report.ok())
}
