-- Claims entries idle past the ack deadline for this consumer (XAUTOCLAIM); those past their
-- attempts are returned apart, for the client to dead-letter.
--
-- KEYS: stream, dead-letter stream.
-- ARGV: group, consumer, max attempts, min idle ms, start id, count, dead-letter bound.
-- Returns {next start id, {{id, fields, deliveries}...}, {{id, deliveries, attempts}...} past
-- their attempts, entries deleted while pending (dead-lettered as tombstones), the first of
-- them ('' for none)}; a next start id of 0-0 means the scan went round the whole pending
-- list.
-- XAUTOCLAIM looks every scanned pending entry up in the stream before it checks its idle
-- time (about a microsecond each, ten entries per entry asked for): on a long pending list
-- with nothing expired, the usual case, a sweep cost milliseconds of server time. XPENDING
-- with IDLE only walks the pending list: when it finds nothing idle from the start id on,
-- the sweep is over at once.
if #redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[4], ARGV[5], '+', 1) == 0 then
  return {'0-0', {}, {}, 0, ''}
end
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[4], ARGV[5], 'COUNT', ARGV[6])
local out = {}
local past = {}
for _, e in ipairs(r[2]) do
  if type(e) == 'table' and type(e[2]) == 'table' then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    local n = p[1][4]
    local prior = 0
    local f = e[2]
    for i = 1, #f, 2 do
      if f[i] == 'attempts' then prior = tonumber(f[i + 1]) or 0 end
    end
    if prior + n > tonumber(ARGV[3]) then
      -- Dead-lettered by the client through the lease script, which checks ownership
      -- and whose answers a retry counts: an answer lost here would go uncounted.
      past[#past + 1] = {e[1], n, prior + n - 1}
    else
      out[#out + 1] = {e[1], f, n}
    end
  end
end
-- Entries deleted from the stream while pending (trimmed, XDEL): XAUTOCLAIM (Redis 7)
-- removed them from the pending list. Their content is gone; a tombstone in the dead-letter
-- stream keeps their id, so that they are accounted for.
local gone = r[3] or {}
for _, id in ipairs(gone) do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'message_id', id,
    'publish_time', string.match(id, '^(%d+)'), 'attempts', '0',
    'dead_reason', 'deleted from the stream while pending')
end
return {r[1], out, past, #gone, gone[1] or ''}
