//! `CeleryWorker` in-process, each test on a `redis-server` of its own (never the machine's shared Redis): retries,
//! retries exhausted, time limits, scheduled (eta) tasks not blocking due ones, panics, expiry during the eta wait,
//! and the restorer past unreadable entries. Handlers here are test doubles; the real handlers with Python Celery are
//! tested in `crates/cli/tests/celery.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aura_celery::protocol::{TaskOptions, build_task};
use aura_celery::transport::{Patience, priority_key};
use aura_celery::{Broker, CeleryPublisher, CeleryWorker, ResultBackend, WorkerOptions};
use aura_runtime::events::Event;
use aura_runtime::{Dispatcher, Handler, HandlerContext, HandlerError, Registry, RetryPolicy};
use aura_testkit::RedisServer;
use chrono::Utc;
use serde_json::{Map, Value, json};

const MOOD_TASK: &str = "vectosvc.worker.tasks.process_mood_created";

/// Fails transiently `failures` times, sleeps `sleep` each call, then succeeds; counts calls. An event whose
/// `data.panic` is true makes it panic (a bug in a handler).
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
    async fn handle(&self, event: &Event, _: &HandlerContext) -> Result<Vec<Event>, HandlerError> {
        if event.field("data").and_then(|d| d.get("panic")) == Some(&json!(true)) {
            panic!("handler bug: index out of range");
        }
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
    /// Taken by a test that looks at Redis after the worker stopped.
    server: Option<RedisServer>,
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
        failures: u32,
        sleep: Duration,
        configure: impl FnOnce(&mut WorkerOptions),
    ) -> Self {
        let server = RedisServer::start();
        let url = server.url();
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
        let mut options = WorkerOptions::new(vec!["celery".into()], 2, "t@test");
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
            server: Some(server),
            broker,
            results,
            calls,
            stop: Some(stop),
            worker: Some(worker),
            _embedded: embedded,
        }
    }

    async fn send(&self, configure: impl FnOnce(&mut TaskOptions)) -> String {
        self.send_data(json!({"mood_score": 5}), configure).await
    }

    async fn send_data(&self, data: Value, configure: impl FnOnce(&mut TaskOptions)) -> String {
        let mut event = Event::new("user.mood.created", Some("u1".into()), Some("t1".into()));
        event.set_field("data", data);
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
                && matches!(
                    meta["status"].as_str(),
                    Some("SUCCESS" | "FAILURE" | "REVOKED")
                )
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
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server: scripts/test.sh runs it")]
async fn a_transient_failure_is_retried_with_an_eta_until_it_succeeds() {
    let harness = Harness::start(2, Duration::ZERO, |_| {}).await;
    let id = harness.send(|_| {}).await;
    let meta = harness.final_result(&id, Duration::from_secs(20)).await;
    assert_eq!(meta["status"], "SUCCESS", "{meta}");
    assert_eq!(harness.calls.load(Ordering::SeqCst), 3);
    assert!(harness.dead_letters().await.is_empty());
    let report = harness.stop().await;
    assert_eq!((report.retried, report.succeeded, report.failed), (2, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server: scripts/test.sh runs it")]
async fn retries_exhausted_end_in_failure_and_a_dead_letter() {
    let harness = Harness::start(u32::MAX, Duration::ZERO, |options| {
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
    // The FAILURE result is written before the acknowledgement that pushes the dead letter: wait for it.
    let started = Instant::now();
    let dead = loop {
        let dead = harness.dead_letters().await;
        if !dead.is_empty() || started.elapsed() > Duration::from_secs(20) {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
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
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server: scripts/test.sh runs it")]
async fn a_task_over_its_time_limit_fails_with_time_limit_exceeded() {
    let harness = Harness::start(0, Duration::from_secs(30), |_| {}).await;
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
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server: scripts/test.sh runs it")]
async fn scheduled_tasks_do_not_hold_back_due_ones_and_go_back_on_shutdown() {
    let mut harness = Harness::start(0, Duration::ZERO, |options| {
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
    let _server = harness.server.take();
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

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A panic inside a task ends it as a failure with a dead letter (not a silent loss that the visibility-timeout
/// restore would bring back forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server: scripts/test.sh runs it")]
async fn a_panicking_handler_fails_its_task_with_a_dead_letter_and_the_worker_goes_on() {
    let harness = Harness::start(0, Duration::ZERO, |_| {}).await;
    let bad = harness.send_data(json!({"panic": true}), |_| {}).await;
    let meta = harness.final_result(&bad, Duration::from_secs(20)).await;
    assert_eq!(meta["status"], "FAILURE", "{meta}");
    assert_eq!(meta["result"]["exc_type"], "TaskPanicked");
    let good = harness.send(|_| {}).await;
    let meta = harness.final_result(&good, Duration::from_secs(20)).await;
    assert_eq!(meta["status"], "SUCCESS");
    let dead = harness.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["task_id"], json!(bad));
    assert!(
        dead[0]["error"]
            .as_str()
            .unwrap()
            .contains("index out of range")
    );
    let mut conn = conn(&harness.url).await;
    let unacked: i64 = redis::cmd("HLEN")
        .arg("unacked")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        unacked, 0,
        "the panicked task is acknowledged, not left to be restored"
    );
    let report = harness.stop().await;
    assert_eq!((report.failed, report.succeeded), (1, 1), "{report:?}");
}

/// `expires` is checked after the eta wait too: a task that expired meanwhile is revoked, not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server: scripts/test.sh runs it")]
async fn a_task_that_expires_while_it_waits_for_its_eta_is_revoked_not_run() {
    let harness = Harness::start(0, Duration::ZERO, |_| {}).await;
    let now = Utc::now();
    let id = harness
        .send(|options| {
            options.eta = Some(now + chrono::Duration::milliseconds(1500));
            options.expires = Some(now + chrono::Duration::milliseconds(700));
        })
        .await;
    let meta = harness.final_result(&id, Duration::from_secs(20)).await;
    assert_eq!(meta["status"], "REVOKED", "{meta}");
    assert_eq!(harness.calls.load(Ordering::SeqCst), 0, "the handler ran");
    let report = harness.stop().await;
    assert_eq!(report.revoked, 1);
}

/// The restorer reads past unreadable `unacked` entries (left in place for a person to look at): a thousand of them
/// do not hide the readable entries behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server: scripts/test.sh runs it")]
async fn the_restorer_is_not_stalled_by_a_thousand_unreadable_unacked_entries() {
    let server = RedisServer::start();
    let broker = Broker::open(&server.url(), server.url(), Duration::from_secs(60)).unwrap();
    let mut conn = conn(&server.url()).await;
    let old = aura_celery::transport::now_secs() - 3600.0;
    let mut pipe = redis::pipe();
    for n in 0..1200 {
        let tag = format!("garbage-{n:04}");
        pipe.zadd("unacked_index", &tag, old - 10.0).ignore();
        pipe.hset(
            "unacked",
            &tag,
            "this is not [envelope, exchange, routing_key]",
        )
        .ignore();
    }
    let task = build_task(
        MOOD_TASK,
        &[json!({"event_type": "user.mood.created"})],
        &Map::new(),
        &TaskOptions {
            queue: "celery".into(),
            ..TaskOptions::default()
        },
    );
    let tag = task.envelope.delivery_tag().unwrap().to_owned();
    let entry = format!(
        "[{}, \"\", \"celery\"]",
        String::from_utf8(task.envelope.to_vec()).unwrap()
    );
    pipe.zadd("unacked_index", &tag, old).ignore();
    pipe.hset("unacked", &tag, entry).ignore();
    let _: () = pipe.query_async(&mut conn).await.unwrap();

    assert_eq!(broker.restore_visible().await.unwrap(), 1);
    let queued: Vec<String> = redis::cmd("LRANGE")
        .arg("celery")
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(queued.len(), 1);
    assert!(queued[0].contains(&task.id));
    let left: i64 = redis::cmd("HLEN")
        .arg("unacked")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        left, 1200,
        "unreadable entries stay for a person to look at"
    );
}
