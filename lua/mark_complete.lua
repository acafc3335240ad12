-- mark_complete: a task finished successfully and is kept for its retention (asynq §4.10).
-- KEYS[1] -> asynq:{q}:active
-- KEYS[2] -> asynq:{q}:lease
-- KEYS[3] -> asynq:{q}:completed
-- KEYS[4] -> asynq:{q}:t:<id>
-- KEYS[5] -> asynq:{q}:processed:<YYYY-MM-DD>
-- KEYS[6] -> asynq:{q}:processed
-- KEYS[7] -> asynq:{q}:unique:...   (optional)
-- ARGV[1] -> task id
-- ARGV[2] -> daily counter expiry (Unix seconds)
-- ARGV[3] -> completed-set score = completed_at + retention (Unix seconds)
-- ARGV[4] -> encoded TaskMessage with completed_at set
-- ARGV[5] -> max int64
-- ARGV[6] -> the handler's result bytes (optional; aqsh's addition)
-- Returns OK; error NOT FOUND when not active, INTERNAL when already in completed.
-- The result is the script's first write, so a Redis that refuses writes (OOM) refuses the
-- whole transition: under maxmemory Redis lets a script that has written go on writing, and a
-- separate result write could fail while the completion succeeded, losing the result.
if ARGV[6] then
  if not redis.call("LPOS", KEYS[1], ARGV[1]) then
    return redis.error_reply("NOT FOUND")
  end
  redis.call("HSET", KEYS[4], "result", ARGV[6])
end
if redis.call("LREM", KEYS[1], 0, ARGV[1]) == 0 then
  return redis.error_reply("NOT FOUND")
end
if redis.call("ZREM", KEYS[2], ARGV[1]) == 0 then
  return redis.error_reply("NOT FOUND")
end
if redis.call("ZADD", KEYS[3], ARGV[3], ARGV[1]) ~= 1 then
  return redis.error_reply("INTERNAL")
end
redis.call("HSET", KEYS[4], "msg", ARGV[4], "state", "completed")
if redis.call("INCR", KEYS[5]) == 1 then
  redis.call("EXPIREAT", KEYS[5], ARGV[2])
end
if redis.call("GET", KEYS[6]) == ARGV[5] then
  redis.call("SET", KEYS[6], 1)
else
  redis.call("INCR", KEYS[6])
end
if KEYS[7] and redis.call("GET", KEYS[7]) == ARGV[1] then
  redis.call("DEL", KEYS[7])
end
return redis.status_reply("OK")
