//! The consumer-group loop behind `vectordb-consumer` (docs/design.md §3, §4).
//!
//! One task (the *poller*) receives messages and books each into its partition's *window*: the offsets received and
//! not yet committable. With `KAFKA_ORDERING=key` (the default) a message whose record key has nothing in flight
//! starts a *runner* for that key; a message whose key is busy waits behind it. A runner handles its key's messages
//! one after another, in offset order, so events of one key (one user) are never reordered, while different keys of
//! the same partition run concurrently (up to `KAFKA_CONCURRENCY` handlers for the whole process). With
//! `KAFKA_ORDERING=partition` every message of a partition has the same key: one at a time, in order.
//!
//! A message is finished when it was handled and every event it produced was acknowledged by the broker, or when it
//! was written to `<topic>.dlq`. The offset stored for its partition is the end of the window's contiguous prefix
//! of finished messages — never past an unfinished one — so a crash redelivers the unfinished messages and those
//! that finished after the first of them, nothing less. The poller stores the offsets of every partition in one
//! call per tick; librdkafka commits stored offsets every second, on revocation and on close
//! (`enable.auto.commit` with `enable.auto.offset.store=false`: nothing is committed that was not finished).
//!
//! A key whose event keeps failing transiently retries it with backoff and never skips it; only that key waits.
//! The partition keeps being fetched until its window reaches its bound (`KAFKA_MAX_IN_FLIGHT_PER_PARTITION`, or a
//! quarter of `KAFKA_MAX_IN_FLIGHT_BYTES`), or the process reaches its own (`KAFKA_MAX_IN_FLIGHT`,
//! `KAFKA_MAX_IN_FLIGHT_BYTES`); then it is paused, while polling (and so the group session) goes on for the other
//! partitions. An event whose handler is disabled *holds* its partition: paused, nothing further committed, resumed
//! from the committed offset by the next process that has the handler enabled.
//!
//! A revocation (rebalance) or SIGTERM drains the window within the grace period: retries give up at once, every
//! event up to the furthest one already finished or running still runs (each key's in order), nothing beyond it
//! starts, and the final offsets are stored before the partition is handed on — the finished events then form a
//! contiguous prefix, so a clean rebalance handles nothing twice.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aura_runtime::events::Event;
use aura_runtime::events::limits::Limits;
use aura_runtime::observe::names;
use aura_runtime::settings::{KafkaOrdering, KafkaSettings};
use aura_runtime::{DependencyObserver, Dispatcher, Fence, Outcome, Registry, RetryPolicy, Route};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Headers, Message, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::pause::Paused;
use crate::publisher::OutgoingRecord;
use crate::{ClientError, KafkaPublisher, TopicNames, client_config};

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
            max_in_flight_per_partition: 1_000,
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
    /// `KAFKA_MAX_IN_FLIGHT*`); everything else as it was.
    pub fn with_settings(mut self, settings: &KafkaSettings) -> Self {
        self.ordering = settings.ordering;
        self.concurrency = settings.concurrency;
        self.max_in_flight_per_partition = settings.max_in_flight_per_partition;
        self.max_in_flight = settings.max_in_flight;
        self.max_in_flight_bytes = settings.max_in_flight_bytes;
        self
    }
}

/// What one run did, for the exit log and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConsumerReport {
    pub topics: Vec<String>,
    pub handled: u64,
    pub skipped: u64,
    pub dead_lettered: u64,
    /// Partitions stopped at an event whose handler is disabled.
    pub held_partitions: u64,
}

/// The topics a registry's enabled handlers need: a topic whose event types all belong to disabled handlers is not
/// subscribed, so its committed offsets stay where they are (docs/design.md §3).
pub fn subscribed_topics(registry: &Registry, topics: &TopicNames) -> Vec<String> {
    let mut names: Vec<String> = registry
        .enabled_event_types()
        .into_iter()
        .filter_map(|event_type| topics.for_event_type(event_type))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// How long leaving the group may take at exit.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// Commits the stored offsets and closes the consumer (leaves the group) on a thread of its own, and waits at most
/// `limit`: librdkafka's commit and close wait for the group coordinator — until the session times out, or
/// indefinitely — while the broker is down, which would turn a SIGTERM during a Kafka outage into a hang. Leaving
/// without them is safe: what was not committed is redelivered, and the broker ends the membership after
/// `session.timeout.ms`.
async fn close_within(consumer: Arc<StreamConsumer<MountContext>>, limit: Duration) {
    let (closed, wait) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("kafka-close".into())
        .spawn(move || {
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) => tracing::info!("offsets committed"),
                Err(rdkafka::error::KafkaError::ConsumerCommit(
                    rdkafka::types::RDKafkaErrorCode::NoOffset,
                )) => {}
                Err(error) => {
                    tracing::warn!(%error, "final commit failed; uncommitted events will be redelivered")
                }
            }
            consumer.unsubscribe();
            drop(consumer);
            let _ = closed.send(());
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start the thread that closes the consumer; leaving without closing");
        return;
    }
    if tokio::time::timeout(limit, wait).await.is_err() {
        tracing::warn!(
            limit_s = limit.as_secs(),
            "the group coordinator did not answer; exiting without leaving the group (the broker drops the member \
             after session.timeout.ms; uncommitted events are redelivered)"
        );
    }
}

/// Runs the handlers on the consumer group until `shutdown` resolves, then drains in-flight events, commits and
/// leaves the group. `dead_letters` sends `<topic>.dlq` records (usually the same producer the dispatcher uses).
pub async fn run_consumer(
    settings: &KafkaSettings,
    registry: Arc<Registry>,
    dispatcher: Dispatcher,
    dead_letters: KafkaPublisher,
    options: ConsumerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<ConsumerReport, ClientError> {
    let topics = subscribed_topics(&registry, &TopicNames::from_settings(settings));
    let shared = Arc::new(Shared {
        lanes: Mutex::new(Vec::new()),
        grace: options.grace,
        counters: Counters::default(),
        in_flight: AtomicUsize::new(0),
        bounds: Bounds::new(&options),
        room: tokio::sync::Notify::new(),
        poller_waits: AtomicBool::new(false),
        in_flight_bytes: AtomicUsize::new(0),
        paused: Arc::new(Paused::new(
            options.fence.clone(),
            settings.session_timeout_ms,
        )),
    });
    let _pause_watch = Paused::watch(&shared.paused);
    let consumer: Arc<StreamConsumer<MountContext>> = Arc::new(
        client_config(settings)?
            .set("group.id", &settings.group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("allow.auto.create.topics", "false")
            .set("queued.max.messages.kbytes", "16384")
            .set("fetch.wait.max.ms", settings.fetch_wait_max_ms.to_string())
            .set(
                "session.timeout.ms",
                settings.session_timeout_ms.to_string(),
            )
            .set(
                "partition.assignment.strategy",
                &settings.assignment_strategy,
            )
            .set(
                "heartbeat.interval.ms",
                crate::pause::heartbeat_interval_ms(settings.session_timeout_ms).to_string(),
            )
            .create_with_context(MountContext {
                shared: shared.clone(),
            })
            .map_err(|source| ClientError::Create {
                role: "consumer",
                bootstrap: settings.bootstrap_servers.clone(),
                source,
            })?,
    );
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&names)
        .map_err(|e| ClientError::kafka(format!("subscribing to {}", topics.join(", ")), e))?;
    tracing::info!(group = %settings.group_id, topics = %topics.join(","),
        ordering = ?options.ordering, concurrency = options.concurrency, "consumer subscribed");

    let runners = Arc::new(RunnerContext {
        registry,
        dispatcher,
        dead_letters,
        retry: options.retry.clone(),
        max_event_bytes: options.max_event_bytes,
        spool: options.dead_letter_spool.clone(),
        observer: options.observer.clone(),
        shared: shared.clone(),
        slots: Semaphore::new(options.concurrency.max(1)),
    });
    let poller = Poller {
        consumer: consumer.clone(),
        runners,
        keys: std::collections::hash_map::RandomState::new(),
        ordering: options.ordering,
    };
    poller.run(shutdown).await;

    // Stop: retries give up, the windows drain within the grace period, the final offsets are stored.
    let mut lanes: Vec<Lane> = shared.lanes().drain(..).collect();
    let deadline = Instant::now() + shared.grace;
    drain(&lanes, deadline).await;
    poller.store_progress(&mut lanes);
    for lane in &lanes {
        shared.release(lane);
    }
    drop(poller);
    // The final commit and the close share what is left of the grace period (at least a second, at most
    // CLOSE_LIMIT): with the broker down, a synchronous commit waits until the session times out, and the exit must
    // stay bounded whatever the broker does.
    let left = deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_secs(1), CLOSE_LIMIT);
    close_within(consumer, left).await;
    let report = shared.counters.report(topics);
    tracing::info!(
        handled = report.handled,
        skipped = report.skipped,
        dead_lettered = report.dead_lettered,
        "consumer stopped"
    );
    Ok(report)
}

/// Shutdown: gives up retries now, lets everything else in the windows finish until `deadline`, then lets no runner
/// take a further event.
async fn drain(lanes: &[Lane], deadline: Instant) {
    for lane in lanes {
        lane.part.book().start_drain();
        lane.part.cancel.cancel();
    }
    while lanes
        .iter()
        .any(|l| l.part.running.load(Ordering::Acquire) > 0)
    {
        if Instant::now() >= deadline {
            for lane in lanes
                .iter()
                .filter(|l| l.part.running.load(Ordering::Acquire) > 0)
            {
                tracing::warn!(topic = %lane.part.topic, partition = lane.part.partition,
                    "in-flight events did not finish within the grace period; they stay uncommitted");
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for lane in lanes {
        lane.part.abort.cancel();
    }
}

/// State the poller, the runners and the rebalance callback share.
struct Shared {
    lanes: Mutex<Vec<Lane>>,
    grace: Duration,
    counters: Counters,
    /// Messages in every window, and their bytes: the process-wide bound.
    in_flight: AtomicUsize,
    in_flight_bytes: AtomicUsize,
    bounds: Bounds,
    /// Told when a window falls below half of its bounds while the poller waits for room (`poller_waits`).
    room: tokio::sync::Notify,
    poller_waits: AtomicBool,
    paused: Arc<Paused>,
}

impl Shared {
    fn lanes(&self) -> MutexGuard<'_, Vec<Lane>> {
        // Nothing panics while holding this lock; the list stays consistent.
        self.lanes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A lane leaves the process (revoked, or at exit): what its window still holds no longer counts, and a runner
    /// still finishing an event of it later releases nothing twice.
    fn release(&self, lane: &Lane) {
        let mut book = lane.part.book();
        self.in_flight
            .fetch_sub(book.window.len(), Ordering::AcqRel);
        self.in_flight_bytes.fetch_sub(book.bytes, Ordering::AcqRel);
        book.window.clear();
        book.keys.clear();
        book.bytes = 0;
        book.finished_ahead = 0;
    }

    /// Revocation: give the revoked partitions' windows the grace period to drain, and store their final offsets,
    /// which librdkafka commits right after this callback returns.
    fn revoke(&self, consumer: &BaseConsumer<MountContext>, partitions: &TopicPartitionList) {
        let lost = consumer.assignment_lost();
        let revoked: Vec<Lane> = {
            let mut lanes = self.lanes();
            let mut revoked = Vec::new();
            let mut i = 0;
            while i < lanes.len() {
                let part = &lanes[i].part;
                if partitions
                    .elements()
                    .iter()
                    .any(|p| p.partition() == part.partition && p.topic() == part.topic)
                {
                    revoked.push(lanes.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            revoked
        };
        if lost {
            // The group gave these partitions to another member already (this one was paused, or cut off, past its
            // session): nothing more of theirs runs here and nothing is stored; their new owner redelivers what was
            // not committed.
            for lane in &revoked {
                lane.part.cancel.cancel();
                lane.part.abort.cancel();
                self.release(lane);
            }
            metrics::counter!("aura360_kafka_partitions_lost_total")
                .increment(revoked.len() as u64);
            tracing::warn!(
                partitions = revoked.len(),
                "partitions lost (this member's session expired): their in-flight events are given up uncommitted"
            );
            return;
        }
        for lane in &revoked {
            lane.part.book().start_drain();
            lane.part.cancel.cancel();
        }
        let wait = || {
            let deadline = Instant::now() + self.grace;
            while revoked
                .iter()
                .any(|l| l.part.running.load(Ordering::Acquire) > 0)
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // The callback runs inside the poller's `recv()`; let the runtime move other tasks off this thread.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            _ => wait(),
        }
        let mut finals = TopicPartitionList::new();
        for lane in &revoked {
            lane.part.abort.cancel();
            if let Some(next) = lane.part.book().next
                && Some(next) != lane.stored
            {
                let _ = finals.add_partition_offset(
                    &lane.part.topic,
                    lane.part.partition,
                    Offset::Offset(next),
                );
            }
            self.release(lane);
        }
        if finals.count() > 0
            && let Err(error) = consumer.store_offsets(&finals)
        {
            tracing::warn!(%error, "storing the revoked partitions' offsets failed; their new owner redelivers");
        }
        tracing::info!(partitions = revoked.len(), "partitions revoked");
    }
}

#[derive(Default)]
struct Counters {
    handled: AtomicU64,
    skipped: AtomicU64,
    dead_lettered: AtomicU64,
    held: AtomicU64,
}

impl Counters {
    fn report(&self, topics: Vec<String>) -> ConsumerReport {
        ConsumerReport {
            topics,
            handled: self.handled.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            held_partitions: self.held.load(Ordering::Relaxed),
        }
    }
}

struct MountContext {
    shared: Arc<Shared>,
}

impl ClientContext for MountContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::logs::log(level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::logs::error(&error, reason);
    }
}

impl ConsumerContext for MountContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            self.shared.revoke(consumer, partitions);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                self.shared.paused.assigned();
                let protocol = match consumer.rebalance_protocol() {
                    rdkafka::consumer::RebalanceProtocol::Cooperative => "cooperative",
                    rdkafka::consumer::RebalanceProtocol::Eager => "eager",
                    rdkafka::consumer::RebalanceProtocol::None => "none",
                };
                tracing::info!(partitions = %describe(partitions), protocol, "partitions assigned");
                // A partition paused under a previous assignment starts afresh.
                if let Err(error) = consumer.resume(partitions) {
                    tracing::debug!(%error, "resume after assignment");
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => tracing::debug!(offsets = %describe(offsets), "committed"),
            Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => {}
            Err(error) => {
                tracing::warn!(%error, "offset commit failed; will retry on the next commit")
            }
        }
    }
}

fn describe(partitions: &TopicPartitionList) -> String {
    partitions
        .elements()
        .iter()
        .map(|p| match p.offset() {
            Offset::Offset(offset) => format!("{}/{}@{offset}", p.topic(), p.partition()),
            _ => format!("{}/{}", p.topic(), p.partition()),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The lanes whose committable offset moved past what was stored: `(index, offset)`, each book read once.
fn progress_to_store(lanes: &[Lane]) -> Vec<(usize, i64)> {
    lanes
        .iter()
        .enumerate()
        .filter_map(|(i, lane)| {
            let next = lane.part.book().next?;
            (lane.stored != Some(next)).then_some((i, next))
        })
        .collect()
}

/// Marks the offsets of `progress_to_store` as stored. Only those: a runner may have moved a book since it was read,
/// and an offset marked stored but never stored would never be committed (the last event of a partition stayed
/// uncommitted until another arrived).
fn record_stored(lanes: &mut [Lane], stored: &[(usize, i64)]) {
    for &(i, next) in stored {
        lanes[i].stored = Some(next);
    }
}

/// One assigned partition, as the poller sees it.
struct Lane {
    part: Arc<Partition>,
    paused: bool,
    /// The offset last stored for it.
    stored: Option<i64>,
}

impl Lane {
    /// A partition just assigned: nothing received, nothing stored.
    fn new(topic: &str, partition: i32) -> Self {
        Lane {
            part: Arc::new(Partition {
                topic: topic.to_owned(),
                partition,
                book: Mutex::new(Book::default()),
                running: AtomicUsize::new(0),
                held: AtomicBool::new(false),
                cancel: CancellationToken::new(),
                abort: CancellationToken::new(),
            }),
            paused: false,
            stored: None,
        }
    }
}

/// One assigned partition, as its runners see it.
struct Partition {
    topic: String,
    partition: i32,
    book: Mutex<Book>,
    /// Runners alive (revocation and shutdown wait for none).
    running: AtomicUsize,
    /// Stopped at an event whose handler is disabled.
    held: AtomicBool,
    /// Revocation or shutdown: retries give up.
    cancel: CancellationToken,
    /// The grace period is over: no runner takes a further event.
    abort: CancellationToken,
}

impl Partition {
    fn book(&self) -> MutexGuard<'_, Book> {
        // Nothing panics while holding this lock (plain collection updates).
        self.book
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A partition's window and the messages waiting behind their keys.
#[derive(Default)]
struct Book {
    /// Received and not yet committable, in offset order.
    window: VecDeque<Slot>,
    /// Bytes of the messages in the window.
    bytes: usize,
    /// Keys with a runner: the offset it runs and the messages waiting for it (in offset order).
    keys: HashMap<u64, KeyRun>,
    /// Revocation or shutdown: the last offset still to run (see [`Book::start_drain`]).
    drain_to: Option<i64>,
    /// The offset to commit: the end of the contiguous prefix of finished messages.
    next: Option<i64>,
    /// Finished messages still in the window (behind an unfinished one).
    finished_ahead: usize,
}

struct Slot {
    offset: i64,
    bytes: usize,
    done: bool,
}

/// One key's runner, as its partition's book sees it.
struct KeyRun {
    running: i64,
    waiting: VecDeque<OwnedMessage>,
}

impl Book {
    /// Stops the window at the furthest offset finished or running: everything up to it still runs (each key's
    /// waiting events up to it, in order), nothing beyond it starts. Once that is done the finished events form a
    /// contiguous prefix, so the partition's next owner starts right after them and handles nothing twice.
    fn start_drain(&mut self) {
        let finished = self
            .window
            .iter()
            .filter(|s| s.done)
            .map(|s| s.offset)
            .max();
        let running = self.keys.values().map(|k| k.running).max();
        self.drain_to = Some(finished.max(running).unwrap_or(-1));
    }

    /// The next message of `key`'s runner, or `None` (and the key is idle) when none waits or the drain stops here.
    fn next_for(&mut self, key: u64) -> Option<OwnedMessage> {
        let drain_to = self.drain_to;
        let next = self.keys.get_mut(&key).and_then(|run| {
            let next = run.waiting.pop_front()?;
            if drain_to.is_some_and(|last| next.offset() > last) {
                return None;
            }
            run.running = next.offset();
            Some(next)
        });
        if next.is_none() {
            self.keys.remove(&key);
        }
        next
    }

    /// Marks `offset` finished and drops the finished prefix of the window; returns the messages and bytes it
    /// released.
    fn finish(&mut self, offset: i64) -> (usize, usize) {
        if let Ok(i) = self
            .window
            .binary_search_by_key(&offset, |slot| slot.offset)
            && !self.window[i].done
        {
            self.window[i].done = true;
            self.finished_ahead += 1;
        }
        let (mut count, mut bytes) = (0, 0);
        while let Some(slot) = self.window.front() {
            if !slot.done {
                break;
            }
            self.next = Some(slot.offset + 1);
            self.finished_ahead -= 1;
            count += 1;
            bytes += slot.bytes;
            self.window.pop_front();
        }
        self.bytes -= bytes;
        (count, bytes)
    }
}

/// When a partition pauses and resumes.
struct Bounds {
    partition_count: usize,
    partition_bytes: usize,
    process_count: usize,
    process_bytes: usize,
}

impl Bounds {
    fn new(options: &ConsumerOptions) -> Self {
        Self {
            partition_count: options.max_in_flight_per_partition.max(1),
            partition_bytes: (options.max_in_flight_bytes / 4).max(1),
            process_count: options.max_in_flight.max(1),
            process_bytes: options.max_in_flight_bytes.max(1),
        }
    }

    /// At a bound (`divisor` 1) or at half of one (`divisor` 2, the resume test). A bound of 1 resumes at 0.
    fn reached(&self, book: &Book, shared: &Shared, divisor: usize) -> bool {
        self.exceeds(
            [
                book.window.len(),
                book.bytes,
                shared.in_flight.load(Ordering::Acquire),
                shared.in_flight_bytes.load(Ordering::Acquire),
            ],
            divisor,
        )
    }

    /// `[partition count, partition bytes, process count, process bytes]` against the bounds divided by `divisor`
    /// (never below 1, so that an empty window is always below them).
    fn exceeds(&self, levels: [usize; 4], divisor: usize) -> bool {
        let bounds = [
            self.partition_count,
            self.partition_bytes,
            self.process_count,
            self.process_bytes,
        ];
        levels
            .iter()
            .zip(bounds)
            .any(|(level, bound)| *level >= (bound / divisor).max(1))
    }
}

struct Poller {
    consumer: Arc<StreamConsumer<MountContext>>,
    runners: Arc<RunnerContext>,
    /// Record keys are hashed to one `u64`: two keys that collide merely wait for each other.
    keys: std::collections::hash_map::RandomState,
    ordering: KafkaOrdering,
}

/// The key of a record without one (its own ordering group).
const NO_KEY: u64 = u64::MAX;

/// How long the poller waits for a full window to drain before it pauses the partition.
const ROOM_WAIT: Duration = Duration::from_millis(200);

impl Poller {
    async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    tracing::info!("shutdown requested: no further fetching, finishing in-flight events");
                    return;
                }
                received = self.consumer.recv() => match received {
                    Ok(message) => {
                        last_error = None;
                        let full = self.route(&message);
                        drop(message);
                        if let Some(part) = full {
                            self.make_room(&part).await;
                        }
                    }
                    Err(error) => {
                        let text = error.to_string();
                        if last_error.as_deref() != Some(text.as_str()) {
                            tracing::warn!(error = %text, "consumer error (run `vectordb topics create` if a topic is missing)");
                            last_error = Some(text);
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = tick.tick() => {
                    self.runners.shared.paused.clear_if_confirmed();
                    let mut lanes = self.runners.shared.lanes();
                    self.store_progress(&mut lanes);
                    let (mut in_flight, mut ahead) = (0, 0);
                    for lane in lanes.iter_mut() {
                        let book = lane.part.book();
                        in_flight += book.window.len();
                        ahead += book.finished_ahead;
                    }
                    metrics::gauge!("aura360_kafka_in_flight_events").set(in_flight as f64);
                    metrics::gauge!("aura360_kafka_finished_ahead_events").set(ahead as f64);
                    self.adjust_pauses(&mut lanes);
                }
            }
        }
    }

    /// Waits (without fetching) until the runners bring the window below half of every bound, as librdkafka's own prefetch limits
    /// hold back the broker meanwhile. A partition still at its bound after [`ROOM_WAIT`] is stuck (a key retrying,
    /// a slow handler holding the window) and is paused, so the other partitions keep flowing. Pausing is kept for
    /// that case: librdkafka drops a paused partition's prefetched messages and fetches them again on resume.
    async fn make_room(&self, part: &Arc<Partition>) {
        let shared = &self.runners.shared;
        let deadline = tokio::time::Instant::now() + ROOM_WAIT;
        loop {
            let room = shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            shared.poller_waits.store(true, Ordering::Release);
            if !shared.bounds.reached(&part.book(), shared, 2) {
                shared.poller_waits.store(false, Ordering::Release);
                return;
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                break;
            }
        }
        shared.poller_waits.store(false, Ordering::Release);
        let mut lanes = shared.lanes();
        if let Some(lane) = lanes.iter_mut().find(|l| Arc::ptr_eq(&l.part, part))
            && !lane.paused
        {
            lane.paused = set_paused(&self.consumer, part, true);
            let book = part.book();
            tracing::info!(topic = %part.topic, partition = part.partition,
                in_flight = book.window.len(), in_flight_bytes = book.bytes,
                process_in_flight = shared.in_flight.load(Ordering::Acquire),
                "partition paused: in-flight bound reached and not draining");
        }
    }

    /// Books one message into its partition's window and starts its key's runner if the key is idle. Returns the
    /// partition when a bound is reached.
    fn route(&self, message: &BorrowedMessage<'_>) -> Option<Arc<Partition>> {
        let shared = &self.runners.shared;
        let mut lanes = shared.lanes();
        let index = match lanes.iter().position(|l| {
            l.part.partition == message.partition() && l.part.topic == message.topic()
        }) {
            Some(index) => index,
            None => {
                lanes.push(Lane::new(message.topic(), message.partition()));
                lanes.len() - 1
            }
        };
        let lane = &mut lanes[index];
        if lane.part.held.load(Ordering::Acquire) {
            // Not processed and not committed: the next owner with the handler enabled starts here.
            return None;
        }
        let offset = message.offset();
        // A type routed by header to no handler here is finished without copying or decoding it.
        if let Some(event_type) = foreign_type(message, &self.runners.registry) {
            tracing::debug!(
                topic = message.topic(),
                offset,
                event_type,
                "no handler for event type; skipped"
            );
            aura_runtime::count_skipped();
            shared.counters.skipped.fetch_add(1, Ordering::Relaxed);
            let mut book = lane.part.book();
            book.window.push_back(Slot {
                offset,
                bytes: 0,
                done: false,
            });
            shared.in_flight.fetch_add(1, Ordering::AcqRel);
            let (count, _) = book.finish(offset);
            shared.in_flight.fetch_sub(count, Ordering::AcqRel);
            return None;
        }
        let key = match self.ordering {
            KafkaOrdering::Partition => 0,
            KafkaOrdering::Key => message.key().map_or(NO_KEY, |k| self.keys.hash_one(k)),
        };
        let bytes = message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len);
        let owned = message.detach();
        let (start, behind) = {
            let mut book = lane.part.book();
            book.window.push_back(Slot {
                offset,
                bytes,
                done: false,
            });
            book.bytes += bytes;
            shared.in_flight.fetch_add(1, Ordering::AcqRel);
            shared.in_flight_bytes.fetch_add(bytes, Ordering::AcqRel);
            let start = match book.keys.entry(key) {
                Entry::Occupied(mut run) => {
                    run.get_mut().waiting.push_back(owned);
                    None
                }
                Entry::Vacant(idle) => {
                    idle.insert(KeyRun {
                        running: offset,
                        waiting: VecDeque::new(),
                    });
                    Some(owned)
                }
            };
            (
                start,
                !lane.paused && shared.bounds.reached(&book, shared, 1),
            )
        };
        if let Some(message) = start {
            lane.part.running.fetch_add(1, Ordering::AcqRel);
            tokio::spawn(
                self.runners
                    .clone()
                    .run_key(lane.part.clone(), key, message),
            );
        }
        behind.then(|| lane.part.clone())
    }

    /// Stores the committable offset of every lane that moved, in one call, and remembers what it stored.
    fn store_progress(&self, lanes: &mut [Lane]) {
        let moved = progress_to_store(lanes);
        if moved.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::with_capacity(moved.len());
        for &(i, next) in &moved {
            let _ = list.add_partition_offset(
                &lanes[i].part.topic,
                lanes[i].part.partition,
                Offset::Offset(next),
            );
        }
        match self.consumer.store_offsets(&list) {
            Ok(()) => record_stored(lanes, &moved),
            // A partition taken away meanwhile: its new owner redelivers (at-least-once). Nothing is marked
            // stored, so the next tick tries again.
            Err(error) => tracing::debug!(%error, "offsets not stored"),
        }
    }

    /// Pauses held lanes; resumes lanes that are healthy again and below half of every bound.
    fn adjust_pauses(&self, lanes: &mut [Lane]) {
        let shared = &self.runners.shared;
        for lane in lanes.iter_mut() {
            let held = lane.part.held.load(Ordering::Acquire);
            if held && !lane.paused {
                lane.paused = set_paused(&self.consumer, &lane.part, true);
                tracing::info!(topic = %lane.part.topic, partition = lane.part.partition, "partition paused: held");
            } else if lane.paused && !held && !shared.bounds.reached(&lane.part.book(), shared, 2) {
                lane.paused = set_paused(&self.consumer, &lane.part, false);
                tracing::info!(topic = %lane.part.topic, partition = lane.part.partition, "partition resumed");
            }
        }
    }
}

/// Pauses or resumes one partition; returns the resulting paused state.
fn set_paused(consumer: &StreamConsumer<MountContext>, part: &Partition, pause: bool) -> bool {
    let mut list = TopicPartitionList::new();
    list.add_partition(&part.topic, part.partition);
    let result = if pause {
        consumer.pause(&list)
    } else {
        consumer.resume(&list)
    };
    match result {
        Ok(()) => pause,
        Err(error) => {
            tracing::warn!(%error, topic = %part.topic, partition = part.partition, pause, "pause/resume failed");
            !pause
        }
    }
}

/// What every runner needs.
struct RunnerContext {
    registry: Arc<Registry>,
    dispatcher: Dispatcher,
    dead_letters: KafkaPublisher,
    retry: RetryPolicy,
    max_event_bytes: usize,
    spool: PathBuf,
    observer: Option<Arc<dyn DependencyObserver>>,
    shared: Arc<Shared>,
    /// `KAFKA_CONCURRENCY`.
    slots: Semaphore,
}

/// How one message ended.
enum Finished {
    Handled,
    Skipped,
    DeadLettered,
    /// Its handler is disabled: keep it (and everything after it) uncommitted.
    Held(&'static str),
    /// Revoked or shutting down while retrying: left uncommitted for redelivery.
    Abandoned,
}

/// Counts a runner out when it ends, however it ends.
struct Running(Arc<Partition>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RunnerContext {
    /// Handles `message` and then every message that queues behind its key, one at a time, until none waits.
    async fn run_key(self: Arc<Self>, part: Arc<Partition>, key: u64, mut message: OwnedMessage) {
        let running = Running(part.clone());
        loop {
            let finished = if part.abort.is_cancelled() || part.held.load(Ordering::Acquire) {
                Finished::Abandoned
            } else {
                let slot = tokio::select! {
                    slot = self.slots.acquire() => slot.ok(),
                    () = part.abort.cancelled() => None,
                };
                match slot {
                    // Once the partition is gone (lost, or the grace period after its revocation is over) an event
                    // still running is dropped where it is: its outputs would be stale work, its new owner runs it.
                    Some(_slot) => tokio::select! {
                        biased;
                        () = part.abort.cancelled() => Finished::Abandoned,
                        finished = self.process(&message, &part) => finished,
                    },
                    None => Finished::Abandoned,
                }
            };
            let counters = &self.shared.counters;
            match finished {
                Finished::Handled => counters.handled.fetch_add(1, Ordering::Relaxed),
                Finished::Skipped => counters.skipped.fetch_add(1, Ordering::Relaxed),
                Finished::DeadLettered => counters.dead_lettered.fetch_add(1, Ordering::Relaxed),
                Finished::Held(handler) => {
                    tracing::warn!(
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        handler,
                        "handler disabled: partition held at this offset (nothing further committed)"
                    );
                    counters.held.fetch_add(1, Ordering::Relaxed);
                    part.held.store(true, Ordering::Release);
                    part.book().keys.remove(&key);
                    return;
                }
                Finished::Abandoned => {
                    // Nothing after an abandoned event can be committed: stop the rest of the window too.
                    part.abort.cancel();
                    part.book().keys.remove(&key);
                    return;
                }
            };
            let next = {
                let mut book = part.book();
                let (count, bytes) = book.finish(message.offset());
                self.shared.in_flight.fetch_sub(count, Ordering::AcqRel);
                self.shared
                    .in_flight_bytes
                    .fetch_sub(bytes, Ordering::AcqRel);
                if count > 0
                    && self.shared.poller_waits.load(Ordering::Acquire)
                    && !self.shared.bounds.reached(&book, &self.shared, 2)
                {
                    self.shared.room.notify_waiters();
                }
                book.next_for(key)
            };
            match next {
                Some(next) => message = next,
                None => break,
            }
        }
        drop(running);
    }

    /// Decodes, dispatches and dead-letters one message, retrying transient failures until they pass or the
    /// partition is revoked or the process stops.
    async fn process(&self, message: &OwnedMessage, part: &Partition) -> Finished {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.attempt(message).await {
                Ok(finished) => return finished,
                Err(error) => error,
            };
            let delay = self.retry.delay(attempt);
            tracing::warn!(topic = message.topic(), partition = message.partition(), offset = message.offset(),
                attempt, retry_in_ms = delay.as_millis() as u64, %error, "transient failure; retrying (its key waits)");
            tokio::select! {
                () = part.cancel.cancelled() => return Finished::Abandoned,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One attempt; `Err` is a transient failure worth retrying.
    async fn attempt(&self, message: &OwnedMessage) -> Result<Finished, String> {
        // Types routed by header to no handler never reach a runner (the poller finished them).
        let event = match decode_event(message, self.max_event_bytes) {
            Ok(event) => event,
            Err(reason) => return self.dead_letter(message, "decode", &reason).await,
        };
        match self.dispatcher.dispatch(&event).await {
            Ok(Outcome::Handled { .. }) => Ok(Finished::Handled),
            Ok(Outcome::Unhandled) => Ok(Finished::Skipped),
            Ok(Outcome::Disabled { handler }) => Ok(Finished::Held(handler)),
            Err(failure) if failure.error.is_transient() => Err(failure.to_string()),
            Err(failure) => {
                let handler = failure.handler.unwrap_or("decode");
                self.dead_letter(message, handler, &failure.error.to_string())
                    .await
            }
        }
    }

    /// The original bytes, key and headers to `<topic>.dlq`, plus why; acknowledged before the source is committed.
    ///
    /// A record too large for the producer keeps its headers and the start of its value, with `original_size` and
    /// `original_sha256`. When the dead-letter topic refuses the record for good (authorization, a topic-level size
    /// limit), it is appended to the spool on disk instead, `/health` turns degraded and the partition moves on:
    /// holding it forever would stop every later event of the partition for one that is kept anyway. Only when
    /// even the spool cannot be written does this fail (transient: the lane retries, loudly).
    async fn dead_letter(
        &self,
        message: &OwnedMessage,
        handler: &str,
        reason: &str,
    ) -> Result<Finished, String> {
        let letter = DeadLetterRecord::new(
            message,
            handler,
            reason,
            self.dead_letters.message_max_bytes(),
        );
        let record = letter.record(message);
        let sent = self.dead_letters.send(record).await;
        let observe = |outcome| {
            if let Some(observer) = &self.observer {
                observer.report(names::DEAD_LETTERS, outcome);
            }
        };
        match sent {
            Ok(_) => observe(Ok(())),
            Err(error) if crate::publisher::is_permanent(&error) => {
                let why = format!("{} refused the dead letter: {error}", letter.topic);
                self.spool(message, &letter, &why).await?;
                observe(Err(format!(
                    "{why}; dead letters are spooled under {} (fix the topic's ACL or max.message.bytes, then \
                     `vectordb replay --file` them)",
                    self.spool.display()
                )));
            }
            Err(error) => {
                observe(Err(format!("writing to {}: {error}", letter.topic)));
                return Err(format!(
                    "writing the dead letter to {}: {error}",
                    letter.topic
                ));
            }
        }
        tracing::warn!(source_topic = message.topic(), partition = message.partition(), offset = message.offset(),
            handler, reason, dead_letter_topic = %letter.topic, "dead-lettered");
        metrics::counter!("aura360_dead_letters_total", "backend" => "kafka", "handler" => handler.to_owned())
            .increment(1);
        Ok(Finished::DeadLettered)
    }

    /// Appends the dead letter (whole original value, every header) to `<spool>/<topic>.dlq.jsonl`, synced.
    async fn spool(
        &self,
        message: &OwnedMessage,
        letter: &DeadLetterRecord,
        why: &str,
    ) -> Result<(), String> {
        let mut exported = crate::offsets::exported(message);
        exported.topic = letter.topic.clone();
        exported.headers.extend(
            letter
                .headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone())),
        );
        exported.headers.remove(TRUNCATION_HEADERS[0]);
        exported.headers.remove(TRUNCATION_HEADERS[1]);
        exported.headers.remove(TRUNCATION_HEADERS[2]);
        let mut line = serde_json::to_vec(&exported).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let path = self.spool.join(format!("{}.jsonl", letter.topic));
        let written = tokio::task::spawn_blocking({
            let path = path.clone();
            move || append_synced(&path, &line)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        match written {
            Ok(()) => {
                tracing::error!(source_topic = message.topic(), partition = message.partition(),
                    offset = message.offset(), spool = %path.display(), error = why,
                    "dead letter spooled to disk: the dead-letter topic refused it (fix its ACL or size limit, then \
                     `vectordb replay --file` the spool)");
                metrics::counter!("aura360_dead_letters_spooled_total", "backend" => "kafka")
                    .increment(1);
                Ok(())
            }
            Err(error) => Err(format!(
                "{why}, and spooling it to {} failed: {error}",
                path.display()
            )),
        }
    }
}

fn append_synced(path: &std::path::Path, line: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(line)?;
    file.sync_data()
}

/// What a dead letter carries beyond the original record: where it goes and the headers it adds.
struct DeadLetterRecord {
    topic: String,
    headers: Vec<(&'static str, String)>,
    /// Bytes of the value to send: all of it, or the start of one that would not fit.
    value_len: Option<usize>,
}

/// Characters of the `error` header (a reason may quote a long schema error).
const ERROR_HEADER_CHARS: usize = 2_000;
/// Headers a cut dead letter adds.
const TRUNCATION_HEADERS: [&str; 3] = ["original_size", "original_sha256", "payload_truncated"];

impl DeadLetterRecord {
    /// `max_record` is the producer's `message.max.bytes`; a record is kept 4% under it for librdkafka's framing.
    fn new(message: &OwnedMessage, handler: &str, reason: &str, max_record: usize) -> Self {
        let (reason, _) = aura_runtime::events::limits::truncate_chars(reason, ERROR_HEADER_CHARS);
        let mut headers = vec![
            ("error", reason.to_owned()),
            ("source_topic", message.topic().to_owned()),
            ("source_partition", message.partition().to_string()),
            ("source_offset", message.offset().to_string()),
            ("handler", handler.to_owned()),
        ];
        let kept_headers: usize = message.headers().map_or(0, |h| {
            h.iter()
                .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
                .sum()
        });
        let overhead = kept_headers
            + message.key().map_or(0, <[u8]>::len)
            + headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + 256;
        let value_len = message.payload().map(|payload| {
            let room = (max_record / 100 * 96).saturating_sub(overhead);
            if payload.len() <= room {
                return payload.len();
            }
            headers.push((TRUNCATION_HEADERS[0], payload.len().to_string()));
            headers.push((TRUNCATION_HEADERS[1], sha256_hex(payload)));
            headers.push((TRUNCATION_HEADERS[2], "true".to_owned()));
            room.saturating_sub(200)
        });
        Self {
            topic: aura_runtime::events::routing::dead_letter_topic(message.topic()),
            headers,
            value_len,
        }
    }

    fn record<'a>(&'a self, message: &'a OwnedMessage) -> OutgoingRecord<'a> {
        let mut headers: Vec<(&str, &[u8])> = message
            .headers()
            .map(|h| {
                h.iter()
                    .filter(|h| {
                        !DEAD_LETTER_HEADERS.contains(&h.key)
                            && !TRUNCATION_HEADERS.contains(&h.key)
                    })
                    .map(|h| (h.key, h.value.unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        headers.extend(self.headers.iter().map(|(k, v)| (*k, v.as_bytes())));
        OutgoingRecord {
            topic: &self.topic,
            key: message.key(),
            payload: message
                .payload()
                .zip(self.value_len)
                .map(|(payload, len)| &payload[..len]),
            headers,
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The headers a dead letter adds to the original record's (a replay to the source strips them).
pub const DEAD_LETTER_HEADERS: [&str; 5] = [
    "error",
    "source_topic",
    "source_partition",
    "source_offset",
    "handler",
];

/// What a record holds for the mount.
#[derive(Debug)]
pub enum Decoded {
    Event(Box<Event>),
    /// A type announced by the `event_type` header that no handler here knows: skipped without decoding.
    Foreign(String),
}

/// The `event_type` header's value, when it is text.
fn header_type<M: Message>(message: &M) -> Option<&str> {
    message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == "event_type")
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    })
}

/// The type of a record whose `event_type` header names a type no handler here knows: it is skipped unread.
fn foreign_type<'m, M: Message>(message: &'m M, registry: &Registry) -> Option<&'m str> {
    header_type(message).filter(|t| matches!(registry.route(t), Route::Unhandled))
}

/// The event of a message, routed by its `event_type` header when present (else the JSON body's). `Err` is the
/// reason it is dead-lettered.
pub fn decode<M: Message>(
    message: &M,
    registry: &Registry,
    max_event_bytes: usize,
) -> Result<Decoded, String> {
    match foreign_type(message, registry) {
        Some(event_type) => Ok(Decoded::Foreign(event_type.to_owned())),
        None => decode_event(message, max_event_bytes).map(Decoded::Event),
    }
}

/// The event of a message whose type is not known to be foreign, routed by its `event_type` header when present
/// (else the JSON body's). `Err` is the reason it is dead-lettered.
fn decode_event<M: Message>(message: &M, max_event_bytes: usize) -> Result<Box<Event>, String> {
    let header_type = header_type(message);
    let payload = message
        .payload()
        .ok_or_else(|| "empty message (no value)".to_owned())?;
    if payload.len() > max_event_bytes {
        return Err(format!(
            "event is {} bytes, over MAX_EVENT_BYTES={max_event_bytes}",
            payload.len()
        ));
    }
    let mut event = Event::from_slice(payload).map_err(|e| e.to_string())?;
    if let Some(event_type) = header_type
        && event_type != event.event_type
    {
        tracing::warn!(header = %event_type, body = %event.event_type, offset = message.offset(),
            "event_type header and body disagree; routing by the header");
        event.event_type = event_type.to_owned();
    }
    Ok(Box::new(event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(offsets: &[i64]) -> Book {
        let mut book = Book::default();
        for &offset in offsets {
            book.window.push_back(Slot {
                offset,
                bytes: 10,
                done: false,
            });
            book.bytes += 10;
        }
        book
    }

    #[test]
    fn a_bound_of_one_pauses_at_one_and_resumes_at_zero() {
        let bounds = Bounds::new(&ConsumerOptions {
            max_in_flight_per_partition: 1,
            max_in_flight: 1,
            max_in_flight_bytes: 1,
            ..ConsumerOptions::default()
        });
        assert!(!bounds.exceeds([0, 0, 0, 0], 1));
        assert!(
            !bounds.exceeds([0, 0, 0, 0], 2),
            "an empty window must resume"
        );
        assert!(bounds.exceeds([1, 0, 1, 0], 1));
        assert!(bounds.exceeds([1, 0, 1, 0], 2));
        let defaults = Bounds::new(&ConsumerOptions::default());
        assert!(!defaults.exceeds([999, 0, 999, 0], 1));
        assert!(defaults.exceeds([1_000, 0, 1_000, 0], 1));
        assert!(defaults.exceeds([500, 0, 500, 0], 2));
        assert!(!defaults.exceeds([499, 0, 499, 0], 2));
    }

    #[test]
    fn an_offset_finished_while_the_last_one_was_being_stored_is_stored_on_the_next_tick() {
        let lane = Lane::new("t", 0);
        *lane.part.book() = book(&[4, 5]);
        let mut lanes = vec![lane];
        lanes[0].part.book().finish(4);
        let moved = progress_to_store(&lanes);
        assert_eq!(moved, [(0, 5)]);
        // A runner finishes the partition's last event between the read and the end of the store.
        lanes[0].part.book().finish(5);
        record_stored(&mut lanes, &moved);
        assert_eq!(lanes[0].stored, Some(5));
        assert_eq!(
            progress_to_store(&lanes),
            [(0, 6)],
            "the last offset is still to store (it was marked stored unstored before: committed stayed at N-1)"
        );
    }

    #[test]
    fn the_committable_offset_is_the_end_of_the_finished_prefix_and_never_passes_a_gap() {
        // Offsets need not be contiguous (compaction, transaction markers).
        let mut book = book(&[4, 5, 7, 8, 9]);
        assert_eq!(book.finish(7), (0, 0));
        assert_eq!(book.finish(9), (0, 0));
        assert_eq!((book.next, book.finished_ahead), (None, 2));
        assert_eq!(book.finish(4), (1, 10));
        assert_eq!(book.next, Some(5));
        assert_eq!(book.finish(5), (2, 20), "5 and the already finished 7");
        assert_eq!(
            (book.next, book.finished_ahead, book.window.len()),
            (Some(8), 1, 2)
        );
        // A second report of the same offset, or one not in the window, changes nothing.
        assert_eq!(book.finish(9), (0, 0));
        assert_eq!(book.finish(100), (0, 0));
        assert_eq!(book.finish(8), (2, 20));
        assert_eq!(
            (book.next, book.finished_ahead, book.bytes),
            (Some(10), 0, 0)
        );
        assert!(book.window.is_empty());
    }
}
