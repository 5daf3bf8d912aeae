//! A `<queue>.dlq` entry: why a task failed for good, and the original message, unchanged — written by the worker,
//! read back by `vectordb replay --celery-dlq` (which pushes `message` onto `queue` again).

use aura_runtime::exact;
use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::protocol::iso;
use crate::pyjson;

/// Every field may be missing when an entry is read back (an entry another writer pushed): a missing `queue` is
/// the queue being replayed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeadLetterEntry {
    pub task_id: Option<String>,
    pub task: Option<String>,
    pub queue: String,
    /// The handler that failed (`None`: the message could not be read far enough to know).
    pub handler: Option<String>,
    pub error: String,
    pub delivery_tag: Option<String>,
    /// ISO 8601, UTC.
    pub failed_at: String,
    /// The original message when it is UTF-8 (every kombu envelope is) …
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// … else its bytes in base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_base64: Option<String>,
}

/// What a dead letter is about: the message as taken from `queue`, and what is known of its task.
#[derive(Clone, Copy, Debug, Default)]
pub struct Subject<'a> {
    pub queue: &'a str,
    pub raw: &'a [u8],
    pub delivery_tag: Option<&'a str>,
    pub task_id: Option<&'a str>,
    pub task: Option<&'a str>,
    pub handler: Option<&'a str>,
}

impl DeadLetterEntry {
    /// The entry for `subject`, failed now with `error`.
    pub fn new(subject: Subject<'_>, error: &str) -> Self {
        let (message, message_base64) = exact::split(subject.raw);
        Self {
            task_id: subject.task_id.map(str::to_owned),
            task: subject.task.map(str::to_owned),
            queue: subject.queue.to_owned(),
            handler: subject.handler.map(str::to_owned),
            error: error.to_owned(),
            delivery_tag: subject.delivery_tag.map(str::to_owned),
            failed_at: iso(Utc::now()),
            message,
            message_base64,
        }
    }

    /// The entry as Python's `json` writes it (what a Python reader of the list expects).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_value(self).map_or_else(|_| b"{}".to_vec(), |v| pyjson::to_vec(&v))
    }

    /// An entry read back; `None` when it is not one of ours.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    /// The original message's bytes.
    pub fn message_bytes(&self) -> Option<Vec<u8>> {
        exact::join(self.message.as_deref(), self.message_base64.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_keeps_the_original_bytes_whatever_they_are() {
        for raw in [&b"{\"body\": \"x\"}"[..], &[0xff, 0xfe, 0x00][..]] {
            let entry = DeadLetterEntry::new(
                Subject {
                    queue: "vectordb",
                    raw,
                    task_id: Some("t-1"),
                    ..Subject::default()
                },
                "boom",
            );
            let back = DeadLetterEntry::from_slice(&entry.to_bytes()).unwrap();
            assert_eq!(back, entry);
            assert_eq!(back.message_bytes().as_deref(), Some(raw));
        }
    }
}
