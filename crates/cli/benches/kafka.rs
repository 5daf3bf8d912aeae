//! The Kafka mount, measured on two brokers in one run (`scripts/bench-kafka.sh`):
//!
//! - **librdkafka's in-process mock cluster** (`rdkafka::mocking::MockCluster`): serves fetches from memory, so the
//!   loops measure themselves, not a broker. (a) dispatch overhead: the same topic of N records consumed live by a
//!   raw rdkafka `StreamConsumer` loop that stores each offset, and by `run_consumer` with a no-op handler; (b) end to
//!   end: mood events through all three handlers into the embedded store (every write durable), as a backlog
//!   (events/s, CPU per event, peak RSS) and paced (produce → point latency, p50/p99).
//! - **Apache Kafka** (`AURA_TEST_KAFKA`, the tests' KRaft broker): the honest end-to-end figure on a real broker, the
//!   same (b), plus the plain Python confluent-kafka poll loop (`tests/python/consume_bench.py`, `fetch.wait.max.ms`
//!   20, offsets stored per message) reading the same input topic.
//!
//! The mock cluster runs inside this process: its CPU and memory are counted with the mount's.
//!
//! Sizes: `BENCH_MESSAGES` (dispatch, default 50,000), `BENCH_E2E_EVENTS` (backlog, default 5,000),
//! `BENCH_PACED_EVENTS` (default 2,000) at `BENCH_PACED_RATE` events/s (default 100); `BENCH_PARTITIONS` per topic
//! (default 3, as `vectordb topics create`); `BENCH_USERS` (keys, default 48); `BENCH_MOCK=0` skips the mock cluster;
//! `BENCH_EMBEDDING=local` embeds with the local model (default: the hash embedder); `BENCH_ON_FLUSH=1` makes the store durable only at its flush instead of at every write (what the store's fsync
//! costs); `BENCH_FETCH_WAIT_MS`, the consumers' `fetch.wait.max.ms` (default 20). `KAFKA_PIPELINE_DEPTH` is read
//! from the environment like every setting (1 = no pipelining).
//!
//! On Apache Kafka the naive Python relay (`tests/python/relay_bench.py`: both hops, no embedding, no store; flush and
//! commit every 100 messages) runs on its own copy of the same backlog, and the end-to-end figure is reported against
//! it. The end-to-end clock runs from the first mood event handled to the last point durable (a store layer notes
//! when the store answers; the ingest handler returns before that).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aura_kafka::rdkafka::Message;
use aura_kafka::rdkafka::consumer::{Consumer, StreamConsumer};
use aura_kafka::rdkafka::mocking::MockCluster;
use aura_kafka::rdkafka::producer::DefaultProducerContext;
use aura_kafka::{ConsumerOptions, KafkaPublisher, OutgoingRecord, TopicNames, run_consumer};
use aura_runtime::events::Event;
use aura_runtime::settings::KafkaSettings;
use aura_runtime::store::{
    Durability, Durable, Layered, Point, StoreError, StoreLayer, VectorStore,
};
use aura_runtime::testing::FnHandler;
use aura_runtime::{Dispatcher, Handler, HandlerContext, HandlerError, Registry, Settings};
use handler_context_aggregated::ContextAggregated;
use handler_ingest_vectors::IngestVectors;
use handler_mood_created::MoodCreated;

const NOOP_TYPE: &str = "user.bench.noop";

/// `mood_created`, noting when (and at what CPU time) it first ran: the backlog's clock starts there.
struct FirstMood {
    started: Arc<std::sync::OnceLock<(Instant, f64)>>,
}

#[async_trait]
impl Handler for FirstMood {
    fn name(&self) -> &'static str {
        MoodCreated.name()
    }
    fn event_types(&self) -> &'static [&'static str] {
        MoodCreated.event_types()
    }
    async fn handle(
        &self,
        event: &Event,
        ctx: &HandlerContext,
    ) -> Result<Vec<Event>, HandlerError> {
        self.started
            .get_or_init(|| (Instant::now(), aura_testkit::cpu_seconds()));
        MoodCreated.handle(event, ctx).await
    }
}

/// `ingest_vectors`, noting when each origin event was produced (`metadata.bench_sent_us`) for [`DurablyTimed`].
struct Timed {
    sent: Arc<Mutex<HashMap<String, u64>>>,
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
        if let Some(sent) = event.metadata.get("bench_sent_us").and_then(|v| v.as_u64()) {
            self.sent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(event.origin_event_id(), sent);
        }
        IngestVectors.handle(event, ctx).await
    }
}

/// A store layer that records, when an event's points are durable (not when the store took them), the time from
/// its origin event's production: the end of the chain as the consumer acknowledges it.
struct DurablyTimed {
    sent: Arc<Mutex<HashMap<String, u64>>>,
    latencies: Arc<Mutex<Vec<f64>>>,
}

#[async_trait]
impl StoreLayer for DurablyTimed {
    async fn hand_over(
        &self,
        inner: &dyn VectorStore,
        points: Vec<Point>,
    ) -> Result<Durable, StoreError> {
        let origins: Vec<String> = points
            .iter()
            .filter_map(|p| {
                p.payload
                    .get("origin_event_id")?
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        let durable = inner.hand_over(points).await?;
        let (sent, latencies) = (self.sent.clone(), self.latencies.clone());
        Ok(Box::pin(async move {
            durable.await?;
            let now = now_us();
            let mut sent = sent.lock().unwrap_or_else(|p| p.into_inner());
            let mut latencies = latencies.lock().unwrap_or_else(|p| p.into_inner());
            for origin in origins {
                if let Some(at) = sent.remove(&origin) {
                    latencies.push(now.saturating_sub(at) as f64 / 1_000.0);
                }
            }
            Ok(())
        }))
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn kafka_settings(bootstrap: &str, prefix: &str, group: &str) -> KafkaSettings {
    let mut settings = Settings::load().expect("settings").kafka;
    settings.bootstrap_servers = bootstrap.to_owned();
    settings.topic_prefix = prefix.to_owned();
    settings.group_id = group.to_owned();
    settings.fetch_wait_max_ms = env_usize("BENCH_FETCH_WAIT_MS", 20) as u32;
    settings
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resets this process's peak RSS (`VmHWM`), so the next reading is the peak of what follows.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak RSS in MiB since the last reset.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
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

/// The baseline: consume and store every offset, nothing else; timed from the first message to the n-th.
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
    let started = Instant::now();
    let cpu = aura_testkit::cpu_seconds();
    consumer.store_offset_from_message(&first).expect("store");
    for _ in 1..n {
        let message = consumer.recv().await.expect("message");
        std::hint::black_box(message.payload());
        consumer.store_offset_from_message(&message).expect("store");
    }
    (started.elapsed(), aura_testkit::cpu_seconds() - cpu)
}

/// `run_consumer` with the no-op handler; timed from the first handled event to the n-th.
async fn mounted_loop(settings: &KafkaSettings, n: usize, ctx: HandlerContext) -> (Duration, f64) {
    let count = Arc::new(AtomicU64::new(0));
    let first = Arc::new(std::sync::OnceLock::new());
    let registry = {
        let (count, first) = (count.clone(), first.clone());
        // Counts, and notes when it handled its first event.
        let noop = FnHandler::new("noop", &[NOOP_TYPE], move |_| {
            first.get_or_init(|| (Instant::now(), aura_testkit::cpu_seconds()));
            count.fetch_add(1, Ordering::Relaxed);
            Ok(Vec::new())
        });
        Arc::new(Registry::new().with(noop))
    };
    let publisher = KafkaPublisher::new(settings).expect("producer");
    let dispatcher = Dispatcher::new(registry.clone(), ctx, Arc::new(publisher.clone()));
    let mut settings = settings.clone();
    settings.group_id = format!("{}-mounted", settings.group_id);
    let (stop, task) = spawn_consumer(settings, registry, dispatcher, publisher);
    while count.load(Ordering::Relaxed) < n as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let finished = (Instant::now(), aura_testkit::cpu_seconds());
    let (started, cpu) = *first.get().expect("first handled");
    let _ = stop.send(());
    task.await.expect("join").expect("consumer");
    (finished.0 - started, finished.1 - cpu)
}

type ConsumerTask =
    tokio::task::JoinHandle<Result<aura_kafka::ConsumerReport, aura_kafka::ClientError>>;

/// `run_consumer` (default options: key ordering, default bounds) on a task until the returned sender fires.
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
        let options = ConsumerOptions::default().with_settings(&settings);
        run_consumer(
            &settings, registry, dispatcher, publisher, options, shutdown,
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
        Some(format!("user-{:03}", i % env_usize("BENCH_USERS", 48))),
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

/// A backlog of `n` mood events on `settings`' input topic; returns the producer.
async fn produce_moods(settings: &KafkaSettings, n: usize) -> KafkaPublisher {
    let publisher = KafkaPublisher::new(settings).expect("producer");
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let publisher = publisher.clone();
        pending.push(async move {
            aura_runtime::publish_event(&publisher, &mood(i, 0))
                .await
                .expect("produce")
        });
        if pending.len() >= 1_000 {
            futures::StreamExt::next(&mut pending).await;
        }
    }
    while futures::StreamExt::next(&mut pending).await.is_some() {}
    publisher
}

/// The naive Python relay (`tests/python/relay_bench.py`) through both hops of its own copy of the backlog.
async fn python_relay(bootstrap: &str, id: &str, n: usize) -> Option<f64> {
    let python = std::env::var("AURA_TEST_PYTHON").ok()?;
    let settings = kafka_settings(
        bootstrap,
        &format!("bench-relay-{id}."),
        &format!("bench-relay-{id}"),
    );
    create_topics(&settings, None).await;
    produce_moods(&settings, n).await;
    let topics = TopicNames::from_settings(&settings);
    let topic = |event_type| topics.for_event_type(event_type).expect("topic");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/python/relay_bench.py"
    );
    let output = std::process::Command::new(python)
        .args([
            script,
            &settings.bootstrap_servers,
            &settings.group_id,
            &n.to_string(),
            &topic("user.mood.created"),
            &topic("context.aggregated"),
            &topic("context.vectorized"),
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

/// What one end-to-end run measured.
struct EndToEnd {
    backlog_rate: f64,
    cpu_us_per_event: f64,
    peak_rss_mib: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    points: u64,
}

/// Full chain on the mount: a backlog of `n` events (throughput), then `paced` events at `rate`/s (latency).
async fn end_to_end(settings: &KafkaSettings, n: usize, paced: usize, rate: u64) -> EndToEnd {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut full = Settings::load().expect("settings");
    full.qdrant.path = dir.path().join("qdrant");
    // This measures the mount, not the model (crates/embed/benches/local.rs measures the model).
    if std::env::var("BENCH_EMBEDDING").as_deref() != Ok("local") {
        full.embedding.provider = aura_runtime::settings::EmbeddingProvider::Hash;
    }
    let ctx = aura_cli::handler_context(
        &full,
        if env_usize("BENCH_ON_FLUSH", 0) == 1 {
            Durability::OnFlush
        } else {
            Durability::EveryWrite
        },
    )
    .await
    .expect("store");
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let sent = Arc::new(Mutex::new(HashMap::new()));
    let ctx = HandlerContext {
        store: Arc::new(Layered::new(
            ctx.store.clone(),
            DurablyTimed {
                sent: sent.clone(),
                latencies: latencies.clone(),
            },
        )),
        ..ctx
    };
    let first = Arc::new(std::sync::OnceLock::new());
    let registry = Arc::new(
        Registry::new()
            .with(FirstMood {
                started: first.clone(),
            })
            .with(ContextAggregated)
            .with(Timed { sent }),
    );
    let publisher = produce_moods(settings, n).await;
    let dispatcher = Dispatcher::new(registry.clone(), ctx.clone(), Arc::new(publisher.clone()));
    reset_peak_rss();
    let (stop, task) = spawn_consumer(settings.clone(), registry, dispatcher, publisher);
    let points = || latencies.lock().unwrap_or_else(|p| p.into_inner()).len();
    while points() < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // From the first mood event handled to the last point: all three hops of the whole backlog.
    let (started, cpu) = *first.get().expect("a mood event was handled");
    let backlog = started.elapsed();
    let cpu = aura_testkit::cpu_seconds() - cpu;
    latencies.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let producer = KafkaPublisher::new(settings).expect("producer");
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let mut sends = futures::stream::FuturesUnordered::new();
    for i in 0..paced {
        ticker.tick().await;
        let producer = producer.clone();
        // Sent at the pace whatever the broker's ack latency (a producer does not wait for one event's ack before
        // sending the next).
        sends.push(tokio::spawn(async move {
            aura_runtime::publish_event(&producer, &mood(n + i, now_us()))
                .await
                .expect("produce")
        }));
    }
    while futures::StreamExt::next(&mut sends).await.is_some() {}
    while points() < paced {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let peak_rss_mib = peak_rss_mib();
    let mut sorted = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    sorted.sort_by(f64::total_cmp);
    let _ = stop.send(());
    task.await.expect("join").expect("consumer");
    EndToEnd {
        backlog_rate: n as f64 / backlog.as_secs_f64(),
        cpu_us_per_event: cpu * 1e6 / n as f64,
        peak_rss_mib,
        p50_ms: percentile(&sorted, 0.5),
        p99_ms: percentile(&sorted, 0.99),
        max_ms: sorted.last().copied().unwrap_or(f64::NAN),
        points: ctx.store.count(None).await.expect("count"),
    }
}

/// Creates this run's topics (all six, with their dead-letter topics) on `cluster`'s broker.
async fn create_topics(
    settings: &KafkaSettings,
    mock: Option<&MockCluster<'static, DefaultProducerContext>>,
) {
    let names = TopicNames::from_settings(settings).all();
    let partitions = env_usize("BENCH_PARTITIONS", 3) as i32;
    match mock {
        Some(cluster) => {
            for name in &names {
                cluster
                    .create_topic(name, partitions, 1)
                    .expect("mock topic");
            }
        }
        None => {
            aura_kafka::create_topics(settings, &names, partitions, 1)
                .await
                .expect("topics");
        }
    }
}

/// Dispatch overhead: raw loop vs the mount with a no-op handler, live from the broker.
async fn dispatch(
    bootstrap: &str,
    id: &str,
    mock: Option<&MockCluster<'static, DefaultProducerContext>>,
) {
    let n = env_usize("BENCH_MESSAGES", 50_000);
    let settings = kafka_settings(bootstrap, &format!("bench-{id}."), &format!("bench-{id}"));
    create_topics(&settings, mock).await;
    let topic = TopicNames::from_settings(&settings)
        .for_event_type(NOOP_TYPE)
        .expect("topic");
    produce_noop(&settings, &topic, n).await;
    println!(
        "  {n} records on {topic} ({} partitions, lz4, 64 keys)",
        env_usize("BENCH_PARTITIONS", 3)
    );
    let raw = raw_loop(&settings, &topic, n).await;
    let embedded = aura_runtime::testing::embedded();
    let mounted = mounted_loop(&settings, n, embedded.ctx.clone()).await;
    let report = |name: &str, (wall, cpu): (Duration, f64)| {
        let rate = n as f64 / wall.as_secs_f64();
        println!(
            "  {name:<44} {rate:>9.0} msg/s, {:>5.2} us CPU/msg",
            cpu * 1e6 / n as f64
        );
        rate
    };
    let raw_rate = report("raw rdkafka loop (store offset per message):", raw);
    let mounted_rate = report("run_consumer, no-op handler:", mounted);
    println!(
        "  run_consumer vs raw: {:.0}% of its rate",
        100.0 * mounted_rate / raw_rate
    );
}

/// End to end on one broker; with `python`, the Python poll loop reads the same input topic afterwards.
async fn chain(
    bootstrap: &str,
    id: &str,
    mock: Option<&MockCluster<'static, DefaultProducerContext>>,
    python: bool,
) {
    let n = env_usize("BENCH_E2E_EVENTS", 5_000);
    let paced = env_usize("BENCH_PACED_EVENTS", 2_000);
    let rate = env_usize("BENCH_PACED_RATE", 100) as u64;
    let settings = kafka_settings(
        bootstrap,
        &format!("bench-e2e-{id}."),
        &format!("bench-e2e-{id}"),
    );
    create_topics(&settings, mock).await;
    let run = end_to_end(&settings, n, paced, rate).await;
    println!(
        "  end to end, backlog of {n} mood events through 3 handlers into the store: {:.0} events/s, {:.0} us CPU \
         per event, peak RSS {:.0} MiB",
        run.backlog_rate, run.cpu_us_per_event, run.peak_rss_mib
    );
    println!(
        "  end to end, paced {rate} events/s ({paced} events), produce -> point: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        run.p50_ms, run.p99_ms, run.max_ms
    );
    println!(
        "  points in the store: {} (expected {})",
        run.points,
        n + paced
    );
    if python {
        match python_relay(bootstrap, id, n).await {
            Some(relay) => println!(
                "  naive python relay (confluent-kafka, both hops, flush + commit every 100) on its own copy of the \
                 backlog: {relay:.0} events/s; ours / relay = {:.2}x",
                run.backlog_rate / relay
            ),
            None => println!("  naive python relay: skipped (AURA_TEST_PYTHON not set)"),
        }
        let input = TopicNames::from_settings(&settings)
            .for_event_type("user.mood.created")
            .expect("topic");
        match python_loop(&settings, &input, n) {
            Some(py) => println!(
                "  python confluent-kafka poll loop on the same input topic: {py:.0} msg/s; end to end / python = {:.3}",
                run.backlog_rate / py
            ),
            None => {
                println!("  python confluent-kafka poll loop: skipped (AURA_TEST_PYTHON not set)")
            }
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let id = format!("{:x}", now_us());
        if env_usize("BENCH_MOCK", 1) == 1 {
            let cluster = MockCluster::new(1).expect("mock cluster");
            let bootstrap = cluster.bootstrap_servers();
            println!("librdkafka mock cluster (in-process) at {bootstrap}:");
            dispatch(&bootstrap, &format!("mock-{id}"), Some(&cluster)).await;
            chain(&bootstrap, &format!("mock-{id}"), Some(&cluster), false).await;
        }
        match std::env::var("AURA_TEST_KAFKA") {
            Ok(bootstrap) => {
                println!("Apache Kafka at {bootstrap}:");
                chain(&bootstrap, &format!("kafka-{id}"), None, true).await;
            }
            Err(_) => println!(
                "Apache Kafka: skipped (AURA_TEST_KAFKA not set; scripts/bench-kafka.sh starts it)"
            ),
        }
    });
}
