-- enqueue_batch: many new tasks of one queue become pending in one call (asynq §4.2, batched).
-- KEYS[1] -> asynq:{q}:pending
-- ARGV[1] -> now (Unix nanoseconds), stored as pending_since
-- ARGV[2] -> task key prefix asynq:{q}:t:  (task keys share the queue's slot)
-- ARGV[3] -> the tasks, packed: for each, a 4-byte big-endian length + task id, then a 4-byte
--            big-endian length + encoded TaskMessage
-- ARGV[4] -> optional: wake-up channel (aqsh:wake) to PUBLISH the queue name on, once, when at
--            least one task was enqueued (after the tasks exist, so a woken worker finds them)
-- ARGV[5] -> optional: the queue name
-- KEYS[2] -> optional: aqsh:{q}:runs:<type>  run index (aqsh only; the tasks are then all of
--            that type), scored by now in ms
-- Returns one integer per task, in order: 1 enqueued, 0 a task with this id already exists,
-- 2 enqueued but the wake-up was refused (pcall: the enqueues stand; see enqueue.lua).
-- Each task gets exactly the single-task enqueue treatment. Packing the batch into one argument
-- spares the client encoding thousands of arguments (its main cost in profiles).
--@include index_run
local out = {}
local enqueued = false
local blob = ARGV[3]
local pos = 1
local index_ms = KEYS[2] and math.floor(tonumber(ARGV[1]) / 1000000)
while pos <= #blob do
  local id_len, msg_len
  id_len, pos = struct.unpack(">I4", blob, pos)
  local id = string.sub(blob, pos, pos + id_len - 1)
  pos = pos + id_len
  msg_len, pos = struct.unpack(">I4", blob, pos)
  local msg = string.sub(blob, pos, pos + msg_len - 1)
  pos = pos + msg_len
  local key = ARGV[2] .. id
  if redis.call("EXISTS", key) == 1 then
    out[#out + 1] = 0
  else
    redis.call("HSET", key, "msg", msg, "state", "pending", "pending_since", ARGV[1])
    redis.call("LPUSH", KEYS[1], id)
    if KEYS[2] then
      index_run(KEYS[2], ARGV[2], id, index_ms)
    end
    out[#out + 1] = 1
    enqueued = true
  end
end
if enqueued and ARGV[4] and ARGV[4] ~= "" then
  local sent = redis.pcall("PUBLISH", ARGV[4], ARGV[5])
  if type(sent) == "table" and sent.err then
    for i = 1, #out do
      if out[i] == 1 then
        out[i] = 2
      end
    end
  end
end
return out
