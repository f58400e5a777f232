-- Claims entries idle past the ack deadline for this consumer (XAUTOCLAIM), dead-lettering
-- those past their attempts.
--
-- KEYS: stream, dead-letter stream.
-- ARGV: group, consumer, max attempts, min idle ms, start id, count, dead-letter bound.
-- Returns {next start id, {{id, fields, deliveries}...}, dead-lettered}; a next start id of
-- 0-0 means the scan went round the whole pending list.
-- XAUTOCLAIM looks every scanned pending entry up in the stream before it checks its idle
-- time (about a microsecond each, ten entries per entry asked for): on a long pending list
-- with nothing expired, the usual case, a sweep cost milliseconds of server time. XPENDING
-- with IDLE only walks the pending list: when it finds nothing idle from the start id on,
-- the sweep is over at once.
if #redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[4], ARGV[5], '+', 1) == 0 then
  return {'0-0', {}, 0}
end
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[4], ARGV[5], 'COUNT', ARGV[6])
local out = {}
local dead = 0
for _, e in ipairs(r[2]) do
  if type(e) == 'table' and type(e[2]) == 'table' then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    local n = p[1][4]
    local prior = 0
    local args = {KEYS[2], 'MAXLEN', '~', ARGV[7], '*'}
    local f = e[2]
    local has_id, has_time = false, false
    for i = 1, #f, 2 do
      if f[i] == 'attempts' then
        prior = tonumber(f[i + 1]) or 0
      else
        args[#args + 1] = f[i]
        args[#args + 1] = f[i + 1]
      end
      if f[i] == 'message_id' then has_id = true end
      if f[i] == 'publish_time' then has_time = true end
    end
    -- The dead letter keeps the message's identity (see lease.lua's copy).
    if not has_id then
      args[#args + 1] = 'message_id'
      args[#args + 1] = e[1]
    end
    if not has_time then
      args[#args + 1] = 'publish_time'
      args[#args + 1] = string.match(e[1], '^(%d+)')
    end
    if prior + n > tonumber(ARGV[3]) then
      args[#args + 1] = 'attempts'
      args[#args + 1] = tostring(prior + n - 1)
      redis.call('XADD', unpack(args))
      redis.call('XACK', KEYS[1], ARGV[1], e[1])
      dead = dead + 1
    else
      out[#out + 1] = {e[1], f, n}
    end
  end
end
return {r[1], out, dead}
