//! The Kafka mount (docs/design.md §2, §3, §4).
//!
//! - [`KafkaPublisher`]: `publish_event` onto Kafka — topic by event type, key = `user_id`, headers `event_type`,
//!   `event_id`, `trace_id`, `acks=all`, idempotent; it returns only once the broker acknowledged the event.
//! - [`consumer`]: the consumer-group loop behind `vectordb-consumer`. Each assigned partition has a window of
//!   events in flight; events of one key (one user) run in offset order, different keys concurrently; an offset is
//!   stored for commit only after its event and every earlier one were handled and every produced event was
//!   acknowledged; transient failures retry with backoff (only that key waits); permanent ones go to `<topic>.dlq`
//!   with the original bytes.
//! - [`offsets`]: a group's lag, and reading a topic range back (`vectordb lag`, `export`, `replay`).
//! - [`topics`]: topic names (with `KAFKA_TOPIC_PREFIX`) and `vectordb topics create`.

mod client;
pub mod consumer;
pub mod logs;
pub mod offsets;
mod pause;
mod publisher;
pub mod topics;

pub use client::{ClientError, client_config};
pub use consumer::{ConsumerOptions, ConsumerReport, DEAD_LETTER_HEADERS, run_consumer};
pub use publisher::{KafkaPublisher, OutgoingRecord};
pub use topics::{TopicNames, TopicStatus, create_topics};

pub use rdkafka;
