-- flow_headers: read aqsh's flow-control headers out of an encoded asynq TaskMessage (the
-- protobuf in a task hash's "msg"), spliced where a script says "--@include flow_headers".
-- The rule travels in the message (aqsh/engine/flow.py), so the dequeue script can apply it
-- without another round trip, for any producer (aqsh, Go, a tool that moved the task).
-- Only what the walk needs of protobuf: varints, and the wire types 0 (varint), 1 (64-bit),
-- 2 (length-delimited) and 5 (32-bit). TaskMessage: field 1 is the type, field 15 the
-- map<string, string> headers, each entry a message of key = 1, value = 2.
-- This runs inside the dequeue of every message that names a concurrency header, so it is
-- written for Lua 5.1's interpreter: one-byte tags and lengths (nearly every field) are read
-- inline, and only header names starting "aqsh-" become Lua strings.
local pb_byte, pb_sub, pb_find = string.byte, string.sub, string.find

-- A varint whose first byte b (>= 128) was at pos - 1: its value and the position after it
-- (nil at a truncated one). Lengths are small; other varints are only skipped, so a double's
-- precision is enough.
local function pb_varint_rest(s, b, pos, stop)
  local value, scale = b - 128, 128
  while pos <= stop do
    b = pb_byte(s, pos)
    pos = pos + 1
    if b < 128 then
      return value + b * scale, pos
    end
    value = value + (b - 128) * scale
    scale = scale * 128
  end
  return nil, pos
end

-- The position after a field of wire type wt (0: varint, 1: 64-bit, 5: 32-bit) whose
-- value starts at pos; nil for another wire type. (A truncated value is caught by the
-- caller's final position check.)
local function pb_skip_scalar(s, pos, wt)
  if wt == 0 then
    while (pb_byte(s, pos) or 0) >= 128 do
      pos = pos + 1
    end
    return pos + 1
  elseif wt == 1 then
    return pos + 8
  elseif wt == 5 then
    return pos + 4
  end
  return nil
end

-- One header map entry between first and last: its key's and value's bounds (nil when
-- malformed). Any order of the entry's fields, as protobuf allows; last one wins.
local function pb_entry(s, first, last)
  local pos, ks, ke, vs, ve = first, first, first - 1, first, first - 1
  while pos <= last do
    local tag = pb_byte(s, pos)
    pos = pos + 1
    if tag >= 128 then
      tag, pos = pb_varint_rest(s, tag, pos, last)
      if not tag then
        return nil
      end
    end
    local wt = tag % 8
    if wt == 2 then
      local len = pb_byte(s, pos)
      if not len then
        return nil
      end
      pos = pos + 1
      if len >= 128 then
        len, pos = pb_varint_rest(s, len, pos, last)
        if not len then
          return nil
        end
      end
      if tag == 10 then
        ks, ke = pos, pos + len - 1
      elseif tag == 18 then
        vs, ve = pos, pos + len - 1
      end
      pos = pos + len
    else
      pos = pb_skip_scalar(s, pos, wt)
      if not pos then
        return nil
      end
    end
  end
  if pos ~= last + 1 then
    return nil
  end
  return ks, ke, vs, ve
end

-- The message's headers whose names start with "aqsh-" (a table of name -> value) and the
-- bounds of its type, or nil when the message is malformed (the worker's decoder refuses
-- those bytes too) or holds a field of wire type 3 or 4 (proto2 groups: no asynq or aqsh
-- producer writes one; such a run is taken as if it had no rule). A field with a one-byte
-- tag and length, and a header entry written as encoders write it (key, then value, one-byte
-- lengths), are read with one string.byte call each; anything else takes the general path.
local function flow_message_headers(msg)
  local pos, stop, headers, ts, te = 1, #msg, {}, 1, 0
  while pos <= stop do
    local tag, len = pb_byte(msg, pos, pos + 1)
    pos = pos + 2
    if tag >= 128 then
      tag, pos = pb_varint_rest(msg, tag, pos - 1, stop)
      if not tag then
        return nil
      end
      len = pb_byte(msg, pos)
      pos = pos + 1
    end
    local wt = tag % 8
    if wt == 2 then
      if not len then
        return nil
      end
      if len >= 128 then
        len, pos = pb_varint_rest(msg, len, pos, stop)
        if not len then
          return nil
        end
      end
      local last = pos + len - 1
      if last > stop then
        return nil
      end
      if tag == 122 then  -- field 15: one header
        local kt, kl, ka = pb_byte(msg, pos, pos + 2)
        local ks, ke, vs, ve
        if kt == 10 and kl < 128 then
          ks, ke = pos + 2, pos + 1 + kl
          local vt, vl = pb_byte(msg, ke + 1, ke + 2)
          if vt == 18 and vl and vl < 128 and ke + 2 + vl == last then
            vs, ve = ke + 3, last
          end
        end
        if not vs then
          ks, ke, vs, ve = pb_entry(msg, pos, last)
          if not ks then
            return nil
          end
          ka = pb_byte(msg, ks)
        end
        if ka == 97 and ke - ks >= 4 and pb_sub(msg, ks, ks + 4) == "aqsh-" then
          headers[pb_sub(msg, ks, ke)] = pb_sub(msg, vs, ve)
        end
      elseif tag == 10 then  -- field 1: the type
        ts, te = pos, last
      end
      pos = last + 1
    else
      pos = pb_skip_scalar(msg, pos - 1, wt)  -- its value started where len was read
      if not pos then
        return nil
      end
    end
  end
  if pos ~= stop + 1 then
    return nil
  end
  return headers, ts, te
end

-- A header that must be a whole number >= 1 (ASCII digits, as aqsh.engine.flow reads it).
local function flow_positive(text)
  if text == nil or not pb_find(text, "^%d+$") then
    return nil
  end
  local n = tonumber(text)
  if n < 1 then
    return nil
  end
  return n
end

-- The concurrency rule of a message that dequeue applies itself, or nil without one:
-- {key, limit, limit_text, seq (text or nil), msg, ts, te (the type's bounds in msg)}.
-- A run that also has a rate rule is left to the worker (its rate window comes first:
-- lua/flow_rate.lua, then lua/flow_acquire.lua), as is a malformed one.
-- The plain search first: a message without the header name (most) is never walked.
local function flow_dequeue_rule(msg)
  if not pb_find(msg, "aqsh-concurrency-key", 1, true) then
    return nil
  end
  local h, ts, te = flow_message_headers(msg)
  if h == nil then
    return nil
  end
  local key, limit_text = h["aqsh-concurrency-key"], h["aqsh-concurrency-limit"]
  local limit = flow_positive(limit_text)
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
  return {key = key, limit = limit, limit_text = limit_text,
          seq = flow_positive(seq) and seq or nil, msg = msg, ts = ts, te = te}
end

-- The task type of a rule's message (only a run that waited needs it, for its record).
local function flow_rule_type(rule)
  return pb_sub(rule.msg, rule.ts, rule.te)
end
