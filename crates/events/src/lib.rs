//! The AURA360 event wire format, defined once.
//!
//! Every service in the pipeline — the Python producers, the Kafka consumer, the Celery worker — exchanges
//! the same JSON object: a common envelope (`event_id`, `event_type`, `timestamp`, `trace_id`, `user_id`,
//! `metadata`) plus per-type fields (`data`, `context_data`, `vectors`, …). [`Event`] keeps the envelope typed
//! and every other field as raw JSON, so fields this version does not know about survive a round trip through
//! Rust untouched. Typed views of the per-type fields live in [`payload`]; the routing tables (Kafka topic and
//! Celery task name per event type) live in [`routing`].

mod event;
pub mod limits;
pub mod payload;
pub mod pyfmt;
pub mod routing;
mod timestamp;

pub use event::{Event, EventError};
pub use timestamp::Timestamp;

/// Event type names as they appear in `event_type`.
pub mod types {
    pub const MOOD_CREATED: &str = "user.mood.created";
    pub const ACTIVITY_CREATED: &str = "user.activity.created";
    pub const CONTEXT_AGGREGATED: &str = "context.aggregated";
    pub const CONTEXT_VECTORIZED: &str = "context.vectorized";
}
