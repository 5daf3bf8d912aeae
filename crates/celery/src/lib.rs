//! The Celery mount: our handlers as a Celery worker that Python Celery 5 talks to unchanged, over Redis.
//!
//! - [`protocol`] — message protocol v2: the kombu envelope, task headers, the `[args, kwargs, embed]` body; read
//!   leniently, written exactly as Python writes them ([`pyjson`]).
//! - [`transport`] — kombu's Redis transport: queue and priority lists, `BRPOP`, `unacked` bookkeeping,
//!   visibility-timeout restore under `unacked_mutex`, reconnection.
//! - [`worker`] — [`CeleryWorker`]: fetch, run handlers with Celery's `acks_late` semantics, retry, dead-letter,
//!   park tasks of disabled handlers, drain on shutdown.
//! - [`publisher`] — [`CeleryPublisher`]: `publish_event` as `send_task`, chained to the running task.
//! - [`results`] — the Redis result backend (`celery-task-meta-<id>`), so `AsyncResult(id).get()` works.
//! - [`events`] and [`control`] — task events and heartbeats for Flower; `celery inspect ping/stats/active`.

pub mod control;
pub mod dead_letter;
pub mod events;
pub mod protocol;
pub mod publisher;
pub mod pyjson;
pub mod results;
pub mod transport;
pub mod worker;

pub use publisher::{CeleryPublisher, TaskScope};
pub use results::ResultBackend;
pub use transport::{Broker, Patience, QueueDepth, TransportError};
pub use worker::{CeleryWorker, WorkerOptions, WorkerReport};
