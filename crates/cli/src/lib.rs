//! What the binaries share: the standard handler set, start-up wiring and logging, and the commands' logic.
//!
//! The binaries themselves (`src/bin/`) only parse arguments and print; everything they do is a function here so
//! tests and benchmarks call the same code.

pub mod check;
pub mod consumer;
pub mod ops;
pub mod pipeline;
pub mod progress;
pub mod publish;
pub mod replay;
pub mod worker;

/// Every binary (and the benchmarks and tests that link this crate) allocates with mimalloc: the Kafka consumer's
/// poller allocates each message's copy on one thread and its runner frees it on another, and glibc's malloc spends
/// that hand-over in arena locks (measured with `perf` on the mock-cluster benchmark: ~20% of the time in futex waits
/// of malloc's arena lock).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context as _;
use aura_runtime::settings::LogFormat;
use aura_runtime::store::Durability;
use aura_runtime::{HandlerContext, Registry, Settings, build_embedder, build_store};
use handler_context_aggregated::ContextAggregated;
use handler_ingest_vectors::IngestVectors;
use handler_mood_created::MoodCreated;

/// Every handler of the vectordb pipeline.
pub fn standard_registry() -> Registry {
    Registry::new()
        .with(MoodCreated)
        .with(ContextAggregated)
        .with(IngestVectors)
}

/// The standard registry with `DISABLED_HANDLERS` applied (an unknown name is a start-up error).
pub fn configured_registry(settings: &Settings) -> anyhow::Result<Registry> {
    let mut registry = standard_registry();
    registry
        .disable(&settings.disabled_handlers)
        .context("DISABLED_HANDLERS")?;
    Ok(registry)
}

/// The store and embedder the settings name, opened and checked. Services pass [`Durability::EveryWrite`]
/// (they acknowledge inputs right after a write); bulk commands may pass [`Durability::OnFlush`].
pub async fn handler_context(
    settings: &Settings,
    durability: Durability,
) -> anyhow::Result<HandlerContext> {
    let store =
        build_store(settings, durability)
            .await
            .with_context(|| match &settings.qdrant.url {
                Some(url) => format!(
                    "opening collection `{}` on Qdrant at {url}",
                    settings.qdrant.collection
                ),
                None => format!(
                    "opening embedded collection `{}` under {}",
                    settings.qdrant.collection,
                    settings.qdrant.path.display()
                ),
            })?;
    let embedder = build_embedder(settings).context("setting up the embedder")?;
    Ok(HandlerContext {
        store,
        embedder,
        embedding_version: settings.embedding.version.clone(),
        limits: settings.limits,
    })
}

/// Logs to stderr, `LOG_FORMAT=json` for JSON lines; `RUST_LOG` overrides `default_level`.
pub fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default_level},qdrant_edge=error"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

pub use aura_runtime;
