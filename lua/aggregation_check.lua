-- aggregation_check: move a group's tasks into a new aggregation set when the group is due
-- (asynq §4.20.2): it reached max size, its oldest task waited max delay, or its newest task
-- is older than the grace period.
-- KEYS[1] -> asynq:{q}:g:<group>             the group's zset
-- KEYS[2] -> asynq:{q}:g:<group>:<set id>    the new aggregation set
-- KEYS[3] -> asynq:{q}:aggregation_sets      set key -> deadline
-- KEYS[4] -> asynq:{q}:groups                names of groups holding tasks
-- ARGV[1] -> max size (0 = no limit)
-- ARGV[2] -> max delay in seconds (0 = no limit)
-- ARGV[3] -> grace period in seconds
-- ARGV[4] -> the set's deadline (Unix seconds): past it the recoverer puts the tasks back
-- ARGV[5] -> now (Unix seconds)
-- ARGV[6] -> group name
-- Returns 1 when a set was made, 0 when the group is not due (or empty).
-- A set takes at most max size tasks, the oldest first; the group's name leaves the groups
-- set only when the set emptied the group.
local size = redis.call("ZCARD", KEYS[1])
if size == 0 then
  return 0
end
local max_size = tonumber(ARGV[1])
local now = tonumber(ARGV[5])

local function take(last_rank, emptied)
  local members = redis.call("ZRANGE", KEYS[1], 0, last_rank, "WITHSCORES")
  for i = 1, #members - 1, 2 do
    redis.call("ZADD", KEYS[2], tonumber(members[i + 1]), members[i])
  end
  redis.call("ZREMRANGEBYRANK", KEYS[1], 0, last_rank)
  redis.call("ZADD", KEYS[3], ARGV[4], KEYS[2])
  if emptied then
    redis.call("SREM", KEYS[4], ARGV[6])
  end
  return 1
end

if max_size ~= 0 and size >= max_size then
  return take(max_size - 1, size == max_size)
end
-- Below max size (or no limit): the set takes every task, which empties the group.
local max_delay = tonumber(ARGV[2])
if max_delay ~= 0 then
  local oldest = redis.call("ZRANGE", KEYS[1], 0, 0, "WITHSCORES")
  if tonumber(oldest[2]) <= now - max_delay then
    return take(max_size - 1, true)
  end
end
local newest = redis.call("ZREVRANGE", KEYS[1], 0, 0, "WITHSCORES")
if tonumber(newest[2]) <= now - tonumber(ARGV[3]) then
  return take(max_size - 1, true)
end
return 0
