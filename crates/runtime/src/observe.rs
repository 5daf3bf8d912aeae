//! Dependency health as the handlers meet it: the embedder and the store report each call's outcome to a
//! [`DependencyObserver`] (the process's `/health`), so an outage that handlers are retrying through shows up as a
//! degraded dependency instead of a silent stall.
//!
//! Only outcomes that say something about the dependency count: a success clears it, a transient error marks it
//! failing; a permanent error is about one input (a rejected text, a wrong vector) and changes nothing.

use std::sync::Arc;

use async_trait::async_trait;
use aura_embed::{EmbedError, Embedder, EmbedderLayer, Embeddings, LayeredEmbedder};
use aura_store::{Durable, Layered, Point, StoreError, StoreLayer, VectorStore};

/// Where dependency outcomes go (the process's health).
pub trait DependencyObserver: Send + Sync {
    /// `Ok` clears `dependency`; `Err` marks it failing with the reason (already free of secrets).
    fn report(&self, dependency: &'static str, outcome: Result<(), String>);
}

/// The dependency names reported: `embedder`, `vector_store`, `dead_letters` (mounts report their writes), and the
/// Celery worker's `result_backend` and `broker_acks`.
pub mod names {
    pub const EMBEDDER: &str = "embedder";
    pub const VECTOR_STORE: &str = "vector_store";
    pub const DEAD_LETTERS: &str = "dead_letters";
    /// The Celery result backend (`RESULT_BACKEND`): results that cannot be stored hold their tasks unacknowledged.
    pub const RESULT_BACKEND: &str = "result_backend";
    /// The Celery broker's acknowledgements (`BROKER_URL`).
    pub const BROKER_ACKS: &str = "broker_acks";
}

/// An embedder layer that reports the calls as the `embedder` dependency.
pub struct ObservedCalls(pub Arc<dyn DependencyObserver>);

/// An [`Embedder`] whose calls are reported as the `embedder` dependency.
pub type ObservedEmbedder = LayeredEmbedder<ObservedCalls>;

#[async_trait]
impl EmbedderLayer for ObservedCalls {
    async fn embed(
        &self,
        inner: &dyn Embedder,
        texts: &[String],
    ) -> Result<Embeddings, EmbedError> {
        let result = inner.embed(texts).await;
        match &result {
            Ok(_) => self.0.report(names::EMBEDDER, Ok(())),
            Err(error) if error.is_transient() => {
                self.0.report(names::EMBEDDER, Err(error.to_string()))
            }
            Err(_) => {}
        }
        result
    }
}

/// A store layer that reports the writes as the `vector_store` dependency.
pub struct Observed(pub Arc<dyn DependencyObserver>);

/// A store whose writes are reported as the `vector_store` dependency.
pub type ObservedStore = Layered<Observed>;

/// Reports a write's outcome as the `vector_store` dependency.
fn observe<T>(
    observer: &dyn DependencyObserver,
    result: Result<T, StoreError>,
) -> Result<T, StoreError> {
    match &result {
        Ok(_) => observer.report(names::VECTOR_STORE, Ok(())),
        Err(error) if error.is_transient() => {
            observer.report(names::VECTOR_STORE, Err(error.to_string()))
        }
        Err(_) => {}
    }
    result
}

#[async_trait]
impl StoreLayer for Observed {
    /// A write is reported when it is durable (or fails to be), not when the store took it.
    async fn hand_over(
        &self,
        inner: &dyn VectorStore,
        points: Vec<Point>,
    ) -> Result<Durable, StoreError> {
        let durable = match inner.hand_over(points).await {
            Ok(durable) => durable,
            // Refused before it was queued (the writer stopped, a vector of the wrong size): reported now.
            Err(refused) => return observe(self.0.as_ref(), Err(refused)),
        };
        let observer = self.0.clone();
        Ok(Box::pin(async move {
            observe(observer.as_ref(), durable.await)
        }))
    }

    async fn flush(&self, inner: &dyn VectorStore) -> Result<(), StoreError> {
        let result = inner.flush().await;
        observe(self.0.as_ref(), result)
    }
}
