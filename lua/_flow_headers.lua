-- flow_headers: read aqsh's flow-control headers out of an encoded asynq TaskMessage (the
-- protobuf in a task hash's "msg"), spliced where a script says "--@include flow_headers".
-- The rule travels in the message (aqsh/engine/flow.py), so the dequeue script can apply it
-- without another round trip, for any producer (aqsh, Go, a tool that moved the task).
-- Only what the walk needs of protobuf: tag varints, and the wire types 0 (varint),
-- 1 (64-bit), 2 (length-delimited) and 5 (32-bit). TaskMessage: field 1 is the type,
-- field 15 the map<string, string> headers, each entry a message of key = 1, value = 2.

-- A varint at pos: its value and the position after it (nil at a truncated one). Lengths
-- and tags are small; other varints are only skipped, so a double's precision is enough.
local function pb_varint(s, pos, stop)
  local value, scale = 0, 1
  while pos <= stop do
    local b = string.byte(s, pos)
    pos = pos + 1
    if b < 128 then
      return value + b * scale, pos
    end
    value = value + (b - 128) * scale
    scale = scale * 128
  end
  return nil, pos
end

-- The position after the field of wire type wt whose value starts at pos; for a
-- length-delimited one also where its bytes start and end. nil when malformed.
local function pb_skip(s, pos, stop, wt)
  if wt == 0 then
    local v, after = pb_varint(s, pos, stop)
    return v and after
  elseif wt == 2 then
    local len, start = pb_varint(s, pos, stop)
    if not len or start + len - 1 > stop then
      return nil
    end
    return start + len, start, start + len - 1
  elseif wt == 1 then
    return pos + 8 <= stop + 1 and pos + 8 or nil
  elseif wt == 5 then
    return pos + 4 <= stop + 1 and pos + 4 or nil
  end
  return nil
end

-- One header map entry between first and last: its key and value (nil when malformed).
local function pb_entry(s, first, last)
  local pos, key, value = first, "", ""
  while pos <= last do
    local tag, at = pb_varint(s, pos, last)
    if not tag then
      return nil
    end
    local after, from, to = pb_skip(s, at, last, tag % 8)
    if not after then
      return nil
    end
    if tag == 10 then
      key = string.sub(s, from, to)
    elseif tag == 18 then
      value = string.sub(s, from, to)
    end
    pos = after
  end
  return key, value
end

-- The message's type and its headers whose names start with "aqsh-" (a table), or nil when
-- the message is malformed. What the worker decodes in Python is the same bytes, so a
-- message this walk refuses is one the worker refuses too.
local function flow_message_headers(msg)
  local pos, stop, headers, task_type = 1, #msg, {}, ""
  while pos <= stop do
    local tag, at = pb_varint(msg, pos, stop)
    if not tag then
      return nil
    end
    local after, from, to = pb_skip(msg, at, stop, tag % 8)
    if not after then
      return nil
    end
    if tag == 122 then  -- field 15, length-delimited: one header
      local key, value = pb_entry(msg, from, to)
      if key == nil then
        return nil
      end
      if string.sub(key, 1, 5) == "aqsh-" then
        headers[key] = value
      end
    elseif tag == 10 then  -- field 1: the type
      task_type = string.sub(msg, from, to)
    end
    pos = after
  end
  return task_type, headers
end

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

-- The concurrency rule of a message that dequeue applies itself: {key, limit, seq_us, type},
-- or nil without one. A run that also has a rate rule is left to the worker (its rate
-- window comes first: lua/flow_rate.lua, then lua/flow_acquire.lua), as is a malformed one.
-- The plain search first: a message without the header name (most) is never walked.
local function flow_dequeue_rule(msg)
  if not string.find(msg, "aqsh-concurrency-key", 1, true) then
    return nil
  end
  local task_type, h = flow_message_headers(msg)
  if task_type == nil then
    return nil
  end
  local key, limit = h["aqsh-concurrency-key"], flow_positive(h["aqsh-concurrency-limit"])
  if key == nil or limit == nil then
    return nil
  end
  if h["aqsh-rate-key"] ~= nil and flow_positive(h["aqsh-rate-limit"])
      and flow_positive(h["aqsh-rate-per-s"]) then
    return nil
  end
  -- Numbers go back to Redis as the header's own text: Lua would print a large one as
  -- "1.7e+15", losing digits of a submission time.
  local seq = h["aqsh-concurrency-seq"]
  return {key = key, limit = limit, limit_text = h["aqsh-concurrency-limit"],
          seq = flow_positive(seq) and seq or nil, type = task_type}
end
