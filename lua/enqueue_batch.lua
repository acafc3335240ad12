-- enqueue_batch: many new tasks of one queue become pending in one call (asynq §4.2, batched).
-- KEYS[1] -> asynq:{q}:pending
-- ARGV[1] -> now (Unix nanoseconds), stored as pending_since
-- ARGV[2] -> task key prefix asynq:{q}:t:  (task keys share the queue's slot)
-- ARGV[3] -> the tasks, packed: for each, a 4-byte big-endian length + task id, then a 4-byte
--            big-endian length + encoded TaskMessage
-- ARGV[4] -> optional: wake-up channel (aqsh:wake) to PUBLISH the queue name on, once, when at
--            least one task was enqueued (after the tasks exist, so a woken worker finds them)
-- ARGV[5] -> optional: the queue name
-- KEYS[2] -> optional: aqsh:{q}:runs:<type>  run index (aqsh only; the tasks are then all of
--            that type), scored by now in ms
-- Returns one integer per task, in order: 1 enqueued, 0 a task with this id already exists,
-- 2 enqueued but the wake-up was refused (pcall: the enqueues stand; see enqueue.lua).
-- Each task gets exactly the single-task enqueue's keys and fields (lua/_enqueue_packed.lua).
-- Packing the batch into one argument spares the client encoding thousands of arguments (its
-- main cost in profiles).
--@include enqueue_packed
local out, enqueued = enqueue_packed(KEYS[1], ARGV[2], ARGV[1], ARGV[3], KEYS[2])
return wake_packed(out, enqueued, ARGV[4], ARGV[5])
