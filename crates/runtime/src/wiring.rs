//! Builds the configured store and embedder from [`Settings`].

use std::sync::Arc;

use aura_embed::{
    CachedEmbedder, EmbedError, Embedder, HashEmbedder, LocalConfig, LocalEmbedder, OpenAiConfig,
    OpenAiEmbedder, Precision, RedisTier,
};
use aura_store::{
    CollectionSpec, Durability, EdgeLimits, EdgeStore, QdrantServerStore, StoreError, VectorStore,
};

use crate::Settings;
use crate::settings::{EmbeddingProvider, Secret};

/// The Qdrant server when `QDRANT_URL` is set, else embedded Qdrant under `QDRANT_PATH` with `durability`
/// (the server always confirms writes with `wait=true`).
pub async fn build_store(
    settings: &Settings,
    durability: Durability,
) -> Result<Arc<dyn VectorStore>, StoreError> {
    let spec = CollectionSpec {
        name: settings.qdrant.collection.clone(),
        dimension: settings.embedding.dimension,
        distance: settings.qdrant.distance,
    };
    Ok(match &settings.qdrant.url {
        Some(url) => {
            let key = settings.qdrant.api_key.as_ref().map(Secret::expose);
            Arc::new(QdrantServerStore::connect(url.expose(), &url.redacted(), key, spec).await?)
        }
        None => Arc::new(EdgeStore::open_guarded(
            &settings.qdrant.path,
            spec,
            durability,
            EdgeLimits {
                min_free_bytes: settings.qdrant.min_free_bytes,
                wal_max_bytes: settings.qdrant.wal_max_bytes,
            },
        )?),
    })
}

/// The configured embedder behind the `EMBEDDING_CACHE_SIZE` LRU. `local` verifies and loads the installed model
/// and starts its inference threads here (a missing model is an error naming `vectordb model install`).
pub fn build_embedder(
    settings: &Settings,
) -> Result<Arc<CachedEmbedder<dyn Embedder>>, EmbedError> {
    let embedding = &settings.embedding;
    let inner: Arc<dyn Embedder> = match embedding.provider {
        EmbeddingProvider::Local => Arc::new(LocalEmbedder::load(LocalConfig {
            model_root: embedding.model_root.clone(),
            threads: embedding.threads,
            batch_size: embedding.batch_size,
            precision: embedding.precision.unwrap_or_else(Precision::fastest),
        })?),
        EmbeddingProvider::Hash => Arc::new(HashEmbedder::new(embedding.dimension)),
        EmbeddingProvider::OpenAi => Arc::new(OpenAiEmbedder::new(OpenAiConfig {
            url: embedding
                .url
                .as_ref()
                .map(|u| u.expose().to_owned())
                .unwrap_or_default(),
            shown_url: embedding
                .url
                .as_ref()
                .map(|u| u.redacted())
                .unwrap_or_default(),
            api_key: embedding.api_key.as_ref().map(|k| k.expose().to_owned()),
            model: embedding.model.clone(),
            dimension: embedding.dimension,
            batch_size: embedding.batch_size,
            timeout: embedding.timeout,
        })?),
    };
    let mut cached = CachedEmbedder::new(inner, embedding.cache_size);
    if let Some(url) = &embedding.cache_redis_url {
        cached = cached.with_redis(RedisTier::new(
            url.expose(),
            url.redacted(),
            embedding.cache_ttl,
        )?);
    }
    Ok(Arc::new(cached))
}

/// The `embedding_model` values the configured embedder writes, for [`VectorStore::foreign_points`]: the model's
/// name and its aliases, and for `openai` also the name the endpoint reports (TEI and Ollama answer with their own
/// model id whatever was asked), learned from one probe call. `None` when that probe fails: the check cannot be made
/// now, and an embedding outage must not keep a consumer from starting.
pub async fn accepted_models(settings: &Settings, embedder: &dyn Embedder) -> Option<Vec<String>> {
    let embedding = &settings.embedding;
    let mut models = vec![embedding.model_name().to_owned()];
    match embedding.provider {
        EmbeddingProvider::Local => models.extend(
            aura_embed::local::model::MODEL_ALIASES
                .iter()
                .map(|m| (*m).to_owned()),
        ),
        EmbeddingProvider::Hash => {}
        EmbeddingProvider::OpenAi => {
            let reported = embedder
                .embed(&["aura360 model check".to_owned()])
                .await
                .ok()?
                .model;
            if !models.contains(&reported) {
                models.push(reported);
            }
        }
    }
    Some(models)
}
