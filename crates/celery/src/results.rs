//! Celery's Redis result backend, as Python's `RedisBackend` writes it, so `AsyncResult(id).get()` works.
//!
//! `SETEX celery-task-meta-<id> <result_expires> <meta>` then `PUBLISH celery-task-meta-<id> <meta>` (the Python
//! client subscribes to that channel while it waits), with `meta` = `{status, result, traceback, children,
//! date_done, [parent_id,] task_id}` in that key order. Failures carry `{exc_type, exc_message: [..],
//! exc_module}`, from which Celery rebuilds an exception instance on the caller's side.

use std::time::Duration;

use chrono::Utc;
use serde_json::{Map, Value, json};

use crate::protocol::iso;
use crate::pyjson;
use crate::transport::{Patience, RedisLink, TransportError};

pub const SUCCESS: &str = "SUCCESS";
pub const FAILURE: &str = "FAILURE";
pub const STARTED: &str = "STARTED";
pub const RETRY: &str = "RETRY";
pub const REVOKED: &str = "REVOKED";

/// The key (and channel) of a task's result.
pub fn meta_key(task_id: &str) -> String {
    format!("celery-task-meta-{task_id}")
}

/// An exception as Celery serialises it: the Python side raises `exc_module.exc_type(*exc_message)` (or a
/// synthesised class of that name when the module is not importable there).
pub fn exception(exc_type: &str, exc_module: &str, message: &str) -> Value {
    json!({"exc_type": exc_type, "exc_message": [message], "exc_module": exc_module})
}

/// One state to store for one task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskResult {
    pub task_id: String,
    pub status: &'static str,
    pub result: Value,
    pub traceback: Option<String>,
    /// Tasks this one sent, as Celery lists them: `[[[id, null], null], …]`.
    pub children: Vec<String>,
    pub parent_id: Option<String>,
    pub done: bool,
}

impl TaskResult {
    /// The JSON the Python backend writes, byte for byte in its format.
    pub fn to_meta(&self) -> Vec<u8> {
        let mut meta = Map::new();
        meta.insert("status".into(), json!(self.status));
        meta.insert("result".into(), self.result.clone());
        meta.insert("traceback".into(), json!(self.traceback));
        meta.insert(
            "children".into(),
            Value::Array(
                self.children
                    .iter()
                    .map(|id| json!([[id, null], null]))
                    .collect(),
            ),
        );
        meta.insert(
            "date_done".into(),
            if self.done {
                json!(iso(Utc::now()))
            } else {
                Value::Null
            },
        );
        if let Some(parent) = &self.parent_id {
            meta.insert("parent_id".into(), json!(parent));
        }
        meta.insert("task_id".into(), json!(self.task_id));
        pyjson::to_vec(&Value::Object(meta))
    }
}

/// `RESULT_BACKEND`: where results go. Writes are batched: one pipeline for many tasks.
#[derive(Debug)]
pub struct ResultBackend {
    link: RedisLink,
    expires: Duration,
}

impl ResultBackend {
    pub fn open(url: &str, redacted: String, expires: Duration) -> Result<Self, TransportError> {
        Ok(Self {
            link: RedisLink::open(url, redacted, Some(Duration::from_secs(10)))?,
            expires,
        })
    }

    /// Stores every result (`SETEX` + `PUBLISH` each) in one round trip.
    pub async fn store(
        &self,
        results: &[TaskResult],
        patience: Patience,
    ) -> Result<(), TransportError> {
        if results.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let expires = self.expires.as_secs().max(1);
        for result in results {
            let key = meta_key(&result.task_id);
            let meta = result.to_meta();
            pipe.cmd("SETEX").arg(&key).arg(expires).arg(&meta).ignore();
            pipe.cmd("PUBLISH").arg(&key).arg(&meta).ignore();
        }
        self.link.pipe::<()>("store results", patience, &pipe).await
    }

    /// Reads a stored result (tests and the admin CLI).
    pub async fn get(&self, task_id: &str) -> Result<Option<Value>, TransportError> {
        let mut get = redis::cmd("GET");
        get.arg(meta_key(task_id));
        let raw: Option<Vec<u8>> = self
            .link
            .query("read result", Patience::Until(Duration::from_secs(5)), &get)
            .await?;
        Ok(raw.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_reads_like_pythons() {
        let result = TaskResult {
            task_id: "t1".into(),
            status: FAILURE,
            result: exception("ValueError", "builtins", "embedding endpoint returned 503"),
            traceback: None,
            children: vec!["c1".into()],
            parent_id: Some("p1".into()),
            done: false,
        };
        assert_eq!(
            String::from_utf8(result.to_meta()).unwrap(),
            r#"{"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["embedding endpoint returned 503"], "exc_module": "builtins"}, "traceback": null, "children": [[["c1", null], null]], "date_done": null, "parent_id": "p1", "task_id": "t1"}"#
        );
    }
}
