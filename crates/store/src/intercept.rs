//! A decorator around any [`VectorStore`]: a hook that sees (and may refuse) every upsert, and a count of the
//! points that were written. The pipeline counts with it; tests make a store fail on demand with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use crate::{CollectionInfo, CollectionSpec, ForeignPoints, Hit, Point, StoreError, VectorStore};

type UpsertHook = Box<dyn Fn(&[Point]) -> Result<(), StoreError> + Send + Sync>;

pub struct InterceptedStore {
    inner: Arc<dyn VectorStore>,
    before_upsert: UpsertHook,
    points_written: AtomicU64,
}

impl InterceptedStore {
    /// Counts written points; lets every upsert through.
    pub fn counting(inner: Arc<dyn VectorStore>) -> Self {
        Self::with_hook(inner, |_| Ok(()))
    }

    /// Calls `before_upsert` first; an error it returns is the upsert's error and nothing is written.
    pub fn with_hook(
        inner: Arc<dyn VectorStore>,
        before_upsert: impl Fn(&[Point]) -> Result<(), StoreError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner,
            before_upsert: Box::new(before_upsert),
            points_written: AtomicU64::new(0),
        }
    }

    /// Points the inner store accepted through this decorator.
    pub fn points_written(&self) -> u64 {
        self.points_written.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl VectorStore for InterceptedStore {
    fn collection(&self) -> &CollectionSpec {
        self.inner.collection()
    }

    async fn upsert(&self, points: Vec<Point>) -> Result<(), StoreError> {
        (self.before_upsert)(&points)?;
        let n = points.len() as u64;
        self.inner.upsert(points).await?;
        self.points_written.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }

    async fn search(
        &self,
        vector: Vec<f32>,
        user_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Hit>, StoreError> {
        self.inner.search(vector, user_id, limit).await
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
