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
use crate::dead_letter::{DeadLetterEntry, Subject};
use crate::events::{EventSender, HEARTBEAT_SECS, WorkerIdentity};
use crate::protocol::{Envelope, MessageError, TaskMessage, follow_ups, iso};
use crate::publisher::TaskScope;
use crate::results::{self, ResultBackend, TaskResult, exception};
use crate::transport::{
    Acknowledgement, Broker, Fetched, GiveBack, Patience, Quarantined, TransportError,
    dead_letter_key, parked_key, priority_key, unreadable_key,
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
        tokio::pin!(shutdown);
        // Start-up waits for Redis as long as it takes, but never past a shutdown.
        let (unparked, restored) = tokio::select! {
            ready = recover(&self.broker, &self.options, &self.registry) => ready?,
            _ = &mut shutdown => return Ok(WorkerReport::default()),
        };
        let observer = self.observer.clone();
        let (shared, commits) = Shared::new(self);
        shared
            .counters
            .restored
            .fetch_add(restored as u64, Ordering::Relaxed);
        let background = Background::start(&shared, commits, observer);
        background.announce(&shared).await;

        let mut tasks = JoinSet::new();
        let shutdown_at = fetch_until(&shared, shutdown, &mut tasks).await;
        tracing::info!(
            in_flight = tasks.len(),
            grace_s = shared.options.grace.as_secs_f64(),
            "shutting down: finishing in-flight tasks"
        );
        // Handlers get `grace` from the signal; writes and requeues until half a second later; then the last
        // bounded steps (committer, helpers, `worker-offline`): out within grace + 1 s of the signal.
        let deadline = shutdown_at + shared.options.grace + Duration::from_millis(500);
        let stop_at_deadline = background.stop_writes_at(deadline);
        drain(
            &shared,
            &mut tasks,
            shutdown_at + shared.options.grace,
            deadline,
        )
        .await;
        let report = shared.counters.report(unparked as u64);
        drop(shared);
        background.stop(deadline).await;
        stop_at_deadline.abort();
        tracing::info!(?report, "celery worker stopped");
        Ok(report)
    }
}

impl Shared {
    /// The state every message task shares, and the receiving end of the committer's queue.
    fn new(worker: CeleryWorker) -> (Arc<Self>, mpsc::Receiver<Commit>) {
        let options = worker.options;
        let events = Arc::new(EventSender::new(
            worker.broker.link().clone(),
            WorkerIdentity::new(options.hostname.clone()),
            options.send_task_events,
        ));
        let registered: Vec<String> = worker
            .registry
            .enabled_event_types()
            .iter()
            .filter_map(|t| routing::task_for(t))
            .map(str::to_owned)
            .collect();
        let prefetch = options.prefetch();
        let control = Arc::new(ControlState::new(
            options.queues.clone(),
            registered,
            options.concurrency,
            prefetch,
        ));
        let (commits, received) = mpsc::channel(4 * prefetch.max(64));
        let shared = Self {
            broker: worker.broker,
            results: worker.results,
            registry: worker.registry,
            dispatcher: worker.dispatcher,
            events,
            control,
            slots: Arc::new(Semaphore::new(options.concurrency)),
            stopping: CancellationToken::new(),
            abandon: CancellationToken::new(),
            commits,
            counters: Arc::new(Counters::default()),
            prefetch: Arc::new(Semaphore::new(prefetch)),
            eta_room: Arc::new(Semaphore::new(options.eta_max_held)),
            held: Arc::new(StdMutex::new(HeldTags::new())),
            foreign_streak: AtomicU64::new(0),
            paused: Paused {
                fence: options.fence.clone(),
                taken_over: Arc::default(),
            },
            options,
        };
        (Arc::new(shared), received)
    }
}

impl Counters {
    fn report(&self, unparked: u64) -> WorkerReport {
        WorkerReport {
            succeeded: self.succeeded.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            parked: self.parked.load(Ordering::Relaxed),
            requeued: self.requeued.load(Ordering::Relaxed),
            revoked: self.revoked.load(Ordering::Relaxed),
            restored: self.restored.load(Ordering::Relaxed),
            unparked,
            foreign: self.foreign.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            delayed: self.delayed.load(Ordering::Relaxed),
        }
    }
}

/// Fetches and starts messages until `shutdown` resolves (or the prefetch bound is closed); returns when shutdown
/// was asked for — the grace and the exit deadline count from there.
async fn fetch_until(
    shared: &Arc<Shared>,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    tasks: &mut JoinSet<()>,
) -> tokio::time::Instant {
    let options = &shared.options;
    loop {
        let first = tokio::select! {
            permit = shared.prefetch.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return tokio::time::Instant::now(),
            },
            _ = &mut shutdown => return tokio::time::Instant::now(),
        };
        let mut permits = vec![first];
        while permits.len() < 256 {
            match shared.prefetch.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        if shared.foreign_streak.load(Ordering::Relaxed) >= options.prefetch() as u64 {
            // The queue brings only other apps' tasks: give their workers time to take them.
            tokio::select! {
                _ = tokio::time::sleep(options.fetch_block) => {}
                _ = &mut shutdown => return tokio::time::Instant::now(),
            }
            shared.foreign_streak.store(0, Ordering::Relaxed);
        }
        // Raced against shutdown: a fetch takes nothing off a queue before registering it in `unacked`. A fetch
        // under way at shutdown gets a moment to finish, so what it took is handled (put back) now; one that does
        // not finish (Redis gone) is dropped, leaving at worst a message for the visibility-timeout restore.
        let fetch = shared
            .broker
            .fetch(&options.queues, permits.len(), options.fetch_block);
        tokio::pin!(fetch);
        let mut stopping_at = None;
        let fetched = tokio::select! {
            fetched = &mut fetch => fetched,
            _ = &mut shutdown => {
                let now = tokio::time::Instant::now();
                stopping_at = Some(now);
                match tokio::time::timeout(FETCH_FINISH, &mut fetch).await {
                    Ok(fetched) => fetched,
                    Err(_) => return now,
                }
            }
        };
        match fetched {
            Ok(messages) => start(shared, messages, permits, tasks),
            Err(error) if stopping_at.is_some() => {
                tracing::warn!(%error, "fetching from the broker failed at shutdown");
            }
            Err(error) => {
                tracing::warn!(%error, "fetching from the broker failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = &mut shutdown => return tokio::time::Instant::now(),
                }
            }
        }
        while let Some(joined) = tasks.try_join_next() {
            report_lost_task(joined);
        }
        if let Some(at) = stopping_at {
            return at;
        }
    }
}

/// Registers the fetched messages as held and starts a task for each, with its prefetch permit.
fn start(
    shared: &Arc<Shared>,
    messages: Vec<Fetched>,
    mut permits: Vec<OwnedSemaphorePermit>,
    tasks: &mut JoinSet<()>,
) {
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

/// Shutdown: nothing new starts; running tasks get until `grace_end`; then what still runs is put back, and what is
/// not written by `deadline` stays in `unacked` (restored after the visibility timeout).
async fn drain(
    shared: &Shared,
    tasks: &mut JoinSet<()>,
    grace_end: tokio::time::Instant,
    deadline: tokio::time::Instant,
) {
    shared.stopping.cancel();
    let drained = tokio::time::timeout_at(grace_end, async {
        while let Some(joined) = tasks.join_next().await {
            report_lost_task(joined);
        }
    })
    .await;
    if drained.is_ok() {
        return;
    }
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

/// A message task that ended in a panic outside its handler (the handler's own panics are caught and become
/// `FAILURE`): a bug in the worker. Its message stays in `unacked` and is restored after the visibility timeout.
fn report_lost_task(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined
        && error.is_panic()
    {
        tracing::error!(%error, "a message task panicked outside its handler (a worker bug); its message stays in unacked and is restored after the visibility timeout");
    }
}
