-- schedule: a new task waits in the scheduled set until its time (asynq §4.4).
-- KEYS[1] -> asynq:{q}:t:<id>       task hash
-- KEYS[2] -> asynq:{q}:scheduled    scheduled zset
-- ARGV[1] -> encoded TaskMessage
-- ARGV[2] -> process-at (Unix seconds, integer)
-- ARGV[3] -> task id
-- KEYS[3] -> optional: aqsh:{q}:runs:<type>  run index (aqsh only)
-- ARGV[4] -> with KEYS[3]: now (Unix ms), the index score
-- Returns 1 when scheduled, 0 when a task with this id already exists.
--@include index_run
if redis.call("EXISTS", KEYS[1]) == 1 then
  return 0
end
redis.call("HSET", KEYS[1], "msg", ARGV[1], "state", "scheduled")
redis.call("ZADD", KEYS[2], ARGV[2], ARGV[3])
if KEYS[3] then
  index_run(KEYS[3], string.sub(KEYS[1], 1, #KEYS[1] - #ARGV[3]), ARGV[3], ARGV[4])
end
return 1
