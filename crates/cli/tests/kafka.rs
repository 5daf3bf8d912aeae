//! `vectordb-consumer` against a real Kafka-protocol broker (tansu) with a real Python confluent-kafka producer.
//!
//! Run through `scripts/test.sh`, which starts the broker and the venv and sets `AURA_TEST_KAFKA` and
//! `AURA_TEST_PYTHON`. Every test has its own topic prefix, consumer group and store directory, so they run in
//! parallel on one broker.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use aura_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _};
use aura_kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{Value, json};

const USER_TOPIC: &str = "aura360.user.events";
const AGGREGATED_TOPIC: &str = "aura360.context.aggregated";
const VECTORIZED_TOPIC: &str = "aura360.context.vectorized";
const ALL_TOPICS: [&str; 3] = [USER_TOPIC, AGGREGATED_TOPIC, VECTORIZED_TOPIC];

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with scripts/test.sh (it starts tansu and the Python venv)")
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
        let id = uuid_suffix();
        let scenario = Self {
            bootstrap: required_env("AURA_TEST_KAFKA"),
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
            // tansu holds every fetch for the full wait; Kafka answers as soon as data arrives.
            .env("KAFKA_FETCH_WAIT_MAX_MS", "50")
            .env("KAFKA_SESSION_TIMEOUT_MS", "6000")
            .env("QDRANT_PATH", self.dir.path().join("qdrant"))
            .env("EMBEDDING_DIM", "64")
            .env("RUST_LOG", "info,librdkafka=warn")
            .current_dir(self.dir.path());
    }

    fn vectordb(&self, args: &[&str]) -> String {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vectordb"));
        self.configure(&mut command);
        let output = command.args(args).output().unwrap();
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
        let committed = consumer.committed_offsets(list, timeout).unwrap();
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
            // Generous: on a loaded 2-core machine tansu's sqlite engine is the slowest part.
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
fn a_consumer_killed_mid_stream_resumes_and_every_event_becomes_exactly_its_points() {
    let kafka = Scenario::new("kill9");
    kafka.produce_moods(2_000, 40);
    let mut consumer = kafka.start_consumer(&[]);
    kafka.wait_for(
        "a few hundred events committed",
        Duration::from_secs(300),
        &mut consumer,
        |offsets| offsets[0].0 >= 300,
    );
    consumer.kill_9();
    let (committed, end) = kafka.offsets(USER_TOPIC);
    assert!(
        committed < end,
        "killed too late to prove anything: {committed}/{end}"
    );
    // Let the group expire the dead member (KAFKA_SESSION_TIMEOUT_MS=6000) before its successor joins: tansu can hand
    // the successor an empty assignment when it joins while the dead member is still registered; Kafka does not.
    std::thread::sleep(Duration::from_secs(8));

    let mut consumer = kafka.start_consumer(&[]);
    kafka.wait_drained(&mut consumer, 2_000);
    consumer.stop();
    assert_eq!(kafka.points(), 2_000);
}

#[test]
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
fn a_disabled_consumer_or_handler_commits_nothing_and_the_backlog_is_processed_when_re_enabled() {
    let kafka = Scenario::new("disabled");
    kafka.produce_moods(100, 5);

    let mut consumer = kafka.start_consumer(&[("MESSAGING_BACKEND", "disabled")]);
    std::thread::sleep(Duration::from_secs(4));
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
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(kafka.offsets(AGGREGATED_TOPIC), (0, 100));
    consumer.stop();
    assert_eq!(kafka.points(), 0);

    let mut consumer = kafka.start_consumer(&[]);
    kafka.wait_drained(&mut consumer, 100);
    consumer.stop();
    assert_eq!(kafka.points(), 100);
}

#[test]
fn sigterm_under_load_exits_zero_within_ten_seconds_and_loses_nothing() {
    let kafka = Scenario::new("sigterm");
    kafka.produce_moods(1_500, 30);
    let mut consumer = kafka.start_consumer(&[]);
    kafka.wait_for(
        "some events committed",
        Duration::from_secs(300),
        &mut consumer,
        |offsets| offsets[0].0 >= 200,
    );
    let (status, took, log) = consumer.terminate();
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let (committed, end) = kafka.offsets(USER_TOPIC);
    assert!(committed < end, "stopped too late to prove anything");

    let mut consumer = kafka.start_consumer(&[]);
    kafka.wait_drained(&mut consumer, 1_500);
    consumer.stop();
    assert_eq!(kafka.points(), 1_500);
}

#[test]
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
fn rolling_back_to_celery_forwards_the_kafka_backlog_as_tasks_and_loses_nothing() {
    let kafka = Scenario::new("rollback");
    kafka.produce_moods(100, 5);
    // Redis database 7 of the machine's Redis is this test's (the Celery tests use others).
    let redis_url = "redis://127.0.0.1:6379/7";
    let mut redis = redis::Client::open(redis_url)
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("FLUSHDB").query(&mut redis).unwrap();
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
    let queued: i64 = redis::cmd("LLEN").arg("celery").query(&mut redis).unwrap();
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
            .arg("celery")
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
