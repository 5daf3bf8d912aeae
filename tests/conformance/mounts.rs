//! The harness: one trait, three mounts of the standard handlers — the in-memory bus, the Kafka consumer loop
//! (`run_consumer` against the tests' Apache Kafka) and the Celery worker (`CeleryWorker` against a `redis-server` of its own).
//!
//! Every mount runs the real handlers, dispatcher and store (embedded Qdrant); the scenarios steer the probes in
//! front of the store, the embedder and the publisher (`probes.rs`). "SIGTERM" is the shutdown future the binaries
//! resolve on SIGTERM; "acknowledged" is the mount's own: a committed offset, a Celery ack (`unacked` entry removed).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aura_celery::protocol::TaskMessage;
use aura_celery::transport::{Patience, UNACKED, dead_letter_key};
use aura_celery::{Broker, CeleryPublisher, CeleryWorker, ResultBackend, WorkerOptions};
use aura_cli::standard_registry;
use aura_kafka::offsets::{Range, group_lag, read_range};
use aura_kafka::{ConsumerOptions, KafkaPublisher, TopicNames, create_topics, run_consumer};
use aura_runtime::events::Event;
use aura_runtime::settings::KafkaSettings;
use aura_runtime::testing::{Embedded, embedded};
use aura_runtime::{Dispatcher, HandlerContext, InMemoryBus, Publisher, Registry, RetryPolicy};
use aura_testkit::RedisServer;
use serde_json::Value;

use crate::probes::{EmbedFailures, ProbeEmbedder, ProbePublisher, ProbeStore, probe_store};

/// A dead letter as the mount stores it: the input's bytes as they were on the wire, and the reason.
#[derive(Debug, Clone)]
pub struct SeenDeadLetter {
    pub original: Vec<u8>,
    pub reason: String,
}

/// A produced event as it travelled between two handlers: the event, and the transport's own fields (Kafka
/// headers; Celery `id`, `root_id`, `parent_id`).
#[derive(Debug, Clone)]
pub struct Hop {
    pub event: Event,
    pub transport: BTreeMap<String, String>,
}

/// What every mount offers the scenarios.
#[async_trait]
pub trait Mount: Send {
    fn name(&self) -> &'static str;
    /// The store, embedder and publisher probes every mount holds.
    fn parts(&self) -> &Parts;
    fn store(&self) -> &Arc<ProbeStore> {
        &self.parts().store
    }
    fn embedder(&self) -> &Arc<ProbeEmbedder> {
        &self.parts().embedder
    }
    /// The publisher of the running (or last) start.
    fn publisher(&self) -> Arc<ProbePublisher> {
        self.parts()
            .publisher
            .clone()
            .expect("a mount's publisher exists once it started")
    }
    /// Puts `events` where the Python services put them (a Kafka record on the type's topic, keyed by user, with
    /// the `event_type`/`event_id`/`trace_id` headers; a `send_task` message); returns the bytes sent, in order.
    async fn send(&mut self, events: &[Event]) -> Vec<Vec<u8>>;
    /// Starts the handlers, with `disabled` handlers disabled (`DISABLED_HANDLERS`).
    async fn start(&mut self, disabled: &[&str]);
    /// Waits until the mount has nothing left it can do (everything it may take is acknowledged).
    async fn settle(&mut self) -> Result<(), String>;
    /// The shutdown a SIGTERM triggers; returns how long it took.
    async fn stop(&mut self) -> Duration;
    /// Inputs not acknowledged (kept for later), whatever the reason.
    async fn unacknowledged(&self) -> u64;
    async fn dead_letters(&self) -> Vec<SeenDeadLetter>;
    /// Events of unknown types skipped (and acknowledged) so far, by the mount's own count.
    fn skipped(&self) -> u64;
    /// Delivers every input of every hop once more, as after a crash before any acknowledgement.
    async fn redeliver_everything(&mut self);
    /// The produced events waiting for a disabled handler, as on the wire.
    async fn held_hops(&self) -> Vec<Hop>;
    /// Why this mount cannot meet `scenario`, if it cannot.
    fn expected_failure(&self, scenario: &str) -> Option<&'static str>;
}

/// Polls `idle` (every 300 ms) until it holds twice in a row; an error (the mount's task exited) or 120 s is a
/// failure.
async fn settle_with<F, Fut>(mut idle: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, String>>,
{
    let started = Instant::now();
    let mut quiet = 0;
    while quiet < 2 {
        if started.elapsed() > Duration::from_secs(120) {
            return Err("not settled in 120 s".into());
        }
        quiet = if idle().await? { quiet + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// A mount's task, started with the shutdown future the binaries resolve on SIGTERM.
struct Running<R> {
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<R>,
}

/// Resolves when the test stops the mount (as SIGTERM resolves the binaries' shutdown future).
type Shutdown = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl<R: Send + 'static> Running<R> {
    fn spawn<F>(run: impl FnOnce(Shutdown) -> F) -> Self
    where
        F: std::future::Future<Output = R> + Send + 'static,
    {
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let stopped: Shutdown = Box::pin(async move {
            let _ = stopped.await;
        });
        Self {
            shutdown,
            task: tokio::spawn(run(stopped)),
        }
    }

    /// `Err` naming `what` when the mount's task has ended by itself.
    fn still_running(running: &Option<Self>, what: &str) -> Result<(), String> {
        match running {
            Some(running) if running.task.is_finished() => Err(format!("{what} exited")),
            _ => Ok(()),
        }
    }

    /// Resolves the shutdown future and waits (60 s at most) for the task's result.
    async fn stop(self, what: &str) -> R {
        let _ = self.shutdown.send(());
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .unwrap_or_else(|_| panic!("{what} did not stop within 60 s"))
            .unwrap()
    }
}

/// Stops the mount's task if it runs; its report, and how long the stop took.
async fn stop_timed<R: Send + 'static, E: std::fmt::Debug + Send + 'static>(
    running: &mut Option<Running<Result<R, E>>>,
    what: &str,
) -> (Option<R>, Duration) {
    let started = Instant::now();
    let report = match running.take() {
        Some(running) => Some(running.stop(what).await.unwrap()),
        None => None,
    };
    (report, started.elapsed())
}

/// Retries fast enough for a test (transient failures are retried in place).
fn quick_retry(max_attempts: Option<u32>) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        base: Duration::from_millis(20),
        cap: Duration::from_millis(200),
        jitter: 0.0,
    }
}

/// What all three mounts hold: the embedded store behind the probes.
pub struct Parts {
    store: Arc<ProbeStore>,
    embedder: Arc<ProbeEmbedder>,
    publisher: Option<Arc<ProbePublisher>>,
    /// Every event published by any run, for a redelivery.
    published: Vec<Event>,
    /// Last: its directory goes after every handle on the store (fields drop in order).
    embedded: Embedded,
}

impl Parts {
    fn new() -> Self {
        let embedded = embedded();
        let store = probe_store(embedded.store.clone());
        let embedder = Arc::new(ProbeEmbedder::new(
            embedded.ctx.embedder.clone(),
            EmbedFailures::default(),
        ));
        Self {
            store,
            embedder,
            publisher: None,
            published: Vec::new(),
            embedded,
        }
    }

    fn context(&self) -> HandlerContext {
        HandlerContext {
            store: self.store.clone(),
            embedder: self.embedder.clone(),
            ..self.embedded.ctx.clone()
        }
    }

    fn registry(disabled: &[&str]) -> Arc<Registry> {
        let mut registry = standard_registry();
        registry.disable(disabled).unwrap();
        Arc::new(registry)
    }

    fn probe(&mut self, inner: Arc<dyn Publisher>) -> Arc<ProbePublisher> {
        self.keep_published();
        let probe = ProbePublisher::new(inner);
        self.publisher = Some(probe.clone());
        probe
    }

    fn keep_published(&mut self) {
        if let Some(previous) = self.publisher.take() {
            self.published
                .extend(previous.published.lock().unwrap().drain(..));
        }
    }

    fn all_published(&self) -> Vec<Event> {
        let mut all = self.published.clone();
        if let Some(current) = &self.publisher {
            all.extend(current.published.lock().unwrap().iter().cloned());
        }
        all
    }
}

// ---------------------------------------------------------------------------------------------------------------
// In-memory bus

pub struct MemoryMount {
    /// Inputs not yet taken (and those a disabled handler kept).
    pending: Vec<Event>,
    sent: Vec<Event>,
    running: Option<(Arc<InMemoryBus>, Dispatcher)>,
    dead: Vec<SeenDeadLetter>,
    skipped: u64,
    /// Last: dropped after every task and handle that uses its store.
    parts: Parts,
}

impl MemoryMount {
    pub fn new() -> Self {
        Self {
            parts: Parts::new(),
            pending: Vec::new(),
            sent: Vec::new(),
            running: None,
            dead: Vec::new(),
            skipped: 0,
        }
    }
}

#[async_trait]
impl Mount for MemoryMount {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn parts(&self) -> &Parts {
        &self.parts
    }

    async fn send(&mut self, events: &[Event]) -> Vec<Vec<u8>> {
        self.sent.extend(events.iter().cloned());
        self.pending.extend(events.iter().cloned());
        events.iter().map(Event::to_vec).collect()
    }

    async fn start(&mut self, disabled: &[&str]) {
        let bus = Arc::new(InMemoryBus::new());
        let publisher = self.parts.probe(bus.clone());
        let dispatcher =
            Dispatcher::new(Parts::registry(disabled), self.parts.context(), publisher);
        self.running = Some((bus, dispatcher));
    }

    async fn settle(&mut self) -> Result<(), String> {
        let (bus, dispatcher) = self.running.as_ref().ok_or("not started")?;
        for event in self.pending.drain(..) {
            bus.push(event);
        }
        // One at a time: the bus keeps one user's events in order only without concurrency.
        let report = bus.run(dispatcher, &quick_retry(Some(8)), 1).await;
        self.pending.extend(report.parked);
        self.skipped += report.unhandled;
        self.dead
            .extend(report.dead_letters.into_iter().map(|d| SeenDeadLetter {
                original: d.payload,
                reason: d.error,
            }));
        Ok(())
    }

    async fn stop(&mut self) -> Duration {
        self.running = None;
        Duration::ZERO
    }

    async fn unacknowledged(&self) -> u64 {
        self.pending.len() as u64
    }

    async fn dead_letters(&self) -> Vec<SeenDeadLetter> {
        self.dead.clone()
    }

    fn skipped(&self) -> u64 {
        self.skipped
    }

    async fn redeliver_everything(&mut self) {
        self.pending.extend(self.sent.iter().cloned());
        self.pending.extend(self.parts.all_published());
    }

    async fn held_hops(&self) -> Vec<Hop> {
        self.pending
            .iter()
            .filter(|e| e.event_type.starts_with("context."))
            .map(|event| Hop {
                event: event.clone(),
                transport: BTreeMap::new(),
            })
            .collect()
    }

    fn expected_failure(&self, scenario: &str) -> Option<&'static str> {
        match scenario {
            "sigterm_in_flight" => Some(
                "the in-memory bus is the process's memory (`vectordb pipeline`): it has no acknowledgement and no \
                 redelivery, so a stopped process loses its queue; the input file is the durable copy",
            ),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Kafka

pub struct KafkaMount {
    settings: KafkaSettings,
    producer: KafkaPublisher,
    running: Option<Running<Result<aura_kafka::ConsumerReport, aura_kafka::ClientError>>>,
    subscribed: Vec<String>,
    skipped: u64,
    /// Last: dropped after every task and handle that uses its store.
    parts: Parts,
}

impl KafkaMount {
    pub async fn new(name: &str) -> Self {
        let settings = aura_runtime::testing::kafka_settings(&format!("conformance-{name}"));
        create_topics(&settings, &TopicNames::from_settings(&settings).all(), 3, 1)
            .await
            .unwrap();
        let producer = KafkaPublisher::new(&settings).unwrap();
        Self {
            parts: Parts::new(),
            settings,
            producer,
            running: None,
            subscribed: Vec::new(),
            skipped: 0,
        }
    }

    fn topics(&self) -> TopicNames {
        TopicNames::from_settings(&self.settings)
    }

    async fn lag_of(&self, topics: &[String]) -> Vec<aura_kafka::offsets::PartitionLag> {
        let (lags, missing) = group_lag(
            &self.settings,
            &self.settings.group_id,
            topics,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert!(missing.is_empty(), "topics missing: {missing:?}");
        lags
    }

    fn read(&self, topic: &str) -> Vec<aura_kafka::offsets::ExportedRecord> {
        let mut records = Vec::new();
        read_range(
            &self.settings,
            &Range {
                topic: topic.to_owned(),
                ..Range::default()
            },
            Duration::from_secs(10),
            |record| {
                records.push(record);
                Ok(())
            },
        )
        .unwrap();
        records
    }
}

#[async_trait]
impl Mount for KafkaMount {
    fn name(&self) -> &'static str {
        "kafka"
    }
    fn parts(&self) -> &Parts {
        &self.parts
    }

    async fn send(&mut self, events: &[Event]) -> Vec<Vec<u8>> {
        let mut sent = Vec::new();
        for event in events {
            aura_runtime::publish_event(&self.producer, event)
                .await
                .unwrap();
            sent.push(event.to_vec());
        }
        sent
    }

    async fn start(&mut self, disabled: &[&str]) {
        let registry = Parts::registry(disabled);
        self.subscribed = aura_kafka::consumer::subscribed_topics(&registry, &self.topics());
        let publisher = self.parts.probe(Arc::new(self.producer.clone()));
        let dispatcher = Dispatcher::new(registry.clone(), self.parts.context(), publisher);
        let options = ConsumerOptions {
            retry: quick_retry(None),
            grace: Duration::from_secs(2),
            dead_letter_spool: self.settings.dead_letter_spool_dir.clone(),
            ..ConsumerOptions::default()
        };
        let settings = self.settings.clone();
        let producer = self.producer.clone();
        self.running = Some(Running::spawn(|stopped| async move {
            run_consumer(&settings, registry, dispatcher, producer, options, stopped).await
        }));
    }

    async fn settle(&mut self) -> Result<(), String> {
        let this = &*self;
        settle_with(|| async move {
            Running::still_running(&this.running, "the consumer")?;
            // Settled: every record of the subscribed topics committed (a topic never written has nothing to do).
            Ok(this
                .lag_of(&this.subscribed)
                .await
                .iter()
                .all(|l| l.lag == 0 && (l.committed.is_some() || l.end == l.start)))
        })
        .await
        .map_err(|e| format!("kafka: {e}"))
    }

    async fn stop(&mut self) -> Duration {
        let (report, took) = stop_timed(&mut self.running, "the consumer").await;
        self.skipped += report.map_or(0, |r| r.skipped);
        took
    }

    async fn unacknowledged(&self) -> u64 {
        self.lag_of(&self.topics().sources())
            .await
            .iter()
            .map(|l| l.lag)
            .sum()
    }

    async fn dead_letters(&self) -> Vec<SeenDeadLetter> {
        let mut dead = Vec::new();
        for topic in self.topics().sources() {
            let dlq = aura_runtime::events::routing::dead_letter_topic(&topic);
            for record in self.read(&dlq) {
                dead.push(SeenDeadLetter {
                    original: record.value_bytes().unwrap_or_default(),
                    reason: record.headers.get("error").cloned().unwrap_or_default(),
                });
            }
        }
        dead
    }

    fn skipped(&self) -> u64 {
        self.skipped
    }

    async fn redeliver_everything(&mut self) {
        // A group that never committed: every record of every topic is delivered again, as after a crash of a
        // consumer that had acknowledged nothing.
        self.settings.group_id = format!("{}-again", self.settings.group_id);
    }

    async fn held_hops(&self) -> Vec<Hop> {
        let names = self.topics();
        let mut hops = Vec::new();
        for event_type in ["context.aggregated", "context.vectorized"] {
            let topic = names.for_event_type(event_type).unwrap();
            for record in self.read(&topic) {
                let value: Value = serde_json::from_slice(&record.value_bytes().unwrap()).unwrap();
                let mut transport = record.headers.clone();
                if let Some(key) = record.key {
                    transport.insert("key".into(), key);
                }
                hops.push(Hop {
                    event: Event::from_value(value).unwrap(),
                    transport,
                });
            }
        }
        hops
    }

    fn expected_failure(&self, _scenario: &str) -> Option<&'static str> {
        None
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Celery

pub const CELERY_QUEUE: &str = "vectordb";

pub struct CeleryMount {
    server: RedisServer,
    broker: Arc<Broker>,
    results: Arc<ResultBackend>,
    running: Option<Running<Result<aura_celery::WorkerReport, aura_celery::TransportError>>>,
    /// Every envelope sent, for a redelivery of the same messages.
    sent: Vec<Vec<u8>>,
    skipped: u64,
    handlers: Vec<&'static str>,
    /// Last: dropped after every task and handle that uses its store.
    parts: Parts,
}

/// The visibility timeout of the conformance Celery mount: what a worker leaves in `unacked` comes back after it.
const VISIBILITY: Duration = Duration::from_secs(2);

impl CeleryMount {
    pub fn new() -> Self {
        let server = RedisServer::start();
        let url = server.url();
        let broker = Arc::new(Broker::open(&url, url.clone(), VISIBILITY).unwrap());
        let results =
            Arc::new(ResultBackend::open(&url, url.clone(), Duration::from_secs(600)).unwrap());
        Self {
            parts: Parts::new(),
            server,
            broker,
            results,
            running: None,
            sent: Vec::new(),
            skipped: 0,
            handlers: standard_registry().names(),
        }
    }

    async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Waiting, scheduled, taken-not-acknowledged and parked messages.
    async fn backlog(&self) -> (u64, u64, u64, u64) {
        let depth = self
            .broker
            .depth(CELERY_QUEUE, &self.handlers, Patience::Forever)
            .await
            .unwrap();
        let unacked: u64 = redis::cmd("HLEN")
            .arg(UNACKED)
            .query_async(&mut self.redis().await)
            .await
            .unwrap();
        (
            depth.waiting,
            depth.delayed,
            unacked,
            depth.parked.values().sum(),
        )
    }

    async fn push(&self, envelope: &[u8]) {
        self.broker
            .push(CELERY_QUEUE, 0, envelope, Patience::Forever)
            .await
            .unwrap();
    }
}

#[async_trait]
impl Mount for CeleryMount {
    fn name(&self) -> &'static str {
        "celery"
    }
    fn parts(&self) -> &Parts {
        &self.parts
    }

    async fn send(&mut self, events: &[Event]) -> Vec<Vec<u8>> {
        let publisher = CeleryPublisher::new(self.broker.clone(), CELERY_QUEUE);
        let mut sent = Vec::new();
        for event in events {
            // As `send_task` writes it; an unknown type has no task of its own: it travels in the mood task, as a
            // newer Python producer's would.
            let message = match publisher.message_for(event) {
                Ok(message) => message,
                Err(_) => {
                    let mut mood = event.clone();
                    mood.event_type = "user.mood.created".into();
                    let mut message = publisher.message_for(&mood).unwrap();
                    let body = serde_json::to_vec(&(
                        [event],
                        serde_json::Map::new(),
                        serde_json::json!({"callbacks": null, "errbacks": null, "chain": null, "chord": null}),
                    ))
                    .unwrap();
                    use base64::Engine as _;
                    message.envelope.body = base64::engine::general_purpose::STANDARD.encode(body);
                    message
                }
            };
            let bytes = message.envelope.to_vec();
            self.push(&bytes).await;
            self.sent.push(bytes.clone());
            sent.push(bytes);
        }
        sent
    }

    async fn start(&mut self, disabled: &[&str]) {
        let registry = Parts::registry(disabled);
        let publisher = self.parts.probe(Arc::new(CeleryPublisher::new(
            self.broker.clone(),
            CELERY_QUEUE,
        )));
        let dispatcher = Dispatcher::new(registry.clone(), self.parts.context(), publisher);
        let mut options = WorkerOptions::new(vec![CELERY_QUEUE.into()], 8, "conformance@test");
        options.retry = quick_retry(Some(8));
        options.grace = Duration::from_secs(2);
        options.restore_interval = Duration::from_millis(500);
        options.visibility_timeout = VISIBILITY;
        options.send_task_events = false;
        let worker = CeleryWorker::new(
            self.broker.clone(),
            self.results.clone(),
            registry,
            dispatcher,
            options,
        );
        self.running = Some(Running::spawn(|stopped| async move {
            worker.run(stopped).await
        }));
    }

    async fn settle(&mut self) -> Result<(), String> {
        let this = &*self;
        settle_with(|| async move {
            Running::still_running(&this.running, "the worker")?;
            let (waiting, delayed, unacked, _parked) = this.backlog().await;
            Ok(waiting + delayed + unacked == 0)
        })
        .await
        .map_err(|e| format!("celery: {e}"))
    }

    async fn unacknowledged(&self) -> u64 {
        let (waiting, delayed, unacked, parked) = self.backlog().await;
        waiting + delayed + unacked + parked
    }

    async fn stop(&mut self) -> Duration {
        let (report, took) = stop_timed(&mut self.running, "the worker").await;
        self.skipped += report.map_or(0, |r| r.skipped);
        took
    }

    async fn dead_letters(&self) -> Vec<SeenDeadLetter> {
        let entries: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(dead_letter_key(CELERY_QUEUE))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.redis().await)
            .await
            .unwrap();
        entries
            .iter()
            .map(|entry| {
                let entry: Value = serde_json::from_slice(entry).unwrap();
                SeenDeadLetter {
                    original: entry["message"].as_str().unwrap_or("").as_bytes().to_vec(),
                    reason: entry["error"].as_str().unwrap_or("").to_owned(),
                }
            })
            .collect()
    }

    fn skipped(&self) -> u64 {
        self.skipped
    }

    async fn redeliver_everything(&mut self) {
        // The inputs' own messages (same task ids), as a restore after the visibility timeout puts them back; the
        // produced events as tasks again.
        for envelope in self.sent.clone() {
            self.push(&envelope).await;
        }
        let publisher = CeleryPublisher::new(self.broker.clone(), CELERY_QUEUE);
        for event in self.parts.all_published() {
            aura_runtime::publish_event(&publisher, &event)
                .await
                .unwrap();
        }
    }

    async fn held_hops(&self) -> Vec<Hop> {
        let mut hops = Vec::new();
        for handler in &self.handlers {
            let key = aura_celery::transport::parked_key(CELERY_QUEUE, handler);
            let entries: Vec<Vec<u8>> = redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut self.redis().await)
                .await
                .unwrap();
            for entry in entries {
                let message = TaskMessage::parse(&entry).map_err(|(_, e)| e).unwrap();
                let mut transport = BTreeMap::new();
                for field in ["id", "root_id", "parent_id"] {
                    if let Some(v) = message.envelope.headers.get(field).and_then(Value::as_str) {
                        transport.insert(field.to_owned(), v.to_owned());
                    }
                }
                hops.push(Hop {
                    event: Event::from_value(message.body.args[0].clone()).unwrap(),
                    transport,
                });
            }
        }
        hops
    }

    fn expected_failure(&self, scenario: &str) -> Option<&'static str> {
        match scenario {
            "per_user_order" => Some(
                "Celery retries a task by sending it again with a countdown (as Python Celery's autoretry does), not \
                 in place: nothing is lost or dead-lettered, but a later event of the same user can finish before \
                 the retried one (Celery has no per-key ordering; the Kafka mount does)",
            ),
            _ => None,
        }
    }
}

/// The Celery task id of each envelope sent (for chaining checks).
pub fn task_ids(sent: &[Vec<u8>]) -> HashMap<String, String> {
    sent.iter()
        .filter_map(|bytes| {
            let message = TaskMessage::parse(bytes).ok()?;
            let event_id = message
                .body
                .args
                .first()?
                .get("event_id")?
                .as_str()?
                .to_owned();
            Some((event_id, message.id.clone()))
        })
        .collect()
}
