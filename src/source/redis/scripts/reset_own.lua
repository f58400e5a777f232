-- Marks pending entries of this consumer name, left by an earlier instance of the same name,
-- as idle past any ack deadline: the claim path then takes them over like any expired lease.
-- The delivery count is not changed (JUSTID).
--
-- KEYS: stream. ARGV: group, consumer, start id, count, idle ms.
-- Returns {next start id, entries marked}; an empty next start id means done.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], '+', ARGV[4], ARGV[2])
if #p == 0 then return {'', 0} end
local args = {KEYS[1], ARGV[1], ARGV[2], 0}
for _, e in ipairs(p) do args[#args + 1] = e[1] end
args[#args + 1] = 'IDLE'
args[#args + 1] = ARGV[5]
args[#args + 1] = 'JUSTID'
redis.call('XCLAIM', unpack(args))
return {'(' .. p[#p][1], #p}
