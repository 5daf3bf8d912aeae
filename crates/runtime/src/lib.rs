//! The runtime core every mount (in-memory, Kafka, Celery) shares.
//!
//! A [`Handler`] is a function from one event to the events it produces (watermill's `HandlerFunc`); it never
//! sees a broker. The [`Registry`] maps event types to handlers and knows which are disabled. The [`Dispatcher`]
//! runs one event through its handler, publishes what it produced through a [`Publisher`] *before* reporting
//! success (so the mount can acknowledge the input afterwards), classifies failures, and records metrics.
//! [`InMemoryBus`] is a `Publisher` that feeds a chain to completion in-process: the zero-infrastructure pipeline
//! and the handler tests run on it. [`Settings`] is the layered configuration of docs/design.md §6.

mod bus;
mod dispatch;
pub mod exact;
pub mod fallback;
pub mod fence;
mod handler;
pub mod observe;
mod publish;
mod registry;
mod retry;
pub mod settings;
mod wiring;

pub use bus::{BusReport, InMemoryBus};
pub use dispatch::{
    DeadLetter, Dispatcher, Failure, Outcome, Pending, count_skipped, derive_identities,
    derived_event_id, outcome,
};
pub use fallback::FallbackPublisher;
pub use fence::{Fence, Fenced, FencedStore, PauseWatch};
pub use handler::{Handler, HandlerContext, HandlerError};
pub use observe::{DependencyObserver, Observed, ObservedCalls, ObservedEmbedder, ObservedStore};
pub use publish::{
    Acknowledgement, Backend, DisabledPublisher, PublishError, Publisher, hand_over_event,
    publish_event, publish_event_via,
};
pub use registry::{Registry, Route, UnknownHandler};
pub use retry::RetryPolicy;
pub use settings::{ConfigError, Settings};
pub use wiring::{accepted_models, build_embedder, build_store};

pub use aura_embed as embed;
pub use aura_events as events;
pub use aura_store as store;

#[cfg(any(test, feature = "testing"))]
pub mod testing;
