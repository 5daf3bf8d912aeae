//! librdkafka's log, through one rate-limited, deduplicated channel.
//!
//! With its broker unreachable, librdkafka reports the same problem from every client and every broker thread, many
//! times a millisecond (`vectordb check` printed 103 `ERROR` lines, most of them one `AllBrokersDown`, before its own
//! report). Every client of this crate uses [`LogContext`] (the consumer's `MountContext` forwards to it): a message is
//! logged the first time it is seen, repeats of it within [`REPEAT_WINDOW`] are only counted, and the first one after
//! the window is logged with how many were suppressed. Messages that differ only in numbers (a port, a duration, a
//! count of suppressed errors) are one message.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;

/// How long repeats of one message are counted instead of logged.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(60);

/// Distinct messages remembered at most (memory stays bounded whatever librdkafka says).
const MAX_REMEMBERED: usize = 1024;

struct Seen {
    logged_at: Instant,
    repeats: u64,
}

static SEEN: LazyLock<Mutex<HashMap<String, Seen>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// The client context of every producer, admin and offsets client: librdkafka's log lines and errors go through
/// [`emit`].
#[derive(Clone, Copy, Debug, Default)]
pub struct LogContext;

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self::error(&error, reason);
    }
}

impl ConsumerContext for LogContext {}

/// A librdkafka log line.
pub fn log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    let level = match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::Level::ERROR,
        RDKafkaLogLevel::Warning => tracing::Level::WARN,
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::Level::INFO,
        RDKafkaLogLevel::Debug => tracing::Level::DEBUG,
    };
    emit(level, fac, message);
}

/// A librdkafka error callback (`AllBrokersDown`, a broker transport failure, …).
pub fn error(error: &KafkaError, reason: &str) {
    emit(
        tracing::Level::ERROR,
        "ERROR",
        &format!("{error}: {reason}"),
    );
}

/// Logs `message` unless the same message was logged less than [`REPEAT_WINDOW`] ago (then it is counted).
pub fn emit(level: tracing::Level, fac: &str, message: &str) {
    let Some(repeats) = admit(&key(fac, message), Instant::now()) else {
        return;
    };
    let suffix = if repeats > 0 {
        format!(
            " ({repeats} more like it in the last {} s)",
            REPEAT_WINDOW.as_secs()
        )
    } else {
        String::new()
    };
    match level {
        tracing::Level::ERROR => tracing::error!(target: "librdkafka", "{fac} {message}{suffix}"),
        tracing::Level::WARN => tracing::warn!(target: "librdkafka", "{fac} {message}{suffix}"),
        tracing::Level::INFO => tracing::info!(target: "librdkafka", "{fac} {message}{suffix}"),
        _ => tracing::debug!(target: "librdkafka", "{fac} {message}{suffix}"),
    }
}

/// `Some(repeats since it was last logged)` when the message is to be logged now, `None` when it is a repeat.
fn admit(key: &str, now: Instant) -> Option<u64> {
    let mut seen = SEEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(entry) = seen.get_mut(key) {
        if now.duration_since(entry.logged_at) < REPEAT_WINDOW {
            entry.repeats += 1;
            return None;
        }
        let repeats = entry.repeats;
        *entry = Seen {
            logged_at: now,
            repeats: 0,
        };
        return Some(repeats);
    }
    if seen.len() >= MAX_REMEMBERED {
        seen.retain(|_, entry| now.duration_since(entry.logged_at) < REPEAT_WINDOW);
        if seen.len() >= MAX_REMEMBERED {
            seen.clear();
        }
    }
    seen.insert(
        key.to_owned(),
        Seen {
            logged_at: now,
            repeats: 0,
        },
    );
    Some(0)
}

/// One key per problem: the facility and the message with every number replaced, and librdkafka's own
/// `(after …ms in state …, N identical error(s) suppressed)` tail dropped.
fn key(fac: &str, message: &str) -> String {
    let message = message.split(" (after ").next().unwrap_or(message);
    let mut key = String::with_capacity(fac.len() + message.len() + 1);
    key.push_str(fac);
    key.push(' ');
    let mut in_number = false;
    for c in message.chars() {
        if c.is_ascii_digit() {
            if !in_number {
                key.push('#');
            }
            in_number = true;
        } else {
            in_number = false;
            key.push(c);
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_that_differ_only_in_numbers_are_one_problem() {
        let a = key(
            "FAIL",
            "sasl_ssl://127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: Connection refused (after 0ms in state CONNECT)",
        );
        let b = key(
            "FAIL",
            "sasl_ssl://127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: Connection refused (after 3ms in state CONNECT, 1 identical error(s) suppressed)",
        );
        assert_eq!(a, b);
        assert_ne!(a, key("FAIL", "another problem"));
        assert_ne!(
            a,
            key(
                "ERROR",
                "sasl_ssl://127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed"
            )
        );
    }

    #[test]
    fn repeats_within_the_window_are_counted_then_reported_once() {
        let start = Instant::now();
        let problem = "test-only problem that no client reports";
        assert_eq!(admit(problem, start), Some(0));
        for i in 1..=100 {
            assert_eq!(admit(problem, start + Duration::from_millis(i)), None);
        }
        assert_eq!(admit(problem, start + REPEAT_WINDOW), Some(100));
        assert_eq!(
            admit(problem, start + REPEAT_WINDOW + Duration::from_secs(1)),
            None
        );
    }
}
