-- inspect_delete_queue: remove a queue's tasks and containers (§9.7).
-- KEYS[1] -> asynq:{q}:pending
-- KEYS[2] -> asynq:{q}:active
-- KEYS[3] -> asynq:{q}:scheduled
-- KEYS[4] -> asynq:{q}:retry
-- KEYS[5] -> asynq:{q}:archived
-- KEYS[6] -> asynq:{q}:lease
-- ARGV[1] -> 1 to force (delete waiting tasks too), 0 to refuse a non-empty queue
-- ARGV[2] -> task key prefix asynq:{q}:t:
-- Returns 1 deleted; -1 not empty (without force, active tasks included); -2 has active tasks
-- (with force). Completed and aggregating tasks do not count, as in asynq.
local active = redis.call("LLEN", KEYS[2])
if ARGV[1] ~= "1" then
  local total = active + redis.call("LLEN", KEYS[1]) + redis.call("ZCARD", KEYS[3]) +
    redis.call("ZCARD", KEYS[4]) + redis.call("ZCARD", KEYS[5])
  if total > 0 then
    return -1
  end
elseif active > 0 then
  return -2
end
for _, id in ipairs(redis.call("LRANGE", KEYS[1], 0, -1)) do
  redis.call("DEL", ARGV[2] .. id)
end
for i = 3, 5 do
  for _, id in ipairs(redis.call("ZRANGE", KEYS[i], 0, -1)) do
    redis.call("DEL", ARGV[2] .. id)
  end
end
redis.call("DEL", KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
return 1
