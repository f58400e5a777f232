-- Lease operations of one batch, each checked for ownership first.
--
-- KEYS: stream, dead-letter stream.
-- ARGV: group, consumer, dead-letter stream bound, then five values per operation:
--   operation (ack, extend, requeue, dead), entry id, delivery count the entry must still
--   have (0: any), attempts so far, reason of a dead letter ('' for none).
-- Returns one answer per operation: 1 done, 0 another consumer owns the entry or it was
-- delivered again since, 2 not pending at all (acked already, or gone), 3 the entry was
-- deleted from the stream while pending (trimmed, XDEL): its content is gone, a tombstone
-- with its id went to the dead-letter stream and it is no longer pending.
local stream, dead = KEYS[1], KEYS[2]
local group, consumer, dead_max = ARGV[1], ARGV[2], ARGV[3]

-- Adds a copy of entry `id` with its attempt count to `target`. The copy keeps the message's
-- identity: an entry without `message_id` or `publish_time` gets the original entry's id and
-- milliseconds, which stood in for them. A dead letter with a reason gets `dead_reason`.
-- Returns false when the entry is not in the stream any more.
local function copy(id, target, attempts, bound, reason)
  local e = redis.call('XRANGE', stream, id, id)
  if #e == 0 then return false end
  local args = {target}
  if bound then
    args[#args + 1] = 'MAXLEN'
    args[#args + 1] = '~'
    args[#args + 1] = bound
  end
  args[#args + 1] = '*'
  local f = e[1][2]
  local has_id, has_time = false, false
  for i = 1, #f, 2 do
    if f[i] ~= 'attempts' and f[i] ~= 'dead_reason' then
      args[#args + 1] = f[i]
      args[#args + 1] = f[i + 1]
    end
    if f[i] == 'message_id' then has_id = true end
    if f[i] == 'publish_time' then has_time = true end
  end
  if not has_id then
    args[#args + 1] = 'message_id'
    args[#args + 1] = id
  end
  if not has_time then
    args[#args + 1] = 'publish_time'
    args[#args + 1] = string.match(id, '^(%d+)')
  end
  args[#args + 1] = 'attempts'
  args[#args + 1] = attempts
  if reason and reason ~= '' then
    args[#args + 1] = 'dead_reason'
    args[#args + 1] = reason
  end
  redis.call('XADD', unpack(args))
  return true
end

-- Records an entry deleted from the stream while pending: a tombstone with its id.
local function tombstone(id, attempts)
  redis.call('XADD', dead, 'MAXLEN', '~', dead_max, '*', 'message_id', id,
    'publish_time', string.match(id, '^(%d+)'), 'attempts', attempts,
    'dead_reason', 'deleted from the stream while pending')
end

local out = {}
for i = 4, #ARGV, 5 do
  local op, id, deliveries, attempts, reason =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if #p == 0 then
    out[#out + 1] = 2
  elseif p[1][2] ~= consumer or (deliveries ~= '0' and p[1][4] ~= tonumber(deliveries)) then
    out[#out + 1] = 0
  else
    local answer = 1
    if op == 'extend' then
      -- An entry deleted from the stream is dropped from the pending list by XCLAIM (Redis
      -- 7), which then answers nothing.
      if #redis.call('XCLAIM', stream, group, consumer, 0, id, 'JUSTID') == 0 then
        tombstone(id, attempts)
        answer = 3
      end
    else
      local copied = true
      if op == 'requeue' then
        copied = copy(id, stream, attempts, nil, nil)
      elseif op == 'dead' then
        copied = copy(id, dead, attempts, dead_max, reason)
      end
      if not copied then
        tombstone(id, attempts)
        answer = 3
      end
      redis.call('XACK', stream, group, id)
    end
    out[#out + 1] = answer
  end
end
return out
