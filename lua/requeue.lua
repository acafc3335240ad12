-- requeue: an active task goes back to the front of the line (shutdown timeout, asynq §4.11).
-- KEYS[1] -> asynq:{q}:active
-- KEYS[2] -> asynq:{q}:lease
-- KEYS[3] -> asynq:{q}:pending
-- KEYS[4] -> asynq:{q}:t:<id>
-- ARGV[1] -> task id
-- Returns OK; error NOT FOUND when not active. No counters, message unchanged, and (as asynq)
-- no pending_since.
if redis.call("LREM", KEYS[1], 0, ARGV[1]) == 0 then
  return redis.error_reply("NOT FOUND")
end
if redis.call("ZREM", KEYS[2], ARGV[1]) == 0 then
  return redis.error_reply("NOT FOUND")
end
redis.call("RPUSH", KEYS[3], ARGV[1])
redis.call("HSET", KEYS[4], "state", "pending")
return redis.status_reply("OK")
