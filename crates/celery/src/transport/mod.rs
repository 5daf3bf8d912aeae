//! kombu's Redis transport: queues as lists, `BRPOP` consumption, the `unacked` bookkeeping that lets any worker —
//! ours or Python's — restore what a dead worker had taken, and reconnection.
//!
//! Keys, as kombu names them (and a Python worker reads them):
//! - `<queue>` and its priority lists `<queue>\x06\x16<p>` for p = 3, 6, 9; producers `LPUSH`, consumers `BRPOP`
//!   over all four in that order (0 is the highest priority on Redis);
//! - `unacked_index` (zset tag → fetch time) and `unacked` (hash tag → `[envelope, exchange, routing_key]`),
//!   written when a message is taken, removed when it is acknowledged;
//! - `unacked_mutex`: whoever holds it may push entries older than the visibility timeout back on their queue.
//!
//! Departures from kombu, all invisible to Python peers: when messages are waiting we take up to a prefetch
//! batch in one Lua script that pops and registers each in `unacked` atomically (kombu takes one per `BRPOP` and
//! registers it in a second round trip, leaving a window where a crash loses it; we keep that window only for
//! the message a blocking `BRPOP` returns on an idle queue), and a restore only pushes an entry back if it is
//! still the same entry (a compare-and-set script), so two restorers never duplicate a message.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, Pipeline, RedisError, Script, ScriptInvocation,
    Value as RedisValue,
};
use tokio::sync::Mutex;

use crate::protocol::Envelope;

mod admin;
mod broker;
mod keys;
mod link;
mod restore;
mod scripts;

pub use admin::*;
pub use broker::*;
pub use keys::*;
pub use link::*;
pub use restore::*;
use scripts::*;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid Redis URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("Redis {what}: {source}")]
    Redis {
        what: &'static str,
        #[source]
        source: RedisError,
    },
    #[error("Redis refused {what}: {reason} (nothing was taken off the queue)")]
    Refused { what: &'static str, reason: String },
    #[error("Redis {what}: gave up after {attempts} attempts: {last}")]
    GaveUp {
        what: &'static str,
        attempts: u32,
        last: String,
    },
}

fn bulk_bytes(value: &RedisValue) -> Vec<u8> {
    match value {
        RedisValue::BulkString(bytes) => bytes.clone(),
        RedisValue::SimpleString(text) => text.clone().into_bytes(),
        _ => Vec::new(),
    }
}

fn bulk_string(value: &RedisValue) -> String {
    String::from_utf8_lossy(&bulk_bytes(value)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_round_down_to_kombus_steps() {
        assert_eq!(priority_key("celery", 0), "celery");
        assert_eq!(priority_key("celery", 2), "celery");
        assert_eq!(priority_key("celery", 5), "celery\x06\x163");
        assert_eq!(priority_key("celery", 6), "celery\x06\x166");
        assert_eq!(priority_key("celery", 200), "celery\x06\x169");
        assert_eq!(queue_keys("q")[3], "q\x06\x169");
    }

    #[test]
    fn unacked_entries_name_their_queue() {
        let entry = br#"[{"body": "", "headers": {}, "properties": {"delivery_info": {"exchange": "", "routing_key": "celery"}}}, "", "celery"]"#;
        let (_, exchange, routing_key) = parse_unacked_entry(entry).unwrap();
        assert_eq!((exchange.as_str(), routing_key.as_str()), ("", "celery"));
        assert!(parse_unacked_entry(b"not json").is_none());
    }

    #[test]
    fn broker_urls_of_every_form_open_and_name_their_database() {
        for (url, db) in [
            ("redis://localhost:6379/0", 0),
            ("redis://:s3cret@redis.internal:6380/3", 3),
            ("redis://user:s3cret@10.0.0.5/7", 7),
            ("rediss://:s3cret@cache.example.com:6380/1", 1),
            ("redis://localhost", 0),
        ] {
            let link =
                RedisLink::open(url, "shown".into(), None).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(link.db(), db, "{url}");
            assert!(!format!("{link:?}").contains("s3cret"));
        }
        let error = RedisLink::open("http://nope", "http://nope".into(), None).unwrap_err();
        assert!(error.to_string().contains("invalid Redis URL"), "{error}");
    }

    #[test]
    fn backoff_grows_to_five_seconds() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(400));
        assert_eq!(backoff(20), Duration::from_secs(5));
    }
}
