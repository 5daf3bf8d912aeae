//! Where vectors land: one [`VectorStore`] trait, two engines.
//!
//! [`EdgeStore`] embeds Qdrant in-process (`qdrant-edge`) under a directory — the default, so the pipeline runs
//! with no server. [`QdrantServerStore`] talks gRPC to a Qdrant server when `QDRANT_URL` is set. Both create the
//! collection on open (cosine, HNSW m=16 ef_construct=256, on-disk, keyword indexes on the filter fields) and
//! refuse to open a collection whose vector size differs from the configured one: writing 768-d vectors into a
//! 384-d collection would fail on every event, so it is a start-up error instead.
//!
//! `upsert` returns only once the points are durable (`wait=true` on the server; flushed to disk embedded), because
//! the caller acknowledges the input message right after. `hand_over` stops halfway: it returns once the store has
//! taken the points, with a [`Durable`] that resolves when they are durable, so a caller that pipelines (the Kafka
//! mount) can go on while the embedded store's group commit makes them durable, and acknowledges only after.

mod edge;
mod intercept;
mod layer;
mod server;

use async_trait::async_trait;
use futures::future::BoxFuture;
use serde_json::{Map, Value};
use uuid::Uuid;

pub use edge::{DEFAULT_MIN_FREE_BYTES, DEFAULT_WAL_MAX_BYTES, Durability, EdgeLimits, EdgeStore};
pub use intercept::{Intercept, InterceptedStore};
pub use layer::{Layered, StoreLayer};
pub use server::QdrantServerStore;

/// Keyword payload fields that get an index (the fields searches filter on).
pub const KEYWORD_INDEXES: [&str; 5] = [
    "user_id",
    "snapshot_type",
    "source_type",
    "embedding_model",
    "version",
];

/// The collection every store opens or creates.
#[derive(Clone, Debug, PartialEq)]
pub struct CollectionSpec {
    pub name: String,
    pub dimension: usize,
    pub distance: Distance,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distance {
    Cosine,
    Dot,
    Euclid,
}

impl Distance {
    pub const NAMES: [&'static str; 3] = ["cosine", "dot", "euclid"];

    pub fn parse(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "cosine" => Some(Self::Cosine),
            "dot" => Some(Self::Dot),
            "euclid" | "euclidean" => Some(Self::Euclid),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub id: Uuid,
    pub vector: Vec<f32>,
    pub payload: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub id: String,
    pub score: f32,
    pub payload: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CollectionInfo {
    pub name: String,
    pub points: u64,
    pub dimension: usize,
    pub distance: Distance,
    pub engine: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error(
        "collection `{collection}` holds {existing}-dimensional vectors but EMBEDDING_DIM is {configured}; \
         use another QDRANT_COLLECTION or the matching EMBEDDING_DIM"
    )]
    DimensionMismatch {
        collection: String,
        existing: usize,
        configured: usize,
    },
    #[error(
        "collection `{collection}` uses {existing:?} distance but VECTOR_DISTANCE is {configured:?}"
    )]
    DistanceMismatch {
        collection: String,
        existing: Distance,
        configured: Distance,
    },
    /// The store could not be reached or failed on its side: worth retrying.
    #[error("vector store unavailable: {0}")]
    Unavailable(String),
    /// The request itself is wrong (e.g. a vector of the wrong length): retrying cannot help.
    #[error("vector store rejected the request: {0}")]
    Invalid(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// A nearest-neighbour query: `limit` points nearest to `vector`, restricted to `user_id` when given.
#[derive(Clone, Debug, PartialEq)]
pub struct Query<'a> {
    pub vector: Vec<f32>,
    pub user_id: Option<&'a str>,
    pub limit: usize,
}

impl<'a> Query<'a> {
    /// The `limit` points nearest to `vector`, of any user.
    pub fn nearest(vector: Vec<f32>, limit: usize) -> Self {
        Self {
            vector,
            user_id: None,
            limit,
        }
    }

    /// Only the points of `user_id`.
    pub fn of_user(self, user_id: &'a str) -> Self {
        Self {
            user_id: Some(user_id),
            ..self
        }
    }
}

/// Points a store has taken but not yet made durable: resolves once they are (or with the error that kept them from
/// it). Dropping it does not cancel the write.
pub type Durable = BoxFuture<'static, Result<(), StoreError>>;

/// A [`Durable`] that already is.
pub fn already_durable() -> Durable {
    Box::pin(std::future::ready(Ok(())))
}

#[async_trait]
pub trait VectorStore: Send + Sync {
    fn collection(&self) -> &CollectionSpec;
    /// Inserts or overwrites the points; returns once they are durable (unless the store was opened for bulk
    /// loading with [`Durability::OnFlush`], where [`VectorStore::flush`] makes them durable).
    async fn upsert(&self, points: Vec<Point>) -> Result<(), StoreError> {
        self.hand_over(points).await?.await
    }
    /// Inserts or overwrites the points; returns once the store has taken them, with the [`Durable`] that says
    /// when they are durable. Points of two hand-overs are written in the order they were handed over.
    ///
    /// An engine writes in [`VectorStore::write`]; this checks the points against the collection first (nothing
    /// to do for none; a vector of the wrong size is [`StoreError::Invalid`]). An engine that can take points
    /// before they are durable overrides it (the embedded store); layers override it to see every write.
    async fn hand_over(&self, points: Vec<Point>) -> Result<Durable, StoreError> {
        if points.is_empty() {
            return Ok(already_durable());
        }
        check_vectors(self.collection(), &points)?;
        self.write(points).await?;
        Ok(already_durable())
    }
    /// Writes points already checked by [`VectorStore::hand_over`] (not empty, every vector of the collection's
    /// size); returns once they are durable.
    async fn write(&self, points: Vec<Point>) -> Result<(), StoreError>;
    /// Makes every upsert so far durable. A no-op where upserts are durable on return.
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// The points nearest to the query's vector.
    async fn search(&self, query: Query<'_>) -> Result<Vec<Hit>, StoreError>;
    /// Exact number of points, restricted to `user_id` when given.
    async fn count(&self, user_id: Option<&str>) -> Result<u64, StoreError>;
    async fn info(&self) -> Result<CollectionInfo, StoreError>;
    /// Points whose `embedding_model` is none of `models` (or missing): how many, and what one of them says.
    /// `None` when every point was written by one of `models` (an empty collection included).
    async fn foreign_points(&self, models: &[String]) -> Result<Option<ForeignPoints>, StoreError>;
}

/// Points another embedding model wrote (see [`VectorStore::foreign_points`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignPoints {
    pub points: u64,
    /// One such point's `embedding_model` and `version` (`None`: the field is missing).
    pub model: Option<String>,
    pub version: Option<String>,
}

impl ForeignPoints {
    fn from_payload(points: u64, payload: Option<&Map<String, Value>>) -> Self {
        let field = |name: &str| {
            payload
                .and_then(|p| p.get(name))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        Self {
            points,
            model: field("embedding_model"),
            version: field("version"),
        }
    }
}

/// A query vector for "any point": every coordinate equal (never zero, so cosine is defined).
fn any_direction(dimension: usize) -> Vec<f32> {
    vec![1.0 / (dimension.max(1) as f32).sqrt(); dimension]
}

fn check_vectors(spec: &CollectionSpec, points: &[Point]) -> Result<(), StoreError> {
    match points.iter().find(|p| p.vector.len() != spec.dimension) {
        Some(p) => Err(StoreError::Invalid(format!(
            "point {} has a {}-dimensional vector; collection `{}` takes {}",
            p.id,
            p.vector.len(),
            spec.name,
            spec.dimension
        ))),
        None => Ok(()),
    }
}
