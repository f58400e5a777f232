-- Retention: trims the entries every group of the stream has acked, and records this
-- group's floor (every entry below it is acked) so that a destroyed group is recreated
-- there instead of replaying the stream's history.
--
-- KEYS: stream, floor key of this group. ARGV: group.
-- Returns {entries trimmed, this group's floor or false}.
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return ms, seq
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  am, bm = tonumber(am), tonumber(bm)
  if am ~= bm then return am < bm end
  return tonumber(as) < tonumber(bs)
end
-- The id right after `id`.
local function successor(id)
  local ms, seq = parse(id)
  if #seq > 15 then return string.format('%d', tonumber(ms) + 1) .. '-0' end
  return ms .. '-' .. string.format('%d', tonumber(seq) + 1)
end

if redis.call('EXISTS', KEYS[1]) == 0 then return {0, false} end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return {0, false} end
local lowest, mine = nil, nil
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local floor
  if info['pending'] > 0 then
    floor = redis.call('XPENDING', KEYS[1], info['name'])[2]
  else
    floor = successor(info['last-delivered-id'])
  end
  if info['name'] == ARGV[1] then mine = floor end
  if lowest == nil or less(floor, lowest) then lowest = floor end
end
local trimmed = redis.call('XTRIM', KEYS[1], 'MINID', lowest)
if mine then redis.call('SET', KEYS[2], mine) end
return {trimmed, mine or false}
