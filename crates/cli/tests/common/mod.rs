//! Helpers shared by the process-level tests.

pub mod stack;

use std::path::Path;

/// The point ids in the embedded stores under `roots` (each a process's `QDRANT_PATH`, its process stopped):
/// (their union, the sum of each store's count). A root without the collection counts as empty.
#[allow(dead_code)] // not every test binary runs several processes
pub fn points_in_stores(
    roots: &[&Path],
    dimension: usize,
) -> (std::collections::HashSet<String>, usize) {
    use aura_runtime::store::{CollectionSpec, Distance, EdgeStore, VectorStore};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _inside = runtime.enter();
    let mut union = std::collections::HashSet::new();
    let mut total = 0;
    for root in roots {
        if !root.join("user_context").exists() {
            continue;
        }
        let spec = CollectionSpec {
            name: "user_context".into(),
            dimension,
            distance: Distance::Cosine,
        };
        let store = EdgeStore::open(root, spec).unwrap();
        let count = runtime.block_on(store.count(None)).unwrap() as usize;
        let probe = vec![1.0 / (dimension as f32).sqrt(); dimension];
        let hits = runtime
            .block_on(store.search(aura_runtime::store::Query::nearest(probe, count + 10)))
            .unwrap();
        assert_eq!(
            hits.len(),
            count,
            "{}: a search for every point",
            root.display()
        );
        total += count;
        union.extend(hits.into_iter().map(|h| h.id));
    }
    (union, total)
}
