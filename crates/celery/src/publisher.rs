//! `publish_event` on Celery: each event becomes the task docs/design.md §2 names for its type, written as
//! `app.send_task(name, args=[event])` writes it, so Python workers take it like any other.
//!
//! Inside a task run by our worker, the publisher does not push right away: it *stages* the message in the
//! running task's [`TaskScope`] (a tokio task-local) and the worker pushes every staged message in the same
//! `MULTI` that acknowledges the input. Outputs and acknowledgement then happen together or not at all — a crash
//! in between can neither lose the outputs nor send them twice. The scope also carries the running task's id, so
//! produced tasks get `parent_id` = that id and `root_id` = its root, as Celery chains them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aura_runtime::events::{Event, routing};
use aura_runtime::{Backend, PublishError, Publisher};
use serde_json::Map;

use crate::events::host_name;
use crate::protocol::{OutgoingTask, TaskOptions, build_task};
use crate::transport::{Broker, Patience};

tokio::task_local! {
    static SCOPE: Arc<TaskScope>;
}

/// The task being run: who produced tasks descend from, and what they are, until the worker commits them.
#[derive(Debug)]
pub struct TaskScope {
    pub task_id: String,
    pub root_id: String,
    staged: Mutex<Vec<OutgoingTask>>,
}

impl TaskScope {
    pub fn new(task_id: impl Into<String>, root_id: impl Into<String>) -> Self {
        Self {
            task_id: task_id.into(),
            root_id: root_id.into(),
            staged: Mutex::new(Vec::new()),
        }
    }

    /// The messages staged so far, leaving none.
    pub fn take(&self) -> Vec<OutgoingTask> {
        self.staged
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }

    fn stage(&self, task: OutgoingTask) {
        if let Ok(mut staged) = self.staged.lock() {
            staged.push(task);
        }
    }

    /// Runs `future` with this scope current.
    pub async fn run<F: std::future::Future>(self: &Arc<Self>, future: F) -> F::Output {
        SCOPE.scope(self.clone(), future).await
    }
}

/// The Celery publisher (`MESSAGING_BACKEND=celery`).
pub struct CeleryPublisher {
    broker: Arc<Broker>,
    queue: String,
    origin: String,
    reply_to: String,
}

impl CeleryPublisher {
    /// Publishes to `queue` (the first of `CELERY_QUEUES`).
    pub fn new(broker: Arc<Broker>, queue: impl Into<String>) -> Self {
        Self {
            broker,
            queue: queue.into(),
            origin: format!("gen{}@{}", std::process::id(), host_name()),
            reply_to: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// The message for `event`, chained to the task being run, if any.
    pub fn message_for(&self, event: &Event) -> Result<OutgoingTask, PublishError> {
        let task =
            routing::task_for(&event.event_type).ok_or_else(|| PublishError::Unroutable {
                event_type: event.event_type.clone(),
                event_id: event.event_id.to_string(),
                reason: "no Celery task is defined for this event type".into(),
            })?;
        let (parent_id, root_id) = SCOPE
            .try_with(|scope| (Some(scope.task_id.clone()), Some(scope.root_id.clone())))
            .unwrap_or((None, None));
        let options = TaskOptions {
            queue: self.queue.clone(),
            parent_id,
            root_id,
            origin: self.origin.clone(),
            reply_to: self.reply_to.clone(),
            ..TaskOptions::default()
        };
        Ok(build_task(
            task,
            std::slice::from_ref(event),
            &Map::new(),
            &options,
        ))
    }
}

#[async_trait]
impl Publisher for CeleryPublisher {
    fn backend(&self) -> Backend {
        Backend::Celery
    }

    async fn publish(&self, event: &Event) -> Result<(), PublishError> {
        let message = self.message_for(event)?;
        if let Ok(()) = SCOPE.try_with(|scope| scope.stage(message.clone())) {
            return Ok(());
        }
        self.broker
            .push(
                &message.queue,
                message.priority,
                &message.envelope.to_vec(),
                Patience::Until(Duration::from_secs(10)),
            )
            .await
            .map_err(|error| PublishError::Unavailable {
                backend: "celery",
                event_type: event.event_type.clone(),
                event_id: event.event_id.to_string(),
                reason: error.to_string(),
            })
    }
}
