//! Scale-out through membership churn, with real processes: several `vectordb-consumer`s in one consumer group on
//! the tests' Apache Kafka broker, several `vectordb-worker`s beside a Python Celery worker on one Redis. Members are
//! killed (`kill -9`), stopped (SIGTERM), added late, and paused past their session or visibility timeout
//! (SIGSTOP, then SIGCONT) while events keep arriving; the outcome is counted exactly: every event's point once,
//! nothing left uncommitted or unacknowledged, nothing dead-lettered, every SIGTERM out with 0 within 10 s, and a
//! paused member that wakes up writes nothing and commits nothing for work that another member took over.
//!
//! Each process has a store directory of its own (embedded Qdrant is one process's); the points are the union of
//! them, by id. Run through `scripts/test.sh` (`AURA_TEST_KAFKA`, `AURA_TEST_PYTHON`; the Celery tests start their
//! own redis-server).

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aura_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _};
use aura_kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

const USER_TOPIC: &str = "aura360.user.events";
const CHAIN_TOPICS: [&str; 3] = [
    USER_TOPIC,
    "aura360.context.aggregated",
    "aura360.context.vectorized",
];
/// The consumers' session: short, so a dead or paused member is noticed within the test.
const SESSION_MS: u64 = 6_000;
const SIGTERM_LIMIT: Duration = Duration::from_secs(10);

fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{:x}{:x}", std::process::id(), nanos & 0xff_ffff)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// One of our processes, with its own log and store directory.
struct Member {
    name: String,
    child: Child,
    log: PathBuf,
    store: PathBuf,
}

impl Member {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&mut self, text: &str, times: usize, limit: Duration) {
        aura_testkit::wait_log(&mut self.child, &self.log, text, times, limit);
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {}", self.name);
    }

    /// SIGTERM: must exit 0 within [`SIGTERM_LIMIT`].
    fn terminate(mut self) -> Member {
        let started = Instant::now();
        self.signal("-TERM");
        let status: ExitStatus = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{} ignored SIGTERM:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = started.elapsed();
        assert!(
            status.success(),
            "{} exited {status}:\n{}",
            self.name,
            self.log()
        );
        assert!(
            took < SIGTERM_LIMIT,
            "{} took {took:?} to exit on SIGTERM:\n{}",
            self.name,
            self.log()
        );
        self
    }

    fn kill_9(mut self) -> Member {
        self.signal("-KILL");
        self.child.wait().unwrap();
        self
    }

    /// The address of `/health` and `/metrics`, from the start-up log line.
    fn http_addr(&mut self) -> String {
        self.wait_log("serving /health and /metrics", 1, Duration::from_secs(60));
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains("serving /health and /metrics"))
            .unwrap();
        let addr = line.split("addr=").nth(1).unwrap();
        addr.split_whitespace()
            .next()
            .unwrap()
            .trim_matches(|c: char| !c.is_ascii_digit() && c != '.' && c != ':')
            .to_owned()
    }

    /// The sum of a counter's samples on `/metrics` (every label set).
    fn counter(&mut self, name: &str) -> f64 {
        let addr = self.http_addr();
        let (_, text) = aura_testkit::http_get(&addr, "/metrics");
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The point ids in the stores of `members`: (their union, the sum of each store's count).
fn points(members: &[Member]) -> (HashSet<String>, usize) {
    let stores: Vec<&Path> = members.iter().map(|m| m.store.as_path()).collect();
    common::points_in_stores(&stores, 64)
}

fn python(args: &[&str], env: &[(&str, String)]) -> String {
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python");
    aura_testkit::stdout_of(
        Command::new(aura_testkit::python())
            .arg(scripts.join(args[0]))
            .args(&args[1..])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null()),
        &format!("python {args:?}"),
    )
}

// ------------------------------------------------------------------------------------------------ Kafka

/// One consumer group's slice of the broker: its topics (by prefix), its group, its processes' directories.
struct Group {
    bootstrap: String,
    prefix: String,
    group: String,
    dir: tempfile::TempDir,
}

impl Group {
    fn new(name: &str) -> Self {
        let id = unique(name);
        let group = Self {
            bootstrap: aura_testkit::kafka_bootstrap(),
            prefix: format!("{id}."),
            group: id,
            dir: tempfile::tempdir().unwrap(),
        };
        let mut command = Command::new(env!("CARGO_BIN_EXE_vectordb"));
        group.configure(&mut command, "admin");
        aura_testkit::stdout_of(
            command.args(["topics", "create", "--json"]),
            "topics create",
        );
        group
    }

    fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn configure(&self, command: &mut Command, member: &str) {
        common::stack::test_process(command, &self.bootstrap, &self.prefix, &self.group)
            .env("KAFKA_SESSION_TIMEOUT_MS", SESSION_MS.to_string())
            .env("QDRANT_PATH", self.dir.path().join(member).join("qdrant"))
            .env(
                "DEAD_LETTER_SPOOL_DIR",
                self.dir.path().join(member).join("spool"),
            )
            .current_dir(self.dir.path());
    }

    fn start(&self, name: &str, env: &[(&str, String)]) -> Member {
        let home = self.dir.path().join(name);
        std::fs::create_dir_all(&home).unwrap();
        let log = home.join("process.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_vectordb-consumer"));
        self.configure(&mut command, name);
        let child = command
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Member {
            name: name.to_owned(),
            child,
            log,
            store: home.join("qdrant"),
        }
    }

    /// `count` mood events of `users` users from the Python producer (snappy batches, as the services send).
    fn produce(&self, count: usize, users: usize) {
        let sent = python(
            &[
                "produce.py",
                &self.bootstrap,
                "moods",
                &self.topic(USER_TOPIC),
                &count.to_string(),
                &users.to_string(),
            ],
            &[],
        );
        assert_eq!(sent.trim(), count.to_string());
    }

    /// Per topic of the chain: (committed, end), summed over partitions (never committed counts as 0).
    fn offsets(&self) -> Vec<(i64, i64)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", &self.group)
            .create()
            .unwrap();
        CHAIN_TOPICS
            .iter()
            .map(|name| self.topic_offsets(&consumer, &self.topic(name)))
            .collect()
    }

    fn topic_offsets(&self, consumer: &BaseConsumer, topic: &str) -> (i64, i64) {
        let list = partitions(consumer, topic);
        let committed = consumer
            .committed_offsets(list, Duration::from_secs(10))
            .unwrap();
        let committed = committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(offset) => Some(offset),
                _ => None,
            })
            .sum();
        (committed, end_offset(consumer, topic))
    }

    /// Records in the dead-letter topics of the chain.
    fn dead_letters(&self) -> i64 {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .unwrap();
        CHAIN_TOPICS
            .iter()
            .map(|name| end_offset(&consumer, &format!("{}.dlq", self.topic(name))))
            .sum()
    }

    /// Waits until the whole chain is committed to its end with `inputs` events in: lag 0 on every topic.
    fn wait_drained(&self, inputs: i64, members: &mut [&mut Member], limit: Duration) {
        let started = Instant::now();
        loop {
            let offsets = self.offsets();
            if offsets[0].1 == inputs
                && offsets[1..].iter().all(|(_, end)| *end >= inputs)
                && offsets.iter().all(|(committed, end)| committed == end)
            {
                return;
            }
            for member in members.iter_mut() {
                if let Some(status) = member.child.try_wait().unwrap() {
                    panic!("{} exited ({status}):\n{}", member.name, member.log());
                }
            }
            if started.elapsed() > limit {
                let logs: String = members
                    .iter()
                    .map(|m| format!("--- {}\n{}", m.name, m.log()))
                    .collect();
                panic!("not drained after {limit:?}: (committed, end) {offsets:?}\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Every record of `topic` as the Python reader prints it (with its timestamp).
    fn records(&self, topic: &str) -> Vec<Value> {
        python(&["read_topic.py", &self.bootstrap, &self.topic(topic)], &[])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn partitions(consumer: &BaseConsumer, topic: &str) -> TopicPartitionList {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut list = TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        list.add_partition(topic, partition.id());
    }
    list
}

/// A topic's end offsets, summed over its partitions.
fn end_offset(consumer: &BaseConsumer, topic: &str) -> i64 {
    partitions(consumer, topic)
        .elements()
        .iter()
        .map(|e| {
            consumer
                .fetch_watermarks(topic, e.partition(), Duration::from_secs(10))
                .unwrap()
                .1
        })
        .sum()
}

/// A producer thread: `batches` batches of `size` events, one after another, while the test churns the group.
fn produce_in_background(
    group: &Group,
    batches: usize,
    size: usize,
) -> std::thread::JoinHandle<()> {
    let (bootstrap, topic) = (group.bootstrap.clone(), group.topic(USER_TOPIC));
    std::thread::spawn(move || {
        for _ in 0..batches {
            let sent = python(
                &[
                    "produce.py",
                    &bootstrap,
                    "moods",
                    &topic,
                    &size.to_string(),
                    "40",
                ],
                &[],
            );
            assert_eq!(sent.trim(), size.to_string());
            std::thread::sleep(Duration::from_millis(700));
        }
    })
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka and the Python venv: scripts/test.sh")]
fn consumers_killed_stopped_paused_and_joining_late_leave_every_event_exactly_once() {
    churn("churn", "range,roundrobin");
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka and the Python venv: scripts/test.sh")]
fn the_same_churn_with_cooperative_rebalancing_leaves_every_event_exactly_once() {
    churn("coop", "cooperative-sticky");
}

/// Three consumers on a backlog; kill -9, SIGTERM, a late joiner, a pause past the session, while events arrive.
fn churn(name: &str, strategy: &str) {
    let group = Group::new(name);
    let env = [("KAFKA_PARTITION_ASSIGNMENT_STRATEGY", strategy.to_owned())];
    group.produce(2_400, 40);
    let mut first = group.start("c1", &env);
    let mut second = group.start("c2", &env);
    let mut third = group.start("c3", &env);
    // librdkafka names the protocol it runs: eager for range/roundrobin, cooperative for cooperative-sticky.
    let protocol = if strategy == "cooperative-sticky" {
        "protocol=\"cooperative\""
    } else {
        "protocol=\"eager\""
    };
    for member in [&mut first, &mut second, &mut third] {
        member.wait_log("partitions assigned", 1, Duration::from_secs(60));
        member.wait_log(protocol, 1, Duration::from_secs(10));
    }
    // Some work committed by the group before the first fault.
    let started = Instant::now();
    while group.offsets()[0].0 < 300 {
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }

    // kill -9 while events keep arriving (1,200 more, in batches).
    let first = first.kill_9();
    let producer = produce_in_background(&group, 6, 200);
    // SIGTERM: out with 0 within 10 s, its partitions handed over.
    let second = second.terminate();
    // A late joiner.
    let mut fourth = group.start("c4", &env);
    fourth.wait_log("partitions assigned", 1, Duration::from_secs(60));
    // A pause past the session: it stays stopped until the group has moved on without it and finished everything
    // (its partitions were taken over once its session expired); then it wakes up as a zombie.
    third.signal("-STOP");
    producer.join().unwrap();
    group.wait_drained(3_600, &mut [&mut fourth], Duration::from_secs(300));
    third.signal("-CONT");
    third.wait_log("partitions lost", 1, Duration::from_secs(60));

    group.wait_drained(
        3_600,
        &mut [&mut third, &mut fourth],
        Duration::from_secs(300),
    );
    let third = third.terminate();
    let fourth = fourth.terminate();
    let members = [first, second, third, fourth];
    let (union, written) = points(&members);
    assert_eq!(
        union.len(),
        3_600,
        "every event's point exactly once across the stores ({written} writes in all)"
    );
    assert_eq!(group.dead_letters(), 0, "nothing dead-lettered");
    // The last word on lag: committed == end on every topic of the chain, after every member left.
    let offsets = group.offsets();
    assert!(
        offsets.iter().all(|(committed, end)| committed == end),
        "{offsets:?}"
    );
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka and the Python venv: scripts/test.sh")]
fn a_consumer_paused_past_its_session_writes_and_commits_nothing_of_what_the_group_took_over() {
    let group = Group::new("zombie");
    let python_bin = aura_testkit::python();
    // Embeddings answered after 0–250 ms: the paused member is caught with events in flight.
    let embedder =
        aura_testkit::EmbeddingServer::start_delayed(&python_bin, group.dir.path(), 0, 250);
    let env = [
        ("EMBEDDING_PROVIDER", "openai".to_owned()),
        ("EMBEDDING_URL", embedder.url()),
        ("EMBEDDING_TIMEOUT_S", "30".to_owned()),
    ];
    group.produce(1_500, 30);
    let mut zombie = group.start("zombie", &env);
    let mut other = group.start("other", &env);
    zombie.wait_log("partitions assigned", 1, Duration::from_secs(60));
    other.wait_log("partitions assigned", 1, Duration::from_secs(60));
    let zombie_addr = zombie.http_addr();
    // Paused while it has events in flight.
    let in_flight = || {
        let (_, metrics) = aura_testkit::http_get(&zombie_addr, "/metrics");
        let in_flight = metrics
            .lines()
            .find_map(|l| l.strip_prefix("aura360_kafka_in_flight_events "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        (in_flight >= 10.0 && group.offsets()[0].0 >= 100).then_some(())
    };
    aura_testkit::poll(
        Duration::from_millis(20),
        Duration::from_secs(120),
        in_flight,
        || "the member to pause never had events in flight".to_owned(),
    );
    zombie.signal("-STOP");
    // The group takes its partitions over once its session expires, and finishes everything.
    group.wait_drained(1_500, &mut [&mut other], Duration::from_secs(300));
    let woken_at = now_ms();
    zombie.signal("-CONT");
    // It learns that it lost its partitions, rejoins, and only then writes again.
    zombie.wait_log("partitions lost", 1, Duration::from_secs(60));
    zombie.wait_log(
        "membership confirmed after the pause",
        1,
        Duration::from_secs(60),
    );
    // How many of its writes met the fence (the rest of its in-flight events were dropped with the lost partitions
    // before they reached one): reported with a failure.
    let fenced = zombie.counter("aura360_fenced_writes_total");
    // A record it had handed to its producer before the pause is delivered when it wakes (its timestamp is from
    // before): the group handles that duplicate as any redelivery. Then the whole chain is committed to its end
    // again: a stale commit of the paused member would have moved an offset back.
    group.wait_drained(
        1_500,
        &mut [&mut other, &mut zombie],
        Duration::from_secs(120),
    );
    // Nothing it produced after waking. The first hop's outputs all predate the wake-up (every input was handled
    // before it). A second-hop output after the wake-up is the group handling one of those late duplicates: its
    // input is in the first hop's topic twice. One whose input is there once is the paused member's stale work.
    let aggregated = group.records(CHAIN_TOPICS[1]);
    let late = |records: &[Value]| -> Vec<Value> {
        records
            .iter()
            .filter(|r| r["timestamp"].as_i64().unwrap() >= woken_at)
            .cloned()
            .collect()
    };
    assert_eq!(
        late(&aggregated),
        Vec::<Value>::new(),
        "first-hop records written after the paused member woke up (fenced writes: {fenced})"
    );
    let mut copies: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for record in &aggregated {
        *copies
            .entry(record["headers"]["event_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let stale: Vec<Value> = late(&group.records(CHAIN_TOPICS[2]))
        .into_iter()
        .filter(|r| {
            let event: Value = serde_json::from_str(r["value"].as_str().unwrap()).unwrap();
            let cause = event["metadata"]["causation_id"].as_str().unwrap();
            copies.get(cause).copied().unwrap_or(0) < 2
        })
        .collect();
    assert!(
        stale.is_empty(),
        "{} second-hop records written after the paused member woke up from inputs delivered once (fenced \
         writes: {fenced}), e.g. {:?}",
        stale.len(),
        stale.first()
    );
    let zombie = zombie.terminate();
    let other = other.terminate();
    let (union, _) = points(&[zombie, other]);
    assert_eq!(union.len(), 1_500);
    assert_eq!(group.dead_letters(), 0);
}
