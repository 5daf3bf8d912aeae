//! Turning a verdict into writes: the result, produced tasks, retries, dead letters and give-backs, handed to
//! the committer.

use super::*;

/// Turns a verdict into the writes of one commit (or a requeue) and waits until they are done.
pub(super) async fn write(
    shared: &Shared,
    fetched: &Fetched,
    tag: &str,
    message: &TaskMessage,
    verdict: Verdict,
    events: Vec<Value>,
) {
    let mut writes = Writes {
        pushes: Vec::new(),
        events,
    };
    let result = match verdict {
        Verdict::Requeue => return requeue(shared, fetched, tag, message).await,
        Verdict::Foreign => {
            return give_back(shared, fetched, tag, &message.envelope, &message.task).await;
        }
        Verdict::Delay { eta } => return delay(shared, fetched, tag, message, eta).await,
        Verdict::Park { handler } => {
            shared.counters.parked.fetch_add(1, Ordering::Relaxed);
            tracing::info!(task_id = %message.id, handler, "handler disabled: task parked until a worker with it enabled starts");
            writes
                .pushes
                .push((parked_key(&fetched.queue, handler), fetched.raw.clone()));
            None
        }
        Verdict::Revoked { expired } => Some(revoked(shared, message, expired, &mut writes)),
        Verdict::Success {
            result,
            staged,
            runtime,
        } => Some(succeeded(
            shared,
            fetched,
            message,
            Succeeded {
                result,
                staged,
                runtime,
            },
            &mut writes,
        )),
        Verdict::Retry {
            error,
            exception,
            eta,
        } => Some(retried(
            shared,
            fetched,
            message,
            (error, exception, eta),
            &mut writes,
        )),
        Verdict::Fail {
            handler,
            error,
            exception,
        } => Some(failed(
            shared,
            fetched,
            message,
            (handler, error, exception),
            &mut writes,
        )),
    };
    commit(
        shared,
        Some(tag.to_owned()),
        result,
        writes.pushes,
        writes.events,
    )
    .await;
}

/// What one commit pushes in the acknowledging `MULTI`, and the task events it sends.
pub(super) struct Writes {
    pub(super) pushes: Vec<(String, Vec<u8>)>,
    pub(super) events: Vec<Value>,
}

/// A task not started at shutdown: back on the head of its queue.
async fn requeue(shared: &Shared, fetched: &Fetched, tag: &str, message: &TaskMessage) {
    shared.counters.requeued.fetch_add(1, Ordering::Relaxed);
    match shared
        .broker
        .give_back(
            tag,
            &message.envelope,
            GiveBack::Next {
                queue: &fetched.queue,
            },
            REQUEUE_PATIENCE,
        )
        .await
    {
        Ok(_) => {
            tracing::info!(task_id = %message.id, queue = %fetched.queue, "not started; put back on its queue")
        }
        Err(error) => tracing::warn!(task_id = %message.id, %error,
            "could not put the task back; it stays in unacked and is restored after the visibility timeout"),
    }
}

/// A scheduled task with no room in memory: into `<queue>.delayed` until `eta`.
async fn delay(
    shared: &Shared,
    fetched: &Fetched,
    tag: &str,
    message: &TaskMessage,
    eta: chrono::DateTime<Utc>,
) {
    let seconds = eta.timestamp_micros() as f64 / 1e6;
    match shared
        .broker
        .delay(tag, &fetched.raw, &fetched.queue, seconds)
        .await
    {
        Ok(_) => {
            shared.counters.delayed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(task_id = %message.id, eta = %iso(eta), queue = %fetched.queue,
                "scheduled task moved to the delayed set (CELERY_ETA_MAX_HELD held already)");
        }
        Err(error) => tracing::warn!(task_id = %message.id, %error,
            "could not move the scheduled task to the delayed set; it stays in unacked and is restored after the visibility timeout"),
    }
}

fn revoked(
    shared: &Shared,
    message: &TaskMessage,
    expired: bool,
    writes: &mut Writes,
) -> TaskResult {
    shared.counters.revoked.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(task_id = %message.id, expired, "task revoked; not run");
    writes
        .events
        .extend(shared.events.task_revoked(&message.id, expired));
    task_result(
        message,
        results::REVOKED,
        exception(
            "TaskRevokedError",
            "celery.exceptions",
            if expired { "expired" } else { "revoked" },
        ),
        None,
        Vec::new(),
    )
}

/// A handler's success: its result, and the tasks it produced (and Celery's own follow-ups) pushed.
pub(super) struct Succeeded {
    pub(super) result: Value,
    pub(super) staged: Vec<crate::protocol::OutgoingTask>,
    pub(super) runtime: f64,
}

fn succeeded(
    shared: &Shared,
    fetched: &Fetched,
    message: &TaskMessage,
    success: Succeeded,
    writes: &mut Writes,
) -> TaskResult {
    let Succeeded {
        result,
        staged,
        runtime,
    } = success;
    shared.counters.succeeded.fetch_add(1, Ordering::Relaxed);
    // One repr for the log line and the task event (Celery's `resultrepr_maxsize`).
    let repr = crate::protocol::saferepr(&result, 1024);
    tracing::info!(task = %message.task, task_id = %message.id, runtime,
        "Task {}[{}] succeeded in {}s: {repr}", message.task, message.id,
        aura_runtime::events::pyfmt::float_str(runtime));
    writes
        .events
        .extend(shared.events.task_succeeded(&message.id, &repr, runtime));
    let follow_ups = follow_ups(message, &result, &fetched.queue, &shared.options.hostname);
    let children = staged
        .iter()
        .chain(&follow_ups)
        .map(|t| t.id.clone())
        .collect();
    for task in staged.into_iter().chain(follow_ups) {
        writes.pushes.push((
            priority_key(&task.queue, task.priority),
            task.envelope.to_vec(),
        ));
    }
    task_result(message, results::SUCCESS, result, None, children)
}

/// A failure for good: `FAILURE` stored, the task dead-lettered.
fn failed(
    shared: &Shared,
    fetched: &Fetched,
    message: &TaskMessage,
    (handler, error, exception): (Option<String>, String, Value),
    writes: &mut Writes,
) -> TaskResult {
    fail(
        shared,
        fetched,
        FailedTask {
            task_id: Some(message.id.clone()),
            task: Some(message.task.clone()),
            handler,
            error: &error,
        },
        &mut writes.pushes,
        &mut writes.events,
    );
    task_result(
        message,
        results::FAILURE,
        exception,
        Some(error),
        Vec::new(),
    )
}

/// A transient failure with attempts left: the task sent again with a countdown, as Celery's autoretry does.
fn retried(
    shared: &Shared,
    fetched: &Fetched,
    message: &TaskMessage,
    (error, exception, eta): (String, Value, chrono::DateTime<Utc>),
    writes: &mut Writes,
) -> TaskResult {
    shared.counters.retried.fetch_add(1, Ordering::Relaxed);
    let traceback = format!(
        "Retry in {}s: {error}",
        (eta - Utc::now()).num_seconds().max(0)
    );
    tracing::warn!(task = %message.task, task_id = %message.id, retries = message.retries + 1, eta = %iso(eta),
        %error, "Task {}[{}] retry: {traceback}", message.task, message.id);
    writes.events.extend(shared.events.task_retried(
        &message.id,
        &format!("Retry({error:?})"),
        &traceback,
    ));
    writes.pushes.push((
        priority_key(&fetched.queue, message.envelope.priority()),
        message.retry_envelope(eta).to_vec(),
    ));
    task_result(
        message,
        results::RETRY,
        exception,
        Some(traceback),
        Vec::new(),
    )
}

/// How long a fetch under way at shutdown may take to finish (an idle wait is 250 ms; a batch one round trip).
pub(super) const FETCH_FINISH: Duration = Duration::from_secs(1);

/// How long a message being given back (shutdown, a foreign task) may wait for Redis; after that it stays in
/// `unacked` for the visibility-timeout restore.
pub(super) const REQUEUE_PATIENCE: Patience = Patience::Until(Duration::from_secs(2));

/// Another app's task reached this worker (a shared queue, a wrong route): give it back to the list it came from,
/// at the back, as Celery's `reject(requeue=True)` does — never a result, an event or a dead letter on its behalf.
pub(super) async fn give_back(
    shared: &Shared,
    fetched: &Fetched,
    tag: &str,
    envelope: &Envelope,
    task: &str,
) {
    shared.counters.foreign.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("aura360_celery_foreign_tasks_total", "queue" => fetched.queue.clone())
        .increment(1);
    match shared
        .broker
        .give_back(
            tag,
            envelope,
            GiveBack::Last { key: &fetched.key },
            REQUEUE_PATIENCE,
        )
        .await
    {
        Ok(_) => tracing::warn!(task, queue = %fetched.queue,
            "a task of another app reached this worker: given back to its queue (route our tasks to a queue of their own: docs/celery.md, \"Celery queues\")"),
        Err(error) => tracing::warn!(task, %error,
            "could not give a foreign task back; it stays in unacked and is restored after the visibility timeout"),
    }
}

/// A registered message whose task could not be read: `FAILURE` (when its id is known), dead letter, acknowledge.
pub(super) async fn dead_letter_unreadable(
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
        FailedTask {
            task_id: task_id.clone(),
            task,
            handler: None,
            error: &error,
        },
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

/// A task that failed for good: which one, in which handler (if known), and why.
pub(super) struct FailedTask<'a> {
    pub(super) task_id: Option<String>,
    pub(super) task: Option<String>,
    pub(super) handler: Option<String>,
    pub(super) error: &'a str,
}

/// Counts and logs `failure`, and adds its dead letter to `pushes` and its event to `events`.
pub(super) fn fail(
    shared: &Shared,
    fetched: &Fetched,
    failure: FailedTask<'_>,
    pushes: &mut Vec<(String, Vec<u8>)>,
    events: &mut Vec<Value>,
) {
    let FailedTask {
        task_id,
        task,
        handler,
        error,
    } = failure;
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
    let entry = DeadLetterEntry::new(
        Subject {
            queue: &fetched.queue,
            raw: &fetched.raw,
            delivery_tag: fetched.tag.as_deref(),
            task_id: task_id.as_deref(),
            task: task.as_deref(),
            handler: handler.as_deref(),
        },
        error,
    );
    pushes.push((dead_letter_key(&fetched.queue), entry.to_bytes()));
}

pub(super) fn task_result(
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

/// The dead letter of a message that is not a readable kombu envelope.
pub(super) fn unreadable_entry(queue: &str, raw: &[u8]) -> Vec<u8> {
    let reason = match Envelope::from_slice(raw) {
        Err(error) => error.to_string(),
        Ok(_) => "envelope has no properties.delivery_tag".to_owned(),
    };
    DeadLetterEntry::new(
        Subject {
            queue,
            raw,
            ..Subject::default()
        },
        &reason,
    )
    .to_bytes()
}

pub(super) fn exception_for(error: &MessageError) -> Value {
    let kind = match error {
        MessageError::UnsupportedContentType(_) => "ContentDisallowed",
        _ => "DecodeError",
    };
    exception(kind, "aura360.errors", &error.to_string())
}
