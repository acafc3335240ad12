-- inspect_get_task: one task of one queue as a lookup by id needs it (GET /tasks/{id}), in one
-- call: the task hash's fields and the one score its state reports. Read-only.
-- KEYS[1] -> asynq:{<qname>}:t:<task_id>
-- KEYS[2] -> asynq:{<qname>}:scheduled
-- KEYS[3] -> asynq:{<qname>}:retry
-- KEYS[4] -> asynq:{<qname>}:lease
-- ARGV[1] -> task id
-- Returns nil when the queue holds no such task (no hash, or one without msg or state);
-- otherwise {msg, state, result, pending_since, score}, each nil when absent; score is the
-- task's score in the zset of its state (scheduled, retry: when it becomes pending, Unix s;
-- active: when its lease expires, Unix s), nil in other states.
local fields = redis.call("HMGET", KEYS[1], "msg", "state", "result", "pending_since")
if not fields[1] or not fields[2] then
  return false
end
local state = fields[2]
local score = false
if state == "scheduled" then
  score = redis.call("ZSCORE", KEYS[2], ARGV[1])
elseif state == "retry" then
  score = redis.call("ZSCORE", KEYS[3], ARGV[1])
elseif state == "active" then
  score = redis.call("ZSCORE", KEYS[4], ARGV[1])
end
return {fields[1], state, fields[3], fields[4], score}
