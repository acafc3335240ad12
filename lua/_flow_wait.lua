-- flow_wait: the held-run functions that hold a run, start one and record its wait (aqsh
-- only), spliced where a script says "--@include flow_wait" (this file is lua/_flow_wait.lua).
-- flow_take_slot calls flow_free_expired and flow_promote: a script using it includes
-- flow_lib first; lua/_flow_headers.lua (spliced after it) uses flow_positive. Keys as
-- lua/_flow_lib.lua describes them.

-- A header that must be a whole number >= 1 (ASCII digits, as aqsh.engine.flow reads it).
local function flow_positive(text)
  if text == nil or not string.find(text, "^%d+$") then
    return nil
  end
  local n = tonumber(text)
  if n < 1 then
    return nil
  end
  return n
end

-- Hold a run that was just dequeued: out of active and the lease set, into scheduled at
-- score_s with state "scheduled" and why it waits (since: the first time it was held).
local function flow_hold(active, lease, scheduled, task_key, id, score_s, reason, key, since_ms)
  redis.call("LREM", active, 0, id)
  redis.call("ZREM", lease, id)
  redis.call("ZADD", scheduled, score_s, id)
  redis.call("HSET", task_key, "state", "scheduled", "aqsh_wait_reason", reason,
             "aqsh_wait_key", key)
  redis.call("HSETNX", task_key, "aqsh_wait_since", since_ms)
end

-- A wait goes to the queue's short record of waits (a zset by start time, the newest 10000
-- kept) for the metrics' histogram.
local function flow_note_wait(waited, task_type, waited_ms, now_ms, id)
  redis.call("ZADD", waited, now_ms, task_type .. "\t" .. math.max(0, waited_ms) .. "\t" .. id)
  redis.call("ZREMRANGEBYRANK", waited, 0, -10001)
end

-- A run that waited for a slot or a window starts: its wait is recorded.
local function flow_record_wait(task_key, waited, task_type, now_ms, id)
  local since = redis.call("HGET", task_key, "aqsh_wait_since")
  if since then
    redis.call("HDEL", task_key, "aqsh_wait_since")
    flow_note_wait(waited, task_type, tonumber(now_ms) - tonumber(since), now_ms, id)
  end
end

-- A run just moved to active takes a slot of its concurrency key (returns true), or is held
-- in the key's line (false): what dequeue does for a limited run, and flow_acquire for one a
-- rate window admitted first. Positional arguments, not a table: dequeue calls this for every
-- limited message, and the tables (and a closure for the type) were most of its garbage.
-- q: active, lease, scheduled, pending, registry, waited, prefix (task keys), reserve_s (a
-- slot's deadline), now_s, now_ms, now_us, now_ns, qname, channel (the wake-up), built once
-- per call.
-- The run: id, task_key, slots and wait (the key's zsets), key, limit (a number), limit_text
-- (as written to the registry), seq (its place in line: a submission time as text, checked
-- only when the run is held, q.now_us instead when it is not a whole number >= 1); its type is
-- string.sub(type_src, ts, te), cut only for a run that waited (flow_acquire passes the type
-- itself with 1, -1).
local function flow_take_slot(q, id, task_key, slots, wait, key, limit, limit_text, seq,
                              type_src, ts, te)
  -- A free slot nobody waits for, or its own reservation (a promoted waiter, a redelivery).
  local holders = redis.call("ZCARD", slots)
  local run = (holders < limit and redis.call("ZCARD", wait) == 0)
      or redis.call("ZSCORE", slots, id)
  -- Dead holders' slots are looked for only when they could make a difference: a free slot
  -- with nobody waiting is taken as it is (the common case costs no range scan).
  if not run then
    flow_free_expired(slots, q.lease, q.now_s)
    run = redis.call("ZSCORE", slots, id)
        or (redis.call("ZCARD", wait) == 0 and redis.call("ZCARD", slots) < limit)
    holders = 0  -- registered below whatever it finds
  end
  -- The sweep's work list: a key with holders is on it already (it leaves the list only
  -- once nobody holds or waits), so only a first holder or a waiter writes it.
  if holders == 0 or not run then
    redis.call("HSET", q.registry, key, limit_text)
  end
  if run then
    redis.call("ZADD", slots, q.reserve_s, id)
    -- One read tells whether it ever waited. Every hold writes aqsh_wait_since along with the
    -- reason and the key (flow_hold), and only a start deletes it (here and flow_rate, after
    -- the other two), so a hash without it has none of the three: a run that never waited
    -- writes nothing more. One that did loses all three and its wait is recorded.
    local since = redis.call("HGET", task_key, "aqsh_wait_since")
    if since then
      redis.call("HDEL", task_key, "aqsh_wait_reason", "aqsh_wait_key", "aqsh_wait_since")
      flow_note_wait(q.waited, string.sub(type_src, ts, te), tonumber(q.now_ms) - tonumber(since),
                     q.now_ms, id)
    end
    return true
  end
  flow_hold(q.active, q.lease, q.scheduled, task_key, id, q.held_score, "concurrency", key,
            q.now_ms)
  -- Numbers go to Redis as the header's own text: Lua would print a large one as "1.7e+15",
  -- losing digits of a submission time.
  redis.call("ZADD", wait, flow_positive(seq) and seq or q.now_us, id)
  -- A slot freed by an expiry with waiters ahead goes to the oldest of them (to the front of
  -- pending: a dequeue takes it next).
  flow_promote(slots, wait, limit, q.scheduled, q.pending, q.prefix, q.reserve_s, q.now_ns,
               q.qname, q.channel)
  return false
end
