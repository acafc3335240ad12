-- flow_repair: the periodic sweep over every concurrency key of a queue. It frees slots whose
-- holder died (lease expired), drops waiters that a foreign tool ran, deleted or archived,
-- gives free slots to the oldest waiters, and forgets keys nobody uses. What the release
-- inside the finishing transitions does in the normal case; this catches the rest.
-- KEYS[1] -> aqsh:{q}:flow:keys
-- KEYS[2] -> asynq:{q}:scheduled
-- KEYS[3] -> asynq:{q}:pending
-- KEYS[4] -> asynq:{q}:lease
-- ARGV[1] -> now (Unix s)
-- ARGV[2] -> reservation deadline (Unix s)
-- ARGV[3] -> now (Unix ns)
-- ARGV[4] -> task key prefix asynq:{q}:t:
-- ARGV[5] -> slots key prefix aqsh:{q}:flow:slots:
-- ARGV[6] -> wait key prefix aqsh:{q}:flow:wait:
-- ARGV[7] -> queue name, published on ARGV[8] (the wake-up channel) when a waiter moves
-- Returns how many waiters were promoted. The per-key names are built from prefixes that
-- carry the queue's hash tag, so they are in this script's slot.
--@include flow_lib
local promoted = 0
local entries = redis.call("HGETALL", KEYS[1])
for i = 1, #entries, 2 do
  local flow_key, limit = entries[i], tonumber(entries[i + 1])
  local slots, wait = ARGV[5] .. flow_key, ARGV[6] .. flow_key
  flow_free_expired(slots, KEYS[4], ARGV[1])
  for _, id in ipairs(redis.call("ZRANGE", wait, 0, -1)) do
    if redis.call("HGET", ARGV[4] .. id, "aqsh_wait_reason") ~= "concurrency"
        or not redis.call("ZSCORE", KEYS[2], id) then
      redis.call("ZREM", wait, id)
    end
  end
  promoted = promoted + flow_promote(slots, wait, limit, KEYS[2], KEYS[3], ARGV[4], ARGV[2],
                                     ARGV[3], ARGV[7], ARGV[8])
  flow_forget_if_idle(KEYS[1], flow_key, slots, wait)
end
return promoted
