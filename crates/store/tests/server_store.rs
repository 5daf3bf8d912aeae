//! The Qdrant server store against a real server. No Qdrant server can be installed on our CI machines, so this
//! runs only on demand: `QDRANT_URL=http://127.0.0.1:6334 cargo test -p aura-store -- --ignored`.

use aura_store::{
    CollectionSpec, Distance, Point, QdrantServerStore, Query, StoreError, VectorStore,
};
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
#[ignore = "needs a Qdrant server (none on CI machines): set QDRANT_URL and pass --ignored"]
async fn server_store_creates_upserts_searches_counts_and_refuses_a_size_mismatch() {
    let url = std::env::var("QDRANT_URL").expect("QDRANT_URL must point at a Qdrant gRPC endpoint");
    let key = std::env::var("QDRANT_API_KEY").ok();
    let name = format!("aura_test_{}", Uuid::new_v4().simple());
    let spec = CollectionSpec {
        name: name.clone(),
        dimension: 4,
        distance: Distance::Cosine,
    };
    let store = QdrantServerStore::connect(&url, &url, key.as_deref(), spec.clone())
        .await
        .unwrap();

    let points: Vec<Point> = (0..4u8)
        .map(|n| Point {
            id: Uuid::new_v5(&Uuid::NAMESPACE_OID, &[n]),
            vector: vec![1.0, f32::from(n), 0.5, 0.1],
            payload: json!({"user_id": if n < 3 { "alice" } else { "bob" }})
                .as_object()
                .cloned()
                .unwrap(),
        })
        .collect();
    store.upsert(points.clone()).await.unwrap();
    store.upsert(points).await.unwrap();
    assert_eq!(store.count(None).await.unwrap(), 4);
    assert_eq!(store.count(Some("alice")).await.unwrap(), 3);
    let hits = store
        .search(Query::nearest(vec![1.0, 1.0, 0.5, 0.1], 10).of_user("bob"))
        .await
        .unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].payload["user_id"], "bob");

    let wrong = CollectionSpec {
        dimension: 8,
        ..spec
    };
    let err = QdrantServerStore::connect(&url, &url, key.as_deref(), wrong)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::DimensionMismatch {
                existing: 4,
                configured: 8,
                ..
            }
        ),
        "{err}"
    );
}
