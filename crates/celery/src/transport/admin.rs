//! Operators' calls: queue depths, replaying dead letters, pushing, unparking.

use super::*;

impl Broker {
    /// Messages waiting on `queue` (all priority lists), in its dead-letter list, and parked per handler of
    /// `handlers` — one round trip, bounded by `patience`.
    pub async fn depth(
        &self,
        queue: &str,
        handlers: &[&str],
        patience: Patience,
    ) -> Result<QueueDepth, TransportError> {
        let mut pipe = redis::pipe();
        for key in queue_keys(queue) {
            pipe.llen(key);
        }
        pipe.llen(dead_letter_key(queue));
        pipe.zcard(delayed_key(queue));
        for handler in handlers {
            pipe.llen(parked_key(queue, handler));
        }
        let lengths: Vec<u64> = self.link.pipe("queue depth", patience, &pipe).await?;
        let steps = PRIORITY_STEPS.len();
        let waiting = lengths.iter().take(steps).sum();
        let dead_letters = lengths.get(steps).copied().unwrap_or(0);
        let delayed = lengths.get(steps + 1).copied().unwrap_or(0);
        let parked = handlers
            .iter()
            .zip(lengths.iter().skip(steps + 2))
            .map(|(handler, n)| ((*handler).to_owned(), *n))
            .collect();
        Ok(QueueDepth {
            queue: queue.to_owned(),
            waiting,
            dead_letters,
            delayed,
            parked,
        })
    }

    /// Moves up to `max` dead letters of `queue` (oldest first) back onto the queue their message came from, each
    /// in one atomic step (the entry leaves the dead-letter list only as its message is pushed). Returns the number
    /// moved and the entries that could not be (no readable `message`), which stay where they are.
    pub async fn replay_dead_letters(
        &self,
        queue: &str,
        max: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<(usize, Vec<String>), TransportError> {
        let dlq = dead_letter_key(queue);
        let mut moved = 0;
        let mut unreadable = Vec::new();
        // Oldest at the tail (entries are LPUSHed); unreadable ones are skipped by index.
        let mut skip: isize = 0;
        while moved < max {
            let index = -1 - skip;
            let mut lindex = redis::cmd("LINDEX");
            lindex.arg(&dlq).arg(index);
            let entry: Option<Vec<u8>> = self
                .link
                .query("LINDEX dead letters", Patience::Forever, &lindex)
                .await?;
            let Some(entry) = entry else { break };
            let Some((target, message)) = dead_letter_message(&entry, queue) else {
                unreadable.push(String::from_utf8_lossy(&entry).into_owned());
                skip += 1;
                continue;
            };
            let (from, to) = ((dlq.as_str(), &entry[..]), (target.as_str(), &message[..]));
            if self
                .move_if_present("replay dead letter", Patience::Forever, from, to)
                .await?
            {
                moved += 1;
                progress(moved);
            }
        }
        Ok((moved, unreadable))
    }

    /// Pushes a finished envelope (publisher path, not part of an acknowledgement).
    pub async fn push(
        &self,
        queue: &str,
        priority: u8,
        payload: &[u8],
        patience: Patience,
    ) -> Result<(), TransportError> {
        let mut pipe = redis::pipe();
        pipe.lpush(priority_key(queue, priority), payload).ignore();
        self.link.pipe::<()>("LPUSH", patience, &pipe).await
    }

    /// Moves every parked task of `handler` back onto `queue` (a worker with the handler enabled started).
    pub async fn unpark(&self, queue: &str, handler: &str) -> Result<usize, TransportError> {
        let parked = parked_key(queue, handler);
        let mut lmove = redis::cmd("LMOVE");
        lmove.arg(&parked).arg(queue).arg("RIGHT").arg("LEFT");
        let mut moved = 0;
        loop {
            let item: Option<Vec<u8>> =
                self.link.query("unpark", Patience::Forever, &lmove).await?;
            if item.is_none() {
                return Ok(moved);
            }
            moved += 1;
        }
    }
}

/// The list a dead-letter entry's message goes back to (its queue, at priority 0 — the message keeps its own
/// priority property), and the message's bytes.
pub(super) fn dead_letter_message(entry: &[u8], default_queue: &str) -> Option<(String, Vec<u8>)> {
    let entry = crate::dead_letter::DeadLetterEntry::from_slice(entry)?;
    let message = entry.message_bytes()?;
    let queue = match entry.queue.as_str() {
        "" => default_queue.to_owned(),
        queue => queue.to_owned(),
    };
    Some((queue, message))
}

/// A queue's backlog (`vectordb lag`, `aura360_backlog`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct QueueDepth {
    pub queue: String,
    /// Messages on the queue's lists, not yet taken by any worker.
    pub waiting: u64,
    /// Entries on `<queue>.dlq`.
    pub dead_letters: u64,
    /// Scheduled tasks waiting for their eta in `<queue>.delayed`.
    pub delayed: u64,
    /// Parked tasks per disabled handler (`<queue>.parked.<handler>`).
    pub parked: std::collections::BTreeMap<String, u64>,
}

/// Pushes `payload` onto every queue bound to the direct exchange `exchange` with `routing_key` (kombu's
/// `_kombu.binding.<exchange>` set), or onto `<routing_key>.<exchange>` when none is: how a pidbox reply reaches the
/// client that asked.
pub async fn deliver_direct(
    link: &RedisLink,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
) -> Result<(), TransportError> {
    let bindings_key = format!("_kombu.binding.{exchange}");
    link.run(
        "remote control reply",
        Patience::Until(Duration::from_secs(2)),
        |mut conn| {
            let bindings_key = bindings_key.clone();
            async move {
                let members: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(&bindings_key)
                    .query_async(&mut conn)
                    .await?;
                let mut queues: Vec<String> = members
                    .iter()
                    .filter_map(|m| {
                        let mut parts = m.split(SEP);
                        let rk = parts.next()?;
                        let queue = parts.nth(1)?;
                        (rk == routing_key).then(|| queue.to_owned())
                    })
                    .collect();
                if queues.is_empty() {
                    queues.push(format!("{routing_key}.{exchange}"));
                }
                let mut pipe = redis::pipe();
                for queue in &queues {
                    pipe.lpush(queue, payload).ignore();
                }
                pipe.query_async::<()>(&mut conn).await
            }
        },
    )
    .await
}
