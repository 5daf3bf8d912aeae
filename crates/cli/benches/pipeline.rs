//! Throughput of `vectordb pipeline` (mood events end to end into the embedded store, `hash` embedder, 384-d) in
//! its bulk mode and in the flush-every-write mode consumers use, and the same run against a store that discards
//! points, to split handler/bus time from store time.
//!
//! `cargo bench -p aura-cli --bench pipeline` — figures and analysis in BENCHMARKS.md.

use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aura_cli::pipeline::{self, PipelineOptions};
use aura_cli::standard_registry;
use aura_runtime::HandlerContext;
use aura_runtime::embed::{Embedder, HashEmbedder};
use aura_runtime::store::{
    CollectionInfo, CollectionSpec, Distance, Durability, EdgeStore, ForeignPoints, Hit, Point,
    Query, StoreError, VectorStore,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const EVENTS: usize = 5_000;
const DIM: usize = 384;

/// Realistic mood events (both shapes, notes of a sentence or two), with unique ids.
fn events(n: usize) -> String {
    let notes = [
        "Slept well and had a productive morning at work",
        "Deadline pressure at work, could not focus after lunch",
        "Long walk in the park with my dog, felt much better",
        "Anxious about the exam next week",
    ];
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                format!(
                    r#"{{"event_id":"{}","event_type":"user.mood.created","timestamp":"2025-03-01T10:00:00","trace_id":"t{i}","user_id":"user-{:03}","metadata":{{"source":"bench"}},"data":{{"mood_score":{},"tags":["calm","focused"],"notes":"{}","created_at":"2025-03-01T10:00:00"}}}}"#,
                    uuid(i), i % 12, i % 10, notes[i % 4]
                )
            } else {
                format!(
                    r#"{{"event_id":"{}","event_type":"user.mood.created","timestamp":"2025-03-01T10:00:00+00:00","trace_id":"t{i}","user_id":"user-{:03}","metadata":{{"source":"django"}},"data":{{"mood_id":{i},"level":{},"recorded_at":"2025-03-01T10:00:00+00:00","note":"{}","tags":["tired"]}}}}"#,
                    uuid(i), i % 12, i % 10, notes[i % 4]
                )
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn uuid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

/// Accepts and drops points: isolates everything but the store.
struct DiscardStore(CollectionSpec);

#[async_trait]
impl VectorStore for DiscardStore {
    fn collection(&self) -> &CollectionSpec {
        &self.0
    }
    async fn write(&self, _points: Vec<Point>) -> Result<(), StoreError> {
        Ok(())
    }
    async fn search(&self, _: Query<'_>) -> Result<Vec<Hit>, StoreError> {
        Ok(Vec::new())
    }
    async fn count(&self, _: Option<&str>) -> Result<u64, StoreError> {
        Ok(0)
    }
    async fn info(&self) -> Result<CollectionInfo, StoreError> {
        Err(StoreError::Invalid("bench store".into()))
    }
    async fn foreign_points(&self, _: &[String]) -> Result<Option<ForeignPoints>, StoreError> {
        Ok(None)
    }
}

fn spec() -> CollectionSpec {
    CollectionSpec {
        name: "user_context".into(),
        dimension: DIM,
        distance: Distance::Cosine,
    }
}

fn context(store: Arc<dyn VectorStore>) -> HandlerContext {
    HandlerContext {
        store,
        embedder: Arc::new(HashEmbedder::new(DIM)),
        embedding_version: "bench".into(),
        limits: Default::default(),
    }
}

fn run_once(
    runtime: &tokio::runtime::Runtime,
    input: &str,
    store: Arc<dyn VectorStore>,
) -> Duration {
    runtime.block_on(async {
        let started = Instant::now();
        let summary = pipeline::run(
            Cursor::new(input),
            standard_registry(),
            context(store),
            &PipelineOptions::default(),
            |_| {},
        )
        .await
        .unwrap_or_else(|e| panic!("pipeline failed: {e}"));
        assert_eq!(summary.events_in as usize, EVENTS);
        assert!(summary.dead_letters.is_empty());
        started.elapsed()
    })
}

/// One run into a fresh embedded collection; only the pipeline itself is timed.
fn run_into_edge(
    runtime: &tokio::runtime::Runtime,
    input: &str,
    durability: Durability,
) -> Duration {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = runtime
        .block_on(async { EdgeStore::open_with(dir.path(), spec(), durability) })
        .unwrap_or_else(|e| panic!("{e}"));
    run_once(runtime, input, Arc::new(store))
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let input = events(EVENTS);
    let mut group = c.benchmark_group("pipeline");
    group
        .throughput(Throughput::Elements(EVENTS as u64))
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));

    // As `vectordb pipeline` runs: flush once per batch of lines.
    group.bench_function("mood_events_into_embedded_qdrant_bulk", |b| {
        b.iter_custom(|iterations| {
            (0..iterations)
                .map(|_| run_into_edge(&runtime, &input, Durability::OnFlush))
                .sum()
        })
    });
    // As a consumer must run (it acknowledges right after the write): every upsert durable before it returns.
    group.bench_function(
        "mood_events_into_embedded_qdrant_durable_every_write",
        |b| {
            b.iter_custom(|iterations| {
                (0..iterations)
                    .map(|_| run_into_edge(&runtime, &input, Durability::EveryWrite))
                    .sum()
            })
        },
    );
    group.bench_function("mood_events_store_discarded", |b| {
        b.iter_custom(|iterations| {
            (0..iterations)
                .map(|_| run_once(&runtime, &input, Arc::new(DiscardStore(spec()))))
                .sum()
        })
    });
    group.finish();

    let embedder = HashEmbedder::new(DIM);
    let text = "User: user-003 | Mood Score: 7/10 | Mood Tags: calm, focused | Notes: Deadline pressure at work, could not focus after lunch".to_owned();
    let mut group = c.benchmark_group("embed");
    group.throughput(Throughput::Elements(1));
    group.bench_function("hash_384_one_snapshot", |b| {
        b.iter(|| embedder.embed_one(&text))
    });
    group.bench_function("hash_384_via_trait", |b| {
        b.iter(|| runtime.block_on(embedder.embed(std::slice::from_ref(&text))))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
