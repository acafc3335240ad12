-- flow_after_end: a run that waited for other tasks (``?after=``) starts or is cancelled.
-- KEYS[1] -> asynq:{q}:scheduled
-- KEYS[2] -> asynq:{q}:pending
-- KEYS[3] -> asynq:{q}:archived
-- KEYS[4] -> asynq:{q}:t:<id>
-- ARGV[1] -> task id
-- ARGV[2] -> "run" or "cancel"
-- ARGV[3] -> the waiters' score in scheduled (a run moved or rescored by a foreign tool is no
--            longer waiting, and is left alone)
-- ARGV[4] -> now (Unix s): the archived-set score
-- ARGV[5] -> now (Unix ns): pending_since
-- ARGV[6] -> cancel: the encoded TaskMessage with error_msg naming the dependency
-- ARGV[7] -> queue name, published on ARGV[8] (the wake-up channel) when the run starts
-- KEYS[5] -> aqsh:{q}:flow:waited; ARGV[9] -> the task type; ARGV[10] -> when the run was
--            submitted (Unix ms; "" when unknown: no wait recorded); ARGV[11] -> now (Unix ms)
-- Returns 1 when the run moved, 0 when it was no longer waiting.
--@include flow_wait
if redis.call("ZSCORE", KEYS[1], ARGV[1]) ~= ARGV[3] then
  return 0
end
redis.call("ZREM", KEYS[1], ARGV[1])
if ARGV[2] == "run" then
  redis.call("RPUSH", KEYS[2], ARGV[1])
  redis.call("HSET", KEYS[4], "state", "pending", "pending_since", ARGV[5])
  redis.pcall("PUBLISH", ARGV[8], ARGV[7])
  if ARGV[10] ~= "" then
    flow_note_wait(KEYS[5], ARGV[9], tonumber(ARGV[11]) - tonumber(ARGV[10]), ARGV[11],
                   ARGV[1])
  end
else
  redis.call("ZADD", KEYS[3], ARGV[4], ARGV[1])
  redis.call("HSET", KEYS[4], "msg", ARGV[6], "state", "archived")
end
return 1
