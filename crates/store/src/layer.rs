//! A layer around any [`VectorStore`], in the manner of tower's `Layer`: a [`StoreLayer`] says what it adds around
//! the writes (hand-over, flush), and [`Layered`] forwards everything else to the store inside, once for every layer.
//! Every write goes through [`StoreLayer::hand_over`]: `upsert` is a hand-over awaited until durable.
//! Counting, failing on demand, observing a dependency and fencing a paused process are each a layer, not a
//! hand-written forwarder of the whole trait.

use std::sync::Arc;

use async_trait::async_trait;

use crate::{
    CollectionInfo, CollectionSpec, Durable, ForeignPoints, Hit, Point, Query, StoreError,
    VectorStore,
};

/// What a layer does around the writes of the store inside. Each hook's default passes the call through.
#[async_trait]
pub trait StoreLayer: Send + Sync + 'static {
    /// A write of `points`: call `inner.hand_over(points)` (or refuse, and nothing is written). What the layer
    /// wants to know of the outcome is in the returned [`Durable`].
    async fn hand_over(
        &self,
        inner: &dyn VectorStore,
        points: Vec<Point>,
    ) -> Result<Durable, StoreError> {
        inner.hand_over(points).await
    }

    /// A flush: call `inner.flush()`.
    async fn flush(&self, inner: &dyn VectorStore) -> Result<(), StoreError> {
        inner.flush().await
    }
}

/// `inner` with `layer` around its writes; reads go straight to `inner`.
pub struct Layered<L> {
    inner: Arc<dyn VectorStore>,
    layer: L,
}

impl<L: StoreLayer> Layered<L> {
    pub fn new(inner: Arc<dyn VectorStore>, layer: L) -> Self {
        Self { inner, layer }
    }

    /// The layer (its counters and switches).
    pub fn layer(&self) -> &L {
        &self.layer
    }
}

#[async_trait]
impl<L: StoreLayer> VectorStore for Layered<L> {
    fn collection(&self) -> &CollectionSpec {
        self.inner.collection()
    }

    async fn hand_over(&self, points: Vec<Point>) -> Result<Durable, StoreError> {
        self.layer.hand_over(self.inner.as_ref(), points).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.layer.flush(self.inner.as_ref()).await
    }

    async fn write(&self, points: Vec<Point>) -> Result<(), StoreError> {
        self.hand_over(points).await?.await
    }

    async fn search(&self, query: Query<'_>) -> Result<Vec<Hit>, StoreError> {
        self.inner.search(query).await
    }

    async fn count(&self, user_id: Option<&str>) -> Result<u64, StoreError> {
        self.inner.count(user_id).await
    }

    async fn info(&self) -> Result<CollectionInfo, StoreError> {
        self.inner.info().await
    }

    async fn foreign_points(&self, models: &[String]) -> Result<Option<ForeignPoints>, StoreError> {
        self.inner.foreign_points(models).await
    }
}
