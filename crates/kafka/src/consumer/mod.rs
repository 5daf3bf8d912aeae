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

mod bounds;
mod dead_letter;
mod decode;
mod options;
mod poller;
mod rebalance;
mod runner;
mod window;

use bounds::*;
use dead_letter::*;
use poller::*;
use rebalance::*;
use runner::*;
use window::*;

pub use dead_letter::DEAD_LETTER_HEADERS;
use decode::*;
pub use decode::{Decoded, decode};
pub use options::ConsumerOptions;

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

/// How soon librdkafka fetches again after its queue reached `queued.max.messages.kbytes`. Its default, 1 s, left the
/// consumer idle for most of each second whenever a window was full (the poller then stops taking from the queue,
/// which fills): a full window drains in tens of milliseconds.
const FETCH_QUEUE_BACKOFF_MS: u32 = 50;

/// librdkafka's prefetch queue (`queued.max.messages.kbytes`, which also caps one fetch's `fetch.max.bytes`): a
/// thirty-second of `KAFKA_MAX_IN_FLIGHT_BYTES` (2 MiB by default), between 1 MiB and 64 MiB. Fetched records wait
/// there until the poller books them; while the windows are full it is the only other copy of them in memory.
fn prefetch_kbytes(options: &ConsumerOptions) -> usize {
    (options.max_in_flight_bytes / 32 / 1024).clamp(1024, 64 * 1024)
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

/// The group member: offsets stored by us after each event's work and committed by librdkafka every second, the
/// session and assignment strategy of the settings, a heartbeat a third of the session, the prefetch queue of
/// [`prefetch_kbytes`].
fn group_consumer(
    settings: &KafkaSettings,
    options: &ConsumerOptions,
    shared: &Arc<Shared>,
) -> Result<StreamConsumer<MountContext>, ClientError> {
    client_config(settings)?
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("allow.auto.create.topics", "false")
        .set(
            "queued.max.messages.kbytes",
            prefetch_kbytes(options).to_string(),
        )
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS.to_string())
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
        .map_err(ClientError::create("consumer", settings))
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
    let consumer = Arc::new(group_consumer(settings, &options, &shared)?);
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
        depth: options.pipeline_depth.max(1),
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
        assert!(!defaults.exceeds([499, 0, 499, 0], 1));
        assert!(defaults.exceeds([500, 0, 500, 0], 1));
        assert!(defaults.exceeds([250, 0, 250, 0], 2));
        assert!(!defaults.exceeds([249, 0, 249, 0], 2));
    }

    #[test]
    fn the_prefetch_queue_is_a_thirty_second_of_the_in_flight_bytes_within_1_to_64_mib() {
        let with = |bytes| {
            prefetch_kbytes(&ConsumerOptions {
                max_in_flight_bytes: bytes,
                ..ConsumerOptions::default()
            })
        };
        assert_eq!(prefetch_kbytes(&ConsumerOptions::default()), 2 * 1024);
        assert_eq!(with(1), 1024);
        assert_eq!(with(8 << 30), 64 * 1024);
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
