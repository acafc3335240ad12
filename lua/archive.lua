-- archive: a task that will not be retried is kept in the archive (asynq v0.25+ §4.13).
-- KEYS[1] -> asynq:{q}:t:<id>
-- KEYS[2] -> asynq:{q}:active
-- KEYS[3] -> asynq:{q}:lease
-- KEYS[4] -> asynq:{q}:archived
-- KEYS[5] -> asynq:{q}:processed:<YYYY-MM-DD>
-- KEYS[6] -> asynq:{q}:failed:<YYYY-MM-DD>
-- KEYS[7] -> asynq:{q}:processed
-- KEYS[8] -> asynq:{q}:failed
-- ARGV[1] -> task id
-- ARGV[2] -> encoded TaskMessage (error_msg, last_failed_at updated by the caller)
-- ARGV[3] -> now (Unix seconds), the archived-set score
-- ARGV[4] -> cutoff (Unix seconds): archived tasks at or before it are trimmed
-- ARGV[5] -> maximum archive size (10000; asynq keeps at most size - 1)
-- ARGV[6] -> daily counter expiry (Unix seconds)
-- ARGV[7] -> max int64
-- ARGV[8] -> task key prefix asynq:{q}:t:
-- Returns OK; error NOT FOUND when not active. Trimmed tasks lose their hashes too, so no id
-- is ever left without its hash. Needs Redis >= 6.2 (ZRANGE BYSCORE), like asynq v0.25+.
if redis.call("LREM", KEYS[2], 0, ARGV[1]) == 0 then
  return redis.error_reply("NOT FOUND")
end
if redis.call("ZREM", KEYS[3], ARGV[1]) == 0 then
  return redis.error_reply("NOT FOUND")
end
redis.call("ZADD", KEYS[4], ARGV[3], ARGV[1])
local old = redis.call("ZRANGE", KEYS[4], "-inf", ARGV[4], "BYSCORE")
for _, id in ipairs(old) do
  redis.call("DEL", ARGV[8] .. id)
end
redis.call("ZREMRANGEBYSCORE", KEYS[4], "-inf", ARGV[4])
local excess = redis.call("ZRANGE", KEYS[4], 0, -tonumber(ARGV[5]))
for _, id in ipairs(excess) do
  redis.call("DEL", ARGV[8] .. id)
end
redis.call("ZREMRANGEBYRANK", KEYS[4], 0, -tonumber(ARGV[5]))
redis.call("HSET", KEYS[1], "msg", ARGV[2], "state", "archived")
if redis.call("INCR", KEYS[5]) == 1 then
  redis.call("EXPIREAT", KEYS[5], ARGV[6])
end
if redis.call("INCR", KEYS[6]) == 1 then
  redis.call("EXPIREAT", KEYS[6], ARGV[6])
end
if redis.call("GET", KEYS[7]) == ARGV[7] then
  redis.call("SET", KEYS[7], 1)
  redis.call("SET", KEYS[8], 1)
else
  redis.call("INCR", KEYS[7])
  redis.call("INCR", KEYS[8])
end
return redis.status_reply("OK")
