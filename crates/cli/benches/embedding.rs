//! The local embedder (all-MiniLM-L6-v2) on this machine: texts/s on the example file's texts by threads and batch
//! size, as one batched call and as the pipeline calls it (many concurrent one-text calls), how many tokens the
//! chunker's 900-character chunks take, and `vectordb pipeline` events/s end to end with `local` (cold, then a re-run
//! served by the cache).
//!
//! `cargo bench -p aura-cli --bench embedding` (needs `vectordb model install`) — figures in BENCHMARKS.md.
//! `BENCH_ROUNDS` (3) repeats each measurement; the best round is reported. `EMBEDDING_PRECISION` (`f32` | `bf16`,
//! default what `auto` picks on this CPU) chooses the linear layers' arithmetic.

use std::sync::Arc;
use std::time::Instant;

use aura_cli::pipeline::{self, PipelineOptions};
use aura_cli::{ModelCheck, configured_registry, wired};
use aura_runtime::Settings;
use aura_runtime::embed::local::model;
use aura_runtime::embed::{Embedder, LocalConfig, LocalEmbedder, Precision};
use aura_runtime::events::Event;
use aura_runtime::store::Durability;

const EXAMPLES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/mood_events.jsonl"
);

fn model_root() -> std::path::PathBuf {
    std::env::var_os("EMBEDDING_MODEL_DIR")
        .map(Into::into)
        .unwrap_or_else(model::default_model_root)
}

/// What the pipeline embeds for each example event: its aggregated text representation.
fn example_texts() -> Vec<String> {
    std::fs::read_to_string(EXAMPLES)
        .expect("examples")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let event = Event::from_slice(line.as_bytes()).expect("example event");
            handler_mood_created::aggregate(&event)
                .expect("aggregate")
                .text_representation
        })
        .collect()
}

fn embedder(threads: usize, batch_size: usize) -> Arc<LocalEmbedder> {
    Arc::new(
        LocalEmbedder::load(LocalConfig {
            model_root: model_root(),
            threads,
            batch_size,
            precision: precision(),
        })
        .expect("the local model (vectordb model install)"),
    )
}

/// `EMBEDDING_PRECISION` (`f32`, `bf16`; anything else: what `auto` picks), as the pipeline run reads it too.
fn precision() -> Precision {
    match std::env::var("EMBEDDING_PRECISION").as_deref() {
        Ok("f32") => Precision::F32,
        Ok("bf16") => Precision::Bf16,
        _ => Precision::fastest(),
    }
}

fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// Best texts/s of embedding `texts` as one call.
async fn one_call(embedder: &LocalEmbedder, texts: &[String]) -> f64 {
    let mut best: f64 = 0.0;
    for _ in 0..rounds() {
        let started = Instant::now();
        let out = embedder.embed(texts).await.expect("embed");
        assert_eq!(out.vectors.len(), texts.len());
        best = best.max(texts.len() as f64 / started.elapsed().as_secs_f64());
    }
    best
}

/// Best texts/s of embedding `texts` as concurrent one-text calls (how handlers call it).
async fn concurrent_calls(embedder: &Arc<LocalEmbedder>, texts: &[String]) -> f64 {
    let mut best: f64 = 0.0;
    for _ in 0..rounds() {
        let started = Instant::now();
        let calls = texts.iter().map(|t| {
            let embedder = embedder.clone();
            let text = vec![t.clone()];
            tokio::spawn(async move { embedder.embed(&text).await.expect("embed") })
        });
        for call in futures::future::join_all(calls).await {
            call.expect("task");
        }
        best = best.max(texts.len() as f64 / started.elapsed().as_secs_f64());
    }
    best
}

/// `vectordb pipeline` on the example file with `local` into a fresh embedded store: events/s cold, then re-run.
async fn pipeline_events_per_s() -> (f64, f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = Settings::load().expect("settings");
    settings.qdrant.path = dir.path().join("qdrant");
    settings.embedding.provider = aura_runtime::settings::EmbeddingProvider::Local;
    let input = std::fs::read_to_string(EXAMPLES).expect("examples");
    let wired = wired(&settings, Durability::OnFlush, ModelCheck::Refuse)
        .await
        .expect("wiring");
    let mut rates = Vec::new();
    for _ in 0..2 {
        let summary = pipeline::run(
            std::io::Cursor::new(input.clone()),
            configured_registry(&settings).expect("registry"),
            wired.context.clone(),
            &PipelineOptions::default(),
            |_| {},
        )
        .await
        .expect("pipeline");
        assert_eq!(summary.dead_letter_count, 0);
        rates.push(summary.events_per_s);
    }
    let stats = wired.embedder.stats();
    (rates[0], rates[1], stats.hit_rate().unwrap_or(0.0))
}

/// Token counts of the chunker's 900-character chunks (150 overlap) of `long`: (chunks, most tokens, chunks cut).
fn chunk_tokens(embedder: &LocalEmbedder, long: &str) -> (usize, usize, usize) {
    let chunks = handler_context_aggregated::chunk(
        long,
        handler_context_aggregated::CHUNK_CHARS,
        handler_context_aggregated::CHUNK_OVERLAP,
    );
    let counts: Vec<usize> = chunks
        .iter()
        .map(|c| embedder.token_ids(c).expect("tokens").len())
        .collect();
    let over = counts.iter().filter(|&&n| n >= model::MAX_TOKENS).count();
    (chunks.len(), counts.into_iter().max().unwrap_or(0), over)
}

/// The examples' notes alone (prose, as a journal entry would be), one after the other.
fn example_prose() -> String {
    std::fs::read_to_string(EXAMPLES)
        .expect("examples")
        .lines()
        .filter_map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            let data = &value["data"];
            data["notes"]
                .as_str()
                .or(data["note"].as_str())
                .map(str::to_owned)
        })
        .collect::<Vec<_>>()
        .join(". ")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let texts = example_texts();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let probe = embedder(1, 64);
    let tokens: usize = texts
        .iter()
        .map(|t| probe.token_ids(t).expect("tokens").len())
        .sum();
    println!(
        "model {} ({} texts from examples/mood_events.jsonl, {:.1} tokens/text on average incl. [CLS]/[SEP]; \
         {cores} CPUs)",
        model::MODEL_NAME,
        texts.len(),
        tokens as f64 / texts.len() as f64
    );
    for (what, long) in [
        ("prose (the examples' notes)", example_prose()),
        (
            "text representations (`User: … | Mood Score: …`)",
            texts.join(" | "),
        ),
    ] {
        let (chunks, max, over) = chunk_tokens(&probe, &long);
        println!(
            "900-char chunks of {what}: {chunks} chunks, at most {max} tokens, {over} cut at the {}-token window",
            model::MAX_TOKENS
        );
    }
    drop(probe);
    println!("threads  batch  one call (texts/s)  concurrent 1-text calls (texts/s)");
    for threads in [1, 2] {
        for batch in [1, 16, 64] {
            let embedder = embedder(threads, batch);
            let one = one_call(&embedder, &texts).await;
            let concurrent = concurrent_calls(&embedder, &texts).await;
            println!("{threads:>7}  {batch:>5}  {one:>18.0}  {concurrent:>33.0}");
        }
    }
    let (cold, rerun, hit_rate) = pipeline_events_per_s().await;
    println!(
        "vectordb pipeline, local, {} threads, batch {}: {cold:.0} events/s cold, {rerun:.0} events/s re-run \
         (cache hit rate over both runs {:.0}%)",
        Settings::load().expect("settings").embedding.threads,
        Settings::load().expect("settings").embedding.batch_size,
        hit_rate * 100.0
    );
}
