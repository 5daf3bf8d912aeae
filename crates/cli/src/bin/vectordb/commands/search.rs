//! `vectordb search`: semantic search in one user's points.

use std::process::ExitCode;

use anyhow::Context as _;
use aura_cli::handler_context;
use aura_runtime::Settings;
use aura_runtime::store::{Durability, Query};
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    user: String,
    #[arg(long)]
    text: String,
    #[arg(long, default_value_t = 5)]
    limit: usize,
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args, settings: Settings) -> anyhow::Result<ExitCode> {
    let Args {
        user,
        text,
        limit,
        json,
    } = args;
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
    let hits = ctx
        .store
        .search(Query::nearest(vector, limit).of_user(&user))
        .await?;
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
