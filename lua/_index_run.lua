-- index_run, spliced by aqsh/engine/scripts.py into the enqueue and schedule scripts that ask
-- for it with an include line (aqsh/engine/scripts.py): a new task enters the run index aqsh:{q}:runs:<type>.
-- Trim: the oldest entries whose task is gone (its retention ended, or it was deleted) go here,
-- so the index follows the tasks without a pass of its own; but only by the enqueues of one
-- millisecond in TRIM_EVERY (score_ms a multiple of it), each up to TRIM_MAX entries: the same
-- two per enqueue on average as a trim by every enqueue, while in the steady state (the oldest
-- entry's task still exists) the other enqueues skip the ZRANGE and EXISTS that find nothing.
-- The clock decides, not the id (a caller's own ids may all end alike). RunIndexer sweeps what
-- is left anywhere in the index, and every reader skips an entry whose task is gone.
-- task_prefix is asynq:{q}:t: (the index and the tasks share the queue's slot).
local TRIM_EVERY, TRIM_MAX = 8, 16
local function index_run(index_key, task_prefix, id, score_ms)
  redis.call("ZADD", index_key, score_ms, id)
  if tonumber(score_ms) % TRIM_EVERY ~= 0 then return end
  local gone = {}
  for _, old in ipairs(redis.call("ZRANGE", index_key, 0, TRIM_MAX - 1)) do
    if redis.call("EXISTS", task_prefix .. old) == 1 then break end
    gone[#gone + 1] = old
  end
  if #gone > 0 then
    redis.call("ZREM", index_key, unpack(gone))
  end
end
