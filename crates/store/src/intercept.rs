//! A layer that sees (and may refuse) every upsert and counts the points written. The pipeline counts with it;
//! tests make a store fail on demand with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use crate::{Durable, Layered, Point, StoreError, StoreLayer, VectorStore};

type UpsertHook = Box<dyn Fn(&[Point]) -> Result<(), StoreError> + Send + Sync>;

/// A store with an [`Intercept`] around its upserts.
pub type InterceptedStore = Layered<Intercept>;

pub struct Intercept {
    before_upsert: UpsertHook,
    points_written: AtomicU64,
}

impl Layered<Intercept> {
    /// Counts written points; lets every upsert through.
    pub fn counting(inner: Arc<dyn VectorStore>) -> Self {
        Self::with_hook(inner, |_| Ok(()))
    }

    /// Calls `before_upsert` first; an error it returns is the upsert's error and nothing is written.
    pub fn with_hook(
        inner: Arc<dyn VectorStore>,
        before_upsert: impl Fn(&[Point]) -> Result<(), StoreError> + Send + Sync + 'static,
    ) -> Self {
        Layered::new(
            inner,
            Intercept {
                before_upsert: Box::new(before_upsert),
                points_written: AtomicU64::new(0),
            },
        )
    }

    /// Points the inner store took through this layer.
    pub fn points_written(&self) -> u64 {
        self.layer().points_written.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl StoreLayer for Intercept {
    async fn hand_over(
        &self,
        inner: &dyn VectorStore,
        points: Vec<Point>,
    ) -> Result<Durable, StoreError> {
        (self.before_upsert)(&points)?;
        let n = points.len() as u64;
        let durable = inner.hand_over(points).await?;
        self.points_written.fetch_add(n, Ordering::Relaxed);
        Ok(durable)
    }
}
