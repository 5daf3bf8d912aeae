//! Test doubles the scenarios steer: a store, an embedder and a publisher that can fail, hang or slow down on
//! demand, and record what went through them.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aura_runtime::embed::{EmbedError, Embedder, EmbedderLayer, Embeddings, LayeredEmbedder};
use aura_runtime::events::Event;
use aura_runtime::store::{Durable, Layered, Point, StoreError, StoreLayer, VectorStore};
use aura_runtime::{Backend, PublishError, Publisher};

/// Takes one from `counter` if it is above zero.
fn take_one(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// A store layer in front of the real embedded one: fails the next `fail_next` upserts (transient), waits
/// `delay_ms` before each write, and records `(user_id, origin_event_id)` of every point the store took, in the order
/// it writes them.
#[derive(Default)]
pub struct Probe {
    pub fail_next: AtomicU32,
    pub failed: AtomicU32,
    pub delay_ms: AtomicU64,
    pub written: Mutex<Vec<(String, String)>>,
}

pub type ProbeStore = Layered<Probe>;

pub fn probe_store(inner: Arc<dyn VectorStore>) -> Arc<ProbeStore> {
    Arc::new(Layered::new(inner, Probe::default()))
}

impl Probe {
    /// Origins written for `user`, in write order.
    pub fn origins_of(&self, user: &str) -> Vec<String> {
        self.written
            .lock()
            .unwrap()
            .iter()
            .filter(|(u, _)| u == user)
            .map(|(_, o)| o.clone())
            .collect()
    }

    pub fn writes(&self) -> usize {
        self.written.lock().unwrap().len()
    }
}

#[async_trait]
impl StoreLayer for Probe {
    async fn hand_over(
        &self,
        inner: &dyn VectorStore,
        points: Vec<Point>,
    ) -> Result<Durable, StoreError> {
        if take_one(&self.fail_next) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Unavailable(
                "connection refused (injected)".into(),
            ));
        }
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let seen: Vec<(String, String)> = points
            .iter()
            .map(|p| {
                let text = |k: &str| p.payload.get(k).and_then(|v| v.as_str()).unwrap_or("");
                (
                    text("user_id").to_owned(),
                    text("origin_event_id").to_owned(),
                )
            })
            .collect();
        let durable = inner.hand_over(points).await?;
        self.written.lock().unwrap().extend(seen);
        Ok(durable)
    }
}

/// Fails the next `fail_next` embeddings as an unavailable endpoint would, counting them in `failed`.
#[derive(Default)]
pub struct EmbedFailures {
    pub fail_next: AtomicU32,
    pub failed: AtomicU32,
}

/// The embedder the handlers use: the mount's own, behind [`EmbedFailures`].
pub type ProbeEmbedder = LayeredEmbedder<EmbedFailures>;

#[async_trait]
impl EmbedderLayer for EmbedFailures {
    async fn embed(
        &self,
        inner: &dyn Embedder,
        texts: &[String],
    ) -> Result<Embeddings, EmbedError> {
        if take_one(&self.fail_next) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(EmbedError::Unavailable("503 (injected)".into()));
        }
        inner.embed(texts).await
    }
}

/// The publisher the dispatcher publishes outputs through: the mount's own, behind a switch that makes every
/// publish fail (as a broker refusing writes) and a record of every event published.
pub struct ProbePublisher {
    inner: Arc<dyn Publisher>,
    pub refusing: AtomicBool,
    pub refused: AtomicU32,
    pub published: Mutex<Vec<Event>>,
}

impl ProbePublisher {
    pub fn new(inner: Arc<dyn Publisher>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            refusing: AtomicBool::new(false),
            refused: AtomicU32::new(0),
            published: Mutex::new(Vec::new()),
        })
    }

    fn gate(&self, event: &Event) -> Result<(), PublishError> {
        if self.refusing.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(PublishError::Unavailable {
                backend: self.inner.backend().as_str(),
                event_type: event.event_type.clone(),
                event_id: event.event_id.to_string(),
                reason: "broker refused the write (injected)".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Publisher for ProbePublisher {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }

    async fn publish(&self, event: &Event) -> Result<(), PublishError> {
        self.publish_via(event).await.map(drop)
    }

    async fn publish_via(&self, event: &Event) -> Result<Backend, PublishError> {
        self.gate(event)?;
        let backend = self.inner.publish_via(event).await?;
        self.published.lock().unwrap().push(event.clone());
        Ok(backend)
    }

    async fn publish_encoded(&self, event: &Event, json: &[u8]) -> Result<Backend, PublishError> {
        self.gate(event)?;
        let backend = self.inner.publish_encoded(event, json).await?;
        self.published.lock().unwrap().push(event.clone());
        Ok(backend)
    }
}
