//! Key names, as kombu spells them (a Python worker reads the same keys).

use super::*;

pub const UNACKED: &str = "unacked";
pub const UNACKED_INDEX: &str = "unacked_index";
pub const UNACKED_MUTEX: &str = "unacked_mutex";
/// kombu's priority steps on Redis.
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];
/// kombu's separator inside priority list names and binding entries.
pub(super) const SEP: &str = "\x06\x16";

/// The list a message of `priority` goes to (kombu rounds down to a step: 5 → `<queue>\x06\x163`).
pub fn priority_key(queue: &str, priority: u8) -> String {
    let step = PRIORITY_STEPS
        .iter()
        .rev()
        .find(|step| priority >= **step)
        .copied()
        .unwrap_or(0);
    if step == 0 {
        queue.to_owned()
    } else {
        format!("{queue}{SEP}{step}")
    }
}

/// A queue's lists in the order `BRPOP` must name them.
pub fn queue_keys(queue: &str) -> [String; 4] {
    PRIORITY_STEPS.map(|p| priority_key(queue, p))
}

/// Where final failures go: `<queue>.dlq`, a list of JSON entries (docs/design.md §4).
pub fn dead_letter_key(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// Scheduled tasks this worker had no room to hold, scored by eta (see `Broker::delay`).
pub fn delayed_key(queue: &str) -> String {
    format!("{queue}.delayed")
}

/// Where an unreadable message waits between leaving its queue and becoming a dead letter (`FETCH_BATCH`).
pub fn unreadable_key(queue: &str) -> String {
    format!("{queue}.unreadable")
}

/// kombu's dead-letter queue for messages no binding routes (`Channel.deadletter_queue`).
pub const UNDELIVERABLE: &str = "ae.undeliver";

/// Where a disabled handler's tasks wait until a worker with that handler enabled starts.
pub fn parked_key(queue: &str, handler: &str) -> String {
    format!("{queue}.parked.{handler}")
}

pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
