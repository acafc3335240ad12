-- inspect_task_op: run, archive or delete one task that is not active (§9.5).
-- KEYS[1] -> asynq:{q}:t:<id>
-- KEYS[2] -> asynq:{q}:pending
-- KEYS[3] -> asynq:{q}:archived
-- KEYS[4] -> asynq:{q}:groups
-- ARGV[1] -> task id
-- ARGV[2] -> operation: run | archive | delete
-- ARGV[3] -> queue key base asynq:{q}:  (state containers are <base><state>)
-- ARGV[4] -> group key prefix asynq:{q}:g:
-- ARGV[5] -> now (Unix seconds)
-- ARGV[6] -> archive cutoff (Unix seconds, now - 90 days)
-- ARGV[7] -> maximum archive size (10000)
-- ARGV[8] -> task key prefix asynq:{q}:t:
-- Returns 1 done; 0 task not found; -1 task is active; -2 nothing to do (run: already pending,
-- archive: already archived).
-- One script with a small dispatch instead of three near-twins: the container lookup by state
-- is the same for all three operations.
local state = redis.call("HGET", KEYS[1], "state")
if not state then
  return 0
end
local op = ARGV[2]
if state == "active" then
  return -1
end
if (op == "run" and state == "pending") or (op == "archive" and state == "archived") then
  return -2
end
local removed
if state == "pending" then
  removed = redis.call("LREM", KEYS[2], 0, ARGV[1])
elseif state == "aggregating" then
  local group = redis.call("HGET", KEYS[1], "group")
  removed = redis.call("ZREM", ARGV[4] .. group, ARGV[1])
  if redis.call("ZCARD", ARGV[4] .. group) == 0 then
    redis.call("SREM", KEYS[4], group)
  end
else
  removed = redis.call("ZREM", ARGV[3] .. state, ARGV[1])
end
if removed == 0 then
  return redis.error_reply("task id not found in the container of state " .. state)
end
if op == "run" then
  redis.call("LPUSH", KEYS[2], ARGV[1])
  redis.call("HSET", KEYS[1], "state", "pending")
elseif op == "archive" then
  redis.call("ZADD", KEYS[3], ARGV[5], ARGV[1])
  redis.call("HSET", KEYS[1], "state", "archived")
  for _, id in ipairs(redis.call("ZRANGE", KEYS[3], "-inf", ARGV[6], "BYSCORE")) do
    redis.call("DEL", ARGV[8] .. id)
  end
  redis.call("ZREMRANGEBYSCORE", KEYS[3], "-inf", ARGV[6])
  for _, id in ipairs(redis.call("ZRANGE", KEYS[3], 0, -tonumber(ARGV[7]))) do
    redis.call("DEL", ARGV[8] .. id)
  end
  redis.call("ZREMRANGEBYRANK", KEYS[3], 0, -tonumber(ARGV[7]))
else
  local lock = redis.call("HGET", KEYS[1], "unique_key")
  if lock and lock ~= "" and redis.call("GET", lock) == ARGV[1] then
    redis.call("DEL", lock)
  end
  redis.call("DEL", KEYS[1])
end
return 1
