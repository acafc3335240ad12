-- schedule_unique: schedule while holding a uniqueness lock (asynq §4.5).
-- KEYS[1] -> asynq:{q}:unique:<type>:<md5>   lock
-- KEYS[2] -> asynq:{q}:t:<id>                task hash
-- KEYS[3] -> asynq:{q}:scheduled             scheduled zset
-- ARGV[1] -> task id (lock value)
-- ARGV[2] -> lock TTL (whole seconds; covers the wait plus the uniqueness window)
-- ARGV[3] -> process-at (Unix seconds, integer)
-- ARGV[4] -> encoded TaskMessage (unique_key already set)
-- KEYS[4] -> optional: aqsh:{q}:runs:<type>  run index (aqsh only)
-- ARGV[5] -> with KEYS[4]: now (Unix ms), the index score
-- Returns 1 when scheduled, -1 when the lock is held, 0 on an id conflict (lock kept).
--@include index_run
if not redis.call("SET", KEYS[1], ARGV[1], "NX", "EX", ARGV[2]) then
  return -1
end
if redis.call("EXISTS", KEYS[2]) == 1 then
  return 0
end
redis.call("HSET", KEYS[2], "msg", ARGV[4], "state", "scheduled", "unique_key", KEYS[1])
redis.call("ZADD", KEYS[3], ARGV[3], ARGV[1])
if KEYS[4] then
  index_run(KEYS[4], string.sub(KEYS[2], 1, #KEYS[2] - #ARGV[1]), ARGV[1], ARGV[5])
end
return 1
