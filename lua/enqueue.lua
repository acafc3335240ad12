-- enqueue: a new task becomes pending (asynq §4.2).
-- KEYS[1] -> asynq:{q}:t:<id>      task hash
-- KEYS[2] -> asynq:{q}:pending     pending list
-- ARGV[1] -> encoded TaskMessage
-- ARGV[2] -> task id
-- ARGV[3] -> now (Unix nanoseconds), stored as pending_since
-- ARGV[4] -> optional: wake-up channel (aqsh:wake) to PUBLISH the queue name on
-- ARGV[5] -> optional: the queue name
-- KEYS[3] -> optional: aqsh:{q}:runs:<type>  run index (aqsh only), scored by now in ms
-- Returns 1 when enqueued, 0 when a task with this id already exists, 2 when enqueued but the
-- wake-up was refused (an ACL user without the channel: Redis 7's default for new users).
-- Publishing from the script saves aqsh's client a second command per enqueue. The PUBLISH is
-- a pcall: a refused wake-up must not undo the enqueue (workers poll anyway), only be told.
if redis.call("EXISTS", KEYS[1]) == 1 then
  return 0
end
redis.call("HSET", KEYS[1], "msg", ARGV[1], "state", "pending", "pending_since", ARGV[3])
redis.call("LPUSH", KEYS[2], ARGV[2])
if KEYS[3] then
  redis.call("ZADD", KEYS[3], math.floor(tonumber(ARGV[3]) / 1000000), ARGV[2])
  local prefix = string.sub(KEYS[1], 1, #KEYS[1] - #ARGV[2])
  -- Trim: the oldest entries whose task is gone (its retention ended, or it was deleted)
  -- go here, a few per enqueue, so the index follows the tasks without a pass of its own.
  for _ = 1, 2 do
    local old = redis.call("ZRANGE", KEYS[3], 0, 0)[1]
    if not old or redis.call("EXISTS", prefix .. old) == 1 then break end
    redis.call("ZREM", KEYS[3], old)
  end
end
if ARGV[4] and ARGV[4] ~= "" then
  local sent = redis.pcall("PUBLISH", ARGV[4], ARGV[5])
  if type(sent) == "table" and sent.err then
    return 2
  end
end
return 1
