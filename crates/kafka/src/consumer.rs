//! The consumer-group loop behind `vectordb-consumer` (DESIGN §5, §6).
//!
//! One task (the *poller*) receives messages and hands each to its partition's *lane*: a task that processes its
//! partition's messages one at a time, in offset order. Lanes run concurrently. After an event was handled and
//! every event it produced was acknowledged by the broker — or after it was written to `<topic>.dlq` — the lane
//! stores `offset + 1`; librdkafka commits stored offsets every second, on revocation and on close
//! (`enable.auto.commit` with `enable.auto.offset.store=false`: nothing is committed that was not finished).
//!
//! A lane whose event keeps failing transiently retries it with backoff and never skips it; its backlog grows until
//! the poller pauses the partition, while polling (and so the group session) goes on for the other partitions.
//! An event whose handler is disabled *holds* its partition: paused, nothing further committed, resumed from the
//! committed offset by the next process that has the handler enabled.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aura_runtime::events::Event;
use aura_runtime::events::limits::Limits;
use aura_runtime::observe::names;
use aura_runtime::settings::KafkaSettings;
use aura_runtime::{DependencyObserver, Dispatcher, Outcome, Registry, RetryPolicy, Route};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::publisher::OutgoingRecord;
use crate::{ClientError, KafkaPublisher, TopicNames, client_config};

#[derive(Clone)]
pub struct ConsumerOptions {
    /// Backoff for transient failures; `max_attempts` is ignored (a partition never skips a failing event).
    pub retry: RetryPolicy,
    /// How long SIGTERM (or a revocation) waits for in-flight events before giving up on them (uncommitted).
    pub grace: Duration,
    /// A partition is paused while its lane retries an event, or when this many of its messages wait in its lane
    /// (a memory bound); it is resumed once the lane is healthy and below `low_water`. Pausing discards librdkafka's
    /// prefetched messages for the partition, so it is kept for lanes that are really stuck.
    pub high_water: usize,
    pub low_water: usize,
    /// The same bound in bytes of message values waiting in one lane: journal-sized events reach it long before
    /// `high_water` messages.
    pub high_water_bytes: usize,
    /// `MAX_EVENT_BYTES`: a larger record is dead-lettered unread.
    pub max_event_bytes: usize,
    /// `DEAD_LETTER_SPOOL_DIR`: where a dead letter goes when `<topic>.dlq` refuses it for good (authorization, a
    /// record the broker will not take): one JSONL file per dead-letter topic, in `vectordb export`'s format.
    pub dead_letter_spool: PathBuf,
    /// Told when dead letters cannot be written (and when they can again): `/health`.
    pub observer: Option<Arc<dyn DependencyObserver>>,
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
            high_water: 10_000,
            low_water: 1_000,
            high_water_bytes: 8 * 1024 * 1024,
            max_event_bytes: Limits::default().max_event_bytes,
            dead_letter_spool: PathBuf::from("data/dead-letters"),
            observer: None,
        }
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
/// subscribed, so its committed offsets stay where they are (DESIGN §5).
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
    let stopping = CancellationToken::new();
    let shared = Arc::new(Shared {
        lanes: Mutex::new(HashMap::new()),
        grace: options.grace,
        counters: Counters::default(),
    });
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
    tracing::info!(group = %settings.group_id, topics = %topics.join(","), "consumer subscribed");

    let lane_context = Arc::new(LaneContext {
        consumer: consumer.clone(),
        registry,
        dispatcher,
        dead_letters,
        retry: options.retry.clone(),
        max_event_bytes: options.max_event_bytes,
        spool: options.dead_letter_spool.clone(),
        observer: options.observer.clone(),
        shared: shared.clone(),
    });
    let poller = Poller {
        consumer: consumer.clone(),
        lanes: lane_context,
        stopping: stopping.clone(),
        options,
    };
    poller.run(shutdown).await;

    // Stop: no lane starts another event, retries give up, in-flight events finish within the grace period.
    stopping.cancel();
    let lanes: Vec<Lane> = shared.lanes().drain().map(|(_, lane)| lane).collect();
    let deadline = tokio::time::Instant::now() + shared.grace;
    for lane in lanes {
        let mut task = lane.task;
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            tracing::warn!(topic = %lane.topic, partition = lane.partition,
                "in-flight event did not finish within the grace period; it stays uncommitted");
            task.abort();
        }
    }
    drop(poller);
    // The final commit and the close share what is left of the grace period (at least a second, at most
    // CLOSE_LIMIT): with the broker down, a synchronous commit waits until the session times out, and the exit must
    // stay bounded whatever the broker does.
    let left = deadline
        .saturating_duration_since(tokio::time::Instant::now())
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

type PartitionKey = (String, i32);

/// State the poller, the lanes and the rebalance callback share.
struct Shared {
    lanes: Mutex<HashMap<PartitionKey, Lane>>,
    grace: Duration,
    counters: Counters,
}

impl Shared {
    fn lanes(&self) -> MutexGuard<'_, HashMap<PartitionKey, Lane>> {
        // A panicking lane never holds this lock across its work; the map stays consistent.
        self.lanes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Revocation: stop the revoked lanes and give their in-flight events the grace period to finish and store
    /// their offsets, which librdkafka commits right after this callback returns.
    fn revoke(&self, partitions: &TopicPartitionList) {
        let revoked: Vec<Lane> = {
            let mut lanes = self.lanes();
            partitions
                .elements()
                .iter()
                .filter_map(|p| lanes.remove(&(p.topic().to_owned(), p.partition())))
                .collect()
        };
        for lane in &revoked {
            lane.state.cancel.cancel();
        }
        let wait = || {
            let deadline = Instant::now() + self.grace;
            while revoked.iter().any(|l| l.state.busy.load(Ordering::Acquire))
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

impl ClientContext for MountContext {}

impl ConsumerContext for MountContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            self.shared.revoke(partitions);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                tracing::info!(partitions = %describe(partitions), "partitions assigned");
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

/// One partition's ordered worker, as the poller sees it.
struct Lane {
    topic: String,
    partition: i32,
    sender: mpsc::UnboundedSender<OwnedMessage>,
    state: Arc<LaneState>,
    paused: bool,
    task: tokio::task::JoinHandle<()>,
}

struct LaneState {
    /// Messages handed to the lane and not finished yet.
    backlog: AtomicUsize,
    /// Their value bytes.
    backlog_bytes: AtomicUsize,
    /// An event is being processed (revocation and shutdown wait for it).
    busy: AtomicBool,
    /// Stopped at an event whose handler is disabled.
    held: AtomicBool,
    /// Retrying a transiently failing event.
    retrying: AtomicBool,
    /// Revocation or shutdown: take no further event, abandon retries.
    cancel: CancellationToken,
}

struct Poller {
    consumer: Arc<StreamConsumer<MountContext>>,
    lanes: Arc<LaneContext>,
    stopping: CancellationToken,
    options: ConsumerOptions,
}

impl Poller {
    async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
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
                        self.route(message.detach());
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
                _ = tick.tick() => self.adjust_pauses(),
            }
        }
    }

    fn route(&self, message: OwnedMessage) {
        let key = (message.topic().to_owned(), message.partition());
        let mut lanes = self.lanes.shared.lanes();
        let lane = lanes
            .entry(key)
            .or_insert_with_key(|(topic, partition)| self.spawn_lane(topic, *partition));
        if lane.state.held.load(Ordering::Acquire) {
            // Not processed and not committed: the next owner with the handler enabled starts here.
            return;
        }
        let bytes = message_bytes(&message);
        lane.state.backlog.fetch_add(1, Ordering::AcqRel);
        lane.state.backlog_bytes.fetch_add(bytes, Ordering::AcqRel);
        if lane.sender.send(message).is_err() {
            lane.state.backlog.fetch_sub(1, Ordering::AcqRel);
            lane.state.backlog_bytes.fetch_sub(bytes, Ordering::AcqRel);
        }
        let behind = lane.state.backlog.load(Ordering::Acquire) >= self.options.high_water
            || lane.state.backlog_bytes.load(Ordering::Acquire) >= self.options.high_water_bytes;
        if !lane.paused && behind {
            lane.paused = set_paused(&self.consumer, lane, true);
            tracing::info!(topic = %lane.topic, partition = lane.partition,
                backlog = lane.state.backlog.load(Ordering::Acquire),
                backlog_bytes = lane.state.backlog_bytes.load(Ordering::Acquire),
                "partition paused: its lane is behind");
        }
    }

    fn spawn_lane(&self, topic: &str, partition: i32) -> Lane {
        let (sender, receiver) = mpsc::unbounded_channel();
        let state = Arc::new(LaneState {
            backlog: AtomicUsize::new(0),
            backlog_bytes: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            held: AtomicBool::new(false),
            retrying: AtomicBool::new(false),
            cancel: self.stopping.child_token(),
        });
        let task = tokio::spawn(self.lanes.clone().run(receiver, state.clone()));
        Lane {
            topic: topic.to_owned(),
            partition,
            sender,
            state,
            paused: false,
            task,
        }
    }

    /// Pauses held and retrying lanes; resumes lanes that are healthy again and caught up.
    fn adjust_pauses(&self) {
        let mut lanes = self.lanes.shared.lanes();
        for lane in lanes.values_mut() {
            let stuck = lane.state.held.load(Ordering::Acquire)
                || lane.state.retrying.load(Ordering::Acquire);
            let caught_up = lane.state.backlog.load(Ordering::Acquire) <= self.options.low_water
                && lane.state.backlog_bytes.load(Ordering::Acquire)
                    <= self.options.high_water_bytes / 4;
            if stuck && !lane.paused {
                lane.paused = set_paused(&self.consumer, lane, true);
                tracing::info!(topic = %lane.topic, partition = lane.partition, "partition paused: its lane is retrying or held");
            } else if lane.paused && caught_up && !stuck {
                lane.paused = set_paused(&self.consumer, lane, false);
                tracing::info!(topic = %lane.topic, partition = lane.partition, "partition resumed");
            }
        }
    }
}

/// Pauses or resumes one partition; returns the resulting paused state.
fn set_paused(consumer: &StreamConsumer<MountContext>, lane: &Lane, pause: bool) -> bool {
    let mut list = TopicPartitionList::new();
    list.add_partition(&lane.topic, lane.partition);
    let result = if pause {
        consumer.pause(&list)
    } else {
        consumer.resume(&list)
    };
    match result {
        Ok(()) => pause,
        Err(error) => {
            tracing::warn!(%error, topic = %lane.topic, partition = lane.partition, pause, "pause/resume failed");
            !pause
        }
    }
}

/// What every lane needs.
struct LaneContext {
    consumer: Arc<StreamConsumer<MountContext>>,
    registry: Arc<Registry>,
    dispatcher: Dispatcher,
    dead_letters: KafkaPublisher,
    retry: RetryPolicy,
    max_event_bytes: usize,
    spool: PathBuf,
    observer: Option<Arc<dyn DependencyObserver>>,
    shared: Arc<Shared>,
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

impl LaneContext {
    async fn run(
        self: Arc<Self>,
        mut receiver: mpsc::UnboundedReceiver<OwnedMessage>,
        state: Arc<LaneState>,
    ) {
        loop {
            let message = tokio::select! {
                biased;
                () = state.cancel.cancelled() => return,
                message = receiver.recv() => match message {
                    Some(message) => message,
                    None => return,
                },
            };
            state.busy.store(true, Ordering::Release);
            let finished = self.process(&message, &state).await;
            let counters = &self.shared.counters;
            let counter = match finished {
                Finished::Handled => &counters.handled,
                Finished::Skipped => &counters.skipped,
                Finished::DeadLettered => &counters.dead_lettered,
                Finished::Held(handler) => {
                    tracing::warn!(
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        handler,
                        "handler disabled: partition held at this offset (nothing further committed)"
                    );
                    counters.held.fetch_add(1, Ordering::Relaxed);
                    state.held.store(true, Ordering::Release);
                    state.busy.store(false, Ordering::Release);
                    return;
                }
                Finished::Abandoned => {
                    state.busy.store(false, Ordering::Release);
                    return;
                }
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = self.store_next_offset(&message) {
                // The partition was taken away meanwhile: its new owner redelivers (at-least-once).
                tracing::debug!(%error, topic = message.topic(), partition = message.partition(), "offset not stored");
            }
            state.backlog.fetch_sub(1, Ordering::AcqRel);
            state
                .backlog_bytes
                .fetch_sub(message_bytes(&message), Ordering::AcqRel);
            state.busy.store(false, Ordering::Release);
        }
    }

    /// Marks everything up to `message` done: the next commit of its partition is `offset + 1`. (`store_offsets`
    /// stores the offset as given; the older `rd_kafka_offset_store` behind `store_offset` adds 1 itself.)
    fn store_next_offset(&self, message: &OwnedMessage) -> KafkaResult<()> {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(
            message.topic(),
            message.partition(),
            Offset::Offset(message.offset() + 1),
        )?;
        self.consumer.store_offsets(&list)
    }

    /// Decodes, dispatches and dead-letters one message, retrying transient failures until they pass or the lane is
    /// cancelled.
    async fn process(&self, message: &OwnedMessage, state: &LaneState) -> Finished {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.attempt(message).await {
                Ok(finished) => {
                    state.retrying.store(false, Ordering::Release);
                    return finished;
                }
                Err(error) => error,
            };
            state.retrying.store(true, Ordering::Release);
            let delay = self.retry.delay(attempt);
            tracing::warn!(topic = message.topic(), partition = message.partition(), offset = message.offset(),
                attempt, retry_in_ms = delay.as_millis() as u64, %error, "transient failure; retrying (partition held)");
            tokio::select! {
                () = state.cancel.cancelled() => return Finished::Abandoned,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One attempt; `Err` is a transient failure worth retrying.
    async fn attempt(&self, message: &OwnedMessage) -> Result<Finished, String> {
        let event = match decode(message, &self.registry, self.max_event_bytes) {
            Ok(Decoded::Event(event)) => event,
            Ok(Decoded::Foreign(event_type)) => {
                tracing::info!(
                    topic = message.topic(),
                    offset = message.offset(),
                    event_type,
                    "no handler for event type; skipped"
                );
                metrics::counter!("aura360_events_processed_total", "handler" => "none", "outcome" => "skipped")
                    .increment(1);
                return Ok(Finished::Skipped);
            }
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

/// What a message holds in memory, as the lanes' byte bound counts it.
fn message_bytes(message: &OwnedMessage) -> usize {
    message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len)
}

/// The event of a message, routed by its `event_type` header when present (else the JSON body's). `Err` is the
/// reason it is dead-lettered.
pub fn decode(
    message: &OwnedMessage,
    registry: &Registry,
    max_event_bytes: usize,
) -> Result<Decoded, String> {
    let header_type = message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == "event_type")
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    });
    if let Some(event_type) = &header_type
        && matches!(registry.route(event_type), Route::Unhandled)
    {
        return Ok(Decoded::Foreign(event_type.clone()));
    }
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
        event.event_type = event_type;
    }
    Ok(Decoded::Event(Box::new(event)))
}
