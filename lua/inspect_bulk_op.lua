-- inspect_bulk_op: run, archive or delete every task of one container (§9.6).
-- KEYS[1] -> the source: asynq:{q}:pending (list), a state zset, or a group zset asynq:{q}:g:<g>
-- KEYS[2] -> asynq:{q}:pending
-- KEYS[3] -> asynq:{q}:archived
-- KEYS[4] -> asynq:{q}:groups
-- ARGV[1] -> operation: run | archive | delete
-- ARGV[2] -> 1 when KEYS[1] is a list, 0 for a zset
-- ARGV[3] -> task key prefix asynq:{q}:t:
-- ARGV[4] -> now (Unix seconds)
-- ARGV[5] -> archive cutoff (Unix seconds)
-- ARGV[6] -> maximum archive size (10000)
-- ARGV[7] -> group name when KEYS[1] is a group, else ""
-- Returns how many tasks were affected. Unique locks owned by deleted tasks are released.
local ids
if ARGV[2] == "1" then
  ids = redis.call("LRANGE", KEYS[1], 0, -1)
else
  ids = redis.call("ZRANGE", KEYS[1], 0, -1)
end
local op = ARGV[1]
for _, id in ipairs(ids) do
  local key = ARGV[3] .. id
  if op == "run" then
    redis.call("LPUSH", KEYS[2], id)
    redis.call("HSET", key, "state", "pending")
  elseif op == "archive" then
    redis.call("ZADD", KEYS[3], ARGV[4], id)
    redis.call("HSET", key, "state", "archived")
  else
    local lock = redis.call("HGET", key, "unique_key")
    if lock and lock ~= "" and redis.call("GET", lock) == id then
      redis.call("DEL", lock)
    end
    redis.call("DEL", key)
  end
end
redis.call("DEL", KEYS[1])
if ARGV[7] ~= "" then
  redis.call("SREM", KEYS[4], ARGV[7])
end
if op == "archive" then
  for _, id in ipairs(redis.call("ZRANGE", KEYS[3], "-inf", ARGV[5], "BYSCORE")) do
    redis.call("DEL", ARGV[3] .. id)
  end
  redis.call("ZREMRANGEBYSCORE", KEYS[3], "-inf", ARGV[5])
  for _, id in ipairs(redis.call("ZRANGE", KEYS[3], 0, -tonumber(ARGV[6]))) do
    redis.call("DEL", ARGV[3] .. id)
  end
  redis.call("ZREMRANGEBYRANK", KEYS[3], 0, -tonumber(ARGV[6]))
end
return #ids
