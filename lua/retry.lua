-- retry: a failed task waits in the retry set (asynq §4.12).
-- KEYS[1] -> asynq:{q}:t:<id>
-- KEYS[2] -> asynq:{q}:active
-- KEYS[3] -> asynq:{q}:lease
-- KEYS[4] -> asynq:{q}:retry
-- KEYS[5] -> asynq:{q}:processed:<YYYY-MM-DD>
-- KEYS[6] -> asynq:{q}:failed:<YYYY-MM-DD>
-- KEYS[7] -> asynq:{q}:processed
-- KEYS[8] -> asynq:{q}:failed
-- ARGV[1] -> task id
-- ARGV[2] -> encoded TaskMessage (retried, error_msg, last_failed_at updated by the caller)
-- ARGV[3] -> retry at (Unix seconds, integer)
-- ARGV[4] -> daily counter expiry (Unix seconds)
-- ARGV[5] -> 1 when this counts as a failure, else 0
-- ARGV[6] -> max int64
-- Returns OK; error NOT FOUND when not active. The unique lock is kept (asynq Q2).
if redis.call("LREM", KEYS[2], 0, ARGV[1]) == 0 then
  return redis.error_reply("NOT FOUND")
end
if redis.call("ZREM", KEYS[3], ARGV[1]) == 0 then
  return redis.error_reply("NOT FOUND")
end
redis.call("ZADD", KEYS[4], ARGV[3], ARGV[1])
redis.call("HSET", KEYS[1], "msg", ARGV[2], "state", "retry")
if tonumber(ARGV[5]) == 1 then
  if redis.call("INCR", KEYS[5]) == 1 then
    redis.call("EXPIREAT", KEYS[5], ARGV[4])
  end
  if redis.call("INCR", KEYS[6]) == 1 then
    redis.call("EXPIREAT", KEYS[6], ARGV[4])
  end
  if redis.call("GET", KEYS[7]) == ARGV[6] then
    redis.call("SET", KEYS[7], 1)
    redis.call("SET", KEYS[8], 1)
  else
    redis.call("INCR", KEYS[7])
    redis.call("INCR", KEYS[8])
  end
end
return redis.status_reply("OK")
