//! How a consumer runs: [`ConsumerOptions`], built from the settings.

use super::*;

#[derive(Clone)]
pub struct ConsumerOptions {
    /// Backoff for transient failures; `max_attempts` is ignored (a key never skips a failing event).
    pub retry: RetryPolicy,
    /// How long SIGTERM (or a revocation) waits for in-flight events before giving up on them (uncommitted).
    pub grace: Duration,
    /// `KAFKA_ORDERING`: per key (concurrent keys) or per partition (one event at a time).
    pub ordering: KafkaOrdering,
    /// `KAFKA_CONCURRENCY`: handlers running at once in the whole process.
    pub concurrency: usize,
    /// `KAFKA_PIPELINE_DEPTH`: events of one key handed over to the producer and not yet acknowledged.
    pub pipeline_depth: usize,
    /// `KAFKA_MAX_IN_FLIGHT_PER_PARTITION`: a partition's window (received, not yet committable) pauses the
    /// partition at this many messages, or at `max_in_flight_bytes / 4` bytes; it resumes below half of both.
    pub max_in_flight_per_partition: usize,
    /// `KAFKA_MAX_IN_FLIGHT`, `KAFKA_MAX_IN_FLIGHT_BYTES`: the same bound for the whole process. Bytes are record
    /// values and keys.
    pub max_in_flight: usize,
    pub max_in_flight_bytes: usize,
    /// `MAX_EVENT_BYTES`: a larger record is dead-lettered unread.
    pub max_event_bytes: usize,
    /// `DEAD_LETTER_SPOOL_DIR`: where a dead letter goes when `<topic>.dlq` refuses it for good (authorization, a
    /// record the broker will not take): one JSONL file per dead-letter topic, in `vectordb export`'s format.
    pub dead_letter_spool: PathBuf,
    /// Told when dead letters cannot be written (and when they can again): `/health`.
    pub observer: Option<Arc<dyn DependencyObserver>>,
    /// Closed while the process was paused past half its session and has not yet learnt whether it is still a
    /// member: the dispatcher and the store this fence guards write nothing meanwhile (see [`Paused`]).
    pub fence: Fence,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            retry: RetryPolicy {
                max_attempts: None,
                base: Duration::from_millis(200),
                cap: Duration::from_secs(30),
                jitter: 0.2,
            },
            grace: Duration::from_secs(8),
            ordering: KafkaOrdering::Key,
            concurrency: 64,
            pipeline_depth: 32,
            max_in_flight_per_partition: 500,
            max_in_flight: 10_000,
            max_in_flight_bytes: 64 * 1024 * 1024,
            max_event_bytes: Limits::default().max_event_bytes,
            dead_letter_spool: PathBuf::from("data/dead-letters"),
            observer: None,
            fence: Fence::new(),
        }
    }
}

impl ConsumerOptions {
    /// The ordering, concurrency and in-flight bounds of `settings` (`KAFKA_ORDERING`, `KAFKA_CONCURRENCY`,
    /// `KAFKA_PIPELINE_DEPTH`, `KAFKA_MAX_IN_FLIGHT*`); everything else as it was.
    pub fn with_settings(mut self, settings: &KafkaSettings) -> Self {
        self.ordering = settings.ordering;
        self.concurrency = settings.concurrency;
        self.pipeline_depth = settings.pipeline_depth;
        self.max_in_flight_per_partition = settings.max_in_flight_per_partition;
        self.max_in_flight = settings.max_in_flight;
        self.max_in_flight_bytes = settings.max_in_flight_bytes;
        self
    }
}

/// The consumer's settings: `KAFKA_*` bounds and ordering, the event size limit, the dead-letter spool.
impl From<&aura_runtime::Settings> for ConsumerOptions {
    fn from(settings: &aura_runtime::Settings) -> Self {
        let mut options = ConsumerOptions::default().with_settings(&settings.kafka);
        options.max_event_bytes = settings.limits.max_event_bytes;
        options.dead_letter_spool = settings.kafka.dead_letter_spool_dir.clone();
        options
    }
}
