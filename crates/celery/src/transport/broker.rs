//! The broker side of a worker: fetch, acknowledge, requeue, check what was taken over, delay and promote.
//! Only the transport composes Redis commands; the worker asks.

use super::*;

/// A message taken from a queue. `tag` is `None` when the element is not a readable envelope: it was not
/// registered in `unacked` (a Python restorer would choke on it) and must be dead-lettered right away.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub key: String,
    pub queue: String,
    pub raw: Vec<u8>,
    pub tag: Option<String>,
}

/// Where [`Broker::give_back`] puts a message.
#[derive(Clone, Copy, Debug)]
pub enum GiveBack<'a> {
    /// The consuming end of `queue`'s list for the message's priority: taken next (a task not started at shutdown).
    Next { queue: &'a str },
    /// The far end of the list it came from (`key`): what Celery's `reject(requeue=True)` does, for a task this
    /// worker does not run.
    Last { key: &'a str },
}

/// What acknowledging one finished message writes, in the `MULTI` of [`Broker::acknowledge`].
#[derive(Clone, Copy, Debug)]
pub struct Acknowledgement<'a> {
    /// The input's delivery tag (`None`: it never made it into `unacked`).
    pub tag: Option<&'a str>,
    /// `(list, payload)` pushed: produced tasks, a retry, a dead letter, a parked task.
    pub pushes: &'a [(String, Vec<u8>)],
    /// An unreadable message to turn into its dead letter.
    pub quarantined: Option<&'a Quarantined>,
}

/// An unreadable message in its quarantine list (`<queue>.unreadable`), and the dead letter `(list, entry)` that
/// replaces it exactly once.
#[derive(Clone, Debug)]
pub struct Quarantined {
    pub list: String,
    pub raw: Vec<u8>,
    pub dead_letter: (String, Vec<u8>),
}

/// How long the worker's own bookkeeping commands (restore, delay, promote, sweep) wait for an unreachable Redis.
pub(super) const BOOKKEEPING: Patience = Patience::Until(Duration::from_secs(5));

/// The broker side of a worker: fetch, acknowledge, requeue, restore, publish.
pub struct Broker {
    pub(super) link: Arc<RedisLink>,
    /// A second connection for blocking `BRPOP`s, so they never stall acknowledgements on the shared one.
    pub(super) blocking: RedisLink,
    pub(super) visibility_timeout: Duration,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("url", &self.link.url())
            .finish()
    }
}

impl Broker {
    /// `url` is `BROKER_URL`; `redacted` its printable form.
    pub fn open(
        url: &str,
        redacted: String,
        visibility_timeout: Duration,
    ) -> Result<Self, TransportError> {
        Ok(Self {
            link: Arc::new(RedisLink::open(
                url,
                redacted.clone(),
                Some(Duration::from_secs(10)),
            )?),
            blocking: RedisLink::open(url, redacted, Some(Duration::from_secs(15)))?,
            visibility_timeout,
        })
    }

    /// Acknowledges finished messages in one `MULTI`: every push, each quarantined message turned into its dead
    /// letter, then the `ZREM`/`HDEL` that take the tags out of kombu's `unacked` — all or nothing, so an output is
    /// never pushed without its input acknowledged, nor an input acknowledged without its outputs.
    pub async fn acknowledge<'a>(
        &self,
        acks: impl IntoIterator<Item = Acknowledgement<'a>>,
        patience: Patience,
    ) -> Result<(), TransportError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut tags = Vec::new();
        for ack in acks {
            for (list, payload) in ack.pushes {
                pipe.lpush(list, payload).ignore();
            }
            if let Some(quarantined) = ack.quarantined {
                pipe.cmd("EVAL")
                    .arg(MOVE_IF_PRESENT.source())
                    .arg(2)
                    .arg(&quarantined.list)
                    .arg(&quarantined.dead_letter.0)
                    .arg(&quarantined.raw)
                    .arg(&quarantined.dead_letter.1)
                    .ignore();
            }
            tags.extend(ack.tag);
        }
        if !tags.is_empty() {
            pipe.zrem(UNACKED_INDEX, &tags).ignore();
            pipe.hdel(UNACKED, &tags).ignore();
        }
        self.link.pipe::<()>("acknowledge", patience, &pipe).await
    }

    pub fn link(&self) -> &Arc<RedisLink> {
        &self.link
    }

    /// Checks the server answers (start-up), within `patience`.
    pub async fn ping(&self, patience: Patience) -> Result<(), TransportError> {
        self.link
            .query::<String>("PING", patience, &redis::cmd("PING"))
            .await
            .map(|_| ())
    }

    /// Declares `queue` as kombu does when a Python app declares it (binding entries in `_kombu.binding.*`).
    pub async fn declare_queue(&self, queue: &str) -> Result<(), TransportError> {
        let member = format!("{queue}{SEP}{SEP}{queue}");
        let mut pipe = redis::pipe();
        pipe.atomic()
            .sadd(format!("_kombu.binding.{queue}"), &member)
            .ignore()
            .sadd(format!("_kombu.binding_permanent.{queue}"), &member)
            .ignore();
        self.link
            .pipe::<()>("declare queue", Patience::Forever, &pipe)
            .await
    }

    /// Takes up to `max` messages: whatever is waiting, in one atomic script. If nothing is, waits up to `block`
    /// for the first queue's main list to receive something (a `BLMOVE` of the list onto itself, which takes
    /// nothing), then looks again. No message ever leaves a queue before it is registered in `unacked`, so
    /// cancelling this future loses nothing: what it took is restored after the visibility timeout.
    pub async fn fetch(
        &self,
        queues: &[String],
        max: usize,
        block: Duration,
    ) -> Result<Vec<Fetched>, TransportError> {
        let keys: Vec<(String, String)> = queues
            .iter()
            .flat_map(|q| queue_keys(q).into_iter().map(move |k| (k, q.clone())))
            .collect();
        let batch = self.fetch_batch(&keys, max.max(1)).await?;
        if !batch.is_empty() {
            return Ok(batch);
        }
        let Some((first, _)) = keys.first() else {
            return Ok(Vec::new());
        };
        // Other priority lists and queues are looked at every IDLE_POLL at the latest.
        const IDLE_POLL: Duration = Duration::from_millis(250);
        let wait = block.min(IDLE_POLL).as_secs_f64();
        let mut rotate = redis::cmd("BLMOVE");
        rotate
            .arg(first)
            .arg(first)
            .arg("RIGHT")
            .arg("RIGHT")
            .arg(wait);
        let woke: Result<Option<Vec<u8>>, TransportError> =
            self.blocking.query("BLMOVE", BOOKKEEPING, &rotate).await;
        match woke {
            Ok(None) => Ok(Vec::new()),
            Ok(Some(_)) => self.fetch_batch(&keys, max.max(1)).await,
            // The wait is only a wait: a refusal here (OOM rejects BLMOVE) shows up again in the next batch.
            Err(TransportError::Redis { .. }) => {
                tokio::time::sleep(IDLE_POLL).await;
                Ok(Vec::new())
            }
            Err(error) => Err(error),
        }
    }

    pub(super) async fn fetch_batch(
        &self,
        keys: &[(String, String)],
        max: usize,
    ) -> Result<Vec<Fetched>, TransportError> {
        let now = now_secs().to_string();
        let mut invocation = FETCH_BATCH.script().prepare_invoke();
        invocation.key(UNACKED_INDEX).key(UNACKED);
        invocation.arg(max).arg(&now);
        for (key, queue) in keys {
            invocation.key(key).arg(queue);
        }
        let reply: Vec<RedisValue> = self.link.invoke("fetch", BOOKKEEPING, &invocation).await?;
        let refusal = reply.first().map(bulk_string).unwrap_or_default();
        let mut out = Vec::with_capacity(reply.len() / 3);
        for triple in reply.get(1..).unwrap_or_default().chunks_exact(3) {
            let key = bulk_string(&triple[0]);
            let raw = bulk_bytes(&triple[1]);
            let tag = bulk_string(&triple[2]);
            let queue = keys
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, q)| q.clone())
                .unwrap_or_else(|| key.clone());
            out.push(Fetched {
                key,
                queue,
                raw,
                tag: (!tag.is_empty()).then_some(tag),
            });
        }
        if !refusal.is_empty() {
            if out.is_empty() {
                return Err(TransportError::Refused {
                    what: "taking a message (registering it in unacked)",
                    reason: refusal,
                });
            }
            tracing::warn!(reason = %refusal, taken = out.len(),
                "Redis refused to register a message in unacked; it stays on its queue");
        }
        Ok(out)
    }

    /// Gives our own message `tag` back, marked redelivered as kombu's restore marks it, within `patience`; if
    /// Redis does not answer, the message stays in `unacked` and is restored after the visibility timeout.
    pub async fn give_back(
        &self,
        tag: &str,
        envelope: &Envelope,
        to: GiveBack<'_>,
        patience: Patience,
    ) -> Result<bool, TransportError> {
        let mut envelope = envelope.clone();
        envelope.mark_redelivered();
        let (target, at_back) = match to {
            GiveBack::Next { queue } => (priority_key(queue, envelope.priority()), false),
            GiveBack::Last { key } => (key.to_owned(), true),
        };
        self.restore_entry(tag, &envelope.to_vec(), &[target], None, at_back, patience)
            .await
    }

    pub(super) async fn restore_entry(
        &self,
        tag: &str,
        payload: &[u8],
        targets: &[String],
        expected: Option<&[u8]>,
        leftmost: bool,
        patience: Patience,
    ) -> Result<bool, TransportError> {
        let mut invocation = RESTORE_IF_UNCHANGED.script().prepare_invoke();
        invocation.key(UNACKED_INDEX).key(UNACKED);
        for target in targets {
            invocation.key(target);
        }
        invocation
            .arg(tag)
            .arg(payload)
            .arg(expected.unwrap_or(b""))
            .arg(if leftmost { "1" } else { "0" });
        let restored: i64 = self.link.invoke("restore", patience, &invocation).await?;
        Ok(restored == 1)
    }

    /// The `tags` no longer in `unacked`: another worker restored them (this one was paused past the visibility
    /// timeout) and runs them now.
    pub async fn taken_over(&self, tags: &[String]) -> Result<Vec<String>, TransportError> {
        let mut gone = Vec::new();
        for chunk in tags.chunks(1000) {
            let mut pipe = redis::pipe();
            for tag in chunk {
                pipe.hexists(UNACKED, tag);
            }
            let present: Vec<bool> = self.link.pipe("check unacked", BOOKKEEPING, &pipe).await?;
            gone.extend(
                chunk
                    .iter()
                    .zip(present)
                    .filter(|(_, present)| !present)
                    .map(|(tag, _)| tag.clone()),
            );
        }
        Ok(gone)
    }

    /// Keeps the messages this worker holds (`tags`) from looking abandoned: their `unacked_index` score becomes
    /// now, so no restorer — ours or a Python worker's — pushes them back while they wait for an eta, a slot or a
    /// result backend. `ZADD XX` never brings back an acknowledged one.
    pub async fn refresh_leases(&self, tags: &[String]) -> Result<(), TransportError> {
        let now = now_secs();
        for chunk in tags.chunks(1000) {
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(UNACKED_INDEX).arg("XX");
            for tag in chunk {
                zadd.arg(now).arg(tag);
            }
            self.link
                .query::<()>("refresh unacked_index", BOOKKEEPING, &zadd)
                .await?;
        }
        Ok(())
    }

    /// Moves our held message `tag` (bytes `raw`, taken from `queue`) to `<queue>.delayed` until `eta`: a
    /// scheduled task this worker has no room to hold in memory. Returns false if the tag is no longer ours.
    pub async fn delay(
        &self,
        tag: &str,
        raw: &[u8],
        queue: &str,
        eta: f64,
    ) -> Result<bool, TransportError> {
        let mut invocation = DELAY.script().prepare_invoke();
        invocation
            .key(UNACKED_INDEX)
            .key(UNACKED)
            .key(delayed_key(queue))
            .arg(tag)
            .arg(raw)
            .arg(eta);
        let moved: i64 = self.link.invoke("delay", BOOKKEEPING, &invocation).await?;
        Ok(moved == 1)
    }

    /// Moves every due message of `<queue>.delayed` (up to `max`) back to the consuming end of its queue, each
    /// exactly once whatever other workers do. Returns how many it moved.
    pub async fn promote_due(&self, queue: &str, max: usize) -> Result<usize, TransportError> {
        let delayed = delayed_key(queue);
        let mut scan = redis::cmd("ZRANGEBYSCORE");
        scan.arg(&delayed)
            .arg("-inf")
            .arg(now_secs())
            .arg("LIMIT")
            .arg(0)
            .arg(max);
        let due: Vec<Vec<u8>> = self.link.query("delayed scan", BOOKKEEPING, &scan).await?;
        let mut moved = 0;
        for raw in due {
            let priority = Envelope::from_slice(&raw)
                .map(|e| e.priority())
                .unwrap_or(0);
            let mut invocation = PROMOTE.script().prepare_invoke();
            invocation
                .key(&delayed)
                .key(priority_key(queue, priority))
                .arg(&raw);
            let done: i64 = self
                .link
                .invoke("promote", BOOKKEEPING, &invocation)
                .await?;
            moved += done as usize;
        }
        Ok(moved)
    }
}
