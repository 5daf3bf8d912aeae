//! The Lua scripts the transport runs, each held once as a [`Lua`]: run by `EVALSHA` (loaded on `NOSCRIPT`), or
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
pub(super) static FETCH_BATCH: Lua = Lua::new(
    r#"
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
"#,
);

/// Pushes ARGV[2] onto each of KEYS[3..] (LPUSH when ARGV[4] is '1', the back of the queue; else RPUSH, the
/// consuming end) and forgets tag ARGV[1] — only if `unacked[tag]` still equals ARGV[3] (or ARGV[3] is empty: the
/// caller owns the tag). Returns 1 when it restored.
pub(super) static RESTORE_IF_UNCHANGED: Lua = Lua::new(
    r#"
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
"#,
);

/// Moves our held message `tag` ARGV[1] from `unacked` into the delayed set KEYS[3] (member: the envelope ARGV[2],
/// score: its eta ARGV[3]). Returns 1 when it moved, 0 when the tag is no longer ours.
pub(super) static DELAY: Lua = Lua::new(
    r#"
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"#,
);

/// Moves member ARGV[1] of the delayed set KEYS[1] onto list KEYS[2] (RPUSH: it is due, it goes first) if it is
/// still there. Returns 1 when it moved.
pub(super) static PROMOTE: Lua = Lua::new(
    r#"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"#,
);

/// Removes ARGV[1] from list KEYS[1] and, if it was there, pushes ARGV[2] onto KEYS[2]: a quarantined unreadable
/// message becomes its dead letter exactly once.
pub(super) static MOVE_IF_PRESENT: Lua = Lua::new(
    r#"
if redis.call('LREM', KEYS[1], -1, ARGV[1]) >= 1 then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"#,
);

/// kombu's mutex release: delete only our own token.
pub(super) static RELEASE_MUTEX: Lua = Lua::new(
    r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
);

/// Moves one dead letter back: removes the entry (if still there) and pushes its message, atomically.
pub(super) static REPLAY_DEAD_LETTER: Lua = Lua::new(
    r"
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 1 then
    redis.call('LPUSH', KEYS[2], ARGV[2])
    return 1
end
return 0",
);
