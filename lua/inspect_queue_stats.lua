-- inspect_queue_stats: everything GetQueueInfo reports for one queue, in one round trip (§9.1, §9.2).
-- KEYS[1] -> asynq:{q}:pending
-- KEYS[2] -> asynq:{q}:active
-- KEYS[3] -> asynq:{q}:scheduled
-- KEYS[4] -> asynq:{q}:retry
-- KEYS[5] -> asynq:{q}:archived
-- KEYS[6] -> asynq:{q}:completed
-- KEYS[7] -> asynq:{q}:processed:<today>
-- KEYS[8] -> asynq:{q}:failed:<today>
-- KEYS[9] -> asynq:{q}:processed
-- KEYS[10] -> asynq:{q}:failed
-- KEYS[11] -> asynq:{q}:paused
-- KEYS[12] -> asynq:{q}:groups
-- ARGV[1] -> task key prefix asynq:{q}:t:
-- ARGV[2] -> group key prefix asynq:{q}:g:
-- ARGV[3] -> sample size per container (asynq: 20)
-- ARGV[4] -> groups sampled (asynq: 5)
-- Returns {pending, active, scheduled, retry, archived, completed, processed_today,
--          failed_today, processed_total, failed_total, paused (0/1), oldest pending_since ns,
--          group count, aggregating count, memory estimate bytes}.
-- Memory is asynq's sampled estimate, but a sampled id without a hash counts 0 instead of
-- failing the whole call (asynq before HEAD raises a script error there).
local function num(v)
  return tonumber(v) or 0
end
local sample = tonumber(ARGV[3])
local function usage(key)
  return num(redis.call("MEMORY", "USAGE", key))
end
local function sampled(ids, total)
  if #ids == 0 then
    return 0
  end
  local sum = 0
  for _, id in ipairs(ids) do
    sum = sum + usage(ARGV[1] .. id)
  end
  return math.floor(sum / #ids * total)
end
local res = {}
local memory = 0
for i = 1, 2 do
  local n = redis.call("LLEN", KEYS[i])
  res[#res + 1] = n
  memory = memory + sampled(redis.call("LRANGE", KEYS[i], 0, sample - 1), n) + usage(KEYS[i])
end
for i = 3, 6 do
  local n = redis.call("ZCARD", KEYS[i])
  res[#res + 1] = n
  memory = memory + sampled(redis.call("ZRANGE", KEYS[i], 0, sample - 1), n) + usage(KEYS[i])
end
for i = 7, 10 do
  res[#res + 1] = num(redis.call("GET", KEYS[i]))
end
res[#res + 1] = redis.call("EXISTS", KEYS[11])
-- pending_since stays a string: nanoseconds do not fit a Lua double exactly.
local oldest = "0"
local tail = redis.call("LRANGE", KEYS[1], -1, -1)
if #tail > 0 then
  oldest = redis.call("HGET", ARGV[1] .. tail[1], "pending_since") or "0"
end
res[#res + 1] = oldest
local groups = redis.call("SMEMBERS", KEYS[12])
local aggregating = 0
local group_ids = {}
for gi, g in ipairs(groups) do
  local n = redis.call("ZCARD", ARGV[2] .. g)
  aggregating = aggregating + n
  if gi <= tonumber(ARGV[4]) then
    for _, id in ipairs(redis.call("ZRANGE", ARGV[2] .. g, 0, sample - 1)) do
      group_ids[#group_ids + 1] = id
    end
  end
end
res[#res + 1] = #groups
res[#res + 1] = aggregating
memory = memory + sampled(group_ids, aggregating)
res[#res + 1] = memory
return res
