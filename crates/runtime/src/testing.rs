//! Test doubles shared by handler and integration tests (feature `testing`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use aura_embed::HashEmbedder;
use aura_store::{
    CollectionInfo, CollectionSpec, Distance, EdgeStore, Hit, Point, StoreError, VectorStore,
};

use crate::HandlerContext;

pub const TEST_DIM: usize = 64;

/// A handler context on a real embedded store in a temporary directory.
///
/// Fields drop in order: the context and store (closing the shard, which flushes) before the directory goes.
pub struct Embedded {
    pub ctx: HandlerContext,
    pub store: Arc<EdgeStore>,
    _dir: tempfile::TempDir,
}

pub fn embedded() -> Embedded {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let spec = CollectionSpec {
        name: "user_context".into(),
        dimension: TEST_DIM,
        distance: Distance::Cosine,
    };
    let store =
        Arc::new(EdgeStore::open(dir.path(), spec).unwrap_or_else(|e| panic!("open store: {e}")));
    Embedded {
        ctx: context_with(store.clone()),
        store,
        _dir: dir,
    }
}

pub fn context_with(store: Arc<dyn VectorStore>) -> HandlerContext {
    HandlerContext {
        store,
        embedder: Arc::new(HashEmbedder::new(TEST_DIM)),
        embedding_version: "test-v1".into(),
    }
}

/// A store that is down for the first `failures` upserts, then delegates to `inner`.
pub struct FlakyStore {
    pub inner: Arc<dyn VectorStore>,
    remaining_failures: AtomicU32,
    pub attempts: AtomicU32,
}

impl FlakyStore {
    pub fn new(inner: Arc<dyn VectorStore>, failures: u32) -> Self {
        Self {
            inner,
            remaining_failures: AtomicU32::new(failures),
            attempts: AtomicU32::new(0),
        }
    }
}

#[async_trait]
impl VectorStore for FlakyStore {
    fn collection(&self) -> &CollectionSpec {
        self.inner.collection()
    }

    async fn upsert(&self, points: Vec<Point>) -> Result<(), StoreError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .remaining_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(StoreError::Unavailable("connection refused (test)".into()));
        }
        self.inner.upsert(points).await
    }

    async fn search(
        &self,
        vector: Vec<f32>,
        user_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Hit>, StoreError> {
        self.inner.search(vector, user_id, limit).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }

    async fn count(&self, user_id: Option<&str>) -> Result<u64, StoreError> {
        self.inner.count(user_id).await
    }

    async fn info(&self) -> Result<CollectionInfo, StoreError> {
        self.inner.info().await
    }
}
