//! Pipelining within a key against the tests' Apache Kafka (`scripts/test.sh` sets `AURA_TEST_KAFKA`): a key's next
//! event starts once the previous one's outputs are handed to the producer; an acknowledgement that fails in the
//! middle of a key's run leaves no gap and no reordering in the output topic, and no offset is committed past it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aura_kafka::rdkafka::message::Message as _;
use aura_kafka::{KafkaPublisher, run_consumer};
use aura_runtime::events::Event;
use aura_runtime::settings::KafkaSettings;
use aura_runtime::testing::FnHandler;
use aura_runtime::{Acknowledgement, Backend, Dispatcher, PublishError, Publisher, Registry};
use tokio::sync::Semaphore;

mod common;
use common::*;

/// Kafka's producer, except for the output of one chosen input (`user`, `seq`) on its first hand-over: that record is
/// never sent, and its acknowledgement fails (transient) once the test opens `gate` — a delivery that timed out
/// while the key's later events were already handed over behind it.
struct LosesOneDelivery {
    kafka: KafkaPublisher,
    user: &'static str,
    seq: u64,
    lost: AtomicBool,
    gate: Arc<Semaphore>,
    handed_over: Arc<AtomicUsize>,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka and the Python venv: scripts/test.sh")]
async fn a_lost_delivery_mid_run_redelivers_from_it_in_order_and_commits_nothing_past_it() {
    let settings = settings("pipelined");
    // One partition, two users interleaved: offset = seq * 2 + user.
    let sent = produce_on(&settings, 1, 2, 20).await;
    let topics = aura_kafka::TopicNames::from_settings(&settings);
    let input = topics.for_event_type(EVENT_TYPE).unwrap();
    let output = topics.for_event_type("context.aggregated").unwrap();
    let relay = FnHandler::new("relay", &[EVENT_TYPE], |event: &Event| {
        let mut next = Event::caused_by(event, "context.aggregated");
        next.set_field("seq", event.field("seq").cloned().unwrap_or_default());
        Ok(vec![next])
    });
    let registry = Arc::new(Registry::new().with(relay));
    let kafka = KafkaPublisher::new(&settings).unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let handed_over = Arc::new(AtomicUsize::new(0));
    let publisher = LosesOneDelivery {
        kafka: kafka.clone(),
        user: "user-0",
        seq: 5,
        lost: AtomicBool::new(false),
        gate: gate.clone(),
        handed_over: handed_over.clone(),
    };
    let embedded = aura_runtime::testing::embedded();
    let dispatcher = Dispatcher::new(registry.clone(), embedded.ctx.clone(), Arc::new(publisher));
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

    // Every event is handed over while user-0's seq 5 is still unacknowledged: the key did not wait for it.
    aura_testkit::wait_until("all 40 events handed over", Duration::from_secs(60), || {
        handed_over.load(Ordering::SeqCst) >= sent
    })
    .await
    .unwrap();
    aura_testkit::wait_until(
        "the 39 other outputs acknowledged",
        Duration::from_secs(30),
        || high_watermark(&settings, &output) >= 39,
    )
    .await
    .unwrap();
    // Offsets 0..=9 finished and committed; seq 5 of user-0 is offset 10, and nothing past it may be committed
    // although everything after it was acknowledged.
    aura_testkit::wait_until(
        "the offsets before the lost delivery committed",
        Duration::from_secs(30),
        || committed(&settings, &input, 0) == Some(10),
    )
    .await
    .unwrap();
    // A negative: two auto-commit intervals (1 s each) pass, and still nothing past the lost delivery is committed.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(committed(&settings, &input, 0), Some(10));

    // The delivery fails: user-0 runs again from seq 5, in order.
    gate.add_permits(1);
    aura_testkit::wait_until("everything committed", Duration::from_secs(60), || {
        committed(&settings, &input, 0) == Some(sent as i64)
    })
    .await
    .unwrap();
    stop.send(()).unwrap();
    let report = consumer.await.unwrap();
    assert_eq!(report.handled, sent as u64, "each input finished once");

    let records = outputs(&settings, &output);
    let seqs = |user: &str| {
        records
            .iter()
            .filter(|(u, _, _)| u == user)
            .map(|(_, seq, _)| *seq)
            .collect::<Vec<_>>()
    };
    // What the log holds: user-0's 6..=19 went out once behind the lost 5, then 5..=19 again, in order.
    let expected: Vec<u64> = (0..5).chain(6..20).chain(5..20).collect();
    assert_eq!(seqs("user-0"), expected);
    assert_eq!(seqs("user-1"), (0..20).collect::<Vec<_>>());
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
