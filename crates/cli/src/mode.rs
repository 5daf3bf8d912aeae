//! What each process does with the settings it was given — decided once, here: the processes act on it and
//! `vectordb check` reports it, so the report is the processes' own decision, not a restatement of it.

use aura_runtime::settings::Process;
use aura_runtime::{Backend, Settings};

/// What `vectordb-consumer` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumerMode {
    /// Consumes the Kafka topics of the enabled handlers, publishes to Kafka.
    Consume,
    /// A rollback to Celery: forwards Kafka's backlog beyond the group's offsets as Celery tasks.
    ForwardToCelery,
    /// Celery mode without the drain: handles nothing; Kafka's backlog waits in the group.
    IdleForCelery,
    /// `MESSAGING_BACKEND=disabled`: consumes nothing, commits nothing.
    Disabled,
}

/// What `vectordb-worker` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerMode {
    /// Consumes the Celery queues; produced events go to `publishes` (Kafka, or Celery tasks).
    Consume { publishes: Backend },
    /// `MESSAGING_BACKEND=disabled`: consumes nothing; tasks stay on their queues.
    Disabled,
}

pub fn consumer_mode(settings: &Settings) -> ConsumerMode {
    match settings.backend_of(Process::Consumer) {
        Backend::Kafka => ConsumerMode::Consume,
        Backend::Celery if settings.kafka.drain_to_celery => ConsumerMode::ForwardToCelery,
        Backend::Celery => ConsumerMode::IdleForCelery,
        Backend::Disabled | Backend::Memory => ConsumerMode::Disabled,
    }
}

pub fn worker_mode(settings: &Settings) -> WorkerMode {
    match settings.backend_of(Process::Worker) {
        Backend::Kafka => WorkerMode::Consume {
            publishes: Backend::Kafka,
        },
        Backend::Celery => WorkerMode::Consume {
            publishes: Backend::Celery,
        },
        Backend::Disabled | Backend::Memory => WorkerMode::Disabled,
    }
}

impl ConsumerMode {
    /// What it does, in a line (the health endpoint's idle reason, `vectordb check`'s plan).
    pub fn describe(self, settings: &Settings, handlers: &str) -> String {
        let group = &settings.kafka.group_id;
        match self {
            Self::Consume => format!(
                "vectordb-consumer: consumes the Kafka topics of [{handlers}] in group {group}, publishes to Kafka"
            ),
            Self::ForwardToCelery => format!(
                "vectordb-consumer: forwards Kafka's backlog of group {group} as Celery tasks to {}",
                settings.celery.publish_queue()
            ),
            Self::IdleForCelery => format!(
                "vectordb-consumer: idles (KAFKA_DRAIN_TO_CELERY=false); Kafka's backlog waits in group {group}"
            ),
            Self::Disabled => "vectordb-consumer: consumes nothing, commits nothing".to_owned(),
        }
    }

    pub fn uses_kafka(self) -> bool {
        matches!(self, Self::Consume | Self::ForwardToCelery)
    }
}

impl WorkerMode {
    pub fn describe(self, settings: &Settings, handlers: &str) -> String {
        let queues = settings.celery.queues.join(",");
        match self {
            Self::Consume {
                publishes: Backend::Kafka,
            } => format!(
                "vectordb-worker: consumes Celery queues [{queues}], publishes next events to Kafka"
            ),
            Self::Consume { .. } => format!(
                "vectordb-worker: consumes Celery queues [{queues}] with [{handlers}], publishes next events as tasks"
            ),
            Self::Disabled => "vectordb-worker: consumes nothing, acknowledges nothing".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::from_sources(Path::new("/nonexistent"), &env).unwrap()
    }

    #[test]
    fn each_process_follows_its_own_backend() {
        let s = settings(&[
            ("MESSAGING_BACKEND", "celery"),
            ("CONSUMER_MESSAGING_BACKEND", "kafka"),
        ]);
        assert_eq!(consumer_mode(&s), ConsumerMode::Consume);
        assert_eq!(
            worker_mode(&s),
            WorkerMode::Consume {
                publishes: Backend::Celery
            }
        );
        let s = settings(&[
            ("MESSAGING_BACKEND", "celery"),
            ("KAFKA_DRAIN_TO_CELERY", "false"),
        ]);
        assert_eq!(consumer_mode(&s), ConsumerMode::IdleForCelery);
        let s = settings(&[("MESSAGING_BACKEND", "disabled")]);
        assert_eq!(consumer_mode(&s), ConsumerMode::Disabled);
        assert_eq!(worker_mode(&s), WorkerMode::Disabled);
    }

    #[test]
    fn the_mounts_options_are_built_from_the_settings() {
        let s = settings(&[
            ("KAFKA_CONCURRENCY", "7"),
            ("CELERY_CONCURRENCY", "5"),
            ("CELERY_MAX_RETRIES", "2"),
            ("MAX_EVENT_BYTES", "5000"),
            ("DEAD_LETTER_SPOOL_DIR", "/var/spool/aura"),
        ]);
        let consumer = aura_kafka::ConsumerOptions::from(&s);
        assert_eq!(consumer.concurrency, 7);
        assert_eq!(consumer.max_event_bytes, 5000);
        assert_eq!(consumer.dead_letter_spool, Path::new("/var/spool/aura"));
        let worker = aura_celery::WorkerOptions::from(&s);
        assert_eq!(worker.concurrency, 5);
        assert_eq!(worker.max_event_bytes, 5000);
        assert_eq!(worker.retry.max_attempts, Some(3));
        assert!(worker.hostname.starts_with("vectordb-worker@"));
    }
}
