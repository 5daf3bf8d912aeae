//! Builds the configured store and embedder from [`Settings`].

use std::sync::Arc;

use aura_embed::{EmbedError, Embedder, HashEmbedder, OpenAiConfig, OpenAiEmbedder};
use aura_store::{
    CollectionSpec, Durability, EdgeStore, QdrantServerStore, StoreError, VectorStore,
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
            settings.qdrant.min_free_bytes,
        )?),
    })
}

pub fn build_embedder(settings: &Settings) -> Result<Arc<dyn Embedder>, EmbedError> {
    let embedding = &settings.embedding;
    Ok(match embedding.provider {
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
    })
}
