-- flow_rate: a task just leased by dequeue is admitted by its rate window, or waits for the
-- next window in scheduled (a real time, so asynq's forwarder brings it back).
-- KEYS[1] -> asynq:{q}:active
-- KEYS[2] -> asynq:{q}:lease
-- KEYS[3] -> asynq:{q}:scheduled
-- KEYS[4] -> asynq:{q}:t:<id>
-- KEYS[5] -> aqsh:{q}:flow:rate:<key>:<window start>
-- ARGV[1] -> task id
-- ARGV[2] -> runs admitted per window (>= 1)
-- ARGV[3] -> the window's end (Unix s): the counter's expiry and a held run's score
-- ARGV[4] -> the rate key
-- ARGV[5] -> now (Unix ms), when waiting began
-- KEYS[6] -> aqsh:{q}:flow:waited; ARGV[6] -> the task type; ARGV[7] -> 1 to record a wait
--            on admission (0 when a concurrency slot is still to be taken: that records it)
-- KEYS[7] -> aqsh:{q}:flow:slots:<concurrency key> (only for a run with a concurrency rule):
--            a run holding a slot there (a promoted waiter) was admitted when it first came
--            and is not counted twice
-- Returns 0 when admitted, else the window's end (the task now waits in scheduled).
--@include flow_wait
local id = ARGV[1]
if KEYS[7] and redis.call("ZSCORE", KEYS[7], id) then
  return 0
end
-- GET then INCR (not INCR then DECR): only the commands of aqsh's documented ACL.
if tonumber(redis.call("GET", KEYS[5]) or "0") < tonumber(ARGV[2]) then
  if redis.call("INCR", KEYS[5]) == 1 then
    redis.call("EXPIREAT", KEYS[5], tonumber(ARGV[3]) + 60)
  end
  redis.call("HDEL", KEYS[4], "aqsh_wait_reason", "aqsh_wait_key")
  if ARGV[7] == "1" then
    flow_record_wait(KEYS[4], KEYS[6], ARGV[6], ARGV[5], id)
  end
  return 0
end
flow_hold(KEYS[1], KEYS[2], KEYS[3], KEYS[4], id, ARGV[3], "rate", ARGV[4], ARGV[5])
return tonumber(ARGV[3])
