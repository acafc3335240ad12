-- index_run, spliced by aqsh/engine/scripts.py into the enqueue and schedule scripts that ask
-- for it with an include line (aqsh/engine/scripts.py): a new task enters the run index aqsh:{q}:runs:<type>.
-- Trim: the oldest entries whose task is gone (its retention ended, or it was deleted) go here,
-- a few per enqueue, so the index follows the tasks without a pass of its own.
-- task_prefix is asynq:{q}:t: (the index and the tasks share the queue's slot).
local function index_run(index_key, task_prefix, id, score_ms)
  redis.call("ZADD", index_key, score_ms, id)
  for _ = 1, 2 do
    local old = redis.call("ZRANGE", index_key, 0, 0)[1]
    if not old or redis.call("EXISTS", task_prefix .. old) == 1 then break end
    redis.call("ZREM", index_key, old)
  end
end
