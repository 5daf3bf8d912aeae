//! `vectordb-consumer` against a real Apache Kafka broker with a real Python confluent-kafka producer (snappy batches,
//! as the services send them).
//!
//! Run through `scripts/test.sh`, which starts the broker and the venv and sets `AURA_TEST_KAFKA` and
//! `AURA_TEST_PYTHON`. Every test has its own topic prefix, consumer group and store directory, so they run in
//! parallel on one broker.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use aura_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _};
use aura_kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
use common::EmbeddingServer;
use serde_json::{Value, json};

const USER_TOPIC: &str = "aura360.user.events";
const AGGREGATED_TOPIC: &str = "aura360.context.aggregated";
const VECTORIZED_TOPIC: &str = "aura360.context.vectorized";
const ALL_TOPICS: [&str; 3] = [USER_TOPIC, AGGREGATED_TOPIC, VECTORIZED_TOPIC];

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with scripts/test.sh (it starts the broker and the Python venv)")
    })
}

/// One test's slice of the broker: its own topics (by prefix), group and embedded store.
struct Scenario {
    bootstrap: String,
    python: PathBuf,
    prefix: String,
    group: String,
    dir: tempfile::TempDir,
}

impl Scenario {
    fn new(name: &str) -> Self {
        Self::on_broker(name, required_env("AURA_TEST_KAFKA"))
    }

    /// A scenario on a broker of the test's own (one it stops and restarts).
    fn on_broker(name: &str, bootstrap: String) -> Self {
        let id = uuid_suffix();
        let scenario = Self {
            bootstrap,
            python: PathBuf::from(required_env("AURA_TEST_PYTHON")),
            prefix: format!("{name}-{id}."),
            group: format!("{name}-{id}"),
            dir: tempfile::tempdir().unwrap(),
        };
        let output = scenario.vectordb(&["topics", "create", "--json"]);
        let created: Vec<Value> = serde_json::from_str(&output).unwrap();
        assert_eq!(created.len(), 6, "{output}");
        scenario
    }

    fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn configure(&self, command: &mut Command) {
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KAFKA_BOOTSTRAP_SERVERS", &self.bootstrap)
            .env("KAFKA_TOPIC_PREFIX", &self.prefix)
            .env("KAFKA_GROUP_ID", &self.group)
            .env("KAFKA_SESSION_TIMEOUT_MS", "6000")
            .env("QDRANT_PATH", self.dir.path().join("qdrant"))
            // These tests measure the runtime, not the model: the hash embedder (64-d) is exact and instant.
            .env("EMBEDDING_PROVIDER", "hash")
            .env("EMBEDDING_DIM", "64")
            .env("RUST_LOG", "info,librdkafka=warn")
            // Every process serves /health and /metrics; port 0 so parallel tests never collide.
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("NO_COLOR", "1")
            .current_dir(self.dir.path());
    }

    fn vectordb(&self, args: &[&str]) -> String {
        self.vectordb_with(&[], args)
    }

    fn vectordb_with(&self, env: &[(&str, &str)], args: &[&str]) -> String {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vectordb"));
        self.configure(&mut command);
        let output = command
            .envs(env.iter().copied())
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "vectordb {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    fn points(&self) -> u64 {
        let stats: Value = serde_json::from_str(&self.vectordb(&["stats", "--json"])).unwrap();
        stats["points"].as_u64().unwrap()
    }

    fn start_consumer(&self, env: &[(&str, &str)]) -> Consumer {
        self.start(env!("CARGO_BIN_EXE_vectordb-consumer"), env)
    }

    /// A consumer that was assigned the user topic (after a member died without leaving, the group gives its
    /// partitions out once that member's session expired: KAFKA_SESSION_TIMEOUT_MS=6000 here).
    fn start_consumer_assigned(&self, env: &[(&str, &str)]) -> Consumer {
        let mut consumer = self.start_consumer(env);
        let topic = self.topic(USER_TOPIC);
        let started = Instant::now();
        loop {
            let log = consumer.log();
            if log
                .lines()
                .any(|l| l.contains("partitions assigned") && l.contains(&topic))
            {
                return consumer;
            }
            if let Some(status) = consumer.child.try_wait().unwrap() {
                panic!("consumer exited ({status}) before an assignment:\n{log}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "no assignment of {topic} in 120 s:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn start(&self, binary: &str, env: &[(&str, &str)]) -> Consumer {
        let log_path = self
            .dir
            .path()
            .join(format!("process-{}.log", uuid_suffix()));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = Command::new(binary);
        self.configure(&mut command);
        command.envs(env.iter().copied());
        let child = command.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        Consumer {
            child,
            log: log_path,
        }
    }

    fn python(&self, args: &[&str], stdin: Option<String>) -> String {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python");
        let mut command = Command::new(&self.python);
        command
            .arg(script.join(args[0]))
            .arg(&self.bootstrap)
            .args(&args[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let input = stdin.unwrap_or_default();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "python {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// `count` mood events from the Python producer, built as the Django API builds them.
    fn produce_moods(&self, count: usize, users: usize) {
        let sent = self.python(
            &[
                "produce.py",
                "moods",
                &self.topic(USER_TOPIC),
                &count.to_string(),
                &users.to_string(),
            ],
            None,
        );
        assert_eq!(sent.trim(), count.to_string());
    }

    /// Records given as `{"topic", "key", "value", "headers"}`, sent by the Python producer.
    fn produce_raw(&self, records: &[Value]) {
        let lines: String = records.iter().map(|r| format!("{r}\n")).collect();
        let sent = self.python(&["produce.py", "raw"], Some(lines));
        assert_eq!(sent.trim(), records.len().to_string());
    }

    fn read_topic(&self, topic: &str) -> Vec<Value> {
        self.python(&["read_topic.py", &self.topic(topic)], None)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// (committed, end) summed over a topic's partitions; never-committed counts as 0.
    fn offsets(&self, topic: &str) -> (i64, i64) {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", &self.group)
            .create()
            .unwrap();
        let topic = self.topic(topic);
        let timeout = Duration::from_secs(10);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout).unwrap();
        let mut list = TopicPartitionList::new();
        for partition in metadata.topics()[0].partitions() {
            list.add_partition(&topic, partition.id());
        }
        // A broker that was just restarted answers NotCoordinator until its group coordinator has loaded.
        let started = Instant::now();
        let committed = loop {
            match consumer.committed_offsets(list.clone(), timeout) {
                Ok(committed) => break committed,
                Err(error) if started.elapsed() < Duration::from_secs(60) => {
                    eprintln!("committed offsets of {topic}: {error}; asking again");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(error) => panic!("committed offsets of {topic}: {error}"),
            }
        };
        let mut sums = (0, 0);
        for element in committed.elements() {
            if let Offset::Offset(offset) = element.offset() {
                sums.0 += offset;
            }
            let (_, high) = consumer
                .fetch_watermarks(&topic, element.partition(), timeout)
                .unwrap();
            sums.1 += high;
        }
        sums
    }

    /// Waits until `done` holds for the offsets of every topic, or panics with them after `limit`.
    fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        consumer: &mut Consumer,
        done: impl Fn(&[(i64, i64)]) -> bool,
    ) {
        let started = Instant::now();
        loop {
            let offsets: Vec<(i64, i64)> = ALL_TOPICS.iter().map(|t| self.offsets(t)).collect();
            if done(&offsets) {
                return;
            }
            if let Some(status) = consumer.child.try_wait().unwrap() {
                panic!(
                    "consumer exited ({status}) while waiting for {what}:\n{}",
                    consumer.log()
                );
            }
            if started.elapsed() > limit {
                panic!(
                    "{what}: not reached after {limit:?}; offsets (committed, end) {offsets:?}\n{}",
                    consumer.log()
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Every topic fully committed, with `inputs` events on the user topic and the chain's outputs produced.
    fn wait_drained(&self, consumer: &mut Consumer, inputs: i64) {
        self.wait_for(
            "every topic committed to its end",
            // Generous: a loaded 2-core machine.
            Duration::from_secs(480),
            consumer,
            |offsets| {
                offsets[0].1 == inputs
                    && offsets[1].1 >= inputs
                    && offsets[2].1 >= inputs
                    && offsets.iter().all(|(committed, end)| committed == end)
            },
        );
    }
}

struct Consumer {
    child: Child,
    log: PathBuf,
}

impl Consumer {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; returns the exit status and how long the exit took.
    fn terminate(mut self) -> (ExitStatus, Duration, String) {
        let started = Instant::now();
        signal(&self.child, "-TERM");
        let deadline = started + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, started.elapsed(), self.log());
            }
            if Instant::now() > deadline {
                self.child.kill().unwrap();
                panic!("the consumer ignored SIGTERM for 30 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(self) -> String {
        let (status, _, log) = self.terminate();
        assert!(status.success(), "consumer exit {status}:\n{log}");
        log
    }

    fn kill_9(mut self) {
        signal(&self.child, "-KILL");
        self.child.wait().unwrap();
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .arg(signal)
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

fn uuid_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}{:x}", std::process::id(), nanos & 0xff_ffff)
}

fn mood_record(topic: &str, user: &str, index: usize) -> Value {
    let event_id = format!("00000000-0000-4000-8000-{index:012}");
    let event = json!({
        "event_id": event_id, "event_type": "user.mood.created", "timestamp": "2026-11-28T10:00:00",
        "trace_id": format!("trace-{index}"), "user_id": user, "metadata": {},
        "data": {"mood_score": 1 + index % 10, "tags": ["work"], "notes": format!("entry {index}")},
    });
    json!({
        "topic": topic, "key": user, "value": event.to_string(),
        "headers": {"event_type": "user.mood.created", "event_id": event_id, "trace_id": format!("trace-{index}")},
    })
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn python_produced_events_flow_through_all_three_handlers_into_the_store() {
    let kafka = Scenario::new("flow");
    kafka.produce_moods(300, 12);
    let mut consumer = kafka.start_consumer(&[]);
    kafka.wait_drained(&mut consumer, 300);
    consumer.stop();

    assert_eq!(kafka.points(), 300);
    // What our publisher produced looks like what the Python services produce: key = user_id, the three headers.
    let aggregated = kafka.read_topic(AGGREGATED_TOPIC);
    assert_eq!(aggregated.len(), 300);
    for record in &aggregated {
        let event: Value = serde_json::from_str(record["value"].as_str().unwrap()).unwrap();
        assert_eq!(record["key"], event["user_id"]);
        assert_eq!(record["headers"]["event_type"], "context.aggregated");
        assert_eq!(record["headers"]["event_id"], event["event_id"]);
        assert_eq!(record["headers"]["trace_id"], event["trace_id"]);
        assert!(event["metadata"]["causation_id"].is_string(), "{event}");
        assert_eq!(event["metadata"]["source"], "django-api");
    }
    assert!(kafka.read_topic(&format!("{USER_TOPIC}.dlq")).is_empty());
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn a_consumer_killed_mid_stream_resumes_and_every_event_becomes_exactly_its_points() {
    let kafka = Scenario::new("kill9");
    // Embeddings answered after 0–400 ms, varying per text: concurrent keys finish out of offset order, and the
    // backlog lasts long enough to be killed in the middle of it.
    let embedder = EmbeddingServer::start_delayed(&kafka.python, kafka.dir.path(), 0, 400);
    let url = embedder.url();
    let env = [
        ("EMBEDDING_PROVIDER", "openai"),
        ("EMBEDDING_URL", url.as_str()),
        ("EMBEDDING_TIMEOUT_S", "10"),
    ];
    kafka.produce_moods(2_000, 40);
    let mut consumer = kafka.start_consumer(&env);
    let addr = consumer.http_addr();
    // Killed while events that finished after an unfinished one sit in a window (committed only up to the gap).
    let started = Instant::now();
    let mut ahead_seen = 0.0;
    loop {
        let ahead = gauge(&addr, "aura360_kafka_finished_ahead_events");
        ahead_seen = f64::max(ahead_seen, ahead);
        // The second hop (the one that embeds) is where events are slow and finish out of order.
        if ahead > 0.0 && kafka.offsets(AGGREGATED_TOPIC).0 >= 300 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "never saw out-of-order completions in flight past 300 committed (max {ahead_seen}):\n{}",
            consumer.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    consumer.kill_9();
    let offsets: Vec<(i64, i64)> = ALL_TOPICS.iter().map(|t| kafka.offsets(t)).collect();
    assert!(
        offsets.iter().any(|(committed, end)| committed < end) || offsets[2].1 < 2_000,
        "killed too late to prove anything: {offsets:?}"
    );
    let mut consumer = kafka.start_consumer_assigned(&env);
    kafka.wait_drained(&mut consumer, 2_000);
    consumer.stop();
    assert_eq!(kafka.points(), 2_000);
}

/// One unlabelled gauge from `/metrics` (0 while absent).
fn gauge(addr: &str, name: &str) -> f64 {
    let (_, text) = common::http_get(addr, "/metrics");
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn poison_messages_are_dead_lettered_with_their_reason_and_good_ones_processed() {
    let kafka = Scenario::new("poison");
    let topic = kafka.topic(USER_TOPIC);
    let mut records = Vec::new();
    let poison = [
        json!({"topic": topic, "key": "u-bad", "value": "{not json"}),
        json!({"topic": topic, "key": "u-bad", "value": "{\"event_type\": \"user.mood.created\"}"}),
        json!({"topic": topic, "key": "u-bad", "headers": {"event_type": "user.mood.created"}}),
        json!({"topic": topic, "key": "u-bad", "value": json!({
            "event_id": "00000000-0000-4000-8000-bad000000001", "event_type": "user.mood.created",
            "timestamp": "2026-11-28T10:00:00", "user_id": "u-bad", "metadata": {},
            "data": {"mood_score": "very sad", "tags": ["x"]}}).to_string()}),
        json!({"topic": topic, "value": json!({
            "event_id": "00000000-0000-4000-8000-bad000000002", "event_type": "user.mood.created",
            "timestamp": "2026-11-28T10:00:00", "user_id": null, "metadata": {},
            "data": {"mood_score": 5, "tags": []}}).to_string()}),
    ];
    for index in 0..60 {
        records.push(mood_record(&topic, &format!("u{}", index % 6), index));
        if index % 12 == 5 {
            records.push(poison[index / 12].clone());
        }
    }
    // A type nobody here handles: skipped and committed, not dead-lettered.
    records.push(json!({"topic": topic, "key": "u1", "value": json!({
        "event_id": "00000000-0000-4000-8000-0000000000ff", "event_type": "user.profile.updated",
        "timestamp": "2026-11-28T10:00:00", "user_id": "u1", "metadata": {}}).to_string(),
        "headers": {"event_type": "user.profile.updated"}}));
    kafka.produce_raw(&records);

    let mut consumer = kafka.start_consumer(&[]);
    kafka.wait_for(
        "the user topic committed to its end",
        Duration::from_secs(300),
        &mut consumer,
        |offsets| {
            offsets[0].1 == 66
                && offsets[2].1 >= 60
                && offsets.iter().all(|(committed, end)| committed == end)
        },
    );
    assert!(
        consumer.child.try_wait().unwrap().is_none(),
        "consumer died"
    );
    consumer.stop();

    assert_eq!(kafka.points(), 60);
    let dead = kafka.read_topic(&format!("{USER_TOPIC}.dlq"));
    assert_eq!(dead.len(), 5, "{dead:#?}");
    for letter in &dead {
        let headers = &letter["headers"];
        assert_eq!(headers["source_topic"], topic.as_str());
        let offset: i64 = headers["source_offset"].as_str().unwrap().parse().unwrap();
        assert!((0..66).contains(&offset));
        assert!(
            headers["source_partition"]
                .as_str()
                .unwrap()
                .parse::<i32>()
                .is_ok()
        );
        assert!(!headers["error"].as_str().unwrap().is_empty());
        assert!(headers["handler"].is_string());
        // The original bytes, unchanged.
        assert!(
            poison.iter().any(|p| p["value"] == letter["value"]),
            "{letter}"
        );
    }
    let reasons: Vec<&str> = dead
        .iter()
        .map(|l| l["headers"]["error"].as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("undecodable event")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("empty message")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("mood_score")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("user_id")), "{reasons:?}");
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn a_disabled_consumer_or_handler_commits_nothing_and_the_backlog_is_processed_when_re_enabled() {
    let kafka = Scenario::new("disabled");
    kafka.produce_moods(100, 5);

    let mut consumer = kafka.start_consumer(&[("MESSAGING_BACKEND", "disabled")]);
    // Observed, not slept on: the process is up and has decided to take nothing.
    consumer.wait_log(
        "consuming nothing, committing nothing",
        Duration::from_secs(60),
    );
    assert!(consumer.child.try_wait().unwrap().is_none());
    assert_eq!(kafka.offsets(USER_TOPIC), (0, 100));
    consumer.stop();

    // One handler isolated: the user topic is processed, the aggregated topic is left alone.
    let mut consumer = kafka.start_consumer(&[("DISABLED_HANDLERS", "context_aggregated")]);
    kafka.wait_for(
        "mood events handled",
        Duration::from_secs(300),
        &mut consumer,
        |offsets| offsets[0] == (100, 100) && offsets[1].1 == 100,
    );
    // The member was assigned the user topic only: the aggregated topic is not one it could commit.
    let log = strip_ansi(&consumer.log());
    let assigned = log
        .lines()
        .find(|l| l.contains("partitions assigned"))
        .unwrap_or_else(|| panic!("no assignment logged:\n{log}"));
    assert!(assigned.contains(&kafka.topic(USER_TOPIC)), "{assigned}");
    assert!(
        !assigned.contains(&kafka.topic(AGGREGATED_TOPIC)),
        "{assigned}"
    );
    assert_eq!(kafka.offsets(AGGREGATED_TOPIC), (0, 100));
    consumer.stop();
    assert_eq!(kafka.points(), 0);

    let mut consumer = kafka.start_consumer(&[]);
    kafka.wait_drained(&mut consumer, 100);
    consumer.stop();
    assert_eq!(kafka.points(), 100);
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn sigterm_under_load_exits_zero_within_ten_seconds_and_loses_nothing() {
    let kafka = Scenario::new("sigterm");
    // Embeddings answered after 0–300 ms: events are in flight when SIGTERM comes.
    let embedder = EmbeddingServer::start_delayed(&kafka.python, kafka.dir.path(), 0, 300);
    let url = embedder.url();
    let env = [
        ("EMBEDDING_PROVIDER", "openai"),
        ("EMBEDDING_URL", url.as_str()),
        ("EMBEDDING_TIMEOUT_S", "10"),
    ];
    kafka.produce_moods(1_500, 30);
    let mut consumer = kafka.start_consumer(&env);
    kafka.wait_for(
        "some events committed",
        Duration::from_secs(300),
        &mut consumer,
        |offsets| offsets[0].0 >= 200,
    );
    let (status, took, log) = consumer.terminate();
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // The first hop is instant (no embedding): the chain as a whole must be unfinished.
    let offsets: Vec<(i64, i64)> = ALL_TOPICS.iter().map(|t| kafka.offsets(t)).collect();
    assert!(
        offsets.iter().any(|(committed, end)| committed < end) || offsets[2].1 < 1_500,
        "stopped too late to prove anything: {offsets:?}"
    );

    let mut consumer = kafka.start_consumer(&env);
    kafka.wait_drained(&mut consumer, 1_500);
    consumer.stop();
    assert_eq!(kafka.points(), 1_500);
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn topics_create_is_idempotent_and_publish_sends_the_python_record_shape() {
    let kafka = Scenario::new("publish");
    let again: Vec<Value> =
        serde_json::from_str(&kafka.vectordb(&["topics", "create", "--json"])).unwrap();
    assert_eq!(again.len(), 6);
    assert!(again.iter().all(|t| t["status"] == "exists"), "{again:?}");

    let lines: Vec<&str> = include_str!("../../../examples/mood_events.jsonl")
        .lines()
        .take(5)
        .collect();
    let file = kafka.dir.path().join("five.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let summary: Value = serde_json::from_str(&kafka.vectordb(&[
        "publish",
        "--events",
        file.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(summary["published"], 5, "{summary}");
    assert_eq!(summary["backend"], "kafka");
    let one: Value = serde_json::from_str(&kafka.vectordb(&[
        "publish",
        "--type",
        "context.aggregated",
        "--user",
        "user-9",
        "--data",
        r#"{"text_representation": "User: user-9"}"#,
        "--json",
    ]))
    .unwrap();
    assert_eq!(one["published"], 1, "{one}");

    let records = kafka.read_topic(USER_TOPIC);
    assert_eq!(records.len(), 5);
    for record in &records {
        let value: Value = serde_json::from_str(record["value"].as_str().unwrap()).unwrap();
        let sent: Value = lines
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|e| e["event_id"] == value["event_id"])
            .expect("a published event");
        assert_eq!(value, sent, "the event travels unchanged");
        assert_eq!(record["key"], sent["user_id"]);
        assert_eq!(record["headers"]["event_type"], sent["event_type"]);
        assert_eq!(record["headers"]["event_id"], sent["event_id"]);
    }
    let aggregated = kafka.read_topic(AGGREGATED_TOPIC);
    assert_eq!(aggregated.len(), 1);
    let value: Value = serde_json::from_str(aggregated[0]["value"].as_str().unwrap()).unwrap();
    assert_eq!(value["context_data"]["text_representation"], "User: user-9");
    assert_eq!(aggregated[0]["key"], "user-9");
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn rolling_back_to_celery_forwards_the_kafka_backlog_as_tasks_and_loses_nothing() {
    let kafka = Scenario::new("rollback");
    kafka.produce_moods(100, 5);
    // A redis-server of the test's own (never the machine's shared one).
    let own_redis = TestRedis::start();
    let redis_url = own_redis.url();
    let redis_url = redis_url.as_str();
    let mut redis = redis::Client::open(redis_url)
        .unwrap()
        .get_connection()
        .unwrap();
    let celery_env = [
        ("MESSAGING_BACKEND", "celery"),
        ("BROKER_URL", redis_url),
        ("RESULT_BACKEND", redis_url),
    ];

    let mut consumer = kafka.start_consumer(&celery_env);
    kafka.wait_for(
        "the backlog forwarded and committed",
        Duration::from_secs(300),
        &mut consumer,
        |offsets| offsets[0] == (100, 100),
    );
    consumer.stop();
    let queued: i64 = redis::cmd("LLEN")
        .arg("vectordb")
        .query(&mut redis)
        .unwrap();
    assert_eq!(queued, 100, "one Celery task per event left in Kafka");
    assert_eq!(
        kafka.offsets(AGGREGATED_TOPIC),
        (0, 0),
        "nothing handled on the Kafka side"
    );

    let mut worker = kafka.start(env!("CARGO_BIN_EXE_vectordb-worker"), &celery_env);
    let started = Instant::now();
    loop {
        let results: Vec<String> = redis::cmd("KEYS")
            .arg("celery-task-meta-*")
            .query(&mut redis)
            .unwrap();
        let (queued, unacked): (i64, i64) = redis::pipe()
            .cmd("LLEN")
            .arg("vectordb")
            .cmd("HLEN")
            .arg("unacked")
            .query(&mut redis)
            .unwrap();
        if results.len() == 300 && queued == 0 && unacked == 0 {
            break;
        }
        assert!(
            worker.child.try_wait().unwrap().is_none(),
            "worker exited:\n{}",
            worker.log()
        );
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "chain not done: {} results\n{}",
            results.len(),
            worker.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    worker.stop();
    assert_eq!(kafka.points(), 100);
}

// ---- Operations (issue 5): health and metrics, fallback, switching backends, export/replay, dead-letter replay ----

/// A `redis-server` of the test's own on a free port (no persistence): the Celery side of a switch or fallback.
struct TestRedis {
    server: aura_runtime::testing::RedisServer,
}

impl TestRedis {
    fn start() -> Self {
        Self {
            server: aura_runtime::testing::RedisServer::start(),
        }
    }

    fn url(&self) -> String {
        format!("{}/0", self.server.url())
    }

    fn connection(&self) -> Option<redis::Connection> {
        redis::Client::open(self.url()).ok()?.get_connection().ok()
    }

    fn int(&self, args: &[&str]) -> i64 {
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command.query(&mut self.connection().unwrap()).unwrap()
    }

    /// The Celery settings of a process on this Redis.
    fn env(&self) -> [(&'static str, String); 2] {
        [("BROKER_URL", self.url()), ("RESULT_BACKEND", self.url())]
    }

    /// Nothing waiting on or taken from `vectordb` (a worker finished everything it was given).
    fn idle(&self) -> bool {
        self.int(&["LLEN", "vectordb"]) == 0 && self.int(&["HLEN", "unacked"]) == 0
    }
}

/// Environment pairs with owned values, as `start` takes them.
fn pairs<'a>(owned: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    owned.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

impl Consumer {
    /// The address the process serves `/health` and `/metrics` on, from its start-up log line.
    fn http_addr(&mut self) -> String {
        let started = Instant::now();
        loop {
            let log = strip_ansi(&self.log());
            let found = log
                .lines()
                .find(|l| l.contains("serving /health and /metrics"))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|rest| rest.split_whitespace().next());
            if let Some(addr) = found {
                return addr.to_owned();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("exited ({status}) before serving HTTP:\n{log}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no HTTP address logged:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the process has logged `text`.
    fn wait_log(&mut self, text: &str, limit: Duration) {
        common::wait_log(&mut self.child, &self.log, text, 1, limit);
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn health(addr: &str) -> (u16, Value) {
    let (status, body) = common::http_get(addr, "/health");
    (status, serde_json::from_str(&body).unwrap())
}

/// `/health` until it answers `status`, or panics with the last answer after `limit`.
fn wait_health(addr: &str, status: &str, limit: Duration) -> (u16, Value) {
    let started = Instant::now();
    loop {
        let (code, body) = health(addr);
        if body["status"] == status {
            return (code, body);
        }
        assert!(
            started.elapsed() < limit,
            "/health never said {status}: {code} {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Scenario {
    /// `/metrics` parsed by Prometheus's reference parser (Python `prometheus_client`): one JSON per sample.
    fn metrics(&self, addr: &str) -> Vec<Value> {
        let (status, text) = common::http_get(addr, "/metrics");
        assert_eq!(status, 200);
        self.python(&["parse_metrics.py"], Some(text))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// `vectordb lag --json --kafka`: (committed, end) summed per source topic.
    fn lag(&self) -> Value {
        serde_json::from_str(&self.vectordb(&["lag", "--kafka", "--json"])).unwrap()
    }
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .map(|s| s["value"].as_f64().unwrap())
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn health_and_metrics_report_backend_readiness_and_backlog() {
    let kafka = Scenario::new("ops");

    // A broker that does not answer: not ready, and /health says why.
    let mut lost = kafka.start_consumer(&[("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")]);
    let addr = lost.http_addr();
    let (code, body) = health(&addr);
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "starting");
    lost.kill_9();

    kafka.produce_moods(20, 2);
    let mut consumer =
        kafka.start_consumer(&[("BACKLOG_SAMPLE_S", "1"), ("DISABLED_HANDLERS", "")]);
    let addr = consumer.http_addr();
    kafka.wait_drained(&mut consumer, 20);
    let (code, body) = wait_health(&addr, "ok", Duration::from_secs(30));
    assert_eq!(code, 200);
    assert_eq!(body["messaging_backend"], "kafka");
    assert_eq!(body["process"], "vectordb-consumer");
    assert_eq!(
        body["handlers"]["enabled"],
        json!(["mood_created", "context_aggregated", "ingest_vectors"])
    );
    assert_eq!(body["brokers"][0]["name"], "kafka");
    assert_eq!(body["brokers"][0]["reachable"], true);
    assert_eq!(
        body["embedder"],
        json!({"provider": "hash", "model": "hash-ngram-v1"})
    );

    // Once the sampler has seen the drained topics, the backlog is 0 on each.
    let user_topic = kafka.topic(USER_TOPIC);
    let started = Instant::now();
    let samples = loop {
        let samples = kafka.metrics(&addr);
        let backlog = sample(
            &samples,
            "aura360_backlog",
            &[("backend", "kafka"), ("queue_or_topic", &user_topic)],
        );
        if backlog == Some(0.0) {
            break samples;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "backlog {backlog:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        sample(&samples, "aura360_messaging_backend", &[]),
        Some(1.0)
    );
    for handler in ["mood_created", "context_aggregated", "ingest_vectors"] {
        assert_eq!(
            sample(
                &samples,
                "aura360_events_processed_total",
                &[("handler", handler), ("outcome", "success")]
            ),
            Some(20.0),
            "{handler}"
        );
        assert_eq!(
            sample(
                &samples,
                "aura360_handler_duration_seconds_count",
                &[("handler", handler)]
            ),
            Some(20.0)
        );
    }
    assert!(
        samples
            .iter()
            .any(|s| s["family"] == "aura360_handler_duration_seconds" && s["type"] == "histogram")
    );
    assert_eq!(
        sample(
            &samples,
            "aura360_events_published_total",
            &[("backend", "kafka"), ("event_type", "context.aggregated")]
        ),
        Some(20.0)
    );
    assert_eq!(
        sample(
            &samples,
            "aura360_consumer_lag",
            &[("topic", &user_topic), ("partition", "0")]
        ),
        Some(0.0)
    );
    consumer.stop();

    // `vectordb lag` agrees: everything committed.
    let lag = kafka.lag();
    assert_eq!(lag["kafka"]["total_lag"], 0, "{lag}");
    let user_partitions: Vec<&Value> = lag["kafka"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["topic"] == user_topic.as_str())
        .collect();
    assert_eq!(user_partitions.len(), 3);
    let committed: i64 = user_partitions
        .iter()
        .map(|p| p["committed"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(committed, 20);

    // Disabled: healthy by design, consuming nothing.
    let mut disabled = kafka.start_consumer(&[("MESSAGING_BACKEND", "disabled")]);
    let addr = disabled.http_addr();
    let (code, body) = wait_health(&addr, "disabled", Duration::from_secs(30));
    assert_eq!(code, 200);
    assert_eq!(body["messaging_backend"], "disabled");
    let samples = kafka.metrics(&addr);
    assert_eq!(
        sample(&samples, "aura360_messaging_backend", &[]),
        Some(0.0)
    );
    disabled.stop();

    // A Celery worker: its queue depth in the same metric, its disabled handler on /health.
    let redis = TestRedis::start();
    let mut env = redis.env().to_vec();
    env.extend([
        ("MESSAGING_BACKEND", "celery".to_owned()),
        ("DISABLED_HANDLERS", "ingest_vectors".to_owned()),
        ("BACKLOG_SAMPLE_S", "1".to_owned()),
    ]);
    let mut worker = kafka.start(env!("CARGO_BIN_EXE_vectordb-worker"), &pairs(&env));
    let addr = worker.http_addr();
    let (code, body) = wait_health(&addr, "ok", Duration::from_secs(30));
    assert_eq!(code, 200);
    assert_eq!(body["messaging_backend"], "celery");
    assert_eq!(body["handlers"]["disabled"], json!(["ingest_vectors"]));
    assert_eq!(body["brokers"][0]["name"], "redis");
    let samples = kafka.metrics(&addr);
    assert_eq!(
        sample(&samples, "aura360_messaging_backend", &[]),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &samples,
            "aura360_backlog",
            &[("backend", "celery"), ("queue_or_topic", "vectordb")]
        ),
        Some(0.0)
    );
    worker.stop();
}

/// Event lines of moods `range` (ids from the index), as `vectordb publish` reads them.
fn mood_lines(range: std::ops::Range<usize>) -> Vec<String> {
    range
        .map(|i| {
            let record = mood_record("", &format!("user-{}", i % 4), i);
            record["value"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn mood_id(index: usize) -> String {
    format!("00000000-0000-4000-8000-{index:012}")
}

/// `vectordb publish --events -` fed while it runs: lines go in as the test writes them.
struct StreamingPublisher {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
}

impl Scenario {
    fn start_publisher(&self, env: &[(&str, &str)]) -> StreamingPublisher {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vectordb"));
        self.configure(&mut command);
        command.envs(env.iter().copied());
        let mut child = command
            .args(["publish", "--events", "-", "--json"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        StreamingPublisher { child, stdin }
    }
}

impl StreamingPublisher {
    /// Writes `lines`, one every `pace`.
    fn feed(&mut self, lines: &[String], pace: Duration) {
        use std::io::Write as _;
        let stdin = self.stdin.as_mut().unwrap();
        for line in lines {
            writeln!(stdin, "{line}").unwrap();
            stdin.flush().unwrap();
            std::thread::sleep(pace);
        }
    }

    /// Closes the input and returns the summary.
    fn finish(mut self) -> Value {
        drop(self.stdin.take());
        let output = self.child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "publish failed: {stderr}");
        serde_json::from_slice(&output.stdout).unwrap_or_else(|_| panic!("no summary: {stderr}"))
    }
}

/// The event ids of the `process_mood_created` tasks waiting on `vectordb`.
fn queued_mood_ids(redis: &TestRedis) -> Vec<String> {
    use base64::Engine as _;
    let messages: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg("vectordb")
        .arg(0)
        .arg(-1)
        .query(&mut redis.connection().unwrap())
        .unwrap();
    messages
        .iter()
        .filter_map(|message| {
            let envelope: Value = serde_json::from_slice(message).unwrap();
            if !envelope["headers"]["task"]
                .as_str()?
                .ends_with("process_mood_created")
            {
                return None;
            }
            let body = base64::engine::general_purpose::STANDARD
                .decode(envelope["body"].as_str().unwrap())
                .unwrap();
            let body: Value = serde_json::from_slice(&body).unwrap();
            Some(body[0][0]["event_id"].as_str().unwrap().to_owned())
        })
        .collect()
}

/// Runs a Celery worker until the queue is empty and nothing is unacknowledged, then stops it.
fn run_worker_until_idle(kafka: &Scenario, redis: &TestRedis, env: &[(&str, &str)]) {
    let mut worker = kafka.start(env!("CARGO_BIN_EXE_vectordb-worker"), env);
    // The worker must have started consuming before "idle" means "done".
    worker.wait_log("vectordb-worker starting", Duration::from_secs(60));
    let started = Instant::now();
    let mut idle_since: Option<Instant> = None;
    loop {
        // Idle for a second in a row: nothing left, nothing produced by the last tasks.
        if redis.idle() {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(1) {
                break;
            }
        } else {
            idle_since = None;
        }
        if let Some(status) = worker.child.try_wait().unwrap() {
            panic!("worker exited ({status}):\n{}", worker.log());
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "Celery queue not drained:\n{}",
            worker.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    worker.stop();
}

/// Every source topic committed to its end (whatever the counts).
fn wait_all_committed(kafka: &Scenario, consumer: &mut Consumer) {
    kafka.wait_for(
        "every topic committed to its end",
        Duration::from_secs(480),
        consumer,
        |offsets| offsets.iter().all(|(committed, end)| committed == end),
    );
}

/// An Apache Kafka of the test's own, to stop and restart (the same port and data each time).
struct OwnBroker {
    dir: tempfile::TempDir,
}

impl OwnBroker {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// `start` (prints the bootstrap address) or `stop`.
    fn run(&self, action: &str) -> String {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/kafka-test-broker.sh");
        let output = Command::new("bash")
            .arg(&script)
            .arg(action)
            .arg(self.dir.path())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{action}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        // Stopped even when the test failed (stopping a stopped broker does nothing).
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/kafka-test-broker.sh");
        let _ = Command::new("bash")
            .arg(script)
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn sigterm_while_kafka_is_down_exits_within_ten_seconds_and_loses_nothing() {
    let broker = OwnBroker::new();
    let kafka = Scenario::on_broker("outage-stop", broker.run("start"));
    kafka.produce_moods(300, 20);
    let mut consumer = kafka.start_consumer(&[]);
    kafka.wait_for(
        "some events committed",
        Duration::from_secs(300),
        &mut consumer,
        |offsets| offsets[0].0 >= 50,
    );
    // librdkafka's close waits for the group coordinator: without a bound this exit would wait for Kafka.
    broker.run("stop");
    let (status, took, log) = consumer.terminate();
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(took < Duration::from_secs(10), "took {took:?}:\n{log}");

    // Kafka back: a new consumer finishes the job from the committed offsets (once the member that could not leave
    // has expired: `start_consumer_assigned`).
    broker.run("start");
    let mut consumer = kafka.start_consumer_assigned(&[]);
    kafka.wait_drained(&mut consumer, 300);
    consumer.stop();
    assert_eq!(kafka.points(), 300);
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn publishing_falls_back_to_celery_while_kafka_is_down_and_returns_to_kafka_after() {
    let broker = OwnBroker::new();
    let bootstrap = broker.run("start");
    let kafka = Scenario::on_broker("fallback", bootstrap.clone());
    let redis = TestRedis::start();
    let mut env = redis.env().to_vec();
    env.extend([
        ("MESSAGING_FALLBACK", "celery".to_owned()),
        ("MESSAGING_FALLBACK_TIMEOUT_MS", "2000".to_owned()),
        ("MESSAGING_FALLBACK_FAILURES", "2".to_owned()),
        ("MESSAGING_FALLBACK_OPEN_S", "2".to_owned()),
        ("HEALTH_BROKER_GRACE_S", "2".to_owned()),
        ("BACKLOG_SAMPLE_S", "1".to_owned()),
    ]);
    let env = pairs(&env);

    let mut consumer = kafka.start_consumer(&env);
    let addr = consumer.http_addr();
    wait_health(&addr, "ok", Duration::from_secs(60));
    let mut publisher = kafka.start_publisher(&env);
    let pace = Duration::from_millis(25);
    publisher.feed(&mood_lines(0..40), pace);
    kafka.wait_for(
        "the first 40 events on Kafka",
        Duration::from_secs(60),
        &mut consumer,
        |offsets| offsets[0].1 == 40,
    );

    // Kafka goes away mid-stream; the stream goes on.
    broker.run("stop");
    publisher.feed(&mood_lines(40..80), pace);
    let (code, body) = wait_health(&addr, "unavailable", Duration::from_secs(30));
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["brokers"][0]["reachable"], false);

    // Kafka is back (same port, same data): once the open period is over, the next event probes it.
    assert_eq!(broker.run("start"), bootstrap);
    wait_health(&addr, "ok", Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(3));
    publisher.feed(&mood_lines(80..120), Duration::from_millis(200));
    let summary = publisher.finish();
    assert_eq!(summary["published"], 120, "{summary}");
    assert_eq!(summary["failed"], json!([]), "{summary}");

    let in_kafka: std::collections::BTreeSet<String> = kafka
        .read_topic(USER_TOPIC)
        .iter()
        .map(|r| r["headers"]["event_id"].as_str().unwrap().to_owned())
        .collect();
    let in_celery: std::collections::BTreeSet<String> =
        queued_mood_ids(&redis).into_iter().collect();
    assert!(
        (40..80).any(|i| in_celery.contains(&mood_id(i))),
        "nothing went through Celery while Kafka was down"
    );
    assert!(
        (0..40).all(|i| in_kafka.contains(&mood_id(i))),
        "before the outage: Kafka"
    );
    // After the outage: the first events may still find the circuit open (or the producer reconnecting, which
    // librdkafka backs off up to 10 s), then publishing is back on Kafka for good.
    let via = |i: usize| match (
        in_kafka.contains(&mood_id(i)),
        in_celery.contains(&mood_id(i)),
    ) {
        (true, false) => 'K',
        (false, true) => 'C',
        (true, true) => 'B',
        (false, false) => '-',
    };
    let route: String = (0..120).map(via).collect();
    let back = (80..120).rev().take_while(|&i| via(i) == 'K').count();
    assert!(
        back >= 20,
        "the last 20+ events go to Kafka again; route: {route}"
    );
    assert!(
        (0..120).all(|i| in_kafka.contains(&mood_id(i)) || in_celery.contains(&mood_id(i))),
        "every event is somewhere"
    );
    // The summary says which backend took each event: the fallback took every one found in Celery (a 'B' is an
    // event Kafka delivered after its timeout had already sent it to Celery).
    let through_celery = route.chars().filter(|&c| c == 'C' || c == 'B').count();
    assert_eq!(
        summary["by_backend"]["celery"], through_celery,
        "{summary} route: {route}"
    );
    assert_eq!(
        summary["by_backend"]["kafka"],
        120 - through_celery,
        "{summary}"
    );

    // Both paths processed: the Kafka consumer, then a worker for what went to Celery. 0 lost.
    wait_all_committed(&kafka, &mut consumer);
    consumer.stop();
    let mut worker_env = env.clone();
    worker_env.push(("MESSAGING_BACKEND", "celery"));
    run_worker_until_idle(&kafka, &redis, &worker_env);
    assert_eq!(kafka.points(), 120);
    broker.run("stop");
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn switching_kafka_to_celery_and_back_under_load_loses_nothing() {
    let kafka = Scenario::new("switch");
    let redis = TestRedis::start();
    let kafka_env = redis.env().to_vec();
    let mut celery_env = kafka_env.clone();
    celery_env.push(("MESSAGING_BACKEND", "celery".to_owned()));
    let (kafka_env, celery_env) = (pairs(&kafka_env), pairs(&celery_env));

    // A producer that stays on Kafka all along (a service nobody switched), fed from its own thread.
    let mut steady = kafka.start_publisher(&kafka_env);
    let feeder = std::thread::spawn(move || {
        steady.feed(&mood_lines(0..300), Duration::from_millis(40));
        steady.finish()
    });

    // Kafka mode, until it has handled some of the stream.
    let mut consumer = kafka.start_consumer(&kafka_env);
    kafka.wait_for(
        "some events handled on Kafka",
        Duration::from_secs(120),
        &mut consumer,
        |offsets| offsets[0].0 > 0,
    );

    // Roll back to Celery: restart both processes with the new env; the switched API publishes tasks.
    consumer.stop();
    let mut consumer = kafka.start_consumer(&celery_env);
    let worker = kafka.start(env!("CARGO_BIN_EXE_vectordb-worker"), &celery_env);
    let mut switched = kafka.start_publisher(&celery_env);
    switched.feed(&mood_lines(1000..1100), Duration::from_millis(30));
    let summary = switched.finish();
    assert_eq!(summary["published"], 100, "{summary}");
    assert_eq!(summary["backend"], "celery");
    consumer.wait_log("forwarding Kafka's backlog", Duration::from_secs(60));
    let forwarded_from = kafka.offsets(USER_TOPIC).0;
    kafka.wait_for(
        "some of the backlog forwarded",
        Duration::from_secs(120),
        &mut consumer,
        |offsets| offsets[0].0 > forwarded_from || offsets[0].0 == offsets[0].1,
    );

    // And back to Kafka. The worker stops too (in production it would keep draining its queue; here it
    // shares the embedded store with the consumer, which one process holds at a time).
    consumer.stop();
    assert!(worker.terminate().0.success());
    let mut consumer = kafka.start_consumer(&kafka_env);
    let summary = feeder.join().unwrap();
    assert_eq!(summary["published"], 300, "{summary}");
    wait_all_committed(&kafka, &mut consumer);
    consumer.stop();
    run_worker_until_idle(&kafka, &redis, &celery_env);

    assert_eq!(
        kafka.points(),
        400,
        "every event processed once switched around"
    );
    let lag = kafka.lag();
    assert_eq!(lag["kafka"]["total_lag"], 0, "{lag}");
}

impl Scenario {
    /// The ids of `user`'s points (up to 1000), sorted: what a replay must reproduce.
    fn point_ids(&self, user: &str, env: &[(&str, &str)]) -> Vec<String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vectordb"));
        self.configure(&mut command);
        command.envs(env.iter().copied());
        let output = command
            .args([
                "search", "--user", user, "--text", "mood", "--limit", "1000", "--json",
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let hits: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
        let mut ids: Vec<String> = hits.iter().map(|h| h["id"].to_string()).collect();
        ids.sort();
        ids
    }

    /// `vectordb` with extra environment; returns its stdout as JSON.
    fn vectordb_json(&self, env: &[(&str, &str)], args: &[&str]) -> Value {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vectordb"));
        self.configure(&mut command);
        command.envs(env.iter().copied());
        let output = command.args(args).output().unwrap();
        assert!(
            output.status.success(),
            "vectordb {args:?}: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn export_then_replay_reproduces_the_same_points_and_is_safe_to_repeat() {
    let kafka = Scenario::new("export");
    kafka.produce_moods(30, 3);
    let mut consumer = kafka.start_consumer(&[]);
    kafka.wait_drained(&mut consumer, 30);
    consumer.stop();
    assert_eq!(kafka.points(), 30);
    let users = ["user-000", "user-001", "user-002"];
    let original: Vec<Vec<String>> = users.iter().map(|u| kafka.point_ids(u, &[])).collect();
    assert_eq!(original.iter().map(Vec::len).sum::<usize>(), 30);

    // Export the user topic: every record with its coordinates, key, headers and bytes.
    let export = kafka.dir.path().join("moods.jsonl");
    let topic = kafka.topic(USER_TOPIC);
    let summary = kafka.vectordb_json(
        &[],
        &[
            "export",
            "--topic",
            &topic,
            "--out",
            export.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(summary["records"], 30, "{summary}");
    let lines: Vec<Value> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 30);
    let on_topic = kafka.read_topic(USER_TOPIC);
    for record in &on_topic {
        let exported = lines
            .iter()
            .find(|l| l["partition"] == record["partition"] && l["offset"] == record["offset"])
            .expect("every record exported");
        assert_eq!(exported["topic"], topic.as_str());
        assert_eq!(exported["value"], record["value"], "the bytes, unchanged");
        assert_eq!(exported["key"], record["key"]);
        assert_eq!(
            exported["headers"]["event_id"],
            record["headers"]["event_id"]
        );
    }
    // A range: one partition, offsets [1, 3).
    let partition = lines
        .iter()
        .map(|l| l["partition"].as_i64().unwrap())
        .find(|p| lines.iter().filter(|l| l["partition"] == *p).count() >= 3)
        .unwrap();
    let range_file = kafka.dir.path().join("range.jsonl");
    let summary = kafka.vectordb_json(
        &[],
        &[
            "export",
            "--topic",
            &topic,
            "--partition",
            &partition.to_string(),
            "--from-offset",
            "1",
            "--to-offset",
            "3",
            "--out",
            range_file.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(summary["records"], 2, "{summary}");

    // Replay the export into the handlers, on an empty store: the same point ids.
    let fresh = kafka.dir.path().join("replayed");
    let fresh_env = [("QDRANT_PATH", fresh.to_str().unwrap())];
    let summary = kafka.vectordb_json(
        &fresh_env,
        &[
            "replay",
            "--file",
            export.to_str().unwrap(),
            "--to",
            "handlers",
            "--json",
        ],
    );
    assert_eq!(summary["replayed"], 30, "{summary}");
    assert_eq!(summary["collection_points"], 30, "{summary}");
    let replayed: Vec<Vec<String>> = users
        .iter()
        .map(|u| kafka.point_ids(u, &fresh_env))
        .collect();
    assert_eq!(replayed, original);

    // Into Celery tasks, on another empty store, run by the worker: the same point ids again.
    let redis = TestRedis::start();
    let celery_store = kafka.dir.path().join("via-celery");
    let mut env = redis.env().to_vec();
    env.push(("QDRANT_PATH", celery_store.to_str().unwrap().to_owned()));
    env.push(("MESSAGING_BACKEND", "celery".to_owned()));
    let env = pairs(&env);
    let summary = kafka.vectordb_json(
        &env,
        &[
            "replay",
            "--file",
            export.to_str().unwrap(),
            "--to",
            "celery",
            "--json",
        ],
    );
    assert_eq!(summary["replayed"], 30, "{summary}");
    assert_eq!(queued_mood_ids(&redis).len(), 30);
    run_worker_until_idle(&kafka, &redis, &env);
    let via_celery: Vec<Vec<String>> = users.iter().map(|u| kafka.point_ids(u, &env)).collect();
    assert_eq!(via_celery, original);

    // Into Kafka, twice over what was already processed: duplicates overwrite, nothing is added.
    let summary = kafka.vectordb_json(
        &[],
        &[
            "replay",
            "--file",
            export.to_str().unwrap(),
            "--to",
            "kafka",
            "--json",
        ],
    );
    assert_eq!(summary["replayed"], 30, "{summary}");
    assert_eq!(kafka.offsets(USER_TOPIC).1, 60);
    let mut consumer = kafka.start_consumer(&[]);
    wait_all_committed(&kafka, &mut consumer);
    consumer.stop();
    assert_eq!(kafka.points(), 30);
    let after: Vec<Vec<String>> = users.iter().map(|u| kafka.point_ids(u, &[])).collect();
    assert_eq!(after, original);
}

/// An "embedding endpoint" that refuses every request with 401 (a revoked API key): a permanent failure.
fn refusing_embedder() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buffer = [0u8; 65536];
            let _ = stream.read(&mut buffer);
            let body = r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error"}}"#;
            let _ = write!(
                stream,
                "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}/v1")
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn dead_letters_are_replayed_to_their_source_after_the_fix() {
    let kafka = Scenario::new("dlqreplay");
    let broken_url = refusing_embedder();
    let broken = [
        ("EMBEDDING_PROVIDER", "openai"),
        ("EMBEDDING_URL", broken_url.as_str()),
    ];

    // Kafka: the embedder refuses, so every context.aggregated event is dead-lettered.
    kafka.produce_moods(10, 2);
    let consumer = kafka.start_consumer(&broken);
    let dlq = format!("{AGGREGATED_TOPIC}.dlq");
    let started = Instant::now();
    while kafka.offsets(&dlq).1 < 10 || kafka.offsets(AGGREGATED_TOPIC) != (10, 10) {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "not dead-lettered:\n{}",
            consumer.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    consumer.stop();
    assert_eq!(kafka.points(), 0);
    let letters = kafka.read_topic(&dlq);
    assert_eq!(letters.len(), 10);
    assert!(
        letters[0]["headers"]["error"]
            .as_str()
            .unwrap()
            .contains("401"),
        "{}",
        letters[0]
    );

    // The fix (a working embedder), then the dead letters back to their source topic.
    let summary = kafka.vectordb_json(
        &[],
        &[
            "replay",
            "--topic",
            &kafka.topic(&dlq),
            "--to",
            "kafka",
            "--json",
        ],
    );
    assert_eq!(summary["replayed"], 10, "{summary}");
    let replayed = kafka.read_topic(AGGREGATED_TOPIC);
    assert_eq!(replayed.len(), 20);
    assert!(
        replayed[10..]
            .iter()
            .all(|r| r["headers"].get("error").is_none()),
        "dead-letter headers stripped"
    );
    let mut consumer = kafka.start_consumer(&[]);
    wait_all_committed(&kafka, &mut consumer);
    consumer.stop();
    assert_eq!(kafka.points(), 10);

    // Celery: same failure, no retries → `vectordb.dlq`; the fix; `--celery-dlq` puts them back; the worker runs them.
    let redis = TestRedis::start();
    let mut env = redis.env().to_vec();
    env.push(("MESSAGING_BACKEND", "celery".to_owned()));
    env.push(("CELERY_MAX_RETRIES", "0".to_owned()));
    let fixed_env = pairs(&env);
    let mut broken_env = fixed_env.clone();
    broken_env.extend(broken);
    let mut publisher = kafka.start_publisher(&fixed_env);
    publisher.feed(&mood_lines(2000..2010), Duration::ZERO);
    assert_eq!(publisher.finish()["published"], 10);
    run_worker_until_idle(&kafka, &redis, &broken_env);
    assert_eq!(redis.int(&["LLEN", "vectordb.dlq"]), 10);
    assert_eq!(kafka.points(), 10);
    let summary = kafka.vectordb_json(
        &fixed_env,
        &["replay", "--celery-dlq", "vectordb", "--json"],
    );
    assert_eq!(summary["replayed"], 10, "{summary}");
    assert_eq!(redis.int(&["LLEN", "vectordb.dlq"]), 0);
    assert_eq!(redis.int(&["LLEN", "vectordb"]), 10);
    run_worker_until_idle(&kafka, &redis, &fixed_env);
    assert_eq!(redis.int(&["LLEN", "vectordb.dlq"]), 0);
    assert_eq!(kafka.points(), 20);
}

impl Consumer {
    /// Peak resident memory so far (`VmHWM`), in bytes.
    fn peak_rss(&self) -> u64 {
        common::peak_rss(self.child.id())
    }
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn journal_sized_entries_among_ordinary_events_of_the_same_user_neither_stall_nor_bloat_the_consumer()
 {
    let kafka = Scenario::new("journal");
    let topic = kafka.topic(USER_TOPIC);
    let mut records = Vec::new();
    let mut journals = 0;
    for index in 0..300 {
        // Two users; every 25th event of "writer" is a journal entry of 50 KB to 900 KB.
        let user = if index % 2 == 0 { "writer" } else { "reader" };
        let mut record = mood_record(&topic, user, index);
        if user == "writer" && index % 25 == 0 {
            let size = 50_000 + (index * 7_919 % 850_000);
            let mut event: Value = serde_json::from_str(record["value"].as_str().unwrap()).unwrap();
            event["data"]["notes"] =
                json!("today I wrote and wrote about it all. ".repeat(size / 38));
            record["value"] = json!(event.to_string());
            journals += 1;
        }
        records.push(record);
    }
    kafka.produce_raw(&records);
    let mut consumer = kafka.start_consumer(&[]);
    kafka.wait_drained(&mut consumer, 300);
    let peak = consumer.peak_rss();
    consumer.stop();

    assert!(
        kafka.read_topic(&format!("{USER_TOPIC}.dlq")).is_empty(),
        "a journal entry was dead-lettered"
    );
    assert!(
        kafka
            .read_topic(&format!("{AGGREGATED_TOPIC}.dlq"))
            .is_empty()
    );
    // Each ordinary event is one point; each journal entry is cut to MAX_EMBED_CHARS: MAX_CHUNKS_PER_EVENT points.
    assert_eq!(kafka.points(), (300 - journals) + journals * 40);
    assert!(
        peak <= 500 * 1024 * 1024,
        "consumer peak RSS {} MB over the 500 MB goal",
        peak / (1024 * 1024)
    );
    eprintln!(
        "journal entries: {journals}, consumer peak RSS {} MB",
        peak / (1024 * 1024)
    );
}

fn embedder_down(body: &Value) -> bool {
    body["dependencies"].as_array().is_some_and(|deps| {
        deps.iter()
            .any(|d| d["name"] == "embedder" && d["ok"] == false)
    })
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn an_embedding_outage_under_the_kafka_consumer_is_retried_reported_and_loses_nothing() {
    let kafka = Scenario::new("outage-kafka");
    let embedder = EmbeddingServer::start(&kafka.python, kafka.dir.path(), 30);
    kafka.produce_moods(100, 10);
    let url = embedder.url();
    let mut consumer = kafka.start_consumer(&[
        ("EMBEDDING_PROVIDER", "openai"),
        ("EMBEDDING_URL", &url),
        ("EMBEDDING_TIMEOUT_S", "5"),
    ]);
    let addr = consumer.http_addr();
    let (code, body) = wait_health(&addr, "degraded", Duration::from_secs(60));
    assert_eq!(code, 200, "degraded is alive and retrying: {body}");
    assert!(embedder_down(&body), "{body}");
    assert!(body["dependencies"].to_string().contains("503"), "{body}");

    kafka.wait_drained(&mut consumer, 100);
    let (_, body) = wait_health(&addr, "ok", Duration::from_secs(30));
    assert!(!embedder_down(&body), "{body}");
    consumer.stop();

    assert_eq!(kafka.points(), 100);
    for topic in ALL_TOPICS {
        assert!(
            kafka.read_topic(&format!("{topic}.dlq")).is_empty(),
            "{topic}.dlq"
        );
    }
    // Backoff, not a hot loop: ten users' keys retrying for 30 s (~8 attempts each with a doubling backoff).
    let (refused, served) = embedder.requests();
    assert!((3..=200).contains(&refused), "{refused} requests refused");
    assert!(served >= 100, "{served}");
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn an_embedding_outage_under_the_celery_worker_is_retried_reported_and_loses_nothing() {
    let kafka = Scenario::new("outage-celery");
    let redis = TestRedis::start();
    let embedder = EmbeddingServer::start(&kafka.python, kafka.dir.path(), 30);
    let mut env = redis.env().to_vec();
    env.extend([
        ("MESSAGING_BACKEND", "celery".to_owned()),
        ("EMBEDDING_PROVIDER", "openai".to_owned()),
        ("EMBEDDING_URL", embedder.url()),
        ("EMBEDDING_TIMEOUT_S", "5".to_owned()),
        // Celery-style retries (a retried task goes back with an eta): 5 s, 10 s, 20 s, 40 s… outlast the outage.
        ("CELERY_RETRY_BACKOFF_MS", "5000".to_owned()),
        ("CELERY_MAX_RETRIES", "6".to_owned()),
    ]);
    let env = pairs(&env);
    let mut publisher = kafka.start_publisher(&env);
    publisher.feed(&mood_lines(0..60), Duration::ZERO);
    assert_eq!(publisher.finish()["published"], 60);

    let mut worker = kafka.start(env!("CARGO_BIN_EXE_vectordb-worker"), &env);
    let addr = worker.http_addr();
    let (code, body) = wait_health(&addr, "degraded", Duration::from_secs(60));
    assert_eq!(code, 200, "{body}");
    assert!(embedder_down(&body), "{body}");
    let started = Instant::now();
    let mut idle_since: Option<Instant> = None;
    loop {
        if redis.idle() && embedder.requests().1 > 0 {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(1) {
                break;
            }
        } else {
            idle_since = None;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "Celery queue not drained:\n{}",
            worker.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, body) = wait_health(&addr, "ok", Duration::from_secs(30));
    assert!(!embedder_down(&body), "{body}");
    worker.stop();

    assert_eq!(redis.int(&["LLEN", "vectordb.dlq"]), 0);
    assert_eq!(kafka.points(), 60);
    let (refused, _) = embedder.requests();
    assert!(refused >= 1, "the outage was seen");
}

/// A small tmpfs the test mounts for the embedded store, so it can fill it up. Unmounted on drop.
struct SmallFilesystem {
    path: PathBuf,
}

impl SmallFilesystem {
    fn mount(at: PathBuf, megabytes: u32) -> Self {
        std::fs::create_dir_all(&at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&at)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CI and the dev machines run as root)"
        );
        Self { path: at }
    }

    /// Writes a filler file until the filesystem is full.
    fn fill(&self) {
        use std::io::Write as _;
        let mut file = std::fs::File::create(self.path.join("filler")).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.path.join("filler")).unwrap();
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn a_full_disk_under_the_embedded_store_is_retried_reported_and_loses_nothing() {
    let kafka = Scenario::new("disk-full");
    let fs = SmallFilesystem::mount(kafka.dir.path().join("store-fs"), 96);
    let store = fs.path.join("qdrant");
    let store_env = store.to_str().unwrap().to_owned();
    // 96 MB of which the store needs a few; writes wait below 32 MB free.
    let env = [
        ("QDRANT_PATH", store_env.as_str()),
        ("QDRANT_MIN_FREE_MB", "32"),
    ];
    kafka.produce_moods(50, 5);
    let mut consumer = kafka.start_consumer(&env);
    let addr = consumer.http_addr();
    kafka.wait_drained(&mut consumer, 50);

    fs.fill();
    kafka.produce_moods(50, 5);
    // The refused write is retried (not a crash): wait for the third attempt, then ask /health.
    consumer.wait_log("MiB free", Duration::from_secs(60));
    consumer.wait_log("attempt=3", Duration::from_secs(60));
    let (code, body) = wait_health(&addr, "degraded", Duration::from_secs(60));
    assert_eq!(code, 200, "{body}");
    assert!(
        body["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["name"] == "vector_store" && d["ok"] == false),
        "{body}"
    );
    assert!(
        consumer.child.try_wait().unwrap().is_none(),
        "the consumer died:\n{}",
        consumer.log()
    );

    fs.free();
    kafka.wait_drained(&mut consumer, 100);
    wait_health(&addr, "ok", Duration::from_secs(60));
    consumer.stop();
    for topic in ALL_TOPICS {
        assert!(
            kafka.read_topic(&format!("{topic}.dlq")).is_empty(),
            "{topic}.dlq"
        );
    }
    let stats: Value =
        serde_json::from_str(&kafka.vectordb_with(&env, &["stats", "--json"])).unwrap();
    assert_eq!(stats["points"], 100);
}

// ---- The Python services' publisher (clients/python) against our consumer and worker ----

impl Scenario {
    /// `python -m aura360_events FILE` (the package's source tree, as installed) with `env`: its JSON summary.
    fn python_publish(&self, lines: &[String], env: &[(&str, &str)]) -> Value {
        let file = self
            .dir
            .path()
            .join(format!("events-{}.jsonl", uuid_suffix()));
        std::fs::write(&file, lines.join("\n") + "\n").unwrap();
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/python/src");
        let output = Command::new(&self.python)
            .args(["-m", "aura360_events"])
            .arg(&file)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PYTHONPATH", source)
            .env("KAFKA_BOOTSTRAP_SERVERS", &self.bootstrap)
            .env("KAFKA_TOPIC_PREFIX", &self.prefix)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "aura360_events failed: {stderr}");
        serde_json::from_slice(&output.stdout).unwrap_or_else(|_| panic!("no summary: {stderr}"))
    }
}

fn activity_lines(range: std::ops::Range<usize>) -> Vec<String> {
    range
        .map(|i| {
            json!({
                "event_id": mood_id(i), "event_type": "user.activity.created",
                "timestamp": "2025-03-01T08:00:00", "trace_id": format!("trace-{i}"),
                "user_id": format!("user-{}", i % 4), "metadata": {"source": "agents"},
                "data": {"activity_type": "run", "duration": 30 + i, "calories": 200.5},
            })
            .to_string()
        })
        .collect()
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn the_python_publisher_feeds_the_consumer_and_the_worker_on_every_backend() {
    let kafka = Scenario::new("pyclient");
    let redis = TestRedis::start();
    let celery = redis.env().to_vec();
    let celery = pairs(&celery);

    // MESSAGING_BACKEND=kafka: the record shape the consumer reads.
    let mut to_kafka = mood_lines(0..20);
    to_kafka.extend(activity_lines(20..30));
    let summary = kafka.python_publish(&to_kafka, &[("MESSAGING_BACKEND", "kafka")]);
    assert_eq!(summary["by_backend"], json!({"kafka": 30}), "{summary}");
    let records = kafka.read_topic(USER_TOPIC);
    assert_eq!(records.len(), 30);
    for record in &records {
        let value: Value = serde_json::from_str(record["value"].as_str().unwrap()).unwrap();
        assert_eq!(record["key"], value["user_id"], "{record}");
        assert_eq!(record["headers"]["event_id"], value["event_id"], "{record}");
        assert_eq!(
            record["headers"]["event_type"], value["event_type"],
            "{record}"
        );
        assert_eq!(record["headers"]["trace_id"], value["trace_id"], "{record}");
    }

    // MESSAGING_BACKEND=celery: `send_task` onto the worker's queue.
    let mut env = celery.clone();
    env.push(("MESSAGING_BACKEND", "celery"));
    let summary = kafka.python_publish(&mood_lines(30..50), &env);
    assert_eq!(summary["by_backend"], json!({"celery": 20}), "{summary}");
    assert_eq!(redis.int(&["LLEN", "vectordb"]), 20);

    // MESSAGING_BACKEND=disabled: counted, sent nowhere.
    let mut env = celery.clone();
    env.push(("MESSAGING_BACKEND", "disabled"));
    let summary = kafka.python_publish(&mood_lines(50..60), &env);
    assert_eq!(summary["by_backend"], json!({"disabled": 10}), "{summary}");
    assert_eq!(redis.int(&["LLEN", "vectordb"]), 20);
    assert_eq!(kafka.offsets(USER_TOPIC).1, 30);

    // Both become points: 30 through the consumer, 20 through the worker.
    let mut consumer = kafka.start_consumer(&celery);
    kafka.wait_drained(&mut consumer, 30);
    consumer.stop();
    assert_eq!(kafka.points(), 30);
    let mut env = celery.clone();
    env.push(("MESSAGING_BACKEND", "celery"));
    run_worker_until_idle(&kafka, &redis, &env);
    assert_eq!(kafka.points(), 50);
    let ids = kafka.point_ids("user-1", &[]);
    // user-1 has i = 1, 5, 9, … below 50: 13 events, one point each.
    assert_eq!(ids.len(), 13, "{ids:?}");
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn the_python_publisher_falls_back_to_celery_while_the_broker_is_stopped() {
    let broker = OwnBroker::new();
    let bootstrap = broker.run("start");
    let kafka = Scenario::on_broker("pyfallback", bootstrap.clone());
    let redis = TestRedis::start();
    let mut env = redis.env().to_vec();
    env.extend([
        ("MESSAGING_BACKEND", "kafka".to_owned()),
        ("MESSAGING_FALLBACK", "celery".to_owned()),
        ("MESSAGING_FALLBACK_TIMEOUT_MS", "1500".to_owned()),
        ("MESSAGING_FALLBACK_FAILURES", "2".to_owned()),
        ("MESSAGING_FALLBACK_OPEN_S", "60".to_owned()),
    ]);
    let env = pairs(&env);

    broker.run("stop");
    let summary = kafka.python_publish(&mood_lines(0..10), &env);
    assert_eq!(summary["by_backend"], json!({"celery": 10}), "{summary}");
    assert_eq!(redis.int(&["LLEN", "vectordb"]), 10);

    assert_eq!(broker.run("start"), bootstrap);
    let summary = kafka.python_publish(&mood_lines(10..20), &env);
    assert_eq!(summary["by_backend"], json!({"kafka": 10}), "{summary}");

    let mut consumer = kafka.start_consumer(&[]);
    wait_all_committed(&kafka, &mut consumer);
    consumer.stop();
    let mut worker_env = env.clone();
    worker_env.retain(|(k, _)| *k != "MESSAGING_BACKEND");
    worker_env.push(("MESSAGING_BACKEND", "celery"));
    run_worker_until_idle(&kafka, &redis, &worker_env);
    assert_eq!(
        kafka.points(),
        20,
        "every event became its point, 10 per path"
    );
    broker.run("stop");
}

// ---- Metrics before the first event ----

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn a_fresh_consumer_and_worker_export_their_counters_at_zero_in_every_mode() {
    let kafka = Scenario::new("zeros");
    let redis = TestRedis::start();
    for mode in ["kafka", "celery", "disabled"] {
        for binary in [
            env!("CARGO_BIN_EXE_vectordb-consumer"),
            env!("CARGO_BIN_EXE_vectordb-worker"),
        ] {
            let worker = binary.ends_with("vectordb-worker");
            let mut env = redis.env().to_vec();
            env.push(("MESSAGING_BACKEND", mode.to_owned()));
            // No traffic at all: a consumer in celery mode drains nothing (the topics are empty).
            let mut process = kafka.start(binary, &pairs(&env));
            let addr = process.http_addr();
            let samples = kafka.metrics(&addr);
            let at = |name: &str, labels: &[(&str, &str)]| {
                sample(&samples, name, labels).unwrap_or_else(|| {
                    panic!(
                        "{binary} ({mode}): no {name}{labels:?} before any traffic:\n{samples:#?}"
                    )
                })
            };
            let gauge = match mode {
                "kafka" => 1.0,
                "celery" => 2.0,
                _ => 0.0,
            };
            assert_eq!(at("aura360_messaging_backend", &[]), gauge);
            for event_type in [
                "user.mood.created",
                "context.aggregated",
                "context.vectorized",
            ] {
                let labels = [("backend", mode), ("event_type", event_type)];
                assert_eq!(at("aura360_events_published_total", &labels), 0.0);
            }
            for handler in ["mood_created", "context_aggregated", "ingest_vectors"] {
                for outcome in ["success", "transient_error", "permanent_error"] {
                    let labels = [("handler", handler), ("outcome", outcome)];
                    assert_eq!(at("aura360_events_processed_total", &labels), 0.0);
                }
                let mount = if worker { "celery" } else { "kafka" };
                let labels = [("backend", mount), ("handler", handler)];
                assert_eq!(at("aura360_dead_letters_total", &labels), 0.0);
            }
            let skipped = [("handler", "none"), ("outcome", "skipped")];
            assert_eq!(at("aura360_events_processed_total", &skipped), 0.0);
            // /health's status as a gauge: exactly one status is 1.
            let statuses: f64 = ["ok", "starting", "unavailable", "degraded", "disabled"]
                .iter()
                .map(|s| at("aura360_health_status", &[("status", s)]))
                .sum();
            assert_eq!(statuses, 1.0);
            process.stop();
        }
    }
}

// ---- A real Prometheus (Debian's package; scripts/test.sh installs it) scraping both processes ----

/// `prometheus` on a free port with its data in `dir`, scraping `targets` every second and evaluating
/// deploy/prometheus/alerts.yml every second.
struct Prometheus {
    child: Child,
    addr: String,
}

impl Prometheus {
    fn start(dir: &Path, targets: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let rules =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus/alerts.yml");
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n",
            rules.canonicalize().unwrap().display()
        );
        for (job, target) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("prometheus: {e} (scripts/test.sh installs Debian's prometheus package)")
            });
        let prometheus = Self {
            child,
            addr: format!("127.0.0.1:{port}"),
        };
        let started = Instant::now();
        while common::try_http_get(&prometheus.addr, "/-/ready").map(|(s, _)| s) != Some(200) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "prometheus not ready:\n{}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        prometheus
    }

    /// `GET /api/v1/<path>`: its `data`.
    fn api(&self, path: &str) -> Value {
        let (status, body) = common::http_get(&self.addr, &format!("/api/v1/{path}"));
        assert_eq!(status, 200, "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["status"], "success", "{body}");
        body["data"].clone()
    }

    /// Waits until `done` holds for the result of the instant query `query`.
    fn wait_query(
        &self,
        query: &str,
        limit: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let started = Instant::now();
        loop {
            let result = self.api(&format!("query?query={query}"))["result"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if done(&result) {
                return result;
            }
            assert!(started.elapsed() < limit, "{query}: {result:?}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn a_real_prometheus_scrapes_both_processes_and_the_lag_alert_goes_pending() {
    let kafka = Scenario::new("prom");
    let redis = TestRedis::start();
    // 1,200 mood events wait behind a disabled handler: the group's lag stays above the alert's 1,000.
    kafka.produce_moods(1_200, 5);
    let mut env = redis.env().to_vec();
    env.extend([
        ("BACKLOG_SAMPLE_S", "1".to_owned()),
        ("DISABLED_HANDLERS", "mood_created".to_owned()),
    ]);
    let mut consumer = kafka.start_consumer(&pairs(&env));
    let mut worker_env = env.clone();
    worker_env.push(("MESSAGING_BACKEND", "celery".to_owned()));
    // Embedded Qdrant is one process's: the worker has a store of its own.
    let worker_store = kafka.dir.path().join("qdrant-worker");
    worker_env.push(("QDRANT_PATH", worker_store.display().to_string()));
    let mut worker = kafka.start(env!("CARGO_BIN_EXE_vectordb-worker"), &pairs(&worker_env));
    let (consumer_addr, worker_addr) = (consumer.http_addr(), worker.http_addr());
    let prometheus = Prometheus::start(
        kafka.dir.path(),
        &[
            ("vectordb-consumer", consumer_addr.as_str()),
            ("vectordb-worker", worker_addr.as_str()),
        ],
    );

    // The backend of each process, labelled by the scrape.
    let backends =
        prometheus.wait_query("aura360_messaging_backend", Duration::from_secs(60), |r| {
            r.len() == 2
        });
    let by_job: std::collections::BTreeMap<String, String> = backends
        .iter()
        .map(|s| {
            (
                s["metric"]["job"].as_str().unwrap().to_owned(),
                s["value"][1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(by_job["vectordb-consumer"], "1", "kafka: {backends:?}");
    assert_eq!(by_job["vectordb-worker"], "2", "celery: {backends:?}");
    assert!(backends.iter().all(|s| s["metric"]["instance"].is_string()));

    // The backlog: Kafka lag of the user topic (1,200, the disabled handler's input), the worker's Celery queue (0).
    let user_topic = kafka.topic(USER_TOPIC);
    let backlog = prometheus.wait_query("aura360_backlog", Duration::from_secs(60), |r| {
        r.iter().any(|s| {
            s["metric"]["queue_or_topic"] == user_topic.as_str() && s["value"][1] == "1200"
        }) && r.iter().any(|s| s["metric"]["backend"] == "celery")
    });
    let celery = backlog
        .iter()
        .find(|s| s["metric"]["backend"] == "celery")
        .unwrap();
    assert_eq!(celery["metric"]["queue_or_topic"], "vectordb", "{celery}");
    assert_eq!(celery["metric"]["job"], "vectordb-worker", "{celery}");
    let kafka_lag = backlog
        .iter()
        .find(|s| s["metric"]["queue_or_topic"] == user_topic.as_str())
        .unwrap();
    assert_eq!(kafka_lag["metric"]["backend"], "kafka");
    assert_eq!(kafka_lag["metric"]["job"], "vectordb-consumer");

    // The plan's lag alert: pending (its `for` is 5 minutes), with its severity and runbook link.
    let started = Instant::now();
    let alert = loop {
        let alerts = prometheus.api("alerts")["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(alert) = alerts
            .iter()
            .find(|a| a["labels"]["alertname"] == "AURA360ConsumerLagHigh")
        {
            break alert.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the lag alert never became active: {alerts:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(alert["state"], "pending", "{alert}");
    assert_eq!(alert["labels"]["severity"], "warning");
    assert_eq!(
        alert["annotations"]["runbook"],
        "RUNBOOK.md#aura360consumerlaghigh"
    );
    // Healthy processes fire nothing else: no backend down, no heartbeat missing.
    let alerts = prometheus.api("alerts")["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for quiet in [
        "AURA360BackendDown",
        "AURA360WorkerHeartbeatMissing",
        "AURA360ErrorRateHigh",
    ] {
        assert!(
            alerts.iter().all(|a| a["labels"]["alertname"] != quiet),
            "{quiet}: {alerts:?}"
        );
    }
    let heartbeat = prometheus.wait_query(
        "aura360_celery_heartbeat_timestamp_seconds",
        Duration::from_secs(30),
        |r| r.len() == 1,
    );
    assert_eq!(heartbeat[0]["metric"]["job"], "vectordb-worker");
    assert_eq!(kafka.offsets(USER_TOPIC), (0, 1_200), "nothing handled");
    consumer.stop();
    worker.stop();
}

#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn export_takes_the_console_consumers_max_messages_and_from_beginning() {
    let kafka = Scenario::new("exportmax");
    kafka.produce_moods(30, 3);
    let topic = kafka.topic(USER_TOPIC);
    let out = kafka.dir.path().join("first.jsonl");
    let summary = kafka.vectordb_json(
        &[],
        &[
            "export",
            "--topic",
            &topic,
            "--from-beginning",
            "--max-messages",
            "7",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(summary["records"], 7, "{summary}");
    let lines = std::fs::read_to_string(&out).unwrap();
    assert_eq!(lines.lines().count(), 7);
    // From the beginning: each partition's records start at offset 0.
    let first: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let min_offset = first.iter().map(|r| r["offset"].as_i64().unwrap()).min();
    assert_eq!(min_offset, Some(0));
    // Without a limit, everything; --from-beginning and --from-offset contradict each other.
    let all = kafka.vectordb_json(
        &[],
        &[
            "export",
            "--topic",
            &topic,
            "--from-beginning",
            "--out",
            "/dev/null",
            "--json",
        ],
    );
    assert_eq!(all["records"], 30, "{all}");
    let mut command = Command::new(env!("CARGO_BIN_EXE_vectordb"));
    kafka.configure(&mut command);
    let refused = command
        .args([
            "export",
            "--topic",
            &topic,
            "--from-beginning",
            "--from-offset",
            "3",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot be used with"));
}

/// With Kafka unreachable, librdkafka reports the same failure from every client and broker thread, many times a
/// millisecond, and the sampler opens a new client every BACKLOG_SAMPLE_S: a consumer left running against a closed
/// port for several samples logs each distinct problem once (repeats are counted, not printed).
#[test]
#[cfg_attr(
    not(feature = "services"),
    ignore = "needs Apache Kafka, redis-server, Prometheus and the Python venv: scripts/test.sh runs it"
)]
fn an_unreachable_kafka_is_one_line_per_problem_not_a_flood() {
    let kafka = Scenario::new("flood");
    let mut consumer = kafka.start_consumer(&[
        ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9"),
        ("BACKLOG_SAMPLE_S", "1"),
        ("RUST_LOG", "info"),
    ]);
    let addr = consumer.http_addr();
    // Observed, not slept on: the sampler has found Kafka unreachable for 4 s (4 or more probes, each a new client).
    let started = Instant::now();
    loop {
        let (_, body) = health(&addr);
        if body["brokers"][0]["unreachable_for_seconds"]
            .as_f64()
            .unwrap_or(0.0)
            >= 4.0
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = strip_ansi(&consumer.stop());
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("librdkafka")).collect();
    assert!(!lines.is_empty(), "the outage is reported:\n{log}");
    let mut seen = std::collections::HashSet::new();
    for line in &lines {
        // The message, without its time stamp, numbers and librdkafka's "(after …ms …)" tail.
        let message: String = line
            .split_once("librdkafka")
            .map_or(*line, |(_, m)| m)
            .split(" (")
            .next()
            .unwrap()
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .collect();
        assert!(seen.insert(message), "repeated: {line}\n{log}");
    }
    assert!(lines.len() <= 6, "{} librdkafka lines:\n{log}", lines.len());
}
