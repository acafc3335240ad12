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
--@include flow_wait
--@include flow_headers
if redis.call("EXISTS", KEYS[2]) == 1 then
  return {}
end

local queue = {active = KEYS[3], lease = KEYS[4], scheduled = KEYS[5], pending = KEYS[1],
               registry = KEYS[6], waited = KEYS[7], prefix = ARGV[2], reserve_s = ARGV[1],
               now_s = ARGV[5], now_ms = ARGV[6], now_us = ARGV[7], now_ns = ARGV[8],
               held_score = ARGV[9], qname = ARGV[12], channel = ARGV[13]}

local out = {0}
local limit, hold_limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local taken, held = 0, 0
-- The slots and wait keys of the last concurrency key met (slots_of): a batch is often runs of
-- one key.
local slots_of, slots, wait
while taken < limit and held < hold_limit do
  local id = redis.call("RPOPLPUSH", KEYS[1], KEYS[3])
  if not id then
    break
  end
  local key = ARGV[2] .. id
  local msg = redis.call("HGET", key, "msg")
  if msg then
    redis.call("HDEL", key, "pending_since")
    local flow_key, flow_limit, limit_text, seq, ts, te = flow_dequeue_rule(msg)
    if flow_key ~= nil and flow_key ~= slots_of then  -- the key's names, once per run of a key
      slots_of, slots, wait = flow_key, ARGV[10] .. flow_key, ARGV[11] .. flow_key
    end
    if flow_key == nil or flow_take_slot(queue, id, key, slots, wait, flow_key, flow_limit,
                                         limit_text, seq, msg, ts, te) then
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
