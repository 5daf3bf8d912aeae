//! Pipelining within a key against the tests' Apache Kafka (`scripts/test.sh` sets `AURA_TEST_KAFKA`): a key's next
//! event starts once the previous one's outputs are handed to the producer and its points to the store; an
//! acknowledgement or a store write that fails in the middle of a key's run leaves no gap and no reordering in the
//! output topic or the store, and no offset is committed past it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aura_kafka::rdkafka::message::Message as _;
use aura_kafka::{KafkaPublisher, run_consumer};
use aura_runtime::events::Event;
use aura_runtime::settings::KafkaSettings;
use aura_runtime::store::{Durable, Layered, Point, StoreError, StoreLayer, VectorStore};
use aura_runtime::testing::{FnHandler, TEST_DIM};
use aura_runtime::{
    Acknowledgement, Backend, Dispatcher, Handler, HandlerContext, HandlerError, PublishError,
    Publisher, Registry,
};
use tokio::sync::Semaphore;

mod common;
use common::*;

/// Events of the marker topic (see [`Scenario::commit_round`]).
const MARKER_TYPE: &str = "context.vectorized";

/// Kafka's producer, except for the output of one chosen input (`user`, `seq`): that record is never sent. On its
/// first hand-over its acknowledgement fails (transient) once the test opens `gate` — a delivery that timed out
/// while the key's later events were already handed over behind it; with `refused`, every acknowledgement of it
/// fails at once, for good (the broker refuses the record).
struct LosesOneDelivery {
    kafka: KafkaPublisher,
    user: &'static str,
    seq: u64,
    refused: bool,
    lost: AtomicBool,
    gate: Arc<Semaphore>,
    handed_over: Arc<AtomicUsize>,
}

impl LosesOneDelivery {
    fn new(kafka: KafkaPublisher, refused: bool) -> Self {
        Self {
            kafka,
            user: LOST.0,
            seq: LOST.1,
            refused,
            lost: AtomicBool::new(false),
            gate: Arc::new(Semaphore::new(0)),
            handed_over: Arc::new(AtomicUsize::new(0)),
        }
    }
}

#[async_trait]
impl Publisher for LosesOneDelivery {
    fn backend(&self) -> Backend {
        Backend::Kafka
    }

    async fn publish(&self, event: &Event) -> Result<(), PublishError> {
        self.kafka.publish(event).await
    }

    async fn hand_over(&self, event: &Event, json: &[u8]) -> Result<Acknowledgement, PublishError> {
        self.handed_over.fetch_add(1, Ordering::SeqCst);
        let chosen = event.user_id.as_deref() == Some(self.user)
            && event.field("seq").and_then(|v| v.as_u64()) == Some(self.seq);
        if chosen && self.refused {
            let refused = PublishError::Unroutable {
                event_type: event.event_type.clone(),
                event_id: event.event_id.to_string(),
                reason: "Broker: Message size too large (injected)".into(),
            };
            return Ok(Box::pin(async move { Err(refused) }));
        }
        if chosen && !self.lost.swap(true, Ordering::SeqCst) {
            let gate = self.gate.clone();
            let (event_type, event_id) = (event.event_type.clone(), event.event_id.to_string());
            return Ok(Box::pin(async move {
                let _open = gate.acquire().await;
                Err(PublishError::Unavailable {
                    backend: "kafka",
                    event_type,
                    event_id,
                    reason: "Local: Message timed out (injected)".into(),
                })
            }));
        }
        self.kafka.hand_over(event, json).await
    }
}

/// The input (`user`, `seq`) whose first output or first write the scenarios lose.
const LOST: (&str, u64) = ("user-0", 5);

fn is_lost(user: Option<&str>, seq: Option<u64>) -> bool {
    (user, seq) == (Some(LOST.0), Some(LOST.1))
}

/// A store layer over the real embedded store that loses one write: the first hand-over of the point of [`LOST`] is
/// taken but never written, and fails to become durable once the test opens `gate` (a write round that failed
/// while the key's later points were already queued behind it). Records `(user, seq)` of every point it passes on,
/// in the order the store writes them.
struct LosesOneWrite {
    lost: AtomicBool,
    gate: Arc<Semaphore>,
    handed_over: Arc<AtomicUsize>,
    written: std::sync::Mutex<Vec<(String, u64)>>,
}

#[async_trait]
impl StoreLayer for LosesOneWrite {
    async fn hand_over(
        &self,
        inner: &dyn VectorStore,
        points: Vec<Point>,
    ) -> Result<Durable, StoreError> {
        self.handed_over.fetch_add(1, Ordering::SeqCst);
        let (user, seq) = point_key(&points[0]);
        if is_lost(Some(&user), Some(seq)) && !self.lost.swap(true, Ordering::SeqCst) {
            let gate = self.gate.clone();
            return Ok(Box::pin(async move {
                let _open = gate.acquire().await;
                Err(StoreError::Unavailable(
                    "flushing the embedded store to disk failed (injected)".into(),
                ))
            }));
        }
        let durable = inner.hand_over(points).await?;
        self.written.lock().unwrap().push((user, seq));
        Ok(durable)
    }
}

/// `(user_id, seq)` of a point [`Writes`] made.
fn point_key(point: &Point) -> (String, u64) {
    (
        point.payload["user_id"].as_str().unwrap().to_owned(),
        point.payload["seq"].as_u64().unwrap(),
    )
}

/// Writes one point per event (its id derives from the user and `seq`, so writing it again overwrites it).
struct Writes;

#[async_trait]
impl Handler for Writes {
    fn name(&self) -> &'static str {
        "writes"
    }

    fn event_types(&self) -> &'static [&'static str] {
        &[EVENT_TYPE]
    }

    async fn handle(
        &self,
        event: &Event,
        ctx: &HandlerContext,
    ) -> Result<Vec<Event>, HandlerError> {
        let (user, seq) = (
            event.user_id.clone().unwrap(),
            event.field("seq").cloned().unwrap(),
        );
        let id = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("{user}/{seq}").as_bytes(),
        );
        let mut payload = serde_json::Map::new();
        payload.insert("user_id".into(), user.into());
        payload.insert("seq".into(), seq);
        ctx.write_points(vec![Point {
            id,
            vector: vec![1.0; TEST_DIM],
            payload,
        }])
        .await?;
        Ok(Vec::new())
    }
}

/// `(user, seq, event_id)` of every record of `topic` (one partition), in log order.
fn outputs(settings: &KafkaSettings, topic: &str) -> Vec<(String, u64, String)> {
    read_all(settings, topic)
        .iter()
        .map(|record| {
            let event = Event::from_slice(record.payload().unwrap()).unwrap();
            (
                event.user_id.clone().unwrap(),
                event.field("seq").and_then(|v| v.as_u64()).unwrap(),
                event.event_id.to_string(),
            )
        })
        .collect()
}

/// The end offset of `topic`'s partition 0.
fn high_watermark(settings: &KafkaSettings, topic: &str) -> i64 {
    use aura_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _};
    let consumer: BaseConsumer = aura_kafka::client_config(settings)
        .unwrap()
        .set("group.id", format!("{}-watermarks", settings.group_id))
        .create()
        .unwrap();
    consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap()
        .1
}

/// `user`'s sequence numbers with each event id kept at its last copy, in log order.
fn last_copies(records: &[(String, u64, String)], user: &str) -> Vec<u64> {
    let mine: Vec<_> = records.iter().filter(|(u, _, _)| u == user).collect();
    mine.iter()
        .enumerate()
        .filter(|(i, (_, _, id))| !mine[i + 1..].iter().any(|(_, _, later)| later == id))
        .map(|(_, (_, seq, _))| *seq)
        .collect()
}

/// What a scenario loses in the middle of user-0's run.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// The first delivery of [`LOST`]'s output fails once the gate opens ([`LosesOneDelivery`]).
    LostDelivery,
    /// Every delivery of [`LOST`]'s output is refused for good.
    RefusedOutput,
    /// The first write of [`LOST`]'s point fails to become durable once the gate opens ([`LosesOneWrite`]).
    LostWrite,
}

/// A consumer of a fresh one-partition scenario (two users interleaved, 20 events each: offset = seq * 2 + user).
/// Its handler relays each event as a `context.aggregated` event carrying its `seq`, or, for [`Fault::LostWrite`],
/// writes one point per event ([`Writes`]).
struct Scenario {
    settings: KafkaSettings,
    sent: usize,
    input: String,
    output: String,
    gate: Arc<Semaphore>,
    /// Outputs handed to the producer, or (for [`Fault::LostWrite`]) writes handed to the store.
    handed_over: Arc<AtomicUsize>,
    store: Arc<Layered<LosesOneWrite>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    consumer: Option<tokio::task::JoinHandle<aura_kafka::ConsumerReport>>,
    /// Dropped last: the directory outlives every handle on the store.
    _store: aura_runtime::testing::Embedded,
}

impl Scenario {
    async fn start(name: &str, fault: Fault) -> Self {
        let settings = settings(name);
        let sent = produce_on(&settings, 1, 2, 20).await;
        let topics = aura_kafka::TopicNames::from_settings(&settings);
        let relay = FnHandler::new("relay", &[EVENT_TYPE], |event: &Event| {
            let mut next = Event::caused_by(event, "context.aggregated");
            next.set_field("seq", event.field("seq").cloned().unwrap_or_default());
            Ok(vec![next])
        });
        // The marker's handler: a topic of its own whose commit shows that a commit round ran.
        let marker = aura_runtime::testing::sink("marker", &[MARKER_TYPE]);
        let registry = match fault {
            Fault::LostWrite => Registry::new().with(Writes),
            Fault::LostDelivery | Fault::RefusedOutput => Registry::new().with(relay),
        };
        let registry = Arc::new(registry.with(marker));
        let kafka = KafkaPublisher::new(&settings).unwrap();
        let embedded = aura_runtime::testing::embedded();
        let store = Arc::new(Layered::new(
            embedded.store.clone(),
            LosesOneWrite {
                lost: AtomicBool::new(false),
                gate: Arc::new(Semaphore::new(0)),
                handed_over: Arc::new(AtomicUsize::new(0)),
                written: std::sync::Mutex::new(Vec::new()),
            },
        ));
        let ctx = aura_runtime::testing::context_with(store.clone());
        let (dispatcher, gate, handed_over) = match fault {
            Fault::LostWrite => (
                Dispatcher::new(registry.clone(), ctx, Arc::new(kafka.clone())),
                store.layer().gate.clone(),
                store.layer().handed_over.clone(),
            ),
            Fault::LostDelivery | Fault::RefusedOutput => {
                let publisher = LosesOneDelivery::new(kafka.clone(), fault == Fault::RefusedOutput);
                let (gate, handed_over) = (publisher.gate.clone(), publisher.handed_over.clone());
                let dispatcher = Dispatcher::new(registry.clone(), ctx, Arc::new(publisher));
                (dispatcher, gate, handed_over)
            }
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let consumer = tokio::spawn({
            let settings = settings.clone();
            async move {
                run_consumer(&settings, registry, dispatcher, kafka, options(), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap()
            }
        });
        Self {
            input: topics.for_event_type(EVENT_TYPE).unwrap(),
            output: topics.for_event_type("context.aggregated").unwrap(),
            settings,
            sent,
            gate,
            handed_over,
            store,
            stop: Some(stop),
            consumer: Some(consumer),
            _store: embedded,
        }
    }

    /// Waits until every input was handed over while [`LOST`] is still unsettled (the key did not wait for it),
    /// then until the offsets before it are committed (seq 5 of user-0 is offset 10), and checks that a commit
    /// round that ran after everything else finished still commits nothing past it.
    async fn all_handed_over_and_committed_up_to_the_lost_one(&self) {
        aura_testkit::wait_until("all 40 events handed over", Duration::from_secs(60), || {
            self.handed_over.load(Ordering::SeqCst) >= self.sent
        })
        .await
        .unwrap();
        aura_testkit::wait_until(
            "the offsets before the lost one committed",
            Duration::from_secs(30),
            || self.committed() == Some(10),
        )
        .await
        .unwrap();
        self.commit_round(1).await;
        assert_eq!(self.committed(), Some(10));
    }

    fn committed(&self) -> Option<i64> {
        committed(&self.settings, &self.input, 0)
    }

    /// Sends one event to the marker's topic and waits until the consumer committed it. Offsets of every partition
    /// are stored in one call and committed together, so the input's committed offset read afterwards is what the
    /// consumer had finished when the marker was handled.
    async fn commit_round(&self, marked: i64) {
        let topic = aura_kafka::TopicNames::from_settings(&self.settings)
            .for_event_type(MARKER_TYPE)
            .unwrap();
        let kafka = KafkaPublisher::new(&self.settings).unwrap();
        let marker = Event::new(MARKER_TYPE, Some("marker".into()), None);
        aura_runtime::publish_event(&kafka, &marker).await.unwrap();
        aura_testkit::wait_until("the marker committed", Duration::from_secs(30), || {
            committed(&self.settings, &topic, 0) == Some(marked)
        })
        .await
        .unwrap();
    }

    /// Opens the gate (the lost one fails), waits until everything is committed, checks that each input (and the
    /// marker) finished once; the output topic's records.
    async fn fail_the_lost_one_and_finish(&mut self) -> Vec<(String, u64, String)> {
        self.gate.add_permits(1);
        let (report, records) = self.finish().await;
        assert_eq!(
            report.handled,
            self.sent as u64 + 1,
            "each input (and the marker) finished once"
        );
        records
    }

    /// Waits until every input is committed, stops the consumer; its report and the output topic's records.
    async fn finish(&mut self) -> (aura_kafka::ConsumerReport, Vec<(String, u64, String)>) {
        aura_testkit::wait_until("everything committed", Duration::from_secs(60), || {
            self.committed() == Some(self.sent as i64)
        })
        .await
        .unwrap();
        self.stop.take().unwrap().send(()).unwrap();
        let report = self.consumer.take().unwrap().await.unwrap();
        (report, outputs(&self.settings, &self.output))
    }
}

/// `user`'s sequence numbers in log order, every copy.
fn seqs(records: &[(String, u64, String)], user: &str) -> Vec<u64> {
    records
        .iter()
        .filter(|(u, _, _)| u == user)
        .map(|(_, seq, _)| *seq)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka and the Python venv: scripts/test.sh")]
async fn a_lost_delivery_mid_run_redelivers_from_it_in_order_and_commits_nothing_past_it() {
    let mut run = Scenario::start("pipelined", Fault::LostDelivery).await;
    let settings = run.settings.clone();
    // Everything after the lost delivery is acknowledged, and still nothing past it is committed.
    aura_testkit::wait_until(
        "the 39 other outputs acknowledged",
        Duration::from_secs(30),
        || high_watermark(&settings, &run.output) >= 39,
    )
    .await
    .unwrap();
    run.all_handed_over_and_committed_up_to_the_lost_one().await;

    // The delivery fails: user-0 runs again from seq 5, in order.
    let records = run.fail_the_lost_one_and_finish().await;
    // What the log holds: user-0's 6..=19 went out once behind the lost 5, then 5..=19 again, in order.
    let expected: Vec<u64> = (0..5).chain(6..20).chain(5..20).collect();
    assert_eq!(seqs(&records, "user-0"), expected);
    assert_eq!(seqs(&records, "user-1"), (0..20).collect::<Vec<_>>());
    // What a consumer that keeps the last copy of each event id reads: every event, in order, no gap.
    assert_eq!(last_copies(&records, "user-0"), (0..20).collect::<Vec<_>>());
    assert_eq!(last_copies(&records, "user-1"), (0..20).collect::<Vec<_>>());
    // The copies are the same events: derived ids do not change when an event runs again.
    let ids_of_6: Vec<&String> = records
        .iter()
        .filter(|(u, s, _)| u == "user-0" && *s == 6)
        .map(|(_, _, id)| id)
        .collect();
    assert_eq!(ids_of_6.len(), 2);
    assert_eq!(ids_of_6[0], ids_of_6[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka and the Python venv: scripts/test.sh")]
async fn an_output_refused_mid_run_dead_letters_its_input_once_its_key_caught_up_and_keeps_the_rest_in_order()
 {
    let mut run = Scenario::start("pipelined-refused", Fault::RefusedOutput).await;
    let (settings, input, sent) = (run.settings.clone(), run.input.clone(), run.sent);
    let (report, records) = run.finish().await;
    assert_eq!(report.handled, sent as u64 - 1);
    assert_eq!(report.dead_lettered, 1);
    // The first refusal sends user-0 back to seq 5; running alone, 5 is refused again and dead-lettered, then the
    // rest of the key runs again in order.
    let expected: Vec<u64> = (0..5).chain(6..20).chain(6..20).collect();
    assert_eq!(seqs(&records, "user-0"), expected);
    assert_eq!(
        last_copies(&records, "user-0"),
        (0..5).chain(6..20).collect::<Vec<_>>()
    );
    assert_eq!(seqs(&records, "user-1"), (0..20).collect::<Vec<_>>());
    let dead = outputs(&settings, &format!("{input}.dlq"));
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].0.as_str(), dead[0].1), ("user-0", 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka and the Python venv: scripts/test.sh")]
async fn a_write_that_fails_to_become_durable_mid_run_is_written_again_in_order_and_nothing_past_it_is_committed()
 {
    let mut run = Scenario::start("pipelined-write", Fault::LostWrite).await;
    let store = run.store.clone();
    // Every other point is written (the store took them in order behind the lost one), and still nothing past the
    // lost write is committed.
    aura_testkit::wait_until(
        "the 39 other points written",
        Duration::from_secs(30),
        || store.layer().written.lock().unwrap().len() >= 39,
    )
    .await
    .unwrap();
    run.all_handed_over_and_committed_up_to_the_lost_one().await;
    assert_eq!(store.count(None).await.unwrap(), 39);

    // The write fails: user-0 runs again from seq 5, in order, and every point is in the store once.
    run.fail_the_lost_one_and_finish().await;
    let written = store.layer().written.lock().unwrap().clone();
    let seqs_of = |user: &str| -> Vec<u64> {
        written
            .iter()
            .filter(|(u, _)| u == user)
            .map(|(_, seq)| *seq)
            .collect()
    };
    let expected: Vec<u64> = (0..5).chain(6..20).chain(5..20).collect();
    assert_eq!(seqs_of("user-0"), expected);
    assert_eq!(seqs_of("user-1"), (0..20).collect::<Vec<_>>());
    assert_eq!(store.count(None).await.unwrap(), 40);
    assert_eq!(store.count(Some("user-0")).await.unwrap(), 20);
}
