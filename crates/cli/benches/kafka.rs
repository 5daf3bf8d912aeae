//! The Kafka mount against a real Kafka-protocol broker (`AURA_TEST_KAFKA`; `scripts/bench-kafka.sh` starts tansu).
//!
//! 1. Dispatch overhead: the same topic of N records consumed by (a) a raw rdkafka `StreamConsumer` loop that stores
//!    each offset, (b) `run_consumer` with a no-op handler, (c) the Python confluent-kafka loop
//!    (`tests/python/consume_bench.py`, when `AURA_TEST_PYTHON` is set) — each in a fresh group. (a) and (b) first
//!    prefetch for 15 s and are timed from local queues: tansu serves fetches slower than either loop consumes, so
//!    without it both would measure the broker.
//! 2. End to end: mood events through all three handlers into the embedded store (every write durable), as a
//!    backlog (events/s) and paced (latency from produce to point written, p50/p99).
//!
//! `scripts/bench-kafka.sh` — results in BENCHMARKS.md.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aura_kafka::rdkafka::Message;
use aura_kafka::rdkafka::consumer::{Consumer, StreamConsumer};
use aura_kafka::{ConsumerOptions, KafkaPublisher, OutgoingRecord, TopicNames, run_consumer};
use aura_runtime::events::Event;
use aura_runtime::settings::KafkaSettings;
use aura_runtime::store::Durability;
use aura_runtime::{Dispatcher, Handler, HandlerContext, HandlerError, Registry, Settings};
use handler_context_aggregated::ContextAggregated;
use handler_ingest_vectors::IngestVectors;
use handler_mood_created::MoodCreated;

const NOOP_TYPE: &str = "user.bench.noop";

/// Counts; every call waits until the gate opens, so the consumer can prefetch before the clock starts.
struct NoOp(Arc<AtomicU64>, tokio::sync::watch::Receiver<bool>);

#[async_trait]
impl Handler for NoOp {
    fn name(&self) -> &'static str {
        "noop"
    }
    fn event_types(&self) -> &'static [&'static str] {
        &[NOOP_TYPE]
    }
    async fn handle(&self, _: &Event, _: &HandlerContext) -> Result<Vec<Event>, HandlerError> {
        let mut gate = self.1.clone();
        let _ = gate.wait_for(|open| *open).await;
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(Vec::new())
    }
}

/// `ingest_vectors`, plus the time from the origin event's production (`metadata.bench_sent_us`) to its points.
struct Timed {
    latencies: Arc<Mutex<Vec<f64>>>,
}

#[async_trait]
impl Handler for Timed {
    fn name(&self) -> &'static str {
        IngestVectors.name()
    }
    fn event_types(&self) -> &'static [&'static str] {
        IngestVectors.event_types()
    }
    async fn handle(
        &self,
        event: &Event,
        ctx: &HandlerContext,
    ) -> Result<Vec<Event>, HandlerError> {
        let out = IngestVectors.handle(event, ctx).await?;
        if let Some(sent) = event.metadata.get("bench_sent_us").and_then(|v| v.as_u64()) {
            let latency = now_us().saturating_sub(sent) as f64 / 1_000.0;
            self.latencies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(latency);
        }
        Ok(out)
    }
}

/// CPU seconds this process has used (user + system), from /proc/self/stat (Linux; 10 ms resolution).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of the file (utime, stime) are 12 and 13 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn kafka_settings(prefix: &str, group: &str) -> KafkaSettings {
    let mut settings = Settings::load().expect("settings").kafka;
    settings.bootstrap_servers =
        std::env::var("AURA_TEST_KAFKA").expect("AURA_TEST_KAFKA: run scripts/bench-kafka.sh");
    settings.topic_prefix = prefix.to_owned();
    settings.group_id = group.to_owned();
    // tansu holds every fetch for the full `fetch.wait.max.ms`; Kafka answers as soon as data arrives.
    settings.fetch_wait_max_ms = 20;
    settings
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn produce_noop(settings: &KafkaSettings, topic: &str, n: usize) {
    let publisher = KafkaPublisher::new(settings).expect("producer");
    let payload = Event::new(NOOP_TYPE, Some("bench".into()), None).to_vec();
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let publisher = publisher.clone();
        let payload = payload.clone();
        let topic = topic.to_owned();
        pending.push(async move {
            let key = format!("user-{}", i % 64);
            publisher
                .send(OutgoingRecord {
                    topic: &topic,
                    key: Some(key.as_bytes()),
                    payload: Some(&payload),
                    headers: vec![("event_type", NOOP_TYPE.as_bytes())],
                })
                .await
                .expect("delivery")
        });
        if pending.len() >= 2_000 {
            futures::StreamExt::next(&mut pending).await;
        }
    }
    while futures::StreamExt::next(&mut pending).await.is_some() {}
}

/// The baseline: consume and store every offset, nothing else.
async fn raw_loop(settings: &KafkaSettings, topic: &str, n: usize) -> (Duration, f64) {
    let consumer: StreamConsumer = aura_kafka::client_config(settings)
        .expect("config")
        .set("group.id", format!("{}-raw", settings.group_id))
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", settings.fetch_wait_max_ms.to_string())
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let first = consumer.recv().await.expect("first message");
    // Let librdkafka prefetch, as the mounted loop does behind its gate: both then run from local queues.
    tokio::time::sleep(PREFETCH).await;
    let started = Instant::now();
    let cpu = cpu_seconds();
    consumer.store_offset_from_message(&first).expect("store");
    for _ in 1..n {
        let message = consumer.recv().await.expect("message");
        std::hint::black_box(message.payload());
        consumer.store_offset_from_message(&message).expect("store");
    }
    (started.elapsed(), cpu_seconds() - cpu)
}

/// How long both loops prefetch before the clock starts (the broker is not what is measured here).
const PREFETCH: Duration = Duration::from_secs(15);

/// `run_consumer` with the no-op handler; timed from the gate's opening to the n-th handled event.
async fn mounted_loop(settings: &KafkaSettings, n: usize, ctx: HandlerContext) -> (Duration, f64) {
    let count = Arc::new(AtomicU64::new(0));
    let (open, gate) = tokio::sync::watch::channel(false);
    let registry = Arc::new(Registry::new().with(NoOp(count.clone(), gate)));
    let publisher = KafkaPublisher::new(settings).expect("producer");
    let dispatcher = Dispatcher::new(registry.clone(), ctx, Arc::new(publisher.clone()));
    let mut settings = settings.clone();
    settings.group_id = format!("{}-mounted", settings.group_id);
    let (stop, task) = spawn_consumer(settings, registry, dispatcher, publisher);
    tokio::time::sleep(PREFETCH).await;
    let started = Instant::now();
    let _ = open.send(true);
    let cpu = cpu_seconds();
    while count.load(Ordering::Relaxed) < n as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = (started.elapsed(), cpu_seconds() - cpu);
    let _ = stop.send(());
    task.await.expect("join").expect("consumer");
    elapsed
}

type ConsumerTask =
    tokio::task::JoinHandle<Result<aura_kafka::ConsumerReport, aura_kafka::ClientError>>;

/// `run_consumer` on a task until the returned sender fires.
fn spawn_consumer(
    settings: KafkaSettings,
    registry: Arc<Registry>,
    dispatcher: Dispatcher,
    publisher: KafkaPublisher,
) -> (tokio::sync::oneshot::Sender<()>, ConsumerTask) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        run_consumer(
            &settings,
            registry,
            dispatcher,
            publisher,
            ConsumerOptions::default(),
            shutdown,
        )
        .await
    });
    (stop, task)
}

fn python_loop(settings: &KafkaSettings, topic: &str, n: usize) -> Option<f64> {
    let python = std::env::var("AURA_TEST_PYTHON").ok()?;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/python/consume_bench.py"
    );
    let output = std::process::Command::new(python)
        .args([
            script,
            &settings.bootstrap_servers,
            topic,
            &n.to_string(),
            &format!("{}-py", settings.group_id),
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

fn mood(i: usize, sent_us: u64) -> Event {
    let mut event = Event::new(
        "user.mood.created",
        Some(format!("user-{:03}", i % 48)),
        Some(format!("t{i}")),
    );
    event
        .metadata
        .insert("bench_sent_us".into(), sent_us.into());
    event.set_field(
        "data",
        serde_json::json!({"mood_score": 1 + i % 10, "tags": ["work", "sleep"],
            "notes": "Deadline pressure at work, could not focus after lunch", "created_at": "2026-11-28T10:00:00"}),
    );
    event
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Full chain on the mount: a backlog of `n` events (throughput), then `paced` events at `rate`/s (latency).
async fn end_to_end(settings: &KafkaSettings, n: usize, paced: usize, rate: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut full = Settings::load().expect("settings");
    full.qdrant.path = dir.path().join("qdrant");
    let ctx = aura_cli::handler_context(&full, Durability::EveryWrite)
        .await
        .expect("store");
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let registry = Arc::new(
        Registry::new()
            .with(MoodCreated)
            .with(ContextAggregated)
            .with(Timed {
                latencies: latencies.clone(),
            }),
    );
    let publisher = KafkaPublisher::new(settings).expect("producer");
    for i in 0..n {
        aura_runtime::publish_event(&publisher, &mood(i, 0))
            .await
            .expect("produce");
    }
    let dispatcher = Dispatcher::new(registry.clone(), ctx.clone(), Arc::new(publisher.clone()));
    let (stop, task) = spawn_consumer(settings.clone(), registry, dispatcher, publisher);
    let points = || latencies.lock().unwrap_or_else(|p| p.into_inner()).len();
    while points() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    while points() < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let backlog = started.elapsed();
    println!(
        "end-to-end backlog: {n} mood events through 3 handlers into the store in {:.2} s = {:.0} events/s",
        backlog.as_secs_f64(),
        n as f64 / backlog.as_secs_f64()
    );
    latencies.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let producer = KafkaPublisher::new(settings).expect("producer");
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    for i in 0..paced {
        ticker.tick().await;
        aura_runtime::publish_event(&producer, &mood(n + i, now_us()))
            .await
            .expect("produce");
    }
    while points() < paced {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut sorted = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "end-to-end latency at {rate} events/s ({paced} events): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.99),
        sorted.last().copied().unwrap_or(f64::NAN)
    );
    let _ = stop.send(());
    task.await.expect("join").expect("consumer");
    println!(
        "points in the store: {}",
        ctx.store.count(None).await.expect("count")
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let n = env_usize("BENCH_MESSAGES", 50_000);
        let id = format!("{:x}", now_us());
        let settings = kafka_settings(&format!("bench-{id}."), &format!("bench-{id}"));
        let names = TopicNames::from_settings(&settings);
        aura_kafka::create_topics(&settings, &names.all(), 3, 1).await.expect("topics");
        let topic = names.for_event_type(NOOP_TYPE).expect("topic");
        produce_noop(&settings, &topic, n).await;
        println!("{n} records on {topic} (3 partitions, lz4)");

        let raw = raw_loop(&settings, &topic, n).await;
        let embedded = aura_runtime::testing::embedded();
        let mounted = mounted_loop(&settings, n, embedded.ctx.clone()).await;
        // Wall-clock rates are bounded by how fast the broker serves fetches; CPU per message is our own cost.
        let report = |name: &str, (wall, cpu): (Duration, f64)| {
            let rate = n as f64 / wall.as_secs_f64();
            let capacity = n as f64 / cpu.max(0.01);
            println!("{name:<46} {rate:>8.0} msg/s wall, {:>6.1} us CPU/msg (capacity {capacity:.0} msg/s per core)",
                cpu * 1e6 / n as f64);
            (rate, capacity)
        };
        let (raw_rate, raw_capacity) = report("raw rdkafka loop (store offset per message):", raw);
        let (mounted_rate, mounted_capacity) = report("run_consumer, no-op handler:", mounted);
        println!(
            "run_consumer vs raw: {:.0}% of its wall-clock rate, {:.0}% of its CPU capacity",
            100.0 * mounted_rate / raw_rate,
            100.0 * mounted_capacity / raw_capacity
        );
        match python_loop(&settings, &topic, n) {
            Some(rate) => println!("python confluent-kafka poll loop:            {rate:.0} msg/s"),
            None => println!("python confluent-kafka poll loop: skipped (AURA_TEST_PYTHON not set)"),
        }

        let e2e = kafka_settings(&format!("bench-e2e-{id}."), &format!("bench-e2e-{id}"));
        aura_kafka::create_topics(&e2e, &TopicNames::from_settings(&e2e).all(), 3, 1)
            .await
            .expect("topics");
        end_to_end(
            &e2e,
            env_usize("BENCH_E2E_EVENTS", 5_000),
            env_usize("BENCH_PACED_EVENTS", 2_000),
            env_usize("BENCH_PACED_RATE", 200) as u64,
        )
        .await;
    });
}
