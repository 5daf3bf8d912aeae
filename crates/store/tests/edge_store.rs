//! The embedded store, for real, on a temporary directory.

use aura_store::{
    CollectionSpec, Distance, Durability, EdgeStore, Point, Query, StoreError, VectorStore,
};
use serde_json::{Map, Value, json};
use uuid::Uuid;

const DIM: usize = 8;

fn spec(dimension: usize) -> CollectionSpec {
    CollectionSpec {
        name: "user_context".into(),
        dimension,
        distance: Distance::Cosine,
    }
}

fn point(n: u8, user: &str) -> Point {
    let mut vector = vec![0.1f32; DIM];
    vector[usize::from(n) % DIM] = 1.0;
    let payload: Map<String, Value> = json!({"user_id": user, "text": format!("point {n}")})
        .as_object()
        .cloned()
        .unwrap();
    Point {
        id: Uuid::new_v5(&Uuid::NAMESPACE_OID, &[n]),
        vector,
        payload,
    }
}

#[tokio::test]
async fn upserted_points_are_counted_searched_per_user_and_overwritten_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let store = EdgeStore::open(dir.path(), spec(DIM)).unwrap();
    store
        .upsert(
            (0..6)
                .map(|n| point(n, if n % 2 == 0 { "alice" } else { "bob" }))
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(store.count(None).await.unwrap(), 6);
    assert_eq!(store.count(Some("alice")).await.unwrap(), 3);

    let hits = store
        .search(Query::nearest(point(2, "x").vector, 10).of_user("alice"))
        .await
        .unwrap();
    assert_eq!(hits.len(), 3);
    assert!(hits.iter().all(|h| h.payload["user_id"] == "alice"));
    assert_eq!(hits[0].payload["text"], "point 2");
    assert!(hits[0].score > hits[1].score);

    // Same ids again: overwritten, not duplicated.
    store
        .upsert((0..6).map(|n| point(n, "alice")).collect())
        .await
        .unwrap();
    assert_eq!(store.count(None).await.unwrap(), 6);
    assert_eq!(store.count(Some("alice")).await.unwrap(), 6);
}

#[tokio::test]
async fn a_reopened_directory_still_has_the_points() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = EdgeStore::open(dir.path(), spec(DIM)).unwrap();
        store
            .upsert((0..5).map(|n| point(n, "alice")).collect())
            .await
            .unwrap();
    }
    let store = EdgeStore::open(dir.path(), spec(DIM)).unwrap();
    assert_eq!(store.count(Some("alice")).await.unwrap(), 5);
    assert_eq!(store.info().await.unwrap().points, 5);
}

const CRASH_CHILD: &str = "AURA_STORE_CRASH_CHILD_DIR";

/// Re-runs test `name` in a child process that writes into a new directory and then aborts (no destructor, no final
/// flush); the store there, reopened (and the directory, kept while it is used).
fn reopened_after_a_crash_of(name: &str) -> (tempfile::TempDir, EdgeStore) {
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture"])
        .env(CRASH_CHILD, dir.path())
        .status()
        .unwrap();
    assert!(!status.success(), "the child must have crashed");
    let reopened = EdgeStore::open(dir.path(), spec(DIM)).unwrap();
    (dir, reopened)
}

/// Upserts points `ids` of `user`.
async fn upsert(store: &EdgeStore, ids: std::ops::Range<u8>, user: &str) {
    store
        .upsert(ids.map(|n| point(n, user)).collect())
        .await
        .unwrap();
}

#[tokio::test]
async fn acknowledged_upserts_survive_a_process_crash() {
    if let Ok(dir) = std::env::var(CRASH_CHILD) {
        let store = EdgeStore::open(std::path::Path::new(&dir), spec(DIM)).unwrap();
        upsert(&store, 0..4, "alice").await;
        std::process::abort();
    }
    let (_dir, reopened) =
        reopened_after_a_crash_of("acknowledged_upserts_survive_a_process_crash");
    assert_eq!(reopened.count(None).await.unwrap(), 4);
}

#[tokio::test]
async fn in_bulk_mode_upserts_are_durable_once_flushed() {
    if let Ok(dir) = std::env::var(CRASH_CHILD) {
        let store =
            EdgeStore::open_with(std::path::Path::new(&dir), spec(DIM), Durability::OnFlush)
                .unwrap();
        upsert(&store, 0..3, "alice").await;
        store.flush().await.unwrap();
        upsert(&store, 3..6, "alice").await;
        std::process::abort();
    }
    let (_dir, reopened) =
        reopened_after_a_crash_of("in_bulk_mode_upserts_are_durable_once_flushed");
    let count = reopened.count(None).await.unwrap();
    assert!(
        (3..=6).contains(&count),
        "the flushed three are there (later ones may be): {count}"
    );
}

#[tokio::test]
async fn a_collection_of_another_size_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    drop(EdgeStore::open(dir.path(), spec(DIM)).unwrap());
    let err = EdgeStore::open(dir.path(), spec(DIM * 2)).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::DimensionMismatch {
                existing: 8,
                configured: 16,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("EMBEDDING_DIM is 16"), "{err}");
}

#[tokio::test]
async fn a_vector_of_the_wrong_length_is_rejected_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let store = EdgeStore::open(dir.path(), spec(DIM)).unwrap();
    let mut bad = point(1, "alice");
    bad.vector.pop();
    let err = store.upsert(vec![bad]).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert_eq!(store.count(None).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_upserts_all_become_durable() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(EdgeStore::open(dir.path(), spec(DIM)).unwrap());
    let tasks: Vec<_> = (0..64u8)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { store.upsert(vec![point(n, "carol")]).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(store.count(Some("carol")).await.unwrap(), 64);
}

#[tokio::test]
async fn points_of_another_embedding_model_are_counted_and_one_of_them_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = EdgeStore::open(dir.path(), spec(DIM)).unwrap();
    let accepted = ["model-a".to_owned(), "model-a-alias".to_owned()];
    assert_eq!(
        store.foreign_points(&accepted).await.unwrap(),
        None,
        "empty"
    );
    let with_model = |n: u8, model: Option<&str>| {
        let mut p = point(n, "alice");
        if let Some(model) = model {
            p.payload.insert("embedding_model".into(), json!(model));
            p.payload.insert("version".into(), json!("v7"));
        }
        p
    };
    let written = |points: &[(u8, &str)]| {
        points
            .iter()
            .map(|&(n, m)| with_model(n, Some(m)))
            .collect()
    };
    store
        .upsert(written(&[(0, "model-a"), (1, "model-a-alias")]))
        .await
        .unwrap();
    assert_eq!(store.foreign_points(&accepted).await.unwrap(), None);
    store
        .upsert(written(&[(2, "model-b"), (3, "model-b")]))
        .await
        .unwrap();
    let foreign = store.foreign_points(&accepted).await.unwrap().unwrap();
    assert_eq!(foreign.points, 2);
    assert_eq!(foreign.model.as_deref(), Some("model-b"));
    assert_eq!(foreign.version.as_deref(), Some("v7"));
    // A point that does not say which model wrote it is foreign too.
    store.upsert(vec![with_model(4, None)]).await.unwrap();
    let foreign = store.foreign_points(&accepted[..1]).await.unwrap().unwrap();
    assert_eq!(foreign.points, 4, "alias not accepted here; model-b; none");
}

/// Bytes of the files under `dir`.
fn bytes_under(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|entry| entry.metadata().unwrap().len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_is_rotated_past_its_bound_while_reads_go_on_and_every_point_survives() {
    let dir = tempfile::tempdir().unwrap();
    let limits = aura_store::EdgeLimits {
        wal_max_bytes: 1024 * 1024,
        ..aura_store::EdgeLimits::default()
    };
    let store = std::sync::Arc::new(
        EdgeStore::open_guarded(dir.path(), spec(DIM), Durability::EveryWrite, limits).unwrap(),
    );
    // ~4.5 KB of WAL per point: 6,000 points are ~27 MB, over three 8 MiB WAL segments.
    let note = "n".repeat(4096);
    let written = 6_000u32;
    let reader = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut reads = 0;
            while store.count(None).await.unwrap() < u64::from(written) {
                store
                    .search(Query::nearest(vec![0.5; DIM], 3))
                    .await
                    .unwrap();
                reads += 1;
            }
            reads
        })
    };
    for batch in 0..written / 100 {
        let points = (0..100)
            .map(|i| {
                let n = batch * 100 + i;
                let payload = json!({"user_id": format!("user-{}", n % 7), "text": note})
                    .as_object()
                    .cloned()
                    .unwrap();
                Point {
                    id: Uuid::new_v5(&Uuid::NAMESPACE_OID, &n.to_le_bytes()),
                    vector: (0..DIM)
                        .map(|d| ((n as usize + d) % 11) as f32 + 0.1)
                        .collect(),
                    payload,
                }
            })
            .collect();
        store.upsert(points).await.unwrap();
    }
    assert!(reader.await.unwrap() > 0, "reads ran while the WAL rotated");
    let collection = dir.path().join("user_context");
    assert!(
        !collection.join("wal.retired").exists(),
        "each retired WAL is deleted"
    );
    assert!(
        store.wal_rotations() >= 2,
        "rotations: {}",
        store.wal_rotations()
    );
    let wal = collection.join("wal");
    // Without rotation the WAL would hold every update (~27 MB, four or more 8 MiB segments).
    assert!(
        bytes_under(&wal) <= 24 * 1024 * 1024,
        "WAL: {} bytes",
        bytes_under(&wal)
    );
    assert_eq!(store.count(None).await.unwrap(), u64::from(written));
    assert_eq!(store.count(Some("user-3")).await.unwrap(), 857);
    drop(store);

    let reopened = EdgeStore::open(dir.path(), spec(DIM)).unwrap();
    assert_eq!(reopened.count(None).await.unwrap(), u64::from(written));
    let hits = reopened
        .search(Query::nearest(vec![0.5; DIM], 5).of_user("user-3"))
        .await
        .unwrap();
    assert_eq!(hits.len(), 5);
    assert!(hits.iter().all(|h| h.payload["text"] == note));
}

#[tokio::test]
async fn a_wal_left_retired_by_a_killed_rotation_is_deleted_at_open_and_every_point_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let store = EdgeStore::open(dir.path(), spec(DIM)).unwrap();
    store
        .upsert((0..200).map(|n| point(n, "alice")).collect())
        .await
        .unwrap();
    drop(store);
    // What a process killed in the middle of a rotation leaves: the WAL moved to `wal.retired`, partly deleted.
    let collection = dir.path().join("user_context");
    let retired = collection.join("wal.retired");
    std::fs::rename(collection.join("wal"), &retired).unwrap();
    let first = std::fs::read_dir(&retired)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    std::fs::remove_file(first.path()).unwrap();

    let store = EdgeStore::open(dir.path(), spec(DIM)).unwrap();
    assert!(!retired.exists(), "the retired WAL is deleted at open");
    assert!(collection.join("wal").is_dir(), "a fresh WAL");
    assert_eq!(store.count(None).await.unwrap(), 200);
    store.upsert(vec![point(200, "bob")]).await.unwrap();
    drop(store);
    let reopened = EdgeStore::open(dir.path(), spec(DIM)).unwrap();
    assert_eq!(reopened.count(None).await.unwrap(), 201);
    assert_eq!(reopened.count(Some("bob")).await.unwrap(), 1);
}
