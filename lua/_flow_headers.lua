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

-- The aqsh flow headers of a message, positionally (no table is built: this runs for every
-- limited message a dequeue takes, and Lua 5.1's allocations and their garbage cost more than
-- the walk): the values of aqsh-concurrency-key, -limit, -seq, aqsh-rate-key, -limit, -per-s
-- (each nil when absent; the last entry of a name wins, as protobuf's map decoding says), then
-- the bounds of the type. Returns nothing when the message is malformed (the worker's decoder
-- refuses those bytes too) or holds a field of wire type 3 or 4 (proto2 groups: no asynq or
-- aqsh producer writes one; such a run is taken as if it had no rule). A field with a
-- one-byte tag and length, and a header entry written as encoders write it (key, then value,
-- one-byte lengths), are read with one string.byte call each; anything else takes the general
-- path. Only the names starting with "a" become Lua strings (interned: compared by pointer).
local function flow_message_headers(msg)
  local pos, stop, ts, te = 1, #msg, 1, 0
  local ckey, climit, cseq, rkey, rlimit, rper
  while pos <= stop do
    local tag, len = pb_byte(msg, pos, pos + 1)
    pos = pos + 2
    if tag >= 128 then
      tag, pos = pb_varint_rest(msg, tag, pos - 1, stop)
      if not tag then
        return
      end
      len = pb_byte(msg, pos)
      pos = pos + 1
    end
    local wt = tag % 8
    if wt == 2 then
      if not len then
        return
      end
      if len >= 128 then
        len, pos = pb_varint_rest(msg, len, pos, stop)
        if not len then
          return
        end
      end
      local last = pos + len - 1
      if last > stop then
        return
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
            return
          end
          ka = pb_byte(msg, ks)
        end
        if ka == 97 and ke - ks >= 12 then  -- "a", and as long as the shortest name
          local name = pb_sub(msg, ks, ke)
          if name == "aqsh-concurrency-key" then
            ckey = pb_sub(msg, vs, ve)
          elseif name == "aqsh-concurrency-limit" then
            climit = pb_sub(msg, vs, ve)
          elseif name == "aqsh-concurrency-seq" then
            cseq = pb_sub(msg, vs, ve)
          elseif name == "aqsh-rate-key" then
            rkey = pb_sub(msg, vs, ve)
          elseif name == "aqsh-rate-limit" then
            rlimit = pb_sub(msg, vs, ve)
          elseif name == "aqsh-rate-per-s" then
            rper = pb_sub(msg, vs, ve)
          end
        end
      elseif tag == 10 then  -- field 1: the type
        ts, te = pos, last
      end
      pos = last + 1
    elseif wt == 0 and len and len < 128 then
      -- A one-byte varint (retry counts, most flags): read already, as len.
    else
      pos = pb_skip_scalar(msg, pos - 1, wt)  -- its value started where len was read
      if not pos then
        return
      end
    end
  end
  if pos ~= stop + 1 then
    return
  end
  return true, ckey, climit, cseq, rkey, rlimit, rper, ts, te
end

-- The concurrency rule of a message that dequeue applies itself, positionally: key, limit (a
-- number), limit_text (as the header says), seq (the header's text or nil: flow_take_slot
-- checks it only for a run it holds), ts, te (the type's bounds in msg); nothing without a
-- rule. A run that also has a rate rule is left to the worker (its rate window comes first:
-- lua/flow_rate.lua, then lua/flow_acquire.lua), as is a malformed one. The plain search
-- first: a message without the header name (most) is never walked. flow_positive is
-- lua/_flow_wait.lua's (spliced before this part).
local function flow_dequeue_rule(msg)
  if not pb_find(msg, "aqsh-concurrency-key", 1, true) then
    return
  end
  local ok, key, limit_text, seq, rate_key, rate_limit, rate_per_s, ts, te =
    flow_message_headers(msg)
  if not ok then
    return
  end
  local limit = flow_positive(limit_text)
  if key == nil or limit == nil then
    return
  end
  if rate_key ~= nil and flow_positive(rate_limit) and flow_positive(rate_per_s) then
    return
  end
  return key, limit, limit_text, seq, ts, te
end
