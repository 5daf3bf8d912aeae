//! The Kafka stack of the process-level tests: a test's slice of the broker (`Scenario`: its topics, group and
//! store), our processes on it (`Consumer`), a Redis of its own, a broker of its own to stop (`OwnBroker`), a
//! Prometheus, and the records and helpers the tests share.
#![allow(dead_code)] // every test binary includes `common`; each uses a part of this

use aura_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _};
use aura_kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const USER_TOPIC: &str = "aura360.user.events";

pub const AGGREGATED_TOPIC: &str = "aura360.context.aggregated";

pub const VECTORIZED_TOPIC: &str = "aura360.context.vectorized";

pub const ALL_TOPICS: [&str; 3] = [USER_TOPIC, AGGREGATED_TOPIC, VECTORIZED_TOPIC];

/// One test's slice of the broker: its own topics (by prefix), group and embedded store.
pub struct Scenario {
    pub bootstrap: String,
    pub python: PathBuf,
    pub prefix: String,
    pub group: String,
    pub dir: tempfile::TempDir,
}

impl Scenario {
    pub fn new(name: &str) -> Self {
        Self::on_broker(name, aura_testkit::kafka_bootstrap())
    }

    /// A scenario on a broker of the test's own (one it stops and restarts).
    pub fn on_broker(name: &str, bootstrap: String) -> Self {
        let id = uuid_suffix();
        let scenario = Self {
            bootstrap,
            python: aura_testkit::python(),
            prefix: format!("{name}-{id}."),
            group: format!("{name}-{id}"),
            dir: tempfile::tempdir().unwrap(),
        };
        let output = scenario.vectordb(&["topics", "create", "--json"]);
        let created: Vec<Value> = serde_json::from_str(&output).unwrap();
        assert_eq!(created.len(), 6, "{output}");
        scenario
    }

    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub fn configure(&self, command: &mut Command) {
        test_process(command, &self.bootstrap, &self.prefix, &self.group)
            .env("KAFKA_SESSION_TIMEOUT_MS", "6000")
            .env("QDRANT_PATH", self.dir.path().join("qdrant"))
            .current_dir(self.dir.path());
    }

    pub fn vectordb(&self, args: &[&str]) -> String {
        self.vectordb_with(&[], args)
    }

    pub fn vectordb_with(&self, env: &[(&str, &str)], args: &[&str]) -> String {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vectordb"));
        self.configure(&mut command);
        aura_testkit::stdout_of(
            command.envs(env.iter().copied()).args(args),
            &format!("vectordb {args:?}"),
        )
    }

    pub fn points(&self) -> u64 {
        let stats: Value = serde_json::from_str(&self.vectordb(&["stats", "--json"])).unwrap();
        stats["points"].as_u64().unwrap()
    }

    pub fn start_consumer(&self, env: &[(&str, &str)]) -> Consumer {
        self.start(env!("CARGO_BIN_EXE_vectordb-consumer"), env)
    }

    /// A consumer that was assigned the user topic (after a member died without leaving, the group gives its
    /// partitions out once that member's session expired: KAFKA_SESSION_TIMEOUT_MS=6000 here).
    pub fn start_consumer_assigned(&self, env: &[(&str, &str)]) -> Consumer {
        let mut consumer = self.start_consumer(env);
        let topic = self.topic(USER_TOPIC);
        let assigned = |log: &str| {
            log.lines()
                .any(|l| l.contains("partitions assigned") && l.contains(&topic))
                .then_some(())
        };
        consumer.wait_running("an assignment", Duration::from_secs(120), assigned);
        consumer
    }

    pub fn start(&self, binary: &str, env: &[(&str, &str)]) -> Consumer {
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

    pub fn python(&self, args: &[&str], stdin: Option<String>) -> String {
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
    pub fn produce_moods(&self, count: usize, users: usize) {
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
    pub fn produce_raw(&self, records: &[Value]) {
        let lines: String = records.iter().map(|r| format!("{r}\n")).collect();
        let sent = self.python(&["produce.py", "raw"], Some(lines));
        assert_eq!(sent.trim(), records.len().to_string());
    }

    pub fn read_topic(&self, topic: &str) -> Vec<Value> {
        self.python(&["read_topic.py", &self.topic(topic)], None)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// (committed, end) summed over a topic's partitions; never-committed counts as 0.
    pub fn offsets(&self, topic: &str) -> (i64, i64) {
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
    pub fn wait_for(
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

    /// `count` mood events of `users` users from the Python producer, through the chain by a consumer (then stopped).
    pub fn moods_through_a_consumer(&self, count: usize, users: usize) {
        self.produce_moods(count, users);
        self.drain_with_a_consumer(count as i64);
    }

    /// A consumer with no extra settings run until the `inputs` events on the user topic are through the chain, then
    /// stopped.
    pub fn drain_with_a_consumer(&self, inputs: i64) {
        let mut consumer = self.start_consumer(&[]);
        self.wait_drained(&mut consumer, inputs);
        consumer.stop();
    }

    /// Every topic fully committed, with `inputs` events on the user topic and the chain's outputs produced.
    pub fn wait_drained(&self, consumer: &mut Consumer, inputs: i64) {
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

pub struct Consumer {
    pub child: Child,
    pub log: PathBuf,
}

impl Consumer {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; returns the exit status and how long the exit took.
    pub fn terminate(mut self) -> (ExitStatus, Duration, String) {
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

    pub fn stop(self) -> String {
        let (status, _, log) = self.terminate();
        assert!(status.success(), "consumer exit {status}:\n{log}");
        log
    }

    pub fn kill_9(mut self) {
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

pub fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .arg(signal)
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

pub fn uuid_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}{:x}", std::process::id(), nanos & 0xff_ffff)
}

pub fn mood_record(topic: &str, user: &str, index: usize) -> Value {
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

/// One unlabelled gauge from `/metrics` (0 while absent).
pub fn gauge(addr: &str, name: &str) -> f64 {
    let (_, text) = aura_testkit::http_get(addr, "/metrics");
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

/// A `redis-server` of the test's own on a free port (no persistence): the Celery side of a switch or fallback.
pub struct TestRedis {
    pub server: aura_testkit::RedisServer,
}

impl TestRedis {
    pub fn start() -> Self {
        Self {
            server: aura_testkit::RedisServer::start(),
        }
    }

    pub fn url(&self) -> String {
        format!("{}/0", self.server.url())
    }

    pub fn connection(&self) -> Option<redis::Connection> {
        redis::Client::open(self.url()).ok()?.get_connection().ok()
    }

    pub fn int(&self, args: &[&str]) -> i64 {
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command.query(&mut self.connection().unwrap()).unwrap()
    }

    /// The Celery settings of a process on this Redis.
    pub fn env(&self) -> [(&'static str, String); 2] {
        [("BROKER_URL", self.url()), ("RESULT_BACKEND", self.url())]
    }

    /// [`TestRedis::env`] and `extra`.
    pub fn env_with(&self, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        let extra = extra.iter().map(|(k, v)| (*k, (*v).to_owned()));
        self.env().into_iter().chain(extra).collect()
    }

    /// Nothing waiting on or taken from `vectordb` (a worker finished everything it was given).
    pub fn idle(&self) -> bool {
        self.int(&["LLEN", "vectordb"]) == 0 && self.int(&["HLEN", "unacked"]) == 0
    }
}

/// `command` with nothing of the test's environment but PATH, on `bootstrap`'s topics named with `prefix`, in
/// consumer group `group`, embedding with the hash embedder (these tests measure the runtime, not the model: it is
/// exact and instant), serving /health and /metrics on a free port (parallel tests never collide).
pub fn test_process<'c>(
    command: &'c mut Command,
    bootstrap: &str,
    prefix: &str,
    group: &str,
) -> &'c mut Command {
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        .env("KAFKA_TOPIC_PREFIX", prefix)
        .env("KAFKA_GROUP_ID", group)
        .env("EMBEDDING_PROVIDER", "hash")
        .env("EMBEDDING_DIM", "64")
        .env("RUST_LOG", "info,librdkafka=warn")
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("NO_COLOR", "1")
}

/// Environment pairs with owned values, as `start` takes them.
pub fn pairs<'a>(owned: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    owned.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

impl Consumer {
    /// The address the process serves `/health` and `/metrics` on, from its start-up log line.
    pub fn http_addr(&mut self) -> String {
        self.wait_running("serving HTTP", Duration::from_secs(60), |log| {
            strip_ansi(log)
                .lines()
                .find(|l| l.contains("serving /health and /metrics"))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_owned)
        })
    }

    /// Polls `check` with the log so far every 100 ms until it returns a value; panics with the log when the
    /// process exits first, or after `limit` waiting for `what`.
    pub fn wait_running<T>(
        &mut self,
        what: &str,
        limit: Duration,
        mut check: impl FnMut(&str) -> Option<T>,
    ) -> T {
        let log = self.log.clone();
        let read = move || std::fs::read_to_string(&log).unwrap_or_default();
        self.wait_every(Duration::from_millis(100), what, limit, || check(&read()))
    }

    /// As [`Consumer::wait_running`], polling `check` every `every`.
    pub fn wait_every<T>(
        &mut self,
        every: Duration,
        what: &str,
        limit: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        let (child, log) = (&mut self.child, &self.log);
        let read = || std::fs::read_to_string(log).unwrap_or_default();
        aura_testkit::poll(
            every,
            limit,
            || {
                if let Some(value) = check() {
                    return Some(value);
                }
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("exited ({status}) before {what}:\n{}", read());
                }
                None
            },
            || format!("no {what} in {limit:?}:\n{}", read()),
        )
    }

    /// Waits until the process has logged `text`.
    pub fn wait_log(&mut self, text: &str, limit: Duration) {
        aura_testkit::wait_log(&mut self.child, &self.log, text, 1, limit);
    }
}

pub fn strip_ansi(text: &str) -> String {
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

pub fn health(addr: &str) -> (u16, Value) {
    let (status, body) = aura_testkit::http_get(addr, "/health");
    (status, serde_json::from_str(&body).unwrap())
}

/// `/health` until it answers `status`, or panics with the last answer after `limit`.
pub fn wait_health(addr: &str, status: &str, limit: Duration) -> (u16, Value) {
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
    pub fn metrics(&self, addr: &str) -> Vec<Value> {
        let (status, text) = aura_testkit::http_get(addr, "/metrics");
        assert_eq!(status, 200);
        self.python(&["parse_metrics.py"], Some(text))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// `vectordb lag --json --kafka`: (committed, end) summed per source topic.
    pub fn lag(&self) -> Value {
        serde_json::from_str(&self.vectordb(&["lag", "--kafka", "--json"])).unwrap()
    }
}

/// The value of the sample `name` whose labels include `labels`.
pub fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .map(|s| s["value"].as_f64().unwrap())
}

/// Event lines of moods `range` (ids from the index), as `vectordb publish` reads them.
pub fn mood_lines(range: std::ops::Range<usize>) -> Vec<String> {
    range
        .map(|i| {
            let record = mood_record("", &format!("user-{}", i % 4), i);
            record["value"].as_str().unwrap().to_owned()
        })
        .collect()
}

pub fn mood_id(index: usize) -> String {
    format!("00000000-0000-4000-8000-{index:012}")
}

/// `vectordb publish --events -` fed while it runs: lines go in as the test writes them.
pub struct StreamingPublisher {
    pub child: Child,
    pub stdin: Option<std::process::ChildStdin>,
}

impl Scenario {
    pub fn start_publisher(&self, env: &[(&str, &str)]) -> StreamingPublisher {
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
    pub fn feed(&mut self, lines: &[String], pace: Duration) {
        use std::io::Write as _;
        let stdin = self.stdin.as_mut().unwrap();
        for line in lines {
            writeln!(stdin, "{line}").unwrap();
            stdin.flush().unwrap();
            std::thread::sleep(pace);
        }
    }

    /// Closes the input and returns the summary.
    pub fn finish(mut self) -> Value {
        drop(self.stdin.take());
        let output = self.child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "publish failed: {stderr}");
        serde_json::from_slice(&output.stdout).unwrap_or_else(|_| panic!("no summary: {stderr}"))
    }
}

/// The event ids of the `process_mood_created` tasks waiting on `vectordb`.
pub fn queued_mood_ids(redis: &TestRedis) -> Vec<String> {
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
pub fn run_worker_until_idle(kafka: &Scenario, redis: &TestRedis, env: &[(&str, &str)]) {
    let mut worker = kafka.start(env!("CARGO_BIN_EXE_vectordb-worker"), env);
    // The worker must have started consuming before "idle" means "done".
    worker.wait_log("vectordb-worker starting", Duration::from_secs(60));
    // Idle for a second in a row: nothing left, nothing produced by the last tasks.
    let mut idle_since: Option<Instant> = None;
    let drained = || {
        if !redis.idle() {
            idle_since = None;
            return None;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        (since.elapsed() > Duration::from_secs(1)).then_some(())
    };
    let (every, limit) = (Duration::from_millis(200), Duration::from_secs(300));
    worker.wait_every(every, "the Celery queue drained", limit, drained);
    worker.stop();
}

/// Every source topic committed to its end (whatever the counts).
pub fn wait_all_committed(kafka: &Scenario, consumer: &mut Consumer) {
    kafka.wait_for(
        "every topic committed to its end",
        Duration::from_secs(480),
        consumer,
        |offsets| offsets.iter().all(|(committed, end)| committed == end),
    );
}

/// An Apache Kafka of the test's own, to stop and restart (the same port and data each time).
pub struct OwnBroker {
    pub dir: tempfile::TempDir,
}

impl OwnBroker {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// `start` (prints the bootstrap address) or `stop`.
    pub fn run(&self, action: &str) -> String {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/kafka-test-broker.sh");
        aura_testkit::stdout_of(
            Command::new("bash")
                .arg(&script)
                .arg(action)
                .arg(self.dir.path()),
            action,
        )
        .trim()
        .to_owned()
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

impl Scenario {
    /// The ids of `user`'s points (up to 1000), sorted: what a replay must reproduce.
    pub fn point_ids(&self, user: &str, env: &[(&str, &str)]) -> Vec<String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vectordb"));
        self.configure(&mut command);
        command.envs(env.iter().copied());
        command.args([
            "search", "--user", user, "--text", "mood", "--limit", "1000", "--json",
        ]);
        let hits: Vec<Value> =
            serde_json::from_str(&aura_testkit::stdout_of(&mut command, "search")).unwrap();
        let mut ids: Vec<String> = hits.iter().map(|h| h["id"].to_string()).collect();
        ids.sort();
        ids
    }

    /// `vectordb` with extra environment; returns its stdout as JSON.
    pub fn vectordb_json(&self, env: &[(&str, &str)], args: &[&str]) -> Value {
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

/// An "embedding endpoint" that refuses every request with 401 (a revoked API key): a permanent failure.
pub fn refusing_embedder() -> String {
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

impl Consumer {
    /// Peak resident memory so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        aura_testkit::peak_rss(self.child.id())
    }
}

pub fn embedder_down(body: &Value) -> bool {
    body["dependencies"].as_array().is_some_and(|deps| {
        deps.iter()
            .any(|d| d["name"] == "embedder" && d["ok"] == false)
    })
}

/// A small tmpfs the test mounts for the embedded store, so it can fill it up. Unmounted on drop.
pub struct SmallFilesystem {
    pub path: PathBuf,
}

impl SmallFilesystem {
    pub fn mount(at: PathBuf, megabytes: u32) -> Self {
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
    pub fn fill(&self) {
        use std::io::Write as _;
        let mut file = std::fs::File::create(self.path.join("filler")).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
    }

    pub fn free(&self) {
        std::fs::remove_file(self.path.join("filler")).unwrap();
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

impl Scenario {
    /// `python -m aura360_events FILE` (the package's source tree, as installed) with `env`: its JSON summary.
    pub fn python_publish(&self, lines: &[String], env: &[(&str, &str)]) -> Value {
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

pub fn activity_lines(range: std::ops::Range<usize>) -> Vec<String> {
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

/// `prometheus` on a free port with its data in `dir`, scraping `targets` every second and evaluating
/// deploy/prometheus/alerts.yml every second.
pub struct Prometheus {
    pub child: Child,
    pub addr: String,
}

impl Prometheus {
    pub fn start(dir: &Path, targets: &[(&str, &str)]) -> Self {
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
        while aura_testkit::try_http_get(&prometheus.addr, "/-/ready").map(|(s, _)| s) != Some(200)
        {
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
    pub fn api(&self, path: &str) -> Value {
        let (status, body) = aura_testkit::http_get(&self.addr, &format!("/api/v1/{path}"));
        assert_eq!(status, 200, "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["status"], "success", "{body}");
        body["data"].clone()
    }

    /// Waits until `done` holds for the result of the instant query `query`.
    pub fn wait_query(
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
