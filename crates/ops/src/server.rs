//! The HTTP endpoints and the Prometheus recorder.

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::Health;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("HTTP_ADDR={addr}: cannot listen: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("installing the Prometheus recorder: {0}")]
    Recorder(String),
}

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Handler durations in seconds: a handler is ~1 ms (aggregation) to seconds (a remote embedder).
const DURATION_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric the processes export.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: MetricKind,
    pub help: &'static str,
}

/// Every metric the processes export: the seed's names (docs/design.md §6), plus the backlog and the publish fallback. The Grafana dashboard
/// (`deploy/grafana`) is checked against this list.
pub const METRICS: [Metric; 21] = [
    Metric {
        name: "aura360_events_published_total",
        kind: MetricKind::Counter,
        help: "Events published, by backend and event type",
    },
    Metric {
        name: "aura360_events_processed_total",
        kind: MetricKind::Counter,
        help: "Events handled, by handler and outcome",
    },
    Metric {
        name: "aura360_dead_letters_total",
        kind: MetricKind::Counter,
        help: "Messages sent to a dead-letter destination",
    },
    Metric {
        name: "aura360_publish_fallback_total",
        kind: MetricKind::Counter,
        help: "Events published through the fallback backend because the primary failed",
    },
    Metric {
        name: "aura360_messaging_backend",
        kind: MetricKind::Gauge,
        help: "MESSAGING_BACKEND: 1 kafka, 2 celery, 0 disabled",
    },
    Metric {
        name: "aura360_backlog",
        kind: MetricKind::Gauge,
        help: "Messages waiting: Kafka lag per topic, Celery queue depth per queue",
    },
    Metric {
        name: "aura360_consumer_lag",
        kind: MetricKind::Gauge,
        help: "Kafka consumer-group lag per partition",
    },
    Metric {
        name: "aura360_handler_duration_seconds",
        kind: MetricKind::Histogram,
        help: "Handler run time",
    },
    Metric {
        name: "aura360_dependency_up",
        kind: MetricKind::Gauge,
        help: "A dependency (embedder, vector_store, dead_letters, result_backend, broker_acks) as its last call found it: 1 ok, 0 failing",
    },
    Metric {
        name: "aura360_dead_letters_spooled_total",
        kind: MetricKind::Counter,
        help: "Dead letters the dead-letter topic refused for good, kept on disk under DEAD_LETTER_SPOOL_DIR",
    },
    Metric {
        name: "aura360_celery_foreign_tasks_total",
        kind: MetricKind::Counter,
        help: "Tasks of other apps that reached vectordb-worker and were given back to their queue, by queue",
    },
    Metric {
        name: "aura360_kafka_in_flight_events",
        kind: MetricKind::Gauge,
        help: "Events vectordb-consumer received and cannot commit yet (running, waiting behind their key, or finished behind an unfinished one)",
    },
    Metric {
        name: "aura360_kafka_finished_ahead_events",
        kind: MetricKind::Gauge,
        help: "Events vectordb-consumer finished that wait behind an unfinished earlier one before their offset can be committed",
    },
    Metric {
        name: "aura360_embedding_cache_requests_total",
        kind: MetricKind::Counter,
        help: "Texts looked up in the embedding cache, by result: hit (in-process LRU), redis_hit (EMBEDDING_CACHE_REDIS_URL) or miss (embedded)",
    },
    Metric {
        name: "aura360_health_status",
        kind: MetricKind::Gauge,
        help: "What /health says: 1 for the current status (ok, starting, unavailable, degraded, disabled), 0 for the others",
    },
    Metric {
        name: "aura360_celery_heartbeat_timestamp_seconds",
        kind: MetricKind::Gauge,
        help: "Unix time of vectordb-worker's last Celery worker-heartbeat sent (every 2 s; what Flower watches)",
    },
    Metric {
        name: "aura360_embedding_truncated_total",
        kind: MetricKind::Counter,
        help: "Texts the local embedding model cut at its 256-token window",
    },
    Metric {
        name: "aura360_pauses_detected_total",
        kind: MetricKind::Counter,
        help: "Times this process found it had been paused (SIGSTOP, a frozen VM) long enough to have lost its work, and fenced its writes",
    },
    Metric {
        name: "aura360_fenced_writes_total",
        kind: MetricKind::Counter,
        help: "Writes (handler starts, publishes, store writes) that met the pause fence closed and waited",
    },
    Metric {
        name: "aura360_kafka_partitions_lost_total",
        kind: MetricKind::Counter,
        help: "Partitions vectordb-consumer lost without a revocation (its session expired): their work was dropped uncommitted",
    },
    Metric {
        name: "aura360_celery_taken_over_total",
        kind: MetricKind::Counter,
        help: "Messages vectordb-worker held that another worker restored while it was paused: their results and outputs were dropped",
    },
];

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
pub fn install_metrics() -> Result<PrometheusHandle, ServeError> {
    if let Some(handle) = RECORDER.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("aura360_handler_duration_seconds".into()),
            &DURATION_BUCKETS,
        )
        .map_err(|e| ServeError::Recorder(e.to_string()))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| ServeError::Recorder(e.to_string()))?;
    // Declared up front so a scrape shows them before the first event.
    for metric in METRICS {
        match metric.kind {
            MetricKind::Counter => metrics::describe_counter!(metric.name, metric.help),
            MetricKind::Gauge => metrics::describe_gauge!(metric.name, metric.help),
            MetricKind::Histogram => metrics::describe_histogram!(metric.name, metric.help),
        }
    }
    Ok(RECORDER.get_or_init(|| handle).clone())
}

/// Serves `/health` and `/metrics` on `addr` in the background; returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    metrics: PrometheusHandle,
) -> Result<SocketAddr, ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    let app = Router::new()
        .route("/health", get(health_endpoint))
        .with_state(health)
        .merge(
            Router::new()
                .route("/metrics", get(metrics_endpoint))
                .with_state(metrics),
        );
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "HTTP server stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /health and /metrics");
    Ok(bound)
}

async fn health_endpoint(State(health): State<Health>) -> impl IntoResponse {
    let report = health.report();
    let code = StatusCode::from_u16(report.status.http_code())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(report))
}

async fn metrics_endpoint(State(handle): State<PrometheusHandle>) -> impl IntoResponse {
    handle.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn health_and_metrics_over_http() {
        let health = Health::new(
            "test",
            "kafka",
            vec!["mood_created".into()],
            vec![],
            Duration::from_secs(30),
        );
        health.watch_broker("kafka", "127.0.0.1:1");
        let handle = install_metrics().unwrap();
        let addr = serve("127.0.0.1:0".parse().unwrap(), health.clone(), handle)
            .await
            .unwrap();
        let client = reqwest::Client::new();
        let get = |path: &str| client.get(format!("http://{addr}{path}")).send();
        let response = get("/health").await.unwrap();
        assert_eq!(response.status(), 503);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["status"], "starting");
        assert_eq!(body["messaging_backend"], "kafka");

        health.set_ready(None);
        health.broker_checked("kafka", Ok(()));
        metrics::counter!("aura360_events_processed_total", "handler" => "mood_created", "outcome" => "ok")
            .increment(3);
        let response = get("/health").await.unwrap();
        assert_eq!(response.status(), 200);
        let text = get("/metrics").await.unwrap().text().await.unwrap();
        assert!(
            text.contains(
                r#"aura360_events_processed_total{handler="mood_created",outcome="ok"} 3"#
            ),
            "{text}"
        );
    }
}
