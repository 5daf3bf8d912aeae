//! The consumer loop in-process against tansu (`scripts/test.sh` sets `AURA_TEST_KAFKA`): ordering under transient
//! failures, and a rebalance between two members of one group.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aura_kafka::{ConsumerOptions, KafkaPublisher, create_topics, run_consumer};
use aura_runtime::events::Event;
use aura_runtime::settings::KafkaSettings;
use aura_runtime::{
    Dispatcher, Handler, HandlerContext, HandlerError, Registry, RetryPolicy, publish_event,
};

const EVENT_TYPE: &str = "user.test.recorded";

/// Records what it handled, in order; fails transiently the first `failures` times it sees a chosen event.
#[derive(Clone, Default)]
struct Recorder {
    handled: Arc<Mutex<Vec<(String, u64)>>>,
    failing: Arc<Mutex<HashMap<u64, u32>>>,
    delay: Duration,
}

#[async_trait]
impl Handler for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }

    fn event_types(&self) -> &'static [&'static str] {
        &[EVENT_TYPE]
    }

    async fn handle(
        &self,
        event: &Event,
        _ctx: &HandlerContext,
    ) -> Result<Vec<Event>, HandlerError> {
        let seq = event.field("seq").and_then(|v| v.as_u64()).unwrap_or(0);
        if let Some(left) = self.failing.lock().unwrap().get_mut(&seq)
            && *left > 0
        {
            *left -= 1;
            return Err(HandlerError::Transient(
                "store unavailable (injected)".into(),
            ));
        }
        tokio::time::sleep(self.delay).await;
        let user = event.user_id.clone().unwrap_or_default();
        self.handled.lock().unwrap().push((user, seq));
        Ok(Vec::new())
    }
}

fn settings(name: &str) -> KafkaSettings {
    let bootstrap = std::env::var("AURA_TEST_KAFKA")
        .expect("AURA_TEST_KAFKA is not set: run the tests with scripts/test.sh");
    let id = uuid::Uuid::new_v4().simple().to_string();
    KafkaSettings {
        bootstrap_servers: bootstrap,
        security_protocol: "PLAINTEXT".into(),
        sasl_mechanism: "PLAIN".into(),
        api_key: None,
        api_secret: None,
        group_id: format!("{name}-{id}"),
        topic_prefix: format!("{name}-{}.", &id[..8]),
        fetch_wait_max_ms: 50,
        session_timeout_ms: 6_000,
        drain_to_celery: true,
    }
}

async fn produce(settings: &KafkaSettings, users: usize, per_user: u64) -> usize {
    let topics = aura_kafka::TopicNames::from_settings(settings).all();
    create_topics(settings, &topics, 3, 1).await.unwrap();
    let publisher = KafkaPublisher::new(settings).unwrap();
    let mut sent = 0;
    for seq in 0..per_user {
        for user in 0..users {
            let mut event = Event::new(EVENT_TYPE, Some(format!("user-{user}")), None);
            event.set_field("seq", seq.into());
            publish_event(&publisher, &event).await.unwrap();
            sent += 1;
        }
    }
    sent
}

fn options() -> ConsumerOptions {
    ConsumerOptions {
        retry: RetryPolicy {
            max_attempts: None,
            base: Duration::from_millis(50),
            cap: Duration::from_millis(200),
            jitter: 0.0,
        },
        ..ConsumerOptions::default()
    }
}

/// A consumer task running `recorder` until the returned sender fires.
fn start(
    settings: &KafkaSettings,
    recorder: &Recorder,
    ctx: HandlerContext,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<aura_kafka::ConsumerReport>,
) {
    start_with(settings, Registry::new().with(recorder.clone()), ctx)
}

fn start_with(
    settings: &KafkaSettings,
    registry: Registry,
    ctx: HandlerContext,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<aura_kafka::ConsumerReport>,
) {
    let registry = Arc::new(registry);
    let publisher = KafkaPublisher::new(settings).unwrap();
    let dispatcher = Dispatcher::new(registry.clone(), ctx, Arc::new(publisher.clone()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let settings = settings.clone();
    let task = tokio::spawn(async move {
        run_consumer(
            &settings,
            registry,
            dispatcher,
            publisher,
            options(),
            async {
                let _ = stopped.await;
            },
        )
        .await
        .unwrap()
    });
    (stop, task)
}

async fn wait_for(what: &str, limit: Duration, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Per user (= per key = per partition), the sequence numbers handled, in handling order.
fn by_user(handled: &[(String, u64)]) -> HashMap<String, Vec<u64>> {
    let mut map: HashMap<String, Vec<u64>> = HashMap::new();
    for (user, seq) in handled {
        map.entry(user.clone()).or_default().push(*seq);
    }
    map
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_in_place_without_skipping_or_reordering() {
    let settings = settings("retry");
    let sent = produce(&settings, 6, 30).await;
    let embedded = aura_runtime::testing::embedded();
    let recorder = Recorder::default();
    // seq 3 of every user fails five times before it passes.
    recorder.failing.lock().unwrap().extend([(3, 5), (10, 2)]);
    let (stop, task) = start(&settings, &recorder, embedded.ctx.clone());
    wait_for("every event handled", Duration::from_secs(60), || {
        recorder.handled.lock().unwrap().len() >= sent
    })
    .await;
    stop.send(()).unwrap();
    let report = task.await.unwrap();

    let handled = recorder.handled.lock().unwrap().clone();
    assert_eq!(handled.len(), sent, "each event exactly once in one run");
    assert_eq!(report.handled, sent as u64);
    for (user, seqs) in by_user(&handled) {
        assert_eq!(seqs, (0..30).collect::<Vec<u64>>(), "{user} out of order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_hands_partitions_over_without_losing_or_repeating_events() {
    let settings = settings("rebalance");
    let sent = produce(&settings, 12, 100).await;
    let embedded = aura_runtime::testing::embedded();
    let first = Recorder {
        delay: Duration::from_millis(40),
        ..Recorder::default()
    };
    let second = Recorder {
        delay: Duration::from_millis(40),
        ..Recorder::default()
    };
    let (stop_first, first_task) = start(&settings, &first, embedded.ctx.clone());
    wait_for(
        "the first member under way",
        Duration::from_secs(60),
        || first.handled.lock().unwrap().len() >= 60,
    )
    .await;
    let joined = Instant::now();
    let (stop_second, second_task) = start(&settings, &second, embedded.ctx.clone());
    let total = || first.handled.lock().unwrap().len() + second.handled.lock().unwrap().len();
    wait_for(
        "every event handled by the group",
        Duration::from_secs(120),
        || total() >= sent,
    )
    .await;
    // Both members took part.
    assert!(
        !second.handled.lock().unwrap().is_empty(),
        "the second member never got a partition ({:?} after it started)",
        joined.elapsed()
    );
    stop_first.send(()).unwrap();
    stop_second.send(()).unwrap();
    first_task.await.unwrap();
    second_task.await.unwrap();

    let mut all = first.handled.lock().unwrap().clone();
    all.extend(second.handled.lock().unwrap().iter().cloned());
    let mut seen = all.clone();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), sent, "every event handled");
    // Revocation waits for in-flight events and commits them: the new owner starts after them.
    assert_eq!(all.len(), sent, "events handled twice across the rebalance");
}

/// A second handler on the same topic, disabled in the test below.
#[derive(Clone, Default)]
struct Other;

#[async_trait]
impl Handler for Other {
    fn name(&self) -> &'static str {
        "other"
    }

    fn event_types(&self) -> &'static [&'static str] {
        &["user.test.other"]
    }

    async fn handle(&self, _: &Event, _: &HandlerContext) -> Result<Vec<Event>, HandlerError> {
        Ok(Vec::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_of_a_disabled_handler_holds_its_partition_uncommitted() {
    let settings = settings("held");
    let topics = aura_kafka::TopicNames::from_settings(&settings);
    create_topics(&settings, &topics.all(), 1, 1).await.unwrap();
    let publisher = KafkaPublisher::new(&settings).unwrap();
    for (seq, event_type) in [
        (0, EVENT_TYPE),
        (1, EVENT_TYPE),
        (2, "user.test.other"),
        (3, EVENT_TYPE),
    ] {
        let mut event = Event::new(event_type, Some("user-0".into()), None);
        event.set_field("seq", seq.into());
        publish_event(&publisher, &event).await.unwrap();
    }
    let embedded = aura_runtime::testing::embedded();
    let recorder = Recorder::default();
    let mut registry = Registry::new().with(recorder.clone()).with(Other);
    registry.disable(&["other"]).unwrap();
    let (stop, task) = start_with(&settings, registry, embedded.ctx.clone());
    wait_for(
        "the events before the held one",
        Duration::from_secs(60),
        || recorder.handled.lock().unwrap().len() >= 2,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(()).unwrap();
    let report = task.await.unwrap();

    // Handled up to the held event and not past it; committed exactly up to it.
    let seqs: Vec<u64> = recorder
        .handled
        .lock()
        .unwrap()
        .iter()
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(seqs, [0, 1]);
    assert_eq!(report.held_partitions, 1);
    let topic = topics.for_event_type(EVENT_TYPE).unwrap();
    assert_eq!(committed(&settings, &topic, 0), Some(2));
}

fn committed(settings: &KafkaSettings, topic: &str, partition: i32) -> Option<i64> {
    use aura_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _};
    use aura_kafka::rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = aura_kafka::client_config(settings)
        .unwrap()
        .set("group.id", &settings.group_id)
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, partition);
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .unwrap();
    match committed.elements()[0].offset() {
        Offset::Offset(offset) => Some(offset),
        _ => None,
    }
}
