//! `vectordb stats`: the collection, its point count and vector size.

use std::process::ExitCode;

use aura_cli::{ModelCheck, wired};
use aura_runtime::Settings;
use aura_runtime::store::Durability;
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args, settings: Settings) -> anyhow::Result<ExitCode> {
    // Stats look at any collection, whichever model wrote it.
    let ctx = wired(&settings, Durability::EveryWrite, ModelCheck::Skip)
        .await?
        .context;
    let info = ctx.store.info().await?;
    let location = match &settings.qdrant.url {
        Some(url) => url.redacted(),
        None => settings.qdrant.path.display().to_string(),
    };
    if args.json {
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
