//! Helpers shared by the integration tests: event builders and a chain runner on the in-memory bus.

use std::sync::Arc;

use aura_runtime::events::Event;
use aura_runtime::{BusReport, Dispatcher, HandlerContext, InMemoryBus, Registry, RetryPolicy};
use serde_json::{Value, json};

/// A `user.mood.created` event in the Python service's shape.
pub fn mood_event(user: &str, score: i64, notes: &str) -> Event {
    let mut event = Event::new(
        "user.mood.created",
        Some(user.to_owned()),
        Some(format!("trace-{user}")),
    );
    event.set_field("data", json!({"mood_score": score, "tags": ["calm", "focused"], "notes": notes, "created_at": "2025-03-01T08:00:00"}));
    event
}

pub fn with_data(event_type: &str, user: Option<&str>, data: Value) -> Event {
    let mut event = Event::new(event_type, user.map(str::to_owned), None);
    event.set_field("data", data);
    event
}

/// Runs `inputs` through `registry` on a fresh in-memory bus until the chain is done.
pub async fn run_chain(
    registry: Registry,
    ctx: HandlerContext,
    inputs: Vec<Event>,
    retry: RetryPolicy,
) -> BusReport {
    let bus = Arc::new(InMemoryBus::new());
    for event in inputs {
        bus.push(event);
    }
    let dispatcher = Dispatcher::new(Arc::new(registry), ctx, bus.clone());
    bus.run(&dispatcher, &retry, 16).await
}

/// [`run_chain`] with the three handlers and three quick attempts.
pub async fn run_standard_chain(ctx: HandlerContext, inputs: Vec<Event>) -> BusReport {
    run_chain(aura_cli::standard_registry(), ctx, inputs, quick_retry(3)).await
}

/// Retries fast enough for tests.
pub fn quick_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts: Some(max_attempts),
        base: std::time::Duration::from_millis(1),
        cap: std::time::Duration::from_millis(5),
        jitter: 0.0,
    }
}
