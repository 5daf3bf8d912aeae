//! Test doubles shared by handler and integration tests (feature `testing`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use aura_embed::HashEmbedder;
use aura_store::{CollectionSpec, Distance, EdgeStore, InterceptedStore, StoreError, VectorStore};

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
        limits: aura_events::limits::Limits::default(),
    }
}

/// A store that is down for the first `failures` upserts, then writes to `inner`; `attempts` counts every upsert.
pub struct FlakyStore {
    pub store: Arc<InterceptedStore>,
    pub attempts: Arc<AtomicU32>,
}

impl FlakyStore {
    pub fn new(inner: Arc<dyn VectorStore>, failures: u32) -> Self {
        let attempts = Arc::new(AtomicU32::new(0));
        let remaining = AtomicU32::new(failures);
        let counter = attempts.clone();
        let store = InterceptedStore::with_hook(inner, move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            match remaining.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
                Ok(_) => Err(StoreError::Unavailable("connection refused (test)".into())),
                Err(_) => Ok(()),
            }
        });
        Self {
            store: Arc::new(store),
            attempts,
        }
    }
}
