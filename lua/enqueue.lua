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
--@include index_run
if redis.call("EXISTS", KEYS[1]) == 1 then
  return 0
end
redis.call("HSET", KEYS[1], "msg", ARGV[1], "state", "pending", "pending_since", ARGV[3])
redis.call("LPUSH", KEYS[2], ARGV[2])
if KEYS[3] then
  index_run(KEYS[3], string.sub(KEYS[1], 1, #KEYS[1] - #ARGV[2]), ARGV[2], math.floor(tonumber(ARGV[3]) / 1000000))
end
if ARGV[4] and ARGV[4] ~= "" then
  local sent = redis.pcall("PUBLISH", ARGV[4], ARGV[5])
  if type(sent) == "table" and sent.err then
    return 2
  end
end
return 1
