-- log_attempt_times: when a task's first attempt started and its last one ended, as the log
-- writer recorded them (GET /tasks/{id}). Read-only.
-- KEYS[1] -> the log meta hash (aqsh.engine.keys.log_meta_key; the stream's slot)
-- KEYS[2] -> the log stream logs:<task_id>
-- Returns {started_ms, finished_ms} (Unix ms), each nil when unknown: the meta hash's
-- started_ms / finished_ms when it has started_ms; otherwise, for logs written before that
-- hash existed, the ms part of the stream's first entry id when that entry is a "start"
-- marker and of its last when that is an "eof" marker.
local kept = redis.call("HMGET", KEYS[1], "started_ms", "finished_ms")
if kept[1] then
  return {kept[1], kept[2]}
end
local function marker_ms(entries, marker)
  local entry = entries[1]
  if not entry then
    return false
  end
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == marker then
      return string.match(entry[1], "^(%d+)")
    end
  end
  return false
end
return {marker_ms(redis.call("XRANGE", KEYS[2], "-", "+", "COUNT", 1), "start"),
        marker_ms(redis.call("XREVRANGE", KEYS[2], "+", "-", "COUNT", 1), "eof")}
