//! The in-memory bus: a [`Publisher`] that queues events in-process and runs a chain to completion.
//!
//! The same handlers as on Kafka or Celery, with no broker: the `vectordb pipeline` command and the handler tests
//! run on it (watermill's `gochannel`). Events are processed with bounded concurrency; what a handler publishes is
//! queued and processed in turn until nothing is left.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;
use aura_events::Event;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use crate::{Backend, DeadLetter, Dispatcher, Outcome, PublishError, Publisher, RetryPolicy};

#[derive(Debug, Default)]
pub struct InMemoryBus {
    queue: Mutex<VecDeque<Event>>,
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BusReport {
    /// Events handled successfully, by event type (inputs and the events the chain produced).
    pub handled_by_type: BTreeMap<String, u64>,
    /// Events with no handler for their type (skipped).
    pub unhandled: u64,
    /// Events whose handler is disabled, kept here rather than dropped.
    pub parked: Vec<Event>,
    pub dead_letters: Vec<DeadLetter>,
}

impl BusReport {
    pub fn handled(&self) -> u64 {
        self.handled_by_type.values().sum()
    }
}

impl InMemoryBus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&self, event: Event) {
        self.lock().push_back(event);
    }

    /// Events queued and not yet processed.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Event>> {
        // A panic while holding this lock cannot leave the queue half-updated (push/pop are atomic on it).
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn pop(&self) -> Option<Event> {
        self.lock().pop_front()
    }

    /// Processes queued events — and everything they produce — until the queue is empty. `dispatcher` must publish
    /// into this bus for the chain to continue.
    pub async fn run(
        &self,
        dispatcher: &Dispatcher,
        policy: &RetryPolicy,
        concurrency: usize,
    ) -> BusReport {
        let mut report = BusReport::default();
        let mut in_flight = FuturesUnordered::new();
        loop {
            while in_flight.len() < concurrency.max(1) {
                let Some(event) = self.pop() else { break };
                in_flight.push(async move {
                    let result = dispatcher.dispatch_with_retry(&event, policy).await;
                    (event, result)
                });
            }
            let Some((event, result)) = in_flight.next().await else {
                break;
            };
            match result {
                Ok(Outcome::Handled { .. }) => {
                    *report
                        .handled_by_type
                        .entry(event.event_type.clone())
                        .or_default() += 1
                }
                Ok(Outcome::Unhandled) => report.unhandled += 1,
                Ok(Outcome::Disabled { .. }) => report.parked.push(event),
                Err(failure) => {
                    tracing::warn!(event_id = %event.event_id, event_type = %event.event_type, error = %failure, "dead-lettered");
                    report.dead_letters.push(DeadLetter {
                        source: format!("event {}", event.event_id),
                        event_id: Some(event.event_id.to_string()),
                        event_type: Some(event.event_type.clone()),
                        handler: failure.handler.map(str::to_owned),
                        error: failure.error.to_string(),
                        payload: event.to_vec(),
                    });
                }
            }
        }
        report
    }
}

#[async_trait]
impl Publisher for InMemoryBus {
    fn backend(&self) -> Backend {
        Backend::Memory
    }

    async fn publish(&self, event: &Event) -> Result<(), PublishError> {
        self.push(event.clone());
        Ok(())
    }
}
