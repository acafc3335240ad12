-- flow_lib: the slot functions of the held-run scripts (aqsh only), spliced into a script where
-- it says "--@include flow_lib" (this file is lua/_flow_lib.lua); what holds and starts a run
-- is lua/_flow_wait.lua ("--@include flow_wait", after this part where both are needed). The
-- finishing transitions' release needs only these, and every function a script splices in is
-- a closure its every call creates. A concurrency key "K" of queue q has three keys, all under
-- the queue's {q} hash tag so every script touching them stays in the queue's Cluster slot:
--   aqsh:{q}:flow:slots:K  zset of the ids holding a slot, scored by a reservation deadline
--                          (Unix s); a holder whose lease is live keeps its slot past it
--   aqsh:{q}:flow:wait:K   zset of the ids waiting for a slot, scored by submission time
--                          (Unix us): the line keeps submission order even when workers
--                          race to dequeue runs of one key
--   aqsh:{q}:flow:keys     hash K -> limit of every key with holders or waiters (the sweep's
--                          work list)
-- A waiter sits in asynq:{q}:scheduled (far ahead) with state "scheduled", so asynq tools show
-- it and can delete or run it; its task hash says why with aqsh_wait_reason / aqsh_wait_key.

-- Drop the slots whose holder no longer runs: the reservation deadline has passed and the id
-- holds no live lease (its worker died, or a promoted waiter was never picked up).
local function flow_free_expired(slots, lease, now_s)
  local due = redis.call("ZRANGEBYSCORE", slots, "-inf", now_s)
  for _, id in ipairs(due) do
    local until_s = redis.call("ZSCORE", lease, id)
    if until_s and tonumber(until_s) > tonumber(now_s) then
      redis.call("ZADD", slots, until_s, id)
    else
      redis.call("ZREM", slots, id)
    end
  end
end

-- Give free slots to the oldest waiters: each gets its slot reserved at once (so a newcomer
-- cannot take it first) and goes to the front of pending. A waiter that a foreign tool ran,
-- deleted or archived meanwhile is no longer in scheduled and is skipped. Returns how many
-- moved; wakes idle aqsh workers when any did (a refused PUBLISH never fails the call).
local function flow_promote(slots, wait, limit, scheduled, pending, prefix, reserve_s, now_ns,
                            qname, channel)
  local moved = 0
  while redis.call("ZCARD", slots) < limit do
    -- ZRANGE + ZREM rather than ZPOPMIN: the commands of aqsh's documented ACL.
    local head = redis.call("ZRANGE", wait, 0, 0)
    if #head == 0 then
      break
    end
    local id = head[1]
    redis.call("ZREM", wait, id)
    local key = prefix .. id
    if redis.call("HGET", key, "aqsh_wait_reason") == "concurrency"
        and redis.call("ZREM", scheduled, id) == 1 then
      redis.call("ZADD", slots, reserve_s, id)
      redis.call("RPUSH", pending, id)
      redis.call("HSET", key, "state", "pending", "pending_since", now_ns)
      redis.call("HDEL", key, "aqsh_wait_reason", "aqsh_wait_key")
      moved = moved + 1
    end
  end
  if moved > 0 then
    redis.pcall("PUBLISH", channel, qname)
  end
  return moved
end

-- Forget a key that nobody holds or waits for.
local function flow_forget_if_idle(registry, flow_key, slots, wait)
  if redis.call("ZCARD", slots) == 0 and redis.call("ZCARD", wait) == 0 then
    redis.call("HDEL", registry, flow_key)
  end
end

