//! The Celery mount against Python Celery 5.7, same Redis, same task semantics, one run (`scripts/bench-celery.sh`).
//!
//! Workload: N `process_mood_created` tasks are pushed at once (pipelined `LPUSH`, envelopes as `send_task`
//! writes them) onto an idle worker. Each mood task publishes one `process_context_aggregated` task (the next hop)
//! and returns `{"ok": true, …}`; the aggregated task publishes nothing. Both workers: `acks_late`, Redis result
//! backend (a second database), task events off (Celery's default). Clock: from the first `LPUSH` until all 2N
//! results are stored (`DBSIZE` of the result database). Python: `celery worker --pool prefork -c <cores>` running
//! tests/python/celery_app.py (`TASK_MODE=forward`); ours: `CeleryWorker` in-process with handlers that do the
//! same. Redis `INFO commandstats` before/after gives the commands per task and `INFO cpu` Redis's own CPU time.
//!
//! Our worker runs with the settings' defaults (`WorkerOptions::from(&Settings::load())`: concurrency, prefetch, task
//! events on), in celery mode (the next hop is a Celery task) and, when `AURA_TEST_KAFKA` names a broker, in kafka
//! mode (the next hop is produced to Kafka through the same fallback publisher `vectordb-worker` uses; N tasks, N
//! records, each acknowledged by the broker before its task is acknowledged).
//!
//! Sizes: `BENCH_PY_TASKS` (mood tasks for Python, default 3000), `BENCH_RUST_TASKS` (default 20000). Needs
//! `AURA_TEST_PYTHON` (the venv's python) and `redis-server` on PATH; `scripts/bench-celery.sh` starts the tests' Apache Kafka.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aura_celery::protocol::{TaskOptions, build_task};
use aura_celery::transport::priority_key;
use aura_celery::{Broker, CeleryPublisher, CeleryWorker, ResultBackend};
use aura_runtime::events::Event;
use aura_runtime::testing::{FnHandler, sink};
use aura_runtime::{Dispatcher, Publisher, Registry, Settings};
use serde_json::{Map, json};

const MOOD_TASK: &str = "vectosvc.worker.tasks.process_mood_created";

/// The benchmark's first hop: a mood event becomes one context.aggregated event (as `TASK_MODE=forward` does);
/// the second accepts it and produces nothing.
fn forward_then_sink() -> Registry {
    let forward = FnHandler::new("forward", &["user.mood.created"], |event| {
        let mut next = Event::caused_by(event, "context.aggregated");
        next.set_field("context_data", json!({"mood_summary": event.field("data")}));
        Ok(vec![next])
    });
    Registry::new()
        .with(forward)
        .with(sink("sink", &["context.aggregated"]))
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The benchmark's own redis-server (no persistence).
struct Redis {
    server: aura_testkit::RedisServer,
}

impl Redis {
    fn start() -> Self {
        Self {
            server: aura_testkit::RedisServer::start(),
        }
    }

    fn url(&self, db: u32) -> String {
        format!("{}/{db}", self.server.url())
    }

    fn conn(&self, db: u32) -> Option<redis::Connection> {
        redis::Client::open(self.url(db))
            .ok()?
            .get_connection()
            .ok()
    }

    fn dbsize(&self, db: u32) -> u64 {
        redis::cmd("DBSIZE")
            .query(&mut self.conn(db).unwrap())
            .unwrap()
    }

    fn info(&self, section: &str) -> String {
        redis::cmd("INFO")
            .arg(section)
            .query(&mut self.conn(0).unwrap())
            .unwrap()
    }

    fn flushall(&self) {
        let _: () = redis::cmd("FLUSHALL")
            .query(&mut self.conn(0).unwrap())
            .unwrap();
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query(&mut self.conn(0).unwrap())
            .unwrap();
    }

    /// Pushes `count` mood tasks as `send_task` writes them, in pipelined batches.
    fn push_moods(&self, count: usize) {
        let options = TaskOptions {
            queue: "vectordb".into(),
            origin: "bench@localhost".into(),
            reply_to: uuid::Uuid::new_v4().to_string(),
            ..TaskOptions::default()
        };
        let mut conn = self.conn(0).unwrap();
        for chunk in (0..count).collect::<Vec<_>>().chunks(1000) {
            let mut pipe = redis::pipe();
            for n in chunk {
                let mut event = Event::new(
                    "user.mood.created",
                    Some(format!("user-{}", n % 50)),
                    Some(format!("trace-{n}")),
                );
                event.set_field("data", json!({"mood_score": 1 + n % 10, "tags": ["calm"], "notes": format!("note {n}")}));
                let task = build_task(MOOD_TASK, &[&event], &Map::new(), &options);
                pipe.lpush(priority_key("vectordb", 0), task.envelope.to_vec())
                    .ignore();
            }
            let _: () = pipe.query(&mut conn).unwrap();
        }
    }
}

/// `cmdstat_<name>:calls=N,…` → name → calls.
fn command_calls(info: &str) -> BTreeMap<String, u64> {
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

fn redis_cpu(info: &str) -> f64 {
    info.lines()
        .filter_map(|line| {
            line.strip_prefix("used_cpu_sys:")
                .or_else(|| line.strip_prefix("used_cpu_user:"))
        })
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

struct Measured {
    /// The worker's own CPU time, when it ran in this process.
    worker_cpu: Option<f64>,
    tasks: u64,
    seconds: f64,
    redis_cpu: f64,
    calls: BTreeMap<String, u64>,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.tasks as f64 / self.seconds
    }

    fn print(&self, label: &str) {
        println!(
            "{label}: {} tasks in {:.2} s = {:.0} tasks/s; Redis CPU {:.2} s ({:.0}% of one core)",
            self.tasks,
            self.seconds,
            self.rate(),
            self.redis_cpu,
            100.0 * self.redis_cpu / self.seconds
        );
        let per_task: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, calls)| **calls as f64 / self.tasks as f64 >= 0.01)
            .map(|(name, calls)| format!("{name} {:.2}", *calls as f64 / self.tasks as f64))
            .collect();
        println!("  Redis commands per task: {}", per_task.join(", "));
        if let Some(cpu) = self.worker_cpu {
            println!(
                "  worker process CPU {cpu:.2} s ({:.0}% of one core, {:.1} µs per task; includes pushing the tasks)",
                100.0 * cpu / self.seconds,
                1e6 * cpu / self.tasks as f64
            );
        }
    }
}

/// Pushes `moods`, waits for `results_per_mood`×moods results, measures.
fn measure(redis: &Redis, moods: usize, results_per_mood: u64) -> Measured {
    let cpu_before = redis_cpu(&redis.info("cpu"));
    let calls_before = command_calls(&redis.info("commandstats"));
    let started = Instant::now();
    redis.push_moods(moods);
    let target = results_per_mood * moods as u64;
    let deadline = Instant::now() + Duration::from_secs(900);
    while redis.dbsize(1) < target {
        assert!(
            Instant::now() < deadline,
            "timed out: {} of {target} results",
            redis.dbsize(1)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let seconds = started.elapsed().as_secs_f64();
    let calls_after = command_calls(&redis.info("commandstats"));
    let calls = calls_after
        .into_iter()
        .map(|(name, calls)| {
            let before = calls_before.get(&name).copied().unwrap_or(0);
            (name, calls - before)
        })
        .filter(|(name, _)| name != "dbsize" && name != "info")
        .collect();
    Measured {
        worker_cpu: None,
        tasks: target,
        seconds,
        redis_cpu: redis_cpu(&redis.info("cpu")) - cpu_before,
        calls,
    }
}

fn python_worker(redis: &Redis, python: &str, concurrency: usize) -> Measured {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python");
    let celery = std::path::Path::new(python)
        .parent()
        .unwrap()
        .join("celery");
    let mut child = Command::new(celery)
        .current_dir(&dir)
        .env("BROKER_URL", redis.url(0))
        .env("RESULT_BACKEND", redis.url(1))
        .env("TASK_MODE", "forward")
        .args([
            "-A",
            "celery_app",
            "worker",
            "--pool",
            "prefork",
            "-c",
            &concurrency.to_string(),
        ])
        .args([
            "-Q",
            "vectordb",
            "-n",
            "pybench@localhost",
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "WARNING",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("celery worker");
    // Ready when it answers a ping.
    let ping = Command::new(python)
        .current_dir(&dir)
        .env("BROKER_URL", redis.url(0))
        .args(["-c", "import time,celery_app as a\nfor _ in range(120):\n    r=a.app.control.inspect(timeout=0.5).ping()\n    if r: break\n    time.sleep(0.5)\nprint(bool(r))"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&ping.stdout).contains("True"),
        "Python worker did not start"
    );
    redis.flushall();
    let moods = env_usize("BENCH_PY_TASKS", 3000);
    let measured = measure(redis, moods, 2);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    measured
}

/// Where our worker sends the next hop.
enum NextHop {
    Celery,
    /// Produced to Kafka (settings with the bootstrap servers and a topic prefix of this run).
    Kafka(Box<aura_runtime::settings::KafkaSettings>),
}

fn rust_worker(redis: &Redis, next_hop: &NextHop) -> Measured {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let guard = runtime.enter();
    let embedded = aura_runtime::testing::embedded();
    let measured = runtime.block_on(async {
        let broker =
            Arc::new(Broker::open(&redis.url(0), redis.url(0), Duration::from_secs(3600)).unwrap());
        let results = Arc::new(
            ResultBackend::open(&redis.url(1), redis.url(1), Duration::from_secs(86400)).unwrap(),
        );
        let registry = Arc::new(forward_then_sink());
        let mut settings = Settings::load().expect("settings");
        // The publish fallback (MESSAGING_FALLBACK) writes to this run's Redis, never the machine's.
        settings.celery.broker_url = aura_runtime::settings::SecretUrl::new(redis.url(0));
        let (publisher, results_per_mood): (Arc<dyn Publisher>, u64) = match next_hop {
            NextHop::Celery => (
                Arc::new(CeleryPublisher::new(broker.clone(), "vectordb")),
                2,
            ),
            NextHop::Kafka(kafka) => {
                settings.kafka = (**kafka).clone();
                let producer = aura_kafka::KafkaPublisher::new(kafka).expect("producer");
                (
                    aura_cli::publish::with_fallback(&settings, Arc::new(producer))
                        .expect("publisher"),
                    1,
                )
            }
        };
        let dispatcher = Dispatcher::new(registry.clone(), embedded.ctx.clone(), publisher);
        // The defaults `vectordb-worker` runs with.
        let mut options = aura_celery::WorkerOptions::from(&settings);
        options.queues = vec!["vectordb".into()];
        options.hostname = "rustbench@localhost".into();
        println!(
            "  (defaults: concurrency {}, prefetch multiplier {}, task events {})",
            options.concurrency, options.prefetch_multiplier, options.send_task_events
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let worker = tokio::spawn(
            CeleryWorker::new(broker, results, registry, dispatcher, options).run(async {
                let _ = stopped.await;
            }),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        redis.flushall();
        let moods = env_usize("BENCH_RUST_TASKS", 20000);
        let cpu_before = aura_testkit::cpu_seconds();
        let measured = tokio::task::block_in_place(|| measure(redis, moods, results_per_mood));
        let measured = Measured {
            worker_cpu: Some(aura_testkit::cpu_seconds() - cpu_before),
            ..measured
        };
        let _ = stop.send(());
        let _ = worker.await;
        if let NextHop::Kafka(kafka) = next_hop {
            let topic = aura_kafka::TopicNames::from_settings(kafka)
                .for_event_type("context.aggregated")
                .expect("topic");
            let (lags, _) = aura_kafka::offsets::group_lag(
                kafka,
                "bench-reader",
                std::slice::from_ref(&topic),
                Duration::from_secs(10),
            )
            .await
            .expect("offsets");
            let records: i64 = lags.iter().map(|l| l.end).sum();
            println!("  {records} records on {topic} for {moods} tasks");
            assert_eq!(
                records, moods as i64,
                "every task's output acknowledged by Kafka"
            );
        }
        measured
    });
    drop(embedded);
    drop(guard);
    measured
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let python = std::env::var("AURA_TEST_PYTHON")
        .expect("AURA_TEST_PYTHON: the venv python with celery (scripts/bench-celery.sh)");
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let redis = Redis::start();
    println!(
        "Celery worker benchmark: {cores} cores, Redis on 127.0.0.1:{}",
        redis.server.port()
    );

    let python_run = python_worker(&redis, &python, cores);
    python_run.print(&format!(
        "Python Celery 5.7 worker (prefork -c {cores}, acks_late, result backend)"
    ));
    redis.flushall();
    let celery_run = rust_worker(&redis, &NextHop::Celery);
    celery_run.print(
        "vectordb-worker, MESSAGING_BACKEND=celery, default settings (acks_late, result backend)",
    );
    println!(
        "ratio: {:.1}x the Python worker",
        celery_run.rate() / python_run.rate()
    );
    if let Ok(bootstrap) = std::env::var("AURA_TEST_KAFKA") {
        let id = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_micros()
        );
        let mut kafka = Settings::load().expect("settings").kafka;
        kafka.bootstrap_servers = bootstrap;
        kafka.topic_prefix = format!("bench-worker-{id}.");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let names = aura_kafka::TopicNames::from_settings(&kafka);
            aura_kafka::create_topics(&kafka, &names.all(), 3, 1)
                .await
                .expect("topics");
        });
        drop(runtime);
        redis.flushall();
        let kafka_run = rust_worker(&redis, &NextHop::Kafka(Box::new(kafka)));
        kafka_run.print("vectordb-worker, MESSAGING_BACKEND=kafka, default settings (next hop produced to Kafka, acks=all)");
        println!(
            "ratio: {:.1}x the Python worker",
            kafka_run.rate() / python_run.rate()
        );
    } else {
        println!(
            "kafka mode: skipped (AURA_TEST_KAFKA not set; scripts/bench-celery.sh starts the broker)"
        );
    }
}
