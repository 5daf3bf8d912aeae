//! One event through its handler: route, handle, publish the outputs, classify the outcome.
//!
//! Publishing happens here, before `dispatch` returns `Ok`, so a mount that acknowledges on `Ok` never acknowledges
//! an input whose outputs were not accepted by the broker, nor one whose points ([`HandlerContext::write_points`])
//! are not durable. A handler's writes are settled with its outputs' acknowledgements; an event that has outputs
//! hands them over only once its writes are durable. All outputs of one event are sent at once and their
//! acknowledgements awaited together. [`Dispatcher::hand_over`] stops halfway: the outputs are queued in the
//! producer and their acknowledgements come back as [`Pending`], which the Kafka mount settles in order while the
//! key's next event already runs (the input is committed only once `Pending::settle` succeeded). Outputs get ids and timestamps derived from their cause
//! ([`derive_identities`]), so a retry or a redelivery re-publishes the same events, byte for byte; downstream point
//! ids derive from the origin event id and chunk index, so the duplicates overwrite instead of adding points.

use std::sync::Arc;
use std::time::Instant;

use aura_events::Event;

use crate::fence::{FENCE_WAIT, Fence};
use crate::handler::collecting_writes;
use crate::store::Durable;
use crate::{
    Acknowledgement, HandlerContext, HandlerError, PublishError, Publisher, Registry, RetryPolicy,
    Route, hand_over_event,
};

/// What happened to an event that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled; `produced` events were published.
    Handled {
        handler: &'static str,
        produced: usize,
    },
    /// No handler for this type: acknowledge and move on (counted).
    Unhandled,
    /// Its handler is disabled: the mount must keep the input.
    Disabled { handler: &'static str },
}

/// A failed event: which handler, and why (transient or permanent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {error}", handler.unwrap_or("decode"))]
pub struct Failure {
    pub handler: Option<&'static str>,
    pub error: HandlerError,
}

/// An input that could not be processed, with everything needed to look at it and replay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Where it came from: `line 12`, `topic/partition/offset`, a task id.
    pub source: String,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub handler: Option<String>,
    pub error: String,
    /// The original bytes, unchanged.
    pub payload: Vec<u8>,
}

#[derive(Clone)]
pub struct Dispatcher {
    registry: Arc<Registry>,
    context: HandlerContext,
    publisher: Arc<dyn Publisher>,
    /// Open unless the process was paused and has not yet cleared what it owns (`crate::fence`).
    fence: Fence,
}

impl Dispatcher {
    pub fn new(
        registry: Arc<Registry>,
        context: HandlerContext,
        publisher: Arc<dyn Publisher>,
    ) -> Self {
        Self {
            registry,
            context,
            publisher,
            fence: Fence::new(),
        }
    }

    /// Starts no handler and publishes nothing while `fence` is closed (a transient failure each time).
    pub fn fenced(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    /// One attempt: handle the event and publish its outputs.
    pub async fn dispatch(&self, event: &Event) -> Result<Outcome, Failure> {
        let (outcome, pending) = self.hand_over(event).await?;
        pending.settle().await?;
        Ok(outcome)
    }

    /// One attempt up to the hand-over: handle the event and queue its outputs in the publisher. The outcome is
    /// final only once the returned [`Pending`] settles.
    pub async fn hand_over(&self, event: &Event) -> Result<(Outcome, Pending), Failure> {
        let handler = match self.registry.route(&event.event_type) {
            Route::Handler(handler) => handler,
            Route::Disabled(name) => {
                record(name, outcome::DISABLED);
                return Ok((Outcome::Disabled { handler: name }, Pending::nothing()));
            }
            Route::Unhandled => {
                tracing::info!(event_id = %event.event_id, event_type = %event.event_type, "no handler for event type; skipped");
                count_skipped();
                return Ok((Outcome::Unhandled, Pending::nothing()));
            }
        };
        let name = handler.name();
        let started = Instant::now();
        let result = self.handle_and_hand_over(handler.as_ref(), event).await;
        metrics::histogram!("aura360_handler_duration_seconds", "handler" => name)
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok((acknowledgements, writes)) => Ok((
                Outcome::Handled {
                    handler: name,
                    produced: acknowledgements.len(),
                },
                Pending {
                    handler: Some(name),
                    acknowledgements,
                    writes,
                },
            )),
            Err(error) => Err(failed(name, error)),
        }
    }

    /// Attempts until success, a permanent failure, or the policy gives up on a transient one.
    pub async fn dispatch_with_retry(
        &self,
        event: &Event,
        policy: &RetryPolicy,
    ) -> Result<Outcome, Failure> {
        let mut attempt = 1;
        loop {
            match self.dispatch(event).await {
                Err(failure) if failure.error.is_transient() && !policy.gives_up_after(attempt) => {
                    let delay = policy.delay(attempt);
                    tracing::warn!(
                        event_id = %event.event_id, handler = failure.handler.unwrap_or("-"), attempt,
                        retry_in_ms = delay.as_millis() as u64, error = %failure.error, "transient failure; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn handle_and_hand_over(
        &self,
        handler: &dyn crate::Handler,
        event: &Event,
    ) -> Result<(Vec<Acknowledgement>, Vec<Durable>), HandlerError> {
        self.fence
            .wait_open(FENCE_WAIT)
            .await
            .map_err(HandlerError::Transient)?;
        let (outputs, mut writes) = collecting_writes(handler.handle(event, &self.context)).await;
        let mut outputs = outputs?;
        if outputs.is_empty() {
            return Ok((Vec::new(), writes));
        }
        // An output may tell its consumers that the points exist: it goes out only once they are durable.
        for written in futures::future::join_all(writes.drain(..)).await {
            written?;
        }
        derive_identities(event, &mut outputs);
        // Every output must fit before any is sent: a broker would refuse the oversized one only after the others
        // went out, and the same would happen on every retry. The JSON measured is the JSON sent.
        let limit = self.context.limits.max_event_bytes;
        let mut encoded = Vec::with_capacity(outputs.len());
        for output in &outputs {
            let json = output.to_vec();
            if json.len() > limit {
                return Err(HandlerError::Permanent(format!(
                    "the {} event it produced is {} bytes, over MAX_EVENT_BYTES={limit} (lower \
                     MAX_CHUNKS_PER_EVENT or MAX_EMBED_CHARS, or raise MAX_EVENT_BYTES with the broker's limit)",
                    output.event_type,
                    json.len()
                )));
            }
            encoded.push(json);
        }
        self.fence
            .wait_open(FENCE_WAIT)
            .await
            .map_err(HandlerError::Transient)?;
        // All outputs are handed over together and their acknowledgements awaited together: one round trip to the
        // broker per event, not one per output. (A queueing publisher such as Kafka's takes each on its first poll,
        // in order; one that publishes and waits sends them concurrently.)
        let acknowledgements = futures::future::join_all(
            outputs
                .iter()
                .zip(&encoded)
                .map(|(output, json)| hand_over_event(self.publisher.as_ref(), output, json)),
        )
        .await
        .into_iter()
        .map(|handed| handed.map_err(classify))
        .collect::<Result<_, _>>()?;
        Ok((acknowledgements, writes))
    }
}

/// What one event handed over and is not yet settled: its outputs' acknowledgements, and its store writes
/// ([`HandlerContext::write_points`]) that are not yet durable.
#[must_use = "an event is handled only once its outputs are acknowledged and its writes durable: settle it"]
pub struct Pending {
    /// `None` when nothing was handed over (no handler, or a disabled one).
    handler: Option<&'static str>,
    acknowledgements: Vec<Acknowledgement>,
    writes: Vec<Durable>,
}

impl Pending {
    fn nothing() -> Self {
        Self {
            handler: None,
            acknowledgements: Vec::new(),
            writes: Vec::new(),
        }
    }

    /// Waits for every acknowledgement and every write; the event's outcome is counted here (`success`, or the
    /// first error).
    pub async fn settle(self) -> Result<(), Failure> {
        let Some(name) = self.handler else {
            return Ok(());
        };
        let (acknowledged, written) = futures::future::join(
            futures::future::join_all(self.acknowledgements),
            futures::future::join_all(self.writes),
        )
        .await;
        for result in acknowledged {
            result.map_err(|e| failed(name, classify(e)))?;
        }
        for result in written {
            result.map_err(|e| failed(name, e.into()))?;
        }
        record(name, outcome::SUCCESS);
        Ok(())
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("handler", &self.handler)
            .field("acknowledgements", &self.acknowledgements.len())
            .field("writes", &self.writes.len())
            .finish()
    }
}

/// A publish error as a handler error: the broker's trouble is transient, a refused event is not.
fn classify(error: PublishError) -> HandlerError {
    if error.is_transient() {
        HandlerError::Transient(error.to_string())
    } else {
        HandlerError::Permanent(error.to_string())
    }
}

/// `handler`'s failure, counted under its outcome.
fn failed(handler: &'static str, error: HandlerError) -> Failure {
    record(
        handler,
        if error.is_transient() {
            outcome::TRANSIENT_ERROR
        } else {
            outcome::PERMANENT_ERROR
        },
    );
    Failure {
        handler: Some(handler),
        error,
    }
}

/// Gives the events a handler derived from `cause` (their `metadata.causation_id` is the cause's id, as
/// [`Event::caused_by`] sets it) ids and timestamps that depend only on the cause: the id is the UUIDv5 of
/// `<output type>/<index>` in the cause's id as namespace, the timestamp is the cause's. A handler retry or a
/// redelivery of the cause therefore publishes byte-identical events (given a deterministic handler), which
/// downstream consumers recognise as duplicates by `event_id`. Other outputs (an event forwarded as it is) keep
/// their own identity.
pub fn derive_identities(cause: &Event, outputs: &mut [Event]) {
    let cause_id = cause.event_id.to_string();
    for (index, output) in outputs.iter_mut().enumerate() {
        if output.causation_id() != Some(cause_id.as_str()) {
            continue;
        }
        output.event_id = derived_event_id(cause, &output.event_type, index);
        output.timestamp = cause.timestamp.clone();
    }
}

/// The id of the `index`-th output (of type `event_type`) of `cause`.
pub fn derived_event_id(cause: &Event, event_type: &str, index: usize) -> uuid::Uuid {
    uuid::Uuid::new_v5(&cause.event_id, format!("{event_type}/{index}").as_bytes())
}

/// The `outcome` label of `aura360_events_processed_total`.
pub mod outcome {
    pub const SUCCESS: &str = "success";
    pub const TRANSIENT_ERROR: &str = "transient_error";
    pub const PERMANENT_ERROR: &str = "permanent_error";
    pub const DISABLED: &str = "disabled";
    pub const SKIPPED: &str = "skipped";
    /// What an enabled handler's event can end as.
    pub const OF_A_HANDLER: [&str; 3] = [SUCCESS, TRANSIENT_ERROR, PERMANENT_ERROR];
    /// The `handler` label of an event no handler knows.
    pub const NO_HANDLER: &str = "none";
}

/// Counts an event no handler knows (`handler="none"`, `outcome="skipped"`). Every mount's skip is counted here:
/// the dispatcher's, the Kafka poller's for a type its header announces, the Celery worker's.
pub fn count_skipped() {
    record(outcome::NO_HANDLER, outcome::SKIPPED);
}

fn record(handler: &'static str, outcome: &'static str) {
    metrics::counter!("aura360_events_processed_total", "handler" => handler, "outcome" => outcome)
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Layered, Point, StoreError, StoreLayer, VectorStore};
    use crate::testing::{Embedded, TEST_DIM, context_with, embedded};
    use crate::{Handler, InMemoryBus};
    use async_trait::async_trait;
    use futures::FutureExt;
    use tokio::sync::Semaphore;

    /// Lets a write of the store inside count as durable only as the test allows (one permit each); a closed gate
    /// fails it.
    struct Gate(Arc<Semaphore>);

    #[async_trait]
    impl StoreLayer for Gate {
        async fn hand_over(
            &self,
            inner: &dyn VectorStore,
            points: Vec<Point>,
        ) -> Result<Durable, StoreError> {
            let written = inner.hand_over(points).await?;
            let gate = self.0.clone();
            Ok(Box::pin(async move {
                written.await?;
                match gate.acquire_owned().await {
                    Ok(permit) => {
                        permit.forget();
                        Ok(())
                    }
                    Err(_) => Err(StoreError::Unavailable("the disk is gone (test)".into())),
                }
            }))
        }
    }

    /// Writes one point per event and, for `context.aggregated`, also produces a `context.vectorized` event.
    struct WritesPoint;

    #[async_trait]
    impl Handler for WritesPoint {
        fn name(&self) -> &'static str {
            "writes_point"
        }
        fn event_types(&self) -> &'static [&'static str] {
            &["context.vectorized", "context.aggregated"]
        }
        async fn handle(
            &self,
            event: &Event,
            ctx: &HandlerContext,
        ) -> Result<Vec<Event>, HandlerError> {
            ctx.write_points(vec![Point {
                id: event.event_id,
                vector: vec![1.0; TEST_DIM],
                payload: serde_json::Map::new(),
            }])
            .await?;
            Ok(match event.event_type.as_str() {
                "context.aggregated" => vec![Event::caused_by(event, "context.vectorized")],
                _ => Vec::new(),
            })
        }
    }

    /// A dispatcher whose handler writes to a real embedded store through a [`Gate`]. The store comes first, so a
    /// test's bindings drop it (and its directory) last.
    fn gated() -> (Embedded, Dispatcher, Arc<Semaphore>, Arc<InMemoryBus>) {
        let durable = Arc::new(Semaphore::new(0));
        let store = embedded();
        let gated = Layered::new(store.store.clone(), Gate(durable.clone()));
        let bus = Arc::new(InMemoryBus::new());
        let registry = Arc::new(Registry::new().with(WritesPoint));
        let dispatcher = Dispatcher::new(registry, context_with(Arc::new(gated)), bus.clone());
        (store, dispatcher, durable, bus)
    }

    #[tokio::test]
    async fn an_event_settles_only_once_its_writes_are_durable_and_a_failed_write_fails_it() {
        let (store, dispatcher, durable, _) = gated();
        let event = Event::new("context.vectorized", Some("u1".into()), None);
        // Handed over at once: the write is queued, not durable.
        let (outcome, pending) = dispatcher.hand_over(&event).await.unwrap();
        assert!(matches!(outcome, Outcome::Handled { produced: 0, .. }));
        let mut settling = Box::pin(pending.settle());
        assert!(
            settling.as_mut().now_or_never().is_none(),
            "settled before the write was durable"
        );
        durable.add_permits(1);
        settling.await.unwrap();
        assert_eq!(store.store.count(None).await.unwrap(), 1);

        // A write that never becomes durable fails the event (transient: it runs again).
        let (_, pending) = dispatcher.hand_over(&event).await.unwrap();
        durable.close();
        let failure = pending.settle().await.unwrap_err();
        assert!(failure.error.is_transient());
        assert!(failure.error.message().contains("the disk is gone"));
    }

    #[tokio::test]
    async fn an_output_is_handed_over_only_once_the_writes_before_it_are_durable() {
        let (store, dispatcher, durable, bus) = gated();
        let event = Event::new("context.aggregated", Some("u1".into()), None);
        let mut handing = Box::pin(dispatcher.hand_over(&event));
        assert!(
            handing.as_mut().now_or_never().is_none(),
            "output handed over before the write was durable"
        );
        assert!(bus.is_empty());
        durable.add_permits(1);
        let (outcome, pending) = handing.await.unwrap();
        pending.settle().await.unwrap();
        assert!(matches!(outcome, Outcome::Handled { produced: 1, .. }));
        assert_eq!(bus.len(), 1);
        assert_eq!(store.store.count(None).await.unwrap(), 1);
    }

    #[test]
    fn derived_events_get_ids_and_timestamps_from_their_cause_and_forwarded_ones_keep_theirs() {
        let cause = Event::new("user.mood.created", Some("u1".into()), Some("t".into()));
        let outputs = || {
            vec![
                Event::caused_by(&cause, "context.aggregated"),
                Event::caused_by(&cause, "context.aggregated"),
                cause.clone(),
            ]
        };
        let (mut first, mut again) = (outputs(), outputs());
        derive_identities(&cause, &mut first);
        derive_identities(&cause, &mut again);
        assert_eq!(
            first.iter().map(Event::to_vec).collect::<Vec<_>>(),
            again.iter().map(Event::to_vec).collect::<Vec<_>>(),
            "a retry publishes the same bytes"
        );
        assert_ne!(
            first[0].event_id, first[1].event_id,
            "the index tells outputs apart"
        );
        assert_eq!(
            first[0].event_id,
            derived_event_id(&cause, "context.aggregated", 0)
        );
        assert_eq!(first[0].event_id.get_version_num(), 5);
        assert_eq!(first[0].timestamp, cause.timestamp);
        assert_eq!(first[2], cause, "a forwarded event keeps its identity");
    }
}
