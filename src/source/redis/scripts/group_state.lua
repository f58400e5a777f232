-- The state of this consumer group, read in one step.
--
-- KEYS: stream. ARGV: group.
-- Returns {pending, undelivered entries or -1 when unknown, drained}: drained is 1 when the
-- group has delivered every entry of the stream and none is pending; {-1, -1, 0} when the
-- group does not exist.
local function less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, bm = tonumber(am), tonumber(bm)
  if am ~= bm then return am < bm end
  return tonumber(as) < tonumber(bs)
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, -1, 0} end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  if info['name'] == ARGV[1] then
    local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
    local delivered = #top == 0 or not less(info['last-delivered-id'], top[1][1])
    local lag = info['lag']
    if type(lag) ~= 'number' then lag = -1 end
    if delivered then lag = 0 end
    local drained = 0
    if delivered and info['pending'] == 0 then drained = 1 end
    return {info['pending'], lag, drained}
  end
end
return {-1, -1, 0}
