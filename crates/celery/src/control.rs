//! Remote control (`celery inspect ping`, `stats`, `active`, …; Flower's worker pages) over kombu's pidbox.
//!
//! Requests are fanout messages published on `/<db>.celery.pidbox`; every worker reads them and answers those
//! addressed to it (`destination` null or naming its hostname). An answer `{"<hostname>": <reply>}` is a message on
//! the direct exchange `reply.celery.pidbox`: kombu looks up the queues bound with the request's reply routing key
//! in `_kombu.binding.reply.celery.pidbox` and `LPUSH`es to each — the client `BRPOP`s its reply queue.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::events::EventSender;
use crate::protocol::Envelope;
use crate::pyjson;
use crate::transport::RedisLink;

/// A running task as `inspect active` lists it; kept light (the JSON is built only when asked).
#[derive(Debug, Clone)]
pub struct ActiveTask {
    id: String,
    name: String,
    argsrepr: Option<String>,
    kwargsrepr: Option<String>,
    routing_key: String,
    priority: u8,
    redelivered: bool,
    time_start: f64,
}

impl ActiveTask {
    pub fn new(
        fetched: &crate::transport::Fetched,
        message: &crate::protocol::TaskMessage,
    ) -> Self {
        let envelope = &message.envelope;
        Self {
            id: message.id.clone(),
            name: message.task.clone(),
            argsrepr: envelope.header_str("argsrepr").map(str::to_owned),
            kwargsrepr: envelope.header_str("kwargsrepr").map(str::to_owned),
            routing_key: fetched.queue.clone(),
            priority: envelope.priority(),
            redelivered: envelope
                .headers
                .get("redelivered")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            time_start: crate::transport::now_secs(),
        }
    }

    fn to_json(&self, hostname: &str, pid: u32) -> Value {
        json!({
            "id": self.id, "name": self.name, "args": self.argsrepr, "kwargs": self.kwargsrepr, "type": self.name,
            "hostname": hostname, "time_start": self.time_start, "acknowledged": false,
            "delivery_info": {"exchange": "", "routing_key": self.routing_key, "priority": self.priority,
                              "redelivered": self.redelivered},
            "worker_pid": pid,
        })
    }
}

/// Celery's revoked-id `LimitedSet`: at most `REVOKES_MAX` ids (50,000), each forgotten `REVOKE_EXPIRES` (3 h)
/// after it was revoked; the oldest go first when it is full.
#[derive(Default)]
pub struct RevokedSet {
    ids: HashMap<String, Instant>,
    order: std::collections::VecDeque<(String, Instant)>,
}

impl RevokedSet {
    pub const MAX: usize = 50_000;
    pub const EXPIRES: Duration = Duration::from_secs(3 * 3600);

    pub fn insert(&mut self, id: String, now: Instant) {
        self.purge(now);
        if self.ids.contains_key(&id) {
            return;
        }
        self.ids.insert(id.clone(), now);
        self.order.push_back((id, now));
        while self.order.len() > Self::MAX {
            if let Some((oldest, _)) = self.order.pop_front() {
                self.ids.remove(&oldest);
            }
        }
    }

    pub fn contains(&mut self, id: &str, now: Instant) -> bool {
        self.purge(now);
        self.ids.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn ids(&self) -> Vec<String> {
        self.order.iter().map(|(id, _)| id.clone()).collect()
    }

    fn purge(&mut self, now: Instant) {
        while let Some((id, at)) = self.order.front() {
            if now.duration_since(*at) < Self::EXPIRES {
                break;
            }
            self.ids.remove(id);
            self.order.pop_front();
        }
    }
}

/// What remote control reports about the worker; updated by the worker as tasks start and finish.
pub struct ControlState {
    pub queues: Vec<String>,
    pub registered: Vec<String>,
    pub concurrency: usize,
    pub prefetch: usize,
    started: Instant,
    active: Mutex<HashMap<String, ActiveTask>>,
    totals: Mutex<BTreeMap<String, u64>>,
    revoked: Mutex<RevokedSet>,
}

impl ControlState {
    pub fn new(
        queues: Vec<String>,
        registered: Vec<String>,
        concurrency: usize,
        prefetch: usize,
    ) -> Self {
        Self {
            queues,
            registered,
            concurrency,
            prefetch,
            started: Instant::now(),
            active: Mutex::new(HashMap::new()),
            totals: Mutex::new(BTreeMap::new()),
            revoked: Mutex::new(RevokedSet::default()),
        }
    }

    pub fn task_started(&self, id: &str, info: ActiveTask) {
        if let Ok(mut active) = self.active.lock() {
            active.insert(id.to_owned(), info);
        }
    }

    pub fn task_finished(&self, id: &str, name: &str) {
        if let Ok(mut active) = self.active.lock() {
            active.remove(id);
        }
        if let Ok(mut totals) = self.totals.lock() {
            *totals.entry(name.to_owned()).or_default() += 1;
        }
    }

    /// Whether `revoke` named this task id (it is then not run: `REVOKED`).
    pub fn is_revoked(&self, id: &str) -> bool {
        self.revoked
            .lock()
            .map(|mut r| r.contains(id, Instant::now()))
            .unwrap_or(false)
    }

    fn reply(&self, method: &str, arguments: &Value, events: &EventSender) -> Option<Value> {
        let hostname = &events.identity().hostname;
        Some(match method {
            "ping" => json!({"ok": "pong"}),
            "clock" => json!({"clock": events.tick()}),
            "hello" => {
                if arguments.get("from_node").and_then(Value::as_str) == Some(hostname.as_str()) {
                    return None;
                }
                json!({"revoked": self.revoked.lock().map(|r| r.ids()).unwrap_or_default(),
                       "clock": events.tick()})
            }
            "stats" => {
                let totals = self.totals.lock().map(|t| t.clone()).unwrap_or_default();
                json!({
                    "total": totals,
                    "pid": events.identity().pid,
                    "clock": events.tick().to_string(),
                    "uptime": self.started.elapsed().as_secs(),
                    "pool": {"implementation": "tokio", "max-concurrency": self.concurrency,
                             "processes": [events.identity().pid], "timeouts": [0, 0]},
                    "prefetch_count": self.prefetch,
                    "sw_ident": events.identity().sw_ident,
                    "sw_ver": events.identity().sw_ver,
                    "broker": {"transport": "redis"},
                    "rusage": {},
                })
            }
            "active" => Value::Array(
                self.active
                    .lock()
                    .map(|a| a.values().map(|t| t.to_json(hostname, events.identity().pid)).collect())
                    .unwrap_or_default(),
            ),
            "active_queues" => Value::Array(
                self.queues
                    .iter()
                    .map(|q| {
                        json!({"name": q, "exchange": {"name": q, "type": "direct", "arguments": null,
                               "durable": true, "passive": false, "auto_delete": false, "delivery_mode": null,
                               "no_declare": false}, "routing_key": q, "queue_arguments": null,
                               "binding_arguments": null, "consumer_arguments": null, "durable": true,
                               "exclusive": false, "auto_delete": false, "no_ack": false, "alias": null,
                               "bindings": [], "no_declare": null, "expires": null, "message_ttl": null,
                               "max_length": null, "max_length_bytes": null, "max_priority": null})
                    })
                    .collect(),
            ),
            "registered" => json!(self.registered),
            "scheduled" | "reserved" => json!([]),
            "revoked" => json!(self.revoked.lock().map(|r| r.ids()).unwrap_or_default()),
            "revoke" => {
                let ids: Vec<String> = match arguments.get("task_id") {
                    Some(Value::String(id)) => vec![id.clone()],
                    Some(Value::Array(ids)) => ids.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
                    _ => Vec::new(),
                };
                if let Ok(mut revoked) = self.revoked.lock() {
                    let now = Instant::now();
                    for id in &ids {
                        revoked.insert(id.clone(), now);
                    }
                }
                json!({"ok": format!("tasks {} flagged as revoked", ids.join(", "))})
            }
            "conf" => json!({"worker_concurrency": self.concurrency, "task_acks_late": true}),
            "report" => json!({"ok": format!("{} (aura360 vectordb-worker)", events.identity().sw_ver)}),
            other => json!({"error": format!("No such method: {other}")}),
        })
    }
}

/// Answers remote-control requests until `shutdown`, resubscribing after connection loss.
pub async fn serve_control(
    link: Arc<RedisLink>,
    events: Arc<EventSender>,
    state: Arc<ControlState>,
    shutdown: CancellationToken,
) {
    let channel = format!("/{}.celery.pidbox", link.db());
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let subscribed = async {
            let mut pubsub = link.client().get_async_pubsub().await?;
            pubsub.psubscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        }
        .await;
        let mut pubsub = match subscribed {
            Ok(pubsub) => {
                failures = 0;
                pubsub
            }
            Err(error) => {
                failures += 1;
                let delay = Duration::from_millis((200 * u64::from(failures)).min(5_000));
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "remote control: subscribing failed");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                message = messages.next() => match message {
                    Some(message) => handle(&link, &events, &state, message.get_payload_bytes()).await,
                    None => {
                        tracing::warn!("remote control: subscription lost; resubscribing");
                        break;
                    }
                },
            }
        }
    }
}

/// A pidbox reply as kombu writes one: the reply under its worker's name, base64 in a JSON envelope.
fn reply_envelope(
    body: Value,
    ticket: Value,
    clock: u64,
    (exchange, routing_key): (&str, &str),
) -> Vec<u8> {
    let envelope = json!({
        "body": base64::engine::general_purpose::STANDARD.encode(pyjson::to_vec(&body)),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"ticket": ticket, "clock": clock},
        "properties": {
            "delivery_mode": 1,
            "delivery_info": {"exchange": exchange, "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": Uuid::new_v4().to_string(),
        },
    });
    pyjson::to_vec(&envelope)
}

async fn handle(link: &RedisLink, events: &EventSender, state: &ControlState, payload: &[u8]) {
    let request = match Envelope::from_slice(payload)
        .ok()
        .and_then(|envelope| envelope.body_bytes().ok())
        .and_then(|body| serde_json::from_slice::<Value>(&body).ok())
    {
        Some(request) => request,
        None => {
            tracing::warn!("remote control: unreadable request ignored");
            return;
        }
    };
    let hostname = &events.identity().hostname;
    if let Some(destination) = request.get("destination").and_then(Value::as_array)
        && !destination.is_empty()
        && !destination
            .iter()
            .any(|d| d.as_str() == Some(hostname.as_str()))
    {
        return;
    }
    let method = request.get("method").and_then(Value::as_str).unwrap_or("");
    let arguments = request.get("arguments").cloned().unwrap_or(Value::Null);
    if method == "heartbeat" {
        let _ = events.send_worker_event("worker-heartbeat").await;
        return;
    }
    let Some(reply) = state.reply(method, &arguments, events) else {
        return;
    };
    let Some(reply_to) = request.get("reply_to") else {
        return;
    };
    let exchange = reply_to
        .get("exchange")
        .and_then(Value::as_str)
        .unwrap_or("reply.celery.pidbox");
    let routing_key = reply_to
        .get("routing_key")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let ticket = request.get("ticket").cloned().unwrap_or(Value::Null);
    let payload = reply_envelope(
        json!({hostname.as_str(): reply}),
        ticket,
        events.tick(),
        (exchange, routing_key),
    );
    let result = crate::transport::deliver_direct(link, exchange, routing_key, &payload).await;
    match result {
        Ok(()) => tracing::debug!(method, "remote control: replied"),
        Err(error) => tracing::warn!(method, %error, "remote control: reply failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_revoked_set_keeps_at_most_50000_ids_and_forgets_them_after_3_hours() {
        let mut set = RevokedSet::default();
        let start = Instant::now();
        for i in 0..(RevokedSet::MAX + 10) {
            set.insert(format!("id-{i}"), start);
        }
        assert_eq!(set.len(), RevokedSet::MAX);
        assert!(!set.contains("id-0", start), "the oldest ids go first");
        assert!(set.contains("id-50009", start));
        set.insert("id-50009".into(), start);
        assert_eq!(set.len(), RevokedSet::MAX);
        let later = start + RevokedSet::EXPIRES + Duration::from_secs(1);
        assert!(!set.contains("id-50009", later));
        assert!(set.is_empty());
    }
}
