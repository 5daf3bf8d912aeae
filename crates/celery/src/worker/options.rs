//! How a worker runs: its options (`CELERY_*` settings) and the limits derived from them.

use super::*;

use aura_runtime::Settings;

/// How a worker runs (`CELERY_*` settings).
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub queues: Vec<String>,
    /// Handlers running at once (`CELERY_CONCURRENCY`).
    pub concurrency: usize,
    /// Messages taken per slot (Celery's `worker_prefetch_multiplier`, default 4).
    pub prefetch_multiplier: usize,
    /// `name@host`: how Flower and `celery inspect` name this worker.
    pub hostname: String,
    /// Celery-style retries of transient failures: `max_attempts` = 1 + max retries; the delay becomes the
    /// retried message's `eta`.
    pub retry: RetryPolicy,
    /// Task events (`task-received`, …) as Celery's `-E`; worker heartbeats are always sent.
    pub send_task_events: bool,
    /// Store `STARTED` before running a task (Celery's `task_track_started`).
    pub track_started: bool,
    /// How long running handlers may take to finish after shutdown starts.
    pub grace: Duration,
    /// How often to look for messages a dead worker left in `unacked` past the visibility timeout.
    pub restore_interval: Duration,
    /// How long one `BRPOP` blocks when the queues are empty.
    pub fetch_block: Duration,
    /// `MAX_EVENT_BYTES`: a message whose event cannot be under it is dead-lettered unread.
    pub max_event_bytes: usize,
    /// `CELERY_ETA_MAX_HELD`: scheduled tasks (eta, countdown) held in memory at once; more go to
    /// `<queue>.delayed` in Redis until they are due.
    pub eta_max_held: usize,
    /// kombu's `visibility_timeout`: held messages have their `unacked_index` score refreshed well within it.
    pub visibility_timeout: Duration,
    /// Closed while the worker was paused past half the visibility timeout and has not yet checked which of its
    /// messages another worker restored: the dispatcher and the store it guards write nothing meanwhile, and the
    /// committer drops what was taken over (see [`Paused`]).
    pub fence: Fence,
}

impl WorkerOptions {
    /// The largest kombu message an event of `max_event_bytes` can arrive in: base64 (4/3) plus the envelope.
    pub(super) fn max_message_bytes(&self) -> usize {
        self.max_event_bytes.saturating_mul(4) / 3 + 64 * 1024
    }

    /// Messages taken and not yet acknowledged, at most: `concurrency × prefetch_multiplier`.
    pub(super) fn prefetch(&self) -> usize {
        self.concurrency * self.prefetch_multiplier.max(1)
    }

    /// How often held messages' leases are refreshed: a sixth of the visibility timeout, 1 s to 5 min.
    pub(super) fn lease_interval(&self) -> Duration {
        (self.visibility_timeout / 6).clamp(Duration::from_secs(1), Duration::from_secs(300))
    }
}

impl WorkerOptions {
    pub fn new(queues: Vec<String>, concurrency: usize, hostname: impl Into<String>) -> Self {
        Self {
            queues,
            concurrency: concurrency.max(1),
            prefetch_multiplier: 4,
            hostname: hostname.into(),
            retry: RetryPolicy {
                max_attempts: Some(4),
                base: Duration::from_secs(60),
                cap: Duration::from_secs(600),
                jitter: 0.2,
            },
            send_task_events: true,
            track_started: false,
            grace: Duration::from_secs(7),
            restore_interval: Duration::from_secs(10),
            fetch_block: Duration::from_secs(1),
            max_event_bytes: aura_runtime::events::limits::Limits::default().max_event_bytes,
            eta_max_held: 1000,
            visibility_timeout: Duration::from_secs(3600),
            fence: Fence::new(),
        }
    }
}

/// The `CELERY_*` settings (and the event size limit); the worker's name defaults to `vectordb-worker@<host>`.
impl From<&Settings> for WorkerOptions {
    fn from(settings: &Settings) -> Self {
        let celery = &settings.celery;
        let hostname = celery
            .worker_name
            .clone()
            .unwrap_or_else(|| format!("vectordb-worker@{}", crate::events::host_name()));
        let mut options = WorkerOptions::new(celery.queues.clone(), celery.concurrency, hostname);
        options.prefetch_multiplier = celery.prefetch_multiplier;
        options.send_task_events = celery.task_events;
        options.track_started = celery.track_started;
        options.max_event_bytes = settings.limits.max_event_bytes;
        options.eta_max_held = celery.eta_max_held;
        options.visibility_timeout = celery.visibility_timeout;
        options.retry = RetryPolicy {
            max_attempts: Some(celery.max_retries + 1),
            base: celery.retry_backoff,
            cap: celery.retry_backoff * 10,
            jitter: 0.2,
        };
        options
    }
}
