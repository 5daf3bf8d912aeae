//! The Lua scripts the transport runs (their sources in `lua/`), each held once as a [`Lua`]: run by `EVALSHA` (loaded on `NOSCRIPT`), or
//! by its source inside a `MULTI`.

use super::*;

/// A Lua script: its source, and the `Script` (its SHA-1) made from it on first use.
pub(super) struct Lua {
    source: &'static str,
    script: std::sync::OnceLock<Script>,
}

impl Lua {
    const fn new(source: &'static str) -> Self {
        Self {
            source,
            script: std::sync::OnceLock::new(),
        }
    }

    /// For `EVALSHA` (loaded on `NOSCRIPT`).
    pub(super) fn script(&self) -> &Script {
        self.script.get_or_init(|| Script::new(self.source))
    }

    /// For `EVAL` inside a `MULTI`, where a `NOSCRIPT` could not be answered by loading the script.
    pub(super) fn source(&self) -> &'static str {
        self.source
    }
}

/// Takes up to ARGV[1] messages over KEYS[3..] in order. Each readable one is first registered in `unacked` exactly
/// as kombu's `QoS.append` does (`[envelope, exchange, routing_key]`, the envelope's bytes unchanged) and only then
/// popped; an unreadable one is first copied to `<queue>.unreadable` (ARGV[i] is KEYS[i]'s queue) and then popped.
/// A write Redis refuses (wrong type, ACL, OOM under `maxmemory`) stops the batch with the message still on its
/// queue: the reply is `[error or '', key, message, tag, key, message, tag, …]`.
pub(super) static FETCH_BATCH: Lua = Lua::new(include_str!("lua/fetch_batch.lua"));

/// Pushes ARGV[2] onto each of KEYS[3..] (LPUSH when ARGV[4] is '1', the back of the queue; else RPUSH, the
/// consuming end) and forgets tag ARGV[1] — only if `unacked[tag]` still equals ARGV[3] (or ARGV[3] is empty: the
/// caller owns the tag). Returns 1 when it restored.
pub(super) static RESTORE_IF_UNCHANGED: Lua =
    Lua::new(include_str!("lua/restore_if_unchanged.lua"));

/// Moves our held message `tag` ARGV[1] from `unacked` into the delayed set KEYS[3] (member: the envelope ARGV[2],
/// score: its eta ARGV[3]). Returns 1 when it moved, 0 when the tag is no longer ours.
pub(super) static DELAY: Lua = Lua::new(include_str!("lua/delay.lua"));

/// Moves member ARGV[1] of the delayed set KEYS[1] onto list KEYS[2] (RPUSH: it is due, it goes first) if it is
/// still there. Returns 1 when it moved.
pub(super) static PROMOTE: Lua = Lua::new(include_str!("lua/promote.lua"));

/// Removes ARGV[1] from list KEYS[1] and, if it was there, pushes ARGV[2] onto KEYS[2], once: a quarantined
/// unreadable message becomes its dead letter, a replayed dead letter its queue's message again.
pub(super) static MOVE_IF_PRESENT: Lua = Lua::new(include_str!("lua/move_if_present.lua"));

/// kombu's mutex release: delete only our own token.
pub(super) static RELEASE_MUTEX: Lua = Lua::new(include_str!("lua/release_mutex.lua"));

impl Broker {
    /// Runs [`MOVE_IF_PRESENT`]: `item` off list `from` and, if it was there, `pushed` onto `to`, atomically.
    /// True when it moved.
    pub(super) async fn move_if_present(
        &self,
        what: &'static str,
        patience: Patience,
        (from, item): (&str, &[u8]),
        (to, pushed): (&str, &[u8]),
    ) -> Result<bool, TransportError> {
        let mut invocation = MOVE_IF_PRESENT.script().prepare_invoke();
        invocation.key(from).key(to).arg(item).arg(pushed);
        let moved: i64 = self.link.invoke(what, patience, &invocation).await?;
        Ok(moved == 1)
    }
}
