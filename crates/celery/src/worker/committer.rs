//! The committer: finished messages written in batches — results, then one acknowledging `MULTI` (asked of the
//! `Broker`), then task events — and what a pause took over left out of every write.

use super::*;

/// Everything one finished message needs written, in the order the committer writes it.
pub(super) struct Commit {
    /// The input to acknowledge (`None`: it never made it into `unacked`).
    pub(super) tag: Option<String>,
    pub(super) result: Option<TaskResult>,
    /// `(list, payload)` pushed in the acknowledging `MULTI`: produced tasks, a retry, a dead letter, a parked task.
    pub(super) pushes: Vec<(String, Vec<u8>)>,
    /// An unreadable message to turn into its dead letter (see [`Quarantined`]).
    pub(super) quarantined: Option<Quarantined>,
    pub(super) events: Vec<Value>,
    pub(super) done: oneshot::Sender<()>,
}

pub(super) async fn commit(
    shared: &Shared,
    tag: Option<String>,
    result: Option<TaskResult>,
    pushes: Vec<(String, Vec<u8>)>,
    events: Vec<Value>,
) {
    commit_with(shared, tag, result, pushes, events, None).await;
}

pub(super) async fn commit_with(
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

/// Commits written at once, at most.
const BATCH: usize = 512;
/// How long one write of a batch waits for an unreachable Redis before it is tried again.
const PATIENCE: Patience = Patience::Until(Duration::from_secs(5));

/// Writes finished messages in batches (see the module docs). Results first: a task is acknowledged only once its
/// result is stored. A result backend or broker that does not answer is waited for — the batch's tasks keep their
/// prefetch permits meanwhile, so the worker takes nothing new — until it answers or the shutdown deadline
/// (`hard_stop`); then the tasks stay in `unacked` and run again after the visibility timeout.
pub(super) async fn run_committer(
    broker: Arc<Broker>,
    results_backend: Arc<ResultBackend>,
    events_sender: Arc<EventSender>,
    mut commits: mpsc::Receiver<Commit>,
    observer: Option<Arc<dyn DependencyObserver>>,
    hard_stop: CancellationToken,
    paused: Paused,
) {
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
        let stored = store_results(
            &mut batch,
            &results_backend,
            &paused,
            &hard_stop,
            |outcome| report(names::RESULT_BACKEND, outcome),
        )
        .await;
        if stored {
            persist(
                "acknowledging",
                false,
                &hard_stop,
                || {
                    let (paused, broker, batch) = (paused.clone(), broker.clone(), &batch);
                    async move {
                        paused.checked().await;
                        broker
                            .acknowledge(acknowledgements(batch, &paused), PATIENCE)
                            .await
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

/// Stores the batch's results (taking them out of its commits) until the result backend takes them or the
/// shutdown deadline; whether they were stored. Each attempt leaves out what was taken over since the last one (a
/// retry after a pause included); while nothing was, the batch's results go as they are.
async fn store_results(
    batch: &mut [Commit],
    backend: &Arc<ResultBackend>,
    paused: &Paused,
    hard_stop: &CancellationToken,
    report: impl Fn(Result<(), String>),
) -> bool {
    // The results, and for each the commit (in `batch`) whose input it answers.
    let (owners, results): (Vec<usize>, Vec<TaskResult>) = batch
        .iter_mut()
        .enumerate()
        .filter_map(|(i, c)| Some((i, c.result.take()?)))
        .unzip();
    let batch = &*batch;
    persist(
        "storing results",
        true,
        hard_stop,
        || {
            let (paused, backend, results, owners) =
                (paused.clone(), backend.clone(), &results, &owners);
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
        report,
    )
    .await
}

/// What acknowledging `batch` writes, leaving out the commits of messages another worker took over.
pub(super) fn acknowledgements<'a>(
    batch: &'a [Commit],
    paused: &'a Paused,
) -> impl Iterator<Item = Acknowledgement<'a>> {
    let any_taken = paused.any_taken();
    batch
        .iter()
        .filter(move |c| !any_taken || !paused.is_taken(c.tag.as_deref()))
        .map(|c| Acknowledgement {
            tag: c.tag.as_deref(),
            pushes: &c.pushes,
            quarantined: c.quarantined.as_ref(),
        })
}

/// After a pause, waits until the held messages were checked (the fence opens), then drops from `batch` what another
/// worker took over meanwhile: nothing of it is written here (no result, no output, no acknowledgement, no event).
pub(super) async fn drop_taken_over(
    batch: &mut Vec<Commit>,
    paused: &Paused,
    hard_stop: &CancellationToken,
) {
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
pub(super) async fn persist<F, Fut>(
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
