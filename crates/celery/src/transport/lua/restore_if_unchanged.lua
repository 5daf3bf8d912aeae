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
