//! `vectordb lag`: the Kafka group's lag and the Celery queues' depth, and the backlog the sampler reports.

use aura_celery::{Patience, QueueDepth};
use aura_kafka::TopicNames;
use aura_kafka::offsets::{PartitionLag, group_lag};
use aura_runtime::Settings;
use serde::Serialize;
use std::time::Duration;

/// What `vectordb lag` prints.
#[derive(Debug, Serialize)]
pub struct LagReport {
    pub kafka: Option<KafkaLag>,
    pub celery: Option<CeleryLag>,
}

#[derive(Debug, Serialize)]
pub struct KafkaLag {
    pub bootstrap_servers: String,
    pub group: String,
    pub partitions: Vec<PartitionLag>,
    pub total_lag: u64,
    pub missing_topics: Vec<String>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CeleryLag {
    pub broker: String,
    pub queues: Vec<QueueDepth>,
    pub error: Option<String>,
}

impl LagReport {
    /// Any backend could not be read.
    pub fn failed(&self) -> bool {
        self.kafka.as_ref().is_some_and(|k| k.error.is_some())
            || self.celery.as_ref().is_some_and(|c| c.error.is_some())
    }
}

/// Kafka lag of `group` on every aura360 topic (sources and dead letters), and the depth of `CELERY_QUEUES`.
pub async fn lag_report(
    settings: &Settings,
    group: &str,
    kafka: bool,
    celery: bool,
) -> anyhow::Result<LagReport> {
    let kafka = if kafka {
        let topics = TopicNames::from_settings(&settings.kafka).all();
        let mut report = KafkaLag {
            bootstrap_servers: settings.kafka.bootstrap_servers.clone(),
            group: group.to_owned(),
            partitions: Vec::new(),
            total_lag: 0,
            missing_topics: Vec::new(),
            error: None,
        };
        match group_lag(&settings.kafka, group, &topics, Duration::from_secs(10)).await {
            Ok((partitions, missing)) => {
                report.total_lag = partitions.iter().map(|p| p.lag).sum();
                report.partitions = partitions;
                report.missing_topics = missing;
            }
            Err(error) => report.error = Some(error.to_string()),
        }
        Some(report)
    } else {
        None
    };
    let celery = if celery {
        let broker = crate::clients::celery_broker(settings)?;
        let handlers = crate::standard_registry().names();
        let mut report = CeleryLag {
            broker: settings.celery.broker_url.redacted(),
            queues: Vec::new(),
            error: None,
        };
        for queue in &settings.celery.queues {
            match broker
                .depth(queue, &handlers, Patience::Until(Duration::from_secs(5)))
                .await
            {
                Ok(depth) => report.queues.push(depth),
                Err(error) => {
                    report.error = Some(error.to_string());
                    break;
                }
            }
        }
        Some(report)
    } else {
        None
    };
    Ok(LagReport { kafka, celery })
}

/// `vectordb lag` as text.
pub fn render_lag(report: &LagReport) -> String {
    let mut out = String::new();
    if let Some(kafka) = &report.kafka {
        out.push_str(&format!(
            "kafka {}  group {}\n",
            kafka.bootstrap_servers, kafka.group
        ));
        if let Some(error) = &kafka.error {
            out.push_str(&format!("  error: {error}\n"));
        } else {
            out.push_str(&format!(
                "  {:<40} {:>9} {:>12} {:>12} {:>10}\n",
                "TOPIC", "PARTITION", "COMMITTED", "END", "LAG"
            ));
            for p in &kafka.partitions {
                let committed = p.committed.map_or("-".to_owned(), |c| c.to_string());
                out.push_str(&format!(
                    "  {:<40} {:>9} {:>12} {:>12} {:>10}\n",
                    p.topic, p.partition, committed, p.end, p.lag
                ));
            }
            out.push_str(&format!("  total lag: {}\n", kafka.total_lag));
            for topic in &kafka.missing_topics {
                out.push_str(&format!("  missing topic: {topic}\n"));
            }
        }
    }
    if let Some(celery) = &report.celery {
        out.push_str(&format!("celery {}\n", celery.broker));
        if let Some(error) = &celery.error {
            out.push_str(&format!("  error: {error}\n"));
        }
        for q in &celery.queues {
            let parked: u64 = q.parked.values().sum();
            out.push_str(&format!(
                "  queue {:<30} waiting {:>8}  dead letters {:>6}  parked {:>6}  delayed {:>6}\n",
                q.queue, q.waiting, q.dead_letters, parked, q.delayed
            ));
        }
    }
    out
}
