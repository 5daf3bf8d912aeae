//! `CeleryWorker` in-process against the machine's Redis (database 12–15, one per test): retries, retries
//! exhausted, time limits, and scheduled (eta) tasks not blocking due ones. Handlers here are test doubles; the
//! real handlers with Python Celery are tested in `crates/cli/tests/celery.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aura_celery::protocol::{TaskOptions, build_task};
use aura_celery::transport::{Patience, priority_key};
use aura_celery::{Broker, CeleryPublisher, CeleryWorker, ResultBackend, WorkerOptions};
use aura_runtime::events::Event;
use aura_runtime::{Dispatcher, Handler, HandlerContext, HandlerError, Registry, RetryPolicy};
use chrono::Utc;
use serde_json::{Map, Value, json};

const MOOD_TASK: &str = "vectosvc.worker.tasks.process_mood_created";

/// Fails transiently `failures` times, sleeps `sleep` each call, then succeeds; counts calls.
struct Flaky {
    calls: Arc<AtomicU32>,
    failures: u32,
    sleep: Duration,
}

#[async_trait]
impl Handler for Flaky {
    fn name(&self) -> &'static str {
        "mood_created"
    }
    fn event_types(&self) -> &'static [&'static str] {
        &["user.mood.created"]
    }
    async fn handle(&self, _: &Event, _: &HandlerContext) -> Result<Vec<Event>, HandlerError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(self.sleep).await;
        if call <= self.failures {
            return Err(HandlerError::Transient(format!(
                "store unavailable (call {call})"
            )));
        }
        Ok(Vec::new())
    }
}

struct Harness {
    url: String,
    broker: Arc<Broker>,
    results: Arc<ResultBackend>,
    calls: Arc<AtomicU32>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    worker: Option<
        tokio::task::JoinHandle<Result<aura_celery::WorkerReport, aura_celery::TransportError>>,
    >,
    _embedded: aura_runtime::testing::Embedded,
}

impl Harness {
    async fn start(
        db: u32,
        failures: u32,
        sleep: Duration,
        configure: impl FnOnce(&mut WorkerOptions),
    ) -> Self {
        let url = format!("redis://127.0.0.1:6379/{db}");
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("FLUSHDB").query_async(&mut conn).await.unwrap();
        let broker = Arc::new(Broker::open(&url, url.clone(), Duration::from_secs(3600)).unwrap());
        let results =
            Arc::new(ResultBackend::open(&url, url.clone(), Duration::from_secs(600)).unwrap());
        let calls = Arc::new(AtomicU32::new(0));
        let registry = Arc::new(Registry::new().with(Flaky {
            calls: calls.clone(),
            failures,
            sleep,
        }));
        let embedded = aura_runtime::testing::embedded();
        let publisher = Arc::new(CeleryPublisher::new(broker.clone(), "celery"));
        let dispatcher = Dispatcher::new(registry.clone(), embedded.ctx.clone(), publisher);
        let mut options = WorkerOptions::new(vec!["celery".into()], 2, format!("t{db}@test"));
        options.retry = RetryPolicy {
            max_attempts: Some(4),
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
            jitter: 0.0,
        };
        configure(&mut options);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let worker = tokio::spawn(
            CeleryWorker::new(
                broker.clone(),
                results.clone(),
                registry,
                dispatcher,
                options,
            )
            .run(async {
                let _ = stopped.await;
            }),
        );
        Self {
            url,
            broker,
            results,
            calls,
            stop: Some(stop),
            worker: Some(worker),
            _embedded: embedded,
        }
    }

    async fn send(&self, configure: impl FnOnce(&mut TaskOptions)) -> String {
        let mut event = Event::new("user.mood.created", Some("u1".into()), Some("t1".into()));
        event.set_field("data", json!({"mood_score": 5}));
        let mut options = TaskOptions {
            queue: "celery".into(),
            ..TaskOptions::default()
        };
        configure(&mut options);
        let task = build_task(MOOD_TASK, &[&event], &Map::new(), &options);
        self.broker
            .push(
                "celery",
                task.priority,
                &task.envelope.to_vec(),
                Patience::Until(Duration::from_secs(5)),
            )
            .await
            .unwrap();
        task.id
    }

    async fn final_result(&self, id: &str, timeout: Duration) -> Value {
        let started = Instant::now();
        loop {
            if let Some(meta) = self.results.get(id).await.unwrap()
                && matches!(meta["status"].as_str(), Some("SUCCESS" | "FAILURE"))
            {
                return meta;
            }
            assert!(
                started.elapsed() < timeout,
                "no final result for {id} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn dead_letters(&self) -> Vec<Value> {
        let client = redis::Client::open(self.url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let items: Vec<String> = redis::cmd("LRANGE")
            .arg("celery.dlq")
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        items
            .iter()
            .map(|i| serde_json::from_str(i).unwrap())
            .collect()
    }

    async fn stop(mut self) -> aura_celery::WorkerReport {
        let _ = self.stop.take().unwrap().send(());
        self.worker.take().unwrap().await.unwrap().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_is_retried_with_an_eta_until_it_succeeds() {
    let harness = Harness::start(12, 2, Duration::ZERO, |_| {}).await;
    let id = harness.send(|_| {}).await;
    let meta = harness.final_result(&id, Duration::from_secs(20)).await;
    assert_eq!(meta["status"], "SUCCESS", "{meta}");
    assert_eq!(harness.calls.load(Ordering::SeqCst), 3);
    assert!(harness.dead_letters().await.is_empty());
    let report = harness.stop().await;
    assert_eq!((report.retried, report.succeeded, report.failed), (2, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_exhausted_end_in_failure_and_a_dead_letter() {
    let harness = Harness::start(13, u32::MAX, Duration::ZERO, |options| {
        options.retry.max_attempts = Some(3);
    })
    .await;
    let id = harness.send(|_| {}).await;
    let meta = harness.final_result(&id, Duration::from_secs(20)).await;
    assert_eq!(meta["status"], "FAILURE");
    assert_eq!(meta["result"]["exc_type"], "TransientHandlerError");
    assert_eq!(
        harness.calls.load(Ordering::SeqCst),
        3,
        "1 attempt + 2 retries"
    );
    let dead = harness.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["task_id"], json!(id));
    assert!(
        dead[0]["error"]
            .as_str()
            .unwrap()
            .contains("store unavailable"),
        "{}",
        dead[0]
    );
    let retried =
        aura_celery::protocol::TaskMessage::parse(dead[0]["message"].as_str().unwrap().as_bytes())
            .unwrap();
    assert_eq!(
        retried.retries, 2,
        "the dead letter is the last retry's message"
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_over_its_time_limit_fails_with_time_limit_exceeded() {
    let harness = Harness::start(14, 0, Duration::from_secs(30), |_| {}).await;
    let started = Instant::now();
    let id = harness
        .send(|options| options.time_limit = (Some(0.5), None))
        .await;
    let meta = harness.final_result(&id, Duration::from_secs(10)).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(meta["status"], "FAILURE");
    assert_eq!(meta["result"]["exc_type"], "TimeLimitExceeded");
    assert_eq!(harness.dead_letters().await.len(), 1);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_tasks_do_not_hold_back_due_ones_and_go_back_on_shutdown() {
    let harness = Harness::start(15, 0, Duration::ZERO, |options| {
        options.concurrency = 1;
        options.prefetch_multiplier = 1;
    })
    .await;
    let later = Utc::now() + chrono::Duration::seconds(3600);
    let mut scheduled = Vec::new();
    for _ in 0..3 {
        scheduled.push(harness.send(|options| options.eta = Some(later)).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let due = harness.send(|_| {}).await;
    let meta = harness.final_result(&due, Duration::from_secs(10)).await;
    assert_eq!(meta["status"], "SUCCESS");
    for id in &scheduled {
        assert!(
            harness.results.get(id).await.unwrap().is_none(),
            "scheduled task ran early"
        );
    }
    let url = harness.url.clone();
    let report = harness.stop().await;
    assert_eq!(report.requeued, 3, "{report:?}");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (queued, unacked): (i64, i64) = redis::pipe()
        .cmd("LLEN")
        .arg(priority_key("celery", 0))
        .cmd("HLEN")
        .arg("unacked")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((queued, unacked), (3, 0));
}
