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

pub const UNACKED: &str = "unacked";
pub const UNACKED_INDEX: &str = "unacked_index";
pub const UNACKED_MUTEX: &str = "unacked_mutex";
/// kombu's priority steps on Redis.
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];
/// kombu's separator inside priority list names and binding entries.
const SEP: &str = "\x06\x16";

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

/// One Redis server/database, reconnected on demand: a command that fails on a dropped connection is retried on a
/// new one with backoff, so a Redis restart or `CLIENT KILL` costs a pause, not the worker (Celery #8030).
pub struct RedisLink {
    client: Client,
    db: i64,
    url: String,
    config: AsyncConnectionConfig,
    cached: Mutex<Option<MultiplexedConnection>>,
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLink").field("url", &self.url).finish()
    }
}

/// How long a command may keep failing before the caller gets the error.
#[derive(Clone, Copy, Debug)]
pub enum Patience {
    /// Retry until it succeeds (acknowledgements, results: giving up would redeliver, not lose, but why).
    Forever,
    Until(Duration),
}

impl RedisLink {
    /// `redis://[:password@]host[:port][/db]`, `rediss://…` (TLS), `unix:///path?db=N`. `redacted` is what logs show.
    pub fn open(
        url: &str,
        redacted: String,
        response_timeout: Option<Duration>,
    ) -> Result<Self, TransportError> {
        let client = Client::open(url).map_err(|e| TransportError::BadUrl {
            url: redacted.clone(),
            reason: e.to_string(),
        })?;
        let db = client.get_connection_info().redis_settings().db();
        Ok(Self {
            client,
            db,
            url: redacted,
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(response_timeout),
            cached: Mutex::new(None),
        })
    }

    pub fn db(&self) -> i64 {
        self.db
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    async fn connection(&self) -> Result<MultiplexedConnection, RedisError> {
        let mut cached = self.cached.lock().await;
        if let Some(conn) = cached.as_ref() {
            return Ok(conn.clone());
        }
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        *cached = Some(conn.clone());
        Ok(conn)
    }

    async fn forget(&self) {
        *self.cached.lock().await = None;
    }

    /// Runs `op` on a connection, reconnecting and retrying on connection-level failures.
    pub async fn run<T, F, Fut>(
        &self,
        what: &'static str,
        patience: Patience,
        op: F,
    ) -> Result<T, TransportError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let started = tokio::time::Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let result = match self.connection().await {
                Ok(conn) => op(conn).await,
                Err(error) => Err(error),
            };
            match result {
                Ok(value) => {
                    if attempt > 1 {
                        tracing::info!(redis = %self.url, what, attempt, "Redis is back");
                    }
                    return Ok(value);
                }
                Err(error) if !is_retryable(&error) => {
                    return Err(TransportError::Redis {
                        what,
                        source: error,
                    });
                }
                Err(error) => {
                    self.forget().await;
                    let delay = backoff(attempt);
                    let out_of_time = match patience {
                        Patience::Forever => false,
                        Patience::Until(limit) => started.elapsed() + delay > limit,
                    };
                    if out_of_time {
                        return Err(TransportError::GaveUp {
                            what,
                            attempts: attempt,
                            last: error.to_string(),
                        });
                    }
                    tracing::warn!(redis = %self.url, what, attempt, retry_in_ms = delay.as_millis() as u64,
                        %error, "Redis unavailable; reconnecting");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Runs a pipeline (`MULTI`/`EXEC` if it was built `atomic()`).
    pub async fn pipe<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        patience: Patience,
        pipe: &Pipeline,
    ) -> Result<T, TransportError> {
        self.run(what, patience, |mut conn| async move {
            pipe.query_async(&mut conn).await
        })
        .await
    }

    /// Runs one command.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        patience: Patience,
        cmd: &redis::Cmd,
    ) -> Result<T, TransportError> {
        self.run(what, patience, |mut conn| async move {
            cmd.query_async(&mut conn).await
        })
        .await
    }

    /// Runs a script (`EVALSHA`, loading it on `NOSCRIPT`).
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        patience: Patience,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, TransportError> {
        self.run(what, patience, |mut conn| async move {
            invocation.invoke_async(&mut conn).await
        })
        .await
    }
}

/// Connection-level trouble (dropped, refused, timed out, server loading or read-only after a failover) is worth a
/// retry on a new connection; anything else (a wrong type, a script error) is not.
fn is_retryable(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || matches!(
            error.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
                | redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
                | redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain)
                | redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown)
        )
}

fn backoff(attempt: u32) -> Duration {
    let ms = 100u64
        .saturating_mul(1 << attempt.min(7).saturating_sub(1))
        .min(5_000);
    Duration::from_millis(ms)
}

/// A message taken from a queue. `tag` is `None` when the element is not a readable envelope: it was not
/// registered in `unacked` (a Python restorer would choke on it) and must be dead-lettered right away.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub key: String,
    pub queue: String,
    pub raw: Vec<u8>,
    pub tag: Option<String>,
}

/// Takes up to ARGV[1] messages over KEYS[3..] in order. Each readable one is first registered in `unacked` exactly
/// as kombu's `QoS.append` does (`[envelope, exchange, routing_key]`, the envelope's bytes unchanged) and only then
/// popped; an unreadable one is first copied to `<queue>.unreadable` (ARGV[i] is KEYS[i]'s queue) and then popped.
/// A write Redis refuses (wrong type, ACL, OOM under `maxmemory`) stops the batch with the message still on its
/// queue: the reply is `[error or '', key, message, tag, key, message, tag, …]`.
const FETCH_BATCH: &str = r#"
local out = {''}
local wanted = tonumber(ARGV[1])
local taken = 0
local function refused(reply)
  return type(reply) == 'table' and reply['err'] ~= nil
end
for i = 3, #KEYS do
  while taken < wanted do
    local msg = redis.call('LINDEX', KEYS[i], -1)
    if not msg then break end
    local tag = ''
    local ok, obj = pcall(cjson.decode, msg)
    if ok and type(obj) == 'table' and type(obj['properties']) == 'table'
        and type(obj['properties']['delivery_tag']) == 'string' then
      tag = obj['properties']['delivery_tag']
      local info = obj['properties']['delivery_info']
      local exchange, rk = '', ARGV[i]
      if type(info) == 'table' then
        if type(info['exchange']) == 'string' then exchange = info['exchange'] end
        if type(info['routing_key']) == 'string' then rk = info['routing_key'] end
      end
      local reply = redis.pcall('ZADD', KEYS[1], ARGV[2], tag)
      if refused(reply) then out[1] = reply['err']; return out end
      reply = redis.pcall('HSET', KEYS[2], tag,
        '[' .. msg .. ', ' .. cjson.encode(exchange) .. ', ' .. cjson.encode(rk) .. ']')
      if refused(reply) then
        redis.pcall('ZREM', KEYS[1], tag)
        out[1] = reply['err']
        return out
      end
    else
      local reply = redis.pcall('LPUSH', ARGV[i] .. '.unreadable', msg)
      if refused(reply) then out[1] = reply['err']; return out end
    end
    redis.call('RPOP', KEYS[i])
    taken = taken + 1
    table.insert(out, KEYS[i])
    table.insert(out, msg)
    table.insert(out, tag)
  end
end
return out
"#;

/// Pushes ARGV[2] onto each of KEYS[3..] (LPUSH when ARGV[4] is '1', the back of the queue; else RPUSH, the
/// consuming end) and forgets tag ARGV[1] — only if `unacked[tag]` still equals ARGV[3] (or ARGV[3] is empty: the
/// caller owns the tag). Returns 1 when it restored.
const RESTORE_IF_UNCHANGED: &str = r#"
local current = redis.call('HGET', KEYS[2], ARGV[1])
if not current then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
if ARGV[3] ~= '' and current ~= ARGV[3] then return 0 end
for i = 3, #KEYS do
  if ARGV[4] == '1' then
    redis.call('LPUSH', KEYS[i], ARGV[2])
  else
    redis.call('RPUSH', KEYS[i], ARGV[2])
  end
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"#;

/// Moves our held message `tag` ARGV[1] from `unacked` into the delayed set KEYS[3] (member: the envelope ARGV[2],
/// score: its eta ARGV[3]). Returns 1 when it moved, 0 when the tag is no longer ours.
const DELAY: &str = r#"
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"#;

/// Moves member ARGV[1] of the delayed set KEYS[1] onto list KEYS[2] (RPUSH: it is due, it goes first) if it is
/// still there. Returns 1 when it moved.
const PROMOTE: &str = r#"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"#;

/// Removes ARGV[1] from list KEYS[1] and, if it was there, pushes ARGV[2] onto KEYS[2]: a quarantined unreadable
/// message becomes its dead letter exactly once.
pub const MOVE_IF_PRESENT: &str = r#"
if redis.call('LREM', KEYS[1], -1, ARGV[1]) >= 1 then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"#;

/// kombu's mutex release: delete only our own token.
const RELEASE_MUTEX: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// How long the worker's own bookkeeping commands (restore, delay, promote, sweep) wait for an unreachable Redis.
const BOOKKEEPING: Patience = Patience::Until(Duration::from_secs(5));

/// The broker side of a worker: fetch, acknowledge, requeue, restore, publish.
pub struct Broker {
    link: Arc<RedisLink>,
    /// A second connection for blocking `BRPOP`s, so they never stall acknowledgements on the shared one.
    blocking: RedisLink,
    visibility_timeout: Duration,
    fetch_script: Script,
    restore_script: Script,
    release_script: Script,
    delay_script: Script,
    promote_script: Script,
    move_script: Script,
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
            fetch_script: Script::new(FETCH_BATCH),
            restore_script: Script::new(RESTORE_IF_UNCHANGED),
            release_script: Script::new(RELEASE_MUTEX),
            delay_script: Script::new(DELAY),
            promote_script: Script::new(PROMOTE),
            move_script: Script::new(MOVE_IF_PRESENT),
        })
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

    async fn fetch_batch(
        &self,
        keys: &[(String, String)],
        max: usize,
    ) -> Result<Vec<Fetched>, TransportError> {
        let now = now_secs().to_string();
        let mut invocation = self.fetch_script.prepare_invoke();
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

    /// Puts our own message `tag` back at the consuming end of its queue (not started at shutdown), within
    /// `patience`; if Redis does not answer, the message stays in `unacked` and is restored after the timeout.
    pub async fn requeue(
        &self,
        tag: &str,
        envelope: &Envelope,
        queue: &str,
        patience: Patience,
    ) -> Result<bool, TransportError> {
        let mut envelope = envelope.clone();
        envelope.mark_redelivered();
        let target = priority_key(queue, envelope.priority());
        self.restore_entry(tag, &envelope.to_vec(), &[target], None, false, patience)
            .await
    }

    /// Gives a message back unchanged but for `redelivered`, at the back of the list it came from (`key`): what
    /// Celery's `reject(requeue=True)` does, for a task this worker does not run.
    pub async fn reject_requeue(
        &self,
        tag: &str,
        envelope: &Envelope,
        key: &str,
        patience: Patience,
    ) -> Result<bool, TransportError> {
        let mut envelope = envelope.clone();
        envelope.mark_redelivered();
        self.restore_entry(
            tag,
            &envelope.to_vec(),
            &[key.to_owned()],
            None,
            true,
            patience,
        )
        .await
    }

    async fn restore_entry(
        &self,
        tag: &str,
        payload: &[u8],
        targets: &[String],
        expected: Option<&[u8]>,
        leftmost: bool,
        patience: Patience,
    ) -> Result<bool, TransportError> {
        let mut invocation = self.restore_script.prepare_invoke();
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
        let mut invocation = self.delay_script.prepare_invoke();
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
            let mut invocation = self.promote_script.prepare_invoke();
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

    /// Dead-letters what a worker quarantined in `<queue>.unreadable` and could not dead-letter itself (it died in
    /// between), up to 1,000 per call. Each entry exactly once. Returns how many.
    pub async fn sweep_unreadable(
        &self,
        queue: &str,
        entry: impl Fn(&[u8]) -> Vec<u8>,
    ) -> Result<usize, TransportError> {
        let quarantine = unreadable_key(queue);
        let mut scan = redis::cmd("LRANGE");
        scan.arg(&quarantine).arg(0).arg(999);
        let items: Vec<Vec<u8>> = self
            .link
            .query("unreadable scan", BOOKKEEPING, &scan)
            .await?;
        let mut moved = 0;
        for raw in items {
            let mut invocation = self.move_script.prepare_invoke();
            invocation
                .key(&quarantine)
                .key(dead_letter_key(queue))
                .arg(&raw)
                .arg(entry(&raw));
            let done: i64 = self
                .link
                .invoke("dead-letter unreadable", BOOKKEEPING, &invocation)
                .await?;
            moved += done as usize;
        }
        Ok(moved)
    }

    /// The queues a message published to `exchange` with `routing_key` reaches, as kombu's `_lookup` finds them:
    /// the default exchange routes by name; a named one through its bindings in `_kombu.binding.<exchange>`
    /// (`routing_key\x06\x16pattern\x06\x16queue`, matched as a direct exchange); nothing bound: kombu's
    /// `ae.undeliver`.
    pub async fn lookup(
        &self,
        exchange: &str,
        routing_key: &str,
    ) -> Result<Vec<String>, TransportError> {
        if exchange.is_empty() {
            return Ok(vec![if routing_key.is_empty() {
                UNDELIVERABLE.to_owned()
            } else {
                routing_key.to_owned()
            }]);
        }
        let mut smembers = redis::cmd("SMEMBERS");
        smembers.arg(format!("_kombu.binding.{exchange}"));
        let members: Vec<Vec<u8>> = self
            .link
            .query("exchange bindings", BOOKKEEPING, &smembers)
            .await?;
        let mut queues: Vec<String> = members
            .iter()
            .filter_map(|member| {
                let member = String::from_utf8_lossy(member);
                let mut parts = member.splitn(3, SEP);
                let key = parts.next()?;
                let _pattern = parts.next()?;
                let queue = parts.next()?;
                (key == routing_key).then(|| queue.to_owned())
            })
            .collect();
        queues.sort();
        queues.dedup();
        if queues.is_empty() {
            queues.push(UNDELIVERABLE.to_owned());
        }
        Ok(queues)
    }

    /// kombu's `restore_visible`: under `unacked_mutex`, pushes back every message taken more than the visibility
    /// timeout ago and never acknowledged (its worker died). Returns how many it restored.
    pub async fn restore_visible(&self) -> Result<usize, TransportError> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let mut lock = redis::cmd("SET");
        lock.arg(UNACKED_MUTEX)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(300_000);
        let acquired: Option<String> = self.link.query("unacked_mutex", BOOKKEEPING, &lock).await?;
        if acquired.is_none() {
            return Ok(0); // another worker is restoring
        }
        let result = self.restore_expired().await;
        let mut release = self.release_script.prepare_invoke();
        release.key(UNACKED_MUTEX).arg(&token);
        let released = self
            .link
            .invoke::<i64>("unacked_mutex release", BOOKKEEPING, &release)
            .await;
        if let Err(error) = released {
            tracing::warn!(%error, "releasing unacked_mutex (it expires by itself in 300 s)");
        }
        result
    }

    /// Restores expired entries page by page. Entries that are not `[envelope, exchange, routing_key]` are left in
    /// place (a person must look at them) and skipped, so they never hide the readable ones behind them. Exchange
    /// bindings are read once per exchange and routing key per pass.
    async fn restore_expired(&self) -> Result<usize, TransportError> {
        const PAGE: usize = 1000;
        let ceiling = now_secs() - self.visibility_timeout.as_secs_f64();
        let mut routes = HashMap::new();
        let mut restored = 0;
        let mut unreadable = 0usize;
        loop {
            let mut scan = redis::cmd("ZRANGEBYSCORE");
            scan.arg(UNACKED_INDEX)
                .arg("-inf")
                .arg(ceiling)
                .arg("LIMIT")
                .arg(unreadable)
                .arg(PAGE);
            let expired: Vec<String> = self
                .link
                .query("unacked_index scan", BOOKKEEPING, &scan)
                .await?;
            let page = expired.len();
            for tag in expired {
                match self.restore_one(&tag, &mut routes).await? {
                    Restore::Restored => restored += 1,
                    Restore::Gone => {}
                    Restore::Unreadable => unreadable += 1,
                }
            }
            if page < PAGE {
                break;
            }
        }
        if unreadable > 0 {
            tracing::error!(
                unreadable,
                "unacked entries that are not [envelope, exchange, routing_key] were left in place; \
                 inspect them with HGET unacked <tag>"
            );
        }
        Ok(restored)
    }

    async fn restore_one(
        &self,
        tag: &str,
        routes: &mut HashMap<(String, String), Vec<String>>,
    ) -> Result<Restore, TransportError> {
        let mut hget = redis::cmd("HGET");
        hget.arg(UNACKED).arg(tag);
        let entry: Option<Vec<u8>> = self.link.query("unacked read", BOOKKEEPING, &hget).await?;
        let Some(entry) = entry else {
            // Acknowledged meanwhile, or an index entry without its message: drop the index entry.
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(UNACKED_INDEX).arg(tag);
            self.link
                .query::<()>("unacked index cleanup", BOOKKEEPING, &zrem)
                .await?;
            return Ok(Restore::Gone);
        };
        let Some((mut envelope, exchange, routing_key)) = parse_unacked_entry(&entry) else {
            return Ok(Restore::Unreadable);
        };
        envelope.mark_redelivered();
        let route = (exchange, routing_key);
        let queues = match routes.get(&route) {
            Some(queues) => queues.clone(),
            None => {
                let queues = self.lookup(&route.0, &route.1).await?;
                routes.insert(route.clone(), queues.clone());
                queues
            }
        };
        let targets: Vec<String> = queues
            .iter()
            .map(|queue| priority_key(queue, envelope.priority()))
            .collect();
        let restored = self
            .restore_entry(
                tag,
                &envelope.to_vec(),
                &targets,
                Some(&entry),
                false,
                BOOKKEEPING,
            )
            .await?;
        if restored {
            tracing::warn!(delivery_tag = %tag, queues = %queues.join(","), exchange = %route.0,
                task_id = envelope.header_str("id").unwrap_or("-"),
                "restored a message its worker never acknowledged (visibility timeout passed)");
        }
        Ok(if restored {
            Restore::Restored
        } else {
            Restore::Gone
        })
    }

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
            let mut invocation = REPLAY_DEAD_LETTER.prepare_invoke();
            invocation.key(&dlq).key(&target).arg(&entry).arg(&message);
            let removed: i64 = self
                .link
                .invoke("replay dead letter", Patience::Forever, &invocation)
                .await?;
            if removed > 0 {
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

/// Moves one dead letter back: removes the entry (if still there) and pushes its message, atomically.
static REPLAY_DEAD_LETTER: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r"
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 1 then
    redis.call('LPUSH', KEYS[2], ARGV[2])
    return 1
end
return 0",
    )
});

/// The list a dead-letter entry's message goes back to (its queue, at priority 0 — the message keeps its own
/// priority property), and the message's bytes.
fn dead_letter_message(entry: &[u8], default_queue: &str) -> Option<(String, Vec<u8>)> {
    use base64::Engine as _;
    let entry: serde_json::Value = serde_json::from_slice(entry).ok()?;
    let queue = entry
        .get("queue")
        .and_then(|q| q.as_str())
        .unwrap_or(default_queue)
        .to_owned();
    let message = match (entry.get("message"), entry.get("message_base64")) {
        (Some(serde_json::Value::String(text)), _) => text.as_bytes().to_vec(),
        (_, Some(serde_json::Value::String(encoded))) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()?,
        _ => return None,
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

/// `[envelope, exchange, routing_key]` → its parts; a missing routing key falls back to the envelope's
/// `delivery_info` (Python's `NaN`/`Infinity` in a header read as `null`).
pub fn parse_unacked_entry(entry: &[u8]) -> Option<(Envelope, String, String)> {
    let value: serde_json::Value = crate::pyjson::from_slice_lenient(entry).ok()?;
    let parts = value.as_array()?;
    let envelope: Envelope = serde_json::from_value(parts.first()?.clone()).ok()?;
    let (info_exchange, info_key) = envelope.delivery_info();
    let exchange = parts
        .get(1)
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .unwrap_or(info_exchange);
    let routing_key = parts
        .get(2)
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .or(info_key)?;
    Some((envelope, exchange, routing_key))
}

enum Restore {
    Restored,
    Gone,
    Unreadable,
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
