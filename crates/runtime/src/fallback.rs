//! `MESSAGING_FALLBACK`: a publisher that sends to its primary backend and, when that fails or is too slow, to a
//! fallback one — behind a circuit breaker, so an outage costs each event nothing once it is known.
//!
//! The breaker is closed (try the primary) until `failures_to_open` consecutive failures; then open (straight to the
//! fallback) for `open_for`; then one event at a time probes the primary (half-open): a success closes it, a failure
//! opens it again. A primary send that timed out may still be delivered later by the client library: the event then
//! arrives twice, once per backend, which is harmless — point ids derive from the event id (docs/design.md §4).

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aura_events::Event;

use crate::{Backend, PublishError, Publisher};

/// The `reason` label of `aura360_publish_fallback_total`: the primary failed, timed out, or its circuit was open.
pub const REASONS: [&str; 3] = ["error", "timeout", "circuit_open"];

pub struct FallbackPublisher {
    primary: Arc<dyn Publisher>,
    fallback: Arc<dyn Publisher>,
    timeout: Duration,
    breaker: Mutex<Breaker>,
}

struct Breaker {
    failures_to_open: u32,
    open_for: Duration,
    consecutive_failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// What the breaker lets an event do.
#[derive(Debug, PartialEq, Eq)]
enum Try {
    Primary,
    /// The one event testing the primary after the open period.
    Probe,
    Fallback,
}

impl Breaker {
    fn admit(&mut self, now: Instant) -> Try {
        match self.open_until {
            None => Try::Primary,
            Some(until) if now < until || self.probing => Try::Fallback,
            Some(_) => {
                self.probing = true;
                Try::Probe
            }
        }
    }

    /// Returns true when this success closed an open circuit.
    fn succeeded(&mut self) -> bool {
        let was_open = self.open_until.is_some();
        self.consecutive_failures = 0;
        self.open_until = None;
        self.probing = false;
        was_open
    }

    /// Returns true when this failure opened the circuit.
    fn failed(&mut self, now: Instant) -> bool {
        self.consecutive_failures += 1;
        self.probing = false;
        let was_open = self.open_until.is_some();
        if was_open || self.consecutive_failures >= self.failures_to_open {
            self.open_until = Some(now + self.open_for);
        }
        !was_open && self.open_until.is_some()
    }
}

impl FallbackPublisher {
    pub fn new(
        primary: Arc<dyn Publisher>,
        fallback: Arc<dyn Publisher>,
        timeout: Duration,
        failures_to_open: u32,
        open_for: Duration,
    ) -> Self {
        Self {
            primary,
            fallback,
            timeout,
            breaker: Mutex::new(Breaker {
                failures_to_open: failures_to_open.max(1),
                open_for,
                consecutive_failures: 0,
                open_until: None,
                probing: false,
            }),
        }
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn to_fallback(
        &self,
        event: &Event,
        reason: &'static str,
    ) -> Result<Backend, PublishError> {
        let backend = self.fallback.publish_via(event).await?;
        metrics::counter!("aura360_publish_fallback_total", "from" => self.primary.backend().as_str(),
            "to" => backend.as_str(), "reason" => reason)
        .increment(1);
        Ok(backend)
    }
}

/// Resets `probing` when a probe's future is dropped before it got an answer.
struct ProbeGuard<'a> {
    publisher: &'a FallbackPublisher,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.publisher.breaker().probing = false;
        }
    }
}

#[async_trait]
impl Publisher for FallbackPublisher {
    fn backend(&self) -> Backend {
        self.primary.backend()
    }

    async fn publish(&self, event: &Event) -> Result<(), PublishError> {
        self.publish_via(event).await.map(|_| ())
    }

    async fn publish_via(&self, event: &Event) -> Result<Backend, PublishError> {
        self.send(event, None).await
    }

    async fn publish_encoded(&self, event: &Event, json: &[u8]) -> Result<Backend, PublishError> {
        self.send(event, Some(json)).await
    }
}

impl FallbackPublisher {
    /// The primary while its circuit is closed (or for a probe), else the fallback.
    async fn send(&self, event: &Event, json: Option<&[u8]>) -> Result<Backend, PublishError> {
        let admitted = self.breaker().admit(Instant::now());
        if admitted == Try::Fallback {
            return self.to_fallback(event, REASONS[2]).await;
        }
        // A probe whose caller goes away mid-flight (a cancelled request, a shutdown) must not leave the circuit
        // waiting for its answer forever: the guard lets the next event probe instead.
        let mut probe = ProbeGuard {
            publisher: self,
            armed: admitted == Try::Probe,
        };
        let primary = async {
            match json {
                Some(json) => self.primary.publish_encoded(event, json).await,
                None => self.primary.publish_via(event).await,
            }
        };
        let sent = tokio::time::timeout(self.timeout, primary).await;
        probe.armed = false;
        let reason = match sent {
            Ok(Ok(backend)) => {
                if self.breaker().succeeded() {
                    tracing::info!(
                        primary = self.primary.backend().as_str(),
                        "primary backend takes events again: circuit closed"
                    );
                }
                return Ok(backend);
            }
            // The event itself is refused (no topic for its type, too large): another backend will not fix that.
            Ok(Err(error)) if !error.is_transient() => return Err(error),
            Ok(Err(error)) => {
                tracing::warn!(%error, event_id = %event.event_id, "primary publish failed; using the fallback");
                REASONS[0]
            }
            Err(_) => {
                tracing::warn!(event_id = %event.event_id, timeout_ms = self.timeout.as_millis() as u64,
                    "primary publish timed out; using the fallback");
                REASONS[1]
            }
        };
        if self.breaker().failed(Instant::now()) {
            tracing::warn!(
                primary = self.primary.backend().as_str(),
                fallback = self.fallback.backend().as_str(),
                open_s = self.breaker().open_for.as_secs(),
                "circuit open: publishing to the fallback"
            );
        }
        self.to_fallback(event, reason).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use super::*;

    /// A backend that is up or down on demand and counts what it took.
    struct Switchable {
        backend: Backend,
        up: AtomicBool,
        /// Never answer (a broker that accepted the connection and went silent).
        stall: AtomicBool,
        taken: AtomicU32,
        tried: AtomicU32,
    }

    impl Switchable {
        fn new(backend: Backend) -> Arc<Self> {
            Arc::new(Self {
                backend,
                up: AtomicBool::new(true),
                stall: AtomicBool::new(false),
                taken: AtomicU32::new(0),
                tried: AtomicU32::new(0),
            })
        }
    }

    #[async_trait]
    impl Publisher for Switchable {
        fn backend(&self) -> Backend {
            self.backend
        }

        async fn publish(&self, event: &Event) -> Result<(), PublishError> {
            self.tried.fetch_add(1, Ordering::SeqCst);
            if self.stall.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if self.up.load(Ordering::SeqCst) {
                self.taken.fetch_add(1, Ordering::SeqCst);
                Ok(())
            } else {
                Err(PublishError::Unavailable {
                    backend: self.backend.as_str(),
                    event_type: event.event_type.clone(),
                    event_id: event.event_id.to_string(),
                    reason: "down".into(),
                })
            }
        }
    }

    /// A Kafka and a Celery that can be switched off, and the publisher over them: `timeout` per try, open after
    /// `failures`, a probe after `open_ms`.
    fn switchable_pair(
        timeout: Duration,
        failures: u32,
        open_ms: u64,
    ) -> (Arc<Switchable>, Arc<Switchable>, FallbackPublisher) {
        let (kafka, celery) = (
            Switchable::new(Backend::Kafka),
            Switchable::new(Backend::Celery),
        );
        let publisher = FallbackPublisher::new(
            kafka.clone(),
            celery.clone(),
            timeout,
            failures,
            Duration::from_millis(open_ms),
        );
        (kafka, celery, publisher)
    }

    #[tokio::test]
    async fn opens_after_repeated_failures_and_closes_after_a_good_probe() {
        let (kafka, celery, publisher) = switchable_pair(Duration::from_secs(1), 3, 100);
        let event = Event::new("context.aggregated", Some("u1".into()), None);
        assert_eq!(publisher.publish_via(&event).await, Ok(Backend::Kafka));

        kafka.up.store(false, Ordering::SeqCst);
        for _ in 0..10 {
            assert_eq!(publisher.publish_via(&event).await, Ok(Backend::Celery));
        }
        // Three tries opened the circuit; the other seven went straight to Celery.
        assert_eq!(kafka.tried.load(Ordering::SeqCst), 1 + 3);
        assert_eq!(celery.taken.load(Ordering::SeqCst), 10);

        // Still down at the probe: open again, one more try only.
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(publisher.publish_via(&event).await, Ok(Backend::Celery));
        assert_eq!(publisher.publish_via(&event).await, Ok(Backend::Celery));
        assert_eq!(kafka.tried.load(Ordering::SeqCst), 5);

        // Back: the next probe closes it and everything goes to Kafka.
        kafka.up.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(120)).await;
        for _ in 0..5 {
            assert_eq!(publisher.publish_via(&event).await, Ok(Backend::Kafka));
        }
        assert_eq!(kafka.taken.load(Ordering::SeqCst), 6);
        assert_eq!(celery.taken.load(Ordering::SeqCst), 12);
    }

    #[tokio::test]
    async fn a_refused_event_is_not_sent_elsewhere() {
        struct Refusing;
        #[async_trait]
        impl Publisher for Refusing {
            fn backend(&self) -> Backend {
                Backend::Kafka
            }
            async fn publish(&self, event: &Event) -> Result<(), PublishError> {
                Err(PublishError::Unroutable {
                    event_type: event.event_type.clone(),
                    event_id: event.event_id.to_string(),
                    reason: "no topic".into(),
                })
            }
        }
        let celery = Switchable::new(Backend::Celery);
        let publisher = FallbackPublisher::new(
            Arc::new(Refusing),
            celery.clone(),
            Duration::from_secs(1),
            1,
            Duration::from_secs(60),
        );
        let event = Event::new("x.unknown", None, None);
        assert!(publisher.publish(&event).await.is_err());
        assert_eq!(celery.tried.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_probe_cancelled_mid_flight_does_not_leave_the_circuit_open() {
        let (kafka, _celery, publisher) = switchable_pair(Duration::from_secs(5), 1, 50);
        let event = Event::new("context.aggregated", Some("u1".into()), None);
        kafka.up.store(false, Ordering::SeqCst);
        assert_eq!(publisher.publish_via(&event).await, Ok(Backend::Celery));
        tokio::time::sleep(Duration::from_millis(80)).await;
        // The probe's caller gives up (a request timeout) while Kafka does not answer.
        kafka.stall.store(true, Ordering::SeqCst);
        let cancelled =
            tokio::time::timeout(Duration::from_millis(20), publisher.publish_via(&event)).await;
        assert!(cancelled.is_err(), "the probe was cancelled mid-flight");
        kafka.stall.store(false, Ordering::SeqCst);
        kafka.up.store(true, Ordering::SeqCst);
        // Kafka is back: the next event probes it and closes the circuit.
        assert_eq!(publisher.publish_via(&event).await, Ok(Backend::Kafka));
        assert_eq!(publisher.publish_via(&event).await, Ok(Backend::Kafka));
    }
}
