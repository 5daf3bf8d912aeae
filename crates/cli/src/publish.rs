//! `vectordb publish`: events from a JSONL stream (or one built from flags) through the configured backend.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::sync::Arc;

use aura_runtime::events::Event;
use aura_runtime::{Publisher, Settings, publish_event_via};
use futures::StreamExt as _;
use serde::Serialize;

/// Events in flight at once (each waits for the broker's acknowledgement).
const IN_FLIGHT: usize = 512;

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PublishSummary {
    /// The configured backend.
    pub backend: &'static str,
    pub published: u64,
    /// How many each backend took (with `MESSAGING_FALLBACK`, some may have gone to the fallback).
    pub by_backend: BTreeMap<&'static str, u64>,
    pub by_type: BTreeMap<String, u64>,
    /// Lines that are not events, and events the backend refused: `line N: reason`.
    pub failed: Vec<String>,
}

/// The publisher `MESSAGING_BACKEND` names (with `MESSAGING_FALLBACK` behind it).
pub fn configured_publisher(settings: &Settings) -> anyhow::Result<Arc<dyn Publisher>> {
    use aura_runtime::Backend;
    Ok(match settings.messaging_backend {
        Backend::Kafka => with_fallback(
            settings,
            Arc::new(aura_kafka::KafkaPublisher::new(&settings.kafka)?),
        )?,
        Backend::Disabled | Backend::Memory => Arc::new(aura_runtime::DisabledPublisher::new()),
        Backend::Celery => Arc::new(aura_celery::CeleryPublisher::new(
            Arc::new(crate::clients::celery_broker(settings)?),
            settings.celery.publish_queue(),
        )),
    })
}

/// `primary` behind the `MESSAGING_FALLBACK` circuit breaker, or `primary` itself when no fallback is set.
pub fn with_fallback(
    settings: &Settings,
    primary: Arc<dyn Publisher>,
) -> anyhow::Result<Arc<dyn Publisher>> {
    let fallback = &settings.fallback;
    let Some(aura_runtime::Backend::Celery) = fallback.backend else {
        return Ok(primary);
    };
    let celery = Arc::new(aura_celery::CeleryPublisher::new(
        Arc::new(crate::clients::celery_broker(settings)?),
        settings.celery.publish_queue(),
    ));
    tracing::info!(
        primary = primary.backend().as_str(),
        fallback = "celery",
        queue = settings.celery.publish_queue(),
        timeout_ms = fallback.timeout.as_millis() as u64,
        "MESSAGING_FALLBACK=celery: events Kafka does not take go to Celery"
    );
    Ok(Arc::new(aura_runtime::FallbackPublisher::new(
        primary,
        celery,
        fallback.timeout,
        fallback.failures_to_open,
        fallback.open_for,
    )))
}

/// Publishes every line of `input` (one JSON event per line; blank lines ignored) as it arrives — a stream piped into
/// `vectordb publish --events -` is sent while it is being written — many in flight, results in input order.
pub async fn publish_lines(
    publisher: &dyn Publisher,
    input: impl BufRead + Send + 'static,
    mut progress: impl FnMut(u64),
) -> std::io::Result<PublishSummary> {
    let mut summary = PublishSummary {
        backend: publisher.backend().as_str(),
        ..PublishSummary::default()
    };
    // Lines are read on a blocking thread (stdin may be a pipe that is written slowly).
    let (tx, rx) = tokio::sync::mpsc::channel::<(usize, std::io::Result<Vec<u8>>)>(IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        for (index, line) in input.split(b'\n').enumerate() {
            let failed = line.is_err();
            if tx.blocking_send((index + 1, line)).is_err() || failed {
                return;
            }
        }
    });
    let lines = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let results = lines
        .map(|(line, bytes)| async move {
            let bytes = bytes?;
            let text = bytes.trim_ascii();
            if text.is_empty() {
                return Ok((line, None));
            }
            let outcome = match Event::from_slice(text) {
                Ok(event) => {
                    let result = publish_event_via(publisher, &event)
                        .await
                        .map_err(|e| e.to_string());
                    Ok((event.event_type, result))
                }
                Err(error) => Err(error.to_string()),
            };
            Ok::<_, std::io::Error>((line, Some(outcome)))
        })
        .buffered(IN_FLIGHT);
    let mut results = std::pin::pin!(results);
    while let Some(item) = results.next().await {
        let (line, outcome) = item?;
        match outcome {
            None => {}
            Some(Ok((event_type, Ok(backend)))) => {
                summary.published += 1;
                *summary.by_backend.entry(backend.as_str()).or_default() += 1;
                *summary.by_type.entry(event_type).or_default() += 1;
                progress(summary.published);
            }
            Some(Ok((_, Err(error)))) | Some(Err(error)) => {
                summary.failed.push(format!("line {line}: {error}"))
            }
        }
    }
    Ok(summary)
}
