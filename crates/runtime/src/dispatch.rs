//! One event through its handler: route, handle, publish the outputs, classify the outcome.
//!
//! Publishing happens here, before `dispatch` returns `Ok`, so a mount that acknowledges on `Ok` never acknowledges
//! an input whose outputs were not accepted by the broker. A retry re-runs the handler, so outputs published before
//! a later publish failed are sent again with new event ids; downstream point ids derive from the origin event id
//! and chunk index, so the duplicates overwrite instead of adding points.

use std::sync::Arc;
use std::time::Instant;

use aura_events::Event;

use crate::{HandlerContext, HandlerError, Publisher, Registry, RetryPolicy, Route, publish_event};

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
        }
    }

    /// One attempt: handle the event and publish its outputs.
    pub async fn dispatch(&self, event: &Event) -> Result<Outcome, Failure> {
        let handler = match self.registry.route(&event.event_type) {
            Route::Handler(handler) => handler,
            Route::Disabled(name) => {
                record(name, "disabled");
                return Ok(Outcome::Disabled { handler: name });
            }
            Route::Unhandled => {
                tracing::info!(event_id = %event.event_id, event_type = %event.event_type, "no handler for event type; skipped");
                record("none", "skipped");
                return Ok(Outcome::Unhandled);
            }
        };
        let name = handler.name();
        let started = Instant::now();
        let result = self.handle_and_publish(handler.as_ref(), event).await;
        metrics::histogram!("aura360_handler_duration_seconds", "handler" => name)
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(produced) => {
                record(name, "success");
                Ok(Outcome::Handled {
                    handler: name,
                    produced,
                })
            }
            Err(error) => {
                record(
                    name,
                    if error.is_transient() {
                        "transient_error"
                    } else {
                        "permanent_error"
                    },
                );
                Err(Failure {
                    handler: Some(name),
                    error,
                })
            }
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

    async fn handle_and_publish(
        &self,
        handler: &dyn crate::Handler,
        event: &Event,
    ) -> Result<usize, HandlerError> {
        let outputs = handler.handle(event, &self.context).await?;
        // Every output must fit before any is sent: a broker would refuse the oversized one only after the others
        // went out, and the same would happen on every retry.
        let limit = self.context.limits.max_event_bytes;
        for output in &outputs {
            let size = json_size(output);
            if size > limit {
                return Err(HandlerError::Permanent(format!(
                    "the {} event it produced is {size} bytes, over MAX_EVENT_BYTES={limit} (lower \
                     MAX_CHUNKS_PER_EVENT or MAX_EMBED_CHARS, or raise MAX_EVENT_BYTES with the broker's limit)",
                    output.event_type
                )));
            }
        }
        for output in &outputs {
            publish_event(self.publisher.as_ref(), output)
                .await
                .map_err(|e| {
                    if e.is_transient() {
                        HandlerError::Transient(e.to_string())
                    } else {
                        HandlerError::Permanent(e.to_string())
                    }
                })?;
        }
        Ok(outputs.len())
    }
}

/// Bytes of `event`'s JSON, counted without keeping them.
fn json_size(event: &Event) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing into a counter cannot fail.
    let _ = serde_json::to_writer(&mut count, event);
    count.0
}

fn record(handler: &'static str, outcome: &'static str) {
    metrics::counter!("aura360_events_processed_total", "handler" => handler, "outcome" => outcome)
        .increment(1);
}
