//! `publish_event`: how a produced event leaves the process, whatever the backend.

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use aura_events::Event;

/// The messaging backend a process runs on (`MESSAGING_BACKEND`), plus the in-process bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    Kafka,
    Celery,
    Disabled,
    Memory,
}

impl Backend {
    /// The values `MESSAGING_BACKEND` accepts.
    pub const CONFIGURABLE: [&'static str; 3] = ["kafka", "celery", "disabled"];

    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "kafka" => Some(Self::Kafka),
            "celery" => Some(Self::Celery),
            "disabled" => Some(Self::Disabled),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kafka => "kafka",
            Self::Celery => "celery",
            Self::Disabled => "disabled",
            Self::Memory => "memory",
        }
    }

    /// The value of the `aura360_messaging_backend` gauge (docs/design.md §6).
    pub fn gauge(self) -> f64 {
        match self {
            Self::Kafka => 1.0,
            Self::Celery => 2.0,
            Self::Disabled | Self::Memory => 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The broker did not take the event (down, timed out, refused): retry.
    #[error("publishing {event_type} {event_id} via {backend} failed: {reason}")]
    Unavailable {
        backend: &'static str,
        event_type: String,
        event_id: String,
        reason: String,
    },
    /// The event cannot be published anywhere (no topic or task for its type).
    #[error("cannot publish {event_type} {event_id}: {reason}")]
    Unroutable {
        event_type: String,
        event_id: String,
        reason: String,
    },
}

impl PublishError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

#[async_trait]
pub trait Publisher: Send + Sync {
    fn backend(&self) -> Backend;
    /// Sends one event and returns once the backend has accepted it (never fire-and-forget).
    async fn publish(&self, event: &Event) -> Result<(), PublishError>;

    /// [`Publisher::publish`], returning the backend that took the event (a fallback publisher's may differ from
    /// [`Publisher::backend`]).
    async fn publish_via(&self, event: &Event) -> Result<Backend, PublishError> {
        self.publish(event).await.map(|()| self.backend())
    }

    /// [`Publisher::publish_via`] for an event whose JSON the caller already has (`json` is `event.to_vec()`): a
    /// backend that sends the event's own JSON (Kafka) uses it instead of serialising the event again.
    async fn publish_encoded(&self, event: &Event, json: &[u8]) -> Result<Backend, PublishError> {
        let _ = json;
        self.publish_via(event).await
    }

    /// Hands the event (`json` is `event.to_vec()`) to the backend and returns once it is queued behind everything
    /// handed over before it; the [`Acknowledgement`] resolves when the backend has accepted it. A backend that
    /// keeps order among queued records (Kafka's idempotent producer, per partition) lets the caller start its
    /// next event before this one is acknowledged. The default publishes and waits: the acknowledgement is ready.
    async fn hand_over(&self, event: &Event, json: &[u8]) -> Result<Acknowledgement, PublishError> {
        let sent = self.publish_encoded(event, json).await;
        Ok(Box::pin(std::future::ready(sent)))
    }
}

/// The backend's answer to an event handed over ([`Publisher::hand_over`]): the backend that took it, or why not.
pub type Acknowledgement = futures::future::BoxFuture<'static, Result<Backend, PublishError>>;

/// Publishes through `publisher` and counts it in `aura360_events_published_total{backend,event_type}` under the
/// backend that took it.
pub async fn publish_event(publisher: &dyn Publisher, event: &Event) -> Result<(), PublishError> {
    publish_event_via(publisher, event).await.map(drop)
}

/// [`publish_event`], returning the backend that took the event (behind a fallback, not always the configured one).
pub async fn publish_event_via(
    publisher: &dyn Publisher,
    event: &Event,
) -> Result<Backend, PublishError> {
    let backend = publisher.publish_via(event).await?;
    count_published(backend, event);
    Ok(backend)
}

/// [`Publisher::hand_over`]; the event is counted as [`publish_event`] counts it once it is acknowledged.
pub async fn hand_over_event(
    publisher: &dyn Publisher,
    event: &Event,
    json: &[u8],
) -> Result<Acknowledgement, PublishError> {
    let acknowledgement = publisher.hand_over(event, json).await?;
    let event_type = event.event_type.clone();
    Ok(Box::pin(async move {
        let backend = acknowledgement.await?;
        count_published_type(backend, event_type);
        Ok(backend)
    }))
}

fn count_published(backend: Backend, event: &Event) {
    count_published_type(backend, event.event_type.clone());
}

fn count_published_type(backend: Backend, event_type: String) {
    metrics::counter!(
        "aura360_events_published_total",
        "backend" => backend.as_str(),
        "event_type" => event_type
    )
    .increment(1);
}

/// `MESSAGING_BACKEND=disabled`: events are logged and counted, not sent.
#[derive(Debug, Default)]
pub struct DisabledPublisher {
    dropped: AtomicU64,
}

impl DisabledPublisher {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many events this publisher was asked to send.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Publisher for DisabledPublisher {
    fn backend(&self) -> Backend {
        Backend::Disabled
    }

    async fn publish(&self, event: &Event) -> Result<(), PublishError> {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            event_id = %event.event_id,
            event_type = %event.event_type,
            "messaging disabled: event not sent"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_disabled_publisher_counts_and_sends_nothing() {
        let publisher = DisabledPublisher::new();
        let event = Event::new("context.aggregated", Some("u1".into()), None);
        publish_event(&publisher, &event).await.unwrap();
        publish_event(&publisher, &event).await.unwrap();
        assert_eq!(publisher.dropped(), 2);
        assert_eq!(publisher.backend().gauge(), 0.0);
        assert_eq!(Backend::parse(" Celery ").map(Backend::gauge), Some(2.0));
        assert_eq!(Backend::parse("rabbit"), None);
    }
}
