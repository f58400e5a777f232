-- Refreshes this instance's claim on its consumer name.
--
-- KEYS: liveness key. ARGV: token, ttl ms.
-- Returns 1 when the name is held (refreshed, or taken again after it expired), 0 when
-- another instance holds it.
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if v == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
