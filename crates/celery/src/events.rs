//! Celery monitoring events, so Flower, `celery events` and `app.events.Receiver` see our worker and its tasks.
//!
//! Events are kombu fanout messages: `PUBLISH /<db>.celeryev/<routing key>` of an envelope whose base64 body is the
//! event (or, for `task.multi`, a list of task events — Celery 5 batches them). Every event carries the worker's
//! `hostname`, `utcoffset`, `pid` and a Lamport `clock`; `worker-heartbeat` every 2 s (`freq`) keeps the worker
//! "online" in Flower, which marks it offline after missing a few.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use base64::Engine as _;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::protocol::{TaskMessage, iso, saferepr};
use crate::pyjson;
use crate::transport::{Patience, RedisLink, TransportError, now_secs};

/// Seconds between heartbeats (Celery's default `freq`).
pub const HEARTBEAT_SECS: f64 = 2.0;

/// Who sends the events.
#[derive(Debug, Clone)]
pub struct WorkerIdentity {
    /// `name@host`, as Celery names nodes; the key Flower lists workers by.
    pub hostname: String,
    pub pid: u32,
    pub sw_ident: String,
    pub sw_ver: String,
}

impl WorkerIdentity {
    pub fn new(hostname: impl Into<String>) -> Self {
        Self {
            hostname: hostname.into(),
            pid: std::process::id(),
            sw_ident: "aura360-vectordb-worker".into(),
            sw_ver: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// The host name of this machine (`/proc/sys/kernel/hostname`, then `$HOSTNAME`, then `localhost`).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Counters a heartbeat reports and the remote-control `stats` reply reads.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    pub active: AtomicI64,
    pub processed: AtomicU64,
}

pub struct EventSender {
    link: Arc<RedisLink>,
    identity: WorkerIdentity,
    clock: AtomicU64,
    enabled: bool,
    pub counters: Arc<WorkerCounters>,
}

impl EventSender {
    /// `enabled: false` sends worker events only (heartbeats keep `celery inspect`-less monitoring working);
    /// task events are Celery's `-E`.
    pub fn new(link: Arc<RedisLink>, identity: WorkerIdentity, enabled: bool) -> Self {
        Self {
            link,
            identity,
            clock: AtomicU64::new(0),
            enabled,
            counters: Arc::new(WorkerCounters::default()),
        }
    }

    pub fn identity(&self) -> &WorkerIdentity {
        &self.identity
    }

    /// The next Lamport clock value (shared with remote-control replies).
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn event(&self, kind: &str, fields: impl IntoIterator<Item = (&'static str, Value)>) -> Value {
        let mut event = Map::new();
        event.insert("hostname".into(), json!(self.identity.hostname));
        event.insert("utcoffset".into(), json!(0.0));
        event.insert("pid".into(), json!(self.identity.pid));
        event.insert("clock".into(), json!(self.tick()));
        for (key, value) in fields {
            event.insert(key.into(), value);
        }
        event.insert("timestamp".into(), json!(now_secs()));
        event.insert("type".into(), json!(kind));
        Value::Object(event)
    }

    /// A task event, or `None` when task events are off (nothing is built then: this is on every task's path).
    fn task_event(
        &self,
        kind: &str,
        fields: impl IntoIterator<Item = (&'static str, Value)>,
    ) -> Option<Value> {
        self.enabled.then(|| self.event(kind, fields))
    }

    pub fn task_received(&self, task: &TaskMessage) -> Option<Value> {
        let headers = &task.envelope.headers;
        let repr = |key: &str, fallback: Value| {
            headers
                .get(key)
                .and_then(Value::as_str)
                .map(|s| json!(s))
                .unwrap_or_else(|| json!(saferepr(&fallback, 1024)))
        };
        self.task_event(
            "task-received",
            [
                ("uuid", json!(task.id)),
                ("name", json!(task.task)),
                (
                    "args",
                    repr("argsrepr", Value::Array(task.body.args.clone())),
                ),
                (
                    "kwargs",
                    repr("kwargsrepr", Value::Object(task.body.kwargs.clone())),
                ),
                ("root_id", json!(task.root_id)),
                ("parent_id", json!(task.parent_id)),
                ("retries", json!(task.retries)),
                ("eta", json!(task.eta.map(iso))),
                ("expires", json!(task.expires.map(iso))),
            ],
        )
    }

    pub fn task_started(&self, task_id: &str) -> Option<Value> {
        self.task_event("task-started", [("uuid", json!(task_id))])
    }

    /// `result_repr`: the result's `saferepr` (the worker logs the same string).
    pub fn task_succeeded(&self, task_id: &str, result_repr: &str, runtime: f64) -> Option<Value> {
        self.task_event(
            "task-succeeded",
            [
                ("uuid", json!(task_id)),
                ("result", json!(result_repr)),
                ("runtime", json!(runtime)),
            ],
        )
    }

    pub fn task_failed(&self, task_id: &str, exception: &str, traceback: &str) -> Option<Value> {
        self.task_error("task-failed", task_id, exception, traceback)
    }

    pub fn task_retried(&self, task_id: &str, exception: &str, traceback: &str) -> Option<Value> {
        self.task_error("task-retried", task_id, exception, traceback)
    }

    fn task_error(
        &self,
        kind: &str,
        task_id: &str,
        exception: &str,
        traceback: &str,
    ) -> Option<Value> {
        self.task_event(
            kind,
            [
                ("uuid", json!(task_id)),
                ("exception", json!(exception)),
                ("traceback", json!(traceback)),
            ],
        )
    }

    pub fn task_revoked(&self, task_id: &str, expired: bool) -> Option<Value> {
        self.task_event(
            "task-revoked",
            [
                ("uuid", json!(task_id)),
                ("terminated", json!(false)),
                ("signum", Value::Null),
                ("expired", json!(expired)),
            ],
        )
    }

    /// Publishes task events as one `task.multi` message (nothing if task events are off or none are given).
    pub async fn send_task_events(&self, events: Vec<Value>) -> Result<(), TransportError> {
        if !self.enabled || events.is_empty() {
            return Ok(());
        }
        self.publish("task.multi", &Value::Array(events)).await
    }

    /// `worker-online`, `worker-heartbeat` or `worker-offline`.
    pub async fn send_worker_event(&self, kind: &str) -> Result<(), TransportError> {
        let counters = &self.counters;
        let event = self.event(
            kind,
            [
                ("freq", json!(HEARTBEAT_SECS)),
                (
                    "active",
                    json!(counters.active.load(Ordering::Relaxed).max(0)),
                ),
                (
                    "processed",
                    json!(counters.processed.load(Ordering::Relaxed)),
                ),
                ("loadavg", json!(load_average())),
                ("sw_ident", json!(self.identity.sw_ident)),
                ("sw_ver", json!(self.identity.sw_ver)),
                ("sw_sys", json!(std::env::consts::OS)),
            ],
        );
        let routing_key = kind.replace('-', ".");
        self.publish(&routing_key, &event).await
    }

    async fn publish(&self, routing_key: &str, body: &Value) -> Result<(), TransportError> {
        let channel = format!("/{}.celeryev/{routing_key}", self.link.db());
        let envelope = json!({
            "body": base64::engine::general_purpose::STANDARD.encode(pyjson::to_vec(body)),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"hostname": self.identity.hostname},
            "properties": {
                "delivery_mode": 1,
                "delivery_info": {"exchange": "celeryev", "routing_key": routing_key},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": Uuid::new_v4().to_string(),
            },
        });
        let payload = pyjson::to_vec(&envelope);
        let mut pipe = redis::pipe();
        pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
        self.link
            .pipe::<()>(
                "publish event",
                Patience::Until(std::time::Duration::from_secs(2)),
                &pipe,
            )
            .await
    }
}

fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut values = text.split_whitespace().take(3).map(|v| {
        v.parse::<f64>()
            .map(|x| (x * 100.0).round() / 100.0)
            .unwrap_or(0.0)
    });
    [
        values.next().unwrap_or(0.0),
        values.next().unwrap_or(0.0),
        values.next().unwrap_or(0.0),
    ]
}
