//! `vectordb-worker`: the handlers on Celery queues, in the mode `MESSAGING_BACKEND` names (docs/design.md §3).

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use aura_celery::{CeleryPublisher, CeleryWorker, WorkerOptions, WorkerReport};
use aura_runtime::store::Durability;
use aura_runtime::{Backend, Dispatcher, Fenced, FencedStore, Publisher, Settings};

use crate::clients::{celery_broker, result_backend};
use crate::mode::{WorkerMode, worker_mode};
use crate::ops::{Ops, celery_probe};
use crate::publish::with_fallback;
use crate::{configured_registry, handler_context};

/// Runs until `shutdown` resolves. `celery`: consume, publish next events as tasks; `kafka`: consume, publish next
/// events to Kafka; `disabled`: consume nothing.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Option<WorkerReport>> {
    let registry = Arc::new(configured_registry(&settings)?);
    let backend = settings.messaging_backend;
    let mut ops = Ops::start("vectordb-worker", &settings, &registry).await?;
    metrics::gauge!("aura360_messaging_backend").set(backend.gauge());
    let options = WorkerOptions::from(&settings);
    tracing::info!(
        messaging_backend = backend.as_str(),
        enabled = %registry.enabled().join(","),
        disabled = %registry.disabled().join(","),
        broker = %settings.celery.broker_url,
        result_backend = %settings.celery.result_backend,
        queues = %options.queues.join(","),
        "vectordb-worker starting"
    );
    if worker_mode(&settings) == WorkerMode::Disabled {
        tracing::warn!("MESSAGING_BACKEND=disabled: consuming nothing; tasks stay on their queues");
        ops.set_idle("MESSAGING_BACKEND=disabled: consuming nothing; tasks stay on their queues");
        shutdown.await;
        return Ok(None);
    }
    let broker = Arc::new(celery_broker(&settings)?);
    let results = Arc::new(result_backend(&settings)?);
    let publisher: Arc<dyn Publisher> = match backend {
        Backend::Kafka => with_fallback(
            &settings,
            Arc::new(
                aura_kafka::KafkaPublisher::new(&settings.kafka)
                    .context("creating the Kafka producer")?,
            ),
        )?,
        _ => Arc::new(CeleryPublisher::new(
            broker.clone(),
            settings.celery.publish_queue(),
        )),
    };
    let mut context = ops.observed(handler_context(&settings, Durability::EveryWrite).await?);
    // A paused worker writes nothing until it has checked which of its messages another worker took over
    // (aura_runtime::fence).
    context.store = Arc::new(FencedStore::new(
        context.store,
        Fenced(options.fence.clone()),
    ));
    let dispatcher =
        Dispatcher::new(registry.clone(), context, publisher).fenced(options.fence.clone());
    ops.watch(
        &settings,
        vec![celery_probe(
            &settings,
            broker.clone(),
            options.queues.clone(),
        )],
    );
    ops.health.set_ready(None);
    let report = CeleryWorker::new(broker, results, registry, dispatcher, options)
        .with_observer(ops.observer())
        .run(shutdown)
        .await
        .context("running the Celery worker")?;
    Ok(Some(report))
}
