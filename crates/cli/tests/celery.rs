//! `vectordb-worker` and the Celery publisher against real Redis and real Python Celery 5.7.
//!
//! Run through `scripts/test.sh` (it creates the venv with the pinned Celery and sets `AURA_TEST_PYTHON`). Each test
//! runs its own `redis-server` on a free port (the machine's shared Redis is never touched): the worker's keys are
//! per database and Celery's pub/sub channels are per server, so tests running in parallel cannot meet.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use aura_testkit::{RedisServer, wait_for};
use serde_json::{Value, json};

const MOOD_TASK: &str = "vectosvc.worker.tasks.process_mood_created";

/// One test's Redis database, store directory and processes.
struct Celery {
    redis: String,
    db: u32,
    dir: tempfile::TempDir,
    /// The test's own `redis-server`, when `private` started it.
    _server: Option<RedisServer>,
}

impl Celery {
    /// On a `redis-server` of the test's own (no persistence), never the machine's shared Redis: the worker's keys
    /// (`unacked`, `unacked_index`, queues) are per database, and a test must not touch data it did not create.
    fn private() -> Self {
        let server = RedisServer::start();
        Self {
            redis: server.url(),
            db: 0,
            dir: tempfile::tempdir().unwrap(),
            _server: Some(server),
        }
    }

    fn broker(&self) -> String {
        format!("{}/{}", self.redis, self.db)
    }

    fn conn(&self) -> redis::Connection {
        redis::Client::open(self.broker())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    fn cmd(&self, args: &[&str]) -> redis::Value {
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut self.conn()).unwrap()
    }

    fn int(&self, args: &[&str]) -> i64 {
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut self.conn()).unwrap()
    }

    fn list(&self, key: &str) -> Vec<Value> {
        let items: Vec<String> = redis::cmd("LRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .query(&mut self.conn())
            .unwrap();
        items
            .iter()
            .map(|i| serde_json::from_str(i).unwrap())
            .collect()
    }

    fn result(&self, task_id: &str) -> Option<Value> {
        let raw: Option<String> = redis::cmd("GET")
            .arg(format!("celery-task-meta-{task_id}"))
            .query(&mut self.conn())
            .unwrap();
        raw.map(|r| serde_json::from_str(&r).unwrap())
    }

    /// Results stored so far, by status.
    fn result_states(&self) -> HashMap<String, usize> {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("celery-task-meta-*")
            .query(&mut self.conn())
            .unwrap();
        let mut states = HashMap::new();
        for key in keys {
            let id = key.trim_start_matches("celery-task-meta-");
            if let Some(meta) = self.result(id) {
                *states
                    .entry(meta["status"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
        }
        states
    }

    fn idle(&self, queue: &str) -> bool {
        self.int(&["LLEN", queue]) == 0 && self.int(&["HLEN", "unacked"]) == 0
    }

    fn env(&self, command: &mut Command) {
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("BROKER_URL", self.broker())
            .env("RESULT_BACKEND", self.broker())
            .env("QDRANT_PATH", self.dir.path().join("qdrant"))
            // These tests measure the runtime, not the model: the hash embedder (64-d) is exact and instant.
            .env("EMBEDDING_PROVIDER", "hash")
            .env("EMBEDDING_DIM", "64")
            .env("MESSAGING_BACKEND", "celery")
            .env("RUST_LOG", "info")
            .env("HTTP_ADDR", "127.0.0.1:0")
            .current_dir(self.dir.path());
    }

    fn start_worker(&self, name: &str, env: &[(&str, &str)]) -> Process {
        let log = self.dir.path().join(format!("{name}.log"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_vectordb-worker"));
        self.env(&mut command);
        command
            .env("CELERY_WORKER_NAME", format!("{name}@test"))
            .envs(env.iter().copied());
        let child = command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Process { child, log }
    }

    /// Our worker `name@test`, once it has logged Celery's `<name>@test ready.`.
    fn start_ready_worker(&self, name: &str, env: &[(&str, &str)]) -> Process {
        let mut worker = self.start_worker(name, env);
        worker.wait_log(&format!("{name}@test ready."), 1, Duration::from_secs(60));
        worker
    }

    /// A Python Celery worker (tests/python/celery_app.py) named `name@test`.
    fn start_python_worker(&self, name: &str, queue: &str, env: &[(&str, &str)]) -> Process {
        let log = self.dir.path().join(format!("{name}.log"));
        let celery = aura_testkit::python().parent().unwrap().join("celery");
        let mut command = Command::new(celery);
        self.env(&mut command);
        command
            .current_dir(aura_testkit::python_dir())
            .args([
                "-A",
                "celery_app",
                "worker",
                "--pool",
                "solo",
                "--without-mingle",
                "--without-gossip",
            ])
            .args([
                "-Q",
                queue,
                "-n",
                &format!("{name}@test"),
                "--loglevel",
                "INFO",
            ])
            .envs(env.iter().copied());
        let child = command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Process { child, log }
    }

    fn client(&self, args: &[&str]) -> Value {
        self.client_with(args, &[])
    }

    fn client_with(&self, args: &[&str], env: &[(&str, &str)]) -> Value {
        let mut command = Command::new(aura_testkit::python());
        self.env(&mut command);
        command.envs(env.iter().copied());
        command
            .arg(aura_testkit::python_dir().join("celery_client.py"))
            .args(args);
        let stdout = aura_testkit::stdout_of(&mut command, &format!("celery_client {args:?}"));
        serde_json::from_str(&stdout).unwrap()
    }

    /// Waits (`AsyncResult(id).get()` in Python) for every task `send` reported and asserts each succeeded.
    fn await_success(&self, sent: &Value, wait_seconds: &str) -> Value {
        let ids_file = self
            .dir
            .path()
            .join(format!("ids-{}.json", uuid::Uuid::new_v4()));
        std::fs::write(&ids_file, serde_json::to_string(&ids(sent)).unwrap()).unwrap();
        let states = self.client(&[
            "results",
            "--ids-file",
            ids_file.to_str().unwrap(),
            "--wait",
            wait_seconds,
        ]);
        assert_states_succeeded(&states, sent);
        states
    }

    fn vectordb(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vectordb"));
        self.env(&mut command);
        aura_testkit::stdout_of(
            command.args(args).envs(env.iter().copied()),
            &format!("vectordb {args:?}"),
        )
    }

    /// Points in the embedded store (the worker must be stopped: embedded Qdrant is single-process).
    fn points(&self) -> u64 {
        let stats: Value = serde_json::from_str(&self.vectordb(&["stats", "--json"], &[])).unwrap();
        stats["points"].as_u64().unwrap()
    }
}

struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    /// SIGTERM, and a clean exit (status 0), whatever it took; its log.
    fn stop_cleanly(self) -> String {
        let (status, _, log) = self.stop();
        assert!(status.success(), "{log}");
        log
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn stop(mut self) -> (ExitStatus, Duration, String) {
        let started = Instant::now();
        self.signal("-TERM");
        let status = wait_for("the process to exit", Duration::from_secs(30), || {
            self.child.try_wait().unwrap()
        });
        (status, started.elapsed(), self.log())
    }

    fn kill(mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }

    /// Waits until the log holds `text` at least `times` times (the process must stay up meanwhile).
    fn wait_log(&mut self, text: &str, times: usize, limit: Duration) {
        aura_testkit::wait_log(&mut self.child, &self.log, text, times, limit);
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ids(sent: &Value) -> Vec<String> {
    sent["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

fn assert_all_succeeded(sent: &Value) {
    assert_states_succeeded(&sent["states"], sent);
}

/// `states` (task id → {state, …}) covers every id of `sent`, and every state is SUCCESS.
fn assert_states_succeeded(states: &Value, sent: &Value) {
    let states = states.as_object().unwrap();
    let bad: Vec<_> = states
        .iter()
        .filter(|(_, s)| s["state"] != "SUCCESS")
        .take(3)
        .collect();
    assert!(
        bad.is_empty(),
        "AsyncResult(id).get() did not return SUCCESS: {bad:?}"
    );
    assert_eq!(states.len(), sent["ids"].as_array().unwrap().len());
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn python_send_task_runs_the_whole_chain_through_celery() {
    let celery = Celery::private();
    let worker = celery.start_worker(
        "chain",
        &[
            ("CELERY_TRACK_STARTED", "true"),
            ("CELERY_CONCURRENCY", "16"),
        ],
    );
    let sent = celery.client(&["send", "--count", "300", "--users", "12", "--wait", "180"]);
    assert_all_succeeded(&sent);

    // Celery options from Python: priority lists, countdown (eta), float time limits, expires.
    let options: [&[&str]; 4] = [
        &["--priority", "5"],
        &["--countdown", "2"],
        &["--time-limit", "2.5", "--soft-time-limit", "2.0"],
        &["--expires", "600"],
    ];
    for option in options {
        let mut args = vec!["send", "--count", "5", "--wait", "60"];
        args.extend_from_slice(option);
        assert_all_succeeded(&celery.client(&args));
    }

    // Every mood task produced one context.aggregated task, which produced one ingest task: 3 x 320 results.
    wait_for("the chain to finish", Duration::from_secs(180), || {
        (celery.idle("vectordb") && celery.result_states().get("SUCCESS") == Some(&960))
            .then_some(())
    });
    let states = celery.result_states();
    assert_eq!(states.len(), 1, "only SUCCESS results: {states:?}");
    assert_eq!(celery.int(&["LLEN", "vectordb.dlq"]), 0);

    // Chaining: the mood task's result names its child; the child's result names its parent.
    let root = &ids(&sent)[0];
    let meta = celery.result(root).unwrap();
    let child = meta["children"][0][0][0]
        .as_str()
        .expect("a child task id")
        .to_owned();
    assert_eq!(celery.result(&child).unwrap()["parent_id"], json!(root));

    let (status, elapsed, log) = worker.stop();
    assert!(status.success(), "{log}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert_eq!(celery.points(), 320);
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn our_publisher_feeds_python_workers_intact_events_chained_to_their_parent() {
    let celery = Celery::private();
    let python = celery.start_python_worker("py", "python", &[("RECORD_KEY", "recorded")]);

    // 1. `vectordb publish` (MESSAGING_BACKEND=celery): every type, each as its task, args == [event].
    let events: Vec<Value> = (0..40)
        .map(|n| {
            let kind = ["user.mood.created", "user.activity.created", "context.aggregated", "context.vectorized"][n % 4];
            json!({"event_id": uuid::Uuid::new_v4().to_string(), "event_type": kind,
                   "timestamp": "2026-11-01T08:00:00", "trace_id": format!("trace-{n}"), "user_id": format!("u{n}"),
                   "metadata": {"n": n, "nested": {"list": [1, 2.5, null, "é"]}}, "data": {"mood_score": n}})
        })
        .collect();
    let file = celery.dir.path().join("events.jsonl");
    std::fs::write(
        &file,
        events
            .iter()
            .map(|e| e.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let summary: Value = serde_json::from_str(&celery.vectordb(
        &["publish", "--events", file.to_str().unwrap(), "--json"],
        &[("CELERY_QUEUES", "python")],
    ))
    .unwrap();
    assert_eq!(summary["published"], 40, "{summary}");
    let recorded = wait_for(
        "the Python worker to run 40 tasks",
        Duration::from_secs(60),
        || {
            let recorded = celery.list("recorded");
            (recorded.len() >= 40).then_some(recorded)
        },
    );
    let by_event: HashMap<String, &Value> = recorded
        .iter()
        .map(|r| (r["args"][0]["event_id"].as_str().unwrap().to_owned(), r))
        .collect();
    for event in &events {
        let record = by_event[event["event_id"].as_str().unwrap()];
        assert_eq!(record["args"], json!([event]), "args == [event_dict]");
        assert_eq!(record["kwargs"], json!({}));
        let expected_task = match event["event_type"].as_str().unwrap() {
            "user.mood.created" => MOOD_TASK,
            "user.activity.created" => "vectosvc.worker.tasks.process_activity_created",
            "context.aggregated" => "vectosvc.worker.tasks.process_context_aggregated",
            _ => "vectosvc.worker.tasks.ingest_vectors",
        };
        assert_eq!(record["task"], expected_task);
        assert_eq!(
            record["root_id"], record["id"],
            "a new chain starts at the published task"
        );
    }

    // 2. Our worker handles moods from queue `rust` and sends context.aggregated to the Python worker.
    let worker = celery.start_worker(
        "ours",
        &[
            ("CELERY_QUEUES", "rust"),
            ("CELERY_PUBLISH_QUEUE", "python"),
        ],
    );
    let sent = celery.client(&["send", "--count", "20", "--queue", "rust", "--wait", "60"]);
    assert_all_succeeded(&sent);
    let mood_ids: HashSet<String> = ids(&sent).into_iter().collect();
    let trace_of: HashMap<String, String> = sent["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event_id"].as_str().unwrap().to_owned(),
                e["trace_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let chained = wait_for(
        "20 chained tasks on the Python worker",
        Duration::from_secs(60),
        || {
            let chained: Vec<Value> = celery
                .list("recorded")
                .into_iter()
                .filter(|r| r["parent_id"].is_string())
                .collect();
            (chained.len() >= 20).then_some(chained)
        },
    );
    for record in &chained {
        let parent = record["parent_id"].as_str().unwrap();
        assert!(
            mood_ids.contains(parent),
            "parent_id is the mood task: {record}"
        );
        assert_eq!(record["root_id"], json!(parent));
        assert_eq!(
            record["task"],
            "vectosvc.worker.tasks.process_context_aggregated"
        );
        let event = &record["args"][0];
        let cause = event["metadata"]["causation_id"].as_str().unwrap();
        assert_eq!(
            event["trace_id"].as_str(),
            trace_of.get(cause).map(String::as_str),
            "trace_id kept"
        );
    }
    assert!(worker.stop().0.success());
    assert!(python.stop().0.success());
}

/// Runs `count` mood tasks through a worker that is killed with -9 while it holds messages, then checks that
/// `finisher` completes every one of them.
/// `count` moods: the Python rescuer (`--pool solo`, recording every task in Redis) runs ~10 tasks/s on a loaded
/// 2-core machine, so its scenario is smaller.
fn killed_worker_scenario(count: usize, finish_with_python: bool) {
    let celery = Celery::private();
    let sent = celery.client(&["send", "--count", &count.to_string()]);
    // Embeddings answered after 0–100 ms: the worker is still busy with its prefetched messages when it is killed,
    // however fast the rest of it is.
    let embedder = aura_testkit::EmbeddingServer::start_delayed(
        &aura_testkit::python(),
        celery.dir.path(),
        0,
        100,
    );
    let url = embedder.url();
    let worker = celery.start_worker(
        "doomed",
        &[
            ("CELERY_VISIBILITY_TIMEOUT", "2"),
            ("CELERY_CONCURRENCY", "2"),
            ("CELERY_PREFETCH_MULTIPLIER", "16"),
            ("EMBEDDING_PROVIDER", "openai"),
            ("EMBEDDING_URL", url.as_str()),
            ("EMBEDDING_TIMEOUT_S", "10"),
        ],
    );
    // Kill early (a cheap check: result keys exist), while most of the backlog is still ahead.
    wait_for("the worker to get going", Duration::from_secs(60), || {
        let results: Vec<String> = redis::cmd("KEYS")
            .arg("celery-task-meta-*")
            .query(&mut celery.conn())
            .ok()?;
        (results.len() >= 10).then_some(())
    });
    worker.kill();
    let held = celery.int(&["HLEN", "unacked"]);
    let held_tags: Vec<String> = redis::cmd("HKEYS")
        .arg("unacked")
        .query(&mut celery.conn())
        .unwrap();
    assert!(
        held > 0,
        "the worker held no unacknowledged messages when killed"
    );
    let held_ids: HashSet<String> = held_tags
        .iter()
        .filter_map(|tag| {
            let entry: String = redis::cmd("HGET")
                .arg("unacked")
                .arg(tag)
                .query(&mut celery.conn())
                .ok()?;
            let value: Value = serde_json::from_str(&entry).ok()?;
            value[0]["headers"]["id"].as_str().map(str::to_owned)
        })
        .collect();
    let done_before = celery.result_states().get("SUCCESS").copied().unwrap_or(0);
    assert!(done_before < 3 * count, "killed after the end");

    let finisher = if finish_with_python {
        celery.start_python_worker(
            "rescuer",
            "vectordb",
            &[("VISIBILITY_TIMEOUT", "2"), ("RECORD_KEY", "recorded")],
        )
    } else {
        celery.start_worker("rescuer", &[("CELERY_VISIBILITY_TIMEOUT", "2")])
    };
    celery.await_success(&sent, "180");
    // A held task may already have its result (stored just before the kill, acknowledgement pending): the mood
    // results alone do not prove the restore, so wait until nothing is left unacknowledged, then look at who ran what.
    wait_for(
        "nothing left unacknowledged",
        Duration::from_secs(180),
        || celery.idle("vectordb").then_some(()),
    );
    if finish_with_python {
        let ran: HashSet<String> = celery
            .list("recorded")
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect();
        assert!(!held_ids.is_empty());
        for id in &held_ids {
            assert!(
                ran.contains(id),
                "task {id} held by the killed worker was not run by the Python worker"
            );
        }
    } else {
        let rescuer_log = finisher.log();
        assert!(rescuer_log.contains("restored"), "{rescuer_log}");
    }
    assert!(finisher.stop().0.success());
    if !finish_with_python {
        assert_eq!(celery.points(), count as u64);
    }
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn a_killed_workers_tasks_are_restored_and_done_by_our_worker() {
    killed_worker_scenario(400, false);
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn a_killed_workers_tasks_are_restored_and_done_by_a_python_worker() {
    killed_worker_scenario(150, true);
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn malformed_messages_are_dead_lettered_with_their_reason_and_the_worker_goes_on() {
    let celery = Celery::private();
    let good = celery.client(&["send", "--count", "30"]);
    let envelope = |body: &str, task: &str, tag: &str| {
        json!({"body": body, "content-encoding": "utf-8", "content-type": "application/json",
               "headers": {"lang": "py", "task": task, "id": format!("id-{tag}"), "retries": 0, "timelimit": [null, null],
                           "root_id": format!("id-{tag}"), "parent_id": null},
               "properties": {"correlation_id": format!("id-{tag}"), "delivery_mode": 2,
                              "delivery_info": {"exchange": "", "routing_key": "vectordb"}, "priority": 0,
                              "body_encoding": "base64", "delivery_tag": tag}})
        .to_string()
    };
    use base64::Engine as _;
    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    let good_body = b64(&format!("[[{}], {{}}, {{}}]", good["events"][0]));
    let bad = [
        ("{this is not json".to_owned(), "not JSON"),
        (
            envelope("%%% not base64 %%%", MOOD_TASK, "bad-b64"),
            "base64",
        ),
        (
            envelope(&b64(r#"{"args": []}"#), MOOD_TASK, "bad-shape"),
            "not [args, kwargs, embed]",
        ),
        (
            envelope(&good_body, "vectosvc.worker.tasks.no_such_task", "unknown"),
            "not registered",
        ),
        (
            envelope(
                &b64(r#"[[{"event_type": "user.mood.created"}], {}, {}]"#),
                MOOD_TASK,
                "bad-event",
            ),
            "invalid event",
        ),
    ];
    for (raw, _) in &bad {
        celery.cmd(&["LPUSH", "vectordb", raw]);
    }
    let mut worker = celery.start_worker("strict", &[]);
    celery.await_success(&good, "120");
    let dead = wait_for("5 dead letters", Duration::from_secs(30), || {
        let dead = celery.list("vectordb.dlq");
        (dead.len() >= 5).then_some(dead)
    });
    assert_eq!(dead.len(), 5);
    for (raw, reason) in &bad {
        let entry = dead
            .iter()
            .find(|d| d["message"] == json!(raw))
            .expect("original message kept");
        assert!(
            entry["error"].as_str().unwrap().contains(reason),
            "{entry} / {reason}"
        );
    }
    let unknown = celery
        .result("id-unknown")
        .expect("a FAILURE result for the unregistered task");
    assert_eq!(unknown["status"], "FAILURE");
    assert_eq!(unknown["result"]["exc_type"], "NotRegistered");
    assert!(worker.alive());
    let ping = celery.client(&["ping"]);
    assert_eq!(ping["strict@test"], json!({"ok": "pong"}));
    wait_for("queue drained", Duration::from_secs(60), || {
        celery.idle("vectordb").then_some(())
    });
    assert!(worker.stop().0.success());
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn a_disabled_handlers_tasks_are_parked_and_run_when_it_is_enabled_again() {
    let celery = Celery::private();
    let worker = celery.start_worker("partial", &[("DISABLED_HANDLERS", "context_aggregated")]);
    assert_all_succeeded(&celery.client(&["send", "--count", "30", "--wait", "60"]));
    wait_for("30 parked tasks", Duration::from_secs(30), || {
        (celery.int(&["LLEN", "vectordb.parked.context_aggregated"]) == 30).then_some(())
    });
    assert_eq!(
        celery.int(&["LLEN", "vectordb.dlq"]),
        0,
        "parked, not dead-lettered"
    );
    let (status, elapsed, log) = worker.stop();
    assert!(
        status.success() && elapsed < Duration::from_secs(10),
        "{log}"
    );
    assert_eq!(celery.points(), 0);

    let worker = celery.start_worker("whole", &[]);
    wait_for("the parked tasks to run", Duration::from_secs(60), || {
        (celery.int(&["LLEN", "vectordb.parked.context_aggregated"]) == 0
            && celery.idle("vectordb")
            && celery.result_states().get("SUCCESS") == Some(&90))
        .then_some(())
    });
    assert!(worker.stop().0.success());
    assert_eq!(celery.points(), 30);
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn sigterm_under_load_finishes_in_flight_requeues_the_rest_and_loses_nothing() {
    let celery = Celery::private();
    let sent = celery.client(&["send", "--count", "600"]);
    let worker = celery.start_worker("busy", &[("CELERY_CONCURRENCY", "4")]);
    wait_for("some progress", Duration::from_secs(60), || {
        (celery.result_states().get("SUCCESS").copied().unwrap_or(0) >= 30).then_some(())
    });
    let (status, elapsed, log) = worker.stop();
    assert!(status.success(), "{log}");
    assert!(
        elapsed < Duration::from_secs(10),
        "shutdown took {elapsed:?}"
    );
    assert_eq!(
        celery.int(&["HLEN", "unacked"]),
        0,
        "everything taken was acknowledged or put back"
    );
    let done = celery.result_states().get("SUCCESS").copied().unwrap_or(0);
    assert!(done < 1800, "stopped before the end ({done})");

    let worker = celery.start_worker("after", &[]);
    celery.await_success(&sent, "180");
    wait_for("the chain to finish", Duration::from_secs(120), || {
        celery.idle("vectordb").then_some(())
    });
    assert!(worker.stop().0.success());
    assert_eq!(celery.points(), 600);
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn the_worker_reconnects_after_client_kill_and_a_redis_restart_and_loses_nothing() {
    let mut server = RedisServer::durable();
    let celery = Celery::on(&server);
    let sent = celery.client(&["send", "--count", "500"]);
    let worker = celery.start_worker(
        "sturdy",
        &[
            ("CELERY_CONCURRENCY", "2"),
            ("CELERY_VISIBILITY_TIMEOUT", "5"),
        ],
    );
    for round in 0..3 {
        let target = 60 * (round + 1);
        wait_for("progress", Duration::from_secs(60), || {
            (celery.result_states().get("SUCCESS").copied().unwrap_or(0) >= target).then_some(())
        });
        celery.cmd(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]);
    }
    let before_restart = celery.result_states().get("SUCCESS").copied().unwrap_or(0);
    assert!(
        before_restart < 1500,
        "the restart must come mid-stream ({before_restart})"
    );
    server.restart();
    celery.await_success(&sent, "180");
    wait_for("the chain to finish", Duration::from_secs(120), || {
        celery.idle("vectordb").then_some(())
    });
    let log = worker.stop_cleanly();
    assert!(log.contains("reconnecting"), "{log}");
    assert_eq!(celery.points(), 500);
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn flower_lists_our_worker_and_its_tasks_and_inspect_answers() {
    let celery = Celery::private();
    let worker = celery.start_worker("flowered", &[]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = Command::new(aura_testkit::python().parent().unwrap().join("celery"));
    celery.env(&mut command);
    let flower_log = celery.dir.path().join("flower.log");
    let flower = command
        .current_dir(aura_testkit::python_dir())
        .env("FLOWER_UNAUTHENTICATED_API", "true")
        .args([
            "-A",
            "celery_app",
            "flower",
            "--address=127.0.0.1",
            &format!("--port={port}"),
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&flower_log).unwrap())
        .spawn()
        .unwrap();
    let flower = Process {
        child: flower,
        log: flower_log,
    };
    let get = |path: &str| -> Option<Value> {
        let output = Command::new("curl")
            .args(["-sf", &format!("http://127.0.0.1:{port}{path}")])
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| serde_json::from_slice(&output.stdout).ok())
            .flatten()
    };
    wait_for("Flower to start", Duration::from_secs(60), || {
        get("/api/workers?status=true")
    });
    let sent = celery.client(&["send", "--count", "5", "--wait", "60"]);
    assert_all_succeeded(&sent);
    let alive = wait_for(
        "Flower to see our worker online",
        Duration::from_secs(30),
        || get("/api/workers?status=true").filter(|w| w["flowered@test"] == json!(true)),
    );
    assert_eq!(alive["flowered@test"], true);
    let tasks = wait_for("Flower to list our tasks", Duration::from_secs(30), || {
        let tasks = get("/api/tasks")?;
        ids(&sent)
            .iter()
            .all(|id| tasks[id]["state"] == "SUCCESS")
            .then_some(tasks)
    });
    assert_eq!(tasks[&ids(&sent)[0]]["worker"], "flowered@test");
    let workers = wait_for(
        "Flower's inspect of our worker",
        Duration::from_secs(30),
        // Flower's refresh gathers inspect replies within its own timeout; on a loaded machine a late reply leaves
        // the entry without them, so ask again until `registered` is there.
        || get("/api/workers?refresh=1").filter(|w| w["flowered@test"]["registered"].is_array()),
    );
    assert!(
        workers["flowered@test"]["registered"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == MOOD_TASK),
        "{workers}"
    );
    let stats = celery.client(&["inspect", "--method", "stats"]);
    assert!(
        stats["flowered@test"]["total"][MOOD_TASK].as_u64().unwrap() >= 5,
        "{stats}"
    );
    drop(flower);
    assert!(worker.stop().0.success());
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn a_password_protected_broker_works_and_the_password_never_reaches_the_logs() {
    let server = RedisServer::start_with(&["--requirepass", "Sup3rSecretPw"]);
    let celery = Celery {
        redis: format!("redis://:Sup3rSecretPw@127.0.0.1:{}", server.port()),
        db: 2,
        dir: tempfile::tempdir().unwrap(),
        _server: None,
    };
    let worker = celery.start_worker("guarded", &[("RUST_LOG", "debug,qdrant_edge=error")]);
    assert_all_succeeded(&celery.client(&["send", "--count", "5", "--wait", "60"]));
    let log = worker.stop_cleanly();
    assert!(
        log.contains("redis://:***@127.0.0.1"),
        "the broker is logged, masked: {log}"
    );
    assert!(
        !log.contains("Sup3rSecretPw"),
        "the password leaked into the log"
    );
}

impl Process {
    /// Peak resident memory so far (`VmHWM`), in bytes.
    fn peak_rss(&self) -> u64 {
        aura_testkit::peak_rss(self.child.id())
    }
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn journal_entries_from_python_are_stored_bounded_and_an_event_over_the_limit_is_dead_lettered_with_its_size()
 {
    let server = RedisServer::start();
    let celery = Celery::on(&server);
    let worker = celery.start_worker("journal", &[("CELERY_CONCURRENCY", "4")]);
    assert_all_succeeded(&celery.client(&["send", "--count", "40", "--wait", "120"]));
    // 600,000-character notes: valid events under MAX_EVENT_BYTES; the chain cuts the text, never the entry.
    assert_all_succeeded(&celery.client(&[
        "send",
        "--count",
        "4",
        "--notes-size",
        "600000",
        "--wait",
        "120",
    ]));
    // 1,500,000 characters: over MAX_EVENT_BYTES; refused with the reason, never parsed.
    let refused = celery.client(&[
        "send",
        "--count",
        "1",
        "--notes-size",
        "1500000",
        "--wait",
        "60",
    ]);
    let id = &ids(&refused)[0];
    assert_eq!(refused["states"][id]["state"], "FAILURE", "{refused}");
    wait_for("the chain to finish", Duration::from_secs(120), || {
        (celery.idle("vectordb") && celery.result_states().get("SUCCESS") == Some(&(44 * 3)))
            .then_some(())
    });
    let peak = worker.peak_rss();
    worker.stop_cleanly();

    let dead = celery.list("vectordb.dlq");
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = dead[0].to_string();
    assert!(reason.contains("MAX_EVENT_BYTES"), "{reason}");
    assert_eq!(celery.points(), 40 + 4 * 40);
    aura_testkit::process::assert_peak_within("the worker, with journal entries", peak, 500);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Celery {
    /// A view of `server` (which the test keeps, to crash or restart it).
    fn on(server: &RedisServer) -> Self {
        Self {
            redis: server.url(),
            db: 0,
            dir: tempfile::tempdir().unwrap(),
            _server: None,
        }
    }

    /// Final states of `ids` stored so far (SUCCESS, FAILURE, REVOKED; RETRY and STARTED are not final).
    fn final_states(&self, ids: &[String]) -> HashMap<String, String> {
        ids.iter()
            .filter_map(|id| {
                let status = self.result(id)?["status"].as_str()?.to_owned();
                matches!(status.as_str(), "SUCCESS" | "FAILURE" | "REVOKED")
                    .then(|| (id.clone(), status))
            })
            .collect()
    }

    fn success_count(&self) -> usize {
        self.result_states().get("SUCCESS").copied().unwrap_or(0)
    }
}

// ---- The Celery worker under hostile conditions: Redis refusing or gone, extreme input, a stalled result backend ----

/// A fetch registers a message in `unacked` in the same step that takes it off its queue: a registration Redis
/// refuses leaves the message on its queue.
#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn a_message_redis_refuses_to_register_stays_on_its_queue_and_none_is_lost() {
    let celery = Celery::private();
    // `unacked` of the wrong type: every registration is refused, as an ACL or an OOM refusal would be.
    celery.cmd(&["SET", "unacked", "not a hash"]);
    let mut worker = celery.start_ready_worker("refused", &[("CELERY_CONCURRENCY", "2")]);
    // Sent to an idle worker (the blocking-wait path), then a backlog (the batch path).
    let sent = celery.client(&["send", "--count", "20"]);
    worker.wait_log(
        "fetching from the broker failed",
        5,
        Duration::from_secs(60),
    );
    assert_eq!(
        celery.int(&["LLEN", "vectordb"]),
        20,
        "a message left its queue without being registered:\n{}",
        worker.log()
    );
    assert!(celery.result_states().is_empty());
    assert!(worker.alive());
    // Redis takes the writes again: every message runs, none was lost.
    celery.cmd(&["DEL", "unacked"]);
    celery.await_success(&sent, "120");
    wait_for("the chain to finish", Duration::from_secs(120), || {
        celery.idle("vectordb").then_some(())
    });
    assert_eq!(celery.success_count(), 20 * 3);
    worker.stop_cleanly();
}

/// Extreme headers and payloads from Python Celery, among good tasks: every task ends in a terminal state.
#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn python_sending_legal_but_extreme_headers_and_payloads_gets_a_terminal_state_for_every_task() {
    let celery = Celery::private();
    let visibility = Duration::from_secs(3);
    let mut worker = celery.start_worker(
        "hardy",
        &[
            ("CELERY_VISIBILITY_TIMEOUT", "3"),
            ("CELERY_CONCURRENCY", "2"),
        ],
    );
    let cases: Vec<(String, String, String)> = celery.client(&["hostile"])["cases"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, case)| {
            (
                name.clone(),
                case["id"].as_str().unwrap().to_owned(),
                case["expect"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let ids: Vec<String> = cases.iter().map(|(_, id, _)| id.clone()).collect();
    let states = wait_for(
        "every task to reach a final state",
        Duration::from_secs(120),
        || {
            let states = celery.final_states(&ids);
            (states.len() == ids.len()).then_some(states)
        },
    );
    let wrong: Vec<String> = cases
        .iter()
        .filter(|(_, id, expect)| states[id] != *expect)
        .map(|(name, id, expect)| format!("{name}: {} (expected {expect})", states[id]))
        .collect();
    assert!(wrong.is_empty(), "{wrong:?}\n{}", worker.log());
    assert!(worker.alive(), "the worker died:\n{}", worker.log());
    // Every FAILURE has its dead letter, with the reason.
    let failed: HashSet<&str> = cases
        .iter()
        .filter(|(_, _, expect)| expect == "FAILURE")
        .map(|(_, id, _)| id.as_str())
        .collect();
    let dead = celery.list("vectordb.dlq");
    let dead_ids: HashSet<&str> = dead.iter().filter_map(|d| d["task_id"].as_str()).collect();
    assert_eq!(dead_ids, failed, "{dead:?}");
    assert!(
        dead.iter()
            .all(|d| !d["error"].as_str().unwrap().is_empty())
    );
    wait_for("the chain to finish", Duration::from_secs(120), || {
        celery.idle("vectordb").then_some(())
    });
    // Two visibility timeouts later nothing came back: no task is stuck in a restore loop.
    let results_before = celery.result_states();
    std::thread::sleep(2 * visibility + Duration::from_secs(1));
    assert_eq!(celery.int(&["HLEN", "unacked"]), 0);
    assert_eq!(celery.int(&["LLEN", "vectordb"]), 0);
    assert_eq!(celery.result_states(), results_before);
    let log = worker.stop_cleanly();
    assert!(!log.contains("panicked"), "{log}");
}

/// The fetch's retries race against shutdown: SIGTERM while Redis is down exits in time.
#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn sigterm_while_redis_is_down_exits_within_10_seconds_and_loses_nothing() {
    let mut server = RedisServer::durable();
    let celery = Celery::on(&server);
    let sent = celery.client(&["send", "--count", "300"]);
    let mut worker = celery.start_worker(
        "stranded",
        &[
            ("CELERY_CONCURRENCY", "2"),
            ("CELERY_VISIBILITY_TIMEOUT", "2"),
        ],
    );
    wait_for("progress", Duration::from_secs(60), || {
        (celery.success_count() >= 20).then_some(())
    });
    server.crash();
    worker.wait_log("Redis unavailable", 1, Duration::from_secs(30));
    let (status, took, log) = worker.stop();
    eprintln!("exit after SIGTERM with Redis down: {took:?}");
    assert!(status.success(), "{log}");
    assert!(took < Duration::from_secs(10), "exit took {took:?}:\n{log}");
    // A worker starting while Redis is down stops as promptly.
    let mut late = celery.start_worker("late", &[]);
    late.wait_log("Redis unavailable", 1, Duration::from_secs(30));
    let (status, took, log) = late.stop();
    assert!(
        status.success() && took < Duration::from_secs(10),
        "{took:?} {log}"
    );
    // Nothing was lost: with Redis back, whatever was held is restored and every task succeeds.
    server.spawn();
    let rescuer = celery.start_worker("rescuer", &[("CELERY_VISIBILITY_TIMEOUT", "2")]);
    celery.await_success(&sent, "240");
    wait_for("the chain to finish", Duration::from_secs(120), || {
        celery.idle("vectordb").then_some(())
    });
    rescuer.stop_cleanly();
}

/// A task keeps its prefetch permit until its result and acknowledgement are written: a result backend that does
/// not answer holds the worker at its prefetch instead of letting it take the whole queue.
#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn with_the_result_backend_down_the_worker_holds_no_more_than_its_prefetch() {
    let celery = Celery::private();
    let mut results = RedisServer::start();
    let results_url = results.url();
    results.crash();
    let sent = celery.client(&["send", "--count", "300"]);
    let addr = format!("127.0.0.1:{}", free_port());
    let worker = celery.start_worker(
        "held",
        &[
            ("RESULT_BACKEND", &results_url),
            ("CELERY_CONCURRENCY", "2"),
            ("CELERY_PREFETCH_MULTIPLIER", "4"),
            ("HTTP_ADDR", &addr),
        ],
    );
    let failing = wait_for(
        "/health to report the result backend",
        Duration::from_secs(60),
        || {
            let (_, body) = aura_testkit::try_http_get(&addr, "/health")?;
            let health: Value = serde_json::from_str(&body).ok()?;
            let dependency = health["dependencies"]
                .as_array()?
                .iter()
                .find(|d| d["name"] == "result_backend" && d["ok"] == false)?
                .clone();
            Some((health["status"].clone(), dependency))
        },
    );
    assert_eq!(failing.0, "degraded", "{failing:?}");
    // Over several seconds of a backend that does not answer, in-flight work stays within 2 × 4.
    let mut most = 0;
    for _ in 0..50 {
        most = most.max(celery.int(&["HLEN", "unacked"]));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        most <= 8,
        "{most} messages unacknowledged:\n{}",
        worker.log()
    );
    assert!(celery.int(&["LLEN", "vectordb"]) >= 300 - 8);
    // The backend is back: every task runs and its result is stored.
    results.spawn();
    let stored = Celery::on(&results);
    wait_for("every result", Duration::from_secs(180), || {
        (stored.success_count() >= 300 * 3 && celery.idle("vectordb")).then_some(())
    });
    assert_eq!(stored.final_states(&ids(&sent)).len(), 300);
    worker.stop_cleanly();
}

/// A task waiting for an eta beyond the visibility timeout keeps its lease (no other worker restores it, so it runs
/// once), and scheduled tasks beyond `CELERY_ETA_MAX_HELD` wait in Redis, not in memory.
#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn a_countdown_longer_than_the_visibility_timeout_runs_once_and_what_does_not_fit_waits_in_redis() {
    let celery = Celery::private();
    let holder = celery.start_ready_worker(
        "holder",
        &[
            ("CELERY_VISIBILITY_TIMEOUT", "2"),
            ("CELERY_ETA_MAX_HELD", "2"),
        ],
    );
    let sent_at = Instant::now();
    let sent = celery.client(&["send", "--count", "5", "--countdown", "10"]);
    wait_for(
        "2 held in memory, 3 in vectordb.delayed",
        Duration::from_secs(8),
        || {
            (celery.int(&["HLEN", "unacked"]) == 2
                && celery.int(&["ZCARD", "vectordb.delayed"]) == 3)
                .then_some(())
        },
    );
    // The visibility timeout passes twice while they wait; a worker starting now restores whatever looks abandoned.
    std::thread::sleep(
        (sent_at + Duration::from_secs(5)).saturating_duration_since(Instant::now()),
    );
    // (Embedded Qdrant is one process's: the second worker has a store of its own.)
    let second_store = celery.dir.path().join("qdrant-second");
    let second = celery.start_ready_worker(
        "second",
        &[
            ("CELERY_VISIBILITY_TIMEOUT", "2"),
            ("QDRANT_PATH", second_store.to_str().unwrap()),
        ],
    );
    celery.await_success(&sent, "60");
    wait_for("the chain to finish", Duration::from_secs(60), || {
        celery.idle("vectordb").then_some(())
    });
    assert!(
        sent_at.elapsed() >= Duration::from_secs(10),
        "ran before its eta"
    );
    assert_eq!(celery.int(&["ZCARD", "vectordb.delayed"]), 0);
    // One run per mood: a second run would have produced a second chain, with new task ids.
    assert_eq!(
        celery.success_count(),
        5 * 3,
        "{:?}",
        celery.result_states()
    );
    for worker in [holder, second] {
        worker.stop_cleanly();
    }
}

/// Restore pushes a message to the queues bound to its exchange, not to its routing key.
#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn a_killed_python_workers_task_on_a_named_exchange_is_restored_to_its_bound_queue() {
    let celery = Celery::private();
    let media = [
        ("MEDIA_QUEUE", "pdf_jobs"),
        ("VISIBILITY_TIMEOUT", "2"),
        ("RECORD_KEY", "recorded"),
    ];
    let slow: Vec<(&str, &str)> = media
        .iter()
        .copied()
        .chain([("SLOW_TASK_SECONDS", "120")])
        .collect();
    let python = celery.start_python_worker("media", "pdf_jobs", &slow);
    let sent = celery.client_with(&["foreign", "--count", "1"], &media);
    let entry: Value = wait_for(
        "the Python worker to take the task",
        Duration::from_secs(60),
        || {
            let entries: Vec<String> = redis::cmd("HVALS")
                .arg("unacked")
                .query(&mut celery.conn())
                .ok()?;
            entries.first().map(|e| serde_json::from_str(e).unwrap())
        },
    );
    assert_eq!(
        (entry[1].as_str(), entry[2].as_str()),
        (Some("media"), Some("media.pdf")),
        "{entry}"
    );
    python.kill();
    let ours = celery.start_worker("restorer", &[("CELERY_VISIBILITY_TIMEOUT", "2")]);
    wait_for("the task back on pdf_jobs", Duration::from_secs(60), || {
        (celery.int(&["LLEN", "pdf_jobs"]) == 1).then_some(())
    });
    assert_eq!(
        celery.int(&["EXISTS", "media.pdf"]),
        0,
        "restored to a list nothing reads"
    );
    assert_eq!(celery.int(&["HLEN", "unacked"]), 0);
    ours.stop_cleanly();
    let python = celery.start_python_worker("media2", "pdf_jobs", &media);
    celery.await_success(&sent, "60");
    assert_eq!(celery.list("recorded").len(), 1);
    drop(python);
}

/// Coexistence: a Python worker and ours on one Redis; ours also (mis)configured on the Python worker's queue.
#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn python_and_our_workers_share_one_redis_and_every_task_runs_once_on_a_worker_that_knows_it() {
    let celery = Celery::private();
    let mut ours = celery.start_ready_worker("ours", &[("CELERY_QUEUES", "vectordb,celery")]);
    let foreign = celery.client(&["foreign", "--count", "40"]);
    let moods = celery.client(&["send", "--count", "40"]);
    // Ours meets the Python app's tasks first (no Python worker yet) and gives them back, untouched.
    ours.wait_log(
        "a task of another app reached this worker",
        10,
        Duration::from_secs(60),
    );
    assert!(celery.final_states(&ids(&foreign)).is_empty());
    let python = celery.start_python_worker("batch", "celery", &[("RECORD_KEY", "recorded")]);
    celery.await_success(&foreign, "180");
    celery.await_success(&moods, "180");
    wait_for("both queues to drain", Duration::from_secs(120), || {
        (celery.idle("vectordb") && celery.int(&["LLEN", "celery"]) == 0).then_some(())
    });
    let recorded = celery.list("recorded");
    let ran: Vec<&str> = recorded.iter().map(|r| r["id"].as_str().unwrap()).collect();
    let unique: HashSet<&str> = ran.iter().copied().collect();
    assert_eq!(
        ran.len(),
        40,
        "each foreign task runs exactly once: {ran:?}"
    );
    assert_eq!(unique, ids(&foreign).iter().map(String::as_str).collect());
    assert!(recorded.iter().all(|r| r["hostname"] == "batch@test"));
    assert_eq!(celery.success_count(), 40 + 40 * 3);
    assert!(!celery.result_states().contains_key("FAILURE"));
    assert_eq!(celery.int(&["LLEN", "celery.dlq"]), 0);
    assert_eq!(celery.int(&["LLEN", "vectordb.dlq"]), 0);
    ours.stop_cleanly();
    drop(python);
}

/// The rollback plan's checks grep a worker's log for Celery's own lines: `<node> ready.` and
/// `Task <name>[<id>] succeeded in <s>s: …`. Text logs have them at INFO; JSON logs carry the same message and the
/// fields (`task`, `task_id`, `runtime`) for machines.
#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn the_worker_logs_celery_shaped_lines_and_keeps_them_structured_in_json() {
    let celery = Celery::private();
    let worker = celery.start_ready_worker("plan", &[("NO_COLOR", "1")]);
    let sent = celery.client(&["send", "--count", "3", "--wait", "60"]);
    assert_all_succeeded(&sent);
    let log = worker.log();
    for id in ids(&sent) {
        let succeeded = format!("Task {MOOD_TASK}[{id}] succeeded in ");
        let line = log
            .lines()
            .find(|l| l.contains(&succeeded))
            .unwrap_or_else(|| panic!("no {succeeded:?} line:\n{log}"));
        assert!(line.contains(" INFO "), "{line}");
        let (_, rest) = line.split_once(&succeeded).unwrap();
        let (seconds, result) = rest.split_once("s: ").unwrap();
        assert!(seconds.parse::<f64>().is_ok(), "{line}");
        assert!(
            result.starts_with("{'ok': True"),
            "Celery's saferepr of the result: {line}"
        );
        assert!(
            log.contains(&format!("Task {MOOD_TASK}[{id}] received")),
            "{log}"
        );
    }
    worker.stop();

    let json_worker = celery.start_ready_worker("planjson", &[("LOG_FORMAT", "json")]);
    let sent = celery.client(&["send", "--count", "1", "--wait", "60"]);
    assert_all_succeeded(&sent);
    let id = &ids(&sent)[0];
    let log = json_worker.log();
    let line: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["task_id"] == id.as_str() && l["fields"]["runtime"].is_number())
        .unwrap_or_else(|| panic!("no structured success line for {id}:\n{log}"));
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["fields"]["task"], MOOD_TASK);
    assert!(
        line["fields"]["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!("Task {MOOD_TASK}[{id}] succeeded in ")),
        "{line}"
    );
    json_worker.stop();
}

/// Each of our workers in the churn tests: a store directory of its own (embedded Qdrant is one process's).
impl Celery {
    fn start_member(&self, name: &str, env: &[(&str, &str)]) -> Process {
        let store = self.dir.path().join(name).join("qdrant");
        let store = store.to_str().unwrap().to_owned();
        let mut env = env.to_vec();
        env.push(("QDRANT_PATH", &store));
        self.start_worker(name, &env)
    }

    /// Messages waiting on `queue` at any priority (kombu keeps one list per priority step).
    fn waiting(&self, queue: &str) -> i64 {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{queue}*"))
            .query(&mut self.conn())
            .unwrap();
        keys.iter()
            .filter(|k| *k == queue || k.starts_with(&format!("{queue}\x06\x16")))
            .map(|k| self.int(&["LLEN", k]))
            .sum()
    }

    /// Done: at least `results` tasks stored as SUCCESS (a task a worker ran but could not acknowledge before it
    /// died runs again, and its follow-up is a new task), nothing waiting on `queues` at any priority, nothing
    /// unacknowledged — a task's follow-ups are pushed in the `MULTI` that acknowledges it, so this is "no work left".
    fn done(&self, results: usize, queues: &[&str]) -> bool {
        queues.iter().all(|q| self.waiting(q) == 0)
            && self.int(&["HLEN", "unacked"]) == 0
            && self.result_states().get("SUCCESS").copied().unwrap_or(0) >= results
    }

    /// Waits until [`Celery::done`] has held for a second.
    fn wait_done(&self, results: usize, queues: &[&str], limit: Duration) {
        let mut since: Option<Instant> = None;
        wait_for(
            "every result stored, every queue and unacked empty",
            limit,
            || {
                if !self.done(results, queues) {
                    since = None;
                    return None;
                }
                let first = *since.get_or_insert_with(Instant::now);
                (first.elapsed() >= Duration::from_secs(1)).then_some(())
            },
        );
    }

    /// The union of the point ids in the stores of `members` (every one stopped).
    fn member_points(&self, members: &[&str]) -> HashSet<String> {
        let roots: Vec<PathBuf> = members
            .iter()
            .map(|m| self.dir.path().join(m).join("qdrant"))
            .collect();
        let roots: Vec<&Path> = roots.iter().map(PathBuf::as_path).collect();
        common::points_in_stores(&roots, 64).0
    }
}

impl Process {
    /// SIGTERM: must exit 0 within 10 s.
    fn stop_within_ten_seconds(self, name: &str) {
        let (status, took, log) = self.stop();
        assert!(status.success(), "{name} exited {status}:\n{log}");
        assert!(
            took < Duration::from_secs(10),
            "{name} took {took:?}:\n{log}"
        );
    }
}

/// A churn member's settings: the visibility timeout, 8 slots, embeddings from the delayed server at `url`.
fn member_env<'a>(visibility: &'a str, url: &'a str) -> [(&'static str, &'a str); 5] {
    [
        ("CELERY_VISIBILITY_TIMEOUT", visibility),
        ("CELERY_CONCURRENCY", "8"),
        ("EMBEDDING_PROVIDER", "openai"),
        ("EMBEDDING_URL", url),
        ("EMBEDDING_TIMEOUT_S", "30"),
    ]
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn workers_killed_stopped_paused_and_joining_late_beside_a_python_worker_run_every_task() {
    const VISIBILITY: &str = "6";
    let celery = Celery::private();
    // The Python services' own worker on the same Redis (its queue `celery`, the same visibility timeout): kombu's
    // `unacked` hash and its restore are shared by every worker on the server.
    let mut python =
        celery.start_python_worker("python", "celery", &[("VISIBILITY_TIMEOUT", VISIBILITY)]);
    python.wait_log("ready", 1, Duration::from_secs(60));
    // Embeddings answered after 0–100 ms: a worker always holds messages mid-task when it is killed or paused.
    let embedder = aura_testkit::EmbeddingServer::start_delayed(
        &aura_testkit::python(),
        celery.dir.path(),
        0,
        100,
    );
    let url = embedder.url();
    let env = member_env(VISIBILITY, &url);
    let first_batch = celery.client(&["send", "--count", "600"]);
    let foreign = celery.client(&["foreign", "--count", "40"]);
    let mut first = celery.start_member("w1", &env);
    let mut second = celery.start_member("w2", &env);
    let mut third = celery.start_member("w3", &env);
    for worker in [&mut first, &mut second, &mut third] {
        worker.wait_log("succeeded in", 5, Duration::from_secs(60));
    }

    // kill -9 while it holds messages; they stay in `unacked` until a worker restores them.
    first.kill();
    assert!(
        celery.int(&["HLEN", "unacked"]) > 0,
        "nothing held when killed"
    );
    // More tasks arrive while the membership churns.
    let late_batch = celery.client(&["send", "--count", "300"]);
    second.stop_within_ten_seconds("w2");
    let mut fourth = celery.start_member("w4", &env);
    fourth.wait_log("ready.", 1, Duration::from_secs(60));
    // Paused until the others have done everything, what it held included (restored once the visibility timeout
    // passed); then it wakes up and finds it taken over.
    third.signal("-STOP");
    // Every task's result readable by AsyncResult, nothing left on a queue or unacknowledged, no dead letter.
    celery.await_success(&first_batch, "300");
    celery.await_success(&late_batch, "300");
    celery.await_success(&foreign, "300");
    // Every hop of every event (3 × 900 tasks) and the Python app's own tasks: stored as SUCCESS, nothing left.
    celery.wait_done(
        3 * 900 + 40,
        &["vectordb", "celery"],
        Duration::from_secs(300),
    );
    third.signal("-CONT");
    third.wait_log(
        "held messages checked after the pause",
        1,
        Duration::from_secs(60),
    );
    celery.wait_done(
        3 * 900 + 40,
        &["vectordb", "celery"],
        Duration::from_secs(60),
    );
    assert_eq!(celery.int(&["ZCARD", "unacked_index"]), 0);
    assert_eq!(
        celery.int(&["LLEN", "vectordb.dlq"]),
        0,
        "nothing dead-lettered"
    );
    let restored: usize = [&third, &fourth]
        .iter()
        .map(|w| {
            w.log()
                .matches("restored messages left unacknowledged")
                .count()
        })
        .sum::<usize>()
        + python.log().matches("Restoring").count();
    assert!(
        restored > 0,
        "the killed worker's messages were restored by a live worker"
    );
    third.stop_within_ten_seconds("w3");
    fourth.stop_within_ten_seconds("w4");
    assert!(python.stop().0.success());
    let points = celery.member_points(&["w1", "w2", "w3", "w4"]);
    assert_eq!(
        points.len(),
        900,
        "every event's point exactly once across the stores"
    );
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and Python Celery: test.sh")]
fn a_worker_paused_past_the_visibility_timeout_writes_no_result_of_what_another_worker_took_over() {
    const VISIBILITY: &str = "4";
    let celery = Celery::private();
    let embedder = aura_testkit::EmbeddingServer::start_delayed(
        &aura_testkit::python(),
        celery.dir.path(),
        0,
        250,
    );
    let url = embedder.url();
    let env = member_env(VISIBILITY, &url);
    let sent = celery.client(&["send", "--count", "300"]);
    let mut zombie = celery.start_member("zombie", &env);
    zombie.wait_log("succeeded in", 5, Duration::from_secs(60));
    // Stopped while its tasks wait on the embedder and its committer is idle (every slot held at the gate, or no task
    // finished for a second since requests were held), so no write is under way at the stop: a write already sent
    // completes when the process wakes, and no client-side check can stop it (docs/design.md §4).
    embedder.close_gate();
    let mut quiet = (0, 0, Instant::now());
    let settled = || {
        let (held, finished) = (
            embedder.held(),
            zombie.log().matches("succeeded in").count(),
        );
        if (held, finished) != (quiet.0, quiet.1) {
            quiet = (held, finished, Instant::now());
        }
        (held >= 8 || (held > 0 && quiet.2.elapsed() >= Duration::from_secs(1))).then_some(())
    };
    aura_testkit::poll(
        Duration::from_millis(20),
        Duration::from_secs(60),
        settled,
        || {
            format!(
                "the worker never settled with its tasks waiting on the embedder ({} held)",
                embedder.held()
            )
        },
    );
    zombie.signal("-STOP");
    embedder.open_gate();
    let held = celery.int(&["HLEN", "unacked"]);
    assert!(held > 0, "the paused worker held nothing");
    let other = celery.start_member("other", &env);
    celery.await_success(&sent, "300");
    celery.wait_done(3 * 300, &["vectordb"], Duration::from_secs(300));

    // Every result written from now on is published on its `celery-task-meta-<id>` channel.
    let (published_tx, published) = std::sync::mpsc::channel::<String>();
    let (subscribed_tx, subscribed) = std::sync::mpsc::channel::<()>();
    let broker = celery.broker();
    std::thread::spawn(move || {
        let client = redis::Client::open(broker).unwrap();
        let mut connection = client.get_connection().unwrap();
        let mut pubsub = connection.as_pubsub();
        pubsub.psubscribe("celery-task-meta-*").unwrap();
        let _ = subscribed_tx.send(());
        while let Ok(message) = pubsub.get_message() {
            if published_tx
                .send(message.get_channel_name().to_owned())
                .is_err()
            {
                return;
            }
        }
    });
    subscribed.recv_timeout(Duration::from_secs(10)).unwrap();
    zombie.signal("-CONT");
    zombie.wait_log(
        "held messages checked after the pause",
        1,
        Duration::from_secs(60),
    );
    let log = zombie.log();
    let taken_over: usize = log
        .lines()
        .find(|l| l.contains("restored by another worker while it was paused"))
        .and_then(|l| l.split("taken_over=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("the paused worker found nothing taken over:\n{log}"));
    assert!(taken_over > 0);
    zombie.wait_log(
        "dropped: another worker restored this message",
        1,
        Duration::from_secs(60),
    );
    // Whatever it still ran ends with its exit; then a sentinel closes the publications to look at.
    zombie.stop_within_ten_seconds("zombie");
    let _: i64 = redis::cmd("PUBLISH")
        .arg("celery-task-meta-sentinel")
        .arg("end")
        .query(&mut celery.conn())
        .unwrap();
    let mut late = Vec::new();
    loop {
        let channel = published.recv_timeout(Duration::from_secs(30)).unwrap();
        if channel == "celery-task-meta-sentinel" {
            break;
        }
        late.push(channel);
    }
    assert!(
        late.is_empty(),
        "{} results written after the paused worker woke up, e.g. {:?}\n--- zombie\n{}\n--- other\n{}",
        late.len(),
        late.first(),
        std::fs::read_to_string(celery.dir.path().join("zombie.log")).unwrap_or_default(),
        other.log()
    );
    assert!(
        celery.done(3 * 300, &["vectordb"]),
        "nothing pushed or left unacknowledged"
    );
    assert_eq!(celery.int(&["LLEN", "vectordb.dlq"]), 0);
    other.stop_within_ten_seconds("other");
    assert_eq!(celery.member_points(&["zombie", "other"]).len(), 300);
}
