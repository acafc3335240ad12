-- done: a task finished successfully without retention, or was revoked (asynq §4.9).
-- KEYS[1] -> asynq:{q}:active
-- KEYS[2] -> asynq:{q}:lease
-- KEYS[3] -> asynq:{q}:t:<id>
-- KEYS[4] -> asynq:{q}:processed:<YYYY-MM-DD>
-- KEYS[5] -> asynq:{q}:processed
-- KEYS[6] -> asynq:{q}:unique:...   (optional: only when the task holds a lock)
-- ARGV[1] -> task id
-- ARGV[2] -> daily counter expiry (Unix seconds, now + 90 days)
-- ARGV[3] -> max int64, where the total wraps to 1
-- Returns OK, or an error reply NOT FOUND when the task is not active (steps already applied
-- stay applied, as in asynq).
if redis.call("LREM", KEYS[1], 0, ARGV[1]) == 0 then
  return redis.error_reply("NOT FOUND")
end
if redis.call("ZREM", KEYS[2], ARGV[1]) == 0 then
  return redis.error_reply("NOT FOUND")
end
if redis.call("DEL", KEYS[3]) == 0 then
  return redis.error_reply("NOT FOUND")
end
if redis.call("INCR", KEYS[4]) == 1 then
  redis.call("EXPIREAT", KEYS[4], ARGV[2])
end
if redis.call("GET", KEYS[5]) == ARGV[3] then
  redis.call("SET", KEYS[5], 1)
else
  redis.call("INCR", KEYS[5])
end
if KEYS[6] and redis.call("GET", KEYS[6]) == ARGV[1] then
  redis.call("DEL", KEYS[6])
end
return redis.status_reply("OK")
