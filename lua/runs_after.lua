-- runs_after: the next entries of a run index, newest first, after a cursor (aqsh only).
-- KEYS[1] -> aqsh:{q}:runs:<type>   run index (task ids scored by enqueue time, Unix ms)
-- ARGV[1] -> upper score bound: "+inf", or the cursor's score (ms)
-- ARGV[2] -> the cursor's task id: entries at exactly ARGV[1] are returned only when they
--            sort after it (Redis orders equal scores by member, bytewise, reversed here);
--            "" returns everything up to and including ARGV[1]
-- ARGV[3] -> how many entries
-- Returns a flat list: id, score, id, score, ...
-- One script rather than two commands: when the cursor's entry is in this index, its rank
-- continues the page exactly (ties included, whatever their number); when it is not (it came
-- from another index of a merged listing, or was healed away) the score bound does, skipping
-- the ties that come before the cursor.
local key, bound, after, count = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
if after ~= "" then
  local score = redis.call("ZSCORE", key, after)
  if score and tonumber(score) == tonumber(bound) then
    local rank = redis.call("ZREVRANK", key, after)
    return redis.call("ZREVRANGE", key, rank + 1, rank + count, "WITHSCORES")
  end
end
-- Lua's "<" on strings follows the server's locale (strcoll); the index's order is bytewise.
local function bytes_before(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local bound_n = tonumber(bound)
local out = {}
local offset = 0
while true do
  local chunk = redis.call("ZREVRANGEBYSCORE", key, bound, "-inf", "WITHSCORES",
    "LIMIT", offset, count)
  for i = 1, #chunk, 2 do
    local member, score = chunk[i], chunk[i + 1]
    if after == "" or tonumber(score) < bound_n or bytes_before(member, after) then
      out[#out + 1] = member
      out[#out + 1] = score
    end
  end
  if #out >= 2 * count or #chunk < 2 * count then
    break
  end
  offset = offset + count
end
return out
