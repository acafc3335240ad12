-- enqueue_packed, spliced by aqsh/engine/scripts.py into the scripts that enqueue a packed
-- batch of plain tasks (enqueue_batch, webhook_enqueue). Each task gets exactly asynq's
-- enqueueCmd treatment (EXISTS; HSET msg/state/pending_since; LPUSH onto pending), so the keys
-- and fields are those Go's client writes. What can be shared across the batch is done once
-- per batch rather than once per task (the Redis CPU per task is what bounds a batch):
-- * the ids go onto the pending list by LPUSHes of up to PUSH_CHUNK ids (LPUSH k a b = LPUSH k
--   a; LPUSH k b: the list ends in the same order);
-- * the run index (aqsh only) gets one ZADD per chunk and one trim per batch: its oldest
--   entries whose task is gone, at most two per task enqueued (index_run's average).
-- pending_key -> asynq:{q}:pending; task_prefix -> asynq:{q}:t:; now -> Unix ns (pending_since);
-- blob -> for each task a 4-byte big-endian length + id, then a 4-byte length + TaskMessage;
-- index_key -> aqsh:{q}:runs:<type> or nil (scored by now in ms).
-- Returns one integer per task in order (1 enqueued, 0 the id exists) and whether any was.
local PUSH_CHUNK = 500
local function enqueue_packed(pending_key, task_prefix, now, blob, index_key)
  local out, fresh = {}, {}
  local pos = 1
  while pos <= #blob do
    local id_len, msg_len
    id_len, pos = struct.unpack(">I4", blob, pos)
    local id = string.sub(blob, pos, pos + id_len - 1)
    pos = pos + id_len
    msg_len, pos = struct.unpack(">I4", blob, pos)
    local key = task_prefix .. id
    if redis.call("EXISTS", key) == 1 then
      out[#out + 1] = 0
    else
      redis.call("HSET", key, "msg", string.sub(blob, pos, pos + msg_len - 1),
        "state", "pending", "pending_since", now)
      out[#out + 1] = 1
      fresh[#fresh + 1] = id
    end
    pos = pos + msg_len
  end
  local score_ms = index_key and math.floor(tonumber(now) / 1000000)
  for first = 1, #fresh, PUSH_CHUNK do
    local last = math.min(first + PUSH_CHUNK - 1, #fresh)
    redis.call("LPUSH", pending_key, unpack(fresh, first, last))
    if index_key then
      local entries = {}
      for i = first, last do
        entries[#entries + 1] = score_ms
        entries[#entries + 1] = fresh[i]
      end
      redis.call("ZADD", index_key, unpack(entries))
    end
  end
  if index_key and #fresh > 0 then
    -- Read in pages of 16: in the steady state the oldest entry's task exists, one page.
    local gone, limit, live = {}, 2 * #fresh, false
    while not live and #gone < limit do
      local page = redis.call("ZRANGE", index_key, #gone, math.min(#gone + 15, limit - 1))
      if #page == 0 then break end
      for _, old in ipairs(page) do
        if redis.call("EXISTS", task_prefix .. old) == 1 then
          live = true
          break
        end
        gone[#gone + 1] = old
      end
    end
    for first = 1, #gone, PUSH_CHUNK do
      redis.call("ZREM", index_key, unpack(gone, first, math.min(first + PUSH_CHUNK - 1, #gone)))
    end
  end
  return out, #fresh > 0
end

-- After the tasks exist (a woken worker finds them): PUBLISH the queue name on the wake-up
-- channel when one is given and a task was enqueued. A pcall: a refused wake-up (an ACL user
-- without the channel) must not undo the enqueues, only be told: each 1 in out becomes 2.
local function wake_packed(out, enqueued, channel, qname)
  if enqueued and channel and channel ~= "" then
    local sent = redis.pcall("PUBLISH", channel, qname)
    if type(sent) == "table" and sent.err then
      for i = 1, #out do
        if out[i] == 1 then
          out[i] = 2
        end
      end
    end
  end
  return out
end
