//! The contract between business logic and the runtime.

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use aura_embed::{EmbedError, Embedder};
use aura_events::limits::Limits;
use aura_events::{Event, EventError};
use aura_store::{Durable, Point, StoreError, VectorStore};

/// What a handler may use. Handlers get capabilities, never broker clients.
#[derive(Clone)]
pub struct HandlerContext {
    pub store: Arc<dyn VectorStore>,
    pub embedder: Arc<dyn Embedder>,
    /// `EMBEDDING_VERSION`, stamped on vectors and points so a re-embedding can tell old from new.
    pub embedding_version: String,
    /// `MAX_EVENT_BYTES`, `MAX_EMBED_CHARS`, `MAX_CHUNKS_PER_EVENT`: what handlers cut, and what they refuse.
    pub limits: Limits,
}

impl HandlerContext {
    /// Inserts or overwrites `points` in the store. They are durable before the input is acknowledged: under the
    /// dispatcher this returns once the store has taken them, and the dispatcher settles their durability with the
    /// event's outputs (a pipelining mount runs the key's next event meanwhile); anywhere else it returns once they
    /// are durable. A failure to make them durable fails the event as this call would have.
    pub async fn write_points(&self, points: Vec<Point>) -> Result<(), HandlerError> {
        let mut durable = Some(self.store.hand_over(points).await?);
        // Outside the dispatcher there is nobody to settle it later: wait here.
        let _ = UNSETTLED_WRITES.try_with(|writes| writes.borrow_mut().extend(durable.take()));
        match durable {
            Some(durable) => Ok(durable.await?),
            None => Ok(()),
        }
    }
}

tokio::task_local! {
    /// The writes of the handler running in this task that are not yet durable (see [`HandlerContext::write_points`]).
    static UNSETTLED_WRITES: RefCell<Vec<Durable>>;
}

/// Runs `handling` and returns, with its output, the writes it left to settle.
pub(crate) async fn collecting_writes<F: Future>(handling: F) -> (F::Output, Vec<Durable>) {
    UNSETTLED_WRITES
        .scope(RefCell::new(Vec::new()), async {
            let output = handling.await;
            (output, UNSETTLED_WRITES.with(RefCell::take))
        })
        .await
}

/// Why a handler failed, classified by what the runtime should do next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// A dependency is down or overloaded: retry the same event later, do not skip it.
    #[error("transient: {0}")]
    Transient(String),
    /// The event itself cannot be processed (bad schema, rejected input): dead-letter it.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl HandlerError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Transient(m) | Self::Permanent(m) => m,
        }
    }
}

impl From<EventError> for HandlerError {
    fn from(error: EventError) -> Self {
        Self::Permanent(error.to_string())
    }
}

impl HandlerError {
    /// `error`, transient when retrying may help.
    fn classified(error: impl std::fmt::Display, transient: bool) -> Self {
        if transient {
            Self::Transient(error.to_string())
        } else {
            Self::Permanent(error.to_string())
        }
    }
}

impl From<StoreError> for HandlerError {
    fn from(error: StoreError) -> Self {
        let transient = error.is_transient();
        Self::classified(error, transient)
    }
}

impl From<EmbedError> for HandlerError {
    fn from(error: EmbedError) -> Self {
        let transient = error.is_transient();
        Self::classified(error, transient)
    }
}

#[async_trait]
pub trait Handler: Send + Sync {
    /// The name used in `DISABLED_HANDLERS`, metrics and dead letters.
    fn name(&self) -> &'static str;
    /// The event types this handler consumes.
    fn event_types(&self) -> &'static [&'static str];
    /// Processes one event and returns the events it produces (published by the runtime, not the handler).
    async fn handle(&self, event: &Event, ctx: &HandlerContext)
    -> Result<Vec<Event>, HandlerError>;
}
