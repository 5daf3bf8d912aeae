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

/// Kafka settings of one test against the test broker `AURA_TEST_KAFKA` (`scripts/test.sh` starts it): its own group
/// and topic prefix (`<name>-<random>`), so tests share the broker in parallel; a 6 s session (a dead member is
/// noticed within a test) and a 50 ms fetch wait; the defaults otherwise.
pub fn kafka_settings(name: &str) -> crate::settings::KafkaSettings {
    let bootstrap = std::env::var("AURA_TEST_KAFKA").unwrap_or_else(|_| {
        panic!("AURA_TEST_KAFKA is not set: run the tests with scripts/test.sh")
    });
    let id = uuid::Uuid::new_v4().simple().to_string();
    crate::settings::KafkaSettings {
        bootstrap_servers: bootstrap,
        security_protocol: "PLAINTEXT".into(),
        sasl_mechanism: "PLAIN".into(),
        api_key: None,
        api_secret: None,
        group_id: format!("{name}-{id}"),
        topic_prefix: format!("{name}-{}.", &id[..8]),
        fetch_wait_max_ms: 50,
        session_timeout_ms: 6_000,
        assignment_strategy: "range,roundrobin".into(),
        drain_to_celery: true,
        dead_letter_spool_dir: std::env::temp_dir().join(format!("aura-dead-letters-{id}")),
        message_max_bytes: 1_000_000,
        ordering: crate::settings::KafkaOrdering::Key,
        concurrency: 64,
        pipeline_depth: 32,
        max_in_flight_per_partition: 1000,
        max_in_flight: 10_000,
        max_in_flight_bytes: 64 << 20,
    }
}

/// A handler made of a closure, for tests and benchmarks: `name` takes `event_types`, and `handle` turns an event
/// into the events it produces (or a failure), with no context.
pub struct FnHandler<F> {
    name: &'static str,
    event_types: &'static [&'static str],
    handle: F,
}

impl<F> FnHandler<F>
where
    F: Fn(&aura_events::Event) -> Result<Vec<aura_events::Event>, crate::HandlerError>
        + Send
        + Sync,
{
    pub fn new(name: &'static str, event_types: &'static [&'static str], handle: F) -> Self {
        Self {
            name,
            event_types,
            handle,
        }
    }
}

#[async_trait::async_trait]
impl<F> crate::Handler for FnHandler<F>
where
    F: Fn(&aura_events::Event) -> Result<Vec<aura_events::Event>, crate::HandlerError>
        + Send
        + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn event_types(&self) -> &'static [&'static str] {
        self.event_types
    }

    async fn handle(
        &self,
        event: &aura_events::Event,
        _: &HandlerContext,
    ) -> Result<Vec<aura_events::Event>, crate::HandlerError> {
        (self.handle)(event)
    }
}

/// A handler that takes `event_types` and produces nothing.
pub fn sink(
    name: &'static str,
    event_types: &'static [&'static str],
) -> FnHandler<
    impl Fn(&aura_events::Event) -> Result<Vec<aura_events::Event>, crate::HandlerError> + Send + Sync,
> {
    FnHandler::new(name, event_types, |_| Ok(Vec::new()))
}
