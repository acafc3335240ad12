-- enqueue_batch: many new tasks of one queue become pending in one call (asynq §4.2, batched).
-- KEYS[1] -> asynq:{q}:pending
-- KEYS[2..n+1] -> asynq:{q}:t:<id> for each task, in order
-- ARGV[1] -> now (Unix nanoseconds), stored as pending_since
-- ARGV[2k], ARGV[2k+1] -> task id and encoded TaskMessage of the k-th task (k = 1..n)
-- Returns one integer per task: 1 enqueued, 0 a task with this id already exists.
-- Each task gets exactly the single-task enqueue treatment; one command carries the batch, so
-- a client pays one command's encoding and one reply's parsing instead of one per task.
local out = {}
for k = 2, #KEYS do
  local id = ARGV[2 * (k - 1)]
  if redis.call("EXISTS", KEYS[k]) == 1 then
    out[#out + 1] = 0
  else
    redis.call("HSET", KEYS[k], "msg", ARGV[2 * (k - 1) + 1], "state", "pending",
      "pending_since", ARGV[1])
    redis.call("LPUSH", KEYS[1], id)
    out[#out + 1] = 1
  end
end
return out
