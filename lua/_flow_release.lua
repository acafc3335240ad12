-- _flow_release: wrapped (with flow_lib) to a finishing transition (done, mark_complete,
-- retry, archive) as its "+flow" variant, so the slot is freed and the next waiter promoted
-- in the same script call as the transition: a crash in between cannot exist.
-- The variant takes the transition's own KEYS and ARGV followed by:
-- KEYS[n-5] -> aqsh:{q}:flow:slots:<key>
-- KEYS[n-4] -> aqsh:{q}:flow:wait:<key>
-- KEYS[n-3] -> aqsh:{q}:flow:keys
-- KEYS[n-2] -> asynq:{q}:scheduled
-- KEYS[n-1] -> asynq:{q}:pending
-- KEYS[n]   -> asynq:{q}:lease
-- ARGV: ..., concurrency key, limit, now (Unix s), reservation deadline (Unix s),
--       now (Unix ns), task key prefix, queue name, wake-up channel
-- They are taken off the ends before the transition runs, so its own optional trailing
-- KEYS/ARGV (a unique lock, a result) keep their places. The release happens only when the
-- transition succeeded.
--@include flow_lib
-- (Read by index and cut from the end: a finishing transition of every limited run pays
-- this, and fourteen table.remove calls cost more than the release itself.)
local flow_nk, flow_na = #KEYS, #ARGV
local flow_slots, flow_wait, flow_registry, flow_scheduled, flow_pending, flow_lease =
  KEYS[flow_nk - 5], KEYS[flow_nk - 4], KEYS[flow_nk - 3], KEYS[flow_nk - 2],
  KEYS[flow_nk - 1], KEYS[flow_nk]
local flow_key, flow_limit, flow_now_s, flow_reserve_s, flow_now_ns, flow_prefix, flow_qname,
      flow_channel =
  ARGV[flow_na - 7], tonumber(ARGV[flow_na - 6]), ARGV[flow_na - 5], ARGV[flow_na - 4],
  ARGV[flow_na - 3], ARGV[flow_na - 2], ARGV[flow_na - 1], ARGV[flow_na]
for i = flow_nk, flow_nk - 5, -1 do
  KEYS[i] = nil
end
for i = flow_na, flow_na - 7, -1 do
  ARGV[i] = nil
end
local flow_id = ARGV[1]
--@transition
local flow_reply = flow_transition()
if type(flow_reply) == "table" and flow_reply.err then
  return flow_reply
end
redis.call("ZREM", flow_slots, flow_id)
if redis.call("ZCARD", flow_wait) > 0 then
  flow_free_expired(flow_slots, flow_lease, flow_now_s)
  flow_promote(flow_slots, flow_wait, flow_limit, flow_scheduled, flow_pending, flow_prefix,
               flow_reserve_s, flow_now_ns, flow_qname, flow_channel)
  flow_forget_if_idle(flow_registry, flow_key, flow_slots, flow_wait)
elseif redis.call("ZCARD", flow_slots) == 0 then
  -- Nobody waits, so nothing to promote and no dead holder's slot worth freeing now (an
  -- acquire that meets a full key, or the repair sweep, does that); an idle key is forgotten.
  redis.call("HDEL", flow_registry, flow_key)
end
return flow_reply
