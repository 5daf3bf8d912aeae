//! Embedded Qdrant (`qdrant-edge`), one shard directory per collection under `QDRANT_PATH`.
//!
//! Durability: `qdrant-edge` 0.7 writes each update to its WAL but does not replay the WAL on load — only flushed
//! segments survive a crash. So an upsert is acknowledged only after a flush that covers it.
//!
//! Throughput: applying one update per upsert and flushing behind a lock serialises every writer behind every
//! flush. Instead one writer task takes all upserts waiting at that moment, applies them as a single update, flushes
//! once, and answers them all (group commit). Concurrent callers share the cost of a flush; a lone caller pays it.
//! A caller that pipelines does not wait at all: [`VectorStore::hand_over`] returns once the points are queued for
//! the writer (in order), and the [`Durable`] it returns is the writer's answer. Every event of every key in flight
//! then shares the next flush, instead of each key contributing one write per flush.
//!
//! A bulk load that acknowledges nothing to anyone (the `pipeline` command) can open the store with
//! [`Durability::OnFlush`]: rounds then skip the flush, and [`VectorStore::flush`] makes everything so far durable.
//!
//! The engine is synchronous, and `EdgeShard::flush` panics if its WAL lock is held concurrently: the writer task is
//! the only code that updates or flushes, one round at a time, on the blocking pool.
//!
//! The WAL: `qdrant-edge` 0.7 never truncates it either (nothing calls its `ack`). Left alone it grows by every
//! update (~3.4 KB per 384-d point), on disk and — it is memory-mapped — in the process's resident memory: 100,000
//! points left 335 MB of WAL and 191 MB of file-backed RSS. Since nothing reads it back, the writer *rotates* it: after
//! a flushed round in which it passed its bound (`QDRANT_WAL_MAX_MB`), it closes the shard (which flushes
//! every segment), retires the WAL and opens the shard again on a fresh one. Retiring is a rename to `wal.retired`,
//! then a delete: the engine refuses to open a WAL with a segment missing, so a process killed while it deleted one
//! in place could not have started again. A `wal.retired` a killed process left is deleted when the store opens. Readers hold the shard for one operation
//! at a time ([`Current`]); the rotation waits for them. If the shard cannot be opened again (another process took
//! its WAL lock meanwhile), reads and writes fail transiently and the next write round opens it. What a rotation costs
//! is the reopen: 40 ms at 20,000 points, 77 ms at 100,000 (BENCHMARKS.md). New collections get 8 MiB WAL segments
//! instead of 32 MiB, so the WAL is rotated in smaller steps. It is rotated once it has grown by more than
//! `wal_max_bytes` since the shard was opened.
//!
//! A full disk: the engine writes through memory maps, so running out of space kills the process with SIGBUS
//! (seen with a full filesystem under `QDRANT_PATH`) instead of returning an error. Every round therefore first checks
//! the free space of the store's filesystem and refuses to write below `min_free_bytes` (`QDRANT_MIN_FREE_MB`): a
//! transient error, retried until space is freed, with `/health` degraded meanwhile.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use qdrant_edge::{
    Condition, CountRequest, CreateIndex, EdgeConfig, EdgeShard, EdgeVectorParams, FieldCondition,
    FieldIndexOperations, Filter, JsonPath, Match, PayloadFieldSchema, PayloadSchemaType, PointId,
    PointInsertOperations, PointOperations, PointStruct, PointStructPersisted, QueryEnum,
    SearchRequest, UpdateOperation, WalOptions, WithPayloadInterface, WithVector,
};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::{
    CollectionInfo, CollectionSpec, Distance, Durable, ForeignPoints, Hit, KEYWORD_INDEXES, Point,
    Query, StoreError, VectorStore, already_durable, any_direction, check_vectors,
};

const DEFAULT_VECTOR: &str = "";

/// When an upsert becomes durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Before `upsert` returns: what a consumer needs, since it acknowledges its input right after.
    EveryWrite,
    /// At the next `flush` (and when the store is dropped): for bulk loads that can simply be re-run.
    OnFlush,
}

/// What an embedded store guards against: a nearly full disk, and a WAL that grows without end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgeLimits {
    /// `QDRANT_MIN_FREE_MB`: writes are refused (transiently) while the store's filesystem has less free.
    pub min_free_bytes: u64,
    /// `QDRANT_WAL_MAX_MB`: the WAL is rotated once it holds more than this after a flushed round.
    pub wal_max_bytes: u64,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        Self {
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
            wal_max_bytes: DEFAULT_WAL_MAX_BYTES,
        }
    }
}

pub struct EdgeStore {
    spec: CollectionSpec,
    durability: Durability,
    path: PathBuf,
    shard: Arc<Current>,
    writer: mpsc::UnboundedSender<WriteRequest>,
    rotation: Arc<WalRotation>,
}

/// The open shard. The writer closes and reopens it when it rotates the WAL; everyone else takes it for one
/// operation ([`Current::get`]) and lets go.
struct Current(std::sync::RwLock<Option<Arc<EdgeShard>>>);

impl Current {
    fn get(&self) -> Result<Arc<EdgeShard>, StoreError> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .ok_or_else(|| {
                StoreError::Unavailable(
                    "the embedded store could not be reopened after rotating its WAL (see the log)"
                        .into(),
                )
            })
    }
}

impl std::fmt::Debug for EdgeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeStore")
            .field("spec", &self.spec)
            .field("path", &self.path)
            .finish()
    }
}

impl EdgeStore {
    /// Opens the collection under `root`, creating it if missing; refuses a size or distance mismatch.
    /// Upserts are durable on return.
    pub fn open(root: &Path, spec: CollectionSpec) -> Result<Self, StoreError> {
        Self::open_with(root, spec, Durability::EveryWrite)
    }

    pub fn open_with(
        root: &Path,
        spec: CollectionSpec,
        durability: Durability,
    ) -> Result<Self, StoreError> {
        Self::open_guarded(root, spec, durability, EdgeLimits::default())
    }

    /// [`EdgeStore::open_with`] with the given free-space floor and WAL bound.
    pub fn open_guarded(
        root: &Path,
        spec: CollectionSpec,
        durability: Durability,
        limits: EdgeLimits,
    ) -> Result<Self, StoreError> {
        let path = root.join(&spec.name);
        let exists = path.join("edge_config.json").exists() || path.join("segments").exists();
        let rotation = Arc::new(WalRotation::new(path.clone(), limits.wal_max_bytes));
        let shard = if exists {
            rotation.delete_retired();
            let shard = load(&path, !rotation.wal().exists())?;
            check_existing(&spec, &shard.config())?;
            shard
        } else {
            std::fs::create_dir_all(&path).map_err(|e| engine(&path, e))?;
            EdgeShard::new(&path, edge_config(&spec)).map_err(|e| engine(&path, e))?
        };
        ensure_keyword_indexes(&shard).map_err(|e| engine(&path, e))?;
        let shard = Arc::new(Current(std::sync::RwLock::new(Some(Arc::new(shard)))));
        rotation.opened();
        let writer = spawn_writer(
            Arc::downgrade(&shard),
            SpaceGuard {
                path: path.clone(),
                min_free_bytes: limits.min_free_bytes,
            },
            rotation.clone(),
        )?;
        tracing::debug!(path = %path.display(), collection = %spec.name, "embedded Qdrant collection open");
        Ok(Self {
            spec,
            durability,
            path,
            shard,
            writer,
            rotation,
        })
    }

    /// How often the writer rotated the WAL since the store was opened.
    pub fn wal_rotations(&self) -> u64 {
        self.rotation.rotations.load(Ordering::Relaxed)
    }

    /// Queues points for the writer task; the returned future is the answer of the round that applies (and, if
    /// asked, flushes) them.
    fn queue(&self, points: Vec<PointStructPersisted>, flush: bool) -> Result<Durable, StoreError> {
        let (done, outcome) = oneshot::channel();
        self.writer
            .send(WriteRequest {
                points,
                flush,
                done,
            })
            .map_err(|_| writer_stopped())?;
        Ok(Box::pin(async move {
            outcome.await.map_err(|_| writer_stopped())?
        }))
    }

    /// Runs `op` on the blocking pool. The shard is taken there too: a rotation holds it for the length of a reopen,
    /// and waiting for it must not block a runtime thread.
    async fn read<T: Send + 'static>(
        &self,
        op: impl FnOnce(&EdgeShard) -> qdrant_edge::OperationResult<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let current = self.shard.clone();
        match tokio::task::spawn_blocking(move || current.get().map(|shard| op(&shard))).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(e))) => Err(StoreError::Unavailable(format!("embedded Qdrant: {e}"))),
            Ok(Err(closed)) => Err(closed),
            Err(join) => Err(StoreError::Unavailable(format!(
                "embedded Qdrant task failed: {join}"
            ))),
        }
    }
}

/// Loads an existing shard with its stored config (checked by the caller). On a fresh WAL (after a rotation) a
/// collection created with qdrant-edge's 32 MiB WAL segments moves to [`WAL_SEGMENT_BYTES`].
fn load(path: &Path, fresh_wal: bool) -> Result<EdgeShard, StoreError> {
    let config = match EdgeConfig::load(path) {
        Some(Ok(mut config)) if fresh_wal => {
            config.wal_options = Some(wal_options());
            Some(config)
        }
        _ => None,
    };
    EdgeShard::load(path, config).map_err(|e| engine(path, e))
}

fn wal_options() -> WalOptions {
    WalOptions {
        segment_capacity: WAL_SEGMENT_BYTES,
        ..WalOptions::default()
    }
}

/// WAL segments of new collections: a quarter of qdrant-edge's 32 MiB, so that a rotation bound of a few dozen MiB
/// is a few segments.
const WAL_SEGMENT_BYTES: usize = 8 * 1024 * 1024;

fn edge_config(spec: &CollectionSpec) -> EdgeConfig {
    let mut config = EdgeConfig {
        wal_options: Some(wal_options()),
        ..EdgeConfig::default()
    };
    config.hnsw_config.m = 16;
    config.hnsw_config.ef_construct = 256;
    config.hnsw_config.on_disk = Some(true);
    config.on_disk_payload = true;
    config.vectors.insert(
        DEFAULT_VECTOR.into(),
        EdgeVectorParams::builder(spec.dimension, edge_distance(spec.distance))
            .on_disk(true)
            .build(),
    );
    config
}

fn check_existing(spec: &CollectionSpec, config: &EdgeConfig) -> Result<(), StoreError> {
    let Some(params) = config.vectors.get(DEFAULT_VECTOR) else {
        return Err(StoreError::Invalid(format!(
            "collection `{}` has no default dense vector",
            spec.name
        )));
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
        return Err(StoreError::DistanceMismatch {
            collection: spec.name.clone(),
            existing,
            configured: spec.distance,
        });
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
        shard.update(UpdateOperation::FieldIndexOperation(
            FieldIndexOperations::CreateIndex(CreateIndex {
                field_name: path,
                field_schema: Some(PayloadFieldSchema::FieldType(PayloadSchemaType::Keyword)),
            }),
        ))?;
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

/// The `limit` points nearest to `vector` that pass `filter`, with their payloads.
fn nearest(vector: Vec<f32>, filter: Option<Filter>, limit: usize) -> SearchRequest {
    SearchRequest {
        query: QueryEnum::Nearest(qdrant_edge::NamedQuery {
            query: vector.into(),
            using: None,
        }),
        filter,
        params: None,
        limit,
        offset: 0,
        with_payload: Some(WithPayloadInterface::Bool(true)),
        with_vector: Some(WithVector::Bool(false)),
        score_threshold: None,
    }
}

/// `embedding_model` is none of `models`.
fn not_models(models: &[String]) -> qdrant_edge::OperationResult<Filter> {
    let path = json_path("embedding_model")?;
    let conditions = models
        .iter()
        .map(|m| {
            Condition::Field(FieldCondition::new_match(
                path.clone(),
                Match::from(m.clone()),
            ))
        })
        .collect();
    Ok(Filter {
        should: None,
        min_should: None,
        must: None,
        must_not: Some(conditions),
    })
}

fn json_path(field: &str) -> qdrant_edge::OperationResult<JsonPath> {
    JsonPath::try_from(field).map_err(|_| {
        qdrant_edge::OperationError::service_error(format!("invalid payload path `{field}`"))
    })
}

fn writer_stopped() -> StoreError {
    StoreError::Unavailable("embedded store writer has stopped".into())
}

fn engine(path: &Path, error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("embedded Qdrant at {}: {error}", path.display()))
}

#[async_trait]
impl VectorStore for EdgeStore {
    fn collection(&self) -> &CollectionSpec {
        &self.spec
    }

    async fn hand_over(&self, points: Vec<Point>) -> Result<Durable, StoreError> {
        if points.is_empty() {
            return Ok(already_durable());
        }
        check_vectors(&self.spec, &points)?;
        let points = points
            .into_iter()
            .map(|p| PointStruct::new(PointId::Uuid(p.id), p.vector, Value::Object(p.payload)).0)
            .collect();
        self.queue(points, self.durability == Durability::EveryWrite)
    }

    async fn write(&self, points: Vec<Point>) -> Result<(), StoreError> {
        self.hand_over(points).await?.await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.queue(Vec::new(), true)?.await
    }

    async fn search(&self, query: Query<'_>) -> Result<Vec<Hit>, StoreError> {
        let Query {
            vector,
            user_id,
            limit,
        } = query;
        if vector.len() != self.spec.dimension {
            return Err(StoreError::Invalid(format!(
                "query vector has {} dimensions; collection takes {}",
                vector.len(),
                self.spec.dimension
            )));
        }
        let filter = user_filter(user_id).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let points = self
            .read(move |shard| shard.search(nearest(vector, filter, limit)))
            .await?;
        Ok(points
            .into_iter()
            .map(|p| Hit {
                id: p.id.to_string(),
                score: p.score,
                payload: p
                    .payload
                    .map(|payload| payload.0.into_iter().collect())
                    .unwrap_or_default(),
            })
            .collect())
    }

    async fn count(&self, user_id: Option<&str>) -> Result<u64, StoreError> {
        let filter = user_filter(user_id).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let count = self
            .read(move |shard| {
                shard.count(CountRequest {
                    filter,
                    exact: true,
                })
            })
            .await?;
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

    async fn foreign_points(&self, models: &[String]) -> Result<Option<ForeignPoints>, StoreError> {
        let filter = not_models(models).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let count_filter = filter.clone();
        let points = self
            .read(move |shard| {
                shard.count(CountRequest {
                    filter: Some(count_filter),
                    exact: true,
                })
            })
            .await? as u64;
        if points == 0 {
            return Ok(None);
        }
        let query = any_direction(self.spec.dimension);
        let sample = self
            .read(move |shard| shard.search(nearest(query, Some(filter), 1)))
            .await?;
        let payload: Option<serde_json::Map<String, Value>> = sample
            .into_iter()
            .next()
            .and_then(|p| p.payload)
            .map(|payload| payload.0.into_iter().collect());
        Ok(Some(ForeignPoints::from_payload(points, payload.as_ref())))
    }
}

struct WriteRequest {
    points: Vec<PointStructPersisted>,
    flush: bool,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Points per combined update: bounds the latency of one round and the size of one WAL record.
const MAX_POINTS_PER_WRITE: usize = 4096;

/// `QDRANT_MIN_FREE_MB`'s default: room for a WAL segment and a few segment files to grow.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 128 * 1024 * 1024;

/// `QDRANT_WAL_MAX_MB`'s default (see [`EdgeLimits::wal_max_bytes`]).
pub const DEFAULT_WAL_MAX_BYTES: u64 = 32 * 1024 * 1024;

/// Refuses a write round while the store's filesystem is nearly full (see the module doc: a full disk is a SIGBUS).
struct SpaceGuard {
    path: PathBuf,
    min_free_bytes: u64,
}

impl SpaceGuard {
    fn check(&self) -> Result<(), StoreError> {
        let free = match fs4::available_space(&self.path) {
            Ok(free) => free,
            // Not knowing is no reason to stop writing.
            Err(_) => return Ok(()),
        };
        if free < self.min_free_bytes {
            return Err(StoreError::Unavailable(format!(
                "only {} MiB free on the filesystem of {} (QDRANT_MIN_FREE_MB={}): writes wait until space is \
                 freed",
                free / (1024 * 1024),
                self.path.display(),
                self.min_free_bytes / (1024 * 1024)
            )));
        }
        Ok(())
    }
}

/// Rotates the WAL once it has grown by more than `max_bytes` since the shard was opened (see the module doc). The
/// size at opening (`opened_with`) is the segments qdrant-edge creates ahead, or a WAL an earlier process left.
struct WalRotation {
    path: PathBuf,
    max_bytes: u64,
    opened_with: AtomicU64,
    rotations: AtomicU64,
}

/// How long a rotation waits for readers to let go of the shard before it leaves the rotation to a later round.
const ROTATION_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl WalRotation {
    fn new(path: PathBuf, max_bytes: u64) -> Self {
        Self {
            path,
            max_bytes,
            opened_with: AtomicU64::new(0),
            rotations: AtomicU64::new(0),
        }
    }

    fn wal(&self) -> PathBuf {
        self.path.join("wal")
    }

    /// Where a rotation moves the WAL before deleting it.
    fn retired(&self) -> PathBuf {
        self.path.join("wal.retired")
    }

    /// Deletes the WAL in one step that a kill cannot leave half done: a rename away, then the delete. Whether the
    /// delete is finished does not matter: nothing opens `wal.retired`.
    fn retire(&self) -> bool {
        self.delete_retired();
        let retired = std::fs::rename(self.wal(), self.retired()).is_ok();
        self.delete_retired();
        retired
    }

    /// Deletes what an earlier rotation retired (all of it, or what a killed process left of it).
    fn delete_retired(&self) {
        let retired = self.retired();
        if retired.exists()
            && let Err(error) = std::fs::remove_dir_all(&retired)
        {
            tracing::warn!(path = %retired.display(), %error, "a retired WAL could not be deleted");
        }
    }

    /// Notes the WAL's size when the shard was (re)opened.
    fn opened(&self) {
        self.opened_with.store(self.wal_bytes(), Ordering::Relaxed);
    }

    /// Bytes the WAL's files take.
    fn wal_bytes(&self) -> u64 {
        std::fs::read_dir(self.wal())
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|entry| entry.metadata().ok())
                    .map(|metadata| metadata.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    fn due(&self) -> bool {
        let opened_with = self.opened_with.load(Ordering::Relaxed);
        self.wal_bytes().saturating_sub(opened_with) > self.max_bytes
    }

    /// Closes the shard (flushing every segment), deletes the WAL and opens the shard again. Everything the WAL
    /// holds is in the flushed segments, and nothing reads the WAL back. The shard stays closed (every call
    /// `Unavailable`) only if it cannot be opened again.
    fn rotate(&self, current: &Current) {
        let started = std::time::Instant::now();
        let before = self.wal_bytes();
        let mut slot = current
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(mut shard) = slot.take() else { return };
        // Readers took a clone for one operation; no new ones while the slot is locked.
        let shard = loop {
            match Arc::try_unwrap(shard) {
                Ok(alone) => break alone,
                Err(shared) if started.elapsed() < ROTATION_WAIT => {
                    shard = shared;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(shared) => {
                    *slot = Some(shared);
                    tracing::warn!(path = %self.path.display(), "WAL not rotated: the store is busy; trying again after the next write");
                    return;
                }
            }
        };
        // Dropping flushes every segment; qdrant-edge panics when that fails. Only a flushed shard's WAL may go.
        let flushed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(shard))).is_ok();
        let deleted = flushed && self.retire();
        match self.open(&mut slot) {
            Ok(_) => {
                self.rotations.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(path = %self.path.display(), wal_bytes = before, flushed, deleted,
                    took_ms = started.elapsed().as_secs_f64() * 1e3, "embedded store WAL rotated");
            }
            Err(error) => {
                tracing::error!(path = %self.path.display(), %error, "the embedded store could not be reopened after rotating its WAL; reads and writes fail until the next write reopens it");
            }
        }
    }

    /// The shard, reopened if a rotation left it closed (another process held its WAL lock meanwhile, say).
    fn reopened(&self, current: &Current) -> Result<Arc<EdgeShard>, StoreError> {
        let mut slot = current
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match slot.as_ref() {
            Some(open) => Ok(open.clone()),
            None => self.open(&mut slot),
        }
    }

    /// Opens the shard into `slot` (on a fresh WAL when there is none) and notes the WAL's size.
    fn open(&self, slot: &mut Option<Arc<EdgeShard>>) -> Result<Arc<EdgeShard>, StoreError> {
        let shard = Arc::new(load(&self.path, !self.wal().exists())?);
        *slot = Some(shard.clone());
        self.opened();
        Ok(shard)
    }
}

/// The writer task: one round = every request waiting now → one update → one flush → (if the WAL has grown past its
/// bound, rotate it) → answer them all.
/// It holds the shard weakly, so dropping the store closes (and finally flushes) the shard at once.
fn spawn_writer(
    shard: std::sync::Weak<Current>,
    guard: SpaceGuard,
    rotation: Arc<WalRotation>,
) -> Result<mpsc::UnboundedSender<WriteRequest>, StoreError> {
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        StoreError::Invalid("the embedded store must be opened inside a Tokio runtime".into())
    })?;
    let (tx, mut rx) = mpsc::unbounded_channel::<WriteRequest>();
    handle.spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut round = vec![first];
            let mut points = round[0].points.len();
            while points < MAX_POINTS_PER_WRITE {
                match rx.try_recv() {
                    Ok(request) => {
                        points += request.points.len();
                        round.push(request);
                    }
                    Err(_) => break,
                }
            }
            let flush = round.iter().any(|r| r.flush);
            let (batch, waiters): (Vec<_>, Vec<_>) =
                round.into_iter().map(|r| (r.points, r.done)).unzip();
            let Some(current) = shard.upgrade() else {
                break;
            };
            let requests = waiters.len();
            let outcome = match guard.check() {
                Ok(()) => {
                    let (rotation, current) = (rotation.clone(), current.clone());
                    tokio::task::spawn_blocking(move || {
                        let open = match current.get() {
                            Ok(open) => open,
                            Err(_) => rotation.reopened(&current)?,
                        };
                        // Moved, not cloned (`concat` would copy every vector and payload).
                        let points = batch.into_iter().flatten().collect();
                        let written = write_round(&open, points, flush, requests);
                        drop(open);
                        // Before the answers: once a caller has its answer, the writer holds nothing of the
                        // shard, so a store dropped right after closes it at once.
                        if flush && written.is_ok() && rotation.due() {
                            rotation.rotate(&current);
                        }
                        written
                    })
                    .await
                    .unwrap_or_else(|e| {
                        Err(StoreError::Unavailable(format!(
                            "embedded store write task failed: {e}"
                        )))
                    })
                }
                Err(refused) => Err(refused),
            };
            drop(current);
            for waiter in waiters {
                // A caller that gave up waiting is fine: its points are written either way.
                let _ = waiter.send(outcome.clone());
            }
        }
    });
    Ok(tx)
}

fn write_round(
    shard: &EdgeShard,
    points: Vec<PointStructPersisted>,
    flush: bool,
    requests: usize,
) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    let count = points.len();
    if !points.is_empty() {
        let upsert = PointOperations::UpsertPoints(PointInsertOperations::PointsList(points));
        shard
            .update(UpdateOperation::PointOperation(upsert))
            .map_err(|e| StoreError::Unavailable(format!("embedded Qdrant upsert: {e}")))?;
    }
    let applied = started.elapsed();
    if flush {
        // `flush` panics on I/O failure; make that an error for the waiting callers instead of killing the process.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shard.flush())).map_err(|_| {
            StoreError::Unavailable("flushing the embedded store to disk failed".into())
        })?;
    }
    tracing::debug!(
        points = count,
        requests,
        apply_ms = applied.as_secs_f64() * 1e3,
        flush_ms = (started.elapsed() - applied).as_secs_f64() * 1e3,
        "embedded write round"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_shard_left_closed_by_a_failed_reopen_is_reopened_by_the_next_write_round() {
        let dir = tempfile::tempdir().unwrap();
        let spec = CollectionSpec {
            name: "c".into(),
            dimension: 4,
            distance: Distance::Cosine,
        };
        let store = EdgeStore::open(dir.path(), spec.clone()).unwrap();
        let point = crate::Point {
            id: uuid::Uuid::new_v4(),
            vector: vec![1.0; 4],
            payload: serde_json::Map::new(),
        };
        store.upsert(vec![point.clone()]).await.unwrap();
        // What a rotation whose reopen failed leaves: no shard. Reads fail, transiently.
        let closed = store.shard.0.write().unwrap().take().unwrap();
        drop(closed);
        let refused = store.count(None).await.unwrap_err();
        assert!(refused.is_transient(), "{refused}");
        // The next write round opens it again, and everything written before is there.
        store
            .upsert(vec![crate::Point {
                id: uuid::Uuid::new_v4(),
                ..point
            }])
            .await
            .unwrap();
        assert_eq!(store.count(None).await.unwrap(), 2);
    }
}
