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

use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use aura_runtime::events::{Event, routing};
use aura_runtime::observe::names;
use aura_runtime::{
    DependencyObserver, Dispatcher, Failure, Fence, HandlerError, Outcome, PauseWatch, Registry,
    RetryPolicy, Route,
};
use chrono::Utc;
use futures::FutureExt as _;
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
    Broker, Fetched, MOVE_IF_PRESENT, Patience, TransportError, UNACKED, UNACKED_INDEX,
    dead_letter_key, parked_key, priority_key, unreadable_key,
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
    /// `CELERY_ETA_MAX_HELD`: scheduled tasks (eta, countdown) held in memory at once; more go to
    /// `<queue>.delayed` in Redis until they are due.
    pub eta_max_held: usize,
    /// kombu's `visibility_timeout`: held messages have their `unacked_index` score refreshed well within it.
    pub visibility_timeout: Duration,
    /// Closed while the worker was paused past half the visibility timeout and has not yet checked which of its
    /// messages another worker restored: the dispatcher and the store it guards write nothing meanwhile, and the
    /// committer drops what was taken over (see [`Paused`]).
    pub fence: Fence,
}

impl WorkerOptions {
    /// The largest kombu message an event of `max_event_bytes` can arrive in: base64 (4/3) plus the envelope.
    fn max_message_bytes(&self) -> usize {
        self.max_event_bytes.saturating_mul(4) / 3 + 64 * 1024
    }

    /// How often held messages' leases are refreshed: a sixth of the visibility timeout, 1 s to 5 min.
    fn lease_interval(&self) -> Duration {
        (self.visibility_timeout / 6).clamp(Duration::from_secs(1), Duration::from_secs(300))
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
            grace: Duration::from_secs(7),
            restore_interval: Duration::from_secs(10),
            fetch_block: Duration::from_secs(1),
            max_event_bytes: aura_runtime::events::limits::Limits::default().max_event_bytes,
            eta_max_held: 1000,
            visibility_timeout: Duration::from_secs(3600),
            fence: Fence::new(),
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
    /// Tasks of other apps given back to their queue (never run, failed or dead-lettered here).
    pub foreign: u64,
    /// Tasks of ours whose event type no handler knows: acknowledged as a success that says so, counted.
    pub skipped: u64,
    /// Scheduled tasks moved to `<queue>.delayed` (no room to hold them).
    pub delayed: u64,
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
    foreign: AtomicU64,
    skipped: AtomicU64,
    delayed: AtomicU64,
}

/// Everything one finished message needs written, in the order the committer writes it.
struct Commit {
    /// The input to acknowledge (`None`: it never made it into `unacked`).
    tag: Option<String>,
    result: Option<TaskResult>,
    /// `(list, payload)` pushed in the acknowledging `MULTI`: produced tasks, a retry, a dead letter, a parked task.
    pushes: Vec<(String, Vec<u8>)>,
    /// An unreadable message to turn into its dead letter (see [`Quarantined`]).
    quarantined: Option<Quarantined>,
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
    observer: Option<Arc<dyn DependencyObserver>>,
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
    /// The prefetch bound: a permit per message fetched and not yet acknowledged (given back only while a
    /// scheduled task waits for its eta, which `eta_room` bounds instead).
    prefetch: Arc<Semaphore>,
    eta_room: Arc<Semaphore>,
    /// Delivery tags this worker holds (fetched, not yet acknowledged or given back): their leases are refreshed.
    held: Arc<StdMutex<HeldTags>>,
    /// Foreign tasks met in a row: a queue that only brings those is polled slowly.
    foreign_streak: AtomicU64,
    paused: Paused,
}

/// Delivery tags this worker holds, each with the token that stops its task when another worker took it over.
type HeldTags = std::collections::HashMap<String, CancellationToken>;

/// What the worker does about having been paused (see `aura_runtime::fence`): a stop of more than half the
/// visibility timeout may have let another worker restore and run the messages this one holds. The fence closes;
/// the held tags are checked against `unacked`; those gone are *taken over* — the committer drops their results,
/// outputs and acknowledgements — and the fence opens again.
#[derive(Clone, Default)]
struct Paused {
    fence: Fence,
    taken_over: Arc<StdMutex<HashSet<String>>>,
}

impl Paused {
    /// Returns once no pause is left unchecked (at once, unless the worker was just woken).
    async fn checked(&self) {
        while self.fence.is_closed() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether any message was taken over and not yet met (one lock, for the common answer: no).
    fn any_taken(&self) -> bool {
        self.taken_over
            .lock()
            .map(|set| !set.is_empty())
            .unwrap_or(false)
    }

    /// Whether `tag` was taken over (kept: see [`Paused::take`]).
    fn is_taken(&self, tag: Option<&str>) -> bool {
        tag.is_some_and(|tag| {
            self.taken_over
                .lock()
                .map(|set| set.contains(tag))
                .unwrap_or(false)
        })
    }

    /// Whether `tag` was taken over (and forgets it: it is met once).
    fn take(&self, tag: &str) -> bool {
        self.taken_over
            .lock()
            .map(|mut set| set.remove(tag))
            .unwrap_or(false)
    }

    /// Checks the held tags after the pause `closing` until Redis answers, then opens the fence.
    async fn clear(&self, closing: u64, broker: &Broker, held: &StdMutex<HeldTags>) {
        loop {
            let tags: Vec<String> = held
                .lock()
                .map(|held| held.keys().cloned().collect())
                .unwrap_or_default();
            match broker.taken_over(&tags).await {
                Ok(gone) => {
                    if !gone.is_empty() {
                        tracing::warn!(
                            taken_over = gone.len(),
                            held = tags.len(),
                            "messages this worker held were restored by another worker while it was paused: their results and outputs are dropped here"
                        );
                        metrics::counter!("aura360_celery_taken_over_total")
                            .increment(gone.len() as u64);
                    }
                    // A task still running stops where it is; one already finished is dropped by the committer.
                    if let Ok(held) = held.lock() {
                        for tag in &gone {
                            if let Some(stop) = held.get(tag) {
                                stop.cancel();
                            }
                        }
                    }
                    if let Ok(mut set) = self.taken_over.lock() {
                        set.extend(gone);
                    }
                    if self.fence.open_if(closing) {
                        tracing::info!("held messages checked after the pause: writing again");
                    }
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot check the held messages after the pause; writing nothing until Redis answers");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
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
            observer: None,
        }
    }

    /// Reports the result backend and the broker's acknowledgements to `observer` (the process's `/health`).
    pub fn with_observer(mut self, observer: Arc<dyn DependencyObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Runs until `shutdown` resolves, then drains (see the module docs). Whatever the broker's state, it returns
    /// within `grace` + 1 s of `shutdown`.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<WorkerReport, TransportError> {
        let options = self.options;
        let stopping = CancellationToken::new();
        let broker = self.broker;
        tokio::pin!(shutdown);
        let registry = self.registry.clone();
        // Start-up waits for Redis as long as it takes, but never past a shutdown.
        let startup = async {
            broker.ping(Patience::Forever).await?;
            for queue in &options.queues {
                broker.declare_queue(queue).await?;
            }
            let mut unparked = 0;
            for queue in &options.queues {
                for handler in registry.enabled() {
                    unparked += broker.unpark(queue, handler).await?;
                }
            }
            if unparked > 0 {
                tracing::info!(
                    unparked,
                    "moved parked tasks of enabled handlers back onto their queues"
                );
            }
            for queue in &options.queues {
                match broker
                    .sweep_unreadable(queue, |raw| unreadable_entry(queue, raw))
                    .await
                {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::warn!(queue = %queue, dead_lettered = n, "dead-lettered unreadable messages a stopped worker left in quarantine")
                    }
                    Err(error) => tracing::warn!(%error, "dead-lettering quarantined messages"),
                }
            }
            let restored = broker.restore_visible().await.unwrap_or_else(|error| {
                tracing::warn!(%error, "restoring expired unacked messages at start-up");
                0
            });
            Ok::<(usize, usize), TransportError>((unparked, restored))
        };
        let (unparked, restored) = tokio::select! {
            ready = startup => ready?,
            _ = &mut shutdown => return Ok(WorkerReport::default()),
        };

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
        let held = Arc::new(StdMutex::new(HeldTags::new()));
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
            prefetch: Arc::new(Semaphore::new(prefetch)),
            eta_room: Arc::new(Semaphore::new(options.eta_max_held)),
            held: held.clone(),
            foreign_streak: AtomicU64::new(0),
            paused: Paused {
                fence: options.fence.clone(),
                taken_over: Arc::default(),
            },
        });
        shared
            .counters
            .restored
            .fetch_add(restored as u64, Ordering::Relaxed);

        let background = CancellationToken::new();
        // Cancelled at the shutdown deadline: writes that still wait for Redis give up (their messages stay in
        // `unacked`, restored after the visibility timeout).
        let paused = shared.paused.clone();
        let (pause_tx, mut pauses) = mpsc::unbounded_channel();
        let _pause_watch = PauseWatch::spawn(
            paused.fence.clone(),
            Duration::from_millis(100),
            (options.visibility_timeout / 2).max(Duration::from_millis(500)),
            move |closing, _| {
                let _ = pause_tx.send(closing);
            },
        )
        .inspect_err(|error| {
            tracing::warn!(%error, "cannot start the pause watch; a paused worker is not fenced")
        })
        .ok();
        let hard_stop = CancellationToken::new();
        let committer = tokio::spawn(run_committer(
            broker.clone(),
            shared.results.clone(),
            events.clone(),
            commit_rx,
            self.observer.clone(),
            hard_stop.clone(),
            paused.clone(),
        ));
        let mut helpers = JoinSet::new();
        helpers.spawn(serve_control(
            broker.link().clone(),
            events.clone(),
            control,
            background.clone(),
        ));
        let heartbeat_events = events.clone();
        helpers.spawn(every(
            Duration::from_secs_f64(HEARTBEAT_SECS),
            background.clone(),
            move || heartbeat(heartbeat_events.clone()),
        ));
        let (restore_broker, counters) = (broker.clone(), shared.counters.clone());
        helpers.spawn(every(
            options.restore_interval,
            background.clone(),
            move || restore(restore_broker.clone(), counters.clone()),
        ));
        let lease_broker = broker.clone();
        helpers.spawn(every(
            options.lease_interval(),
            background.clone(),
            move || refresh_leases(lease_broker.clone(), held.clone()),
        ));
        let (promote_broker, queues) = (
            broker.clone(),
            Arc::<[String]>::from(options.queues.clone()),
        );
        helpers.spawn(every(
            Duration::from_secs(1),
            background.clone(),
            move || promote(promote_broker.clone(), queues.clone()),
        ));
        let (clear_broker, clear_held, clearing) =
            (broker.clone(), shared.held.clone(), paused.clone());
        helpers.spawn(async move {
            while let Some(closing) = pauses.recv().await {
                clearing.clear(closing, &clear_broker, &clear_held).await;
            }
        });
        if let Err(error) = events.send_worker_event("worker-online").await {
            tracing::warn!(%error, "worker-online event");
        }
        tracing::info!(hostname = %options.hostname, queues = %options.queues.join(","),
            concurrency = options.concurrency, prefetch, "celery worker ready");
        // Celery's own words, which runbooks and people grep for.
        tracing::info!(hostname = %options.hostname, "{} ready.", options.hostname);

        let mut tasks = JoinSet::new();
        // When shutdown was asked for: the grace and the exit deadline count from here.
        let mut shutdown_at = tokio::time::Instant::now();
        loop {
            let first = tokio::select! {
                permit = shared.prefetch.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                _ = &mut shutdown => {
                    shutdown_at = tokio::time::Instant::now();
                    break;
                }
            };
            let mut permits = vec![first];
            while permits.len() < 256 {
                match shared.prefetch.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            if shared.foreign_streak.load(Ordering::Relaxed) >= prefetch as u64 {
                // The queue brings only other apps' tasks: give their workers time to take them.
                tokio::select! {
                    _ = tokio::time::sleep(options.fetch_block) => {}
                    _ = &mut shutdown => {
                        shutdown_at = tokio::time::Instant::now();
                        break;
                    }
                }
                shared.foreign_streak.store(0, Ordering::Relaxed);
            }
            // Raced against shutdown: a fetch takes nothing off a queue before registering it in `unacked`. A fetch
            // under way at shutdown gets a moment to finish, so what it took is handled (put back) now; one that
            // does not finish (Redis gone) is dropped, leaving at worst a message for the visibility-timeout restore.
            let fetch = broker.fetch(&options.queues, permits.len(), options.fetch_block);
            tokio::pin!(fetch);
            let mut stopping_now = false;
            let fetched = tokio::select! {
                fetched = &mut fetch => fetched,
                _ = &mut shutdown => {
                    stopping_now = true;
                    shutdown_at = tokio::time::Instant::now();
                    match tokio::time::timeout(FETCH_FINISH, &mut fetch).await {
                        Ok(fetched) => fetched,
                        Err(_) => break,
                    }
                }
            };
            match fetched {
                Ok(messages) => {
                    if let Ok(mut held) = shared.held.lock() {
                        held.extend(
                            messages
                                .iter()
                                .filter_map(|m| m.tag.clone())
                                .map(|tag| (tag, CancellationToken::new())),
                        );
                    }
                    for message in messages {
                        let permit = permits.pop();
                        let shared = shared.clone();
                        tasks.spawn(async move { process(&shared, message, permit).await });
                    }
                }
                Err(error) if stopping_now => {
                    tracing::warn!(%error, "fetching from the broker failed at shutdown");
                }
                Err(error) => {
                    tracing::warn!(%error, "fetching from the broker failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = &mut shutdown => {
                            shutdown_at = tokio::time::Instant::now();
                            break;
                        }
                    }
                }
            }
            while let Some(joined) = tasks.try_join_next() {
                report_lost_task(joined);
            }
            if stopping_now {
                break;
            }
        }

        tracing::info!(
            in_flight = tasks.len(),
            grace_s = options.grace.as_secs_f64(),
            "shutting down: finishing in-flight tasks"
        );
        // Handlers get `grace` from the signal; writes and requeues until half a second later; then the last
        // bounded steps (committer, helpers, `worker-offline`): out within grace + 1 s of the signal.
        let deadline = shutdown_at + options.grace + Duration::from_millis(500);
        let stop_at_deadline = {
            let hard_stop = hard_stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline).await;
                hard_stop.cancel();
            })
        };
        stopping.cancel();
        let drained = tokio::time::timeout_at(shutdown_at + options.grace, async {
            while let Some(joined) = tasks.join_next().await {
                report_lost_task(joined);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                still_running = tasks.len(),
                "grace period over: putting unfinished tasks back on their queues"
            );
            shared.abandon.cancel();
            let finished = tokio::time::timeout_at(deadline, async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
            if finished.is_err() {
                tracing::warn!(
                    unfinished = tasks.len(),
                    "shutdown deadline: leaving what is not written in unacked (restored after the visibility timeout)"
                );
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
            }
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
            foreign: counters.foreign.load(Ordering::Relaxed),
            skipped: counters.skipped.load(Ordering::Relaxed),
            delayed: counters.delayed.load(Ordering::Relaxed),
        };
        drop(shared);
        // The committer ends once every task's sender is gone and its queue is written — or at the deadline.
        let mut committer = committer;
        if tokio::time::timeout_at(deadline + Duration::from_millis(200), &mut committer)
            .await
            .is_err()
        {
            committer.abort();
        }
        stop_at_deadline.abort();
        background.cancel();
        let helpers_done = tokio::time::timeout(Duration::from_millis(100), async {
            while helpers.join_next().await.is_some() {}
        })
        .await;
        if helpers_done.is_err() {
            helpers.abort_all();
        }
        let offline = tokio::time::timeout(
            Duration::from_millis(200),
            events.send_worker_event("worker-offline"),
        )
        .await;
        match offline {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "worker-offline event"),
            Err(_) => tracing::warn!("worker-offline event not sent: the broker does not answer"),
        }
        tracing::info!(?report, "celery worker stopped");
        Ok(report)
    }
}

/// A message task that ended in a panic outside its handler (the handler's own panics are caught and become
/// `FAILURE`): a bug in the worker. Its message stays in `unacked` and is restored after the visibility timeout.
fn report_lost_task(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined
        && error.is_panic()
    {
        tracing::error!(%error, "a message task panicked outside its handler (a worker bug); its message stays in unacked and is restored after the visibility timeout");
    }
}

/// Runs `tick` every `interval` (after each one ends) until `stop`: the worker's background chores.
async fn every<F, Fut>(interval: Duration, stop: CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
        tick().await;
    }
}

async fn heartbeat(events: Arc<EventSender>) {
    match events.send_worker_event("worker-heartbeat").await {
        Ok(()) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            metrics::gauge!("aura360_celery_heartbeat_timestamp_seconds").set(now);
        }
        Err(error) => tracing::debug!(%error, "heartbeat not sent"),
    }
}

/// Restores what dead workers left in `unacked` past the visibility timeout.
async fn restore(broker: Arc<Broker>, counters: Arc<Counters>) {
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

/// Keeps the leases of held messages fresh (see [`Broker::refresh_leases`]).
async fn refresh_leases(broker: Arc<Broker>, held: Arc<StdMutex<HeldTags>>) {
    let tags: Vec<String> = held
        .lock()
        .map(|held| held.keys().cloned().collect())
        .unwrap_or_default();
    if tags.is_empty() {
        return;
    }
    if let Err(error) = broker.refresh_leases(&tags).await {
        tracing::warn!(%error, held = tags.len(),
            "could not refresh the leases of held messages; if this lasts past the visibility timeout they are restored and may run twice");
    }
}

/// Moves due scheduled tasks from `<queue>.delayed` back onto their queues.
async fn promote(broker: Arc<Broker>, queues: Arc<[String]>) {
    for queue in queues.iter() {
        match broker.promote_due(queue, 500).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::debug!(queue = %queue, due = n, "scheduled tasks due: back on their queue")
            }
            Err(error) => {
                tracing::warn!(%error, queue = %queue, "moving due scheduled tasks back")
            }
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
    /// Another app's task: given back to its queue untouched (never failed or dead-lettered on its behalf).
    Foreign,
    /// A scheduled task with no room in memory: moved to `<queue>.delayed` until `eta`.
    Delay {
        eta: chrono::DateTime<Utc>,
    },
}

/// Removes a delivery tag from the held set when its message is done with — written, given back, or abandoned.
struct Held<'a> {
    shared: &'a Shared,
    tag: String,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Ok(mut held) = self.shared.held.lock() {
            held.remove(&self.tag);
        }
    }
}

/// A running task in `/inspect active` and the `active` count of heartbeats, until dropped (also by a panic).
struct Active<'a> {
    shared: &'a Shared,
    id: &'a str,
    task: &'a str,
}

impl<'a> Active<'a> {
    fn start(shared: &'a Shared, fetched: &Fetched, message: &'a TaskMessage) -> Self {
        shared
            .control
            .task_started(&message.id, ActiveTask::new(fetched, message));
        shared
            .events
            .counters
            .active
            .fetch_add(1, Ordering::Relaxed);
        Self {
            shared,
            id: &message.id,
            task: &message.task,
        }
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.shared
            .events
            .counters
            .active
            .fetch_sub(1, Ordering::Relaxed);
        self.shared.control.task_finished(self.id, self.task);
    }
}

/// `prefetch_slot` is this message's place in the prefetch bound, held until its result and acknowledgement are
/// written; it is given back only while the message waits for its `eta` (see `decide`).
async fn process(
    shared: &Shared,
    fetched: Fetched,
    mut prefetch_slot: Option<OwnedSemaphorePermit>,
) {
    let Some(tag) = fetched.tag.clone() else {
        // Not an envelope we could read: the fetch moved it to `<queue>.unreadable`; dead-letter it from there.
        let entry = unreadable_entry(&fetched.queue, &fetched.raw);
        tracing::error!(queue = %fetched.queue, "unreadable message dead-lettered");
        shared
            .counters
            .dead_lettered
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!("aura360_dead_letters_total", "backend" => "celery", "handler" => "decode").increment(1);
        let quarantined = Quarantined {
            list: unreadable_key(&fetched.queue),
            raw: fetched.raw,
            dead_letter: (dead_letter_key(&fetched.queue), entry),
        };
        commit_with(
            shared,
            None,
            None,
            Vec::new(),
            Vec::new(),
            Some(quarantined),
        )
        .await;
        return;
    };
    let _held = Held {
        shared,
        tag: tag.clone(),
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
            if let Some(name) = &task
                && !routing::is_pipeline_task(name)
                && let Some(envelope) = &envelope
            {
                // Another app's task we cannot read either: still not ours to fail.
                give_back(shared, &fetched, &tag, envelope, name).await;
                return;
            }
            dead_letter_unreadable(shared, &fetched, &tag, task_id, task, &error).await;
            return;
        }
    };
    let mut events: Vec<Value> = Vec::new();
    // The event is moved out of the body, not copied: nothing after the handler needs the arguments.
    let args = std::mem::take(&mut message.body.args);
    let taken_over = shared
        .held
        .lock()
        .ok()
        .and_then(|held| held.get(&tag).cloned())
        .unwrap_or_default();
    let decided = tokio::select! {
        biased;
        () = taken_over.cancelled() => {
            // Another worker restored this message while this one was paused, and runs it: nothing of it here.
            shared.paused.take(&tag);
            tracing::warn!(task_id = %message.id, tag = %tag,
                "dropped: another worker restored this message while this one was paused");
            return;
        }
        decided = AssertUnwindSafe(decide(
            shared,
            &fetched,
            &message,
            args,
            &mut prefetch_slot,
            &mut events,
        ))
        .catch_unwind() => decided,
    };
    let verdict = decided.unwrap_or_else(|panic| {
        let reason = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        let error = format!("the task panicked: {reason}");
        Verdict::Fail {
            handler: None,
            exception: exception("TaskPanicked", "aura360.errors", &error),
            error,
        }
    });
    write(shared, &fetched, &tag, &message, verdict, events).await;
    drop(prefetch_slot);
}

/// A time limit Python may send (`float('inf')`, `1e308`, `1e-9`) as something `tokio` can wait for: `None` (no
/// limit) when it is not a positive duration that fits.
fn time_limit(seconds: Option<f64>) -> Option<Duration> {
    seconds
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .filter(|d| !d.is_zero())
}

/// Runs the message (or decides not to) and says how it ended.
async fn decide(
    shared: &Shared,
    fetched: &Fetched,
    message: &TaskMessage,
    args: Vec<Value>,
    prefetch_slot: &mut Option<OwnedSemaphorePermit>,
    events: &mut Vec<Value>,
) -> Verdict {
    let Some(expected_type) = routing::event_type_for_task(&message.task) else {
        if routing::is_pipeline_task(&message.task) {
            return Verdict::Fail {
                handler: None,
                error: format!(
                    "Task of kind '{}' is not registered with this worker",
                    message.task
                ),
                exception: exception("NotRegistered", "celery.exceptions", &message.task),
            };
        }
        shared.foreign_streak.fetch_add(1, Ordering::Relaxed);
        return Verdict::Foreign;
    };
    shared.foreign_streak.store(0, Ordering::Relaxed);
    events.extend(shared.events.task_received(message));
    let revoked_or_expired = || {
        if shared.control.is_revoked(&message.id) {
            Some(Verdict::Revoked { expired: false })
        } else if message.expires.is_some_and(|expires| expires <= Utc::now()) {
            Some(Verdict::Revoked { expired: true })
        } else {
            None
        }
    };
    if let Some(verdict) = revoked_or_expired() {
        return verdict;
    }
    if let Some(eta) = message.eta {
        let wait = (eta - Utc::now()).to_std().unwrap_or_default();
        if !wait.is_zero() {
            let Ok(room) = shared.eta_room.clone().try_acquire_owned() else {
                return Verdict::Delay { eta };
            };
            // Celery raises its prefetch count for a scheduled task; we give its permit back while it waits, so
            // due tasks keep flowing, and `eta_room` bounds how many wait.
            drop(prefetch_slot.take());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shared.stopping.cancelled() => return Verdict::Requeue,
            }
            drop(room);
            *prefetch_slot = tokio::select! {
                permit = shared.prefetch.clone().acquire_owned() => match permit {
                    Ok(permit) => Some(permit),
                    Err(_) => return Verdict::Requeue,
                },
                _ = shared.stopping.cancelled() => return Verdict::Requeue,
            };
        }
    }
    let _slot = tokio::select! {
        slot = shared.slots.clone().acquire_owned() => match slot {
            Ok(slot) => slot,
            Err(_) => return Verdict::Requeue,
        },
        _ = shared.stopping.cancelled() => return Verdict::Requeue,
    };
    // Checked again: a task can expire, or be revoked, while it waits for its eta or a slot.
    if let Some(verdict) = revoked_or_expired() {
        return verdict;
    }
    tracing::info!(task = %message.task, task_id = %message.id, "Task {}[{}] received", message.task, message.id);
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
        // As on Kafka (where `aura360.user.events` carries every `user.*` type): an event type no handler knows is
        // skipped, counted and acknowledged, never failed or dead-lettered.
        Route::Unhandled => {
            tracing::info!(event_id = %event.event_id, event_type = %event.event_type, "no handler for event type; skipped");
            aura_runtime::count_skipped();
            return skipped(shared, &event, 0.0);
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
    let active = Active::start(shared, fetched, message);

    let scope = Arc::new(TaskScope::new(
        message.id.clone(),
        message
            .root_id
            .clone()
            .unwrap_or_else(|| message.id.clone()),
    ));
    let started = Instant::now();
    let limit_seconds = message.time_limit.or(message.soft_time_limit);
    let limit = time_limit(limit_seconds);
    let run = scope.run(shared.dispatcher.dispatch(&event));
    let outcome = tokio::select! {
        outcome = async {
            match limit {
                Some(limit) => tokio::time::timeout(limit, run).await.ok(),
                None => Some(run.await),
            }
        } => outcome,
        _ = shared.abandon.cancelled() => return Verdict::Requeue,
    };
    drop(active);
    shared
        .events
        .counters
        .processed
        .fetch_add(1, Ordering::Relaxed);
    let runtime = started.elapsed().as_secs_f64();
    match outcome {
        None => {
            let seconds = limit_seconds.unwrap_or_default();
            let error = format!("TimeLimitExceeded({seconds})");
            Verdict::Fail {
                handler: Some(handler.to_owned()),
                exception: exception(
                    "TimeLimitExceeded",
                    "billiard.exceptions",
                    &seconds.to_string(),
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
        // Routed above; a registry cannot change under a running worker (the dispatcher counted it if it did).
        Some(Ok(Outcome::Unhandled)) => skipped(shared, &event, runtime),
        Some(Err(Failure { handler, error })) => {
            let text = error.to_string();
            let handler = handler.map(str::to_owned);
            let policy = &shared.options.retry;
            let attempt = message.retries.saturating_add(1);
            if error.is_transient() && !policy.gives_up_after(attempt) {
                let delay = policy.delay(attempt);
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

/// The verdict on an event whose type no handler knows: a success whose result says it was skipped.
fn skipped(shared: &Shared, event: &Event, runtime: f64) -> Verdict {
    shared.counters.skipped.fetch_add(1, Ordering::Relaxed);
    Verdict::Success {
        result: json!({"ok": true, "event_id": event.event_id.to_string(), "skipped": format!("no handler for event type {}", event.event_type), "produced": 0}),
        staged: Vec::new(),
        runtime,
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
    // A type with no task of its own is one no handler knows (a newer producer's): the caller skips it.
    let accepted = event.event_type == expected_type
        || routing::task_for(&event.event_type).is_none()
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
                .requeue(tag, &message.envelope, &fetched.queue, REQUEUE_PATIENCE)
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
        Verdict::Foreign => {
            give_back(shared, fetched, tag, &message.envelope, &message.task).await;
            return;
        }
        Verdict::Delay { eta } => {
            let seconds = eta.timestamp_micros() as f64 / 1e6;
            match shared
                .broker
                .delay(tag, &fetched.raw, &fetched.queue, seconds)
                .await
            {
                Ok(_) => {
                    counters.delayed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(task_id = %message.id, eta = %iso(eta), queue = %fetched.queue,
                        "scheduled task moved to the delayed set (CELERY_ETA_MAX_HELD held already)");
                }
                Err(error) => tracing::warn!(task_id = %message.id, %error,
                    "could not move the scheduled task to the delayed set; it stays in unacked and is restored after the visibility timeout"),
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
            // One repr for the log line and the task event (Celery's `resultrepr_maxsize`).
            let repr = crate::protocol::saferepr(&result, 1024);
            tracing::info!(task = %message.task, task_id = %message.id, runtime,
                "Task {}[{}] succeeded in {}s: {repr}", message.task, message.id,
                aura_runtime::events::pyfmt::float_str(runtime));
            events.extend(shared.events.task_succeeded(&message.id, &repr, runtime));
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
            let traceback = format!(
                "Retry in {}s: {error}",
                (eta - Utc::now()).num_seconds().max(0)
            );
            tracing::warn!(task = %message.task, task_id = %message.id, retries = message.retries + 1, eta = %iso(eta),
                %error, "Task {}[{}] retry: {traceback}", message.task, message.id);
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

/// How long a fetch under way at shutdown may take to finish (an idle wait is 250 ms; a batch one round trip).
const FETCH_FINISH: Duration = Duration::from_secs(1);

/// How long a message being given back (shutdown, a foreign task) may wait for Redis; after that it stays in
/// `unacked` for the visibility-timeout restore.
const REQUEUE_PATIENCE: Patience = Patience::Until(Duration::from_secs(2));

/// Another app's task reached this worker (a shared queue, a wrong route): give it back to the list it came from,
/// at the back, as Celery's `reject(requeue=True)` does — never a result, an event or a dead letter on its behalf.
async fn give_back(shared: &Shared, fetched: &Fetched, tag: &str, envelope: &Envelope, task: &str) {
    shared.counters.foreign.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("aura360_celery_foreign_tasks_total", "queue" => fetched.queue.clone())
        .increment(1);
    match shared
        .broker
        .reject_requeue(tag, envelope, &fetched.key, REQUEUE_PATIENCE)
        .await
    {
        Ok(_) => tracing::warn!(task, queue = %fetched.queue,
            "a task of another app reached this worker: given back to its queue (route our tasks to a queue of their own: README \"Celery queues\")"),
        Err(error) => tracing::warn!(task, %error,
            "could not give a foreign task back; it stays in unacked and is restored after the visibility timeout"),
    }
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
        queue = %fetched.queue, error, "Task {}[{}] raised unexpected: {error} (dead-lettered)",
        task.as_deref().unwrap_or("-"), task_id.as_deref().unwrap_or("-"));
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
    entry_for(
        &fetched.queue,
        &fetched.raw,
        fetched.tag.as_deref(),
        task_id,
        task,
        error,
        handler,
    )
}

/// The dead letter of a message that is not a readable kombu envelope.
fn unreadable_entry(queue: &str, raw: &[u8]) -> Vec<u8> {
    let reason = match Envelope::from_slice(raw) {
        Err(error) => error.to_string(),
        Ok(_) => "envelope has no properties.delivery_tag".to_owned(),
    };
    entry_for(queue, raw, None, None, None, &reason, None)
}

fn entry_for(
    queue: &str,
    raw: &[u8],
    tag: Option<&str>,
    task_id: Option<&str>,
    task: Option<&str>,
    error: &str,
    handler: Option<&str>,
) -> Vec<u8> {
    let mut entry = serde_json::Map::new();
    entry.insert("task_id".into(), json!(task_id));
    entry.insert("task".into(), json!(task));
    entry.insert("queue".into(), json!(queue));
    entry.insert("handler".into(), json!(handler));
    entry.insert("error".into(), json!(error));
    entry.insert("delivery_tag".into(), json!(tag));
    entry.insert("failed_at".into(), json!(iso(Utc::now())));
    match std::str::from_utf8(raw) {
        Ok(text) => entry.insert("message".into(), json!(text)),
        Err(_) => {
            use base64::Engine as _;
            entry.insert(
                "message_base64".into(),
                json!(base64::engine::general_purpose::STANDARD.encode(raw)),
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

/// An unreadable message in its quarantine list, and the dead letter that replaces it.
struct Quarantined {
    list: String,
    raw: Vec<u8>,
    dead_letter: (String, Vec<u8>),
}

async fn commit(
    shared: &Shared,
    tag: Option<String>,
    result: Option<TaskResult>,
    pushes: Vec<(String, Vec<u8>)>,
    events: Vec<Value>,
) {
    commit_with(shared, tag, result, pushes, events, None).await;
}

async fn commit_with(
    shared: &Shared,
    tag: Option<String>,
    result: Option<TaskResult>,
    pushes: Vec<(String, Vec<u8>)>,
    events: Vec<Value>,
    quarantined: Option<Quarantined>,
) {
    let (done, written) = oneshot::channel();
    let sent = shared
        .commits
        .send(Commit {
            tag,
            result,
            pushes,
            quarantined,
            events,
            done,
        })
        .await;
    if sent.is_ok() {
        let _ = written.await;
    }
}

/// Writes finished messages in batches (see the module docs). Results first: a task is acknowledged only once its
/// result is stored. A result backend or broker that does not answer is waited for — the batch's tasks keep their
/// prefetch permits meanwhile, so the worker takes nothing new — until it answers or the shutdown deadline
/// (`hard_stop`); then the tasks stay in `unacked` and run again after the visibility timeout.
async fn run_committer(
    broker: Arc<Broker>,
    results_backend: Arc<ResultBackend>,
    events_sender: Arc<EventSender>,
    mut commits: mpsc::Receiver<Commit>,
    observer: Option<Arc<dyn DependencyObserver>>,
    hard_stop: CancellationToken,
    paused: Paused,
) {
    const BATCH: usize = 512;
    const PATIENCE: Patience = Patience::Until(Duration::from_secs(5));
    let report = |dependency: &'static str, outcome: Result<(), String>| {
        if let Some(observer) = &observer {
            observer.report(dependency, outcome);
        }
    };
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
        drop_taken_over(&mut batch, &paused, &hard_stop).await;
        // The results, and for each the commit (in `batch`) whose input it answers.
        let (owners, results): (Vec<usize>, Vec<TaskResult>) = batch
            .iter_mut()
            .enumerate()
            .filter_map(|(i, c)| Some((i, c.result.take()?)))
            .unzip();
        // Each attempt leaves out what was taken over since the last one (a retry after a pause included); while
        // nothing was, the batch's results go as they are.
        let stored = persist(
            "storing results",
            true,
            &hard_stop,
            || {
                let (paused, backend, results, owners, batch) = (
                    paused.clone(),
                    results_backend.clone(),
                    &results,
                    &owners,
                    &batch,
                );
                async move {
                    paused.checked().await;
                    if !paused.any_taken() {
                        return backend.store(results, PATIENCE).await;
                    }
                    let ours: Vec<TaskResult> = results
                        .iter()
                        .zip(owners)
                        .filter(|(_, i)| !paused.is_taken(batch[**i].tag.as_deref()))
                        .map(|(result, _)| result.clone())
                        .collect();
                    backend.store(&ours, PATIENCE).await
                }
            },
            |outcome| report(names::RESULT_BACKEND, outcome),
        )
        .await;
        if stored {
            let link = broker.link().clone();
            persist(
                "acknowledging",
                false,
                &hard_stop,
                || {
                    let (paused, link, batch) = (paused.clone(), link.clone(), &batch);
                    async move {
                        paused.checked().await;
                        let pipe = acknowledgement(batch, &paused);
                        link.pipe::<()>("acknowledge", PATIENCE, &pipe).await
                    }
                },
                |outcome| report(names::BROKER_ACKS, outcome),
            )
            .await;
            // Paused between the results and the acknowledgement: what was taken over meanwhile wrote nothing.
            drop_taken_over(&mut batch, &paused, &hard_stop).await;
        }
        let events: Vec<Value> = batch
            .iter_mut()
            .flat_map(|c| std::mem::take(&mut c.events))
            .collect();
        if !hard_stop.is_cancelled()
            && let Err(error) = events_sender.send_task_events(events).await
        {
            tracing::debug!(%error, "task events not sent");
        }
        for commit in batch.drain(..) {
            let _ = commit.done.send(());
        }
    }
}

/// The `MULTI` that pushes what `batch` produced and acknowledges its inputs, leaving out the commits of messages
/// another worker took over.
fn acknowledgement(batch: &[Commit], paused: &Paused) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic();
    let mut tags = Vec::new();
    let any_taken = paused.any_taken();
    for commit in batch
        .iter()
        .filter(|c| !any_taken || !paused.is_taken(c.tag.as_deref()))
    {
        for (list, payload) in &commit.pushes {
            pipe.lpush(list, payload).ignore();
        }
        if let Some(quarantined) = &commit.quarantined {
            pipe.cmd("EVAL")
                .arg(MOVE_IF_PRESENT)
                .arg(2)
                .arg(&quarantined.list)
                .arg(&quarantined.dead_letter.0)
                .arg(&quarantined.raw)
                .arg(&quarantined.dead_letter.1)
                .ignore();
        }
        if let Some(tag) = &commit.tag {
            tags.push(tag.as_str());
        }
    }
    if !tags.is_empty() {
        pipe.zrem(UNACKED_INDEX, &tags).ignore();
        pipe.hdel(UNACKED, &tags).ignore();
    }
    pipe
}

/// After a pause, waits until the held messages were checked (the fence opens), then drops from `batch` what another
/// worker took over meanwhile: nothing of it is written here (no result, no output, no acknowledgement, no event).
async fn drop_taken_over(batch: &mut Vec<Commit>, paused: &Paused, hard_stop: &CancellationToken) {
    tokio::select! {
        () = paused.checked() => {}
        () = hard_stop.cancelled() => {}
    }
    let mut kept = Vec::with_capacity(batch.len());
    for commit in batch.drain(..) {
        match &commit.tag {
            Some(tag) if paused.take(tag) => {
                tracing::warn!(tag = %tag, "dropped: another worker restored this message while this one was paused");
                let _ = commit.done.send(());
            }
            _ => kept.push(commit),
        }
    }
    *batch = kept;
}

/// Runs `write` until it succeeds while Redis is unreachable (`GaveUp`), or also while it refuses when
/// `retry_refusals` (results: `SETEX` is idempotent, and an OOM or read-only result backend must hold the worker,
/// not let it run the queue into `unacked`). An acknowledgement is not retried on a refusal (a wrong-type key): part
/// of its `MULTI` may have applied. Gives up at `hard_stop`. Returns whether it was written.
async fn persist<F, Fut>(
    what: &'static str,
    retry_refusals: bool,
    hard_stop: &CancellationToken,
    write: F,
    report: impl Fn(Result<(), String>),
) -> bool
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), TransportError>>,
{
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let outcome = tokio::select! {
            outcome = write() => outcome,
            _ = hard_stop.cancelled() => {
                tracing::error!(what, "shutdown deadline: the batch stays in unacked and runs again after the visibility timeout");
                return false;
            }
        };
        match outcome {
            Ok(()) => {
                report(Ok(()));
                if attempt > 1 {
                    tracing::info!(what, attempt, "written again: the worker takes new tasks");
                }
                return true;
            }
            Err(error) if retry_refusals || matches!(error, TransportError::GaveUp { .. }) => {
                report(Err(error.to_string()));
                tracing::error!(what, attempt, %error,
                    "holding the batch (and taking no new tasks) until Redis takes it");
                // A refusal answers at once: wait before the next try (an unreachable Redis already waited).
                if !matches!(error, TransportError::GaveUp { .. }) {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = hard_stop.cancelled() => {}
                    }
                }
            }
            Err(error) => {
                report(Err(error.to_string()));
                tracing::error!(what, %error,
                    "Redis refused the batch; its tasks stay in unacked and run again after the visibility timeout");
                return false;
            }
        }
        if hard_stop.is_cancelled() {
            return false;
        }
    }
}
