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
