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
    Acknowledgement, Broker, Fetched, Patience, Quarantined, TransportError, dead_letter_key,
    parked_key, priority_key, unreadable_key,
};

mod chores;
mod committer;
mod execute;
mod options;
mod outcome;
mod paused;

use chores::*;
use committer::*;
use execute::*;
use outcome::*;
use paused::*;

pub use options::WorkerOptions;

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
