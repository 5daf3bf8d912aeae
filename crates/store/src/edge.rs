//! Embedded Qdrant (`qdrant-edge`), one shard directory per collection under `QDRANT_PATH`.
//!
//! Durability: `qdrant-edge` 0.7 writes each update to its WAL but does not replay the WAL on load — only flushed
//! segments survive a crash. So an upsert is acknowledged only after a flush that started after it was applied.
//! Flushes are group-committed: concurrent upserts wait for the same flush, so the cost of one fsync is shared by
//! every upsert that arrived while the previous one ran.
//!
//! The engine is synchronous and `EdgeShard::flush` panics if the WAL lock is taken concurrently, so every call into
//! the shard that writes or flushes holds `write_lock` and runs on the blocking thread pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;

use async_trait::async_trait;
use qdrant_edge::{
    Condition, CountRequest, CreateIndex, EdgeConfig, EdgeShard, EdgeVectorParams, FieldCondition, FieldIndexOperations,
    Filter, JsonPath, Match, PayloadFieldSchema, PayloadSchemaType, PointId, PointInsertOperations, PointOperations,
    PointStruct, QueryEnum, SearchRequest, UpdateOperation, WithPayloadInterface, WithVector,
};
use serde_json::Value;
use tokio::sync::watch;

use crate::{
    CollectionInfo, CollectionSpec, Distance, Hit, KEYWORD_INDEXES, Point, StoreError, VectorStore, check_vectors,
};

const DEFAULT_VECTOR: &str = "";

pub struct EdgeStore {
    spec: CollectionSpec,
    path: PathBuf,
    shard: Arc<EdgeShard>,
    write_lock: Arc<Mutex<()>>,
    commits: GroupCommit,
}

impl std::fmt::Debug for EdgeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeStore").field("spec", &self.spec).field("path", &self.path).finish()
    }
}

impl EdgeStore {
    /// Opens the collection under `root`, creating it if missing; refuses a size or distance mismatch.
    pub fn open(root: &Path, spec: CollectionSpec) -> Result<Self, StoreError> {
        let path = root.join(&spec.name);
        let exists = path.join("edge_config.json").exists() || path.join("segments").exists();
        let shard = if exists {
            let shard = EdgeShard::load(&path, None).map_err(|e| engine(&path, e))?;
            check_existing(&spec, &shard.config())?;
            shard
        } else {
            std::fs::create_dir_all(&path).map_err(|e| engine(&path, e))?;
            EdgeShard::new(&path, edge_config(&spec)).map_err(|e| engine(&path, e))?
        };
        ensure_keyword_indexes(&shard).map_err(|e| engine(&path, e))?;
        let shard = Arc::new(shard);
        let write_lock = Arc::new(Mutex::new(()));
        let commits = GroupCommit::start(Arc::downgrade(&shard), write_lock.clone());
        tracing::debug!(path = %path.display(), collection = %spec.name, "embedded Qdrant collection open");
        Ok(Self { spec, path, shard, write_lock, commits })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Builds HNSW indexes for segments large enough to deserve one (blocking; call after bulk loads).
    pub async fn optimize(&self) -> Result<bool, StoreError> {
        let shard = self.shard.clone();
        let lock = self.write_lock.clone();
        blocking(move || {
            let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
            shard.optimize()
        })
        .await
    }

    async fn read<T: Send + 'static>(
        &self,
        op: impl FnOnce(&EdgeShard) -> qdrant_edge::OperationResult<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let shard = self.shard.clone();
        blocking(move || op(&shard)).await
    }
}

fn edge_config(spec: &CollectionSpec) -> EdgeConfig {
    let mut config = EdgeConfig::default();
    config.hnsw_config.m = 16;
    config.hnsw_config.ef_construct = 256;
    config.hnsw_config.on_disk = Some(true);
    config.on_disk_payload = true;
    config.vectors.insert(
        DEFAULT_VECTOR.into(),
        EdgeVectorParams::builder(spec.dimension, edge_distance(spec.distance)).on_disk(true).build(),
    );
    config
}

fn check_existing(spec: &CollectionSpec, config: &EdgeConfig) -> Result<(), StoreError> {
    let Some(params) = config.vectors.get(DEFAULT_VECTOR) else {
        return Err(StoreError::Invalid(format!("collection `{}` has no default dense vector", spec.name)));
    };
    if params.size != spec.dimension {
        return Err(StoreError::DimensionMismatch {
            collection: spec.name.clone(),
            existing: params.size,
            configured: spec.dimension,
        });
    }
    let existing = from_edge_distance(params.distance);
    if existing != spec.distance {
        return Err(StoreError::DistanceMismatch { collection: spec.name.clone(), existing, configured: spec.distance });
    }
    Ok(())
}

fn ensure_keyword_indexes(shard: &EdgeShard) -> qdrant_edge::OperationResult<()> {
    let existing = shard.info().payload_schema;
    for field in KEYWORD_INDEXES {
        let path = json_path(field)?;
        if existing.contains_key(&path) {
            continue;
        }
        shard.update(UpdateOperation::FieldIndexOperation(FieldIndexOperations::CreateIndex(CreateIndex {
            field_name: path,
            field_schema: Some(PayloadFieldSchema::FieldType(PayloadSchemaType::Keyword)),
        })))?;
    }
    Ok(())
}

fn edge_distance(distance: Distance) -> qdrant_edge::Distance {
    match distance {
        Distance::Cosine => qdrant_edge::Distance::Cosine,
        Distance::Dot => qdrant_edge::Distance::Dot,
        Distance::Euclid => qdrant_edge::Distance::Euclid,
    }
}

fn from_edge_distance(distance: qdrant_edge::Distance) -> Distance {
    match distance {
        qdrant_edge::Distance::Dot => Distance::Dot,
        qdrant_edge::Distance::Euclid | qdrant_edge::Distance::Manhattan => Distance::Euclid,
        qdrant_edge::Distance::Cosine => Distance::Cosine,
    }
}

fn user_filter(user_id: Option<&str>) -> qdrant_edge::OperationResult<Option<Filter>> {
    let Some(user) = user_id else { return Ok(None) };
    let condition = FieldCondition::new_match(json_path("user_id")?, Match::from(user.to_owned()));
    Ok(Some(Filter::new_must(Condition::Field(condition))))
}

fn json_path(field: &str) -> qdrant_edge::OperationResult<JsonPath> {
    JsonPath::try_from(field)
        .map_err(|_| qdrant_edge::OperationError::service_error(format!("invalid payload path `{field}`")))
}

fn engine(path: &Path, error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("embedded Qdrant at {}: {error}", path.display()))
}

async fn blocking<T: Send + 'static>(
    op: impl FnOnce() -> qdrant_edge::OperationResult<T> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(op).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(StoreError::Unavailable(format!("embedded Qdrant: {e}"))),
        Err(join) => Err(StoreError::Unavailable(format!("embedded Qdrant task failed: {join}"))),
    }
}

#[async_trait]
impl VectorStore for EdgeStore {
    fn collection(&self) -> &CollectionSpec {
        &self.spec
    }

    async fn upsert(&self, points: Vec<Point>) -> Result<(), StoreError> {
        if points.is_empty() {
            return Ok(());
        }
        check_vectors(&self.spec, &points)?;
        let persisted = points
            .into_iter()
            .map(|p| PointStruct::new(PointId::Uuid(p.id), p.vector, Value::Object(p.payload)).0)
            .collect();
        let shard = self.shard.clone();
        let lock = self.write_lock.clone();
        blocking(move || {
            let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
            shard.update(UpdateOperation::PointOperation(PointOperations::UpsertPoints(
                PointInsertOperations::PointsList(persisted),
            )))
        })
        .await?;
        // Numbered only now that the write is applied, so the flush it waits for is guaranteed to include it.
        let sequence = self.commits.next_write();
        self.commits.wait_durable(sequence).await
    }

    async fn search(&self, vector: Vec<f32>, user_id: Option<&str>, limit: usize) -> Result<Vec<Hit>, StoreError> {
        if vector.len() != self.spec.dimension {
            return Err(StoreError::Invalid(format!(
                "query vector has {} dimensions; collection takes {}",
                vector.len(),
                self.spec.dimension
            )));
        }
        let filter = user_filter(user_id).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let points = self
            .read(move |shard| {
                shard.search(SearchRequest {
                    query: QueryEnum::Nearest(qdrant_edge::NamedQuery { query: vector.into(), using: None }),
                    filter,
                    params: None,
                    limit,
                    offset: 0,
                    with_payload: Some(WithPayloadInterface::Bool(true)),
                    with_vector: Some(WithVector::Bool(false)),
                    score_threshold: None,
                })
            })
            .await?;
        Ok(points
            .into_iter()
            .map(|p| Hit {
                id: p.id.to_string(),
                score: p.score,
                payload: p.payload.map(|payload| payload.0.into_iter().collect()).unwrap_or_default(),
            })
            .collect())
    }

    async fn count(&self, user_id: Option<&str>) -> Result<u64, StoreError> {
        let filter = user_filter(user_id).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let count = self.read(move |shard| shard.count(CountRequest { filter, exact: true })).await?;
        Ok(count as u64)
    }

    async fn info(&self) -> Result<CollectionInfo, StoreError> {
        Ok(CollectionInfo {
            name: self.spec.name.clone(),
            points: self.count(None).await?,
            dimension: self.spec.dimension,
            distance: self.spec.distance,
            engine: "embedded",
        })
    }
}

/// Group commit of embedded writes: `next_write` numbers an applied write, `wait_durable` returns once a flush that
/// began after it has finished. One background task runs the flushes back to back while writes keep arriving. It
/// holds the shard weakly, so dropping the store closes (and finally flushes) the shard right away.
struct GroupCommit {
    written: watch::Sender<u64>,
    durable: watch::Receiver<Result<u64, String>>,
}

impl GroupCommit {
    fn start(shard: std::sync::Weak<EdgeShard>, lock: Arc<Mutex<()>>) -> Self {
        let (written, mut written_rx) = watch::channel(0u64);
        let (durable_tx, durable) = watch::channel(Ok(0u64));
        let run = async move {
            while written_rx.changed().await.is_ok() {
                let target = *written_rx.borrow_and_update();
                let Some(shard) = shard.upgrade() else { break };
                let lock = lock.clone();
                let flushed = tokio::task::spawn_blocking(move || {
                    let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
                    // `flush` panics on I/O failure; turn that into an error for the waiting writers.
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shard.flush()))
                })
                .await;
                let outcome = match flushed {
                    Ok(Ok(())) => Ok(target),
                    Ok(Err(_)) | Err(_) => Err("flushing the embedded store to disk failed".to_owned()),
                };
                if durable_tx.send(outcome).is_err() {
                    break;
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(run);
            }
            Err(_) => tracing::warn!("EdgeStore opened outside a Tokio runtime: upserts will not be flushed"),
        }
        Self { written, durable }
    }

    fn next_write(&self) -> u64 {
        let mut sequence = 0;
        self.written.send_modify(|n| {
            *n += 1;
            sequence = *n;
        });
        sequence
    }

    async fn wait_durable(&self, sequence: u64) -> Result<(), StoreError> {
        let mut durable = self.durable.clone();
        loop {
            match &*durable.borrow_and_update() {
                Ok(done) if *done >= sequence => return Ok(()),
                Err(message) => return Err(StoreError::Unavailable(message.clone())),
                Ok(_) => {}
            }
            durable.changed().await.map_err(|_| StoreError::Unavailable("embedded store flusher stopped".into()))?;
        }
    }
}
