//! Restoring what a dead worker held (kombu's `restore_visible`), sweeping quarantined messages, and finding
//! the queues an entry goes back to.

use super::*;

impl Broker {
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
        let dead_letters = dead_letter_key(queue);
        let mut moved = 0;
        for raw in items {
            let from = (quarantine.as_str(), raw.as_slice());
            let to = (dead_letters.as_str(), entry(&raw));
            let what = "dead-letter unreadable";
            moved += usize::from(
                self.move_if_present(what, BOOKKEEPING, from, (to.0, &to.1))
                    .await?,
            );
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
        let mut release = RELEASE_MUTEX.script().prepare_invoke();
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
    pub(super) async fn restore_expired(&self) -> Result<usize, TransportError> {
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

    pub(super) async fn restore_one(
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

pub(super) enum Restore {
    Restored,
    Gone,
    Unreadable,
}
