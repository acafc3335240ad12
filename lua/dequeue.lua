-- dequeue: move up to N pending tasks to active and lease them (asynq §4.8, batched). A task
-- with aqsh's concurrency rule (aqsh-concurrency-* headers) takes a slot of its key in the
-- same call, or is held (moved to scheduled, in its key's line) and the next one is taken:
-- what lua/flow_acquire.lua does after a dequeue, without its round trip.
-- KEYS[1] -> asynq:{q}:pending
-- KEYS[2] -> asynq:{q}:paused
-- KEYS[3] -> asynq:{q}:active
-- KEYS[4] -> asynq:{q}:lease
-- KEYS[5] -> asynq:{q}:scheduled
-- KEYS[6] -> aqsh:{q}:flow:keys
-- KEYS[7] -> aqsh:{q}:flow:waited
-- ARGV[1] -> lease expiry (Unix seconds, integer), also a taken slot's reservation deadline
-- ARGV[2] -> task key prefix asynq:{q}:t:
-- ARGV[3] -> maximum number of tasks to take (>= 1)
-- ARGV[4] -> most runs to hold in this call (>= 1): bounds the call when a line is long
-- ARGV[5] -> now (Unix s)
-- ARGV[6] -> now (Unix ms), when a held run's wait began
-- ARGV[7] -> now (Unix us), the place in line of a run without aqsh-concurrency-seq
-- ARGV[8] -> now (Unix ns), pending_since of a promoted waiter
-- ARGV[9] -> the held runs' score in scheduled (Unix s, far ahead)
-- ARGV[10] -> slots key prefix aqsh:{q}:flow:slots:
-- ARGV[11] -> wait key prefix aqsh:{q}:flow:wait:
-- ARGV[12] -> queue name, published on ARGV[13] (the wake-up channel) when a waiter moves
-- Returns {held, msg, msg, ...}: how many runs this call held, then the encoded TaskMessages
-- leased ({} when paused). held = ARGV[4] means it stopped there: pending may hold more.
-- Each task taken gets exactly asynq's single-dequeue treatment. An id whose hash has no msg
-- is put back nowhere: it is dropped from active with its stub, so no orphan is left behind
-- (asynq's Q9 leaves one; we do not copy that). The per-key names are built from prefixes
-- that carry the queue's hash tag, so they are in this script's slot.
--@include flow_lib
--@include flow_headers
if redis.call("EXISTS", KEYS[2]) == 1 then
  return {}
end

-- The run takes a slot of rule's key (true), or is held in the key's line (false).
local function acquire(id, task_key, rule, was)
  local slots, wait = ARGV[10] .. rule.key, ARGV[11] .. rule.key
  -- A free slot nobody waits for, or its own reservation (a promoted waiter, a redelivery).
  local holders = redis.call("ZCARD", slots)
  local run = (holders < rule.limit and redis.call("ZCARD", wait) == 0)
      or redis.call("ZSCORE", slots, id)
  -- Dead holders' slots are looked for only when they could make a difference.
  if not run then
    flow_free_expired(slots, KEYS[4], ARGV[5])
    run = redis.call("ZSCORE", slots, id)
        or (redis.call("ZCARD", wait) == 0 and redis.call("ZCARD", slots) < rule.limit)
    holders = 0  -- registered below whatever it finds
  end
  -- The sweep's work list: a key with holders is on it already (it leaves the list only
  -- once nobody holds or waits), so only a first holder or a waiter writes it.
  if holders == 0 or not run then
    redis.call("HSET", KEYS[6], rule.key, rule.limit_text)
  end
  if run then
    redis.call("ZADD", slots, ARGV[1], id)
    if was[2] or was[3] then
      redis.call("HDEL", task_key, "aqsh_wait_reason", "aqsh_wait_key")
    end
    if was[4] then
      flow_record_wait(task_key, KEYS[7], flow_rule_type(rule), ARGV[6], id)
    end
    return true
  end
  flow_hold(KEYS[3], KEYS[4], KEYS[5], task_key, id, ARGV[9], "concurrency", rule.key,
            ARGV[6])
  redis.call("ZADD", wait, rule.seq or ARGV[7], id)
  -- A slot freed by an expiry with waiters ahead goes to the oldest of them: to the front of
  -- pending, so this very loop takes it next.
  flow_promote(slots, wait, rule.limit, KEYS[5], KEYS[1], ARGV[2], ARGV[1], ARGV[8], ARGV[12],
               ARGV[13])
  return false
end

local out = {0}
local limit, hold_limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local taken, held = 0, 0
while taken < limit and held < hold_limit do
  local id = redis.call("RPOPLPUSH", KEYS[1], KEYS[3])
  if not id then
    break
  end
  local key = ARGV[2] .. id
  local was = redis.call("HMGET", key, "msg", "aqsh_wait_reason", "aqsh_wait_key",
                         "aqsh_wait_since")
  local msg = was[1]
  if msg then
    redis.call("HDEL", key, "pending_since")
    local rule = flow_dequeue_rule(msg)
    if rule == nil or acquire(id, key, rule, was) then
      taken = taken + 1
      redis.call("HSET", key, "state", "active")
      redis.call("ZADD", KEYS[4], ARGV[1], id)
      out[#out + 1] = msg
    else
      held = held + 1
    end
  else
    taken = taken + 1
    redis.call("LREM", KEYS[3], 1, id)
  end
end
out[1] = held
return out
