if redis.call('LREM', KEYS[1], -1, ARGV[1]) >= 1 then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
