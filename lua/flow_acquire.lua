-- flow_acquire: a task just leased by dequeue takes a slot of its concurrency key, or waits.
-- Only for a run that also has a rate rule (admitted by lua/flow_rate.lua first): the dequeue
-- script does the same for every other limited run in its own call (lua/dequeue.lua).
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
--@include flow_wait
local queue = {active = KEYS[1], lease = KEYS[2], scheduled = KEYS[3], pending = KEYS[4],
               registry = KEYS[8], waited = KEYS[9], prefix = ARGV[8], reserve_s = ARGV[4],
               now_s = ARGV[3], now_ms = ARGV[7], now_us = ARGV[12], now_ns = ARGV[9],
               held_score = ARGV[5], qname = ARGV[10], channel = ARGV[11]}
return flow_take_slot(queue, ARGV[1], KEYS[5], KEYS[6], KEYS[7], ARGV[6], tonumber(ARGV[2]),
                      ARGV[2], ARGV[12], ARGV[13], 1, -1) and 1 or 0
