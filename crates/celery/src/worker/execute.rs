//! Running one message: its eta and slot, the handler under its time limit, and the verdict.

use super::*;

/// How one message ended, before it is written.
pub(super) enum Verdict {
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
pub(super) struct Held<'a> {
    pub(super) shared: &'a Shared,
    pub(super) tag: String,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Ok(mut held) = self.shared.held.lock() {
            held.remove(&self.tag);
        }
    }
}

/// A running task in `/inspect active` and the `active` count of heartbeats, until dropped (also by a panic).
pub(super) struct Active<'a> {
    pub(super) shared: &'a Shared,
    pub(super) id: &'a str,
    pub(super) task: &'a str,
}

impl<'a> Active<'a> {
    pub(super) fn start(shared: &'a Shared, fetched: &Fetched, message: &'a TaskMessage) -> Self {
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
pub(super) async fn process(
    shared: &Shared,
    fetched: Fetched,
    mut prefetch_slot: Option<OwnedSemaphorePermit>,
) {
    let Some(tag) = fetched.tag.clone() else {
        return quarantined(shared, fetched).await;
    };
    let _held = Held {
        shared,
        tag: tag.clone(),
    };
    let Some(mut message) = read(shared, &fetched, &tag).await else {
        return;
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
pub(super) fn time_limit(seconds: Option<f64>) -> Option<Duration> {
    seconds
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .filter(|d| !d.is_zero())
}

/// Not an envelope we could read: the fetch moved it to `<queue>.unreadable`; dead-letter it from there.
async fn quarantined(shared: &Shared, fetched: Fetched) {
    let entry = unreadable_entry(&fetched.queue, &fetched.raw);
    tracing::error!(queue = %fetched.queue, "unreadable message dead-lettered");
    shared
        .counters
        .dead_lettered
        .fetch_add(1, Ordering::Relaxed);
    metrics::counter!("aura360_dead_letters_total", "backend" => "celery", "handler" => "decode")
        .increment(1);
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
}

/// The task message, within the size limit; `None` when it could not be read (given back if it is another app's,
/// else dead-lettered — done here).
async fn read(shared: &Shared, fetched: &Fetched, tag: &str) -> Option<TaskMessage> {
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
    let (envelope, error) = match parsed {
        Ok(message) => return Some(message),
        Err(unreadable) => unreadable,
    };
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
        give_back(shared, fetched, tag, envelope, name).await;
        return None;
    }
    dead_letter_unreadable(shared, fetched, tag, task_id, task, &error).await;
    None
}

/// Runs the message (or decides not to) and says how it ended.
pub(super) async fn decide(
    shared: &Shared,
    fetched: &Fetched,
    message: &TaskMessage,
    args: Vec<Value>,
    prefetch_slot: &mut Option<OwnedSemaphorePermit>,
    events: &mut Vec<Value>,
) -> Verdict {
    let expected_type = match admit(shared, message, events) {
        Ok(expected_type) => expected_type,
        Err(verdict) => return verdict,
    };
    let _slot = match wait_turn(shared, message, prefetch_slot).await {
        Ok(slot) => slot,
        Err(verdict) => return verdict,
    };
    tracing::info!(task = %message.task, task_id = %message.id, "Task {}[{}] received", message.task, message.id);
    let (event, handler) = match route(shared, message, args, expected_type) {
        Ok(routed) => routed,
        Err(verdict) => return verdict,
    };
    mark_started(shared, message, events).await;
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
    let run = scope.run(shared.dispatcher.dispatch(&event));
    let outcome = tokio::select! {
        outcome = async {
            match time_limit(limit_seconds) {
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
            Verdict::Fail {
                handler: Some(handler.to_owned()),
                exception: exception(
                    "TimeLimitExceeded",
                    "billiard.exceptions",
                    &seconds.to_string(),
                ),
                error: format!("TimeLimitExceeded({seconds})"),
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
        Some(Err(failure)) => after_failure(shared, message, failure),
    }
}

/// Whether this worker runs `message` at all: the event type its task carries, or the verdict (not ours, not
/// registered, revoked, expired).
fn admit(
    shared: &Shared,
    message: &TaskMessage,
    events: &mut Vec<Value>,
) -> Result<&'static str, Verdict> {
    let Some(expected_type) = routing::event_type_for_task(&message.task) else {
        if routing::is_pipeline_task(&message.task) {
            return Err(Verdict::Fail {
                handler: None,
                error: format!(
                    "Task of kind '{}' is not registered with this worker",
                    message.task
                ),
                exception: exception("NotRegistered", "celery.exceptions", &message.task),
            });
        }
        shared.foreign_streak.fetch_add(1, Ordering::Relaxed);
        return Err(Verdict::Foreign);
    };
    shared.foreign_streak.store(0, Ordering::Relaxed);
    events.extend(shared.events.task_received(message));
    revoked_or_expired(shared, message).map_or(Ok(expected_type), Err)
}

fn revoked_or_expired(shared: &Shared, message: &TaskMessage) -> Option<Verdict> {
    if shared.control.is_revoked(&message.id) {
        Some(Verdict::Revoked { expired: false })
    } else if message.expires.is_some_and(|expires| expires <= Utc::now()) {
        Some(Verdict::Revoked { expired: true })
    } else {
        None
    }
}

/// Waits for the task's eta (its prefetch permit given back meanwhile), then for one of `concurrency` slots.
async fn wait_turn(
    shared: &Shared,
    message: &TaskMessage,
    prefetch_slot: &mut Option<OwnedSemaphorePermit>,
) -> Result<OwnedSemaphorePermit, Verdict> {
    if let Some(eta) = message.eta {
        let wait = (eta - Utc::now()).to_std().unwrap_or_default();
        if !wait.is_zero() {
            let Ok(room) = shared.eta_room.clone().try_acquire_owned() else {
                return Err(Verdict::Delay { eta });
            };
            // Celery raises its prefetch count for a scheduled task; we give its permit back while it waits, so
            // due tasks keep flowing, and `eta_room` bounds how many wait.
            drop(prefetch_slot.take());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shared.stopping.cancelled() => return Err(Verdict::Requeue),
            }
            drop(room);
            *prefetch_slot = tokio::select! {
                permit = shared.prefetch.clone().acquire_owned() => match permit {
                    Ok(permit) => Some(permit),
                    Err(_) => return Err(Verdict::Requeue),
                },
                _ = shared.stopping.cancelled() => return Err(Verdict::Requeue),
            };
        }
    }
    let slot = tokio::select! {
        slot = shared.slots.clone().acquire_owned() => slot.map_err(|_| Verdict::Requeue)?,
        _ = shared.stopping.cancelled() => return Err(Verdict::Requeue),
    };
    // Checked again: a task can expire, or be revoked, while it waits for its eta or a slot.
    revoked_or_expired(shared, message).map_or(Ok(slot), Err)
}

/// The event and the handler that runs it, or the verdict: unreadable, parked, or skipped (no handler knows it).
fn route(
    shared: &Shared,
    message: &TaskMessage,
    args: Vec<Value>,
    expected_type: &str,
) -> Result<(Event, &'static str), Verdict> {
    let event = decode_event(message, args, expected_type).map_err(|error| Verdict::Fail {
        handler: None,
        exception: exception("InvalidEvent", "aura360.errors", &error),
        error,
    })?;
    match shared.registry.route(&event.event_type) {
        Route::Disabled(name) => Err(Verdict::Park { handler: name }),
        // As on Kafka (where `aura360.user.events` carries every `user.*` type): an event type no handler knows is
        // skipped, counted and acknowledged, never failed or dead-lettered.
        Route::Unhandled => {
            tracing::info!(event_id = %event.event_id, event_type = %event.event_type, "no handler for event type; skipped");
            aura_runtime::count_skipped();
            Err(skipped(shared, &event, 0.0))
        }
        Route::Handler(handler) => Ok((event, handler.name())),
    }
}

/// `STARTED` in the result backend (with `CELERY_TRACK_STARTED`) and the `task-started` event.
async fn mark_started(shared: &Shared, message: &TaskMessage, events: &mut Vec<Value>) {
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
}

/// A failed handler: retried later (transient, attempts left) or failed for good.
fn after_failure(shared: &Shared, message: &TaskMessage, failure: Failure) -> Verdict {
    let Failure { handler, error } = failure;
    let text = error.to_string();
    let handler = handler.map(str::to_owned);
    let policy = &shared.options.retry;
    let attempt = message.retries.saturating_add(1);
    if error.is_transient() && !policy.gives_up_after(attempt) {
        let delay = policy.delay(attempt);
        let eta = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
        return Verdict::Retry {
            exception: exception("TransientHandlerError", "aura360.errors", &text),
            error: text,
            eta,
        };
    }
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

/// The verdict on an event whose type no handler knows: a success whose result says it was skipped.
pub(super) fn skipped(shared: &Shared, event: &Event, runtime: f64) -> Verdict {
    shared.counters.skipped.fetch_add(1, Ordering::Relaxed);
    Verdict::Success {
        result: json!({"ok": true, "event_id": event.event_id.to_string(), "skipped": format!("no handler for event type {}", event.event_type), "produced": 0}),
        staged: Vec::new(),
        runtime,
    }
}

/// The task's single argument, the event, checked against the task it came with.
pub(super) fn decode_event(
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
