-- enqueue_unique: a new task becomes pending while holding a uniqueness lock (asynq §4.3).
-- KEYS[1] -> asynq:{q}:unique:<type>:<md5>   lock
-- KEYS[2] -> asynq:{q}:t:<id>                task hash
-- KEYS[3] -> asynq:{q}:pending               pending list
-- ARGV[1] -> task id (lock value)
-- ARGV[2] -> lock TTL (whole seconds)
-- ARGV[3] -> encoded TaskMessage (unique_key already set)
-- ARGV[4] -> now (Unix nanoseconds)
-- ARGV[5] -> optional: wake-up channel (aqsh:wake) to PUBLISH the queue name on
-- ARGV[6] -> optional: the queue name
-- KEYS[4] -> optional: aqsh:{q}:runs:<type>  run index (aqsh only), scored by now in ms
-- Returns 1 when enqueued, -1 when the lock is held (duplicate), 0 on an id conflict, 2 when
-- enqueued but the wake-up was refused (pcall: the enqueue stands; see enqueue.lua).
-- As in asynq, a lock taken before an id conflict is kept until its TTL.
--@include index_run
if not redis.call("SET", KEYS[1], ARGV[1], "NX", "EX", ARGV[2]) then
  return -1
end
if redis.call("EXISTS", KEYS[2]) == 1 then
  return 0
end
redis.call("HSET", KEYS[2], "msg", ARGV[3], "state", "pending", "pending_since", ARGV[4],
  "unique_key", KEYS[1])
redis.call("LPUSH", KEYS[3], ARGV[1])
if KEYS[4] then
  index_run(KEYS[4], string.sub(KEYS[2], 1, #KEYS[2] - #ARGV[1]), ARGV[1], math.floor(tonumber(ARGV[4]) / 1000000))
end
if ARGV[5] and ARGV[5] ~= "" then
  local sent = redis.pcall("PUBLISH", ARGV[5], ARGV[6])
  if type(sent) == "table" and sent.err then
    return 2
  end
end
return 1
