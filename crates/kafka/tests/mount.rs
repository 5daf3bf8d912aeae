//! The consumer loop in-process against the tests' Apache Kafka (`scripts/test.sh` sets `AURA_TEST_KAFKA`): per-key ordering under
//! concurrency and transient failures, a crash inside an out-of-order completion window, and a rebalance between
//! two members of one group.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aura_kafka::{ConsumerOptions, KafkaPublisher, create_topics, run_consumer};
use aura_runtime::events::Event;
use aura_runtime::settings::KafkaSettings;
use aura_runtime::testing::sink;
use aura_runtime::{Dispatcher, Handler, HandlerContext, HandlerError, Registry, publish_event};

mod common;
use common::*;

/// Records what it handled, in order; fails transiently the first `failures` times it sees a chosen event.
#[derive(Clone, Default)]
struct Recorder {
    handled: Arc<Mutex<Vec<(String, u64)>>>,
    failing: Arc<Mutex<HashMap<u64, u32>>>,
    delay: Duration,
    /// Up to this much more delay, varying per (user, seq): concurrent events finish out of offset order.
    jitter_ms: u64,
    /// This (user, seq) never finishes.
    stuck: Option<(String, u64)>,
    /// Handlers running now, and the most seen at once.
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    /// Set after a simulated crash: nothing more is recorded.
    dead: Arc<AtomicBool>,
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
        let user = event.user_id.clone().unwrap_or_default();
        if self.stuck.as_ref() == Some(&(user.clone(), seq)) {
            std::future::pending::<()>().await;
        }
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let jitter = if self.jitter_ms > 0 {
            let digest = uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_OID,
                format!("{user}/{seq}").as_bytes(),
            );
            Duration::from_millis(digest.as_u128() as u64 % self.jitter_ms)
        } else {
            Duration::ZERO
        };
        tokio::time::sleep(self.delay + jitter).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        if !self.dead.load(Ordering::SeqCst) {
            self.handled.lock().unwrap().push((user, seq));
        }
        Ok(Vec::new())
    }
}

async fn produce(settings: &KafkaSettings, users: usize, per_user: u64) -> usize {
    produce_on(settings, 3, users, per_user).await
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
    start_with_options(settings, registry, ctx, options())
}

fn start_with_options(
    settings: &KafkaSettings,
    registry: Registry,
    ctx: HandlerContext,
    options: ConsumerOptions,
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
        run_consumer(&settings, registry, dispatcher, publisher, options, async {
            let _ = stopped.await;
        })
        .await
        .unwrap()
    });
    (stop, task)
}

/// Runs `recorder` until it handled `sent` events (or 120 s pass), stops the consumer; what it handled, in order,
/// and the consumer's report.
async fn handle_all(
    settings: &KafkaSettings,
    recorder: &Recorder,
    ctx: HandlerContext,
    sent: usize,
) -> (Vec<(String, u64)>, aura_kafka::ConsumerReport) {
    let (stop, task) = start(settings, recorder, ctx);
    aura_testkit::wait_until("every event handled", Duration::from_secs(120), || {
        recorder.handled.lock().unwrap().len() >= sent
    })
    .await
    .unwrap();
    stop.send(()).unwrap();
    let report = task.await.unwrap();
    (recorder.handled.lock().unwrap().clone(), report)
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
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka and the Python venv: scripts/test.sh")]
async fn transient_failures_are_retried_in_place_without_skipping_or_reordering() {
    let settings = settings("retry");
    let sent = produce(&settings, 6, 30).await;
    let embedded = aura_runtime::testing::embedded();
    let recorder = Recorder::default();
    // seq 3 of every user fails five times before it passes.
    recorder.failing.lock().unwrap().extend([(3, 5), (10, 2)]);
    let (handled, report) = handle_all(&settings, &recorder, embedded.ctx.clone(), sent).await;
    assert_eq!(handled.len(), sent, "each event exactly once in one run");
    assert_eq!(report.handled, sent as u64);
    for (user, seqs) in by_user(&handled) {
        assert_eq!(seqs, (0..30).collect::<Vec<u64>>(), "{user} out of order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka and the Python venv: scripts/test.sh")]
async fn many_users_on_one_partition_run_concurrently_and_each_users_events_stay_in_order() {
    let settings = settings("keyed");
    let (users, per_user) = (30, 40);
    let sent = produce_on(&settings, 1, users, per_user).await;
    let embedded = aura_runtime::testing::embedded();
    let recorder = Recorder {
        jitter_ms: 4,
        ..Recorder::default()
    };
    // One user's event fails a few times: only that user waits.
    recorder.failing.lock().unwrap().insert(10, 3);
    let (handled, report) = handle_all(&settings, &recorder, embedded.ctx.clone(), sent).await;
    assert_eq!(handled.len(), sent, "each event exactly once");
    assert_eq!(report.handled, sent as u64);
    let per_user_seqs = by_user(&handled);
    assert_eq!(per_user_seqs.len(), users);
    for (user, seqs) in per_user_seqs {
        assert_eq!(
            seqs,
            (0..per_user).collect::<Vec<u64>>(),
            "{user}: out of order, a gap or a repeat"
        );
    }
    // Handling order is not offset order (offsets interleave users): keys really ran side by side.
    let peak = recorder.peak.load(Ordering::SeqCst);
    assert!(
        peak > 4,
        "at most {peak} events of the partition ran at once"
    );
    let offsets_order: Vec<(String, u64)> = (0..per_user)
        .flat_map(|seq| (0..users).map(move |u| (format!("user-{u}"), seq)))
        .collect();
    assert_ne!(
        handled, offsets_order,
        "handled in plain offset order: no concurrency"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka and the Python venv: scripts/test.sh")]
async fn a_crash_inside_an_out_of_order_window_redelivers_from_the_gap_and_skips_nothing() {
    let settings = settings("crash");
    let (users, per_user) = (10, 20);
    let sent = produce_on(&settings, 1, users, per_user).await;
    let embedded = aura_runtime::testing::embedded();
    // user-3's seq 5 (offset 5 * 10 + 3 = 53) never finishes; everything else does, out of order.
    let gap = 5 * users as i64 + 3;
    let first = Recorder {
        jitter_ms: 3,
        stuck: Some(("user-3".into(), 5)),
        ..Recorder::default()
    };
    let options = ConsumerOptions {
        grace: Duration::from_millis(500),
        ..options()
    };
    let (_stop, task) = start_with_options(
        &settings,
        Registry::new().with(first.clone()),
        embedded.ctx.clone(),
        options.clone(),
    );
    // Every other user finishes its 20 events; user-3 stops at 5.
    aura_testkit::wait_until(
        "all but the stuck user's tail",
        Duration::from_secs(120),
        || first.handled.lock().unwrap().len() >= sent - (per_user as usize - 5),
    )
    .await
    .unwrap();
    // Let the stored offset reach the commit (auto-commit every second).
    let topic = aura_kafka::TopicNames::from_settings(&settings)
        .for_event_type(EVENT_TYPE)
        .unwrap();
    aura_testkit::wait_until("the prefix committed", Duration::from_secs(30), || {
        committed(&settings, &topic, 0) == Some(gap)
    })
    .await
    .unwrap();
    // Crash: the process stops dead, with 146 events finished after the gap.
    task.abort();
    let _ = task.await;
    first.dead.store(true, Ordering::SeqCst);
    let finished_after_gap = first
        .handled
        .lock()
        .unwrap()
        .iter()
        .filter(|(user, seq)| offset_of(user, *seq, users) > gap)
        .count();
    assert!(
        finished_after_gap > 100,
        "{finished_after_gap} finished after the gap"
    );
    assert_eq!(
        committed(&settings, &topic, 0),
        Some(gap),
        "never past the unfinished event"
    );

    let second = Recorder::default();
    let (stop, task) = start_with_options(
        &settings,
        Registry::new().with(second.clone()),
        embedded.ctx.clone(),
        options,
    );
    let expected = sent - gap as usize;
    aura_testkit::wait_until("the redelivered window", Duration::from_secs(120), || {
        second.handled.lock().unwrap().len() >= expected
    })
    .await
    .unwrap();
    stop.send(()).unwrap();
    task.await.unwrap();

    let redelivered = second.handled.lock().unwrap().clone();
    assert_eq!(
        redelivered.len(),
        expected,
        "exactly the events from the gap on"
    );
    assert!(
        redelivered
            .iter()
            .all(|(user, seq)| offset_of(user, *seq, users) >= gap)
    );
    for (user, seqs) in by_user(&redelivered) {
        let first_seq = seqs[0];
        assert_eq!(seqs, (first_seq..per_user).collect::<Vec<u64>>(), "{user}");
    }
    let mut all: Vec<(String, u64)> = first.handled.lock().unwrap().clone();
    all.extend(redelivered);
    all.sort();
    all.dedup();
    assert_eq!(all.len(), sent, "an event was skipped");
}

/// The offset of `user`'s `seq` in [`produce_on`]'s order on one partition.
fn offset_of(user: &str, seq: u64, users: usize) -> i64 {
    let index: i64 = user.trim_start_matches("user-").parse().unwrap();
    seq as i64 * users as i64 + index
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka and the Python venv: scripts/test.sh")]
async fn a_rebalance_hands_partitions_over_without_losing_or_repeating_events() {
    let settings = settings("rebalance");
    let sent = produce(&settings, 12, 100).await;
    let embedded = aura_runtime::testing::embedded();
    // Each user's 100 events run one after another (key order): ≥ 15 s per user, so the group is still busy when
    // the second member joins, while the 12 users run side by side.
    let first = Recorder {
        delay: Duration::from_millis(150),
        ..Recorder::default()
    };
    let second = Recorder {
        delay: Duration::from_millis(150),
        ..Recorder::default()
    };
    let (stop_first, first_task) = start(&settings, &first, embedded.ctx.clone());
    aura_testkit::wait_until(
        "the first member under way",
        Duration::from_secs(120),
        || first.handled.lock().unwrap().len() >= 60,
    )
    .await
    .unwrap();
    let joined = Instant::now();
    let (stop_second, second_task) = start(&settings, &second, embedded.ctx.clone());
    let total = || first.handled.lock().unwrap().len() + second.handled.lock().unwrap().len();
    aura_testkit::wait_until(
        "every event handled by the group",
        Duration::from_secs(120),
        || total() >= sent,
    )
    .await
    .unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka and the Python venv: scripts/test.sh")]
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
    let mut registry = Registry::new()
        .with(recorder.clone())
        .with(sink("other", &["user.test.other"]));
    registry.disable(&["other"]).unwrap();
    let (stop, task) = start_with(&settings, registry, embedded.ctx.clone());
    aura_testkit::wait_until(
        "the events before the held one",
        Duration::from_secs(60),
        || recorder.handled.lock().unwrap().len() >= 2,
    )
    .await
    .unwrap();
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

/// What the consumer told `/health` about its dependencies.
#[derive(Default)]
struct Reports(Mutex<Vec<(&'static str, Result<(), String>)>>);

impl aura_runtime::DependencyObserver for Reports {
    fn report(&self, dependency: &'static str, outcome: Result<(), String>) {
        self.0.lock().unwrap().push((dependency, outcome));
    }
}

/// Sends `value` (with `headers`) and then one good event, both keyed `user-0`, on the user topic of a fresh
/// one-partition scenario; returns the topics.
async fn poison_then_good(
    settings: &KafkaSettings,
    value: &[u8],
    headers: Vec<(&str, &[u8])>,
) -> aura_kafka::TopicNames {
    let topics = aura_kafka::TopicNames::from_settings(settings);
    create_topics(settings, &topics.all(), 1, 1).await.unwrap();
    // The test's own producer takes records of any size the broker does.
    let sender = KafkaPublisher::new(&KafkaSettings {
        message_max_bytes: 10_000_000,
        ..settings.clone()
    })
    .unwrap();
    let topic = topics.for_event_type(EVENT_TYPE).unwrap();
    sender
        .send(aura_kafka::OutgoingRecord {
            topic: &topic,
            key: Some(b"user-0"),
            payload: Some(value),
            headers,
        })
        .await
        .unwrap();
    let mut good = Event::new(EVENT_TYPE, Some("user-0".into()), None);
    good.set_field("seq", 1.into());
    publish_event(&sender, &good).await.unwrap();
    topics
}

fn header<'a>(
    message: &'a aura_kafka::rdkafka::message::OwnedMessage,
    key: &str,
) -> Option<&'a [u8]> {
    use aura_kafka::rdkafka::message::{Headers as _, Message as _};
    message
        .headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
}

/// Runs a consumer with a fresh [`Recorder`] until it handled one event (the good one after a poison message).
async fn run_until_handled(
    settings: &KafkaSettings,
    options: ConsumerOptions,
) -> aura_kafka::ConsumerReport {
    let embedded = aura_runtime::testing::embedded();
    let recorder = Recorder::default();
    let registry = Registry::new().with(recorder.clone());
    let (stop, task) = start_with_options(settings, registry, embedded.ctx.clone(), options);
    aura_testkit::wait_until(
        "the good event after the poison",
        Duration::from_secs(60),
        || !recorder.handled.lock().unwrap().is_empty(),
    )
    .await
    .unwrap();
    stop.send(()).unwrap();
    task.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka and the Python venv: scripts/test.sh")]
async fn an_oversized_dead_letter_keeps_its_headers_size_and_digest_and_the_partition_moves_on() {
    use aura_kafka::rdkafka::message::Message as _;
    use sha2::Digest as _;
    let settings = KafkaSettings {
        message_max_bytes: 100_000,
        ..settings("dlq-large")
    };
    let poison = vec![b'#'; 300_000];
    let topics = poison_then_good(&settings, &poison, vec![("trace_id", b"t-1")]).await;
    let report = run_until_handled(&settings, options()).await;
    assert_eq!(report.dead_lettered, 1);

    let source = topics.for_event_type(EVENT_TYPE).unwrap();
    let dead = read_all(&settings, &format!("{source}.dlq"));
    assert_eq!(dead.len(), 1);
    let letter = &dead[0];
    let value = letter.payload().unwrap();
    assert!(
        value.len() < 100_000 && poison.starts_with(value),
        "{} bytes",
        value.len()
    );
    assert_eq!(header(letter, "original_size"), Some(&b"300000"[..]));
    let digest: String = sha2::Sha256::digest(&poison)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(header(letter, "original_sha256"), Some(digest.as_bytes()));
    assert_eq!(header(letter, "payload_truncated"), Some(&b"true"[..]));
    assert_eq!(header(letter, "trace_id"), Some(&b"t-1"[..]));
    assert_eq!(header(letter, "source_offset"), Some(&b"0"[..]));
    assert!(header(letter, "error").is_some());
    assert_eq!(committed(&settings, &source, 0), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka and the Python venv: scripts/test.sh")]
async fn a_dead_letter_the_topic_refuses_is_spooled_reported_and_the_partition_moves_on() {
    // A producer's odd header is larger than anything the dead-letter topic takes: no cut of the value can fit.
    let settings = KafkaSettings {
        message_max_bytes: 20_000,
        ..settings("dlq-spool")
    };
    let junk = vec![b'j'; 30_000];
    let topics = poison_then_good(&settings, b"{not json", vec![("x-junk", &junk)]).await;
    let reports = Arc::new(Reports::default());
    let options = ConsumerOptions {
        observer: Some(reports.clone()),
        ..options()
    };
    let spool = options.dead_letter_spool.clone();
    let report = run_until_handled(&settings, options).await;
    assert_eq!(report.dead_lettered, 1);

    let source = topics.for_event_type(EVENT_TYPE).unwrap();
    assert!(read_all(&settings, &format!("{source}.dlq")).is_empty());
    let spooled = std::fs::read_to_string(spool.join(format!("{source}.dlq.jsonl"))).unwrap();
    let lines: Vec<serde_json::Value> = spooled
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    let record = &lines[0];
    assert_eq!(record["topic"], format!("{source}.dlq"));
    assert_eq!(record["value"], "{not json");
    assert_eq!(record["headers"]["source_topic"], source.as_str());
    assert_eq!(record["headers"]["source_offset"], "0");
    assert_eq!(record["headers"]["x-junk"].as_str().unwrap().len(), 30_000);
    assert!(
        record["headers"]["error"]
            .as_str()
            .unwrap()
            .contains("undecodable")
    );
    let reports = reports.0.lock().unwrap();
    assert!(
        reports
            .iter()
            .any(|(d, r)| *d == "dead_letters" && r.as_ref().is_err_and(|e| e.contains("spooled"))),
        "{reports:?}"
    );
    assert_eq!(committed(&settings, &source, 0), Some(2));
    let _ = std::fs::remove_dir_all(spool);
}
