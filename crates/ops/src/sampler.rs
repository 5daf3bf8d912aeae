//! The backlog sampler: every few seconds each [`Probe`] reports its broker's backlog, which sets the gauges and
//! tells [`Health`] whether the broker answers.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::Health;

/// Consumer lag of one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    pub lag: u64,
}

/// What a probe saw: messages waiting per queue or topic (`aura360_backlog`), and per partition for Kafka
/// (`aura360_consumer_lag`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// `kafka` or `celery`: the `backend` label.
    pub backend: &'static str,
    pub waiting: Vec<(String, u64)>,
    pub partitions: Vec<PartitionLag>,
}

/// A broker the process depends on.
#[async_trait]
pub trait Probe: Send + Sync {
    /// The name `/health` lists it under (`kafka`, `redis`).
    fn name(&self) -> &'static str;
    /// Where it is, printable (no secrets).
    fn target(&self) -> String;
    /// Reaches the broker and measures the backlog; `Err` = unreachable, with the reason.
    async fn sample(&self) -> Result<Backlog, String>;
}

/// Runs the probes on an interval.
pub struct Sampler {
    health: Health,
    probes: Vec<Arc<dyn Probe>>,
    interval: Duration,
}

impl Sampler {
    pub fn new(health: Health, probes: Vec<Arc<dyn Probe>>, interval: Duration) -> Self {
        for probe in &probes {
            health.watch_broker(probe.name(), &probe.target());
        }
        Self {
            health,
            probes,
            interval,
        }
    }

    /// Samples every probe once (each bounded by the interval, at least 5 s).
    pub async fn sample_once(&self) {
        let limit = self.interval.max(Duration::from_secs(5));
        for probe in &self.probes {
            let result = match tokio::time::timeout(limit, probe.sample()).await {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {} s", limit.as_secs())),
            };
            match result {
                Ok(backlog) => {
                    record(&backlog);
                    self.health.broker_checked(probe.name(), Ok(()));
                }
                Err(error) => self.health.broker_checked(probe.name(), Err(error)),
            }
        }
        self.health.export_status();
    }

    /// Samples until the task is dropped or aborted.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                self.sample_once().await;
                tokio::time::sleep(self.interval).await;
            }
        })
    }
}

fn record(backlog: &Backlog) {
    for (name, waiting) in &backlog.waiting {
        metrics::gauge!("aura360_backlog", "backend" => backlog.backend, "queue_or_topic" => name.clone())
            .set(*waiting as f64);
    }
    for partition in &backlog.partitions {
        metrics::gauge!("aura360_consumer_lag", "topic" => partition.topic.clone(),
            "partition" => partition.partition.to_string())
        .set(partition.lag as f64);
    }
}
