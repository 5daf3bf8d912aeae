//! What the binaries share: the standard handler set, start-up wiring and logging, and the commands' logic.
//!
//! The binaries themselves (`src/bin/`) only parse arguments and print; everything they do is a function here so
//! tests and benchmarks call the same code.

pub mod check;
pub mod clients;
pub mod consumer;
pub mod lag;
pub mod mode;
pub mod ops;
pub mod pipeline;
pub mod progress;
pub mod publish;
pub mod replay;
pub mod search;
pub mod signal;
pub mod worker;

/// Every binary (and the benchmarks and tests that link this crate) allocates with mimalloc: the Kafka consumer's
/// poller allocates each message's copy on one thread and its runner frees it on another, and glibc's malloc spends
/// that hand-over in arena locks (measured with `perf` on the mock-cluster benchmark: ~20% of the time in futex waits
/// of malloc's arena lock).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Has the allocator give freed pages back to the system at once instead of after its default delay (1 s in
/// mimalloc v3), unless `MIMALLOC_PURGE_DELAY` says otherwise. Memory freed between bursts — the model's load, a
/// batch's activations, a drained window — stops counting in RSS: `vectordb pipeline` with the local model peaked at
/// 212 MB with the default delay and 185 MB without (2,000 events, bf16), at no measurable cost in events/s
/// (BENCHMARKS.md).
pub fn release_freed_memory_promptly() {
    // mimalloc's own C API (linked in with the allocator; `mi_option_purge_delay` is 15 in its v2 and v3 headers).
    unsafe extern "C" {
        fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
        fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    }
    const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
    // Its defaults (1,000 ms in mimalloc v3, which this build uses; 10 ms in v2): anything else means the user set
    // it, or option 15 is not the purge delay.
    const DEFAULT_PURGE_DELAY_MS: [std::ffi::c_long; 2] = [1_000, 10];
    // SAFETY: reads and sets a global option, which mimalloc allows at any time (it reads it on each purge decision).
    unsafe {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none()
            && DEFAULT_PURGE_DELAY_MS.contains(&mi_option_get(MI_OPTION_PURGE_DELAY))
        {
            mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        }
    }
}

use anyhow::Context as _;
use aura_runtime::settings::LogFormat;
use aura_runtime::store::Durability;
use std::sync::Arc;

use aura_runtime::embed::{CachedEmbedder, Embedder};
use aura_runtime::store::ForeignPoints;
use aura_runtime::{
    HandlerContext, Registry, Settings, accepted_models, build_embedder, build_store,
};
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
    Ok(wired(settings, durability, ModelCheck::Refuse)
        .await?
        .context)
}

/// What start-up does about points another embedding model wrote into the collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelCheck {
    /// Refuse to start: vectors of two models are not comparable, even of the same size.
    Refuse,
    /// Look only (`vectordb stats`).
    Skip,
}

/// The handler context and the cached embedder inside it (for its hit/miss counts).
pub struct Wired {
    pub context: HandlerContext,
    pub embedder: Arc<CachedEmbedder<dyn Embedder>>,
}

/// [`handler_context`], keeping the embedder's concrete handle.
pub async fn wired(
    settings: &Settings,
    durability: Durability,
    check: ModelCheck,
) -> anyhow::Result<Wired> {
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
    if check == ModelCheck::Refuse {
        match accepted_models(settings, embedder.as_ref()).await {
            Some(models) => {
                if let Some(foreign) = store
                    .foreign_points(&models)
                    .await
                    .context("checking which embedding model wrote the collection")?
                {
                    anyhow::bail!(foreign_model_message(settings, &models[0], &foreign));
                }
            }
            None => tracing::warn!(
                collection = %settings.qdrant.collection,
                "the embedding endpoint did not answer a probe: which model wrote the collection is not checked"
            ),
        }
    }
    Ok(Wired {
        context: HandlerContext {
            store,
            embedder: embedder.clone(),
            embedding_version: settings.embedding.version.clone(),
            limits: settings.limits,
        },
        embedder,
    })
}

fn foreign_model_message(settings: &Settings, model: &str, foreign: &ForeignPoints) -> String {
    let written_by = match (&foreign.model, &foreign.version) {
        (Some(m), Some(v)) => format!("`{m}` (version {v})"),
        (Some(m), None) => format!("`{m}`"),
        (None, _) => "a writer that did not record `embedding_model`".to_owned(),
    };
    format!(
        "collection `{collection}` holds {points} point(s) embedded by {written_by}, but EMBEDDING_PROVIDER={provider} \
         embeds with `{model}`: vectors of different models live in different spaces even at the same size, so \
         searches would mix them. Point QDRANT_COLLECTION at a collection for `{model}` (a new one is created) and \
         re-embed into it (docs/embeddings.md, \"Changing the embedding model\"), or set EMBEDDING_PROVIDER back to the model \
         that wrote it.",
        collection = settings.qdrant.collection,
        points = foreign.points,
        provider = settings.embedding.provider.name(),
    )
}

/// Logs to stderr, `LOG_FORMAT=json` for JSON lines; `RUST_LOG` overrides `default_level`.
pub fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default_level},qdrant_edge=error"))
    });
    // Colours only on a terminal: a log file or `docker logs` gets plain lines that grep as they read.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// What a process says at start about choices the configuration made for it: a per-process backend override, and
/// SASL_SSL inferred from Confluent credentials.
pub fn announce_configuration(settings: &Settings) {
    if settings.backend_variable != "MESSAGING_BACKEND" {
        tracing::info!(
            variable = settings.backend_variable,
            messaging_backend = settings.messaging_backend.as_str(),
            "this process's own backend variable overrides MESSAGING_BACKEND"
        );
    }
    if settings.kafka_security_inferred {
        tracing::info!(
            security_protocol = %settings.kafka.security_protocol,
            sasl_mechanism = %settings.kafka.sasl_mechanism,
            "KAFKA_API_KEY and KAFKA_API_SECRET are set and KAFKA_SECURITY_PROTOCOL is not: using SASL_SSL (Confluent Cloud)"
        );
    }
}

pub use aura_runtime;
