//! `vectordb-consumer`: the handlers on the Kafka consumer group, in the mode `MESSAGING_BACKEND` names (docs/design.md §3).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use aura_celery::CeleryPublisher;
use aura_kafka::{ConsumerOptions, ConsumerReport, KafkaPublisher, run_consumer};
use aura_runtime::embed::{EmbedError, Embedder, Embeddings};
use aura_runtime::events::Event;
use aura_runtime::store::{
    CollectionInfo, CollectionSpec, Durability, ForeignPoints, Hit, Point, Query, StoreError,
    VectorStore,
};
use aura_runtime::{
    Dispatcher, Fenced, FencedStore, Handler, HandlerContext, HandlerError, Registry, Settings,
};

use crate::mode::{ConsumerMode, consumer_mode};
use crate::ops::{Ops, celery_probe, kafka_probe};
use crate::publish::with_fallback;
use crate::{configured_registry, handler_context};

/// Runs until `shutdown` resolves. `kafka`: consume and handle; `disabled`: consume and commit nothing;
/// `celery`: handle nothing here (the Celery worker does) — Kafka's backlog stays at the committed offsets.
pub async fn run(
    settings: Settings,
    mut options: ConsumerOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Option<ConsumerReport>> {
    let registry = Arc::new(configured_registry(&settings)?);
    let backend = settings.messaging_backend;
    let mut ops = Ops::start("vectordb-consumer", &settings, &registry).await?;
    options.observer = Some(ops.observer());
    metrics::gauge!("aura360_messaging_backend").set(backend.gauge());
    tracing::info!(
        messaging_backend = backend.as_str(),
        enabled = %registry.enabled().join(","),
        disabled = %registry.disabled().join(","),
        group = %settings.kafka.group_id,
        "vectordb-consumer starting"
    );
    match consumer_mode(&settings) {
        ConsumerMode::Consume => {}
        ConsumerMode::ForwardToCelery => {
            return forward_to_celery(&settings, &mut ops, options, shutdown)
                .await
                .map(Some);
        }
        ConsumerMode::IdleForCelery => {
            tracing::warn!(
                "MESSAGING_BACKEND=celery with KAFKA_DRAIN_TO_CELERY=false: this consumer handles nothing; events are \
                 processed by vectordb-worker. Kafka's backlog stays uncommitted in group {} and is picked up when \
                 switching back",
                settings.kafka.group_id
            );
            ops.set_idle("MESSAGING_BACKEND=celery, KAFKA_DRAIN_TO_CELERY=false: handling nothing; vectordb-worker does");
            shutdown.await;
            return Ok(None);
        }
        ConsumerMode::Disabled => {
            tracing::warn!("MESSAGING_BACKEND=disabled: consuming nothing, committing nothing");
            ops.set_idle("MESSAGING_BACKEND=disabled: consuming nothing, committing nothing");
            shutdown.await;
            return Ok(None);
        }
    }
    let mut context = ops.observed(handler_context(&settings, Durability::EveryWrite).await?);
    // A paused consumer writes nothing until the group has told it what it still owns (aura_runtime::fence).
    context.store = Arc::new(FencedStore::new(
        context.store,
        Fenced(options.fence.clone()),
    ));
    let publisher = KafkaPublisher::new(&settings.kafka).context("creating the Kafka producer")?;
    let outputs = with_fallback(&settings, Arc::new(publisher.clone()))?;
    let dispatcher =
        Dispatcher::new(registry.clone(), context, outputs).fenced(options.fence.clone());
    ops.watch(&settings, vec![kafka_probe(&settings)]);
    ops.health.set_ready(None);
    let report = run_consumer(
        &settings.kafka,
        registry,
        dispatcher,
        publisher.clone(),
        options,
        shutdown,
    )
    .await
    .context("running the Kafka consumer")?;
    flush_at_exit(&publisher);
    Ok(Some(report))
}

/// Stands in for a handler on the Kafka loop during a rollback to Celery: hands its event on unchanged, so the
/// dispatcher publishes it — as the handler's Celery task — before the offset is committed.
struct ForwardToCelery {
    name: &'static str,
    event_types: &'static [&'static str],
}

#[async_trait::async_trait]
impl Handler for ForwardToCelery {
    fn name(&self) -> &'static str {
        self.name
    }

    fn event_types(&self) -> &'static [&'static str] {
        self.event_types
    }

    async fn handle(&self, event: &Event, _: &HandlerContext) -> Result<Vec<Event>, HandlerError> {
        Ok(vec![event.clone()])
    }
}

/// The embedder of a process that embeds nothing (the forwarder): every call is refused.
struct NoEmbedder;

#[async_trait::async_trait]
impl Embedder for NoEmbedder {
    fn model(&self) -> &str {
        "none"
    }

    fn dimension(&self) -> usize {
        0
    }

    async fn embed(&self, _: &[String]) -> Result<Embeddings, EmbedError> {
        Err(EmbedError::Unavailable(
            "this process embeds nothing".into(),
        ))
    }
}

/// The store of a process that writes none (the forwarder): every call is refused.
struct NoStore(CollectionSpec);

#[async_trait::async_trait]
impl VectorStore for NoStore {
    fn collection(&self) -> &CollectionSpec {
        &self.0
    }

    async fn write(&self, _: Vec<Point>) -> Result<(), StoreError> {
        Err(StoreError::Unavailable(
            "this process writes no points".into(),
        ))
    }

    async fn search(&self, _: Query<'_>) -> Result<Vec<Hit>, StoreError> {
        Err(StoreError::Unavailable("this process has no store".into()))
    }

    async fn count(&self, _: Option<&str>) -> Result<u64, StoreError> {
        Err(StoreError::Unavailable("this process has no store".into()))
    }

    async fn info(&self) -> Result<CollectionInfo, StoreError> {
        Err(StoreError::Unavailable("this process has no store".into()))
    }

    async fn foreign_points(&self, _: &[String]) -> Result<Option<ForeignPoints>, StoreError> {
        Err(StoreError::Unavailable("this process has no store".into()))
    }
}

/// `MESSAGING_BACKEND=celery` (docs/design.md §3): every event on the topics beyond the group's committed offsets — the
/// backlog at the switch, and whatever producers still send to Kafka — becomes its Celery task, then its offset is
/// committed. Same loop, same guarantees as the Kafka mode: a task is pushed to Redis before its offset is stored; a
/// Redis outage retries in place; disabled handlers keep their topics untouched; undecodable records go to `.dlq`.
async fn forward_to_celery(
    settings: &Settings,
    ops: &mut Ops,
    options: ConsumerOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<ConsumerReport> {
    let mut registry = crate::standard_registry()
        .handlers()
        .map(|handler| ForwardToCelery {
            name: handler.name(),
            event_types: handler.event_types(),
        })
        .fold(Registry::new(), Registry::with);
    registry
        .disable(&settings.disabled_handlers)
        .context("DISABLED_HANDLERS")?;
    let registry = Arc::new(registry);
    let broker = Arc::new(crate::clients::celery_broker(settings)?);
    let publisher = Arc::new(CeleryPublisher::new(
        broker.clone(),
        settings.celery.publish_queue(),
    ));
    tracing::warn!(
        group = %settings.kafka.group_id,
        queue = settings.celery.publish_queue(),
        broker = %settings.celery.broker_url,
        "MESSAGING_BACKEND=celery: forwarding Kafka's backlog (and anything still produced to Kafka) as Celery tasks; \
         KAFKA_DRAIN_TO_CELERY=false or --no-drain turns this off"
    );
    // Forwarding touches no store, and must not lock the embedded one a worker on this host may be using.
    let context = HandlerContext {
        store: Arc::new(NoStore(CollectionSpec {
            name: settings.qdrant.collection.clone(),
            dimension: settings.embedding.dimension,
            distance: settings.qdrant.distance,
        })),
        // Nor any embedder: a forwarded event is never embedded here (no model is loaded for it).
        embedder: Arc::new(NoEmbedder),
        embedding_version: settings.embedding.version.clone(),
        limits: settings.limits,
    };
    let dispatcher = Dispatcher::new(registry.clone(), context, publisher);
    let dead_letters = KafkaPublisher::new(&settings.kafka)
        .context("creating the Kafka producer for dead letters")?;
    ops.watch(
        settings,
        vec![
            kafka_probe(settings),
            celery_probe(
                settings,
                broker,
                vec![settings.celery.publish_queue().to_owned()],
            ),
        ],
    );
    ops.health.set_ready(Some(
        "forwarding Kafka's backlog to Celery (MESSAGING_BACKEND=celery)".into(),
    ));
    let report = run_consumer(
        &settings.kafka,
        registry,
        dispatcher,
        dead_letters.clone(),
        options,
        shutdown,
    )
    .await
    .context("forwarding the Kafka backlog to Celery")?;
    flush_at_exit(&dead_letters);
    Ok(report)
}

/// Waits up to a second for what the producer still holds (its dead letters, its outputs) to be delivered.
fn flush_at_exit(producer: &KafkaPublisher) {
    if let Err(error) = producer.flush(Duration::from_secs(1)) {
        tracing::warn!(%error, "producer flush at exit");
    }
}
