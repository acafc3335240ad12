-- dequeue: move up to N pending tasks to active and lease them (asynq §4.8, batched).
-- KEYS[1] -> asynq:{q}:pending
-- KEYS[2] -> asynq:{q}:paused
-- KEYS[3] -> asynq:{q}:active
-- KEYS[4] -> asynq:{q}:lease
-- ARGV[1] -> lease expiry (Unix seconds, integer)
-- ARGV[2] -> task key prefix asynq:{q}:t:
-- ARGV[3] -> maximum number of tasks to take (>= 1)
-- Returns a flat array of encoded TaskMessages (empty when paused or empty).
-- Each task gets exactly asynq's single-dequeue treatment. An id whose hash has no msg is put
-- back nowhere: it is dropped from active with its stub, so no orphan is left behind
-- (asynq's Q9 leaves one; we do not copy that).
if redis.call("EXISTS", KEYS[2]) == 1 then
  return {}
end
local out = {}
local limit = tonumber(ARGV[3])
local taken = 0
while taken < limit do
  local id = redis.call("RPOPLPUSH", KEYS[1], KEYS[3])
  if not id then
    break
  end
  taken = taken + 1
  local key = ARGV[2] .. id
  local msg = redis.call("HGET", key, "msg")
  if msg then
    redis.call("HSET", key, "state", "active")
    redis.call("HDEL", key, "pending_since")
    redis.call("ZADD", KEYS[4], ARGV[1], id)
    out[#out + 1] = msg
  else
    redis.call("LREM", KEYS[3], 1, id)
  end
end
return out
