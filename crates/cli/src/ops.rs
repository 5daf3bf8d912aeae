//! `/health`, `/metrics` and the broker probes of both processes (the backlog the sampler reports).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use aura_celery::{Broker, Patience};
use aura_kafka::TopicNames;
use aura_kafka::offsets::{PartitionLag, group_lag};
use aura_ops::{Backlog, Health, Probe, Sampler};
use aura_runtime::settings::KafkaSettings;
use aura_runtime::{
    DependencyObserver, HandlerContext, Observed, ObservedCalls, ObservedEmbedder, ObservedStore,
    Registry, Settings,
};

/// The process's ops side: metrics recorder, `/health` + `/metrics` on `HTTP_ADDR`, and the broker sampler.
pub struct Ops {
    pub health: Health,
    pub addr: SocketAddr,
    sampler: Option<tokio::task::JoinHandle<()>>,
}

/// Every labelled counter this process can increment, at 0 for the label sets known at start (Prometheus' advice):
/// a rate or an error ratio is then 0 before the first event instead of "no data", and alerts evaluate.
fn zero_counters(process: &'static str, settings: &Settings, registry: &Registry) {
    use aura_runtime::events::types;
    let backend = settings.messaging_backend.as_str();
    let mut publishers = vec![backend];
    if let Some(fallback) = settings.fallback.backend {
        publishers.push(fallback.as_str());
        for reason in aura_runtime::fallback::REASONS {
            metrics::counter!("aura360_publish_fallback_total", "from" => backend, "to" => fallback.as_str(),
                "reason" => reason)
            .absolute(0);
        }
    }
    let event_types = [
        types::MOOD_CREATED,
        types::ACTIVITY_CREATED,
        types::CONTEXT_AGGREGATED,
        types::CONTEXT_VECTORIZED,
    ];
    for publisher in publishers {
        for event_type in event_types {
            metrics::counter!("aura360_events_published_total", "backend" => publisher, "event_type" => event_type)
                .absolute(0);
        }
    }
    use aura_runtime::outcome;
    for handler in registry.enabled() {
        for outcome in outcome::OF_A_HANDLER {
            metrics::counter!("aura360_events_processed_total", "handler" => handler, "outcome" => outcome)
                .absolute(0);
        }
    }
    for handler in registry.disabled() {
        metrics::counter!("aura360_events_processed_total", "handler" => handler, "outcome" => outcome::DISABLED)
            .absolute(0);
    }
    metrics::counter!("aura360_events_processed_total", "handler" => outcome::NO_HANDLER,
        "outcome" => outcome::SKIPPED)
    .absolute(0);
    // Each mount dead-letters into its own broker: the consumer to `<topic>.dlq`, the worker to `<queue>.dlq`.
    let mount = if process == "vectordb-worker" {
        "celery"
    } else {
        "kafka"
    };
    for handler in registry.enabled().into_iter().chain(["decode"]) {
        metrics::counter!("aura360_dead_letters_total", "backend" => mount, "handler" => handler)
            .absolute(0);
    }
    if mount == "kafka" {
        metrics::counter!("aura360_dead_letters_spooled_total", "backend" => "kafka").absolute(0);
    } else {
        for queue in &settings.celery.queues {
            metrics::counter!("aura360_celery_foreign_tasks_total", "queue" => queue.clone())
                .absolute(0);
        }
    }
    for result in ["hit", "redis_hit", "miss"] {
        metrics::counter!(aura_runtime::embed::CACHE_METRIC, "result" => result).absolute(0);
    }
    metrics::counter!(aura_runtime::embed::local::TRUNCATED_METRIC).absolute(0);
}

impl Ops {
    /// Installs the recorder and starts serving (a port that cannot be bound is a start-up error).
    pub async fn start(
        process: &'static str,
        settings: &Settings,
        registry: &Registry,
    ) -> anyhow::Result<Self> {
        let metrics = aura_ops::install_metrics()?;
        let health = Health::new(
            process,
            settings.messaging_backend.as_str(),
            registry.enabled().iter().map(|s| (*s).to_owned()).collect(),
            registry
                .disabled()
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            settings.ops.broker_grace,
        );
        health.set_embedder(
            settings.embedding.provider.name(),
            settings.embedding.model_name(),
        );
        health.export_status();
        zero_counters(process, settings, registry);
        let addr = aura_ops::serve(settings.http_addr, health.clone(), metrics)
            .await
            .context("starting the HTTP endpoints")?;
        Ok(Self {
            health,
            addr,
            sampler: None,
        })
    }

    /// Ready, and deliberately consuming nothing (`disabled`, or celery mode without the drain): no broker to watch.
    pub fn set_idle(&self, detail: &str) {
        self.health.set_ready(Some(detail.to_owned()));
    }

    /// `/health` as the handlers' dependencies see it (embedder, store, dead letters).
    pub fn observer(&self) -> Arc<dyn DependencyObserver> {
        Arc::new(HealthObserver(self.health.clone()))
    }

    /// `context` with its embedder and store reporting to `/health`: an outage that handlers retry through makes the
    /// process `degraded` instead of silently stalling.
    pub fn observed(&self, context: HandlerContext) -> HandlerContext {
        HandlerContext {
            store: Arc::new(ObservedStore::new(context.store, Observed(self.observer()))),
            embedder: Arc::new(ObservedEmbedder::new(
                context.embedder,
                ObservedCalls(self.observer()),
            )),
            ..context
        }
    }

    /// Starts probing `probes` every `BACKLOG_SAMPLE_S`; `/health` reflects what they see.
    pub fn watch(&mut self, settings: &Settings, probes: Vec<Arc<dyn Probe>>) {
        let sampler = Sampler::new(self.health.clone(), probes, settings.ops.sample_every);
        self.sampler = Some(sampler.spawn());
    }
}

struct HealthObserver(Health);

impl DependencyObserver for HealthObserver {
    fn report(&self, dependency: &'static str, outcome: Result<(), String>) {
        self.0.dependency_checked(dependency, outcome);
    }
}

impl Drop for Ops {
    fn drop(&mut self) {
        if let Some(sampler) = self.sampler.take() {
            sampler.abort();
        }
    }
}

/// Kafka: the group's lag on the topics it consumes.
pub struct KafkaProbe {
    pub settings: KafkaSettings,
    pub topics: Vec<String>,
}

#[async_trait::async_trait]
impl Probe for KafkaProbe {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn target(&self) -> String {
        self.settings.bootstrap_servers.clone()
    }

    async fn sample(&self) -> Result<Backlog, String> {
        let (lags, missing) = group_lag(
            &self.settings,
            &self.settings.group_id,
            &self.topics,
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| e.to_string())?;
        if !missing.is_empty() {
            return Err(format!(
                "topics missing: {} (create them: vectordb topics create)",
                missing.join(", ")
            ));
        }
        Ok(kafka_backlog(&lags))
    }
}

/// Celery: the depth of the queues (and their dead-letter lists).
pub struct CeleryProbe {
    pub broker: Arc<Broker>,
    pub queues: Vec<String>,
    pub target: String,
}

#[async_trait::async_trait]
impl Probe for CeleryProbe {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn target(&self) -> String {
        self.target.clone()
    }

    async fn sample(&self) -> Result<Backlog, String> {
        let mut waiting = Vec::new();
        for queue in &self.queues {
            let depth = self
                .broker
                .depth(queue, &[], Patience::Until(Duration::from_secs(2)))
                .await
                .map_err(|e| e.to_string())?;
            waiting.push((queue.clone(), depth.waiting));
            waiting.push((
                aura_celery::transport::dead_letter_key(queue),
                depth.dead_letters,
            ));
        }
        Ok(Backlog {
            backend: "celery",
            waiting,
            partitions: Vec::new(),
        })
    }
}

/// The Kafka probe of a consumer: the group's lag on every source topic, those of disabled handlers included (their
/// backlog is what waits for the handler to come back, and what an operator watches grow).
pub fn kafka_probe(settings: &Settings) -> Arc<dyn Probe> {
    Arc::new(KafkaProbe {
        settings: settings.kafka.clone(),
        topics: TopicNames::from_settings(&settings.kafka).sources(),
    })
}

/// The Celery probe of the queues `queues` on `broker`.
pub fn celery_probe(
    settings: &Settings,
    broker: Arc<Broker>,
    queues: Vec<String>,
) -> Arc<dyn Probe> {
    Arc::new(CeleryProbe {
        broker,
        queues,
        target: settings.celery.broker_url.redacted(),
    })
}

fn kafka_backlog(lags: &[PartitionLag]) -> Backlog {
    let mut waiting: Vec<(String, u64)> = Vec::new();
    for lag in lags {
        match waiting.iter_mut().find(|(topic, _)| *topic == lag.topic) {
            Some((_, total)) => *total += lag.lag,
            None => waiting.push((lag.topic.clone(), lag.lag)),
        }
    }
    Backlog {
        backend: "kafka",
        waiting,
        partitions: lags
            .iter()
            .map(|l| aura_ops::PartitionLag {
                topic: l.topic.clone(),
                partition: l.partition,
                lag: l.lag,
            })
            .collect(),
    }
}
