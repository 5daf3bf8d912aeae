//! `vectordb-consumer`: the handlers on the Kafka consumer group, in the mode `MESSAGING_BACKEND` names (DESIGN §5).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use aura_kafka::{ConsumerOptions, ConsumerReport, KafkaPublisher, run_consumer};
use aura_runtime::store::Durability;
use aura_runtime::{Backend, Dispatcher, Settings};

use crate::{configured_registry, handler_context};

/// Runs until `shutdown` resolves. `kafka`: consume and handle; `disabled`: consume and commit nothing;
/// `celery`: handle nothing here (the Celery worker does) — Kafka's backlog stays at the committed offsets.
pub async fn run(
    settings: Settings,
    options: ConsumerOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Option<ConsumerReport>> {
    let registry = Arc::new(configured_registry(&settings)?);
    let backend = settings.messaging_backend;
    metrics::gauge!("aura360_messaging_backend").set(backend.gauge());
    tracing::info!(
        messaging_backend = backend.as_str(),
        enabled = %registry.enabled().join(","),
        disabled = %registry.disabled().join(","),
        group = %settings.kafka.group_id,
        "vectordb-consumer starting"
    );
    match backend {
        Backend::Kafka => {}
        Backend::Celery => {
            tracing::warn!(
                "MESSAGING_BACKEND=celery: this consumer handles nothing; events are processed by vectordb-worker. \
                 Kafka's backlog stays uncommitted in group {} and is picked up when switching back",
                settings.kafka.group_id
            );
            shutdown.await;
            return Ok(None);
        }
        Backend::Disabled | Backend::Memory => {
            tracing::warn!("MESSAGING_BACKEND=disabled: consuming nothing, committing nothing");
            shutdown.await;
            return Ok(None);
        }
    }
    let context = handler_context(&settings, Durability::EveryWrite).await?;
    let publisher = KafkaPublisher::new(&settings.kafka).context("creating the Kafka producer")?;
    let dispatcher = Dispatcher::new(registry.clone(), context, Arc::new(publisher.clone()));
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
    if let Err(error) = publisher.flush(Duration::from_secs(1)) {
        tracing::warn!(%error, "producer flush at exit");
    }
    Ok(Some(report))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
