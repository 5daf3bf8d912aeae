//! A layer around any [`Embedder`], as `aura_store::Layered` is around a store: an [`EmbedderLayer`] says what it adds
//! around `embed`, and [`LayeredEmbedder`] forwards the rest (model, dimension) to the embedder inside.

use std::sync::Arc;

use async_trait::async_trait;

use crate::{EmbedError, Embedder, Embeddings};

/// What a layer does around the embedder inside.
#[async_trait]
pub trait EmbedderLayer: Send + Sync + 'static {
    /// An embedding of `texts`: call `inner.embed(texts)` (or fail, and the embedder inside is not called).
    async fn embed(&self, inner: &dyn Embedder, texts: &[String])
    -> Result<Embeddings, EmbedError>;
}

/// `inner` with `layer` around its calls.
pub struct LayeredEmbedder<L> {
    inner: Arc<dyn Embedder>,
    layer: L,
}

impl<L: EmbedderLayer> LayeredEmbedder<L> {
    pub fn new(inner: Arc<dyn Embedder>, layer: L) -> Self {
        Self { inner, layer }
    }

    /// The layer (its counters and switches).
    pub fn layer(&self) -> &L {
        &self.layer
    }
}

#[async_trait]
impl<L: EmbedderLayer> Embedder for LayeredEmbedder<L> {
    fn model(&self) -> &str {
        self.inner.model()
    }

    fn dimension(&self) -> usize {
        self.inner.dimension()
    }

    async fn embed(&self, texts: &[String]) -> Result<Embeddings, EmbedError> {
        self.layer.embed(self.inner.as_ref(), texts).await
    }
}
