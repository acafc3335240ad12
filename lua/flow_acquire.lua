-- flow_acquire: a task just leased by dequeue takes a slot of its concurrency key, or waits.
-- KEYS[1] -> asynq:{q}:active
-- KEYS[2] -> asynq:{q}:lease
-- KEYS[3] -> asynq:{q}:scheduled
-- KEYS[4] -> asynq:{q}:pending
-- KEYS[5] -> asynq:{q}:t:<id>
-- KEYS[6] -> aqsh:{q}:flow:slots:<key>
-- KEYS[7] -> aqsh:{q}:flow:wait:<key>
-- KEYS[8] -> aqsh:{q}:flow:keys
-- ARGV[1] -> task id
-- ARGV[2] -> the key's limit (>= 1)
-- ARGV[3] -> now (Unix s)
-- ARGV[4] -> reservation deadline (Unix s, now + lease)
-- ARGV[5] -> the waiters' score in scheduled (Unix s, far ahead)
-- ARGV[6] -> the concurrency key
-- ARGV[7] -> now (Unix ms), when waiting began
-- ARGV[8] -> task key prefix asynq:{q}:t:
-- ARGV[9] -> now (Unix ns), pending_since of a promoted waiter
-- ARGV[10] -> queue name, published on ARGV[11] (the wake-up channel) when a waiter moves
-- ARGV[12] -> the run's place in the line: its submission time (Unix us)
-- KEYS[9]  -> aqsh:{q}:flow:waited, ARGV[13] -> the task type (a started waiter's wait)
-- Returns 1 when the task holds a slot and may run, 0 when it now waits (moved from active
-- to scheduled: no lease, no retry and no timeout used while it waits).
--@include flow_lib
local id, limit = ARGV[1], tonumber(ARGV[2])
redis.call("HSET", KEYS[8], ARGV[6], limit)
-- Its own reservation (a promoted waiter, a redelivery), or a free slot nobody waits for.
local function may_run()
  return redis.call("ZSCORE", KEYS[6], id)
      or (redis.call("ZCARD", KEYS[7]) == 0 and redis.call("ZCARD", KEYS[6]) < limit)
end
-- Dead holders' slots are looked for only when they could make a difference: a free slot
-- with nobody waiting is taken as it is (the common case costs no range scan).
local run = may_run()
if not run then
  flow_free_expired(KEYS[6], KEYS[2], ARGV[3])
  run = may_run()
end
if run then
  redis.call("ZADD", KEYS[6], ARGV[4], id)
  -- One read tells whether it ever waited: a run that never did writes nothing more.
  local was = redis.call("HMGET", KEYS[5], "aqsh_wait_reason", "aqsh_wait_key",
                         "aqsh_wait_since")
  if was[1] or was[2] then
    redis.call("HDEL", KEYS[5], "aqsh_wait_reason", "aqsh_wait_key")
  end
  if was[3] then
    flow_record_wait(KEYS[5], KEYS[9], ARGV[13], ARGV[7], id)
  end
  return 1
end
flow_hold(KEYS[1], KEYS[2], KEYS[3], KEYS[5], id, ARGV[5], "concurrency", ARGV[6], ARGV[7])
redis.call("ZADD", KEYS[7], ARGV[12], id)
-- A slot freed by an expiry with waiters ahead goes to the oldest of them.
flow_promote(KEYS[6], KEYS[7], limit, KEYS[3], KEYS[4], ARGV[8], ARGV[4], ARGV[9], ARGV[10],
             ARGV[11])
return 0
