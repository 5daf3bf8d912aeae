//! The Celery worker: takes task messages from Redis, runs their handlers, and acknowledges like an `acks_late`
//! Celery worker — only after the handler succeeded, its outputs were staged and its result was stored.
//!
//! Shape: one fetch loop keeps up to `concurrency × prefetch_multiplier` messages taken (each one registered in
//! kombu's `unacked` hash, so a crash leaves it for any worker to restore); every message gets its own tokio task
//! that waits for its `eta`, then for one of `concurrency` slots, then runs the handler under the message's time
//! limit. Finished tasks go to one committer, which writes them in batches: the results (`SETEX` + `PUBLISH`) in
//! one pipeline to the result backend, then one `MULTI` on the broker with every produced task, retry message,
//! dead letter and parked task, and the `ZREM`/`HDEL` that acknowledge the inputs; then one `task.multi` event
//! message. Three round trips for a whole batch, whatever its size.
//!
//! Shutdown (`shutdown` resolves): stop fetching; messages not started (waiting for an eta or a slot) go back to
//! the head of their queue; running handlers get `grace` to finish and commit; what still runs after that is put
//! back too. Every message ends acknowledged, committed or requeued — or, if Redis is gone, in `unacked`, from
//! which a later worker restores it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aura_runtime::events::{Event, routing};
use aura_runtime::{Dispatcher, Failure, HandlerError, Outcome, Registry, RetryPolicy, Route};
use chrono::Utc;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::control::{ActiveTask, ControlState, serve_control};
use crate::events::{EventSender, HEARTBEAT_SECS, WorkerIdentity};
use crate::protocol::{Envelope, MessageError, TaskMessage, follow_ups, iso};
use crate::publisher::TaskScope;
use crate::pyjson;
use crate::results::{self, ResultBackend, TaskResult, exception};
use crate::transport::{
    Broker, Fetched, Patience, TransportError, UNACKED, UNACKED_INDEX, dead_letter_key, parked_key,
    priority_key,
};

/// How a worker runs (`CELERY_*` settings).
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub queues: Vec<String>,
    /// Handlers running at once (`CELERY_CONCURRENCY`).
    pub concurrency: usize,
    /// Messages taken per slot (Celery's `worker_prefetch_multiplier`, default 4).
    pub prefetch_multiplier: usize,
    /// `name@host`: how Flower and `celery inspect` name this worker.
    pub hostname: String,
    /// Celery-style retries of transient failures: `max_attempts` = 1 + max retries; the delay becomes the
    /// retried message's `eta`.
    pub retry: RetryPolicy,
    /// Task events (`task-received`, …) as Celery's `-E`; worker heartbeats are always sent.
    pub send_task_events: bool,
    /// Store `STARTED` before running a task (Celery's `task_track_started`).
    pub track_started: bool,
    /// How long running handlers may take to finish after shutdown starts.
    pub grace: Duration,
    /// How often to look for messages a dead worker left in `unacked` past the visibility timeout.
    pub restore_interval: Duration,
    /// How long one `BRPOP` blocks when the queues are empty.
    pub fetch_block: Duration,
    /// `MAX_EVENT_BYTES`: a message whose event cannot be under it is dead-lettered unread.
    pub max_event_bytes: usize,
}

impl WorkerOptions {
    /// The largest kombu message an event of `max_event_bytes` can arrive in: base64 (4/3) plus the envelope.
    fn max_message_bytes(&self) -> usize {
        self.max_event_bytes.saturating_mul(4) / 3 + 64 * 1024
    }
}

impl WorkerOptions {
    pub fn new(queues: Vec<String>, concurrency: usize, hostname: impl Into<String>) -> Self {
        Self {
            queues,
            concurrency: concurrency.max(1),
            prefetch_multiplier: 4,
            hostname: hostname.into(),
            retry: RetryPolicy {
                max_attempts: Some(4),
                base: Duration::from_secs(60),
                cap: Duration::from_secs(600),
                jitter: 0.2,
            },
            send_task_events: true,
            track_started: false,
            grace: Duration::from_secs(8),
            restore_interval: Duration::from_secs(10),
            fetch_block: Duration::from_secs(1),
            max_event_bytes: aura_runtime::events::limits::Limits::default().max_event_bytes,
        }
    }
}

/// What a worker did, for its exit log and for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WorkerReport {
    pub succeeded: u64,
    pub retried: u64,
    pub failed: u64,
    pub dead_lettered: u64,
    pub parked: u64,
    pub requeued: u64,
    pub revoked: u64,
    pub restored: u64,
    pub unparked: u64,
}

#[derive(Default)]
struct Counters {
    succeeded: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    dead_lettered: AtomicU64,
    parked: AtomicU64,
    requeued: AtomicU64,
    revoked: AtomicU64,
    restored: AtomicU64,
}

/// Everything one finished message needs written, in the order the committer writes it.
struct Commit {
    /// The input to acknowledge (`None`: it never made it into `unacked`).
    tag: Option<String>,
    result: Option<TaskResult>,
    /// `(list, payload)` pushed in the acknowledging `MULTI`: produced tasks, a retry, a dead letter, a parked task.
    pushes: Vec<(String, Vec<u8>)>,
    events: Vec<Value>,
    done: oneshot::Sender<()>,
}

/// The handlers of `registry` mounted on Celery queues.
pub struct CeleryWorker {
    broker: Arc<Broker>,
    results: Arc<ResultBackend>,
    registry: Arc<Registry>,
    dispatcher: Dispatcher,
    options: WorkerOptions,
}

struct Shared {
    broker: Arc<Broker>,
    results: Arc<ResultBackend>,
    registry: Arc<Registry>,
    dispatcher: Dispatcher,
    options: WorkerOptions,
    events: Arc<EventSender>,
    control: Arc<ControlState>,
    slots: Arc<Semaphore>,
    /// Shutdown started: start nothing new.
    stopping: CancellationToken,
    /// Grace is over: put back what still runs.
    abandon: CancellationToken,
    commits: mpsc::Sender<Commit>,
    counters: Arc<Counters>,
}

impl CeleryWorker {
    pub fn new(
        broker: Arc<Broker>,
        results: Arc<ResultBackend>,
        registry: Arc<Registry>,
        dispatcher: Dispatcher,
        options: WorkerOptions,
    ) -> Self {
        Self {
            broker,
            results,
            registry,
            dispatcher,
            options,
        }
    }

    /// Runs until `shutdown` resolves, then drains (see the module docs).
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<WorkerReport, TransportError> {
        let options = self.options;
        let stopping = CancellationToken::new();
        let broker = self.broker;
        tokio::pin!(shutdown);
        tokio::select! {
            ready = broker.ping(Patience::Forever) => ready?,
            _ = &mut shutdown => return Ok(WorkerReport::default()),
        }
        for queue in &options.queues {
            broker.declare_queue(queue).await?;
        }
        let mut unparked = 0;
        for queue in &options.queues {
            for handler in self.registry.enabled() {
                unparked += broker.unpark(queue, handler).await?;
            }
        }
        if unparked > 0 {
            tracing::info!(
                unparked,
                "moved parked tasks of enabled handlers back onto their queues"
            );
        }
        let restored = broker.restore_visible().await.unwrap_or_else(|error| {
            tracing::warn!(%error, "restoring expired unacked messages at start-up");
            0
        });

        let identity = WorkerIdentity::new(options.hostname.clone());
        let events = Arc::new(EventSender::new(
            broker.link().clone(),
            identity,
            options.send_task_events,
        ));
        let registered: Vec<String> = self
            .registry
            .enabled_event_types()
            .iter()
            .filter_map(|t| routing::task_for(t))
            .map(str::to_owned)
            .collect();
        let prefetch = options.concurrency * options.prefetch_multiplier.max(1);
        let control = Arc::new(ControlState::new(
            options.queues.clone(),
            registered,
            options.concurrency,
            prefetch,
        ));
        let (commit_tx, commit_rx) = mpsc::channel(4 * prefetch.max(64));
        let shared = Arc::new(Shared {
            broker: broker.clone(),
            results: self.results,
            registry: self.registry,
            dispatcher: self.dispatcher,
            options: options.clone(),
            events: events.clone(),
            control: control.clone(),
            slots: Arc::new(Semaphore::new(options.concurrency)),
            stopping: stopping.clone(),
            abandon: CancellationToken::new(),
            commits: commit_tx,
            counters: Arc::new(Counters::default()),
        });
        shared
            .counters
            .restored
            .fetch_add(restored as u64, Ordering::Relaxed);

        let background = CancellationToken::new();
        let committer = tokio::spawn(run_committer(
            broker.clone(),
            shared.results.clone(),
            events.clone(),
            commit_rx,
        ));
        let mut helpers = JoinSet::new();
        helpers.spawn(serve_control(
            broker.link().clone(),
            events.clone(),
            control,
            background.clone(),
        ));
        helpers.spawn(heartbeats(events.clone(), background.clone()));
        helpers.spawn(restorer(
            broker.clone(),
            shared.counters.clone(),
            options.restore_interval,
            background.clone(),
        ));
        if let Err(error) = events.send_worker_event("worker-online").await {
            tracing::warn!(%error, "worker-online event");
        }
        tracing::info!(hostname = %options.hostname, queues = %options.queues.join(","),
            concurrency = options.concurrency, prefetch, "celery worker ready");

        let mut tasks = JoinSet::new();
        let prefetch_slots = Arc::new(Semaphore::new(prefetch));
        loop {
            let first = tokio::select! {
                permit = prefetch_slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                _ = &mut shutdown => break,
            };
            let mut permits = vec![first];
            while permits.len() < 256 {
                match prefetch_slots.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            // Not raced against shutdown: a BRPOP cancelled after the server popped would lose the message. It
            // returns within `fetch_block`, and an unreachable Redis within the fetch's patience.
            let fetched = broker
                .fetch(&options.queues, permits.len(), options.fetch_block)
                .await;
            match fetched {
                Ok(messages) => {
                    for message in messages {
                        let permit = permits.pop();
                        let shared = shared.clone();
                        tasks.spawn(async move { process(&shared, message, permit).await });
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "fetching from the broker failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            while tasks.try_join_next().is_some() {}
            if futures::FutureExt::now_or_never(&mut shutdown).is_some() {
                break;
            }
        }

        tracing::info!(
            in_flight = tasks.len(),
            grace_s = options.grace.as_secs_f64(),
            "shutting down: finishing in-flight tasks"
        );
        stopping.cancel();
        let drained = tokio::time::timeout(options.grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                still_running = tasks.len(),
                "grace period over: putting unfinished tasks back on their queues"
            );
            shared.abandon.cancel();
            while tasks.join_next().await.is_some() {}
        }
        let counters = &shared.counters;
        let report = WorkerReport {
            succeeded: counters.succeeded.load(Ordering::Relaxed),
            retried: counters.retried.load(Ordering::Relaxed),
            failed: counters.failed.load(Ordering::Relaxed),
            dead_lettered: counters.dead_lettered.load(Ordering::Relaxed),
            parked: counters.parked.load(Ordering::Relaxed),
            requeued: counters.requeued.load(Ordering::Relaxed),
            revoked: counters.revoked.load(Ordering::Relaxed),
            restored: counters.restored.load(Ordering::Relaxed),
            unparked: unparked as u64,
        };
        drop(shared);
        let _ = committer.await;
        background.cancel();
        while helpers.join_next().await.is_some() {}
        if let Err(error) = events.send_worker_event("worker-offline").await {
            tracing::warn!(%error, "worker-offline event");
        }
        tracing::info!(?report, "celery worker stopped");
        Ok(report)
    }
}

async fn heartbeats(events: Arc<EventSender>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(HEARTBEAT_SECS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        if let Err(error) = events.send_worker_event("worker-heartbeat").await {
            tracing::debug!(%error, "heartbeat not sent");
        }
    }
}

async fn restorer(
    broker: Arc<Broker>,
    counters: Arc<Counters>,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
        match broker.restore_visible().await {
            Ok(0) => {}
            Ok(n) => {
                counters.restored.fetch_add(n as u64, Ordering::Relaxed);
                tracing::warn!(
                    restored = n,
                    "restored messages left unacknowledged past the visibility timeout"
                );
            }
            Err(error) => tracing::warn!(%error, "visibility restore failed"),
        }
    }
}

/// How one message ended, before it is written.
enum Verdict {
    Success {
        result: Value,
        staged: Vec<crate::protocol::OutgoingTask>,
        runtime: f64,
    },
    Retry {
        error: String,
        exception: Value,
        eta: chrono::DateTime<Utc>,
    },
    Fail {
        handler: Option<String>,
        error: String,
        exception: Value,
    },
    Park {
        handler: &'static str,
    },
    Revoked {
        expired: bool,
    },
    Requeue,
}

/// `prefetch_slot` is this message's place in the prefetch bound; it is given back early while the message waits
/// for its `eta`, so scheduled tasks never stop the worker from taking due ones (Celery raises its prefetch count for
/// the same reason).
async fn process(shared: &Shared, fetched: Fetched, prefetch_slot: Option<OwnedSemaphorePermit>) {
    let Some(tag) = fetched.tag.clone() else {
        // Not an envelope we could read: it was not registered in `unacked`, so dead-letter it now.
        let reason = match Envelope::from_slice(&fetched.raw) {
            Err(error) => error.to_string(),
            Ok(_) => "envelope has no properties.delivery_tag".to_owned(),
        };
        let entry = dead_letter_entry(&fetched, None, None, &reason, None);
        tracing::error!(queue = %fetched.queue, %reason, "unreadable message dead-lettered");
        shared
            .counters
            .dead_lettered
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!("aura360_dead_letters_total", "backend" => "celery", "handler" => "decode").increment(1);
        commit(
            shared,
            None,
            None,
            vec![(dead_letter_key(&fetched.queue), entry)],
            Vec::new(),
        )
        .await;
        return;
    };
    let limit = shared.options.max_message_bytes();
    let parsed = if fetched.raw.len() > limit {
        let envelope = Envelope::from_slice(&fetched.raw).ok().map(Box::new);
        Err((
            envelope,
            MessageError::TooLarge {
                bytes: fetched.raw.len(),
                limit,
            },
        ))
    } else {
        TaskMessage::parse(&fetched.raw)
    };
    let mut message = match parsed {
        Ok(message) => message,
        Err((envelope, error)) => {
            let task_id = envelope.as_ref().and_then(|e| {
                e.header_str("id")
                    .or(e.property_str("correlation_id"))
                    .map(str::to_owned)
            });
            let task = envelope
                .as_ref()
                .and_then(|e| e.header_str("task").map(str::to_owned));
            dead_letter_unreadable(shared, &fetched, &tag, task_id, task, &error).await;
            return;
        }
    };
    let mut events: Vec<Value> = shared.events.task_received(&message).into_iter().collect();
    // The event is moved out of the body, not copied: nothing after the handler needs the arguments.
    let args = std::mem::take(&mut message.body.args);
    let verdict = decide(shared, &fetched, &message, args, prefetch_slot, &mut events).await;
    write(shared, &fetched, &tag, &message, verdict, events).await;
}

/// Runs the message (or decides not to) and says how it ended.
async fn decide(
    shared: &Shared,
    fetched: &Fetched,
    message: &TaskMessage,
    args: Vec<Value>,
    prefetch_slot: Option<OwnedSemaphorePermit>,
    events: &mut Vec<Value>,
) -> Verdict {
    if shared.control.is_revoked(&message.id) {
        return Verdict::Revoked { expired: false };
    }
    if message.expires.is_some_and(|expires| expires <= Utc::now()) {
        return Verdict::Revoked { expired: true };
    }
    let Some(expected_type) = routing::event_type_for_task(&message.task) else {
        return Verdict::Fail {
            handler: None,
            error: format!(
                "Task of kind '{}' is not registered with this worker",
                message.task
            ),
            exception: exception("NotRegistered", "celery.exceptions", &message.task),
        };
    };
    if let Some(eta) = message.eta {
        let wait = (eta - Utc::now()).to_std().unwrap_or_default();
        if !wait.is_zero() {
            drop(prefetch_slot);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shared.stopping.cancelled() => return Verdict::Requeue,
            }
        }
    }
    let _slot = tokio::select! {
        slot = shared.slots.clone().acquire_owned() => match slot {
            Ok(slot) => slot,
            Err(_) => return Verdict::Requeue,
        },
        _ = shared.stopping.cancelled() => return Verdict::Requeue,
    };
    let event = match decode_event(message, args, expected_type) {
        Ok(event) => event,
        Err(error) => {
            return Verdict::Fail {
                handler: None,
                error: error.clone(),
                exception: exception("InvalidEvent", "aura360.errors", &error),
            };
        }
    };
    let handler = match shared.registry.route(&event.event_type) {
        Route::Disabled(name) => return Verdict::Park { handler: name },
        Route::Unhandled => {
            let error = format!("no handler for event type {}", event.event_type);
            return Verdict::Fail {
                handler: None,
                error: error.clone(),
                exception: exception("NotRegistered", "celery.exceptions", &error),
            };
        }
        Route::Handler(handler) => handler.name(),
    };

    if shared.options.track_started {
        let started = TaskResult {
            task_id: message.id.clone(),
            status: results::STARTED,
            result: json!({"pid": std::process::id(), "hostname": shared.options.hostname}),
            traceback: None,
            children: Vec::new(),
            parent_id: message.parent_id.clone(),
            done: false,
        };
        if let Err(error) = shared
            .results
            .store(&[started], Patience::Until(Duration::from_secs(5)))
            .await
        {
            tracing::warn!(task_id = %message.id, %error, "STARTED state not stored");
        }
    }
    events.extend(shared.events.task_started(&message.id));
    shared
        .control
        .task_started(&message.id, ActiveTask::new(fetched, message));
    shared
        .events
        .counters
        .active
        .fetch_add(1, Ordering::Relaxed);

    let scope = Arc::new(TaskScope::new(
        message.id.clone(),
        message
            .root_id
            .clone()
            .unwrap_or_else(|| message.id.clone()),
    ));
    let started = Instant::now();
    let limit = message.time_limit.or(message.soft_time_limit);
    let run = scope.run(shared.dispatcher.dispatch(&event));
    let outcome = tokio::select! {
        outcome = async {
            match limit {
                Some(seconds) => tokio::time::timeout(Duration::from_secs_f64(seconds), run).await.ok(),
                None => Some(run.await),
            }
        } => outcome,
        _ = shared.abandon.cancelled() => {
            shared.events.counters.active.fetch_sub(1, Ordering::Relaxed);
            shared.control.task_finished(&message.id, &message.task);
            return Verdict::Requeue;
        }
    };
    shared
        .events
        .counters
        .active
        .fetch_sub(1, Ordering::Relaxed);
    shared
        .events
        .counters
        .processed
        .fetch_add(1, Ordering::Relaxed);
    shared.control.task_finished(&message.id, &message.task);
    let runtime = started.elapsed().as_secs_f64();
    match outcome {
        None => {
            let error = format!("TimeLimitExceeded({})", limit.unwrap_or_default());
            Verdict::Fail {
                handler: Some(handler.to_owned()),
                exception: exception(
                    "TimeLimitExceeded",
                    "billiard.exceptions",
                    &limit.unwrap_or_default().to_string(),
                ),
                error,
            }
        }
        Some(Ok(Outcome::Handled { handler, produced })) => Verdict::Success {
            result: json!({"ok": true, "event_id": event.event_id.to_string(), "handler": handler, "produced": produced}),
            staged: scope.take(),
            runtime,
        },
        Some(Ok(Outcome::Disabled { handler })) => Verdict::Park { handler },
        Some(Ok(Outcome::Unhandled)) => {
            let error = format!("no handler for event type {}", event.event_type);
            Verdict::Fail {
                handler: None,
                error: error.clone(),
                exception: exception("NotRegistered", "celery.exceptions", &error),
            }
        }
        Some(Err(Failure { handler, error })) => {
            let text = error.to_string();
            let handler = handler.map(str::to_owned);
            let policy = &shared.options.retry;
            if error.is_transient() && !policy.gives_up_after(message.retries + 1) {
                let delay = policy.delay(message.retries + 1);
                let eta = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                Verdict::Retry {
                    exception: exception("TransientHandlerError", "aura360.errors", &text),
                    error: text,
                    eta,
                }
            } else {
                let exc_type = match error {
                    HandlerError::Transient(_) => "TransientHandlerError",
                    HandlerError::Permanent(_) => "PermanentHandlerError",
                };
                Verdict::Fail {
                    handler,
                    exception: exception(exc_type, "aura360.errors", &text),
                    error: text,
                }
            }
        }
    }
}

/// The task's single argument, the event, checked against the task it came with.
fn decode_event(
    message: &TaskMessage,
    mut args: Vec<Value>,
    expected_type: &str,
) -> Result<Event, String> {
    let value = match (args.len(), message.body.kwargs.get("event")) {
        (1, _) => args.remove(0),
        (0, Some(event)) => event.clone(),
        (n, _) => {
            return Err(format!(
                "expected args = [event], got {n} positional arguments"
            ));
        }
    };
    let event = Event::from_value(value).map_err(|e| format!("invalid event: {e}"))?;
    let accepted = event.event_type == expected_type
        || (expected_type.starts_with("user.")
            && routing::task_for(&event.event_type) == Some(message.task.as_str()));
    if !accepted {
        return Err(format!(
            "task {} carries events of type {expected_type}, got {}",
            message.task, event.event_type
        ));
    }
    Ok(event)
}

/// Turns a verdict into the writes of one commit (or a requeue) and waits until they are done.
async fn write(
    shared: &Shared,
    fetched: &Fetched,
    tag: &str,
    message: &TaskMessage,
    verdict: Verdict,
    mut events: Vec<Value>,
) {
    let counters = &shared.counters;
    let mut pushes = Vec::new();
    let result = match verdict {
        Verdict::Requeue => {
            counters.requeued.fetch_add(1, Ordering::Relaxed);
            match shared
                .broker
                .requeue(tag, &message.envelope, &fetched.queue)
                .await
            {
                Ok(_) => {
                    tracing::info!(task_id = %message.id, queue = %fetched.queue, "not started; put back on its queue")
                }
                Err(error) => tracing::warn!(task_id = %message.id, %error,
                    "could not put the task back; it stays in unacked and is restored after the visibility timeout"),
            }
            return;
        }
        Verdict::Park { handler } => {
            counters.parked.fetch_add(1, Ordering::Relaxed);
            tracing::info!(task_id = %message.id, handler, "handler disabled: task parked until a worker with it enabled starts");
            pushes.push((parked_key(&fetched.queue, handler), fetched.raw.clone()));
            None
        }
        Verdict::Revoked { expired } => {
            counters.revoked.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(task_id = %message.id, expired, "task revoked; not run");
            events.extend(shared.events.task_revoked(&message.id, expired));
            Some(task_result(
                message,
                results::REVOKED,
                exception(
                    "TaskRevokedError",
                    "celery.exceptions",
                    if expired { "expired" } else { "revoked" },
                ),
                None,
                Vec::new(),
            ))
        }
        Verdict::Success {
            result,
            staged,
            runtime,
        } => {
            counters.succeeded.fetch_add(1, Ordering::Relaxed);
            events.extend(shared.events.task_succeeded(&message.id, &result, runtime));
            let follow_ups = follow_ups(message, &result, &fetched.queue, &shared.options.hostname);
            let children = staged
                .iter()
                .chain(&follow_ups)
                .map(|t| t.id.clone())
                .collect();
            for task in staged.into_iter().chain(follow_ups) {
                pushes.push((
                    priority_key(&task.queue, task.priority),
                    task.envelope.to_vec(),
                ));
            }
            Some(task_result(
                message,
                results::SUCCESS,
                result,
                None,
                children,
            ))
        }
        Verdict::Retry {
            error,
            exception,
            eta,
        } => {
            counters.retried.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(task_id = %message.id, retries = message.retries + 1, eta = %iso(eta), %error, "transient failure; retry scheduled");
            let traceback = format!(
                "Retry in {}s: {error}",
                (eta - Utc::now()).num_seconds().max(0)
            );
            events.extend(shared.events.task_retried(
                &message.id,
                &format!("Retry({error:?})"),
                &traceback,
            ));
            pushes.push((
                priority_key(&fetched.queue, message.envelope.priority()),
                message.retry_envelope(eta).to_vec(),
            ));
            Some(task_result(
                message,
                results::RETRY,
                exception,
                Some(traceback),
                Vec::new(),
            ))
        }
        Verdict::Fail {
            handler,
            error,
            exception,
        } => {
            fail(
                shared,
                fetched,
                Some(message.id.clone()),
                Some(message.task.clone()),
                handler,
                &error,
                &mut pushes,
                &mut events,
            );
            Some(task_result(
                message,
                results::FAILURE,
                exception,
                Some(error),
                Vec::new(),
            ))
        }
    };
    commit(shared, Some(tag.to_owned()), result, pushes, events).await;
}

/// A registered message whose task could not be read: `FAILURE` (when its id is known), dead letter, acknowledge.
async fn dead_letter_unreadable(
    shared: &Shared,
    fetched: &Fetched,
    tag: &str,
    task_id: Option<String>,
    task: Option<String>,
    error: &MessageError,
) {
    let exception = exception_for(error);
    let error = error.to_string();
    let mut pushes = Vec::new();
    let mut events = Vec::new();
    fail(
        shared,
        fetched,
        task_id.clone(),
        task,
        None,
        &error,
        &mut pushes,
        &mut events,
    );
    let result = task_id.map(|task_id| TaskResult {
        task_id,
        status: results::FAILURE,
        result: exception,
        traceback: Some(error),
        children: Vec::new(),
        parent_id: None,
        done: true,
    });
    commit(shared, Some(tag.to_owned()), result, pushes, events).await;
}

#[allow(clippy::too_many_arguments)]
fn fail(
    shared: &Shared,
    fetched: &Fetched,
    task_id: Option<String>,
    task: Option<String>,
    handler: Option<String>,
    error: &str,
    pushes: &mut Vec<(String, Vec<u8>)>,
    events: &mut Vec<Value>,
) {
    shared.counters.failed.fetch_add(1, Ordering::Relaxed);
    shared
        .counters
        .dead_lettered
        .fetch_add(1, Ordering::Relaxed);
    let label = handler.clone().unwrap_or_else(|| "decode".into());
    metrics::counter!("aura360_dead_letters_total", "backend" => "celery", "handler" => label)
        .increment(1);
    tracing::error!(task_id = task_id.as_deref().unwrap_or("-"), task = task.as_deref().unwrap_or("-"),
        queue = %fetched.queue, error, "task failed; dead-lettered");
    if let Some(id) = &task_id {
        events.extend(shared.events.task_failed(id, error, error));
    }
    let entry = dead_letter_entry(
        fetched,
        task_id.as_deref(),
        task.as_deref(),
        error,
        handler.as_deref(),
    );
    pushes.push((dead_letter_key(&fetched.queue), entry));
}

fn task_result(
    message: &TaskMessage,
    status: &'static str,
    result: Value,
    traceback: Option<String>,
    children: Vec<String>,
) -> TaskResult {
    TaskResult {
        task_id: message.id.clone(),
        status,
        result,
        traceback,
        children,
        parent_id: message.parent_id.clone(),
        done: true,
    }
}

/// A `<queue>.dlq` entry: the reason and the original message, unchanged (push `message` back onto the queue to
/// replay it).
fn dead_letter_entry(
    fetched: &Fetched,
    task_id: Option<&str>,
    task: Option<&str>,
    error: &str,
    handler: Option<&str>,
) -> Vec<u8> {
    let mut entry = serde_json::Map::new();
    entry.insert("task_id".into(), json!(task_id));
    entry.insert("task".into(), json!(task));
    entry.insert("queue".into(), json!(fetched.queue));
    entry.insert("handler".into(), json!(handler));
    entry.insert("error".into(), json!(error));
    entry.insert("delivery_tag".into(), json!(fetched.tag));
    entry.insert("failed_at".into(), json!(iso(Utc::now())));
    match std::str::from_utf8(&fetched.raw) {
        Ok(text) => entry.insert("message".into(), json!(text)),
        Err(_) => {
            use base64::Engine as _;
            entry.insert(
                "message_base64".into(),
                json!(base64::engine::general_purpose::STANDARD.encode(&fetched.raw)),
            )
        }
    };
    pyjson::to_vec(&Value::Object(entry))
}

fn exception_for(error: &MessageError) -> Value {
    let kind = match error {
        MessageError::UnsupportedContentType(_) => "ContentDisallowed",
        _ => "DecodeError",
    };
    exception(kind, "aura360.errors", &error.to_string())
}

async fn commit(
    shared: &Shared,
    tag: Option<String>,
    result: Option<TaskResult>,
    pushes: Vec<(String, Vec<u8>)>,
    events: Vec<Value>,
) {
    let (done, written) = oneshot::channel();
    let sent = shared
        .commits
        .send(Commit {
            tag,
            result,
            pushes,
            events,
            done,
        })
        .await;
    if sent.is_ok() {
        let _ = written.await;
    }
}

/// Writes finished messages in batches (see the module docs). Results first: a task is acknowledged only once its
/// result is stored; if the results cannot be stored the batch is left unacknowledged and will run again.
async fn run_committer(
    broker: Arc<Broker>,
    results_backend: Arc<ResultBackend>,
    events_sender: Arc<EventSender>,
    mut commits: mpsc::Receiver<Commit>,
) {
    const BATCH: usize = 512;
    const PATIENCE: Patience = Patience::Until(Duration::from_secs(30));
    let mut batch = Vec::with_capacity(BATCH);
    // Ends when every sender (held by the worker's shared state) is gone and the queue is empty.
    while let Some(first) = commits.recv().await {
        batch.push(first);
        while batch.len() < BATCH {
            match commits.try_recv() {
                Ok(commit) => batch.push(commit),
                Err(_) => break,
            }
        }
        let results: Vec<TaskResult> = batch.iter_mut().filter_map(|c| c.result.take()).collect();
        match results_backend.store(&results, PATIENCE).await {
            Ok(()) => {
                let mut pipe = redis::pipe();
                pipe.atomic();
                let mut tags = Vec::new();
                for commit in &batch {
                    for (list, payload) in &commit.pushes {
                        pipe.lpush(list, payload).ignore();
                    }
                    if let Some(tag) = &commit.tag {
                        tags.push(tag.as_str());
                    }
                }
                if !tags.is_empty() {
                    pipe.zrem(UNACKED_INDEX, &tags).ignore();
                    pipe.hdel(UNACKED, &tags).ignore();
                }
                if let Err(error) = broker
                    .link()
                    .pipe::<()>("acknowledge", PATIENCE, &pipe)
                    .await
                {
                    tracing::error!(%error, tasks = batch.len(),
                        "acknowledging failed; the tasks stay in unacked and run again after the visibility timeout");
                }
            }
            Err(error) => tracing::error!(%error, tasks = batch.len(),
                "storing results failed; leaving the tasks unacknowledged (they run again after the visibility timeout)"),
        }
        let events: Vec<Value> = batch
            .iter_mut()
            .flat_map(|c| std::mem::take(&mut c.events))
            .collect();
        if let Err(error) = events_sender.send_task_events(events).await {
            tracing::debug!(%error, "task events not sent");
        }
        for commit in batch.drain(..) {
            let _ = commit.done.send(());
        }
    }
}
