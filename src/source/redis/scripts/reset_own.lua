-- Marks pending entries of this consumer name, left by an earlier instance of the same name,
-- as idle past any ack deadline: the claim path then takes them over like any expired lease.
-- The delivery count is not changed (JUSTID). An entry deleted from the stream meanwhile
-- (trimmed, XDEL) is dropped from the pending list by XCLAIM (Redis 7): its content is gone,
-- and a tombstone with its id goes to the dead-letter stream, so that it is accounted for.
--
-- KEYS: stream, dead-letter stream. ARGV: group, consumer, start id, count, idle ms,
-- dead-letter bound.
-- Returns {next start id, entries marked, entries deleted, the first deleted ('' for none)};
-- an empty next start id means done.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], '+', ARGV[4], ARGV[2])
if #p == 0 then return {'', 0, 0, ''} end
local args = {KEYS[1], ARGV[1], ARGV[2], 0}
for _, e in ipairs(p) do args[#args + 1] = e[1] end
args[#args + 1] = 'IDLE'
args[#args + 1] = ARGV[5]
args[#args + 1] = 'JUSTID'
local claimed = {}
for _, id in ipairs(redis.call('XCLAIM', unpack(args))) do claimed[id] = true end
local gone, first = 0, ''
for _, e in ipairs(p) do
  if not claimed[e[1]] then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'message_id', e[1],
      'publish_time', string.match(e[1], '^(%d+)'), 'attempts', tostring(e[4]),
      'dead_reason', 'deleted from the stream while pending')
    gone = gone + 1
    if first == '' then first = e[1] end
  end
end
return {'(' .. p[#p][1], #p - gone, gone, first}
