-- A graceful stop: gives the consumer name up and removes the consumer from the group when
-- it holds no pending entry (XGROUP DELCONSUMER would drop them from the group otherwise).
--
-- KEYS: stream, liveness key. ARGV: group, consumer, token, 1 to remove the consumer (0: it
-- still holds leases, only the name is given up).
-- Returns 1 when the consumer was removed, 0 when it was kept.
local v = redis.call('GET', KEYS[2])
if v ~= false and v ~= ARGV[3] then return 0 end
if v then redis.call('DEL', KEYS[2]) end
if ARGV[4] ~= '1' then return 0 end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
