//! What an on-call engineer looks at: `GET /health` and `GET /metrics` on `HTTP_ADDR` (docs/design.md §6), in both
//! processes.
//!
//! - [`Health`] is the process's readiness and broker connectivity, shared by the process and the HTTP handlers.
//! - [`Sampler`] asks a [`Probe`] (the process's brokers) every few seconds for its backlog — Kafka lag per partition,
//!   Celery queue depths — which is at once the connectivity check behind `/health` and the `aura360_backlog` /
//!   `aura360_consumer_lag` gauges.
//! - [`install_metrics`] installs the process-wide Prometheus recorder; [`serve`] the two endpoints.

mod health;
mod sampler;
mod server;

pub use health::{BrokerState, EmbedderInfo, Health, HealthReport, HealthStatus};
pub use sampler::{Backlog, PartitionLag, Probe, Sampler};
pub use server::{METRICS, Metric, MetricKind, ServeError, install_metrics, serve};
